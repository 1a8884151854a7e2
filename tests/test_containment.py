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
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Mount, is_mounted, read_uncached, stop_mmfs, wait_for

# The real daemon, with the fault patched in before it starts.
PATCHED_DAEMON = """
import sys
{patch}
from mmfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def patched_daemon(
    tmp_path: Path, patch: str, *args: str, options: str = "size=64m", clean_log: bool = False
) -> Iterator[Mount]:
    """``mmfs ARGS MNT -f -o OPTIONS`` with ``patch`` run first; unmounted afterwards.

    On a clean exit of the block the daemon must end with status 0 (its log
    may hold the expected errors, unless ``clean_log``); after a failure it is
    cleaned up quietly.
    """
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "daemon.log"
    script = PATCHED_DAEMON.format(patch=textwrap.dedent(patch))
    command = [sys.executable, "-c", script, *args, str(mountpoint), "-f", "-o", options]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    mount = Mount(mountpoint, process, log)
    try:
        assert wait_for(lambda: is_mounted(mountpoint) or process.poll() is not None, 20), log.read_text()
        assert process.poll() is None, f"mmfs exited {process.returncode}: {log.read_text()}"
        yield mount
    except BaseException:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        if process.poll() is None:
            process.kill()
        process.wait()
        raise
    stop_mmfs(mount, check_log=clean_log)


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
    with patched_daemon(tmp_path, FAULTY_FORGET, "tmpfs") as mount:
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
        text = mount.log_text()
        assert "Traceback" in text and " ERROR " in text, text
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
    with patched_daemon(tmp_path, NO_MEMORY_FOR_MARKERS, "tmpfs", clean_log=True) as mount:
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
        assert "backing storage failed" not in mount.log_text()
