"""What the model is made of: inodes, directories, and the protocols of the
storage below it (a file's bytes, the backing directory of an overlay).

Plain data with no behaviour beyond what is derived from it (``size``,
``blocks``); ``fs.Filesystem`` and ``overlay.Overlay`` keep the books.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .arena import PAGE, Buffer
from .lower import LowerEntry

SHORT_SYMLINK = 128  # tmpfs keeps shorter targets in the inode, longer ones in a page
BOGO_DIRENT_SIZE = 20  # tmpfs counts a directory's size as 20 bytes an entry


class Content(Protocol):
    """What the model needs of a regular file's bytes (see content.py)."""

    size: int

    @property
    def pages(self) -> int: ...  # pages held, for st_blocks
    @property
    def modified(self) -> bool: ...  # the bytes may differ from the file's origin (see CowContent)
    def read(self, offset: int, length: int) -> Buffer: ...
    def write(self, offset: int, data: Buffer) -> int: ...
    def truncate(self, size: int) -> None: ...
    def release(self) -> None: ...
    def closed(self) -> None: ...
    def uncharge(self) -> None: ...
    def sync(self) -> None: ...
    # Checkpoints: copy-on-write sharing of the storage (see content.py).  A
    # snapshot reads as this content does; a change to either never shows in
    # the other.
    def snapshot(self) -> Content: ...
    def same_as(self, other: Content) -> bool: ...  # the same bytes for sure (a snapshot, unchanged on both sides)
    def exclusive_pages(self) -> int: ...  # pages no other content holds


class Lower(Protocol):
    """The backing directory of an overlay (see lower.py)."""

    root: LowerEntry

    def entry(self, parent: bytes, name: bytes) -> LowerEntry: ...
    def names(self, path: bytes) -> list[tuple[bytes, bool]]: ...
    def list(self, path: bytes) -> list[LowerEntry]: ...
    def count_links(self, roots: Iterable[bytes]) -> dict[tuple[int, int], int]: ...


@dataclass(slots=True)
class Directory:
    """What only a directory has.  Its state is one of: listed (``unlisted`` is
    None: ``entries`` holds every name), or, in overlay mode, not listed yet
    (``unlisted`` is its backing directory, whose names join ``entries`` at the
    first need; ``entries`` is empty until then)."""

    parent: int  # the directory holding this one
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # name -> (ino, cookie), in cookie order
    next_cookie: int = 3  # the cookie of the next name linked (counts up; never reused)
    unlisted: bytes | None = None  # overlay: the backing directory, until it is listed


@dataclass(eq=False, slots=True)
class Inode:
    """One file of any type, with every lifetime field in one place."""

    ino: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int = 1
    rdev: int = 0
    lookups: int = 0  # kernel references (lookup/create/... minus forget)
    opens: int = 0  # open handles
    content: Content | None = None  # regular files
    dir: Directory | None = None  # directories
    target: bytes = b""  # symlinks
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    hidden_links: int = 0  # backing names of this inode not listed yet (or, until settled, outside LOWERDIR)
    counted: bool = True  # counts against nr_inodes (lower inodes do not)
    lower_key: tuple[int, int] | None = None  # (st_dev, st_ino) of a hard-linked lower file
    # Change tracking for ``changes.diff``: the LOWERDIR path a lower inode was
    # made from (None: made in the mount), and whether anything but its atime
    # may have changed since (every mutation sets it; inodes made in the mount
    # are changed from birth).  Only a filter: the diff compares attributes.
    origin: bytes | None = None
    changed: bool = True

    @property
    def is_dir(self) -> bool:
        return self.dir is not None

    @property
    def awaits_listing(self) -> bool:
        """An overlay directory whose backing directory is not listed yet."""
        return self.dir is not None and self.dir.unlisted is not None

    @property
    def size(self) -> int:
        if self.content is not None:
            return self.content.size
        if self.dir is not None:
            return BOGO_DIRENT_SIZE * (2 + len(self.dir.entries))
        return len(self.target)

    @property
    def blocks(self) -> int:
        """512-byte blocks really held, as st_blocks counts them."""
        if self.content is not None:
            return self.content.pages * (PAGE // 512)
        return PAGE // 512 if len(self.target) >= SHORT_SYMLINK else 0
