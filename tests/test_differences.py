"""What pyfuse3 3.5 cannot offer, pinned: each test shows kernel tmpfs's answer
and mmfs's, so that the README's "Differences from tmpfs" stays exact and a
future pyfuse3 that offers the missing handler is noticed (the test then fails
and the difference can be closed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from pathlib import Path

import pytest
from support.syscalls import AT_EMPTY_PATH, AT_FDCWD, check, errno_of, libc

FS_IOC_GETFLAGS = 0x80086601
SYS_OPEN_TREE, SYS_MOUNT_SETATTR = 428, 442
OPEN_TREE_CLONE, AT_RECURSIVE, MOUNT_ATTR_IDMAP = 1, 0x8000, 0x100000
SEEK_DATA, SEEK_HOLE = 3, 4


def fallocate_errno(path: Path) -> int:
    """fallocate(2) itself (glibc's posix_fallocate would emulate it with writes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return errno_of(lambda: check(libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(1 << 20)))) or 0
    finally:
        os.close(fd)


def seek_data_after_hole(path: Path) -> tuple[int, int]:
    """(SEEK_DATA from 0, SEEK_HOLE from 0) of a file whose first 1 MiB is a hole."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"data", 1 << 20)
        return os.lseek(fd, 0, SEEK_DATA), os.lseek(fd, 0, SEEK_HOLE)
    finally:
        os.close(fd)


def tmpfile_errno(directory: Path) -> int:
    return errno_of(lambda: os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))) or 0


def getflags_errno(path: Path) -> int:
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        return errno_of(lambda: fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0))) or 0
    finally:
        os.close(fd)


def birth_time(path: Path) -> int:
    """statx's birth time as stat(1) shows it: 0 when the filesystem has none."""
    path.write_bytes(b"")
    done = subprocess.run(["stat", "-c", "%W", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


def idmap_errno(root: Path) -> int:
    """mount_setattr(MOUNT_ATTR_IDMAP) on a detached clone of the mount."""
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "sleep", "60"])
    try:
        userns = -1
        for _ in range(500):  # until unshare has made the namespace
            if os.readlink(f"/proc/{holder.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                userns = os.open(f"/proc/{holder.pid}/ns/user", os.O_RDONLY)
                break
            os.sched_yield()
        assert userns >= 0, "no user namespace"
        tree = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(root), OPEN_TREE_CLONE | AT_RECURSIVE)
        assert tree >= 0, os.strerror(ctypes.get_errno())
        try:
            attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_IDMAP, 0, 0, userns)
            size = ctypes.sizeof(attr)
            return errno_of(lambda: check(libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, attr, size))) or 0
        finally:
            os.close(tree)
            os.close(userns)
    finally:
        holder.kill()
        holder.wait()


def test_fallocate_is_refused(mnt: Path, kernel_tmpfs: Path) -> None:
    assert fallocate_errno(kernel_tmpfs / "f") == 0
    assert fallocate_errno(mnt / "f") == errno.EOPNOTSUPP  # pyfuse3 has no fallocate handler


def test_seek_data_and_hole_see_no_holes(mnt: Path, kernel_tmpfs: Path) -> None:
    assert seek_data_after_hole(kernel_tmpfs / "f") == (1 << 20, 0)
    assert seek_data_after_hole(mnt / "f") == (0, (1 << 20) + 4)  # no lseek handler: all data


def test_o_tmpfile_is_refused(mnt: Path, kernel_tmpfs: Path) -> None:
    assert tmpfile_errno(kernel_tmpfs) == 0
    assert tmpfile_errno(mnt) == errno.EOPNOTSUPP  # no tmpfile handler


def test_chattr_flags_are_refused(mnt: Path, kernel_tmpfs: Path) -> None:
    assert getflags_errno(kernel_tmpfs / "f") == 0
    assert getflags_errno(mnt / "f") == errno.ENOTTY  # no ioctl handler


def test_no_birth_time(mnt: Path, kernel_tmpfs: Path) -> None:
    assert birth_time(kernel_tmpfs / "f") > 0
    assert birth_time(mnt / "f") == 0  # pyfuse3 replies to GETATTR, not STATX


@pytest.mark.parametrize("where", ["kernel", "mmfs"])
def test_idmapped_mounts_are_refused(mnt: Path, kernel_tmpfs: Path, where: str) -> None:
    if where == "kernel":
        assert idmap_errno(kernel_tmpfs) == 0
    else:
        assert idmap_errno(mnt) == errno.EINVAL  # FUSE allows it only if the server asks (FUSE_ALLOW_IDMAP)
