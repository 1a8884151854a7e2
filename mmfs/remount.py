"""``mount -o remount,...``: change the limits of a running mount, or make it read-only.

mount(8) hands a remount of a ``fuse.mmfs`` mount to its helper (mount.fuse3),
which runs ``mmfs SOURCE MOUNTPOINT -o OPTIONS`` where OPTIONS holds
``remount``, the options given, and what mountinfo shows of the mount
(``rw``, ``relatime``, ``user_id=``...).  That command, the client here,
sends the daemon one control request naming the changes (``size``,
``nr_inodes``, ``read_only``; ``lowerdir``, which may only name the mount's
own), and exits 0, or prints one line and exits 32 as mount(8) does when
kernel tmpfs refuses a remount.  Other options keep the values given at mount,
as tmpfs keeps ``mode=``, ``uid=`` and ``gid=``.

The daemon (``handle_remount``) checks everything before it changes anything,
as tmpfs does: a size below the pages in use, fewer inodes than are in use,
a limit on a mount made without one (tmpfs: "Cannot retroactively limit"),
or, for ``ro``, files open for writing or deleted but open (tmpfs: busy).
Read-only, the adapter answers EROFS to every change and reads leave atimes
alone, as on a read-only tmpfs.  The client then marks the kernel's
superblock and mount read-only (or writable) as well, where it may (root):
the kernel then refuses changes itself, and ``statvfs`` and mountinfo say
``ro``.  Without that privilege the daemon alone refuses changes, and the
kernel answers first where it decides alone (ENOENT for a missing name).

The handler runs on the daemon's trio loop between two FUSE requests, so a
remount is atomic with respect to them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import control, mounts
from .arena import PAGE
from .options import MountConfig, UsageError, atime_rule, shown

if TYPE_CHECKING:
    from .daemon import Daemon

FAILED = 32  # mount(8)'s exit status when the kernel refuses a mount or remount (MNT_EX_FAIL)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_FSCONFIG, SYS_FSPICK, SYS_MOUNT_SETATTR = 431, 433, 442
FSPICK_CLOEXEC, FSPICK_SYMLINK_NOFOLLOW, FSPICK_NO_AUTOMOUNT = 1, 2, 4
FSCONFIG_SET_FLAG, FSCONFIG_CMD_RECONFIGURE = 0, 7
MOUNT_ATTR_RDONLY, AT_FDCWD = 0x1, -100


@dataclass(frozen=True)
class Settings:
    """What a remount may change; None: unchanged."""

    size: int | None = None  # bytes, a whole number of pages; 0: unlimited
    nr_inodes: int | None = None  # 0: unlimited
    read_only: bool | None = None

    def request(self) -> dict[str, Any]:
        """The remount request that sets these."""
        named = {name: value for name, value in vars(self).items() if value is not None}
        return {"op": "remount", **named}


# --- the client: mmfs SOURCE MOUNTPOINT -o remount,... --------------------------
def remount(config: MountConfig) -> int:
    """Apply the changes ``config`` names to the mount at its mountpoint; the exit status."""
    try:
        mountpoint = mount_root(config.mountpoint)
        request = changes(config)
        undo = control.call(mountpoint, request)["before"]
        if "read_only" in request:
            set_kernel_read_only(mountpoint, request["read_only"], undo)
    except UsageError as error:
        print(f"mmfs: {error}", file=sys.stderr)
        return FAILED
    return 0


def mount_root(path: str) -> str:
    """The real path of the mount at ``path``, or one line if nothing is mounted there."""
    real = os.path.realpath(path)
    if mounts.mounted_at(real) is None:
        raise UsageError(f"{shown(path)}: not a mountpoint")
    return real


def changes(config: MountConfig) -> dict[str, Any]:
    """The remount request: only what the options named."""
    named, flags = config.named, config.fuse_options
    request = Settings(
        config.size if "size" in named else None,
        config.nr_inodes if "nr_inodes" in named else None,
        "ro" in flags if flags & {"ro", "rw"} else None,
    ).request()
    if config.lowerdir is not None:
        request["lowerdir"] = os.path.abspath(config.lowerdir)
    return request


def set_kernel_read_only(mountpoint: str, read_only: bool, undo: dict[str, Any]) -> None:
    """Make the kernel's view agree with the daemon's: the superblock (``fspick``,
    which leaves nosuid, noexec and the other mount flags alone) and the mount.
    Without the privilege to, ``ro`` is the daemon's alone; a kernel that
    refuses ``ro`` (busy) or ``rw`` fails the remount, and ``undo`` (a request)
    puts the daemon's settings back."""
    try:
        if bool(os.statvfs(mountpoint).f_flag & os.ST_RDONLY) != read_only:
            reconfigure_superblock(mountpoint, read_only)
            set_mount_read_only(mountpoint, read_only)
    except OSError as error:
        if read_only and error.errno in (errno.EPERM, errno.ENOSYS):
            return
        control.call(mountpoint, undo)
        if error.errno == errno.EBUSY:
            raise UsageError(f"{shown(mountpoint)}: mount point is busy") from None
        wanted = "read-only" if read_only else "writable"
        raise UsageError(f"{shown(mountpoint)}: the kernel refused to make it {wanted}: {error.strerror}") from None


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def reconfigure_superblock(mountpoint: str, read_only: bool) -> None:
    """Set or clear the superblock's read-only flag (EBUSY while files are open for writing)."""
    flags = FSPICK_CLOEXEC | FSPICK_SYMLINK_NOFOLLOW | FSPICK_NO_AUTOMOUNT
    context = _check(_libc.syscall(SYS_FSPICK, AT_FDCWD, os.fsencode(mountpoint), flags))
    try:
        _check(_libc.syscall(SYS_FSCONFIG, context, FSCONFIG_SET_FLAG, b"ro" if read_only else b"rw", None, 0))
        _check(_libc.syscall(SYS_FSCONFIG, context, FSCONFIG_CMD_RECONFIGURE, None, None, 0))
    finally:
        os.close(context)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def set_mount_read_only(mountpoint: str, read_only: bool) -> None:
    """The mount's own read-only flag, which mountinfo shows first (as ``mount -o remount,ro`` sets it)."""
    attrs = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0) if read_only else _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    path = os.fsencode(mountpoint)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path, 0, ctypes.byref(attrs), ctypes.sizeof(attrs)))


# --- the daemon: the "remount" control request ------------------------------------
def handle_remount(daemon: Daemon, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """Apply a remount request, or change nothing and raise RequestError.

    Replies ``{"before": REQUEST}``: the request that puts back what it changed."""
    for fd in fds:
        os.close(fd)
    wanted = settings(request)
    check(daemon, wanted, request.get("lowerdir"))
    before = current(daemon, wanted)
    apply(daemon, wanted)
    return {"before": before.request()}


def settings(request: dict[str, Any]) -> Settings:
    """The settings a request names, or RequestError if one is not of its type."""
    for name, kind in (("size", int), ("nr_inodes", int), ("read_only", bool), ("lowerdir", str)):
        value: Any = request.get(name)
        if value is not None and (type(value) is not kind or isinstance(value, int) and value < 0):
            raise control.RequestError(f"bad remount request: {name}={value!r}")
    size = request.get("size")
    return Settings(None if size is None else pages(size) * PAGE, request.get("nr_inodes"), request.get("read_only"))


def current(daemon: Daemon, wanted: Settings) -> Settings:
    """The daemon's settings of the fields ``wanted`` names."""
    return Settings(
        None if wanted.size is None else daemon.arena.page_limit * PAGE,
        None if wanted.nr_inodes is None else daemon.fs.config.max_inodes,
        None if wanted.read_only is None else daemon.operations.read_only,
    )


def check(daemon: Daemon, wanted: Settings, lowerdir: str | None) -> None:
    """RequestError, as tmpfs refuses the remount, unless ``wanted`` may be applied."""
    mounted_on = daemon.config.lowerdir
    if lowerdir is not None and lowerdir != mounted_on:
        was = "none: a tmpfs-mode mount" if mounted_on is None else shown(mounted_on)
        raise control.RequestError(f"lowerdir cannot change on remount (mounted with {was})")
    arena, fs = daemon.arena, daemon.fs
    if wanted.size:
        if not arena.page_limit:
            raise control.RequestError("cannot retroactively limit size (mounted with size=0, unlimited)")
        if wanted.size // PAGE < arena.pages_held:
            held = kib(arena.pages_held * PAGE)
            raise control.RequestError(f"size={kib(wanted.size)} is too small for current use ({held} in use)")
        if wanted.size // PAGE > arena.capacity():
            room = kib(arena.capacity() * PAGE)
            raise control.RequestError(f"size={kib(wanted.size)} is more than the {room} this mount reserved")
    if wanted.nr_inodes:
        if not fs.config.max_inodes:
            raise control.RequestError("cannot retroactively limit inodes (mounted with nr_inodes=0, unlimited)")
        if wanted.nr_inodes < fs.inode_count():
            used = fs.inode_count()
            raise control.RequestError(f"nr_inodes={wanted.nr_inodes} is too few for current use ({used} in use)")
    if wanted.read_only and not daemon.operations.read_only and busy(daemon):
        raise control.RequestError("mount point is busy (files open for writing, or deleted but open)")


def apply(daemon: Daemon, wanted: Settings) -> None:
    """Make ``wanted`` the daemon's settings; ``df`` shows them at once (statfs is never cached)."""
    if wanted.size is not None:
        daemon.arena.page_limit = wanted.size // PAGE
        daemon.config.size = wanted.size
    if wanted.nr_inodes is not None:
        daemon.fs.config.max_inodes = daemon.config.nr_inodes = wanted.nr_inodes
    if wanted.read_only is not None:
        set_read_only(daemon, wanted.read_only)


def set_read_only(daemon: Daemon, read_only: bool) -> None:
    """EROFS on every change, and no atime updates (a read-only superblock is
    ``IS_NOATIME`` to the kernel); or writable again, with the mount's atime rule."""
    daemon.operations.read_only = read_only
    daemon.fs.config.atime = "noatime" if read_only else atime_rule(daemon.config)[0]


def busy(daemon: Daemon) -> bool:
    """Whether a read-only remount must wait, as the kernel's
    ``sb_prepare_remount_readonly`` says: a file open for writing, or a file
    deleted but still open."""
    inodes = daemon.fs.inodes
    return any(
        handle.flags & os.O_ACCMODE != os.O_RDONLY or inodes[handle.ino].nlink == 0
        for handle in daemon.fs.handles.values()
    )


def pages(size: int) -> int:
    """Whole pages to hold ``size`` bytes."""
    return -(-size // PAGE)


def kib(size: int) -> str:
    """A byte count as mountinfo writes tmpfs's size=: in KiB."""
    return f"{size >> 10}k"
