"""The backing directory of an overlay, read-only and symlink-free.

As root, mmfs reads LOWERDIR through a private, detached clone of its mount
(``open_tree(OPEN_TREE_CLONE)``) made read-only, ``noatime``, ``nosymfollow``,
``nodev`` and ``nosuid`` with ``mount_setattr``: the kernel itself then refuses
any write and never updates an access time there.  Without the privilege it
falls back to a plain directory handle with ``O_NOATIME`` opens.

Every path is resolved by ``openat2`` relative to that handle with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``: no ``..``
escapes, no symlink is ever followed.  Paths are built only from names that
``getdents`` returned.  The handle is opened before mounting, so LOWERDIR may be
the mountpoint itself.

Knows only the backing directory; no inodes, no FUSE.  Synchronous.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .linux import openat2_beneath, private_readonly_clone

KEPT_XATTRS = (b"user.", b"trusted.", b"security.", b"system.posix_acl_access", b"system.posix_acl_default")


@dataclass
class LowerEntry:
    """One name in the backing directory, with everything the overlay copies."""

    name: bytes
    path: bytes  # relative to LOWERDIR, components joined by "/"
    st: os.stat_result
    target: bytes = b""  # symlinks
    xattrs: dict[bytes, bytes] | None = None
    dirent_ino: int = 0  # the inode number getdents gave (a mountpoint's differs from st_ino)


class LowerDir:
    """Read-only, no-follow access to a backing directory."""

    def __init__(self, path: str) -> None:
        st = os.lstat(path)  # FileNotFoundError, PermissionError...
        if stat.S_ISLNK(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "lowerdir is a symlink", path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "lowerdir is not a directory", path)
        self.anchor = private_readonly_clone(path)
        if self.anchor < 0:
            self.anchor = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.close(self.open(b".", os.O_DIRECTORY))  # readable, or PermissionError now
        self.root = self.entry(b"", b".")

    def open(self, path: bytes, flags: int = 0) -> int:
        """openat2 beneath LOWERDIR, read-only, never following a symlink."""
        flags |= os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME
        return openat2_beneath(self.anchor, path or b".", flags)

    def entry(self, parent: bytes, name: bytes, dirfd: int | None = None) -> LowerEntry:
        """Stat one name (without following it), with symlink target and xattrs."""
        own = dirfd is None
        fd = self.open(parent, os.O_DIRECTORY) if dirfd is None else dirfd
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            target = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else b""
            path = name if not parent else parent + b"/" + name
            if name == b".":
                path = parent
            return LowerEntry(name, path, st, os.fsencode(target), _xattrs(b"/proc/self/fd/%d/%s" % (fd, name)))
        finally:
            if own:
                os.close(fd)

    def names(self, path: bytes) -> list[tuple[bytes, bool]]:
        """The names in the directory at ``path`` and whether each is a directory
        (getdents' d_type: no lstat, no xattr, nothing opened but the directory)."""
        fd = self.open(path, os.O_DIRECTORY)
        try:
            with os.scandir(fd) as found:
                return [(os.fsencode(entry.name), entry.is_dir(follow_symlinks=False)) for entry in found]
        finally:
            os.close(fd)

    def list(self, path: bytes) -> list[LowerEntry]:
        """Every entry of the directory at ``path`` (not "." or ".."), in getdents order."""
        fd = self.open(path, os.O_DIRECTORY)
        try:
            with os.scandir(fd) as found:
                names = [(os.fsencode(entry.name), entry.inode()) for entry in found]
            return [replace(self.entry(path, name, fd), dirent_ino=ino) for name, ino in names]
        finally:
            os.close(fd)

    def count_links(self, roots: Iterable[bytes]) -> dict[tuple[int, int], int]:
        """How many names each hard-linked non-directory (st_nlink > 1) has in
        the directories at ``roots`` and all beneath them, by (st_dev, st_ino).
        Walks with openat2 and lstat only: no symlink is ever followed."""
        counts: dict[tuple[int, int], int] = {}
        pending = [*roots]
        while pending:
            path = pending.pop()
            fd = self.open(path, os.O_DIRECTORY)
            try:
                with os.scandir(fd) as found:
                    for entry in found:
                        st = entry.stat(follow_symlinks=False)
                        name = os.fsencode(entry.name)
                        if stat.S_ISDIR(st.st_mode):
                            pending.append(path + b"/" + name if path else name)
                        elif st.st_nlink > 1:
                            key = (st.st_dev, st.st_ino)
                            counts[key] = counts.get(key, 0) + 1
            finally:
                os.close(fd)
        return counts

    def close(self) -> None:
        os.close(self.anchor)


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        key = os.fsencode(name)
        if key.startswith(KEPT_XATTRS):
            try:
                out[key] = os.getxattr(path, name, follow_symlinks=False)
            except OSError as error:
                if error.errno != errno.ENODATA:
                    raise
    return out
