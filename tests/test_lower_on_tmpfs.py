"""A LOWERDIR on kernel tmpfs stays untouched: its files are never mapped.

On tmpfs (and ramfs) the page cache is the file: a write fault on a private
map of a hole there first allocates the page in the backing file, which grows
its st_blocks (LOWERDIR written) and is SIGBUS when that tmpfs is full (the
daemon killed).  So lower files there are copied page by page into the arena.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conftest import Mount, mounted_kernel_tmpfs

MiB = 1 << 20


def sparse_file(path: Path, size: int, data_at: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        file.seek(data_at)
        file.write(b"data")


def test_writing_a_hole_never_allocates_in_a_tmpfs_lowerdir(
    mmfs_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    with mounted_kernel_tmpfs(tmp_path / "lower", "size=8m") as lower:
        sparse_file(lower / "sparse", 8 * MiB, 0)
        blocks = os.stat(lower / "sparse").st_blocks
        mnt = mmfs_factory("overlay", str(lower)).path
        assert (mnt / "sparse").read_bytes()[:4] == b"data"
        with open(mnt / "sparse", "r+b", buffering=0) as file:
            file.seek(6 * MiB)
            file.write(b"hole written")
        assert os.stat(lower / "sparse").st_blocks == blocks
        with open(mnt / "sparse", "rb") as file:
            file.seek(6 * MiB)
            assert file.read(12) == b"hole written"


def test_a_full_tmpfs_lowerdir_does_not_kill_the_daemon(mmfs_factory: Callable[..., Mount], tmp_path: Path) -> None:
    with mounted_kernel_tmpfs(tmp_path / "lower", "size=1m") as lower:
        sparse_file(lower / "sparse", 4 * MiB, 0)
        with open(lower / "filler", "wb") as filler:  # the lower tmpfs is full now
            try:
                filler.write(b"x" * (2 * MiB))
            except OSError:
                pass
        mount = mmfs_factory("overlay", str(lower))
        with open(mount.path / "sparse", "r+b", buffering=0) as file:
            file.seek(3 * MiB)
            file.write(b"still alive")
        assert mount.process.poll() is None
        with open(mount.path / "sparse", "rb") as file:
            file.seek(3 * MiB)
            assert file.read(11) == b"still alive"
