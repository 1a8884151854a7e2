"""Overlay mode: a scratch copy-on-write view of LOWERDIR, checked against kernel tmpfs.

``mmfs overlay LOWERDIR MNT`` must behave exactly like a copy of LOWERDIR on a
kernel tmpfs, errno for errno, while LOWERDIR itself is never touched: not its
data, metadata, xattrs or timestamps, access times included.

LOWERDIR lives under pytest's ``tmp_path`` on the ordinary disk filesystem, like
a user's directory.  ``build_lower`` fills it with every awkward kind of entry;
``age`` then gives every entry old times, so that any read of LOWERDIR through a
path that honours atime (relatime updates an atime older than a day) shows in
the final snapshot.  The test's own reading of LOWERDIR never updates an atime:
directories and files are opened with ``O_NOATIME`` (root may), the lstat pass
of a snapshot runs before anything else, and symlinks (whose atime ``readlink``
updates) have their atime settled by ``age`` beforehand.  So no warm-up walk is
needed and atimes are compared strictly.  Every test ends with ``finish``:
LOWERDIR's snapshot and content hashes are unchanged while the overlay is
mounted, and again after it is unmounted.

The oracle is ``cp -a LOWERDIR`` on a kernel tmpfs (the ``kernel_tmpfs``
fixture), aged like LOWERDIR.  The same operations run on both; every result
and errno, then the final trees, must be equal.  Timestamps and inode numbers
are never compared across the two filesystems (except which times an operation
changes); ``st_blocks`` only for files created on the mount, since a lower
file's blocks are the backing filesystem's business.

Tests:

* ``test_random_operations_match_tmpfs_copy``: seeded random sequences over
  lower and new names (writes into the large lower file and past EOF, truncate,
  renames of files and whole lower directories with all renameat2 flags, hard
  links read through every name after a write through one, mmap, xattrs...);
  "mapped" runs let mmfs map large lower files privately, "arena" runs hold
  them open for writing elsewhere so that their pages are copied to the arena.
* ``test_mount_starts_as_exact_view``: every stat field, xattr, target, hard-link
  group and byte as in LOWERDIR; ``rsync -anciHAX --delete`` finds nothing.
* Scenarios run on both sides: recreated directories are empty, renamed lower
  directories keep their contents, lower hard links are one inode, privileges
  drop as on tmpfs, a lower file larger than RAM is writable, lower ACLs show.
* Real tools: git checkout / clean -fdx / make / status, ``sed -i`` over 200
  files, ``rm -rf`` of everything.
* Timestamps: the same times of lower entries change as on tmpfs.
"""

from __future__ import annotations

import functools
import mmap
import os
import random
import socket
import stat
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, clock_passes, stop_mmfs, wait_for
from support.differential import Draw, Generators, Op, Side, operations, run_differential
from support.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, attempt, renameat2
from support.trees import (
    ALL_STATS,
    Tree,
    compare_trees,
    differences,
    digest,
    extents_digest,
    file_digest,
    join,
    link_groups,
    read_noatime,
    scan,
    snapshot,
)

MiB = 1 << 20
PAGE = mmap.PAGESIZE
SLOT = 64 * 1024  # mmfs's unit of anonymous storage
BIG_SIZE = 6 * MiB + 1234  # the large lower file: not page aligned
OLD_NS = 1_000_000_000 * 10**9  # September 2001: relatime updates such an atime on any read

Factory = Callable[..., Mount]


# --- building LOWERDIR -------------------------------------------------------------
def put(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    """A regular file; the owner is set before the mode (chown clears setuid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if owner is not None:
        os.chown(path, *owner)
    os.chmod(path, mode)


def put_sparse(path: Path, size: int, extents: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, data in extents:
            file.seek(offset)
            file.write(data)


def build_lower(root: Path) -> None:
    """Every kind of entry a user's directory holds, with awkward metadata."""
    rng = random.Random(20240611)
    root.mkdir()
    put(root / "docs/readme.txt", b"hello from the lower directory\n" * 40)
    put(root / "docs/empty", b"")
    put(root / "docs/notes.md", b"# notes\n" + rng.randbytes(3000), 0o600, (1000, 1000))
    put(root / "data/big.bin", rng.randbytes(BIG_SIZE))
    put(root / "data/medium.bin", rng.randbytes(100 * 1024 + 7))
    put_sparse(root / "data/sparse.img", 8 * MiB, [(MiB, b"island" * 100), (5 * MiB + 3, rng.randbytes(5000))])
    put(root / "data/hl1.txt", b"one inode, three names\n" * 30)
    put(root / "nested/a/file.txt", b"nested file\n")
    put(root / "nested/a/b/c/deep.txt", rng.randbytes(20000))
    os.link(root / "data/hl1.txt", root / "nested/a/b/hl2.txt")
    os.link(root / "data/hl1.txt", root / "data/hl1-again.txt")
    os.link(root / "data/big.bin", root / "nested/big.hardlink")
    put(root / "bin/tool", b"#!/bin/sh\necho tool\n", 0o4755)
    put(root / "bin/script.sh", b"#!/bin/sh\necho script\n", 0o755)
    put(root / "bin/group-tool", b"#!/bin/sh\n", 0o2711, (0, 100))
    put(root / "private/secret", b"top secret\n", 0o600, (1001, 1002))
    put(root / "locked/inside.txt", b"behind a mode 000 directory\n", 0o000)
    put(root / "setgid/member.txt", b"group file\n", 0o664, (1000, 1000))
    put(root / "odd/new\nline", b"a newline in the name\n")
    put(Path(os.fsdecode(join(root, b"odd/bad\xff\xfe"))), b"not UTF-8\n")
    put(root / "odd" / ("n" * 255), b"the longest name\n")
    (root / "emptydir").mkdir()
    (root / "links").mkdir()
    os.symlink("../docs/readme.txt", root / "links/rel")
    os.symlink("/etc/shadow", root / "links/abs")
    os.symlink("../..", root / "links/up")
    os.symlink("../nested", root / "links/dirlink")
    os.symlink("missing/target", root / "links/dangling")
    os.chown(root / "links/rel", 1000, 1000, follow_symlinks=False)
    (root / "misc").mkdir()
    os.mkfifo(root / "misc/fifo", 0o640)
    os.mknod(root / "misc/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "misc/socket"))
    os.chown(root / "private", 1001, 1002)
    os.chmod(root / "private", 0o700)
    os.chown(root / "setgid", 1000, 1000)
    os.chmod(root / "setgid", 0o2775)
    os.chmod(root / "locked", 0o000)
    os.setxattr(root / "docs/readme.txt", b"user.comment", b"lower comment")
    os.setxattr(root / "data/big.bin", b"user.checksum", digest((root / "data/big.bin").read_bytes()).encode())
    os.setxattr(root / "data/hl1.txt", b"user.shared", b"seen through every name")
    os.setxattr(root / "data/medium.bin", b"user.large", rng.randbytes(3000))
    os.setxattr(root / "nested", b"user.dirattr", b"on a directory")
    os.setxattr(root / "misc", b"user.empty", b"")
    os.setxattr(root / "docs/notes.md", b"trusted.secret", b"root only")
    # cap_net_raw+ep (VFS_CAP_REVISION_2): a write or chown must drop it, as on tmpfs
    os.setxattr(root / "bin/script.sh", b"security.capability", struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0))


def build_texts(root: Path, count: int = 200) -> None:
    """``count`` small text files for sed -i, some with odd owners and modes, two names of one."""
    for i in range(count):
        owner = (1000, 1000) if i % 5 == 0 else None
        put(root / f"texts/f{i:03d}.txt", text_file(i), 0o600 if i % 3 == 0 else 0o644, owner)
    os.link(root / "texts/f001.txt", root / "texts/link-to-f001.txt")
    put(root / "texts/untouched.dat", b"no foo in the glob\n")


def text_file(i: int) -> bytes:
    return b"".join(b"line %d of file %d: foo bar foo\n" % (n, i) for n in range(i % 7 + 1))


def age(root: Path) -> None:
    """Old, distinct times on every entry, then settle symlink atimes.

    readlink(2) updates a symlink's atime under relatime while it is not newer
    than its ctime: read every link until its atime is newer than its ctime
    (the clock has to move past the ctime the utime just set), so that later
    readlinks (the snapshots') leave it alone.
    """
    paths = scan(root)
    for i, rel in enumerate(paths):
        os.utime(join(root, rel), ns=(OLD_NS + i * 10**9 + 7, OLD_NS - i * 10**9 + 3), follow_symlinks=False)
    for rel in paths:
        if stat.S_ISLNK(os.lstat(join(root, rel)).st_mode):
            assert wait_for(functools.partial(settled_by_readlink, join(root, rel)), interval=0.001), rel


def settled_by_readlink(path: bytes) -> bool:
    """readlink the symlink; is its atime now newer than its ctime?"""
    os.readlink(path)
    st = os.lstat(path)
    return st.st_atime_ns > st.st_ctime_ns


# --- LOWERDIR must stay as it was --------------------------------------------------
def lower_snapshot(root: Path) -> Tree:
    """Everything about every entry, atimes included (the lstat pass comes first),
    and the contents hashed extent by extent: a sparse file of many GiB costs only its data."""
    return snapshot(root, stats=ALL_STATS, content=extents_digest)


@dataclass
class Baseline:
    """LOWERDIR as the test found it: metadata (atimes included) and contents."""

    root: Path
    tree: Tree

    def check(self, dir_atimes: bool = True) -> None:
        def skip(rel: bytes, key: str) -> bool:
            return not dir_atimes and key == "atime_ns" and self.tree[rel]["type"] == stat.S_IFDIR

        problems = differences(self.tree, lower_snapshot(self.root), skip)
        assert not problems, "LOWERDIR was modified:\n" + "\n".join(problems[:40])


def freeze(lower: Path, oracle: Path | None = None) -> Baseline:
    """Copy LOWERDIR to the oracle with cp -a, age both alike, record LOWERDIR."""
    if oracle is not None:
        subprocess.run(["cp", "-a", f"{lower}/.", f"{oracle}/"], check=True)
        st = os.stat(lower)  # cp keeps the tmpfs root's sticky bit: make the roots alike
        os.chown(oracle, st.st_uid, st.st_gid)
        os.chmod(oracle, stat.S_IMODE(st.st_mode))
        age(oracle)  # the same times as LOWERDIR: relatime decides alike on both
    age(lower)
    return Baseline(lower, lower_snapshot(lower))


def finish(mount: Mount, baseline: Baseline, dir_atimes: bool = True) -> None:
    """LOWERDIR is unchanged with the overlay mounted, and again after a clean unmount."""
    baseline.check(dir_atimes)
    stop_mmfs(mount)
    baseline.check(dir_atimes)


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    path = tmp_path / "lower"
    build_lower(path)
    return path


def overlay(mmfs_factory: Factory, lower: Path) -> Mount:
    return mmfs_factory("overlay", str(lower), options="size=1g")


# --- comparing with the tmpfs copy --------------------------------------------------
def compare_to_copy(oracle: Path | bytes, subject: Path | bytes, lower_inos: set[int], label: str) -> None:
    """Equal trees; st_blocks only where the oracle's inode was not copied from LOWERDIR."""

    def skip(rel: bytes, key: str) -> bool:
        return key == "blocks" and os.lstat(join(oracle, rel)).st_ino in lower_inos

    compare_trees(oracle, subject, label, skip=skip)


def inode_numbers(root: Path) -> set[int]:
    return {os.lstat(join(root, rel)).st_ino for rel in scan(root)}


def both(oracle: Path, mount: Mount, scenario: Callable[[Path], Any], lower_inos: set[int]) -> Any:
    """Run a scenario on the tmpfs copy, then on the overlay: results and final trees must be equal."""
    want = scenario(oracle)
    got = scenario(mount.path)
    assert want == got, f"{scenario.__name__}:\n  tmpfs {want!r}\n  mmfs  {got!r}"
    compare_to_copy(oracle, mount.path, lower_inos, scenario.__name__)
    return got


def listing(root: Path) -> dict[str, tuple[str, int, str]]:
    """Relative path -> (mode, size, content digest or link target) of a subtree;
    directories show size 0 (a disk's directory sizes are not tmpfs's)."""
    out = {}
    for rel, entry in snapshot(root, stats=("type", "mode", "size"), content=file_digest, xattrs=False).items():
        size = 0 if entry["type"] == stat.S_IFDIR else entry["size"]
        body = entry.get("content") or os.fsdecode(entry.get("target", b""))
        out[os.fsdecode(rel)] = (entry["mode"], size, body)
    return out


# --- the random differential --------------------------------------------------------
# The engine is support.differential, shared with tmpfs mode (tests/test_differential.py):
# here are overlay mode's draw, over lower and new names, and its generator table.
NEW_NAMES = (b"x", b"y", b"readme.txt", b"a", b"big.bin")
ORIGINAL_PATHS = (  # may be gone by now; some go through symlinks (the unsafe ones are skipped)
    b"data/big.bin",
    b"nested/big.hardlink",
    b"data/hl1.txt",
    b"nested/a/b/hl2.txt",
    b"data/sparse.img",
    b"data/medium.bin",
    b"docs/readme.txt",
    b"nested",
    b"nested/a",
    b"links/rel",
    b"links/dirlink/a/file.txt",
    b"links/up",
    b"links/abs",
    b"misc/fifo",
    b"locked/inside.txt",
    b"bin/script.sh",
)
SYMLINK_TARGETS = (b"readme.txt", b"big.bin", b"a", b"missing", b".", b"x/y")
FILE_MODES = (0o644, 0o600, 0o755, 0o4755, 0o2755, 0o000, 0o1777, 0o700)
DIR_MODES = (0o755, 0o700, 0o2775, 0o1777)
IDS = (0, 1000, 65534, -1)
XATTR_NAMES = (
    b"user.comment",
    b"user.new",
    b"user.shared",
    b"user.dirattr",
    b"user.large",
    b"trusted.secret",
    b"trusted.x",
    b"security.capability",
)
SLOTS = 3


@dataclass
class Pool:
    """What exists on the oracle right now: most operations pick from it."""

    paths: list[bytes]
    dirs: list[bytes]
    files: list[bytes]  # regular files
    links: list[tuple[bytes, ...]]  # the names of each regular file that has several
    slots: list[int]  # descriptor slots open on the oracle


def current_pool(side: Side) -> Pool:
    paths = scan(side.root)
    stats = {rel: os.lstat(side.path(rel)) for rel in paths}
    files = [rel for rel in paths if stat.S_ISREG(stats[rel].st_mode)]
    by_inode: dict[int, list[bytes]] = {}
    for rel in files:
        by_inode.setdefault(stats[rel].st_ino, []).append(rel)
    links = [tuple(names) for names in by_inode.values() if len(names) > 1]
    dirs = [rel for rel in paths if stat.S_ISDIR(stats[rel].st_mode)]
    return Pool([rel for rel in paths if rel], dirs, files, links, sorted(side.fds))


class OverlayDraw(Draw):
    """Choices among what exists on the oracle (its pool, read afresh before each operation)."""

    pool: Pool

    def prepare(self) -> None:
        self.pool = current_pool(self.oracle)

    def path(self) -> bytes:
        kind = self.random()
        if kind < 0.55 and self.pool.paths:
            return self.choice(self.pool.paths)
        if kind < 0.85:
            parent, name = self.choice(self.pool.dirs), self.choice(NEW_NAMES)
            return parent + b"/" + name if parent else name
        return self.choice(ORIGINAL_PATHS)

    def file(self) -> bytes:
        """Mostly a regular file that exists (most of them came from LOWERDIR)."""
        return self.choice(self.pool.files) if self.pool.files and self.random() < 0.75 else self.path()

    def slot(self) -> int:
        """Mostly a slot with an open descriptor (else EBADF on both sides)."""
        return self.choice(self.pool.slots) if self.pool.slots and self.random() < 0.85 else self.randrange(SLOTS)

    def offset(self) -> int:
        kind = self.random()
        if kind < 0.3:
            return self.randrange(3 * PAGE)
        if kind < 0.45:
            return self.randrange(1, 40) * PAGE + self.choice((-1, 0, 1))
        if kind < 0.75:
            return self.randrange(BIG_SIZE)  # into the middle of the large lower file
        if kind < 0.85:
            return BIG_SIZE + self.randrange(-3 * PAGE, 3 * PAGE)  # around its end
        return self.randrange(BIG_SIZE, 10 * MiB)  # past the end of anything

    def data(self) -> bytes:
        kind = self.random()
        if kind < 0.05:
            return b""
        if kind < 0.45:
            return self.randbytes(self.randrange(1, 64))
        if kind < 0.9:
            return self.randbytes(self.randrange(64, 3 * PAGE))
        return self.randbytes(self.randrange(SLOT, 3 * SLOT))  # spans 64 KiB slots

    def size(self) -> int:
        kind = self.random()
        if kind < 0.15:
            return 0
        if kind < 0.45:
            return self.randrange(3 * PAGE)
        if kind < 0.75:
            return self.randrange(BIG_SIZE)
        if kind < 0.85:
            return BIG_SIZE + self.randrange(-PAGE, PAGE)
        return self.randrange(BIG_SIZE, 10 * MiB)

    def open_flags(self) -> int:
        flags = self.choices((os.O_RDONLY, os.O_WRONLY, os.O_RDWR), weights=(2, 2, 6))[0]
        for extra, chance in ((os.O_CREAT, 0.4), (os.O_EXCL, 0.15), (os.O_TRUNC, 0.1), (os.O_APPEND, 0.1)):
            if self.random() < chance:
                flags |= extra
        return flags


Generator = Callable[[OverlayDraw], Op]
ArgMaker = Callable[[OverlayDraw], tuple[Any, ...]]


def no_args(d: OverlayDraw) -> tuple[Any, ...]:
    return ()


def path_op(
    name: str, follow: bool | None, extra: ArgMaker = no_args, choose: Callable[[OverlayDraw], bytes] = OverlayDraw.path
) -> Generator:
    """An operation on one path; ``follow`` None: drawn, and passed as the last argument."""

    def generate(d: OverlayDraw) -> Op:
        path = choose(d)
        args = extra(d)
        if follow is None:
            drawn = d.random() < 0.6
            return Op(name, (path, *args, drawn), ((path, drawn),))
        return Op(name, (path, *args), ((path, follow),))

    return generate


def fd_op(name: str, extra: ArgMaker) -> Generator:
    def generate(d: OverlayDraw) -> Op:
        return Op(name, (d.slot(), *extra(d)))

    return generate


def two_path_op(name: str, extra: ArgMaker = no_args) -> Generator:
    """rename and link: neither final component is followed."""

    def generate(d: OverlayDraw) -> Op:
        old, new = d.path(), d.path()
        return Op(name, (old, new, *extra(d)), ((old, False), (new, False)))

    return generate


def gen_open(d: OverlayDraw) -> Op:
    path = d.file()
    return Op("open", (d.randrange(SLOTS), path, d.open_flags(), d.choice(FILE_MODES)), ((path, True),))


def gen_hard_links(d: OverlayDraw) -> Op:
    """Write through one name of a hard-linked file, read through all of them."""
    names = list(d.choice(d.pool.links)) if d.pool.links else [b"data/big.bin", b"nested/big.hardlink"]
    d.shuffle(names)
    return Op("hard_links", (tuple(names), d.offset(), d.data()), tuple((name, True) for name in names))


def xattr_args(d: OverlayDraw) -> tuple[Any, ...]:
    value = d.randbytes(d.choice((0, 1, 30, 300)))
    return d.choice(XATTR_NAMES), value, d.choice((0, 0, os.XATTR_CREATE, os.XATTR_REPLACE))


def mapped_write_args(d: OverlayDraw) -> tuple[Any, ...]:
    return d.random(), d.randbytes(d.randrange(1, 2 * PAGE))


RENAME_FLAGS = (0, RENAME_NOREPLACE, RENAME_EXCHANGE)
GENERATORS: Generators[OverlayDraw] = [
    (10, gen_open),
    (3, lambda d: Op("close", (d.randrange(SLOTS),))),
    (10, fd_op("pwrite", lambda d: (d.offset(), d.data()))),
    (7, fd_op("pread", lambda d: (d.offset(), d.choice((1, 100, PAGE, 3 * PAGE + 5, SLOT + 9))))),
    (3, fd_op("truncate", lambda d: (d.size(),))),  # ftruncate
    (8, path_op("write_path", True, lambda d: (d.offset(), d.data()), OverlayDraw.file)),
    (7, path_op("read_path", True, choose=OverlayDraw.file)),
    (4, gen_hard_links),
    (3, path_op("mmap_shared", True, mapped_write_args, OverlayDraw.file)),
    (4, path_op("truncate", True, lambda d: (d.size(),), OverlayDraw.file)),
    (5, path_op("stat", None)),
    (3, path_op("listdir", True)),
    (6, path_op("mkdir", False, lambda d: (d.choice(DIR_MODES),))),
    (5, path_op("rmdir", False)),
    (6, path_op("unlink", False)),
    (12, two_path_op("rename", lambda d: (d.choices(RENAME_FLAGS, weights=(6, 2, 3))[0],))),
    (4, two_path_op("link", lambda d: (False,))),  # the source symlink not followed
    (3, path_op("symlink", False, lambda d: (d.choice(SYMLINK_TARGETS),))),
    (2, path_op("readlink", False)),
    (3, path_op("chmod", True, lambda d: (d.choice(FILE_MODES),))),
    (3, path_op("chown", None, lambda d: (d.choice(IDS), d.choice(IDS)))),
    (2, path_op("utime", None, lambda d: ((d.randrange(10**18), d.randrange(10**18)),))),
    (4, path_op("setxattr", None, xattr_args)),
    (2, path_op("getxattr", None, lambda d: (d.choice(XATTR_NAMES),))),
    (2, path_op("listxattr", None)),
    (3, path_op("removexattr", None, lambda d: (d.choice(XATTR_NAMES),))),
    (1, path_op("mknod", False, lambda d: ("fifo", 0o644))),
]


COPY_UP_LIMIT = 256 * 1024  # mmfs copies smaller lower files whole at their first write
SEEDS = range(14)
STEPS = 600
# With another process holding a large lower file open for writing, mmfs may not
# lease and map it privately: its copy-on-write pages then go to the arena.
RUNS = [pytest.param(seed, False, id=f"mapped-{seed}") for seed in SEEDS]
RUNS += [pytest.param(seed, True, id=f"arena-{seed}") for seed in range(100, 106)]


def hold_open_for_writing(lower: Path, baseline: Baseline) -> list[int]:
    """O_WRONLY descriptors on LOWERDIR's large files (never written: LOWERDIR stays as it is)."""
    large = [rel for rel, m in baseline.tree.items() if m["type"] == stat.S_IFREG and m["size"] > COPY_UP_LIMIT]
    return [os.open(join(lower, rel), os.O_WRONLY | os.O_CLOEXEC) for rel in large]


@pytest.mark.parametrize("seed, writers", RUNS)
def test_random_operations_match_tmpfs_copy(
    seed: int, writers: bool, lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory
) -> None:
    """Seeded random sequences over lower and new names: every result, then the final trees, as on tmpfs."""
    baseline = freeze(lower, kernel_tmpfs)
    lower_inos = inode_numbers(kernel_tmpfs)
    held = hold_open_for_writing(lower, baseline) if writers else []
    mount = overlay(mmfs_factory, lower)
    # st_blocks of a lower file is the backing filesystem's business: compared at the end, and only for new files
    oracle, subject = Side(kernel_tmpfs, stat_blocks=False), Side(mount.path, stat_blocks=False)
    try:
        run_differential(oracle, subject, operations(OverlayDraw(seed, oracle), GENERATORS, STEPS), seed)
    finally:
        for fd in held:
            os.close(fd)
    compare_to_copy(oracle.root, subject.root, lower_inos, f"seed {seed}")
    finish(mount, baseline)


# --- the mount starts as an exact view ---------------------------------------------
VIEW_KEYS = ("type", "mode", "uid", "gid", "nlink", "rdev", "mtime_ns", "ctime_ns", "atime_ns", "target", "xattrs")


def rsync_differences(lower: Path, mount: Mount) -> tuple[int, str, str]:
    """What rsync would change to make the mount LOWERDIR (checksums, hard links, ACLs, xattrs)."""
    command = ["rsync", "-anciHAX", "--delete", "--open-noatime", f"{lower}/", f"{mount.path}/"]
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


def test_mount_starts_as_exact_view(lower: Path, mmfs_factory: Factory) -> None:
    """Every stat field a copy keeps, every xattr, target, hard-link group and byte; rsync agrees."""
    baseline = freeze(lower)
    mount = overlay(mmfs_factory, lower)
    view = snapshot(mount.path, list(baseline.tree), stats=ALL_STATS)  # looked up, not listed: atimes as they were
    assert scan(mount.path) == list(baseline.tree)
    problems = [
        f"{rel!r} {key}: lower {baseline.tree[rel].get(key)!r}, mount {view[rel].get(key)!r}"
        for rel in sorted(view)
        for key in VIEW_KEYS + (("size",) if view[rel]["type"] != stat.S_IFDIR else ())
        if baseline.tree[rel].get(key) != view[rel].get(key)
    ]
    assert not problems, "\n".join(problems)
    assert link_groups(mount.path) == link_groups(lower) and len(link_groups(lower)) == 2
    files = [rel for rel, entry in baseline.tree.items() if "content" in entry]
    unequal = [rel for rel in files if read_noatime(join(mount.path, rel)) != read_noatime(join(lower, rel))]
    assert not unequal, f"contents differ: {unequal}"
    assert rsync_differences(lower, mount) == (0, "", "")
    finish(mount, baseline, dir_atimes=False)  # rsync lists LOWERDIR's directories itself


# --- scenarios on the tmpfs copy and on the overlay ------------------------------------
def recreate_directories(root: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    subprocess.run(["rm", "-rf", root / "nested"], check=True)
    os.mkdir(root / "nested")
    seen["nested"] = os.listdir(root / "nested")
    os.rmdir(root / "emptydir")  # never listed before
    os.mkdir(root / "emptydir", 0o700)
    seen["emptydir"] = (os.listdir(root / "emptydir"), oct(os.stat(root / "emptydir").st_mode))
    seen["rmdir data"] = attempt(lambda: os.rmdir(root / "data"))
    subprocess.run(["rm", "-rf", root / "data"], check=True)
    os.mkdir(root / "data")
    seen["data"] = os.listdir(root / "data")
    (root / "data/big.bin").write_bytes(b"small now")
    seen["big"] = (root / "data/big.bin").read_bytes(), os.listxattr(root / "data/big.bin")
    os.unlink(root / "docs/readme.txt")
    (root / "docs/readme.txt").touch()
    seen["readme"] = (root / "docs/readme.txt").read_bytes(), os.listxattr(root / "docs/readme.txt")
    subprocess.run(["rm", "-rf", root / "locked"], check=True)
    os.mkdir(root / "locked")
    seen["locked"] = os.listdir(root / "locked")
    subprocess.run(["rm", "-rf", root / "private"], check=True)
    os.rename(root / "bin", root / "private")
    seen["private"] = sorted(os.listdir(root / "private"))
    seen["hl2"] = os.stat(root / "nested").st_nlink, attempt(lambda: os.stat(root / "nested/a/b/hl2.txt"))
    return seen


def test_deleted_and_recreated_directory_is_empty(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """rm -rf then mkdir gives an empty directory; a recreated file is new and empty."""
    baseline = freeze(lower, kernel_tmpfs)
    lower_inos = inode_numbers(kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    seen = both(kernel_tmpfs, mount, recreate_directories, lower_inos)
    assert seen["nested"] == seen["data"] == seen["locked"] == [] and seen["emptydir"] == ([], "0o40700")
    assert seen["rmdir data"] == ("err", "ENOTEMPTY")
    assert seen["big"] == (b"small now", []) and seen["readme"] == (b"", [])
    assert seen["private"] == ["group-tool", "script.sh", "tool"]
    finish(mount, baseline)


def rename_directories(root: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    os.rename(root / "nested", root / "data/moved")  # nothing listed it before
    seen["moved"] = listing(root / "data/moved")
    seen["old name"] = attempt(lambda: os.stat(root / "nested"))
    hl1, hl2 = os.stat(root / "data/hl1.txt"), os.stat(root / "data/moved/a/b/hl2.txt")
    seen["hard link"] = (hl1.st_ino == hl2.st_ino, hl1.st_nlink, hl2.st_nlink)
    with open(root / "data/moved/a/b/hl2.txt", "r+b") as file:
        file.write(b"THROUGH THE MOVED NAME")
    seen["other name"] = (root / "data/hl1.txt").read_bytes()[:40]
    seen["big via moved"] = digest((root / "data/moved/big.hardlink").read_bytes())
    seen["listed docs"] = sorted(os.listdir(root / "docs"))
    os.rename(root / "docs", root / "documents")  # listed before
    seen["documents"] = listing(root / "documents")
    renameat2(join(root, b"bin"), join(root, b"private"), RENAME_EXCHANGE)
    seen["exchanged"] = sorted(os.listdir(root / "bin")), sorted(os.listdir(root / "private"))
    os.rename(root / "setgid", root / "emptydir")  # over an empty lower directory
    seen["over empty"] = listing(root / "emptydir")
    seen["over non-empty"] = attempt(lambda: os.rename(root / "misc", root / "documents"))
    seen["into itself"] = attempt(lambda: os.rename(root / "data", root / "data/moved/inside"))
    seen["noreplace"] = attempt(lambda: renameat2(join(root, b"links"), join(root, b"data"), RENAME_NOREPLACE))
    subprocess.run(["mv", root / "data/moved/a", root / "documents/"], check=True)
    (root / "documents/a/new.txt").write_bytes(b"created in a moved lower directory")
    seen["mv"] = listing(root / "documents/a")
    seen["links"] = [os.readlink(root / "links" / name) for name in sorted(os.listdir(root / "links"))]
    seen["nlinks"] = {name: os.stat(root / name).st_nlink for name in ("", "data", "data/moved", "documents")}
    return seen


def test_renamed_lower_directory_keeps_its_contents(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """Renaming whole lower directories (listed or not) works, never EXDEV, and their contents follow."""
    baseline = freeze(lower, kernel_tmpfs)
    expected = listing(lower / "nested")  # O_NOATIME: the baseline's atimes stay valid
    lower_inos = inode_numbers(kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    seen = both(kernel_tmpfs, mount, rename_directories, lower_inos)
    assert seen["moved"] == expected and seen["old name"] == ("err", "ENOENT")
    assert seen["hard link"] == (True, 3, 3) and seen["other name"].startswith(b"THROUGH THE MOVED NAME")
    assert seen["over non-empty"] == ("err", "ENOTEMPTY") and seen["into itself"] == ("err", "EINVAL")
    assert seen["noreplace"] == ("err", "EEXIST") and "new.txt" in seen["mv"]
    finish(mount, baseline)


def hard_link_scenario(root: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    seen["hl1"] = os.stat(root / "data/hl1.txt").st_nlink  # its name in nested/ not listed yet
    os.unlink(root / "data/hl1.txt")
    seen["again"] = os.stat(root / "data/hl1-again.txt").st_nlink
    seen["hl2"] = os.stat(root / "nested/a/b/hl2.txt").st_nlink  # listed after the unlink
    big, other = root / "data/big.bin", root / "nested/big.hardlink"
    seen["big"] = (os.stat(big).st_ino == os.stat(other).st_ino, os.stat(big).st_nlink)
    with open(big, "r+b") as file:
        file.seek(3 * MiB + 17)
        file.write(b"written through data/big.bin")
        file.seek(BIG_SIZE + 5000)
        file.write(b"past the end")
    data = other.read_bytes()
    seen["read other"] = (len(data), digest(data), data[3 * MiB + 17 : 3 * MiB + 45])
    os.truncate(other, 2 * MiB + 1)
    seen["truncated"] = os.stat(big).st_size, digest(big.read_bytes())
    os.unlink(big)
    seen["after unlink"] = os.stat(other).st_nlink
    os.link(other, root / "docs/third")
    seen["after link"] = os.stat(other).st_nlink, os.stat(root / "docs/third").st_nlink
    with open(root / "nested/a/b/hl2.txt", "ab") as file:
        file.write(b"appended")
    again = root / "data/hl1-again.txt"
    seen["small"] = again.read_bytes()[-20:], os.getxattr(again, "user.shared")
    return seen


def test_lower_hard_links_are_one_inode(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """Hard-linked lower files: one inode, LOWERDIR's st_nlink, a write seen through every name."""
    baseline = freeze(lower, kernel_tmpfs)
    lower_inos = inode_numbers(kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    seen = both(kernel_tmpfs, mount, hard_link_scenario, lower_inos)
    assert (seen["hl1"], seen["again"], seen["hl2"]) == (3, 2, 2)
    assert seen["big"] == (True, 2) and seen["read other"][2] == b"written through data/big.bin"
    assert seen["after unlink"] == 1 and seen["after link"] == (2, 2)
    assert seen["small"][0].endswith(b"appended")
    finish(mount, baseline)


def privileges_scenario(root: Path) -> dict[str, Any]:
    """What writes and chown strip from lower files: capabilities, setuid, setgid."""
    seen: dict[str, Any] = {}
    with open(root / "bin/script.sh", "ab") as file:
        file.write(b"echo appended\n")
    seen["capability after write"] = os.listxattr(root / "bin/script.sh")
    os.chown(root / "bin/tool", 1000, 1000)
    seen["setuid after chown"] = oct(os.stat(root / "bin/tool").st_mode)
    os.chown(root / "bin/group-tool", 0, 0)
    seen["setgid after chown"] = oct(os.stat(root / "bin/group-tool").st_mode)
    (root / "setgid/new.txt").touch()
    os.mkdir(root / "setgid/newdir")
    news = ("setgid/new.txt", "setgid/newdir")
    seen["setgid inheritance"] = [(os.stat(root / new).st_gid, oct(os.stat(root / new).st_mode)) for new in news]
    return seen


def test_lower_privileges_drop_like_tmpfs(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """security.capability, setuid and setgid of lower files go exactly when they go on tmpfs."""
    baseline = freeze(lower, kernel_tmpfs)
    lower_inos = inode_numbers(kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    seen = both(kernel_tmpfs, mount, privileges_scenario, lower_inos)
    assert seen["capability after write"] == [] and seen["setuid after chown"] == "0o100755"
    assert seen["setgid inheritance"] == [(1000, "0o100644"), (1000, "0o42755")]
    finish(mount, baseline)


def memory_bytes() -> int:
    """RAM plus swap: the overcommit heuristic refuses any private writable mapping larger."""
    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    return fields["MemTotal"] + fields["SwapTotal"]


def huge_file_scenario(path: Path) -> list[Any]:
    size = os.stat(path).st_size
    middle = size // 2 + 3
    fd = os.open(path, os.O_RDWR)
    try:
        seen = [os.pread(fd, 30, size // 2 - 10), os.pwrite(fd, b"written in the middle", middle)]
        seen += [os.pread(fd, 40, middle - 5), os.pwrite(fd, b"near the end", size - 20), os.pread(fd, 40, size - 40)]
        seen += [os.pread(fd, 20, 0), os.pwrite(fd, b"FIRST", 0), os.pread(fd, 20, 0)]
        os.ftruncate(fd, middle + 8)
        seen += [os.fstat(fd).st_size, os.pread(fd, 40, middle - 5)]
        os.ftruncate(fd, size)
        seen += [os.pread(fd, 40, middle - 5), os.pread(fd, 40, size - 40)]
    finally:
        os.close(fd)
    return seen


def test_write_into_lower_file_larger_than_memory(tmp_path: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """A sparse lower file (a disk image) larger than RAM+swap is written in the middle as on tmpfs."""
    size = 2 * memory_bytes() + 12345
    lower = tmp_path / "lower"
    lower.mkdir()
    put_sparse(lower / "disk.img", size, [(0, b"boot sector"), (size // 2, b"lower data"), (size - 30, b"lower tail")])
    baseline = freeze(lower, kernel_tmpfs)  # cp -a copies the holes as holes
    mount = overlay(mmfs_factory, lower)
    want = huge_file_scenario(kernel_tmpfs / "disk.img")
    got = huge_file_scenario(mount.path / "disk.img")
    assert got == want
    assert want[2] == b"\0\0low" + b"written in the middle" + bytes(14)
    finish(mount, baseline)


def add_acls(root: Path) -> None:
    subprocess.run(["setfacl", "-m", "u:1000:rw,g:100:r", root / "docs/readme.txt"], check=True)
    subprocess.run(["setfacl", "-m", "u:1001:rwx", "-d", "-m", "g:100:rx,o::-", root / "setgid"], check=True)


def acl_scenario(root: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name in ("docs/readme.txt", "setgid", "setgid/member.txt"):
        for kind in ("access", "default"):
            acl = (root / name, f"system.posix_acl_{kind}")
            seen[f"{name} {kind}"] = attempt(lambda acl=acl: digest(os.getxattr(*acl)))
    (root / "setgid/new.txt").write_bytes(b"inherits the default ACL")
    os.mkdir(root / "setgid/newdir")
    os.chmod(root / "docs/readme.txt", 0o600)
    names = ["docs/readme.txt", "setgid", "setgid/new.txt", "setgid/newdir", "setgid/member.txt"]
    getfacl = subprocess.run(["getfacl", "-p", *names], cwd=root, capture_output=True, text=True, check=True)
    seen["getfacl"] = getfacl.stdout
    return seen


def test_lower_posix_acls_are_kept(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """Access and default ACLs of LOWERDIR show on the mount (cp -a keeps them) and are inherited."""
    add_acls(lower)
    baseline = freeze(lower, kernel_tmpfs)
    lower_inos = inode_numbers(kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    view = snapshot(mount.path, list(baseline.tree), stats=())
    problems = [
        f"{rel!r}: lower {baseline.tree[rel]['xattrs']}, mount {view[rel]['xattrs']}"
        for rel in baseline.tree
        if baseline.tree[rel]["xattrs"] != view[rel]["xattrs"]
    ]
    assert not problems, "\n".join(problems)
    assert rsync_differences(lower, mount) == (0, "", "")
    both(kernel_tmpfs, mount, acl_scenario, lower_inos)
    finish(mount, baseline, dir_atimes=False)  # rsync lists LOWERDIR's directories itself


# --- real tools ------------------------------------------------------------------------
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Lower Author",
    "GIT_AUTHOR_EMAIL": "lower@example.com",
    "GIT_COMMITTER_NAME": "Lower Author",
    "GIT_COMMITTER_EMAIL": "lower@example.com",
    "GIT_AUTHOR_DATE": "2001-09-09T01:46:40Z",
    "GIT_COMMITTER_DATE": "2001-09-09T01:46:40Z",
}
MAKEFILE = b"hello: hello.o greet.o\n\tcc -o $@ $^\n\n%.o: %.c greeting.h\n\tcc -O2 -c -o $@ $<\n"
HELLO_C = b'#include "greeting.h"\nint main(void) { greet(); return 0; }\n'
GREET_C = b'#include <stdio.h>\n#include "greeting.h"\nvoid greet(void) { puts(GREETING); }\n'


def tool_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GIT_", "LD_", "MAKE"))}
    env.update(GIT_IDENTITY, HOME=str(home), LC_ALL="C", TZ="UTC", GIT_CONFIG_NOSYSTEM="1")
    return env


def sh(cwd: Path, env: dict[str, str], *command: str) -> tuple[int, str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command} in {cwd}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.returncode, result.stdout


def greeting(text: str) -> bytes:
    return b'void greet(void);\n#define GREETING "%s"\n' % text.encode()


def build_repo(repo: Path, env: dict[str, str]) -> None:
    """Two branches, packed and loose objects, a Makefile, untracked and ignored leftovers."""
    repo.mkdir(parents=True)
    sh(repo, env, "git", "init", "-q", "-b", "main")
    files = {
        "Makefile": MAKEFILE,
        "hello.c": HELLO_C,
        "greet.c": GREET_C,
        "greeting.h": greeting("hello from main"),
        "README.md": b"# demo\n",
        ".gitignore": b"*.o\nhello\nbuild/\n",
        "docs/guide.txt": b"guide v1\n",
    }
    for name, data in files.items():
        put(repo / name, data)
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "initial")
    sh(repo, env, "git", "checkout", "-q", "-b", "other")
    put(repo / "greeting.h", greeting("hello from other"))
    put(repo / "extra/data.txt", b"only on the other branch\n")
    sh(repo, env, "git", "rm", "-q", "README.md")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-q", "-m", "other work")
    sh(repo, env, "git", "checkout", "-q", "main")
    sh(repo, env, "git", "gc", "-q")
    put(repo / "docs/guide.txt", b"guide v2\n")
    sh(repo, env, "git", "commit", "-q", "-am", "main work")  # a loose commit on top of the pack
    put(repo / "scratch.txt", b"untracked\n")
    put(repo / "tmp/untracked/deep.txt", b"untracked too\n")
    put(repo / "build/old.o", b"ignored\n")
    put(repo / "hello.o", b"stale object\n")


def git_workflow(repo: Path, env: dict[str, str]) -> list[tuple[int, str]]:
    return [
        sh(repo, env, "git", "status", "--porcelain", "--ignored"),
        sh(repo, env, "git", "checkout", "-q", "other"),
        sh(repo, env, "git", "clean", "-fdx"),
        sh(repo, env, "make", "--no-print-directory"),
        sh(repo, env, "./hello"),
        sh(repo, env, "git", "status", "--porcelain"),
        sh(repo, env, "git", "rev-parse", "--abbrev-ref", "HEAD"),
        sh(repo, env, "git", "log", "--format=%s"),
        sh(repo, env, "git", "fsck", "--no-progress"),
        sh(repo, env, "git", "checkout", "-q", "main"),
        sh(repo, env, "git", "status", "--porcelain"),
    ]


def test_git_checkout_clean_build_status(tmp_path: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """git checkout, git clean -fdx, make and run the program, git status: as in the tmpfs copy."""
    env = tool_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    lower = tmp_path / "lower"
    build_repo(lower / "repo", env)
    baseline = freeze(lower, kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    want = git_workflow(kernel_tmpfs / "repo", env)
    got = git_workflow(mount.path / "repo", env)
    assert got == want
    assert got[0][1] == "?? scratch.txt\n?? tmp/\n!! build/\n!! hello.o\n"
    assert got[2][1] == "Removing build/\nRemoving hello.o\nRemoving scratch.txt\nRemoving tmp/\n"
    assert got[4][1] == "hello from other\n" and got[5][1] == "" and got[6][1] == "other\n"
    assert got[7][1] == "other work\ninitial\n" and got[10][1] == ""
    assert (mount.path / "repo/README.md").read_bytes() == b"# demo\n"
    work = {rel: info for rel, info in listing(mount.path / "repo").items() if not rel.startswith(".git/")}
    oracle = {rel: info for rel, info in listing(kernel_tmpfs / "repo").items() if not rel.startswith(".git/")}
    assert work == oracle and "hello" in work and "scratch.txt" not in work
    finish(mount, baseline)


def test_sed_in_place_across_many_files(tmp_path: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """sed -i over 200 lower files: new contents on the mount, owners and modes kept, LOWERDIR untouched."""
    lower = tmp_path / "lower"
    lower.mkdir()
    build_texts(lower)
    baseline = freeze(lower, kernel_tmpfs)
    lower_inos = inode_numbers(kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    for root in (kernel_tmpfs, mount.path):
        files = sorted(str(path) for path in (root / "texts").glob("*.txt"))
        assert len(files) == 201
        subprocess.run(["sed", "-i", "s/foo/FOO/g; 1i header", *files], check=True)
    compare_to_copy(kernel_tmpfs, mount.path, lower_inos, "sed -i")
    for i in range(200):
        path = mount.path / f"texts/f{i:03d}.txt"
        assert path.read_bytes() == b"header\n" + text_file(i).replace(b"foo", b"FOO")
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600 if i % 3 == 0 else 0o644, 1000 if i % 5 == 0 else 0)
        assert read_noatime(join(lower, b"texts/f%03d.txt" % i)) == text_file(i)  # O_NOATIME: no time changes
    finish(mount, baseline)


def test_rm_rf_everything_leaves_the_mount_empty(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """rm -rf of every entry: an empty mount whose root is like tmpfs's; LOWERDIR intact."""
    baseline = freeze(lower, kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    for root in (kernel_tmpfs, mount.path):
        subprocess.run(["rm", "-rf", "--", *(str(root / name) for name in os.listdir(root))], check=True)
    assert os.listdir(mount.path) == [] == os.listdir(kernel_tmpfs)
    compare_to_copy(kernel_tmpfs, mount.path, set(), "rm -rf")
    os.mkdir(mount.path / "docs")
    assert os.listdir(mount.path / "docs") == [] and os.stat(mount.path).st_nlink == 3
    finish(mount, baseline)


# --- timestamps of lower entries --------------------------------------------------------
def read_with(flags: int) -> Callable[[Path], Any]:
    def action(path: Path) -> Any:
        fd = os.open(path, flags)
        try:
            return os.listdir(fd) if flags & os.O_DIRECTORY else os.read(fd, 100)
        finally:
            os.close(fd)

    return action


def pwrite_at(offset: int) -> Callable[[Path], Any]:
    def action(path: Path) -> Any:
        fd = os.open(path, os.O_WRONLY)
        try:
            return os.pwrite(fd, b"new bytes", offset)
        finally:
            os.close(fd)

    return action


def age_link(path: Path) -> None:
    os.utime(path, ns=(OLD_NS, OLD_NS), follow_symlinks=False)


@dataclass(frozen=True)
class TimeCase:
    """``action(root / target)``: which times of the target and of ``watched`` change?"""

    target: str
    action: Callable[[Path], Any]
    watched: tuple[str, ...] = ()
    setup: Callable[[Path], Any] | None = None


TIME_CASES: dict[str, TimeCase] = {  # in order, on one mount: each case has entries of its own
    "read": TimeCase("docs/readme.txt", read_with(os.O_RDONLY)),
    "read O_NOATIME": TimeCase("data/sparse.img", read_with(os.O_RDONLY | os.O_NOATIME)),
    "listdir": TimeCase("docs", read_with(os.O_RDONLY | os.O_DIRECTORY)),
    "readlink": TimeCase("links/dangling", os.readlink, setup=age_link),
    "write small": TimeCase("data/medium.bin", pwrite_at(5000), ("data",)),
    "write big": TimeCase("data/big.bin", pwrite_at(3 * MiB), ("nested/big.hardlink",)),
    "truncate": TimeCase("nested/a/file.txt", lambda p: os.truncate(p, 3)),
    "open O_TRUNC": TimeCase("bin/tool", lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))),
    "chmod": TimeCase("bin/script.sh", lambda p: os.chmod(p, 0o700)),
    "chown": TimeCase("private/secret", lambda p: os.chown(p, 0, 0)),
    "setxattr": TimeCase("misc", lambda p: os.setxattr(p, b"user.new", b"v")),
    "removexattr": TimeCase("docs/readme.txt", lambda p: os.removexattr(p, b"user.comment")),
    "utime now": TimeCase("docs/notes.md", lambda p: os.utime(p)),
    "rename": TimeCase(
        "nested/a/b/c/deep.txt", lambda p: os.rename(p, p.parents[3] / "deep.txt"), ("nested/a/b/c", "nested/a")
    ),
    "link": TimeCase("data/hl1.txt", lambda p: os.link(p, p.parents[1] / "bin/hl"), ("bin", "data")),
    "unlink": TimeCase("docs/empty", os.unlink, ("docs",)),
    "mkdir": TimeCase("emptydir", lambda p: os.mkdir(p / "new")),
    "rmdir": TimeCase("nested/a/b/c", os.rmdir, ("nested/a/b",)),  # emptied by "rename"
}


def file_times(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


def changed_times(root: Path, case: TimeCase) -> set[str]:
    """Which of atime/mtime/ctime (a/m/c) of the target and the watched paths the action changed."""
    if case.setup is not None:
        case.setup(root / case.target)
    names = (case.target, *case.watched)
    fds = [os.open(root / name, os.O_PATH | os.O_NOFOLLOW) for name in names]
    try:
        before = [file_times(fd) for fd in fds]
        clock_passes(ns for times in before for ns in times)
        case.action(root / case.target)
        after = [file_times(fd) for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
    return {
        f"{name}.{kind}"
        for name, b, a in zip(names, before, after, strict=True)
        for kind, x, y in zip("amc", b, a, strict=True)
        if x != y
    }


def compare_time_cases(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory, cases: dict[str, TimeCase]) -> None:
    baseline = freeze(lower, kernel_tmpfs)
    mount = overlay(mmfs_factory, lower)
    problems = []
    for name, case in cases.items():
        want, got = changed_times(kernel_tmpfs, case), changed_times(mount.path, case)
        if want != got:
            problems.append(f"{name}: tmpfs changed {sorted(want)}, mmfs changed {sorted(got)}")
    assert not problems, "\n".join(problems)
    finish(mount, baseline)


def test_lower_entries_change_times_like_tmpfs(lower: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """Reads, O_NOATIME reads, readlink, writes, renames...: the same times change as on the aged tmpfs copy."""
    compare_time_cases(lower, kernel_tmpfs, mmfs_factory, TIME_CASES)


# Not tested: getdents on a directory opened with O_NOATIME.  tmpfs leaves its
# atime alone; mmfs cannot, because pyfuse3's opendir() does not pass the open
# flags, so the daemon updates a directory's atime (relatime) on every listing.
# The README lists this difference.
