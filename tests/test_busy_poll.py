"""The busy-polling wait: it answers at once when a request is waiting, and it
still lets trio run the other tasks (signals, lease breaks) when requests never
stop coming."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pyfuse3
import pytest
import trio

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

    async def main() -> None:
        wait = busy_poll.PollingWait(always_readable, wait_in_trio, spin=busy_poll.SPIN)
        for _ in range(100):
            assert await wait()

    trio.run(main)
    assert trio_waits == 0


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

    async def main() -> None:
        wait = busy_poll.PollingWait(read_end, wait_in_trio, spin=busy_poll.SPIN)
        assert await wait() is False

    try:
        trio.run(main)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert trio_waits == 1


def test_polling_stops_for_requests_that_come_late_and_resumes_for_prompt_ones() -> None:
    read_end, write_end = os.pipe()  # never readable: every poll runs out
    late = True

    async def wait_in_trio() -> bool:
        await trio.sleep(0.1 if late else 0)  # a request that comes late, or at once
        return True

    async def main() -> busy_poll.PollingWait:
        nonlocal late
        spin = 0.005  # wide, so that "at once" fits in it on a loaded machine too
        wait = busy_poll.PollingWait(read_end, wait_in_trio, spin)
        windows = []
        for _ in range(6):
            await wait()
            windows.append(wait.window)
        assert windows == [spin / 2, spin / 4, spin / 8, 0.0, 0.0, 0.0]
        late = False
        await wait()  # goes straight to trio (no window), and the request was there at once
        return wait

    try:
        wait = trio.run(main)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert wait.window == wait.spin
