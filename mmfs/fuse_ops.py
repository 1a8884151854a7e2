"""The pyfuse3 adapter: kernel requests in, model calls, replies out.

This is a protocol adapter only.  Every handler converts pyfuse3's types, calls
one synchronous method of the model (``fs.Filesystem``) and converts the
result.  ``FsError`` becomes ``FUSEError``; any other exception is a bug in
mmfs: it is logged with its traceback and answered with EIO, and the mount keeps
serving.  FORGET has no answer: a bug there is logged and ignored.  Because no
handler awaits in the middle of a model call, model mutations never interleave.

Lookup counts are taken here, never in the model, exactly where pyfuse3
documents them and only once nothing can fail any more: entry replies of
lookup, create, mknod, mkdir, symlink and link (``new_entry``), and readdir
entries accepted by ``readdir_reply`` (never "." or "..").
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from . import acl
from .arena import PAGE
from .fs import NAME_MAX, Attrs, Filesystem, FsError
from .inode import Inode
from .linux import syncfs

log = logging.getLogger(__name__)

# mmfs is the only writer of its files, so the kernel may cache names and
# attributes for as long as it likes: every change goes through a request that
# the kernel itself uses to invalidate what it cached.
CACHE_TIMEOUT = 86400.0

# Direct writes that may wait for a page drop at once; beyond, the drop follows
# the reply.  Each waiting write holds a serving task (mount.SERVING_TASKS), and
# a drop may wait for pages locked by a READ that another task must answer.
MAX_DROPS_WAITING = 8

T = TypeVar("T")
P = ParamSpec("P")

CAP_FSETID = 4

# The requests that change the filesystem: answered EROFS while it is read-only
# (``Operations.read_only``), as are opens for writing or truncating.
CHANGES = frozenset(
    ["setattr", "mknod", "mkdir", "symlink", "link", "unlink", "rmdir", "rename", "create", "_write", "setxattr",
     "removexattr"]
)
WRITE_ACCESS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


def caller(ctx: pyfuse3.RequestContext) -> acl.Caller:
    """The groups and CAP_FSETID of the process behind a request.  The kernel
    sends only its fsuid, fsgid and pid (libfuse 3 passes no
    FUSE_SETXATTR_ACL_KILL_SGID), so the rest comes from /proc/PID/status; if
    the process is gone, its fsgid and whether it is root."""
    groups, fsetid = {ctx.gid}, ctx.uid == 0
    try:
        with open(f"/proc/{ctx.pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key == "Groups":
                    groups.update(int(gid) for gid in value.split())
                elif key == "CapEff":
                    fsetid = bool(int(value, 16) >> CAP_FSETID & 1)
    except (OSError, ValueError):
        pass
    return acl.Caller(frozenset(groups), fsetid)


@dataclass(slots=True)
class Served:
    """The requests of one kind served, and the time the daemon spent on them."""

    count: int = 0
    ns: int = 0


class RequestCounts(dict[str, Served]):
    """Requests served by opcode (READ, GETXATTR, ...), for benchmarks and status.

    The time is what the handler took in the daemon, from its call to its
    return: not the kernel's round trip, nor the wait for the next request."""

    def add(self, opcode: str, ns: int) -> None:
        served = self.get(opcode)
        if served is None:
            served = self[opcode] = Served()
        served.count += 1
        served.ns += ns

    def summary(self) -> str:
        """One line, the most frequent first: 'READ 96828 (1.234 s), ...'."""
        by_count = sorted(self.items(), key=lambda item: (-item[1].count, item[0]))
        return ", ".join(f"{opcode} {served.count} ({served.ns / 1e9:.3f} s)" for opcode, served in by_count) or "none"


def handler(method: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run a synchronous handler; map model errors and contain bugs; count it
    (its first argument is the ``Operations``); refuse it with EROFS while the
    filesystem is read-only if it is one of the ``CHANGES``."""
    opcode = method.__name__.strip("_").upper()
    changes = method.__name__ in CHANGES

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter_ns()
        operations: Operations = args[0]  # type: ignore[assignment]
        try:
            if changes and operations.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            return method(*args, **kwargs)
        except FsError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("internal error in %s; answering EIO", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            operations.requests.add(opcode, time.perf_counter_ns() - start)

    return wrapper


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers over one ``Filesystem`` and the ``Arena`` it stores in."""

    enable_writeback_cache = False  # write-through keeps ENOSPC on write(2)
    enable_acl = True  # the kernel checks POSIX ACLs; the model stores and inherits them
    # FUSE_DONT_MASK: new entries come with the mode asked for and the caller's
    # umask, which the model applies only where no default ACL rules instead.
    # Only pyfuse3 with patches/pyfuse3-init-capabilities.patch knows this attribute;
    # it sets it to False if the kernel does not offer the capability.
    enable_dont_mask = True
    dont_mask = False  # whether the kernel leaves the umask to us (known at INIT)
    # FUSE_EXPORT_SUPPORT: file handles (name_to_handle_at, NFS) outlive the
    # kernel's cache; it finds inodes again with lookups of "." and "..".
    supports_dot_lookup = True
    read_only = False  # remount,ro (remount.py): changes are answered EROFS, whatever the kernel knows

    def __init__(self, fs: Filesystem, on_init: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.fs = fs
        # FUSE_CAP_AUTO_INVAL_DATA (same patch): whether the kernel drops a file's
        # cached pages when a GETATTR shows it a new mtime, as it does after every
        # write.  mmfs is the only writer of its files, so their cached pages are
        # never stale (the one exception, asynchronous O_DIRECT, is handled in
        # ``write``).  But FUSE inodes are S_NOATIME: only a READ that reaches us
        # updates atime, and after a write the next read must (relatime, as on
        # tmpfs; strictatime).  So the drop is kept, except on noatime mounts.
        self.enable_auto_inval_data = fs.config.atime != "noatime"
        self.on_init = on_init  # called when the kernel's INIT arrives
        # Asynchronous O_DIRECT writes (io_submit, io_uring) and the page cache:
        # see ``write``.  Inodes with O_DIRECT handles open -> how many; of those,
        # the ones whose pages a READ may have filled since their pages were last dropped.
        self.direct_opens: dict[int, int] = {}
        self.read_since_drop: set[int] = set()
        self.drops_waiting = 0  # direct writes waiting for their stale pages to be dropped
        self.requests = RequestCounts()

    def init(self) -> None:
        """The kernel's INIT arrived (its reply is sent when this returns)."""
        self.dont_mask = "enable_dont_mask" in vars(pyfuse3.Operations) and self.enable_dont_mask
        if not self.dont_mask:
            log.info("the kernel applies the umask to new entries, also under a default ACL (no FUSE_DONT_MASK)")
        self.on_init()

    def umask(self, ctx: pyfuse3.RequestContext) -> int:
        """The umask the model has to apply: none if the kernel applied it."""
        return ctx.umask if self.dont_mask else 0

    def new_entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """An entry reply: the kernel takes a reference to ``inode``, which it
        gives back with forget().  Taken once the reply is built, so a request
        that fails leaves none behind."""
        attributes = self.entry(inode)
        self.fs.remember(inode)
        return attributes

    def entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The attributes of ``inode`` as the kernel caches them.  An overlay
        directory not listed yet cannot know its size and link count (they count
        its entries), and is not listed just for this reply (listing a directory
        would list every subdirectory): its attributes go out uncached, so the
        kernel asks ``getattr`` for them when someone looks."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = 0 if inode.awaits_listing else CACHE_TIMEOUT
        attr.st_mode = inode.mode
        attr.st_nlink = inode.nlink
        attr.st_uid = inode.uid
        attr.st_gid = inode.gid
        attr.st_rdev = inode.rdev
        attr.st_size = inode.size
        attr.st_blksize = PAGE
        attr.st_blocks = inode.blocks
        attr.st_atime_ns = inode.atime_ns
        attr.st_mtime_ns = inode.mtime_ns
        attr.st_ctime_ns = inode.ctime_ns
        return attr

    # --- names ----------------------------------------------------------
    @handler
    def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.fs.lookup(parent, name)
        if inode is not None:
            return self.new_entry(inode)
        negative = pyfuse3.EntryAttributes()  # st_ino 0: the kernel caches the absence
        negative.st_ino = 0
        negative.entry_timeout = CACHE_TIMEOUT
        return negative

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """FORGET has no reply, and pyfuse3 awaits this without catching anything
        (not even FUSEError): whatever escaped would end the daemon.  So a bug
        here is logged with its traceback and the mount keeps serving; each
        inode of a batch is forgotten on its own, so one bad count spares the rest."""
        start = time.perf_counter_ns()
        for ino, count in inode_list:
            try:
                self.fs.forget(ino, count)
            except Exception:
                log.exception("internal error in forget of inode %d (count %d); ignored", ino, count)
        self.requests.add("FORGET", time.perf_counter_ns() - start)

    @handler
    def getattr(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.entry(self.fs.loaded(self.fs.get(ino)))

    @handler
    def setattr(
        self,
        ino: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        changes = Attrs(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self.entry(self.fs.loaded(self.fs.setattr(ino, changes)))

    @handler
    def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(ino)

    @handler
    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.new_entry(self.fs.mknod(parent, name, mode, rdev, ctx.uid, ctx.gid, self.umask(ctx)))

    @handler
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.new_entry(self.fs.mkdir(parent, name, mode, ctx.uid, ctx.gid, self.umask(ctx)))

    @handler
    def symlink(
        self, parent: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self.new_entry(self.fs.symlink(parent, name, target, ctx.uid, ctx.gid))

    @handler
    def link(self, ino: int, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.new_entry(self.fs.link(ino, parent, name))

    @handler
    def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.unlink(parent, name)

    @handler
    def rmdir(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.rmdir(parent, name)

    @handler
    def rename(
        self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int, ctx: pyfuse3.RequestContext
    ) -> None:
        self.fs.rename(old_parent, old, new_parent, new, flags, ctx.uid, ctx.gid)

    # --- files ----------------------------------------------------------
    @handler
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        inode = self.fs.create_file(parent, name, mode, ctx.uid, ctx.gid, self.umask(ctx))
        fh = self.fs.open(inode.ino, flags & ~os.O_TRUNC)  # new, so empty: nothing to truncate
        self.opened(inode.ino, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self.new_entry(inode)

    @handler
    def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.read_only and flags & WRITE_ACCESS:
            raise FsError(errno.EROFS)
        fh = self.fs.open(ino, flags)  # with O_TRUNC, which the kernel leaves to us (atomic_o_trunc)
        self.opened(ino, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def opened(self, ino: int, flags: int) -> None:
        if flags & os.O_DIRECT:
            self.direct_opens[ino] = self.direct_opens.get(ino, 0) + 1

    @handler
    def read(self, fh: int, offset: int, size: int) -> Any:
        data = self.fs.read(fh, offset, size)
        if self.direct_opens:  # only while some file has an O_DIRECT handle
            ino = self.fs.handle(fh).ino
            if ino in self.direct_opens:  # these bytes may go into the page cache
                self.read_since_drop.add(ino)
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Asynchronous O_DIRECT writes leave stale pages behind unless we drop them.

        The kernel empties the written range of the page cache before it sends
        an O_DIRECT WRITE, and after it when the write is synchronous; but an
        asynchronous one (io_submit, io_uring) completes when we reply, and
        nothing empties the range then.  A buffered READ of that range that we
        answered in between (old bytes) leaves its pages in the cache, and with
        ``keep_cache`` every later read is served the old bytes.  So after such
        a write we drop the file's cached pages, before we reply, whenever we
        answered a READ of it since we last did (nobody else's cached pages can
        be stale).  The notification runs on a worker thread while other tasks
        go on serving: on the serving thread it could deadlock, waiting for
        pages locked by a READ that only we can answer."""
        written, ino = await self._write(fh, offset, data)
        if ino is not None:
            if self.drops_waiting >= MAX_DROPS_WAITING:  # keep tasks free to answer READs
                threading.Thread(target=self._drop_pages, args=(ino,), daemon=True).start()
                return written
            self.drops_waiting += 1
            try:
                await trio.to_thread.run_sync(self._drop_pages, ino)
            finally:
                self.drops_waiting -= 1
        return written

    @handler
    def _write(self, fh: int, offset: int, data: bytes) -> tuple[int, int | None]:
        """The write, and the inode whose cached pages must be dropped before the
        reply (a direct write to a file a READ may have refilled), or None."""
        written = self.fs.write(fh, offset, data)
        if not self.read_since_drop:  # no file with an O_DIRECT handle was READ since its last drop
            return written, None
        handle = self.fs.handle(fh)
        if not handle.flags & os.O_DIRECT or handle.ino not in self.read_since_drop:
            return written, None
        self.read_since_drop.discard(handle.ino)  # a buffered write leaves the mark: it drops nothing
        return written, handle.ino

    async def flush(self, fh: int) -> None:
        """Nothing to do at close(): ENOSYS tells the kernel to stop sending FLUSH,
        which saves a request round trip on every close."""
        self.requests.add("FLUSH", 0)
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @handler
    def release(self, fh: int) -> None:
        handle = self.fs.handle(fh)
        if handle.flags & os.O_DIRECT:
            left = self.direct_opens.pop(handle.ino) - 1
            if left:
                self.direct_opens[handle.ino] = left
            else:
                self.read_since_drop.discard(handle.ino)
        self.fs.release(fh)

    @staticmethod
    def _drop_pages(ino: int) -> None:
        """Drop the kernel's cached pages of ``ino`` (on a worker thread)."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError as error:  # ENOENT: the kernel has forgotten the inode, and its pages
            log.debug("dropping the cached pages of inode %d: %s", ino, error)

    @staticmethod
    async def write_back(mountpoint: str) -> None:
        """Make the kernel send what it holds dirty of this mount (pages written
        through shared mappings) before the model is recorded or rolled back.
        On a worker thread: the writes are requests this loop serves meanwhile."""

        def sync() -> None:
            fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                syncfs(fd)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(sync)

    @staticmethod
    async def forget_cached(inodes: Sequence[int], entries: Sequence[tuple[int, bytes]]) -> None:
        """Make the kernel forget names (and negative entries) and inodes' attributes
        and pages that changed outside any request (a rollback).  On a worker
        thread: the kernel may need a request only this loop can answer first."""

        def send() -> None:
            for parent, name in entries:
                try:
                    pyfuse3.invalidate_entry(parent, name)
                except OSError as error:  # ENOENT: not cached
                    log.debug("invalidating entry %r in inode %d: %s", name, parent, error)
            for ino in inodes:
                Operations._drop_pages(ino)

        await trio.to_thread.run_sync(send)

    @handler
    def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(fh)

    # --- directories ----------------------------------------------------
    @handler
    def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        return self.fs.opendir(ino)

    @handler
    def readdir(self, fh: int, start: int, token: pyfuse3.ReaddirToken) -> None:
        for name, inode, offset in self.fs.readdir(fh, start):
            if not pyfuse3.readdir_reply(token, name, self.entry(inode), offset):
                return
            if name not in (b".", b".."):
                self.fs.remember(inode)

    @handler
    def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fs.handle(fh)

    # --- extended attributes --------------------------------------------
    @handler
    def setxattr(self, ino: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.setxattr(ino, name, value, caller(ctx) if name == acl.ACCESS else None)

    @handler
    def getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.getxattr(ino, name)

    @handler
    def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.fs.listxattr(ino)

    @handler
    def removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.removexattr(ino, name)

    # --- whole filesystem -------------------------------------------------
    @handler
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = PAGE
        data.f_blocks, data.f_bfree, data.f_bavail = stats.pages, stats.pages_free, stats.pages_free
        data.f_files, data.f_ffree, data.f_favail = stats.inodes, stats.inodes_free, stats.inodes_free
        data.f_namemax = NAME_MAX
        return data
