"""Shared fixtures: real mmfs mounts, kernel tmpfs mounts (the oracle), cleanup;
and the two guards every test runs under.  (Helpers that are not about mounts
or daemons -- system calls, errno answers, tree snapshots, the differential
engine -- are in the ``support`` package.)

A mount fixture starts the daemon in the foreground with its log captured,
waits for the mount, fails fast if the daemon died, and on teardown unmounts
normally (never lazily) and requires exit status 0 and a clean log: no record
at WARNING or worse and no traceback.  A bug that was answered with EIO still
fails the test.  A test that provokes a warning on purpose says so with
``@pytest.mark.expect_log(r"regex", ...)``: records that match one of its
patterns are allowed, and each pattern must match a record of one of the
test's daemon logs (a marker that no longer matches anything is stale), unless
the marker says ``required=False`` (a race that may or may not provoke it).

A hung FUSE call fails one test and never hangs the run.  pytest-timeout's
SIGALRM cannot end a syscall that waits for a stopped or deadlocked daemon:
the kernel ends that wait only for fatal signals.  So a watchdog thread fires
``WATCHDOG_GRACE`` seconds after the test's timeout (the one pytest-timeout
computed from the marker, ``--timeout``, PYTEST_TIMEOUT or the ini value),
aborts the FUSE connection of every mount under the pytest basetemp and kills
the daemons ``start_mmfs`` started.  The hung call then fails (ENOTCONN or
ECONNABORTED), pytest-timeout's pending signal handler fails the test, the
fixtures clean up without judging the killed daemons, and the next test runs
as usual.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mmfs import mounts

ROOT = Path(__file__).resolve().parent.parent


@dataclass(eq=False)
class Mount:
    path: Path
    process: subprocess.Popen[bytes]
    log: Path
    expect_log: tuple[str, ...] = ()  # patterns of the test's expect_log markers
    matched: set[str] = field(default_factory=set)  # the patterns that matched a record of the log
    killed_by_watchdog: bool = False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def is_mounted(path: Path) -> bool:
    """Whether something is mounted on ``path``; never touches the mount itself
    (a stat of it would hang with its daemon)."""
    target = Path(os.path.realpath(path.parent)) / path.name
    return mounts.mounted_at(str(target)) is not None


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(interval)
    return True


CLOCK_REALTIME_COARSE = 5  # Linux; Python 3.11's time module does not name it


def clock_passes(times_ns: Iterable[int]) -> None:
    """Wait until the coarse clock, which tmpfs stamps times with, is past every
    one of ``times_ns`` that is not in the future: a time set from now on then
    differs from each of them.  (A time that changes is what is under test.)"""
    latest = min(max(times_ns), time.time_ns())
    assert wait_for(lambda: time.clock_gettime_ns(CLOCK_REALTIME_COARSE) > latest, interval=0.001)


def read_uncached(path: Path) -> bytes:
    """The file's bytes as the filesystem has them, not the page cache's copy."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def mmfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmfs", *args]


# The real daemon, with ``patch`` (Python source: a fault, or a probe that
# records what the daemon does) run before it starts.
PATCHED_DAEMON = """
import sys
{patch}
from mmfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def patched_daemon_command(patch: str) -> list[str]:
    """What to run instead of ``python -m mmfs`` (``start_mmfs``'s ``program``)."""
    return [sys.executable, "-c", PATCHED_DAEMON.format(patch=textwrap.dedent(patch))]


# --- daemon logs ------------------------------------------------------------------
# The foreground daemon logs "mmfs LEVEL name: message" lines; a traceback
# follows its record.  Anything else (text before the first record, or lines
# after a record that a crash, faulthandler, libfuse or the warnings module
# wrote to stderr) is trouble when it looks like it.
RECORD = re.compile(r"^mmfs (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.MULTILINE)
SERIOUS_LEVELS = ("WARNING", "ERROR", "CRITICAL")
TROUBLE = re.compile(r"Traceback|Fatal Python error|^fuse: |(?i:warning)", re.MULTILINE)


def log_records(text: str) -> list[tuple[str | None, str]]:
    """(level, text) of each record: a "mmfs LEVEL" line with the lines after it
    up to the next one; text before the first record has level None."""
    starts = [match.start() for match in RECORD.finditer(text)]
    head = text[: starts[0] if starts else len(text)]
    records: list[tuple[str | None, str]] = [(None, head)] if head.strip() else []
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        record = text[start:end]
        records.append((record.split(" ", 2)[1], record))
    return records


def serious_records(text: str) -> list[str]:
    """Records at WARNING or worse, and records that carry a traceback or other trouble."""
    found = []
    for level, record in log_records(text):
        rest = record if level is None else record.partition("\n")[2]
        if level in SERIOUS_LEVELS or TROUBLE.search(rest):
            found.append(record)
    return found


def check_daemon_log(text: str, expected: Sequence[str] = ()) -> set[str]:
    """Fail on any serious record that no pattern in ``expected`` matches
    (``re.search`` over the whole record, traceback included); return the
    patterns that matched a record."""
    matched: set[str] = set()
    unexpected = []
    for record in serious_records(text):
        hits = {pattern for pattern in expected if re.search(pattern, record)}
        matched |= hits
        if not hits:
            unexpected.append(record)
    assert not unexpected, (
        "the daemon logged at WARNING or worse (expect_log marks what a test provokes on purpose):\n"
        + "".join(unexpected)
        + f"--- whole log ---\n{text}"
    )
    return matched


# What the running test started and expects; the watchdog reads _live from its thread.
_live: dict[int, Mount] = {}  # pid -> mount, for every daemon start_mmfs started and nobody reaped
_test_expects: tuple[str, ...] = ()  # the test's expect_log patterns
_test_mounts: list[Mount] = []


def start_mmfs(
    mountpoint: Path, log: Path, *args: str, options: str = "", program: Sequence[str] | None = None
) -> Mount:
    """Start ``mmfs ARGS MOUNTPOINT -f`` and wait until the mount is live.

    ``program`` replaces ``python -m mmfs`` (a wrapper that patches the daemon)."""
    command = [*(program or mmfs_command()), *args, str(mountpoint), "-f"]
    if options:
        command += ["-o", options]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    mount = Mount(mountpoint, process, log, expect_log=_test_expects)
    _live[process.pid] = mount
    _test_mounts.append(mount)
    deadline = time.monotonic() + 20
    while not is_mounted(mountpoint):
        if process.poll() is not None:
            del _live[process.pid]
            raise AssertionError(f"mmfs exited {process.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            del _live[process.pid]
            raise AssertionError(f"mmfs did not mount: {log.read_text()}")
        time.sleep(0.02)
    return mount


def stop_mmfs(mount: Mount, check_log: bool = True, expect_log: Sequence[str] = ()) -> None:
    """Unmount normally and require exit status 0 and a clean log.

    The log may hold records at WARNING or worse (or tracebacks) only where a
    pattern matches them: one of the test's ``expect_log`` markers, or one of
    ``expect_log`` here, each of which must match a record of this log.
    ``check_log=False``: no look at the log (for injected faults); exit status
    0 is still required.  A mount the watchdog aborted is only cleaned up."""
    if mount.killed_by_watchdog:
        release_aborted(mount)
        return
    if is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", str(mount.path)], check=True)
    try:
        code = mount.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        mount.process.kill()
        mount.process.wait()
        raise AssertionError("mmfs did not exit after unmount") from None
    finally:
        _live.pop(mount.process.pid, None)
    text = mount.log_text()
    assert code == 0, f"mmfs exited {code}: {text}"
    if check_log:
        mount.matched |= check_daemon_log(text, (*mount.expect_log, *expect_log))
        missing = [pattern for pattern in expect_log if pattern not in mount.matched]
        assert not missing, f"expected in the daemon log, never logged: {missing}\n--- whole log ---\n{text}"


def release_aborted(mount: Mount) -> None:
    """Clear a mount whose connection the watchdog aborted and reap its daemon."""
    if is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", str(mount.path)], check=False, capture_output=True)
    try:
        mount.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass  # SIGKILLed: only a daemon stuck in the kernel could still be there
    else:
        _live.pop(mount.process.pid, None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expect_log(*patterns, required=True): the test provokes daemon log records at WARNING or worse (or "
        "tracebacks) that match these regexes (re.search); each must match a record of one of its mounts' logs "
        "unless required=False",
    )


CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[CALL_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def _daemon_logs_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hands the test's expect_log patterns to the mounts it starts; afterwards
    requires each required pattern to have matched a record of one of their logs."""
    global _test_expects
    markers = list(request.node.iter_markers("expect_log"))
    for marker in markers:
        assert set(marker.kwargs) <= {"required"}, f"expect_log: unknown arguments {marker.kwargs}"
        for pattern in marker.args:
            re.compile(pattern)  # a bad pattern is an error now, not a silent non-match later
    _test_expects = tuple(pattern for marker in markers for pattern in marker.args)
    required = [pattern for marker in markers if marker.kwargs.get("required", True) for pattern in marker.args]
    _test_mounts.clear()
    for pid, mount in list(_live.items()):  # daemons that ended without stop_mmfs: reap them, forget them
        if mount.process.poll() is not None:
            del _live[pid]
    yield
    _test_expects = ()
    started = list(_test_mounts)
    _test_mounts.clear()
    if request.node.stash.get(CALL_FAILED, False) or any(mount.killed_by_watchdog for mount in started):
        return  # the test failed already; an expected message may never have come
    matched = set().union(*(mount.matched for mount in started))
    missing = [pattern for pattern in required if pattern not in matched]
    assert not missing, f"expect_log: no checked daemon log of this test has a record matching {missing}"


@pytest.fixture
def mmfs_factory(tmp_path: Path, _daemon_logs_checked: None) -> Iterator[object]:
    """Call with (args..., options=..., program=...) to get a live Mount; all are unmounted after."""
    made: list[Mount] = []
    counter = iter(range(1000))

    def make(*args: str, options: str = "size=1g", program: Sequence[str] | None = None) -> Mount:
        n = next(counter)
        mountpoint = tmp_path / f"mnt{n}"
        mountpoint.mkdir()
        log = tmp_path / f"mmfs{n}.log"
        mount = start_mmfs(mountpoint, log, *(args or ("tmpfs",)), options=options, program=program)
        made.append(mount)
        return mount

    yield make
    problems = []
    for mount in made:  # every mount is stopped, even after one fails its checks
        if mount.process.poll() is None or is_mounted(mount.path):
            try:
                stop_mmfs(mount)
            except (AssertionError, subprocess.CalledProcessError) as error:
                problems.append(f"{mount.path}: {error}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def mnt(mmfs_factory) -> Path:  # type: ignore[no-untyped-def]
    """A fresh tmpfs-mode mmfs mount (size=1g)."""
    return mmfs_factory().path  # type: ignore[no-any-return]


@contextmanager
def mounted_kernel_tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A kernel tmpfs mounted with ``options`` on ``path`` (made here), unmounted after."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "oracle", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def kernel_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh kernel tmpfs: the oracle."""
    with mounted_kernel_tmpfs(tmp_path / "tmpfs", "size=1g,mode=1777") as path:
        yield path


@pytest.fixture(autouse=True)
def _no_umask_surprises() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- the watchdog -------------------------------------------------------------------
WATCHDOG_GRACE = 1.0  # seconds after the test's timeout: its SIGALRM came and could not end the test
BASETEMP = pytest.StashKey[Path]()


@pytest.fixture(scope="session", autouse=True)
def _basetemp_for_the_watchdog(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> None:
    pytestconfig.stash[BASETEMP] = tmp_path_factory.getbasetemp()


def fuse_mounts_under(directory: Path) -> list[mounts.MountEntry]:
    """FUSE mounts (not fuseblk) on ``directory`` or below it."""
    prefix = os.fsencode(directory)
    return [
        entry
        for entry in mounts.mount_table()
        if (entry.fstype == "fuse" or entry.fstype.startswith("fuse."))
        and (entry.mountpoint == prefix or entry.mountpoint.startswith(prefix + b"/"))
    ]


@contextmanager
def fuse_connections() -> Iterator[Path]:
    """The fusectl directory: /sys/fs/fuse/connections, or a private mount of
    fusectl in a temporary directory when nothing is mounted there."""
    standard = Path("/sys/fs/fuse/connections")
    if mounts.mounted_at(str(standard)) is not None:
        yield standard
        return
    private = Path(tempfile.mkdtemp(prefix="mmfs-fusectl-"))
    try:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(private)], check=True, capture_output=True)
        try:
            yield private
        finally:
            subprocess.run(["umount", str(private)], check=False)
    finally:
        private.rmdir()


def abort_fuse_mounts(directory: Path) -> list[str]:
    """Abort the FUSE connection of every mount under ``directory``: its pending
    and future requests fail at once.  Returns what was done, one line each."""
    done: list[str] = []
    entries = fuse_mounts_under(directory)
    if not entries:
        return done
    with fuse_connections() as connections:
        for entry in entries:
            minor = entry.device.split(":")[1]
            where = os.fsdecode(entry.mountpoint)
            try:
                (connections / minor / "abort").write_text("1")
                done.append(f"aborted FUSE connection {minor} of {where}")
            except OSError as error:
                done.append(f"could not abort FUSE connection {minor} of {where}: {error}")
    return done


class Watchdog:
    """Ends a test's hung FUSE calls ``WATCHDOG_GRACE`` seconds after its timeout."""

    def __init__(self, item: pytest.Item, timeout: float) -> None:
        self.item = item
        self.timeout = timeout
        self.fired = threading.Event()
        self.timer = threading.Timer(timeout + WATCHDOG_GRACE, self.fire)
        self.timer.name = f"mmfs watchdog for {item.nodeid}"
        self.timer.daemon = True

    def basetemp(self) -> Path | None:
        return self.item.config.stash.get(BASETEMP, None)

    def fire(self) -> None:
        self.fired.set()
        done = [f"watchdog: {self.item.nodeid} still runs {WATCHDOG_GRACE:g} s after its {self.timeout:g} s timeout"]
        for mount in list(_live.values()):  # mark first: the fixtures must not judge what we kill
            mount.killed_by_watchdog = True
        basetemp = self.basetemp()
        if basetemp is not None:
            done += abort_fuse_mounts(basetemp)
        for mount in list(_live.values()):
            if mount.process.returncode is None:  # not reaped, so the pid is still this daemon's
                try:
                    os.kill(mount.process.pid, signal.SIGKILL)
                    done.append(f"killed daemon {mount.process.pid} of {mount.path}")
                except ProcessLookupError:
                    pass
        print("\n".join(done), file=sys.stderr, flush=True)

    def cancel(self) -> None:
        """Stop the timer (waiting for a firing to finish); after a firing, clear
        the mounts left under the basetemp and reap the killed daemons."""
        self.timer.cancel()
        self.timer.join()
        if not self.fired.is_set():
            return
        basetemp = self.basetemp()
        for entry in fuse_mounts_under(basetemp) if basetemp is not None else []:
            where = os.fsdecode(entry.mountpoint)
            if subprocess.run(["fusermount3", "-u", where], capture_output=True).returncode != 0:
                subprocess.run(["fusermount3", "-uz", where], capture_output=True)  # still busy: detach it
        for mount in list(_live.values()):
            if mount.killed_by_watchdog:
                release_aborted(mount)


_watchdog: Watchdog | None = None


# pytest-timeout's own hooks: called where it arms and disarms its timer (the
# whole test, or the call only with func_only), with the effective settings.
# Returning None lets pytest-timeout's implementation run as well.
@pytest.hookimpl(optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.cancel()
    _watchdog = Watchdog(item, float(settings.timeout))
    _watchdog.timer.start()


@pytest.hookimpl(optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is not None:
        watchdog.cancel()
