"""Real-mount checks that need more than syscalls on one mount: a bug inside one
request is contained (EIO, logged, the mount keeps serving)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from conftest import start_mmfs, stop_mmfs, wait_for

# Runs the real daemon with one model method patched to raise: the injected bug.
FAULTY_DAEMON = """
import sys
from mmfs import fs
original = fs.Filesystem.getxattr
def getxattr(self, ino, name):
    if name == b"user.inject-fault":
        raise RuntimeError("injected fault")
    return original(self, ino, name)
fs.Filesystem.getxattr = getxattr
from mmfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_bug_in_one_request_answers_eio_and_mount_survives(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = start_mmfs(mountpoint, tmp_path / "daemon.log", "tmpfs", program=[sys.executable, "-c", FAULTY_DAEMON])
    try:
        target = mountpoint / "f"
        target.write_bytes(b"before")
        with pytest.raises(OSError) as info:
            os.getxattr(target, "user.inject-fault")
        assert info.value.errno == errno.EIO
        (mountpoint / "g").write_bytes(b"after")
        assert target.read_bytes() == b"before" and (mountpoint / "g").read_bytes() == b"after"
    finally:
        # the one record the fault may leave: logged at ERROR, with its traceback
        stop_mmfs(mount, expect_log=[r"(?s)^mmfs ERROR .*answering EIO.*Traceback.*RuntimeError: injected fault"])


def test_fixture_mount_is_fuse_mmfs(mmfs_factory) -> None:  # type: ignore[no-untyped-def]
    mount = mmfs_factory("tmpfs", options="size=16m")
    with open("/proc/self/mounts") as mounts:
        line = next(line for line in mounts if line.split()[1] == str(mount.path))
    source, _, fstype, options = line.split()[:4]
    assert (source, fstype) == ("tmpfs", "fuse.mmfs")
    assert "default_permissions" in options and "nosuid" not in options and "nodev" not in options


def test_readahead_is_widened_to_one_request_after_init(mmfs_factory) -> None:  # type: ignore[no-untyped-def]
    mount = mmfs_factory("tmpfs", options="size=16m")
    with open("/proc/self/mountinfo") as mountinfo:
        device = next(line.split()[2] for line in mountinfo if line.split()[4] == str(mount.path))
    setting = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    assert wait_for(lambda: setting.read_text().strip() == "1024"), setting.read_text()


def test_start_helper_rejects_dead_daemon(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="exited 1"):
        start_mmfs(tmp_path / "missing", tmp_path / "log", "tmpfs")
