"""Faults outside ordinary requests never end the daemon.

Each test runs the real daemon with one function patched to fail (the injected
fault), drives the mount with real system calls until the fault has happened,
and then proves that the daemon lives, the mount still answers, and the log
says what went wrong.

1. FORGET: pyfuse3 awaits ``Operations.forget`` without catching anything (not
   even ``FUSEError``), so a bug there must be contained by mmfs itself.
2. The arena's shmem file refuses pages (``pwrite`` fails with ENOMEM or
   ENOSPC, as under a memory cgroup limit): the write answers ENOSPC like
   tmpfs, nothing is logged, and everything stored before is intact.
3. A lease break (someone opens a privately mapped backing file for writing)
   that cannot be handled as usual: the pages written on the mount find no room
   in the arena, or the lease cannot be queried.  The writer still gets
   through, the daemon holds neither map nor descriptor of that file any more
   (the writer may truncate it: a map touched afterwards would be SIGBUS), the
   file answers EIO if its pages were lost, every other file is unharmed, and
   LOWERDIR is written by nobody but the test's writer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import Mount, is_mounted, patched_daemon_command, read_uncached, start_mmfs, stop_mmfs, wait_for


@contextlib.contextmanager
def patched_daemon(
    tmp_path: Path, patch: str, *args: str, options: str = "size=64m", expect_log: Sequence[str] = ()
) -> Iterator[Mount]:
    """``mmfs ARGS MNT -f -o OPTIONS`` with ``patch`` run first; unmounted afterwards.

    On a clean exit of the block the daemon must end with status 0 and its log
    hold nothing at WARNING or worse but records matching ``expect_log``, each
    of which must match one; after a failure it is only cleaned up.
    """
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    program = patched_daemon_command(patch)
    mount = start_mmfs(mountpoint, tmp_path / "daemon.log", *args, options=options, program=program)
    try:
        yield mount
    except BaseException:
        with contextlib.suppress(AssertionError, subprocess.CalledProcessError):
            stop_mmfs(mount, check_log=False)
        raise
    stop_mmfs(mount, expect_log=expect_log)


def assert_serving(mount: Mount, name: str = "alive") -> None:
    """The daemon runs and the mount answers a create, a write and a read."""
    assert mount.process.poll() is None, f"the daemon died ({mount.process.returncode}): {mount.log_text()}"
    path = mount.path / name
    path.write_bytes(b"still serving\n")
    assert path.read_bytes() == b"still serving\n"
    assert name in os.listdir(mount.path)


# --- 1. forget ------------------------------------------------------------------
FAULTY_FORGET = """
from mmfs import fs
def forget(self, ino, count):
    raise RuntimeError("injected forget fault")
fs.Filesystem.forget = forget
"""


def test_exception_in_forget_is_logged_and_the_mount_keeps_serving(tmp_path: Path) -> None:
    """Files unlinked on the mount make the kernel send FORGET (one at a time and
    in batches); every one of them fails inside the daemon."""
    forget_failed = r"(?s)^mmfs ERROR mmfs\.fuse_ops: internal error in forget of .*RuntimeError: injected forget fault"
    with patched_daemon(tmp_path, FAULTY_FORGET, "tmpfs", expect_log=[forget_failed]) as mount:
        for round_ in range(5):
            for n in range(40):
                (mount.path / f"f{round_}-{n}").write_bytes(b"x")
            for n in range(40):
                os.unlink(mount.path / f"f{round_}-{n}")
            os.stat(mount.path)  # a request, so the daemon reads the queued FORGETs

        def forgotten() -> bool:
            os.listdir(mount.path)  # requests keep coming while we wait
            return "injected forget fault" in mount.log_text()

        assert wait_for(forgotten), mount.log_text()
        assert_serving(mount)
    assert not is_mounted(mount.path)


# --- 2. the arena out of memory ----------------------------------------------------
# pwrite into the arena's shmem file fails for data carrying a marker.
NO_MEMORY_FOR_MARKERS = """
import errno, os
real_pwrite = os.pwrite
def pwrite(fd, data, offset):
    for marker, err in ((b"ENOMEM-MARKER", errno.ENOMEM), (b"ENOSPC-MARKER", errno.ENOSPC)):
        if marker in bytes(data):
            raise OSError(err, os.strerror(err))
    return real_pwrite(fd, data, offset)
os.pwrite = pwrite
"""
SLOT = 64 * 1024  # the arena's unit: one write request is stored slot by slot


def test_arena_refusing_pages_answers_enospc(tmp_path: Path) -> None:
    with patched_daemon(tmp_path, NO_MEMORY_FOR_MARKERS, "tmpfs") as mount:  # and nothing in its log
        path = mount.path / "f"
        path.write_bytes(b"before" * 1000)
        used = os.statvfs(mount.path).f_bfree
        fd = os.open(path, os.O_WRONLY)
        try:
            for marker in (b"ENOMEM-MARKER", b"ENOSPC-MARKER"):
                for offset in (0, 3 * SLOT):  # held pages and fresh ones
                    with pytest.raises(OSError) as info:
                        os.pwrite(fd, marker, offset)
                    assert info.value.errno == errno.ENOSPC, (marker, offset)
                # the first slot's bytes are stored, the second's refused: a short write
                assert os.pwrite(fd, b"a" * SLOT + marker, 8 * SLOT) == SLOT, marker
        finally:
            os.close(fd)
        assert os.statvfs(mount.path).f_bfree == used - SLOT // os.sysconf("SC_PAGE_SIZE")
        assert read_uncached(path)[: 6000] == b"before" * 1000
        assert read_uncached(path)[8 * SLOT :] == b"a" * SLOT
        assert_serving(mount)


# --- 3. lease breaks ------------------------------------------------------------
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# F_GETLEASE fails, as a bug or a kernel surprise would make it.
LEASE_QUERY_FAILS = """
import errno, fcntl
real_fcntl = fcntl.fcntl
def failing_fcntl(fd, command, *args):
    if command == fcntl.F_GETLEASE:
        raise OSError(errno.EIO, "injected F_GETLEASE fault")
    return real_fcntl(fd, command, *args)
fcntl.fcntl = failing_fcntl
"""


def build_lower(lower: Path) -> dict[str, bytes]:
    """Two large files (mapped at their first write) and a small one."""
    lower.mkdir()
    files = {"big": os.urandom(4 * MiB), "other": os.urandom(4 * MiB), "small": b"small file\n"}
    for name, data in files.items():
        (lower / name).write_bytes(data)
    return files


def daemon_holds(pid: int, path: Path) -> bool:
    """Whether the daemon maps ``path`` or has it open (by device and inode:
    it opens LOWERDIR through a detached clone, whose paths look different)."""
    st = os.stat(path)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 5 and fields[3] == device and int(fields[4]) == st.st_ino:
                return True
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held = os.stat(f"/proc/{pid}/fd/{fd}")
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


class Writer:
    """The test as the writer of a backing file: its open waits for the lease break."""

    def __init__(self, path: Path) -> None:
        self.fd: int | None = None
        self.thread = threading.Thread(target=self._open, args=(path,), daemon=True)
        self.thread.start()

    def _open(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY)

    def through(self) -> bool:
        """Whether the open returned.  The kernel lets it go on by itself after
        lease-break-time (45 s here); the test waits well below that."""
        self.thread.join(timeout=20)
        return self.fd is not None

    def close(self) -> None:
        self.thread.join(timeout=60)
        if self.fd is not None:
            os.close(self.fd)


def pread_uncached(path: Path, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def write_through_mount(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


# What the daemon logs: one clear line when the pages find no room (and each
# access answered EIO after); the traceback when the lease cannot be queried.
PAGES_LOST = r"^mmfs ERROR mmfs\.content: no room in memory for the pages written to a lower file .* answers EIO"
ANSWERED_EIO = r"^mmfs WARNING mmfs\.fs: backing storage failed, answering EIO: .*pages written to this lower file"
LEASE_QUERY_FAILED = r"(?s)^mmfs ERROR mmfs\.maps: cannot query the lease .*OSError: \[Errno 5\] injected F_GETLEASE"


@pytest.mark.parametrize("fault", ["no room for the pages", "lease query fails"])
def test_lease_break_that_fails_lets_the_writer_through_and_harms_nothing_else(tmp_path: Path, fault: str) -> None:
    lower = tmp_path / "lower"
    files = build_lower(lower)
    marker = b"ENOSPC-MARKER"  # NO_MEMORY_FOR_MARKERS: the arena refuses the page that holds it
    if fault == "no room for the pages":
        patch, expected = NO_MEMORY_FOR_MARKERS, [PAGES_LOST, ANSWERED_EIO]
    else:
        patch, expected = LEASE_QUERY_FAILS, [LEASE_QUERY_FAILED]
    with patched_daemon(tmp_path, patch, "overlay", str(lower), expect_log=expected) as mount:
        pid = mount.process.pid
        write_through_mount(mount.path / "big", MiB, marker)  # mapped MAP_PRIVATE now
        write_through_mount(mount.path / "other", 2 * MiB, b"other bytes")
        assert daemon_holds(pid, lower / "big") and daemon_holds(pid, lower / "other")

        writer = Writer(lower / "big")
        try:
            assert writer.through(), "the writer still waits for the lease break"
            assert wait_for(lambda: not daemon_holds(pid, lower / "big")), "the daemon still holds the file"
            if fault == "no room for the pages":  # the written page is lost: EIO, never stale bytes
                for offset in (MiB, 0):
                    with pytest.raises(OSError) as info:
                        pread_uncached(mount.path / "big", PAGE, offset)
                    assert info.value.errno == errno.EIO
            else:  # the lease counts as broken: the written page is kept in the arena
                assert pread_uncached(mount.path / "big", len(marker), MiB) == marker
                assert pread_uncached(mount.path / "big", PAGE, 0) == files["big"][:PAGE]
            assert writer.fd is not None
            os.ftruncate(writer.fd, 0)  # the writer changes the file, as writers do
            assert mount.process.poll() is None
            if fault == "lease query fails":
                assert pread_uncached(mount.path / "big", len(marker), MiB) == marker
        finally:
            writer.close()

        expected_other = bytearray(files["other"])
        expected_other[2 * MiB : 2 * MiB + 11] = b"other bytes"
        assert read_uncached(mount.path / "other") == bytes(expected_other)
        assert read_uncached(mount.path / "small") == files["small"]
        write_through_mount(mount.path / "other", 3 * MiB, b"more")
        assert pread_uncached(mount.path / "other", 4, 3 * MiB) == b"more"
        assert_serving(mount)
    assert (lower / "big").read_bytes() == b""  # only the test's writer changed LOWERDIR
    assert (lower / "other").read_bytes() == files["other"] and (lower / "small").read_bytes() == files["small"]
