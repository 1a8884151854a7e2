"""Faults outside ordinary requests never end the daemon.

Each test runs the real daemon with one function patched to fail (the injected
fault), drives the mount with real system calls until the fault has happened,
and then proves that the daemon lives, the mount still answers, and the log
says what went wrong.

1. FORGET: pyfuse3 awaits ``Operations.forget`` without catching anything (not
   even ``FUSEError``), so a bug there must be contained by mmfs itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from conftest import ROOT, Mount, is_mounted, stop_mmfs, wait_for

# The real daemon, with the fault patched in before it starts.
PATCHED_DAEMON = """
import sys
{patch}
from mmfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def patched_daemon(tmp_path: Path, patch: str, *args: str, options: str = "size=64m") -> Iterator[Mount]:
    """``mmfs ARGS MNT -f -o OPTIONS`` with ``patch`` run first; unmounted afterwards.

    On a clean exit of the block the daemon must end with status 0 (its log
    may hold the expected errors); after a failure it is cleaned up quietly.
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
    stop_mmfs(mount, check_log=False)


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
