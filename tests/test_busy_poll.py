"""The busy-polling wait: it answers at once when a request is waiting, and it
still lets trio run the other tasks (signals, lease breaks) when requests never
stop coming; its window follows a clock the tests can drive; and on a real
mount pyfuse3 really waits through it (busy polling replaces a private name of
pyfuse3, so a pyfuse3 that stopped calling it would otherwise go unnoticed),
unless the mount says ``-o busy_poll=0``."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from conftest import Mount, stop_mmfs
from mmfs import busy_poll


@pytest.fixture
def always_readable() -> Iterator[int]:
    """A descriptor that polls readable forever, like /dev/fuse under load."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"request")
    yield read_end
    os.close(read_end)
    os.close(write_end)


def test_pyfuse3_still_waits_through_the_hook() -> None:
    """Without this name in pyfuse3 the daemon loses its polling (and logs it)."""
    assert callable(getattr(pyfuse3, "_wait_fuse_readable", None))


def test_a_waiting_request_is_taken_without_trio(always_readable: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(busy_poll, "YIELD_EVERY", 3600.0)  # the yields are the next test's business
    trio_waits = 0

    async def wait_in_trio() -> bool:
        nonlocal trio_waits
        trio_waits += 1
        await trio.lowlevel.checkpoint()
        return True

    async def main() -> busy_poll.PollingWait:
        wait = busy_poll.PollingWait(always_readable, wait_in_trio, spin=busy_poll.SPIN)
        for _ in range(100):
            assert await wait()
        return wait

    wait = trio.run(main)
    assert trio_waits == 0
    assert (wait.caught_polling, wait.waits_in_trio) == (100, 0)


def test_other_tasks_run_while_requests_never_stop(always_readable: int) -> None:
    ran = trio.Event()
    requests = 0
    give_up = 1_000_000  # requests; a yield comes after about a thousand

    async def wait_in_trio() -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def serve(wait: busy_poll.Wait) -> None:
        nonlocal requests
        while not ran.is_set() and requests < give_up:
            assert await wait()
            requests += 1

    async def other_task() -> None:
        await trio.lowlevel.checkpoint()
        ran.set()

    async def main() -> None:
        wait = busy_poll.PollingWait(always_readable, wait_in_trio, spin=busy_poll.SPIN)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, wait)
            nursery.start_soon(other_task)

    trio.run(main)
    assert ran.is_set() and requests < give_up


def test_no_request_falls_back_to_trio_after_the_spin() -> None:
    read_end, write_end = os.pipe()  # nothing written: never readable
    trio_waits = 0

    async def wait_in_trio() -> bool:
        nonlocal trio_waits
        trio_waits += 1
        return False

    async def main() -> busy_poll.PollingWait:
        wait = busy_poll.PollingWait(read_end, wait_in_trio, spin=busy_poll.SPIN)
        assert await wait() is False
        return wait

    try:
        wait = trio.run(main)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert trio_waits == 1
    assert (wait.caught_polling, wait.waits_in_trio) == (0, 1)


class FakeClock:
    """Time that passes only when a test says so, plus a microsecond at each
    reading, so that a polling loop runs out of its window after a few dozen polls."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def never_readable() -> Iterator[int]:
    """A descriptor that never polls readable: every polling window runs out."""
    read_end, write_end = os.pipe()
    yield read_end
    os.close(read_end)
    os.close(write_end)


def test_the_window_follows_the_real_clock_by_default(never_readable: int) -> None:
    async def wait_in_trio() -> bool:
        return True

    assert busy_poll.PollingWait(never_readable, wait_in_trio).clock is time.perf_counter


def test_polling_stops_for_requests_that_come_late_and_resumes_for_prompt_ones(never_readable: int) -> None:
    clock = FakeClock()
    spin = busy_poll.SPIN
    delay = 0.1  # fake seconds until the request comes, while the wait sleeps in trio

    async def wait_in_trio() -> bool:
        clock.advance(delay)
        return True

    async def main() -> None:
        nonlocal delay
        wait = busy_poll.PollingWait(never_readable, wait_in_trio, spin, clock=clock)
        windows = []
        for _ in range(6):
            assert await wait()
            windows.append(wait.window)
        assert windows == [spin / 2, spin / 4, spin / 8, 0.0, 0.0, 0.0]
        assert (wait.caught_polling, wait.waits_in_trio) == (0, 6)
        delay = 0.0
        assert await wait()  # no window: straight to trio, and the request was there at once
        assert wait.window == spin
        delay = 0.1
        assert await wait()  # polls the whole window again, in vain, then waits in trio
        assert wait.window == spin / 2
        assert (wait.caught_polling, wait.waits_in_trio) == (0, 8)

    trio.run(main)


def test_a_request_that_waits_longer_than_the_window_does_not_restore_it(never_readable: int) -> None:
    clock = FakeClock()
    spin = busy_poll.SPIN

    async def wait_in_trio() -> bool:
        clock.advance(spin * 1.5)  # would not have been caught by a whole window either
        return True

    async def main() -> None:
        wait = busy_poll.PollingWait(never_readable, wait_in_trio, spin, clock=clock)
        windows = []
        for _ in range(5):
            assert await wait()
            windows.append(wait.window)
        assert windows == [spin / 2, spin / 4, spin / 8, 0.0, 0.0]

    trio.run(main)


# --- on a real mount -------------------------------------------------------------------
# The real daemon, with PollingWait.__call__ counted; the counts (and PollingWait's
# own counters) are written to the file named by the first argument at exit.
COUNTING_DAEMON = """
import json, sys
from mmfs import busy_poll
counts = {"calls": 0}
waits = []
original_init = busy_poll.PollingWait.__init__
original_call = busy_poll.PollingWait.__call__
def counted_init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    waits.append(self)
async def counted_call(self):
    counts["calls"] += 1
    return await original_call(self)
busy_poll.PollingWait.__init__ = counted_init
busy_poll.PollingWait.__call__ = counted_call
from mmfs.cli import main
out = sys.argv.pop(1)
code = 1
try:
    code = main(sys.argv[1:])
finally:
    counts["instances"] = len(waits)
    counts["caught_polling"] = sum(wait.caught_polling for wait in waits)
    counts["waits_in_trio"] = sum(wait.waits_in_trio for wait in waits)
    with open(out, "w") as file:
        json.dump(counts, file)
sys.exit(code)
"""


def serve_requests(root: Path, lookups: int, creates: int) -> None:
    """At least ``lookups`` LOOKUPs (names never seen: the kernel cannot answer
    them from its cache) and ``creates`` CREATEs reach the daemon."""
    for i in range(lookups):
        with pytest.raises(FileNotFoundError):
            os.stat(root / f"missing{i}")
    for i in range(creates):
        os.close(os.open(root / f"new{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    assert len(os.listdir(root)) == creates


def counted_mount(mmfs_factory: Callable[..., Mount], counts: Path, options: str) -> Mount:
    return mmfs_factory("tmpfs", options=options, program=[sys.executable, "-c", COUNTING_DAEMON, str(counts)])


def test_pyfuse3_waits_through_the_polling_wait_for_every_request(
    mmfs_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    counts_file = tmp_path / "counts.json"
    mount = counted_mount(mmfs_factory, counts_file, "size=64m")
    lookups, creates = 3000, 1000
    serve_requests(mount.path, lookups, creates)
    stop_mmfs(mount)
    counts: dict[str, Any] = json.loads(counts_file.read_text())
    assert counts["instances"] == 1, counts
    assert counts["calls"] >= lookups + creates, counts  # one wait before each request read
    assert counts["calls"] == counts["caught_polling"] + counts["waits_in_trio"], counts
    assert counts["caught_polling"] > 0, counts  # back-to-back requests: polling caught some


def test_busy_poll_0_never_calls_the_polling_wait(mmfs_factory: Callable[..., Mount], tmp_path: Path) -> None:
    counts_file = tmp_path / "counts.json"
    mount = counted_mount(mmfs_factory, counts_file, "size=64m,busy_poll=0")
    serve_requests(mount.path, 300, 100)
    (mount.path / "data").write_bytes(b"served by trio alone")
    assert (mount.path / "data").read_bytes() == b"served by trio alone"
    stop_mmfs(mount)
    counts = json.loads(counts_file.read_text())
    assert counts == {"calls": 0, "instances": 0, "caught_polling": 0, "waits_in_trio": 0}
