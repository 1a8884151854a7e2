"""The pure filesystem model: inodes, directories, handles and the errno rules.

Everything a mount does is decided here, in plain synchronous methods that raise
``FsError(errno)``.  There is no pyfuse3 and no trio in this module: the FUSE
adapter (``fuse_ops``) only translates.  Because the adapter never awaits in the
middle of a model call, every method runs atomically.

Kernel tmpfs is the reference for every choice.  The kernel itself checks
permissions (``default_permissions``), the sticky bit, trusted.* privileges and
most rename type errors before a request reaches us; the model checks what the
kernel leaves to the filesystem (ENOTEMPTY, ENAMETOOLONG, EEXIST, loops...).

Lifetimes: an inode is freed when it has no names (``nlink == 0``), no kernel
lookup references and no open handles.  Inode numbers are never reused.

Overlay mode: LOWERDIR's names become inodes lazily, a directory at a time,
and a hard-linked lower file is one inode whose link count follows LOWERDIR's
(``overlay.Overlay``).  Every change to an inode but its atime (``_touch``,
``setattr``) marks it ``changed``: ``changes.diff`` starts from those.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from . import acl
from .arena import Buffer, NoSpace
from .inode import Content, Directory, Inode, Lower
from .lower import LowerEntry
from .overlay import Overlay, copy_lower_attrs

log = logging.getLogger(__name__)

ROOT_INO = 1
NAME_MAX = 255
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
END_OFFSET = 1 << 62  # readdir offsets: an entry with cookie c is at END_OFFSET - c
DAY_NS = 86400 * 10**9


class FsError(Exception):
    """A request failed with ``errno``; the adapter answers it to the kernel."""

    def __init__(self, err: int) -> None:
        super().__init__(err, errno.errorcode.get(err, str(err)))
        self.errno = err


class StorageErrors:
    """Storage failures as errnos: a full arena is ENOSPC (``size=`` reached, or
    the system refusing the arena pages: ``Arena.store`` raises NoSpace); a
    backing file or directory that changed or vanished underneath an overlay is
    EIO.  A plain class: it guards every read and write, and a generator-based
    context manager costs several times more."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if error is None:
            return
        if isinstance(error, NoSpace):
            raise FsError(errno.ENOSPC) from None
        if isinstance(error, OSError):
            log.warning("backing storage failed, answering EIO: %s", error)
            raise FsError(errno.EIO) from None


storage_errors = StorageErrors()


class Space(Protocol):
    """Where file contents are stored, as ``statfs`` reports it (arena.Arena)."""

    page_limit: int  # 0 = unlimited

    def pages_free(self) -> int: ...


@dataclass(frozen=True)
class FsStats:
    """What ``statfs`` says: pages and inodes in all and free (0 and 0 if unlimited)."""

    pages: int
    pages_free: int
    inodes: int
    inodes_free: int


@dataclass
class FsConfig:
    """Mount-wide settings that the model enforces."""

    max_inodes: int = 0  # 0 = unlimited
    atime: str = "relatime"  # when reads update atime: "relatime", "strictatime" or "noatime"
    diratime: bool = True  # False (nodiratime): listing a directory never updates its atime
    root_mode: int | None = None  # None: 1777, or the lower root's
    root_uid: int | None = None
    root_gid: int | None = None


@dataclass
class Handle:
    """One open() or opendir(): what the kernel's fh refers to."""

    ino: int
    flags: int = 0
    listing: list[tuple[int, bytes]] | None = None  # dirs: (cookie, name) snapshot, ascending


@dataclass
class Attrs:
    """The attribute changes of one setattr request (None = unchanged)."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Filesystem:
    """A whole mount's namespace and data, independent of FUSE."""

    def __init__(
        self,
        new_content: Callable[[], Content],
        config: FsConfig,
        clock: Callable[[], int] = time.time_ns,
        space: Space | None = None,
        lower: Lower | None = None,
        lower_content: Callable[[LowerEntry], Content] | None = None,
    ) -> None:
        self.new_content = new_content
        self.config = config
        self.clock = clock
        self.space = space  # None: no limit on file contents
        self.overlay = Overlay(lower, lower_content) if lower is not None and lower_content is not None else None
        self.inodes: dict[int, Inode] = {}
        self.handles: dict[int, Handle] = {}
        self.counted_inodes = 0
        # Inode numbers held by checkpoints (checkpoints.py), counted once each,
        # and how many of them count no more in the live tree: nr_inodes counts
        # those too (what only checkpoints hold).
        self.pinned: dict[int, int] = {}
        self.pinned_only = 0
        self._next_ino = ROOT_INO
        self._next_fh = 1
        root = self._new_inode(stat.S_IFDIR | 0o1777, 0, 0)
        root.dir, root.nlink = Directory(ROOT_INO), 2
        root.lookups = 1  # pinned: the kernel never forgets the root
        if lower is not None:
            copy_lower_attrs(root, lower.root)
            root.dir.unlisted = root.origin = b""
            root.changed = False
        for name in ("mode", "uid", "gid"):
            value = getattr(config, "root_" + name)
            if value is not None:
                setattr(root, name, stat.S_IFDIR | value if name == "mode" else value)
                root.changed = True
        # The root as mounted, for going back to the untouched LOWERDIR (checkpoints.reset_point).
        self.mounted_root = dataclasses.replace(
            root, lookups=0, xattrs=dict(root.xattrs), dir=Directory(ROOT_INO, unlisted=root.dir.unlisted)
        )

    # --- inode table ------------------------------------------------------
    def _new_inode(self, mode: int, uid: int, gid: int, counted: bool = True) -> Inode:
        limit = self.config.max_inodes
        if counted and limit and self.inode_count() >= limit:
            raise FsError(errno.ENOSPC)
        now = self.clock()
        inode = Inode(self._next_ino, mode, uid, gid, now, now, now, counted=counted)
        self.inodes[inode.ino] = inode
        self.counted_inodes += counted
        self._next_ino += 1
        return inode

    # --- the backing directory (overlay mode) -------------------------------
    def entries(self, directory: Inode, adopt: dict[bytes, Inode] | None = None) -> dict[bytes, tuple[int, int]]:
        """A directory's entries, listing its backing directory the first time
        (in the order ``Overlay.listing`` gives).  ``adopt``: inodes that
        become the entries of their lower paths again, under their numbers,
        instead of new ones (taken out of it; see ``checkpoints.rollback``)."""
        assert directory.dir is not None
        if directory.dir.unlisted is not None:
            assert self.overlay is not None
            with storage_errors:
                listing = self.overlay.listing(directory.dir)

            def new_inode(entry: LowerEntry) -> Inode:
                if adopt and entry.path in adopt:
                    return self._as_new(adopt.pop(entry.path))
                return self._new_inode(entry.st.st_mode, 0, 0, counted=False)  # LOWERDIR's entries never count

            for entry in listing:
                self._link_entry(directory, entry.name, self.overlay.inode(entry, directory, new_inode))
        return directory.dir.entries

    @staticmethod
    def _as_new(inode: Inode) -> Inode:
        """A nameless inode, emptied to be made again from its lower entry."""
        if inode.content is not None:
            inode.content.uncharge()
            inode.content.release()
        inode.content, inode.dir, inode.lower_key = None, None, None
        inode.nlink, inode.hidden_links, inode.counted = 1, 0, False
        return inode

    def loaded(self, inode: Inode) -> Inode:
        """The inode with its directory listed (its size counts its entries)."""
        if inode.awaits_listing:
            self.entries(inode)
        return inode

    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(errno.ESTALE) from None

    def _dir(self, ino: int) -> Inode:
        inode = self.get(ino)
        if inode.dir is None:
            raise FsError(errno.ENOTDIR)
        self.entries(inode)
        return inode

    def _maybe_free(self, inode: Inode) -> None:
        """A nameless, closed inode gives its space and its inode back to size=
        and nr_inodes= at once, as on tmpfs.  Its bytes stay until the kernel
        forgets its last reference: a path walk that found the name just before
        it went may still open it."""
        if inode.nlink or inode.opens or inode.ino == ROOT_INO:
            return
        self.counted_inodes -= inode.counted
        if inode.counted and inode.ino in self.pinned:
            self.pinned_only += 1
        inode.counted = False
        if inode.content is not None:
            inode.content.uncharge()
        if inode.lookups:
            return
        if inode.content is not None:
            inode.content.release()
        if self.overlay is not None:
            self.overlay.forget(inode)
        del self.inodes[inode.ino]

    def free_if_unused(self, inode: Inode) -> None:
        """Free an inode that lost its names, unless it is open or the kernel holds it."""
        self._maybe_free(inode)

    def remember(self, inode: Inode) -> None:
        """The kernel took a reference (an entry reply); it will forget() it."""
        inode.lookups += 1

    def forget(self, ino: int, count: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        if count > inode.lookups:
            raise AssertionError(f"lookup count underflow on inode {ino}")
        inode.lookups -= count
        self._maybe_free(inode)

    # --- names ------------------------------------------------------------
    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)

    def _child(self, parent: Inode, name: bytes) -> Inode | None:
        assert parent.dir is not None
        if name == b".":
            return parent
        if name == b"..":
            return self.inodes[parent.dir.parent]
        found = parent.dir.entries.get(name)
        return self.inodes[found[0]] if found else None

    def lookup(self, parent_ino: int, name: bytes) -> Inode | None:
        """The named child, or None if absent.

        The kernel sends "." and ".." only to decode file handles (export
        support, see fuse_get_dentry and fuse_get_parent): "." with any inode's
        number as the parent finds that inode, ".." a directory's parent.  An
        inode tmpfs would have evicted (freed, or without a name and not open)
        is ESTALE; the kernel makes ENOENT ESTALE as well."""
        if name == b".":
            return self._exported(parent_ino)
        if name == b"..":
            directory = self._exported(parent_ino).dir
            if directory is None:
                raise FsError(errno.ENOTDIR)
            return self._exported(directory.parent)
        self._check_name(name)
        parent = self._dir(parent_ino)
        child = self._child(parent, name)
        return child

    def _exported(self, ino: int) -> Inode:
        """The inode a file handle names, while tmpfs would keep it: it has a
        name or is open (inode numbers are never reused: generation 0)."""
        inode = self.inodes.get(ino)
        if inode is None or not (inode.nlink or inode.opens):
            raise FsError(errno.ESTALE)
        return inode

    def _link_entry(self, parent: Inode, name: bytes, inode: Inode) -> None:
        """Link ``name`` with a new cookie: it lists first (see ``readdir``)."""
        directory = parent.dir
        assert directory is not None
        directory.entries.pop(name, None)  # keeps cookie order == dict order
        directory.entries[name] = (inode.ino, directory.next_cookie)
        directory.next_cookie += 1

    def _touch(self, *inodes: Inode, mtime: bool = True) -> None:
        now = self.clock()
        for inode in inodes:
            inode.ctime_ns = now
            inode.changed = True
            if mtime:
                inode.mtime_ns = now

    def _make(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> Inode:
        """A new entry.  ``umask`` is the creator's umask, still to be applied:
        as posix_acl_create does, it clears bits of ``mode`` unless the parent
        has a default ACL, which rules instead.  The adapter passes 0 where the
        kernel applied the umask already (no FUSE_DONT_MASK): ``mode`` is then
        used as received, and a default ACL never adds bits back to it."""
        self._check_name(name)
        parent = self._dir(parent_ino)
        if parent.nlink == 0:
            raise FsError(errno.ENOENT)
        if self._child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        default_acl = None if stat.S_ISLNK(mode) else parent.xattrs.get(acl.DEFAULT)
        access_acl = None
        if default_acl is not None:
            mode, access_acl = acl.inherit(default_acl, mode)
        else:
            mode &= ~(umask & 0o777)
        inode = self._new_inode(mode, uid, gid)
        if access_acl is not None:
            inode.xattrs[acl.ACCESS] = access_acl
        if default_acl is not None and stat.S_ISDIR(mode):
            inode.xattrs[acl.DEFAULT] = default_acl
        self._link_entry(parent, name, inode)
        self._touch(parent)
        return inode

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, umask: int = 0) -> Inode:
        if stat.S_IFMT(mode) == stat.S_IFREG:
            return self.create_file(parent_ino, name, mode, uid, gid, umask)
        inode = self._make(parent_ino, name, mode, uid, gid, umask)
        inode.rdev = rdev
        return inode

    def create_file(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> Inode:
        content = self.new_content()
        inode = self._make(parent_ino, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, umask)
        inode.content = content
        return inode

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> Inode:
        inode = self._make(parent_ino, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, umask)
        inode.dir, inode.nlink = Directory(parent_ino), 2
        self.inodes[parent_ino].nlink += 1
        return inode

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if len(target) >= 4096:
            raise FsError(errno.ENAMETOOLONG)
        inode = self._make(parent_ino, name, stat.S_IFLNK | 0o777, uid, gid)
        inode.target = target
        return inode

    def readlink(self, ino: int) -> bytes:
        inode = self.get(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        self._access(inode)
        return inode.target

    def link(self, ino: int, parent_ino: int, name: bytes) -> Inode:
        inode = self.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        self._check_name(name)
        parent = self._dir(parent_ino)
        if self._child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        inode.nlink += 1
        self._link_entry(parent, name, inode)
        self._touch(parent)
        self._touch(inode, mtime=False)
        return inode

    def _existing(self, parent: Inode, name: bytes) -> Inode:
        self._check_name(name)
        child = self._child(parent, name)
        if child is None:
            raise FsError(errno.ENOENT)
        return child

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self._dir(parent_ino)
        child = self._existing(parent, name)
        if child.is_dir:
            raise FsError(errno.EISDIR)
        self._drop_entry(parent, name, child)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self._dir(parent_ino)
        if name == b".":
            raise FsError(errno.EINVAL)
        child = self._existing(parent, name)
        if not child.is_dir:
            raise FsError(errno.ENOTDIR)
        if name == b".." or child.ino == ROOT_INO:
            raise FsError(errno.ENOTEMPTY if name == b".." else errno.EBUSY)
        if self.entries(child):
            raise FsError(errno.ENOTEMPTY)
        self._drop_entry(parent, name, child)

    def _drop_entry(self, parent: Inode, name: bytes, child: Inode) -> None:
        assert parent.dir is not None
        del parent.dir.entries[name]
        if child.is_dir:
            child.nlink = 0
            parent.nlink -= 1
        else:
            child.nlink -= 1
            if child.hidden_links and child.nlink == child.hidden_links:  # no name left in the mount
                assert self.overlay is not None
                self.overlay.settle_hidden_links(child, (inode.dir for inode in self.inodes.values() if inode.dir))
        self._touch(parent)
        self._touch(child, mtime=False)
        self._maybe_free(child)

    def _is_ancestor(self, ancestor: Inode, inode: Inode) -> bool:
        while True:
            if inode is ancestor:
                return True
            if inode.ino == ROOT_INO:
                return False
            assert inode.dir is not None
            inode = self.inodes[inode.dir.parent]

    def rename(
        self, old_parent_ino: int, old: bytes, new_parent_ino: int, new: bytes, flags: int, uid: int = 0, gid: int = 0
    ) -> None:
        """rename(2) and renameat2's flags.  RENAME_WHITEOUT leaves a whiteout
        (see ``_whiteout``; ``uid``/``gid`` are the caller's) under the old name."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)
        ):
            raise FsError(errno.EINVAL)
        src_dir, dst_dir = self._dir(old_parent_ino), self._dir(new_parent_ino)
        if old in (b".", b"..") or new in (b".", b".."):
            raise FsError(errno.EBUSY if old == b"." or new == b"." else errno.EINVAL)
        moved = self._existing(src_dir, old)
        self._check_name(new)
        target = self._child(dst_dir, new)
        if flags & RENAME_EXCHANGE:
            if target is None:
                raise FsError(errno.ENOENT)
            return self._exchange(src_dir, old, moved, dst_dir, new, target)
        if target is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST)
        if moved.is_dir and self._is_ancestor(moved, dst_dir):
            raise FsError(errno.EINVAL)
        if target is moved:
            return
        if target is not None:
            if moved.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if target.is_dir and not moved.is_dir:
                raise FsError(errno.EISDIR)
            if target.is_dir and self.entries(target):
                raise FsError(errno.ENOTEMPTY)
        # tmpfs makes the whiteout first: at nr_inodes= the rename fails with
        # ENOSPC and changes nothing, even where the target would free an inode.
        whiteout = self._whiteout(src_dir, uid, gid) if flags & RENAME_WHITEOUT else None
        if target is not None:
            self._drop_entry(dst_dir, new, target)
        assert src_dir.dir is not None
        del src_dir.dir.entries[old]
        if whiteout is not None:  # listed after the moved name, as on tmpfs
            self._link_entry(src_dir, old, whiteout)
        self._link_entry(dst_dir, new, moved)
        self._reparent(moved, src_dir, dst_dir)
        self._touch(src_dir, dst_dir)
        self._touch(moved, mtime=False)
        if whiteout is not None:  # one tick on tmpfs: the whiteout's times are its directory's
            whiteout.atime_ns = whiteout.mtime_ns = whiteout.ctime_ns = src_dir.ctime_ns

    def _whiteout(self, directory: Inode, uid: int, gid: int) -> Inode:
        """A whiteout for RENAME_WHITEOUT, not linked yet: a character device 0/0
        with mode 0, made like tmpfs's mknod makes it (the caller's fsuid and
        fsgid, the group of a setgid directory, the directory's default ACL)."""
        mode = stat.S_IFCHR
        if directory.mode & stat.S_ISGID:
            gid = directory.gid
        default_acl = directory.xattrs.get(acl.DEFAULT)
        access_acl = None
        if default_acl is not None:
            mode, access_acl = acl.inherit(default_acl, mode)
        inode = self._new_inode(mode, uid, gid)
        if access_acl is not None:
            inode.xattrs[acl.ACCESS] = access_acl
        return inode

    def _reparent(self, moved: Inode, src_dir: Inode, dst_dir: Inode) -> None:
        if moved.is_dir and src_dir is not dst_dir:
            src_dir.nlink -= 1
            dst_dir.nlink += 1
            assert moved.dir is not None
            moved.dir.parent = dst_dir.ino

    def _exchange(self, src_dir: Inode, old: bytes, a: Inode, dst_dir: Inode, new: bytes, b: Inode) -> None:
        if (a.is_dir and self._is_ancestor(a, dst_dir)) or (b.is_dir and self._is_ancestor(b, src_dir)):
            raise FsError(errno.EINVAL)
        if a is b:
            return
        # Both names move to the front of their listings, ``new`` ahead of
        # ``old`` in one directory, as on tmpfs (d_exchange re-adds both dentries).
        self._link_entry(src_dir, old, b)
        self._link_entry(dst_dir, new, a)
        self._reparent(a, src_dir, dst_dir)
        self._reparent(b, dst_dir, src_dir)
        self._touch(src_dir, dst_dir)
        self._touch(a, b, mtime=False)

    # --- attributes ---------------------------------------------------------
    def setattr(self, ino: int, changes: Attrs) -> Inode:
        inode = self.get(ino)
        if changes.size is not None:
            self._truncate(inode, changes.size)
        if changes.mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(changes.mode)
            if acl.ACCESS in inode.xattrs:
                inode.xattrs[acl.ACCESS] = acl.chmod(inode.xattrs[acl.ACCESS], inode.mode)
        if changes.uid is not None:
            inode.uid = changes.uid
        if changes.gid is not None:
            inode.gid = changes.gid
        if changes.atime_ns is not None:
            inode.atime_ns = changes.atime_ns
        if changes.mtime_ns is not None:
            inode.mtime_ns = changes.mtime_ns
        inode.ctime_ns = self.clock()
        inode.changed = True  # even for an atime alone: the diff compares what counts
        return inode

    def _truncate(self, inode: Inode, size: int) -> None:
        self._check_contents(inode)
        assert inode.content is not None
        if size < 0:
            raise FsError(errno.EINVAL)
        if size != inode.content.size:
            with storage_errors:
                inode.content.truncate(size)
        self._touch(inode)  # truncate(2) sets the times even at the same size

    # --- open files -----------------------------------------------------
    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        self.get(handle.ino).opens += 1
        return fh

    def open(self, ino: int, flags: int) -> int:
        """A handle on a regular file; O_TRUNC empties it first."""
        self._check_contents(self.get(ino))
        if flags & os.O_TRUNC:
            self.setattr(ino, Attrs(size=0, mtime_ns=self.clock()))
        return self._new_handle(Handle(ino, flags))

    @staticmethod
    def _check_contents(inode: Inode) -> None:
        """A regular file, or the errno that says what it is instead."""
        if inode.content is None:
            raise FsError(errno.EISDIR if inode.is_dir else errno.EINVAL)

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def _file(self, fh: int) -> Inode:
        """The regular file a handle is open on (EISDIR for a directory's)."""
        inode = self.inodes[self.handle(fh).ino]
        self._check_contents(inode)
        return inode

    def read(self, fh: int, offset: int, length: int) -> Buffer:
        handle = self.handle(fh)
        inode = self.inodes[handle.ino]
        self._check_contents(inode)
        assert inode.content is not None
        if offset < 0:
            raise FsError(errno.EINVAL)
        with storage_errors:
            data = inode.content.read(offset, length)
        if not handle.flags & os.O_NOATIME:
            self._access(inode)
        return data

    def _access(self, inode: Inode) -> None:
        """A read of ``inode``: update its atime as the mount's atime rule says
        (the kernel's ``atime_needs_update``; relatime is tmpfs's default)."""
        rule = self.config.atime
        if rule == "noatime" or inode.is_dir and not self.config.diratime:
            return
        now = self.clock()
        stale = inode.atime_ns <= max(inode.mtime_ns, inode.ctime_ns) or now - inode.atime_ns >= DAY_NS
        if rule == "strictatime" or stale:
            inode.atime_ns = now

    def write(self, fh: int, offset: int, data: Buffer) -> int:
        inode = self._file(fh)
        assert inode.content is not None
        if offset < 0:
            raise FsError(errno.EINVAL)
        with storage_errors:
            written = inode.content.write(offset, data)
        self._touch(inode)
        return written

    def fsync(self, fh: int) -> None:
        inode = self._file(fh)
        assert inode.content is not None
        with storage_errors:
            inode.content.sync()

    def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        inode = self.inodes[handle.ino]
        inode.opens -= 1
        assert inode.opens >= 0, f"open count underflow on inode {inode.ino}"
        if inode.opens == 0 and inode.content is not None:
            inode.content.closed()
        self._maybe_free(inode)

    # --- directories ------------------------------------------------------
    def opendir(self, ino: int) -> int:
        self._dir(ino)
        return self._new_handle(Handle(ino))

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Inode, int]]:
        """(name, inode, offset) of the entries after offset ``start``: "." (1),
        ".." (2), then the names newest first, as kernel tmpfs lists them.

        Every name gets a cookie when it is linked into the directory (created,
        linked, renamed or exchanged there); names list by descending cookie,
        at offset END_OFFSET - cookie, so offsets ascend along a listing.  The
        listing is a snapshot taken when reading starts at 0 (or on a handle's
        first read at any offset); resumed at an offset, it goes on after it:
        names removed since are skipped, names linked since (which list first)
        wait for the next rewind, and no name there all along is skipped or
        repeated.
        """
        handle = self.handle(fh)
        directory = self._dir(handle.ino)
        assert directory.dir is not None
        entries = directory.dir.entries
        if start == 0 or handle.listing is None:
            handle.listing = [(cookie, name) for name, (_, cookie) in entries.items()]
        if start < 1:
            yield b".", directory, 1
        if start < 2:
            yield b"..", self.inodes[directory.dir.parent], 2
        listing = handle.listing
        below = bisect.bisect_left(listing, (END_OFFSET - max(start, 2),))  # cookies listed after ``start``
        for index in range(below - 1, -1, -1):
            cookie, name = listing[index]
            entry = entries.get(name)
            if entry is not None and entry[1] == cookie:
                yield name, self.inodes[entry[0]], END_OFFSET - cookie
        self._access(directory)

    def releasedir(self, fh: int) -> None:
        self.release(fh)

    # --- extended attributes --------------------------------------------
    @staticmethod
    def _check_xattr_name(name: bytes) -> None:
        if name in (acl.ACCESS, acl.DEFAULT):  # validated by the kernel
            return
        if not name.startswith(XATTR_NAMESPACES):
            raise FsError(errno.EOPNOTSUPP)
        if name in XATTR_NAMESPACES:  # a namespace without a name
            raise FsError(errno.EINVAL)
        if len(name) > NAME_MAX:
            raise FsError(errno.ERANGE)

    def setxattr(self, ino: int, name: bytes, value: bytes, caller: acl.Caller | None = None) -> None:
        """Set an xattr.  An access ACL sets the permission bits too, and clears
        the setgid bit unless ``caller`` (None: unknown, keep it) may keep it:
        the kernel clears it for chmod, but leaves it to the filesystem here."""
        self._check_xattr_name(name)
        if len(value) > 65536:
            raise FsError(errno.E2BIG)
        inode = self.get(ino)
        if name == acl.ACCESS:
            perms, equivalent = acl.mode_from(value)
            inode.mode = inode.mode & ~0o777 | perms
            if caller is not None and not caller.keeps_setgid(inode.gid):
                inode.mode &= ~stat.S_ISGID
            if equivalent:
                inode.xattrs.pop(name, None)
                self._touch(inode, mtime=False)
                return
        inode.xattrs[name] = value
        self._touch(inode, mtime=False)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._check_xattr_name(name)
        value = self.get(ino).xattrs.get(name)  # before every write, the kernel asks for security.capability
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.get(ino).xattrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_xattr_name(name)
        inode = self.get(ino)
        if inode.xattrs.pop(name, None) is None and name not in (acl.ACCESS, acl.DEFAULT):
            raise FsError(errno.ENODATA)
        self._touch(inode, mtime=False)

    # --- whole filesystem -------------------------------------------------
    def statfs(self) -> FsStats:
        limit = self.space.page_limit if self.space is not None else 0
        free = self.space.pages_free() if self.space is not None and limit else 0
        inodes = self.config.max_inodes
        return FsStats(limit, free, inodes, max(0, inodes - self.inode_count()) if inodes else 0)

    def inode_count(self) -> int:
        """Inodes counted against nr_inodes: the live tree's (not those of the
        backing directory) and those only checkpoints hold."""
        return self.counted_inodes + self.pinned_only

    def recount_inodes(self) -> None:
        """Count the inodes again from their flags and the checkpoints' numbers
        (after a checkpoint is taken, dropped or rolled back to)."""
        live = {inode.ino for inode in self.inodes.values() if inode.counted}
        self.counted_inodes = len(live)
        self.pinned_only = sum(ino not in live for ino in self.pinned)

    def check_invariants(self) -> None:
        """Raise AssertionError if the model's books do not balance."""
        links: dict[int, int] = {ROOT_INO: 2}
        for inode in self.inodes.values():
            if inode.dir is None:
                continue
            for name, (child_ino, _) in inode.dir.entries.items():
                assert len(name) <= NAME_MAX and b"/" not in name and name not in (b".", b"..")
                child = self.inodes[child_ino]
                if child.is_dir:
                    assert child.dir is not None and child.dir.parent == inode.ino, (name, inode.ino)
                    links.setdefault(child_ino, 2)
                    links[inode.ino] = links.get(inode.ino, 2) + 1
                else:
                    links[child_ino] = links.get(child_ino, 0) + 1
            cookies = [cookie for _, cookie in inode.dir.entries.values()]
            assert cookies == sorted(cookies) and (not cookies or cookies[-1] < inode.dir.next_cookie)
        for inode in self.inodes.values():
            assert inode.lookups >= 0 and inode.opens >= 0
            expected = links.get(inode.ino, 0) + inode.hidden_links
            assert inode.nlink == expected, (inode.ino, inode.nlink, expected)
            if inode.nlink == 0:
                assert inode.lookups or inode.opens, f"inode {inode.ino} leaked"
        open_counts: dict[int, int] = {}
        for handle in self.handles.values():
            open_counts[handle.ino] = open_counts.get(handle.ino, 0) + 1
        for ino, count in open_counts.items():
            assert self.inodes[ino].opens == count
