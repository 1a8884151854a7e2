"""The raw Linux calls mmfs makes that Python's standard library lacks.

``open_tree``/``mount_setattr`` (a private read-only clone of a mount),
``openat2`` (path resolution confined beneath a directory), file leases
(``F_SETLEASE``: the kernel holds back a writer until the lease is given up),
the mmap flag Python 3.11 does not export, the type of a file's filesystem
(``fstatfs``), and for ``mmfs run``'s namespace: unshare, mount propagation,
umount2, the parent-death signal and ambient capabilities.  Thin wrappers: errors are
``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_OPEN_TREE, SYS_OPENAT2, SYS_MOUNT_SETATTR = 428, 437, 442
OPEN_TREE_CLONE, AT_RECURSIVE, AT_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x1000, -100
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME, MOUNT_ATTR_NOSYMFOLLOW = 0x10, 0x70, 0x200000
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08
MAP_NORESERVE = 0x4000  # not exported by Python 3.11's mmap module


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def private_readonly_clone(path: str) -> int:
    """A detached clone of the mount tree at ``path``, made read-only, noatime,
    nosymfollow, nodev and nosuid; -1 without the privilege to make one."""
    flags = OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC
    fd = int(_libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), flags))
    if fd < 0:
        return -1
    attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSYMFOLLOW | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID
    flags = AT_EMPTY_PATH | AT_RECURSIVE
    for request in (_MountAttr(attrs | MOUNT_ATTR_NOATIME, MOUNT_ATTR__ATIME, 0, 0), _MountAttr(attrs, 0, 0, 0)):
        if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", flags, ctypes.byref(request), ctypes.sizeof(request)) == 0:
            return fd  # the second: the atime flags are locked (a user namespace's copy of its parent's mounts)
    os.close(fd)
    return -1


def openat2_beneath(dirfd: int, path: bytes, flags: int) -> int:
    """``openat2`` of ``path`` beneath ``dirfd``: no ``..`` escape, no symlink
    followed, no magic link.  O_NOATIME is dropped where it is refused (EPERM:
    a file the caller does not own)."""
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    result = _libc.syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    if result < 0 and ctypes.get_errno() == errno.EPERM and flags & os.O_NOATIME:
        how.flags &= ~os.O_NOATIME
        result = _libc.syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how))
    return _check(result)


def take_read_lease(fd: int) -> None:
    """A read lease on ``fd``: whoever opens the file for writing or truncates it
    waits until it is given up, and SIGIO tells us."""
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)


def give_up_lease(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


TMPFS_MAGIC, RAMFS_MAGIC = 0x01021994, 0x858458F6


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def in_memory_filesystem(fd: int) -> bool:
    """Whether an open file lives on tmpfs or ramfs, whose pages are the file:
    a write fault on a private map of a hole there first allocates that page in
    the file itself (and is SIGBUS when that filesystem is full)."""
    found = _StatFs()
    _check(_libc.fstatfs(fd, ctypes.byref(found)))
    return found.f_type in (TMPFS_MAGIC, RAMFS_MAGIC)


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write back what the kernel holds dirty of the filesystem of ``fd``."""
    _check(_libc.syncfs(ctypes.c_int(fd)))


def holds_read_lease(fd: int) -> bool:
    """False once someone has started breaking the lease."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK)


# --- a private mount namespace (mmfs run) ----------------------------------------
CLONE_NEWNS, CLONE_NEWUSER = 0x20000, 0x10000000
MS_REC, MS_SLAVE, MNT_DETACH = 0x4000, 1 << 19, 2
PR_SET_PDEATHSIG, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 1, 47, 2
CAP_SYS_ADMIN = 21
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def unshare(flags: int) -> None:
    """``unshare(2)`` (Python 3.11's os module lacks it): CLONE_NEWNS, CLONE_NEWUSER..."""
    _check(_libc.unshare(ctypes.c_int(flags)))


def make_mounts_slaves() -> None:
    """Make every mount of this mount namespace a slave (``mount --make-rslave /``):
    nothing mounted here propagates out, while mounts and unmounts made outside
    still propagate in.  (Private mounts would keep a copy of every other mount
    alive here after its owner unmounted it: a FUSE daemon would never see its
    session end while this namespace lives.)"""
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_SLAVE), None))


def unmount(path: str, detach: bool = False) -> None:
    """``umount2(path)``; ``detach``: MNT_DETACH, the mount goes once no one uses it."""
    _check(_libc.umount2(os.fsencode(path), ctypes.c_int(MNT_DETACH if detach else 0)))


def _prctl(option: int, *args: int) -> None:
    """``prctl(2)`` with every argument an unsigned long, unused ones 0 (some options check)."""
    padded = [ctypes.c_ulong(arg) for arg in (*args, 0, 0, 0, 0)[:4]]
    _check(_libc.prctl(ctypes.c_int(option), *padded))


def die_with_parent(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies
    (``PR_SET_PDEATHSIG``; kept across execve unless privileges change)."""
    _prctl(PR_SET_PDEATHSIG, signum)


def keep_sys_admin_across_exec() -> None:
    """Make CAP_SYS_ADMIN, which this process must hold, an ambient capability:
    a program it executes keeps it although its uid is not 0 (in a user
    namespace, what mounting FUSE there needs)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data))
    data[0].inheritable |= 1 << CAP_SYS_ADMIN
    _check(_libc.capset(ctypes.byref(header), data))
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN)
