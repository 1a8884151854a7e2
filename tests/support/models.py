"""Models without a mount: an overlay-mode ``Filesystem`` over a real LOWERDIR,
as ``daemon.build`` makes one, and the path helpers the model tests drive it with."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from mmfs.arena import Arena
from mmfs.content import AnonContent, CowContent
from mmfs.fs import ROOT_INO, Filesystem, FsConfig
from mmfs.lower import LowerDir, LowerEntry
from mmfs.maps import MapBudget

MiB = 1 << 20


def overlay_model(lower: Path, map_limit: int = 0, clock: Callable[[], int] = time.time_ns) -> Filesystem:
    """An overlay-mode model of ``lower`` (``map_limit`` 0: written pages are copied into the arena)."""
    arena = Arena(256 * MiB, 0)
    maps = MapBudget(limit=map_limit, leases=False)
    tree = LowerDir(str(lower))

    def content(entry: LowerEntry) -> CowContent:
        return CowContent(arena, maps, lambda: tree.open(entry.path), entry.st.st_size, entry.st.st_blocks)

    return Filesystem(
        lambda: AnonContent(arena), FsConfig(), clock=clock, space=arena, lower=tree, lower_content=content
    )


def ino(fs: Filesystem, path: bytes) -> int:
    """The inode number at ``path`` (relative to the root), looked up name by name."""
    number = ROOT_INO
    for name in filter(None, path.split(b"/")):
        inode = fs.lookup(number, name)
        assert inode is not None, path
        number = inode.ino
    return number


def split(fs: Filesystem, path: bytes) -> tuple[int, bytes]:
    """(the parent's inode number, the last name) of ``path``."""
    parent, _, name = path.rpartition(b"/")
    return ino(fs, parent), name


def write(fs: Filesystem, path: bytes, data: bytes, offset: int = 0) -> None:
    fh = fs.open(ino(fs, path), os.O_WRONLY)
    assert fs.write(fh, offset, data) == len(data)
    fs.release(fh)
