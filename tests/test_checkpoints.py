"""Checkpoints and rollback on real mounts (issue 14), against kernel tmpfs
wherever it can be the oracle.  (The model alone: test_checkpoint_model.py.)

* Differential: the random operations of test_differential.py on kernel tmpfs
  and on mmfs, with checkpoint actions drawn among them: take one, roll back
  to any (older ones too), delete one.  Kernel tmpfs has no checkpoints, so
  its stand-in is a copy of the tree on another kernel tmpfs, put back on a
  rollback (``copy_tree``).  Every result and every tree after a rollback
  must match; mmfs must also give back its own inode numbers and mtimes and
  ctimes, which a copy cannot keep.
* Exact restoration of every kind of file, every attribute, all three
  timestamps and the inode numbers, in both modes.
* What the kernel caches (names, negative entries, attributes, pages, a
  working directory, a mapping) never shows anything stale after a rollback.
* Isolation, open files, concurrent writers, memory accounting, errors,
  ``mmfs diff --since`` and ``mmfs reset``.

Control requests go in process (``mmfs.control.call``): each CLI call costs
about 0.15 s, so the CLI runs only where its output is under test.
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import Mount, mmfs_command, mounted_kernel_tmpfs, read_uncached, wait_for
from support.differential import D, Generators, Op, Side, mismatch, operations, run
from support.syscalls import errno_of, linkat_fd
from support.trees import ALL_STATS, SHARED_STATS, compare_trees, differences, file_digest, link_groups, scan, snapshot
from test_differential import GENERATORS, TmpfsDraw, listings
from test_overlay import GENERATORS as OVERLAY_GENERATORS
from test_overlay import OverlayDraw, freeze
from test_overlay import build_lower as build_overlay_lower

from mmfs import control
from mmfs.options import UsageError

Factory = Callable[..., Mount]
KiB, MiB = 1 << 10, 1 << 20
PAGE = mmap.PAGESIZE
SLOT = 64 * KiB  # mmfs's storage slot: the most a first write after a checkpoint may copy
OLD_NS = 1_000_000_000 * 10**9  # September 2001: older than a day, so relatime updates atimes


# --- helpers -------------------------------------------------------------------------
def request(mnt: Path | bytes, op: str, **fields: Any) -> dict[str, Any]:
    """One control request to the mount's daemon, from this process."""
    return control.call(os.fsdecode(mnt), {"op": op, **fields})


def checkpoints_of(mnt: Path) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in request(mnt, "checkpoints")["checkpoints"]}


def bytes_used(mnt: Path) -> int:
    return int(request(mnt, "status")["bytes_used"])


def df_used(mnt: Path) -> int:
    """Bytes in use as df shows them."""
    vfs = os.statvfs(mnt)
    return (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize


def mmfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mmfs_command(*map(str, args)), capture_output=True, text=True, timeout=60)


def succeeds(*args: str | Path) -> str:
    done = mmfs(*args)
    assert done.returncode == 0 and not done.stderr, done
    return done.stdout


def one_line_error(*args: str | Path) -> str:
    """Run the CLI, which must fail with exit 1 and one line on stderr; that line."""
    done = mmfs(*args)
    assert done.returncode == 1 and not done.stdout, done
    assert re.match(r"mmfs( \w+)?: ", done.stderr) and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def write(path: Path | bytes, data: bytes, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# --- 1. differential -------------------------------------------------------------------
# Kernel tmpfs's stand-in for a checkpoint is a copy of its tree on another
# kernel tmpfs, copied back over the tree on a rollback.  Neither cp -a nor
# rsync -aHAX fits: both create a directory's entries in their own order
# (rsync by name), so the copy would list in another order than the original
# (tmpfs lists newest first), while mmfs gives back each directory's order
# and the random operations compare listings in getdents order.  copy_tree
# creates entries oldest first, so the copy lists as the original does; it
# keeps holes page by page (SEEK_DATA, so st_blocks agree), hard links, owners,
# modes, xattrs (ACLs are xattrs), atimes and mtimes.  It cannot keep ctimes
# or inode numbers, so those are compared on the mmfs side alone: against the
# mmfs tree as it was when the checkpoint was taken.
def copy_tree(source: bytes, target: bytes) -> None:
    """Make the existing, empty directory ``target`` a copy of the tree at ``source``."""
    copy_entries(source, target, {})
    copy_attributes(source, target, os.lstat(source))


def copy_entries(source: bytes, target: bytes, made: dict[int, bytes]) -> None:
    for name in reversed(os.listdir(source)):  # oldest first: the copy lists newest first as well
        copy_entry(source + b"/" + name, target + b"/" + name, made)


def copy_entry(source: bytes, target: bytes, made: dict[int, bytes]) -> None:
    """One entry (a directory with its entries); a file already copied is linked."""
    st = os.lstat(source)
    if not stat.S_ISDIR(st.st_mode) and st.st_ino in made:
        os.link(made[st.st_ino], target)
        return
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(target, 0o700)
        copy_entries(source, target, made)
    elif stat.S_ISREG(st.st_mode):
        copy_bytes(source, target)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    else:
        os.mknod(target, st.st_mode, st.st_rdev)
    made[st.st_ino] = target
    copy_attributes(source, target, st)


def copy_bytes(source: bytes, target: bytes) -> None:
    """A regular file's bytes, its holes left holes."""
    src = os.open(source, os.O_RDONLY | os.O_NOATIME)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size, offset = os.fstat(src).st_size, 0
        while offset < size:
            try:
                offset = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise
                break  # only a hole is left
            end = os.lseek(src, offset, os.SEEK_HOLE)
            os.pwrite(dst, os.pread(src, end - offset, offset), offset)
            offset = end
        os.ftruncate(dst, size)
    finally:
        os.close(src)
        os.close(dst)


def copy_attributes(source: bytes, target: bytes, st: os.stat_result) -> None:
    """Owner, xattrs, mode, then times: chown clears setuid bits, an ACL sets mode bits."""
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    for name in os.listxattr(target, follow_symlinks=False):
        os.removexattr(target, name, follow_symlinks=False)
    for name in os.listxattr(source, follow_symlinks=False):
        os.setxattr(target, name, xattr_value(source, name), follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def xattr_value(path: bytes, name: str) -> bytes:
    """An xattr's value; an empty security.capability, which reads as EINVAL, is empty."""
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as error:
        if error.errno == errno.EINVAL and name == "security.capability":
            return b""
        raise


def empty(root: bytes) -> None:
    for name in os.listdir(root):
        path = root + b"/" + name
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


class TmpfsCheckpoints:
    """Checkpoints of a kernel tmpfs tree: copies of it in ``store``."""

    def __init__(self, side: Side, store: Path) -> None:
        self.side, self.store = side, bytes(store)

    def checkpoint(self, name: str) -> None:
        os.mkdir(self.copy(name))
        copy_tree(self.side.root, self.copy(name))

    def rollback(self, name: str) -> None:
        empty(self.side.root)
        copy_entries(self.copy(name), self.side.root, {})
        copy_attributes(self.copy(name), self.side.root, os.lstat(self.copy(name)))

    def delete(self, name: str) -> None:
        shutil.rmtree(self.copy(name))

    def copy(self, name: str) -> bytes:
        return self.store + b"/" + name.encode()


# What mmfs must give back that the tmpfs copy cannot: inode numbers, mtimes, ctimes.
OWN_STATS = (*SHARED_STATS, "ino", "mtime_ns", "ctime_ns")
# Overlay mode: the snapshot of the tree as taken looks up lower files that the
# checkpoint had not listed yet, so they get their numbers after it; one that
# is then deleted and freed gets a new number when the rollback lists it again.
OWN_OVERLAY_STATS = (*SHARED_STATS, "mtime_ns", "ctime_ns")


class MmfsCheckpoints:
    """Checkpoints of an mmfs mount; each remembers the ``stats`` of the tree as taken."""

    def __init__(self, side: Side, stats: tuple[str, ...]) -> None:
        self.side, self.stats = side, stats
        self.taken: dict[str, Any] = {}

    def checkpoint(self, name: str) -> None:
        request(self.side.root, "checkpoint", name=name)
        self.taken[name] = self.state()

    def rollback(self, name: str) -> None:
        request(self.side.root, "rollback", name=name)
        problems = differences(self.taken[name], self.state(), labels=("at the checkpoint", "after the rollback"))
        assert not problems, f"rollback to {name}:\n" + "\n".join(problems[:20])

    def delete(self, name: str) -> None:
        request(self.side.root, "delete-checkpoint", name=name)
        del self.taken[name]

    def state(self) -> Any:
        return snapshot(self.side.root, stats=self.stats, target=False, xattrs=False)


ACTIONS = ("checkpoint", "rollback", "delete")
ACTION_CHANCE = 0.07


def with_checkpoints(draw: D, generators: Generators[D], steps: int, names: list[str]) -> Iterator[Op]:
    """test_differential's random operations, with a checkpoint action after
    about one in 14: take a new checkpoint, roll back to any existing one, or
    delete one.  ``names`` holds the existing checkpoints, oldest first."""
    numbers = itertools.count()
    for op in operations(draw, generators, steps):
        yield op
        if draw.random() >= ACTION_CHANCE:
            continue
        action = draw.choices(ACTIONS, weights=(3, 4, 1))[0] if names else "checkpoint"
        if action == "checkpoint":
            names.append(f"c{next(numbers)}")
            yield Op(action, (names[-1],))
        elif action == "rollback":
            yield Op(action, (draw.choice(names),))
        else:
            yield Op(action, (names.pop(draw.randrange(len(names))),))


def compare_sides(oracle: Side, subject: Side, label: str) -> None:
    """Equal trees (st_blocks only where results hold it: not in overlay mode), listed in the same order."""
    skip = None if oracle.stat_blocks else lambda rel, key: key == "blocks"
    compare_trees(oracle.root, subject.root, label, skip=skip)
    assert listings(oracle.root) == listings(subject.root), f"{label}: listing orders differ"


Keepers = tuple[TmpfsCheckpoints, MmfsCheckpoints]


def act(oracle: Side, subject: Side, keepers: Keepers, op: Op, label: str) -> None:
    """A checkpoint action on both sides.  A rollback closes every descriptor
    first: on tmpfs the copied tree is new files, so a descriptor would keep
    the old one, where mmfs restores the file under its holder (tested below)."""
    if op.name == "rollback":
        oracle.close_all()
        subject.close_all()
    for keeper in keepers:
        getattr(keeper, op.name)(*op.args)
    if op.name == "rollback":
        compare_sides(oracle, subject, label)


def run_with_checkpoints(oracle: Side, subject: Side, keepers: Keepers, ops: Iterator[Op], seed: int) -> list[Op]:
    """Run the operations on both sides; the checkpoint actions done."""
    history: list[Op] = []
    try:
        for step, op in enumerate(ops):
            history.append(op)
            if op.name in ACTIONS:
                act(oracle, subject, keepers, op, f"seed {seed} step {step}: {op}")
            elif op.stays_inside(oracle, subject):
                want, got = run(oracle, op), run(subject, op)
                assert want == got, mismatch(seed, step, history, want, got)
    finally:
        oracle.close_all()
        subject.close_all()
    return [op for op in history if op.name in ACTIONS]


def random_run(oracle: Side, subject: Side, store: Path, ops: Callable[[list[str]], Iterator[Op]], seed: int) -> None:
    """The operations and actions, then each checkpoint left rolled back to, newest first."""
    names: list[str] = []
    own = OWN_STATS if oracle.stat_blocks else OWN_OVERLAY_STATS
    keepers = (TmpfsCheckpoints(oracle, store), MmfsCheckpoints(subject, own))
    actions = run_with_checkpoints(oracle, subject, keepers, ops(names), seed)
    compare_sides(oracle, subject, f"seed {seed}: the end")
    assert sorted(checkpoints_of(Path(os.fsdecode(subject.root)))) == sorted(names)
    assert sum(op.name == "rollback" for op in actions) >= 3, actions
    for name in reversed(names):  # every checkpoint left is still as it was taken
        act(oracle, subject, keepers, Op("rollback", (name,)), f"seed {seed}: rollback to {name} at the end")


SEEDS = range(8)
OVERLAY_SEEDS = range(3)
STEPS = 300
OVERLAY_STEPS = 200  # LOWERDIR's files are larger: each comparison takes longer


@pytest.mark.parametrize("seed", SEEDS)
def test_random_operations_with_checkpoints_match_tmpfs(
    seed: int, kernel_tmpfs: Path, mnt: Path, tmp_path: Path
) -> None:
    oracle, subject = Side(kernel_tmpfs), Side(mnt)
    with mounted_kernel_tmpfs(tmp_path / "copies", "size=1g") as store:
        random_run(oracle, subject, store, partial(with_checkpoints, TmpfsDraw(seed, oracle), GENERATORS, STEPS), seed)


@pytest.mark.parametrize("seed", OVERLAY_SEEDS)
def test_random_overlay_operations_with_checkpoints_match_a_tmpfs_copy(
    seed: int, kernel_tmpfs: Path, mmfs_factory: Factory, tmp_path: Path
) -> None:
    """Overlay mode: test_overlay.py's operations, over LOWERDIR's names and new
    ones; the oracle starts as a cp -a copy of LOWERDIR on kernel tmpfs."""
    lower = tmp_path / "lower"
    build_overlay_lower(lower)
    baseline = freeze(lower, kernel_tmpfs)
    mnt = mmfs_factory("overlay", str(lower)).path
    oracle, subject = Side(kernel_tmpfs, stat_blocks=False), Side(mnt, stat_blocks=False)
    draw = OverlayDraw(seed, oracle)
    with mounted_kernel_tmpfs(tmp_path / "copies", "size=1g") as store:
        random_run(oracle, subject, store, partial(with_checkpoints, draw, OVERLAY_GENERATORS, OVERLAY_STEPS), seed)
    baseline.check()


# --- 2. exact restoration ------------------------------------------------------------------
def setfacl(*args: str | Path) -> None:
    subprocess.run(["setfacl", *map(str, args)], check=True)


def build_every_kind(root: Path) -> None:
    """Every kind of file with odd attributes: holes, hard links, a symlink, a
    FIFO, devices, a socket, xattrs, ACLs, setuid and sticky modes, other owners,
    times set long ago."""
    (root / "dir").mkdir()
    write(root / "dir/sparse", b"head")
    write(root / "dir/sparse", b"middle", MiB + 100)
    os.truncate(root / "dir/sparse", 3 * MiB)
    write(root / "big", random.Random(1).randbytes(300 * KiB))  # several slots
    os.link(root / "dir/sparse", root / "hard")
    os.symlink("dir/sparse", root / "link")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "block", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mknod(root / "socket", stat.S_IFSOCK | 0o755)
    (root / "sticky").mkdir()
    os.setxattr(root / "big", "user.note", b"value")
    os.setxattr(root / "dir/sparse", "trusted.t", b"\0\1\2")
    os.setxattr(root / "dir", "user.d", b"")
    setfacl("-m", "u:1000:rw,g:100:r", root / "big")
    setfacl("-d", "-m", "u:1000:rwx", root / "dir")
    os.chown(root / "big", 1000, 100)
    os.chown(root / "link", 1000, 1000, follow_symlinks=False)
    os.chmod(root / "dir/sparse", 0o4755)
    os.chmod(root / "sticky", 0o1777)
    for n, path in enumerate(["big", "hard", "fifo", "null", "block", "socket", "link", "dir", "sticky", ""]):
        os.utime(root / path, ns=(OLD_NS + n, OLD_NS + 10**9 * n), follow_symlinks=False)


def change_everything(root: Path) -> None:
    """Change every file ``build_every_kind`` made, and add some."""
    write(root / "big", b"changed", 70 * KiB)
    os.pread(fd := os.open(root / "big", os.O_RDONLY), 10, 0)  # a read: a new atime
    os.close(fd)
    os.truncate(root / "hard", 10)
    os.unlink(root / "hard")
    os.rename(root / "link", root / "link2")
    os.symlink("big", root / "link")
    os.unlink(root / "fifo")
    (root / "fifo").mkdir()
    os.chmod(root / "null", 0o600)
    os.chown(root / "block", 2, 2)
    os.setxattr(root / "big", "user.note", b"other")
    os.removexattr(root / "dir/sparse", "trusted.t")
    setfacl("-b", root / "big")
    shutil.rmtree(root / "dir")
    (root / "dir").mkdir()
    write(root / "dir/sparse", b"not the same file")
    os.unlink(root / "socket")
    os.utime(root / "sticky", ns=(5, 6))
    (root / "new").write_bytes(b"new" * 5000)


def build_lower(lower: Path) -> None:
    """A LOWERDIR with a small file, a large one (mapped on its first write),
    a hard-linked pair and a directory."""
    (lower / "lowdir/sub").mkdir(parents=True)
    (lower / "lowfile").write_bytes(b"low" * 100)
    (lower / "lowbig").write_bytes(random.Random(2).randbytes(MiB))
    (lower / "lowdir/sub/x").write_bytes(b"x")
    os.link(lower / "lowfile", lower / "lowdir/twin")


def change_lower_files(root: Path) -> None:
    write(root / "lowbig", b"written", 300 * KiB)
    write(root / "lowfile", b"LOW")
    os.unlink(root / "lowdir/twin")
    shutil.rmtree(root / "lowdir/sub")
    os.chmod(root / "lowdir", 0o700)


def lower_state(lower: Path) -> Any:
    return snapshot(lower, stats=ALL_STATS, content=file_digest, target=False)


@pytest.fixture(params=["tmpfs", "overlay"])
def any_mount(request: pytest.FixtureRequest, mmfs_factory: Factory, tmp_path: Path) -> Iterator[Path]:
    """An mmfs mount of either mode; in overlay mode over build_lower's LOWERDIR,
    which must be unchanged at the end."""
    if request.param == "tmpfs":
        yield mmfs_factory("tmpfs").path
        return
    lower = tmp_path / "lower"
    build_lower(lower)
    before = lower_state(lower)
    yield mmfs_factory("overlay", str(lower)).path
    assert not differences(before, lower_state(lower)), "LOWERDIR changed"


def exact_state(root: Path, paths: list[bytes]) -> Any:
    """Everything of each path, atimes and ctimes and inode numbers included;
    the paths only looked up (listing a directory may change its atime)."""
    return snapshot(root, paths, stats=ALL_STATS, content=file_digest)


def test_rollback_restores_every_kind_exactly(any_mount: Path) -> None:
    mnt = any_mount
    build_every_kind(mnt)
    overlay = (mnt / "lowfile").exists()
    paths = scan(mnt)
    links = link_groups(mnt)
    files = len({os.lstat(mnt / os.fsdecode(path)).st_ino for path in paths})
    out = succeeds("checkpoint", mnt, "start")
    assert out.startswith(f"checkpoint start of {mnt}: {files} files in ") and out.endswith(" s\n"), out
    before = exact_state(mnt, paths)  # lstats first: what the checkpoint holds
    change_everything(mnt)
    if overlay:
        change_lower_files(mnt)
    succeeds("rollback", mnt, "start")
    after = exact_state(mnt, paths)
    assert not differences(before, after), "\n".join(differences(before, after))
    assert scan(mnt) == paths and link_groups(mnt) == links


# --- 3. what the kernel caches ------------------------------------------------------------
def test_a_holder_reads_the_checkpoint_bytes_through_its_descriptor_and_its_mapping(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"a" * 3 * PAGE)
    request(mnt, "checkpoint", name="c")
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 3 * PAGE, mmap.MAP_SHARED) as mapping:
            os.pwrite(fd, b"b" * 3 * PAGE, 0)
            assert mapping[:] == b"b" * 3 * PAGE and os.pread(fd, 3 * PAGE, 0) == b"b" * 3 * PAGE
            ino = os.fstat(fd).st_ino
            request(mnt, "rollback", name="c")
            assert os.pread(fd, 3 * PAGE, 0) == b"a" * 3 * PAGE
            assert mapping[:] == b"a" * 3 * PAGE
            assert os.fstat(fd).st_ino == ino == path.stat().st_ino
            mapping[:1] = b"m"  # the holder writes on, into the file of the tree
            mapping.flush()
        os.pwrite(fd, b"w", 1)
    finally:
        os.close(fd)
    assert read_uncached(path) == b"mw" + b"a" * (3 * PAGE - 2)


def test_writes_through_a_mapping_count_from_when_they_were_made(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"a" * 2 * PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 2 * PAGE, mmap.MAP_SHARED) as mapping:
            mapping[:6] = b"before"  # not flushed
            request(mnt, "checkpoint", name="c")
            mapping[PAGE : PAGE + 5] = b"after"  # not flushed either
            request(mnt, "rollback", name="c")
            held = mapping[:]
    finally:
        os.close(fd)
    expected = b"before" + b"a" * (2 * PAGE - 6)
    assert (held, read_uncached(path)) == (expected, expected)


@pytest.mark.parametrize("options", ["size=1g", "size=1g,noatime"])  # noatime: a new mtime drops no page
def test_the_page_cache_never_serves_bytes_written_after_the_checkpoint(mmfs_factory: Factory, options: str) -> None:
    path = mmfs_factory("tmpfs", options=options).path / "f"
    path.write_bytes(b"old" * 10_000)
    assert path.read_bytes() == b"old" * 10_000
    request(path.parent, "checkpoint", name="c")
    path.write_bytes(b"new" * 10_000)
    assert path.stat().st_size == 30_000 and path.read_bytes() == b"new" * 10_000  # attributes and pages cached
    request(path.parent, "rollback", name="c")
    assert path.read_bytes() == b"old" * 10_000


HOLDER = """
import errno, json, os, sys
os.chdir(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
def outcome(action):
    try:
        return action()
    except OSError as error:
        return errno.errorcode[error.errno]
print(json.dumps({
    "getcwd": outcome(os.getcwd),
    "listdir": outcome(lambda: os.listdir(".")),
    "create": outcome(lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644))),
    "mkdir": outcome(lambda: os.mkdir("sub")),
    "nlink": outcome(lambda: os.stat(".").st_nlink),
}))
"""


def in_removed_directory(directory: Path, remove: Callable[[], object]) -> dict[str, Any]:
    """What a process whose working directory is ``directory`` sees once ``remove`` ran."""
    command = [sys.executable, "-c", HOLDER, str(directory)]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        try:
            assert holder.stdout.readline() == "ready\n"
            remove()
            holder.stdin.write("go\n")
            holder.stdin.flush()
            return dict(json.loads(holder.stdout.readline()))
        finally:
            holder.kill()


def test_a_working_directory_made_after_the_checkpoint_is_gone_as_after_rm_r(mnt: Path, kernel_tmpfs: Path) -> None:
    for root in (kernel_tmpfs, mnt):
        (root / "kept").mkdir()
    request(mnt, "checkpoint", name="c")
    results = {}
    for root, remove in (
        (kernel_tmpfs, lambda: shutil.rmtree(kernel_tmpfs / "kept/made")),
        (mnt, lambda: request(mnt, "rollback", name="c")),
    ):
        (root / "kept/made/inner").mkdir(parents=True)
        (root / "kept/made/file").write_bytes(b"x")
        results[root] = in_removed_directory(root / "kept/made", remove)
    assert results[mnt] == results[kernel_tmpfs]
    assert results[mnt]["getcwd"] == "ENOENT"
    assert os.listdir(mnt / "kept") == []


def test_names_and_negative_entries_follow_the_rollback(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "d/was").write_bytes(b"was")
    (mnt / "replaced").write_bytes(b"file")
    ino = (mnt / "replaced").stat().st_ino
    assert errno_of(lambda: os.stat(mnt / "d/born")) == errno.ENOENT  # a negative entry, cached
    request(mnt, "checkpoint", name="c")
    (mnt / "d/born").write_bytes(b"born")
    os.unlink(mnt / "d/was")
    os.unlink(mnt / "replaced")
    (mnt / "replaced").mkdir()
    assert (mnt / "d/born").stat().st_size == 4  # cached as existing
    assert errno_of(lambda: os.stat(mnt / "d/was")) == errno.ENOENT  # cached as missing
    assert (mnt / "replaced").is_dir()
    request(mnt, "rollback", name="c")
    assert errno_of(lambda: os.stat(mnt / "d/born")) == errno.ENOENT
    assert (mnt / "d/was").read_bytes() == b"was"
    assert (mnt / "replaced").read_bytes() == b"file" and (mnt / "replaced").stat().st_ino == ino
    assert sorted(os.listdir(mnt / "d")) == ["was"]


def test_attributes_follow_the_rollback_at_once(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"12345")
    os.utime(path, ns=(OLD_NS, OLD_NS))
    was = path.stat()
    request(mnt, "checkpoint", name="c")
    os.chmod(path, 0o600)
    os.chown(path, 1000, 1000)
    os.truncate(path, 1)
    now = path.stat()  # cached as changed
    assert (now.st_mode, now.st_uid, now.st_size) == (stat.S_IFREG | 0o600, 1000, 1)
    request(mnt, "rollback", name="c")
    st = path.stat()
    assert (st.st_mode, st.st_uid, st.st_gid, st.st_size) == (was.st_mode, was.st_uid, was.st_gid, 5)
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns) == (was.st_atime_ns, was.st_mtime_ns, was.st_ctime_ns)


# --- 4. isolation ---------------------------------------------------------------------------
def full_state(root: Path) -> Any:
    return snapshot(root, stats=(*SHARED_STATS, "ino", "mtime_ns"), content=file_digest)


def scribble(root: Path, seed: int) -> None:
    """Overwrite, extend, truncate, map, delete and add, differently for each seed."""
    rng = random.Random(seed)
    for name in ("a", "b", "big"):
        write(root / name, rng.randbytes(rng.randrange(1, 3 * SLOT)), rng.randrange(2 * SLOT))
    fd = os.open(root / "big", os.O_RDWR)
    try:
        with mmap.mmap(fd, SLOT, mmap.MAP_SHARED) as mapping:
            mapping[100:200] = rng.randbytes(100)
            mapping.flush()
    finally:
        os.close(fd)
    os.truncate(root / "a", rng.randrange(SLOT))
    os.unlink(root / "b")
    (root / f"new{seed}").write_bytes(rng.randbytes(1000))


def test_writes_after_a_checkpoint_or_a_rollback_never_change_it(mnt: Path) -> None:
    for name in ("a", "b"):
        (mnt / name).write_bytes(name.encode() * 5000)
    write(mnt / "big", random.Random(0).randbytes(4 * SLOT))
    held = os.open(mnt / "big", os.O_RDWR)  # open across the checkpoint: its writes too
    try:
        request(mnt, "checkpoint", name="one")
        one = full_state(mnt)
        os.pwrite(held, b"x" * SLOT, SLOT // 2)
        scribble(mnt, 1)
        request(mnt, "checkpoint", name="two")
        two = full_state(mnt)
        for seed, name in enumerate(("one", "two", "one", "one", "two"), start=2):
            request(mnt, "rollback", name=name)
            assert full_state(mnt) == (one if name == "one" else two), f"rollback {seed - 1} to {name}"
            os.pwrite(held, b"y" * SLOT, seed * 1000)
            scribble(mnt, seed)
    finally:
        os.close(held)
    request(mnt, "rollback", name="one")
    assert full_state(mnt) == one


# --- 5. files open at the rollback ---------------------------------------------------------------
def test_a_file_born_after_the_checkpoint_lives_on_unlinked_under_its_holder(mnt: Path) -> None:
    baseline = bytes_used(mnt)
    request(mnt, "checkpoint", name="c")
    fd = os.open(mnt / "born", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * SLOT)
        request(mnt, "rollback", name="c")
        assert not (mnt / "born").exists() and os.listdir(mnt) == []
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 10, 0) == b"x" * 10
        assert os.pwrite(fd, b"more", SLOT) == 4 and os.fstat(fd).st_size == SLOT + 4
        assert os.pread(fd, 4, SLOT) == b"more"
        assert errno_of(lambda: linkat_fd(fd, mnt / "again")) == errno.ENOENT  # as for any unlinked file
        assert bytes_used(mnt) > baseline
    finally:
        os.close(fd)
    assert wait_for(lambda: bytes_used(mnt) == baseline), "the unlinked file was not freed at its last close"


def test_a_file_deleted_after_the_checkpoint_comes_back_under_its_holder(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"checkpoint")
    ino = (mnt / "f").stat().st_ino
    fd = os.open(mnt / "f", os.O_RDWR)
    try:
        request(mnt, "checkpoint", name="c")
        os.pwrite(fd, b"CHANGED!!!", 0)
        os.unlink(mnt / "f")
        assert os.fstat(fd).st_nlink == 0
        request(mnt, "rollback", name="c")
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_ino) == (1, ino) and (mnt / "f").stat().st_ino == ino
        assert os.pread(fd, 100, 0) == b"checkpoint"
        os.pwrite(fd, b"C", 0)
        assert (mnt / "f").read_bytes() == b"Checkpoint"
    finally:
        os.close(fd)


def test_a_lower_file_first_opened_after_the_checkpoint_is_restored_under_its_holder(
    mmfs_factory: Factory, tmp_path: Path
) -> None:
    """Overlay mode: the file existed at the checkpoint (in LOWERDIR), though
    nothing had looked it up yet; its holder must see the checkpoint's bytes."""
    lower = tmp_path / "lower"
    (lower / "d").mkdir(parents=True)
    (lower / "d/f").write_bytes(b"lower")
    mnt = mmfs_factory("overlay", str(lower)).path
    request(mnt, "checkpoint", name="c")  # nothing looked up yet: the root not even listed
    fd = os.open(mnt / "d/f", os.O_RDWR)
    try:
        ino = os.fstat(fd).st_ino
        os.pwrite(fd, b"LOWER", 0)
        request(mnt, "rollback", name="c")
        assert (mnt / "d/f").read_bytes() == b"lower"
        assert (os.fstat(fd).st_nlink, (mnt / "d/f").stat().st_ino) == (1, ino)
        assert os.pread(fd, 10, 0) == b"lower"
    finally:
        os.close(fd)
    assert (lower / "d/f").read_bytes() == b"lower"


# --- 6. concurrent writers -------------------------------------------------------------------
BLOCK = 4 * KiB
BLOCKS = 64  # 4 slots, each shared by every writer
WRITERS = 4
WRITES_BETWEEN = 2 * BLOCKS  # at least, between two checkpoint requests
RECORD = struct.Struct("<II")  # block number, generation: a block is one record repeated
NEVER = float("-inf")


def pattern(block: int, generation: int) -> bytes:
    return RECORD.pack(block, generation) * (BLOCK // RECORD.size)


def generation_of(data: bytes, block: int) -> int | None:
    """The generation a block holds, or None if it is torn (or another block's)."""
    found, generation = RECORD.unpack_from(data)
    return generation if found == block and data == pattern(block, generation) else None


@dataclass(frozen=True)
class Write:
    block: int
    generation: int
    began: float
    ended: float


@dataclass(frozen=True)
class Event:
    """A checkpoint taken or a rollback to ``name``, somewhere between ``began`` and ``ended``."""

    kind: str
    name: str
    began: float
    ended: float


def writer(path: Path, blocks: range, stop: threading.Event, log: list[Write]) -> None:
    """Write each of ``blocks`` whole, generation after generation, until stopped."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for generation in itertools.count(1):
            for block in blocks:
                began = time.monotonic()
                os.pwrite(fd, pattern(block, generation), block * BLOCK)
                log.append(Write(block, generation, began, time.monotonic()))
            if stop.is_set():
                return
    finally:
        os.close(fd)


def reader(path: Path, stop: threading.Event, torn: list[int]) -> None:
    """Read the whole file over and over, O_DIRECT, and note every torn block.
    Through the page cache a read may see a page half copied by a concurrent
    write(2) on any filesystem; O_DIRECT reads what the daemon answers."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, BLOCKS * BLOCK) as buffer:  # page-aligned
            while not stop.wait(0.002):  # a pause: the writers wait while it reads
                assert os.preadv(fd, [buffer], 0) == BLOCKS * BLOCK
                data = buffer[:]
                torn += [b for b in range(BLOCKS) if generation_of(data[b * BLOCK : (b + 1) * BLOCK], b) is None]
    finally:
        os.close(fd)


def possible(writes: list[Write], since: tuple[float, float, int], at: tuple[float, float]) -> set[int]:
    """The generations a block may hold at an instant within ``at``, when the
    last rollback (within since[:2]) gave it generation since[2]: the last
    write served between the two instants, or the rolled-back one if none was.
    A write is served at an instant between its call and its return."""
    rolled_began, rolled_ended, restored = since
    began, ended = at
    surely_between = [w.generation for w in writes if w.began > rolled_ended and w.ended < began]
    maybe_between = {w.generation for w in writes if w.ended > rolled_began and w.began < ended}
    if surely_between:
        return {g for g in maybe_between if g >= max(surely_between)}
    return maybe_between | {restored}


def blocks_of(data: bytes) -> list[int]:
    generations = [generation_of(data[b * BLOCK : (b + 1) * BLOCK], b) for b in range(BLOCKS)]
    assert None not in generations, f"torn blocks: {[b for b, g in enumerate(generations) if g is None]}"
    return generations  # type: ignore[return-value]


def check_history(
    events: list[Event], writes: list[Write], held: dict[str, list[int]], final: list[int], end: float
) -> None:
    """Every checkpoint holds, and the file finally holds, for each block, a
    generation that the order of calls allows."""
    by_block = {b: [w for w in writes if w.block == b] for b in range(BLOCKS)}
    since = {b: (NEVER, NEVER, 0) for b in range(BLOCKS)}
    for event in events:
        for b in range(BLOCKS):
            if event.kind == "checkpoint":
                allowed = possible(by_block[b], since[b], (event.began, event.ended))
                assert held[event.name][b] in allowed, f"{event}: block {b} holds {held[event.name][b]}, not {allowed}"
            else:
                since[b] = (event.began, event.ended, held[event.name][b])
    for b in range(BLOCKS):
        allowed = possible(by_block[b], since[b], (end, end))
        assert final[b] in allowed, f"at the end block {b} holds {final[b]}, not {allowed}"
    written_after = [b for b in range(BLOCKS) if by_block[b] and by_block[b][-1].began > since[b][1]]
    assert written_after, "no block was written after the last rollback: the test proves little"


def writes_go_on(writes: list[Write]) -> None:
    """Wait until the writers have written WRITES_BETWEEN blocks more."""
    written = len(writes)
    assert wait_for(lambda: len(writes) > written + WRITES_BETWEEN), "the writers stopped writing"


def test_concurrent_writers_across_checkpoints_and_rollbacks(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"".join(pattern(b, 0) for b in range(BLOCKS)))
    stop = threading.Event()
    writes: list[Write] = []
    torn: list[int] = []
    events: list[Event] = []
    threads = [
        threading.Thread(target=writer, args=(path, range(n, BLOCKS, WRITERS), stop, writes)) for n in range(WRITERS)
    ]
    threads.append(threading.Thread(target=reader, args=(path, stop, torn)))
    for thread in threads:
        thread.start()
    try:
        for cycle in range(6):
            for kind, name in (("checkpoint", f"c{cycle}"), ("rollback", f"c{cycle - cycle % 2}")):
                writes_go_on(writes)
                began = time.monotonic()
                request(mnt, kind, name=name)
                events.append(Event(kind, name, began, time.monotonic()))
        writes_go_on(writes)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    end = time.monotonic()
    final = blocks_of(read_uncached(path))
    held = {}
    for event in events:
        if event.kind == "checkpoint":
            request(mnt, "rollback", name=event.name)
            held[event.name] = blocks_of(read_uncached(path))
    assert not torn, f"{len(torn)} torn blocks read, e.g. {torn[:10]}"
    check_history(events, writes, held, final, end)


# --- 7. memory --------------------------------------------------------------------------
def test_a_checkpoint_shares_every_page_and_its_cost_goes_with_it(mmfs_factory: Factory) -> None:
    mnt = mmfs_factory("tmpfs", options="size=256m,nr_inodes=1000").path
    baseline, df_baseline = bytes_used(mnt), df_used(mnt)
    inodes = request(mnt, "status")["inodes_used"]
    write(mnt / "big", b"\1" * MiB)
    with open(mnt / "big", "r+b") as big:
        for n in range(1, 64):
            big.seek(n * MiB)
            big.write(bytes([n]) * MiB)
    full, rss = bytes_used(mnt), request(mnt, "status")["rss_bytes"]
    assert full == baseline + 64 * MiB

    request(mnt, "checkpoint", name="c")
    assert bytes_used(mnt) == full and df_used(mnt) == df_baseline + 64 * MiB
    assert request(mnt, "status")["rss_bytes"] - rss < 4 * MiB
    assert checkpoints_of(mnt)["c"]["exclusive_bytes"] == 0

    write(mnt / "big", b"!", 32 * MiB + 5)  # one byte: one page or one slot copied, no more
    one_byte = bytes_used(mnt) - full
    assert PAGE <= one_byte <= SLOT, one_byte
    assert PAGE <= checkpoints_of(mnt)["c"]["exclusive_bytes"] <= SLOT

    write(mnt / "big", b"\xff" * 8 * MiB, 8 * MiB)  # overwritten: the old pages are the checkpoint's alone
    assert 8 * MiB <= checkpoints_of(mnt)["c"]["exclusive_bytes"] <= 8 * MiB + 2 * SLOT
    os.unlink(mnt / "big")  # deleted: every page is
    assert checkpoints_of(mnt)["c"]["exclusive_bytes"] == 64 * MiB
    assert bytes_used(mnt) == full and df_used(mnt) == df_baseline + 64 * MiB

    request(mnt, "rollback", name="c")
    assert read_uncached(mnt / "big")[32 * MiB : 32 * MiB + 8] == bytes([32]) * 8
    request(mnt, "checkpoint", name="d")
    os.unlink(mnt / "big")
    for name in ("c", "d"):
        request(mnt, "delete-checkpoint", name=name)
    assert wait_for(lambda: bytes_used(mnt) == baseline), bytes_used(mnt)
    assert df_used(mnt) == df_baseline and request(mnt, "status")["inodes_used"] == inodes


def test_a_write_that_needs_pages_a_checkpoint_holds_may_get_enospc(mmfs_factory: Factory) -> None:
    mnt = mmfs_factory("tmpfs", options="size=8m").path
    data = random.Random(3).randbytes(6 * MiB)
    (mnt / "f").write_bytes(data)
    request(mnt, "checkpoint", name="c")
    fd = os.open(mnt / "f", os.O_WRONLY)
    try:
        assert errno_of(lambda: [os.pwrite(fd, b"\0" * MiB, n * MiB) for n in range(6)]) == errno.ENOSPC
        request(mnt, "delete-checkpoint", name="c")
        for n in range(6):
            assert os.pwrite(fd, b"\0" * MiB, n * MiB) == MiB  # the room is back
    finally:
        os.close(fd)
    assert read_uncached(mnt / "f") == bytes(6 * MiB)


def test_inode_numbers_only_a_checkpoint_holds_count_against_nr_inodes(mmfs_factory: Factory) -> None:
    mnt = mmfs_factory("tmpfs", options="nr_inodes=10").path
    free = os.statvfs(mnt).f_ffree
    for n in range(4):
        (mnt / f"f{n}").write_bytes(b"")
    request(mnt, "checkpoint", name="c")
    for n in range(4):
        os.unlink(mnt / f"f{n}")
    assert os.statvfs(mnt).f_ffree == free - 4  # the checkpoint holds them
    for n in range(free - 4):
        (mnt / f"g{n}").write_bytes(b"")
    assert errno_of(lambda: (mnt / "one-more").write_bytes(b"")) == errno.ENOSPC
    request(mnt, "delete-checkpoint", name="c")
    assert os.statvfs(mnt).f_ffree == 4
    (mnt / "one-more").write_bytes(b"")


def test_the_checkpoints_command_lists_them_oldest_first(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"x" * SLOT)
    began = time.time()
    succeeds("checkpoint", mnt, "first")
    (mnt / "g").write_bytes(b"")
    request(mnt, "checkpoint", name="second")
    os.unlink(mnt / "f")  # its slot is the checkpoints' alone now, shared by both
    listed = json.loads(succeeds("checkpoints", mnt, "--json"))
    assert [entry["name"] for entry in listed] == ["first", "second"]
    assert [entry["files"] for entry in listed] == [2, 3]  # the root counts
    assert all(began - 1 <= entry["taken_at"] <= time.time() for entry in listed)
    assert [set(entry) for entry in listed] == [{"name", "taken_at", "files", "exclusive_bytes"}] * 2
    assert [entry["exclusive_bytes"] for entry in listed] == [0, 0]  # shared by both: neither holds it alone
    lines = succeeds("checkpoints", mnt).splitlines()
    assert [line.split()[0] for line in lines] == ["first", "second"] and "3 files" in lines[1]
    assert succeeds("checkpoint", "--delete", mnt, "first") == f"checkpoint first of {mnt} deleted\n"
    assert checkpoints_of(mnt)["second"]["exclusive_bytes"] == SLOT
    request(mnt, "delete-checkpoint", name="second")
    assert succeeds("checkpoints", mnt) == "" and json.loads(succeeds("checkpoints", mnt, "--json")) == []


# --- 8. errors ------------------------------------------------------------------------------
def test_errors_are_one_line_and_harm_nothing(mnt: Path) -> None:
    (mnt / "f").write_bytes(b"kept")
    succeeds("checkpoint", mnt, "c")
    state = full_state(mnt)
    for args, words in (
        (("rollback", mnt, "nope"), "no checkpoint named 'nope' (there are: c)"),
        (("checkpoint", "--delete", mnt, "nope"), "no checkpoint named 'nope'"),
        (("diff", mnt, "--since", "nope"), "no checkpoint named 'nope'"),
        (("checkpoint", mnt, "c"), "exists already"),
        (("checkpoint", mnt, ""), "needs a name"),
        (("checkpoint", mnt, "a/b"), "bad checkpoint name"),
        (("checkpoint", mnt, "x" * 256), "bad checkpoint name"),
        (("checkpoint", mnt, "new\nline"), "bad checkpoint name"),
        (("reset", mnt), "reset needs overlay mode"),
        (("checkpoint", mnt), "usage: mmfs checkpoint"),
    ):
        assert words in one_line_error(*args), args
    for bad in ({"op": "checkpoint"}, {"op": "checkpoint", "name": 5}, {"op": "rollback", "name": None}):
        with pytest.raises(UsageError, match="needs a name"):
            control.call(str(mnt), bad)
    assert full_state(mnt) == state and list(checkpoints_of(mnt)) == ["c"]
    request(mnt, "rollback", name="c")
    assert (mnt / "f").read_bytes() == b"kept"


# --- 9. mmfs diff --since, mmfs reset ------------------------------------------------------------
def build_diff_base(root: Path) -> None:
    for directory in ("docs", "data", "tree/sub"):
        (root / directory).mkdir(parents=True)
    for name in ("docs/readme", "docs/old.txt", "data/file", "data/meta", "tree/sub/deep", "keep", "read", "same"):
        (root / name).write_bytes(name.encode())
    os.symlink("docs/readme", root / "link")


def change_diff_base(root: Path) -> None:
    """Changes whose lines are DIFF_SINCE; a read and a chmod to the same mode change no line."""
    write(root / "docs/readme", b"README")
    os.link(root / "docs/readme", root / "docs/readme-link")
    os.unlink(root / "docs/old.txt")
    (root / "docs/new.txt").write_bytes(b"new")
    os.chmod(root / "data/file", 0o600)
    os.setxattr(root / "data/meta", "user.x", b"1")
    shutil.rmtree(root / "tree")
    os.unlink(root / "link")
    os.symlink("data/file", root / "link")
    (root / "newdir").mkdir()
    (root / "newdir/x").write_bytes(b"x")
    os.rename(root / "keep", root / "moved")
    assert (root / "read").read_bytes() == b"read"
    os.chmod(root / "same", (root / "same").stat().st_mode)


DIFF_SINCE = """\
M .
M data/file
M data/meta
M docs
A docs/new.txt
D docs/old.txt
M docs/readme
A docs/readme-link
D keep
M link
A moved
A newdir
A newdir/x
D tree
D tree/sub
D tree/sub/deep
"""


def test_diff_since_a_checkpoint_in_tmpfs_mode(mnt: Path) -> None:
    build_diff_base(mnt)
    request(mnt, "checkpoint", name="base")
    assert succeeds("diff", mnt, "--since", "base") == ""
    change_diff_base(mnt)
    assert succeeds("diff", mnt, "--since", "base") == DIFF_SINCE
    as_json = json.loads(succeeds("diff", mnt, "--since=base", "--json"))
    assert [f"{entry['change']} {entry['path']}\n" for entry in as_json] == DIFF_SINCE.splitlines(keepends=True)
    request(mnt, "rollback", name="base")
    assert succeeds("diff", mnt, "--since", "base") == ""


def test_diff_since_a_checkpoint_in_overlay_mode(mmfs_factory: Factory, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    build_diff_base(lower)
    mnt = mmfs_factory("overlay", str(lower)).path
    request(mnt, "checkpoint", name="mounted")
    (mnt / "before").write_bytes(b"made before the checkpoint")
    write(mnt / "data/file", b"F")
    request(mnt, "checkpoint", name="base")
    change_diff_base(mnt)
    assert succeeds("diff", mnt, "--since", "base") == DIFF_SINCE
    # The checkpoint taken at the mount holds LOWERDIR's tree: diff against it is diff against LOWERDIR.
    against_lower = succeeds("diff", mnt)
    assert succeeds("diff", mnt, "--since", "mounted") == against_lower
    assert "A before\n" in against_lower and "M data/file\n" in against_lower


def test_diff_since_is_empty_after_listing_lower_hard_links(mmfs_factory: Factory, tmp_path: Path) -> None:
    """The checkpoint holds LOWERDIR's directory unlisted; listing it changes nothing."""
    lower = tmp_path / "lower"
    (lower / "w").mkdir(parents=True)
    (lower / "w/f").write_bytes(b"f")
    os.link(lower / "w/f", lower / "w/f.link")
    mnt = mmfs_factory("overlay", str(lower)).path
    request(mnt, "checkpoint", name="c")
    assert sorted(os.listdir(mnt / "w")) == ["f", "f.link"]
    assert request(mnt, "diff", since="c")["changes"] == []


# What an overlay mount shows of LOWERDIR's files as LOWERDIR has it: not
# st_blocks (lower pages are not the mount's), nor a directory's size (the disk's
# own); inode numbers are new after a reset (lower files are looked up again,
# and mmfs never reuses a number).
LOWER_STATS = ("type", "mode", "uid", "gid", "nlink", "rdev", "mtime_ns")


def test_reset_goes_back_to_lowerdir_and_keeps_the_checkpoints(mmfs_factory: Factory, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    build_lower(lower)
    before = lower_state(lower)
    mnt = mmfs_factory("overlay", str(lower)).path
    untouched = snapshot(mnt, stats=LOWER_STATS, content=file_digest)
    change_lower_files(mnt)
    (mnt / "added").write_bytes(b"added")
    request(mnt, "checkpoint", name="changed")
    changed, changes = full_state(mnt), succeeds("diff", mnt)
    out = succeeds("reset", mnt)
    assert out.startswith(f"{mnt} shows LOWERDIR as mounted again"), out
    assert succeeds("diff", mnt) == ""
    assert snapshot(mnt, stats=LOWER_STATS, content=file_digest) == untouched
    compare_trees(lower, mnt, "after reset", stats=LOWER_STATS, labels=("LOWERDIR", "mmfs"))
    request(mnt, "rollback", name="changed")
    assert full_state(mnt) == changed and succeeds("diff", mnt) == changes
    assert not differences(before, lower_state(lower)), "LOWERDIR changed"


def test_a_read_only_mount_is_not_rolled_back(mnt: Path) -> None:
    """A rollback changes the tree: refused on a mount made read-only, as every other change is."""
    (mnt / "f").write_bytes(b"checkpoint")
    request(mnt, "checkpoint", name="c")
    (mnt / "f").write_bytes(b"later")
    request(mnt, "remount", read_only=True)
    try:
        with pytest.raises(UsageError, match=r"read-only \(mount -o remount,rw MOUNTPOINT first\)"):
            request(mnt, "rollback", name="c")
        assert (mnt / "f").read_bytes() == b"later"
    finally:
        request(mnt, "remount", read_only=False)
    request(mnt, "rollback", name="c")
    assert (mnt / "f").read_bytes() == b"checkpoint"
