"""Differential tests: mmfs against kernel tmpfs, result for result, errno for errno.

A seeded generator draws operations over a small pool of names in a few
nested directories, steered by the oracle's state (existing names, open fds)
so that collisions -- EEXIST, ENOTEMPTY, EISDIR, ENOTDIR, EINVAL, ENOENT --
are frequent.  Every operation is a real system call (``os.*``; renameat2 and
linkat through ctypes), run once on a kernel tmpfs (the oracle) and once on an
mmfs mount.  Besides files, directories, links, FIFOs, modes, owners, times
and xattrs of every namespace (good and bad names and sizes), the mix sets and
removes POSIX ACLs, maps files (MAP_SHARED and MAP_PRIVATE) and keeps using
files after their last name is gone.  The two results, ``("ok", value)`` or ``("err", errno name)``,
must be equal at every step.  At the end both trees are walked and compared
path by path: type, mode, size, nlink, owner, st_blocks, rdev, content,
symlink target, xattrs, and which names are hard links of one another.
Timestamps and inode numbers are never compared across the two filesystems;
a separate test checks that operations change the same timestamps.

Left out of the random mix on purpose, because the kernel's FUSE layer (not
mmfs) decides the answer and mmfs cannot see what happened:

* Reading a hole through a mapping.  A read fault (or the read a MAP_PRIVATE
  write fault does before copying) on a tmpfs hole allocates a page in the
  file, so st_blocks grows.  On FUSE the fault becomes a READ request, which
  mmfs cannot tell apart from read(2) of a hole (which allocates nothing on
  tmpfs).  So mappings are only written, and a MAP_PRIVATE write only goes
  to a page that write(2) has just filled.
* lseek(SEEK_END) on a directory (see ``gen_seek``).

The engine (sides, operations, running a sequence on both) is
``support.differential``, shared with overlay mode (tests/test_overlay.py);
this module brings tmpfs mode's draw and generator table, and the listing
order runs of both modes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import stat
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import clock_passes
from support.differential import Draw, Generators, Op, Ref, Side, operations, run_differential
from support.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, check, libc, renameat2
from support.trees import compare_trees, join, scan

PAGE = mmap.PAGESIZE
SLOTS = 3  # open file descriptors kept per side, by slot number

NAMES = (b"a", b"b", b"c")
SPECIAL_NAMES = (b"n" * 255, b"o" * 256, b"new\nline", b"bad\xff\xfe\x80")
# No ".." anywhere: a path must never resolve outside its own mount.
SYMLINK_TARGETS = (
    b"a",
    b"b",
    b"a/b",
    b"c/a",
    b"missing",
    b".",
    b"./" * 70 + b"a",  # 141 bytes: tmpfs keeps it in a page (st_blocks 8)
    b"t" * 127,
    b"u" * 128,
    b"v" * 4095,
)


USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20  # POSIX ACL entry tags
NO_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")
ACL_VALUES = (
    acl((USER_OBJ, 7, NO_ID), (GROUP_OBJ, 5, NO_ID), (OTHER, 0, NO_ID)),  # just a mode: 0750
    acl((USER_OBJ, 6, NO_ID), (USER, 7, 1000), (GROUP_OBJ, 4, NO_ID), (MASK, 5, NO_ID), (OTHER, 4, NO_ID)),
    acl((USER_OBJ, 7, NO_ID), (GROUP_OBJ, 7, NO_ID), (GROUP, 3, 65534), (MASK, 1, NO_ID), (OTHER, 5, NO_ID)),
    acl((USER_OBJ, 7, NO_ID), (USER, 7, 1000), (GROUP_OBJ, 5, NO_ID), (OTHER, 5, NO_ID)),  # no mask: EINVAL
    b"\x02\x00\x00",  # truncated: EINVAL
)
XATTR_NAMES = (
    b"user.x",
    b"user.y",
    b"trusted.x",
    b"security.x",
    b"user." + b"l" * 250,  # 255 bytes: the longest allowed
    b"user." + b"l" * 251,  # 256 bytes: ERANGE
    b"foo.x",  # unknown namespace
    b"system.x",  # a namespace tmpfs knows only for POSIX ACLs
    *ACL_NAMES,
    b"user.",  # empty name after the prefix
    b"",
)
FILE_MODES = (0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6777, 0o1644, 0o000)
DIR_MODES = (0o755, 0o777, 0o2775, 0o1777, 0o3755, 0o700)
IDS = (0, 1000, 65534, -1)


# --- generating operations --------------------------------------------------
class TmpfsDraw(Draw):
    """Choices steered by the oracle's current state.

    Paths are drawn mostly among names that exist (or new names in directories
    that exist) and fd slots mostly among open ones, so that operations
    collide instead of failing with ENOENT and EBADF.
    """

    def slot(self) -> int:
        slots = sorted(self.oracle.fds)
        return self.choice(slots) if slots and self.random() < 0.9 else self.randrange(SLOTS)

    def slot_is_dir(self, slot: int) -> bool:
        return slot in self.oracle.fds and stat.S_ISDIR(os.fstat(self.oracle.fds[slot]).st_mode)

    def free_slot(self) -> int:
        free = [slot for slot in range(SLOTS) if slot not in self.oracle.fds]
        return self.choice(free) if free and self.random() < 0.8 else self.randrange(SLOTS)

    def name(self) -> bytes:
        return self.choice(SPECIAL_NAMES) if self.random() < 0.06 else self.choice(NAMES)

    def path(self) -> bytes:
        kind = self.random()
        if kind < 0.75:
            paths, dirs = existing(self.oracle.root)
            if kind < 0.4 and paths:
                return self.choice(paths)
            parent = self.choice(dirs)
            return parent + b"/" + self.name() if parent else self.name()
        return b"/".join(self.name() for _ in range(self.choices((1, 2, 3), weights=(5, 4, 2))[0]))

    def open_path(self) -> bytes:
        """Often the name of an open file: unlinked or replaced while open."""
        paths = [self.oracle.opened_as[slot] for slot in sorted(self.oracle.fds)]
        return self.choice(paths) if paths and self.random() < 0.4 else self.path()

    def path_or_dot(self) -> bytes:
        """Sometimes a path ending in "." (rmdir and rename refuse those)."""
        return self.path() + b"/." if self.random() < 0.04 else self.path()

    def ref(self) -> Ref:
        return self.slot() if self.random() < 0.25 else self.path()

    def follow(self, ref: Ref) -> bool:
        return isinstance(ref, int) or self.random() < 0.7

    def offset(self) -> int:
        """Where to read or write: near the start, at page edges, far past EOF."""
        kind = self.random()
        if kind < 0.5:
            return self.randrange(3 * PAGE)
        if kind < 0.7:
            return self.randrange(1, 6) * PAGE + self.choice((-1, 0, 1))
        if kind < 0.95:
            return self.randrange(PAGE, 8 << 20)  # far past EOF: holes
        return self.choice((-1, 2**63 - 1))  # EINVAL, no room

    def data(self) -> bytes:
        kind = self.random()
        if kind < 0.05:
            return b""
        if kind < 0.6:
            return self.randbytes(self.randrange(1, 64))
        return self.randbytes(self.randrange(64, 3 * PAGE))

    def size(self) -> int:
        kind = self.random()
        if kind < 0.2:
            return 0
        if kind < 0.95:
            return self.randrange(8 << 20) if self.random() < 0.3 else self.randrange(3 * PAGE)
        return -1

    def open_flags(self) -> int:
        flags = self.choices((os.O_RDONLY, os.O_WRONLY, os.O_RDWR), weights=(2, 2, 6))[0]
        for extra, chance in (
            (os.O_CREAT, 0.7),
            (os.O_EXCL, 0.15),
            (os.O_TRUNC, 0.2),
            (os.O_APPEND, 0.2),
            (os.O_DIRECTORY, 0.03),
            (os.O_NOFOLLOW, 0.05),
        ):
            if self.random() < chance:
                flags |= extra
        return flags

    def times(self) -> tuple[int, int]:
        choices = (0, 1_700_000_000_123_456_789, -86400 * 10**9 - 5, 2**33 * 10**9 + 7)
        return self.choice(choices), self.randrange(10**18)

    def xattr_name(self) -> bytes:
        return self.choices(XATTR_NAMES, weights=(8, 4, 3, 3, 1, 1, 1, 1, 2, 2, 1, 1))[0]

    def xattr_value(self) -> bytes:
        return self.randbytes(self.choices((0, 1, 16, PAGE, 65536, 65537), weights=(1, 6, 6, 2, 1, 1))[0])


def gen_xattr(d: TmpfsDraw, name: str) -> Op:
    ref = d.ref()
    follow = d.follow(ref)
    if name == "setxattr":
        flags = d.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))
        return Op(name, (ref, d.xattr_name(), d.xattr_value(), flags, follow))
    if name == "listxattr":
        return Op(name, (ref, follow))
    return Op(name, (ref, d.xattr_name(), follow))


def gen_acl(d: TmpfsDraw) -> Op:
    """Set a POSIX ACL (valid or not) or remove one, present or not."""
    ref = d.ref()
    if d.random() < 0.3:
        return Op("removexattr", (ref, d.choice(ACL_NAMES), d.follow(ref)))
    return Op("setxattr", (ref, d.choice(ACL_NAMES), d.choice(ACL_VALUES), 0, d.follow(ref)))


def gen_with_follow(d: TmpfsDraw, name: str, *args: Any) -> Op:
    ref = d.ref()
    return Op(name, (ref, *args, d.follow(ref)))


def gen_seek(d: TmpfsDraw) -> Op:
    """lseek; never SEEK_END on a directory.

    Left out: the kernel answers lseek on a FUSE directory itself
    (generic_file_llseek: SEEK_END lands at i_size), while tmpfs directories
    use dcache_dir_lseek, which refuses SEEK_END with EINVAL.  No request
    reaches mmfs, so it cannot answer like tmpfs.
    """
    slot = d.slot()
    whence = os.SEEK_SET if d.slot_is_dir(slot) else d.choice((os.SEEK_SET, os.SEEK_END))
    return Op("seek", (slot, d.offset(), whence))


def gen_rename(d: TmpfsDraw) -> Op:
    whiteout = RENAME_WHITEOUT  # alone, with RENAME_NOREPLACE, and with RENAME_EXCHANGE (EINVAL)
    flags = d.choices(
        (0, RENAME_NOREPLACE, RENAME_EXCHANGE, 3, whiteout, whiteout | 1, whiteout | 2), weights=(6, 2, 3, 1, 2, 1, 1)
    )[0]
    return Op("rename", (d.path_or_dot(), d.open_path(), flags))


def gen_mknod(d: TmpfsDraw) -> Op:
    kind = d.choice(("fifo", "fifo", "chr", "reg"))
    return Op("mknod", (d.path(), kind, d.choice((0o644, 0o600, 0o666))))


def gen_mmap(d: TmpfsDraw, name: str) -> Op:
    ref = d.slot() if d.random() < 0.7 else d.path()
    return Op(name, (ref, d.random(), d.randbytes(d.randrange(1, 2 * PAGE))))


def gen_symlink(d: TmpfsDraw) -> Op:
    target = d.choice(SYMLINK_TARGETS)  # drawn before the path
    return Op("symlink", (d.path(), target))


GENERATORS: Generators[TmpfsDraw] = [
    (14, lambda d: Op("open", (d.free_slot(), d.path(), d.open_flags(), d.choice(FILE_MODES)))),
    (4, lambda d: Op("close", (d.slot(),))),
    (10, lambda d: Op("pwrite", (d.slot(), d.offset(), d.data()))),
    (4, lambda d: Op("write", (d.slot(), d.data()))),
    (8, lambda d: Op("pread", (d.slot(), d.offset(), d.choice((1, 100, PAGE, 3 * PAGE + 5))))),
    (2, lambda d: Op("read", (d.slot(), d.choice((10, PAGE))))),
    (2, gen_seek),
    (4, lambda d: Op("truncate", (d.slot(), d.size()))),  # ftruncate
    (3, lambda d: Op("truncate", (d.path(), d.size()))),
    (6, lambda d: gen_with_follow(d, "stat")),
    (3, lambda d: Op("listdir", (d.choice((b"", d.path())),))),
    (7, lambda d: Op("mkdir", (d.path(), d.choice(DIR_MODES)))),
    (5, lambda d: Op("rmdir", (d.path_or_dot(),))),
    (6, lambda d: Op("unlink", (d.open_path(),))),
    (10, gen_rename),
    (4, lambda d: Op("link", (d.path(), d.path(), d.random() < 0.5))),
    (3, lambda d: Op("flink", (d.slot(), d.path()))),
    (4, gen_symlink),
    (2, lambda d: Op("readlink", (d.path(),))),
    (4, lambda d: Op("chmod", (d.ref(), d.choice(FILE_MODES + DIR_MODES)))),
    (3, lambda d: gen_with_follow(d, "chown", d.choice(IDS), d.choice(IDS))),
    (3, lambda d: gen_with_follow(d, "utime", d.times())),
    (6, lambda d: gen_xattr(d, "setxattr")),
    (4, lambda d: gen_xattr(d, "getxattr")),
    (2, lambda d: gen_xattr(d, "listxattr")),
    (3, lambda d: gen_xattr(d, "removexattr")),
    (5, gen_acl),
    (3, gen_mknod),
    (3, lambda d: gen_mmap(d, "mmap_shared")),
    (2, lambda d: gen_mmap(d, "mmap_private")),
]


def existing(root: bytes) -> tuple[list[bytes], list[bytes]]:
    """(every name, every directory not too deep) under root, relative."""
    paths = scan(root)[1:]
    dirs = [b""] + [path for path in paths if path.count(b"/") < 3 and os.path.isdir(os.path.join(root, path))]
    return paths, dirs


# --- the random test --------------------------------------------------------
SEEDS = range(16)
STEPS = 400


@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_match_tmpfs(seed: int, kernel_tmpfs: Path, mnt: Path) -> None:
    oracle, subject = Side(kernel_tmpfs), Side(mnt)
    run_differential(oracle, subject, operations(TmpfsDraw(seed, oracle), GENERATORS, STEPS), seed)
    compare_trees(oracle.root, subject.root, f"seed {seed}")


# --- timestamps ---------------------------------------------------------------
@dataclass(frozen=True)
class TimeCase:
    """On ``base_tree``, which times of ``watched`` paths does ``action`` change?"""

    action: Callable[[Callable[[str], bytes]], Any]
    watched: tuple[str, ...] = ("d1/f", "d1")
    prepare: Callable[[Callable[[str], bytes]], Any] = lambda p: None


def base_tree(p: Callable[[str], bytes]) -> None:
    os.mkdir(p("d1"))
    os.mkdir(p("d2"))
    os.mkdir(p("d1/sub"))
    with open(p("d1/f"), "wb") as file:
        file.write(b"x" * 100)
    with open(p("d2/g"), "wb") as file:
        file.write(b"y" * 10)
    os.setxattr(p("d1/f"), b"user.old", b"1")


def with_fd(path: bytes, flags: int, use: Callable[[int], Any]) -> Any:
    fd = os.open(path, flags)
    try:
        return use(fd)
    finally:
        os.close(fd)


TIME_CASES: dict[str, TimeCase] = {
    "write": TimeCase(lambda p: with_fd(p("d1/f"), os.O_WRONLY, lambda fd: os.pwrite(fd, b"z", 5))),
    "write_extending": TimeCase(lambda p: with_fd(p("d1/f"), os.O_WRONLY, lambda fd: os.pwrite(fd, b"z", 9000))),
    "read": TimeCase(lambda p: with_fd(p("d1/f"), os.O_RDONLY, lambda fd: os.pread(fd, 10, 0))),
    "truncate_down": TimeCase(lambda p: os.truncate(p("d1/f"), 10)),
    "truncate_up": TimeCase(lambda p: os.truncate(p("d1/f"), 5000)),
    "truncate_same_size": TimeCase(lambda p: os.truncate(p("d1/f"), 100)),
    "ftruncate_same_size": TimeCase(lambda p: with_fd(p("d1/f"), os.O_WRONLY, lambda fd: os.ftruncate(fd, 100))),
    "open_o_trunc": TimeCase(lambda p: os.close(os.open(p("d1/f"), os.O_WRONLY | os.O_TRUNC))),
    "create_in_dir": TimeCase(lambda p: os.close(os.open(p("d1/new"), os.O_CREAT | os.O_WRONLY, 0o644)), ("d1",)),
    "mkdir_in_dir": TimeCase(lambda p: os.mkdir(p("d1/newdir")), ("d1",)),
    "mkfifo_in_dir": TimeCase(lambda p: os.mkfifo(p("d1/fifo")), ("d1",)),
    "symlink_in_dir": TimeCase(lambda p: os.symlink(b"f", p("d1/sym")), ("d1",)),
    "readdir": TimeCase(lambda p: os.listdir(p("d1")), ("d1",)),
    "unlink_from_dir": TimeCase(lambda p: os.unlink(p("d1/f"))),
    "rmdir_from_dir": TimeCase(lambda p: os.rmdir(p("d1/sub")), ("d1/sub", "d1")),
    "rename_between_dirs": TimeCase(lambda p: os.rename(p("d1/f"), p("d2/h")), ("d1/f", "d1", "d2")),
    "rename_within_dir": TimeCase(lambda p: os.rename(p("d1/f"), p("d1/h"))),
    "rename_over_file": TimeCase(lambda p: os.rename(p("d1/f"), p("d2/g")), ("d1/f", "d1", "d2", "d2/g")),
    "rename_dir_between_dirs": TimeCase(lambda p: os.rename(p("d1/sub"), p("d2/sub")), ("d1/sub", "d1", "d2")),
    "rename_exchange": TimeCase(
        lambda p: renameat2(p("d1/f"), p("d2/g"), RENAME_EXCHANGE), ("d1/f", "d1", "d2", "d2/g")
    ),
    "chmod": TimeCase(lambda p: os.chmod(p("d1/f"), 0o600)),
    "chown": TimeCase(lambda p: os.chown(p("d1/f"), 1000, 1000)),
    "link": TimeCase(lambda p: os.link(p("d1/f"), p("d2/h")), ("d1/f", "d1", "d2")),
    "setxattr": TimeCase(lambda p: os.setxattr(p("d1/f"), b"user.new", b"v")),
    "removexattr": TimeCase(lambda p: os.removexattr(p("d1/f"), b"user.old")),
    "getxattr": TimeCase(lambda p: os.getxattr(p("d1/f"), b"user.old")),
    "write_nothing": TimeCase(lambda p: with_fd(p("d1/f"), os.O_WRONLY, lambda fd: os.pwrite(fd, b"", 5))),
    "read_whole_pages": TimeCase(
        lambda p: with_fd(p("d1/f"), os.O_RDONLY, lambda fd: os.pread(fd, PAGE, 0)),
        prepare=lambda p: with_fd(p("d1/f"), os.O_WRONLY, lambda fd: os.pwrite(fd, b"w" * 2 * PAGE, 0)),
    ),
    "readlink": TimeCase(lambda p: os.readlink(p("d1/s")), ("d1/s", "d1"), lambda p: os.symlink(b"f", p("d1/s"))),
    "follow_symlink": TimeCase(lambda p: os.stat(p("d1/s")), ("d1/s", "d1/f"), lambda p: os.symlink(b"f", p("d1/s"))),
    "utime_explicit": TimeCase(lambda p: os.utime(p("d1/f"), ns=(10**18, 2 * 10**18))),
    "mmap_shared_write": TimeCase(lambda p: with_fd(p("d1/f"), os.O_RDWR, mmap_write_one)),
}


def mmap_write_one(fd: int) -> None:
    with mmap.mmap(fd, 100, mmap.MAP_SHARED) as mapping:
        mapping[0:1] = b"m"
        mapping.flush()


def times(fd: int) -> dict[str, int]:
    st = os.stat(fd)
    return {"atime": st.st_atime_ns, "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns}


def changed_times(root: Path, case: TimeCase) -> set[str]:
    """Which of atime/mtime/ctime of each watched path ``case.action`` changed."""

    def p(rel: str) -> bytes:
        return bytes(root / rel)

    base_tree(p)
    case.prepare(p)
    fds = {rel: os.open(p(rel), os.O_PATH | os.O_NOFOLLOW) for rel in case.watched}
    try:
        before = {rel: times(fd) for rel, fd in fds.items()}
        clock_passes(ns for rel_times in before.values() for ns in rel_times.values())
        case.action(p)
        after = {rel: times(fd) for rel, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)
    return {f"{rel}.{key}" for rel in fds for key in before[rel] if before[rel][key] != after[rel][key]}


@pytest.mark.parametrize("name", sorted(TIME_CASES))
def test_timestamps_change_like_tmpfs(name: str, kernel_tmpfs: Path, mnt: Path) -> None:
    want = changed_times(kernel_tmpfs, TIME_CASES[name])
    got = changed_times(mnt, TIME_CASES[name])
    assert want == got, f"{name}: tmpfs changed {sorted(want)}, mmfs changed {sorted(got)}"


# --- directory order ------------------------------------------------------------
# Kernel tmpfs lists the newest entry first: every name created, linked,
# renamed or exchanged into a directory goes to the front of its listing.  In
# overlay mode the reference is a copy of LOWERDIR made with ``cp -a`` onto
# tmpfs: cp creates a directory's entries in inode order, so a lower directory
# not yet changed lists by descending inode number.
ORDER_NAMES = (b"a", b"b", b"c", b"d", b"e", b"f", b"g")
ORDER_DIRS = (b"x", b"y", b"x/z")
ORDER_SEEDS = range(6)
ORDER_STEPS = 300


def listings(root: Path | bytes) -> dict[bytes, list[bytes]]:
    """Every directory under root (relative) with its names in getdents order."""
    out = {}
    for rel in scan(root):
        path = join(root, rel)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            out[rel] = os.listdir(path)
    return out


class OrderDraw(Draw):
    """Paths among ORDER_NAMES in the oracle's directories."""

    dirs: list[bytes]

    def prepare(self) -> None:
        _, self.dirs = existing(self.oracle.root)

    def path(self) -> bytes:
        parent, name = self.choice(self.dirs), self.choice(ORDER_NAMES + ORDER_DIRS[:2])
        return parent + b"/" + name if parent else name


# Creates, mkdirs, unlinks, rmdirs, renames (every flag), links and symlinks.
RENAME_FLAGS = (0, RENAME_NOREPLACE, RENAME_EXCHANGE)
ORDER_GENERATORS: Generators[OrderDraw] = [
    (6, lambda d: Op("mknod", (d.path(), "reg", 0o644))),
    (2, lambda d: Op("mkdir", (d.path(), 0o755))),
    (4, lambda d: Op("unlink", (d.path(),))),
    (1, lambda d: Op("rmdir", (d.path(),))),
    (8, lambda d: Op("rename", (d.path(), d.path(), d.choices(RENAME_FLAGS, (5, 1, 3))[0]))),
    (4, lambda d: Op("link", (d.path(), d.path(), False))),
    (1, lambda d: Op("symlink", (d.path(), b"a"))),
]


def compare_order(oracle: Side, subject: Side, seed: int, label: str) -> None:
    """Same results at every step, and after every step the same listing order."""
    assert listings(oracle.root) == listings(subject.root), f"{label}: listings differ before any change"
    ops = operations(OrderDraw(seed, oracle), ORDER_GENERATORS, ORDER_STEPS)
    run_differential(oracle, subject, ops, seed, state=lambda side: listings(side.root))


@pytest.mark.parametrize("seed", ORDER_SEEDS)
def test_listing_order_matches_tmpfs(seed: int, kernel_tmpfs: Path, mnt: Path) -> None:
    oracle, subject = Side(kernel_tmpfs), Side(mnt)
    for side in (oracle, subject):
        for directory in ORDER_DIRS:
            os.mkdir(side.path(directory))
    compare_order(oracle, subject, seed, "tmpfs mode")


def build_order_lower(root: Path, seed: int) -> None:
    """A LOWERDIR on disk whose entries were made in a random order (so inode
    order, name order and the disk's own readdir order all differ), with hard
    links inside one directory and across directories."""
    rng = random.Random(seed)
    for directory in (b"", *ORDER_DIRS):
        os.makedirs(os.path.join(bytes(root), directory), exist_ok=True)
    names = [(directory, name) for directory in (b"", *ORDER_DIRS) for name in ORDER_NAMES]
    rng.shuffle(names)
    made: list[bytes] = []
    for directory, name in names[: len(names) * 2 // 3]:
        path = os.path.join(bytes(root), directory, name)
        if made and rng.random() < 0.3:
            os.link(rng.choice(made), path)
        else:
            with open(path, "wb") as file:
                file.write(name * rng.randrange(1, 100))
            made.append(path)


@pytest.mark.parametrize("seed", ORDER_SEEDS)
def test_overlay_listing_order_matches_a_tmpfs_copy(
    seed: int, tmp_path: Path, kernel_tmpfs: Path, mmfs_factory: Callable[..., Any]
) -> None:
    lower = tmp_path / "lower"
    build_order_lower(lower, seed)
    subprocess.run(["cp", "-a", f"{lower}/.", f"{kernel_tmpfs}/"], check=True)
    before = listings(lower)
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    compare_order(Side(kernel_tmpfs), Side(mount.path), seed, "overlay mode")
    assert listings(lower) == before


# getdents64(2): struct linux_dirent64 {u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[];}
libc.getdents64.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
libc.getdents64.restype = ctypes.c_ssize_t
DIRENT_HEADER = struct.Struct("<QqHB")


def getdents(fd: int, size: int) -> list[bytes]:
    """One getdents64 call with a buffer of ``size`` bytes: the names it returned."""
    buffer = ctypes.create_string_buffer(size)
    count = check(libc.getdents64(fd, buffer, size))
    names, pos, raw = [], 0, buffer.raw[:count]
    while pos < count:
        _, _, reclen, _ = DIRENT_HEADER.unpack_from(raw, pos)
        names.append(raw[pos + DIRENT_HEADER.size : pos + reclen].split(b"\0", 1)[0])
        pos += reclen
    return names


@pytest.mark.parametrize("where", ["tmpfs", "mmfs"])
def test_resumed_listing_never_skips_or_repeats_a_surviving_entry(
    where: str, kernel_tmpfs: Path, mnt: Path
) -> None:
    """3,000 entries read by getdents64 a few at a time while, between two
    calls, new entries come and others go (by unlink and by rename): every
    entry there all along is listed exactly once, and no name twice.  Kernel
    tmpfs is held to the same rule, to show the test asks nothing odd."""
    root = bytes(kernel_tmpfs if where == "tmpfs" else mnt)
    rng = random.Random(3)
    names = [b"entry-%05d" % n for n in range(3000)]
    for name in names:
        os.close(os.open(os.path.join(root, name), os.O_CREAT | os.O_WRONLY, 0o644))
    doomed = set(rng.sample(names, 1000))
    survivors = set(names) - doomed
    going = sorted(doomed)
    rng.shuffle(going)
    seen: list[bytes] = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        calls = 0
        while chunk := getdents(fd, 512):
            seen += chunk
            calls += 1
            for _ in range(3):
                if going:
                    victim = going.pop()
                    if rng.random() < 0.5:
                        os.unlink(os.path.join(root, victim))
                    else:
                        os.rename(os.path.join(root, victim), os.path.join(root, b"renamed-" + victim))
            os.close(os.open(os.path.join(root, b"new-%05d" % calls), os.O_CREAT | os.O_WRONLY, 0o644))
    finally:
        os.close(fd)
    assert calls > 100  # the listing really was read in many small pieces
    repeated = sorted({name for name in seen if seen.count(name) > 1})
    assert not repeated, f"listed more than once: {repeated[:10]}"
    missing = sorted(survivors - set(seen))
    assert not missing, f"{len(missing)} surviving entries never listed, e.g. {missing[:10]}"
    assert seen[:2] == [b".", b".."]
