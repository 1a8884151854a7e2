"""The random-operation differential engine: one seeded sequence of system
calls run on a kernel oracle and on an mmfs mount, result for result, errno
for errno.

* ``Side``: one filesystem and the descriptors a sequence holds open on it,
  by slot number.
* ``Op``: one operation, a name in ``OPERATIONS`` with its arguments, and the
  paths whose resolution must stay inside the mount.
* ``OPERATIONS``: each operation is a real system call (``os.*``; renameat2
  and linkat through ctypes) on one side; ``run`` gives its result as
  ``("ok", value)`` or ``("err", errno name)``.  A path argument is relative
  to the side's root; a "ref" is such a path or an fd slot (an int).
* ``Draw``: the seeded source of every choice.  A mode subclasses it to steer
  its choices by the oracle's current state (since every result must match,
  that is the mount's state too); ``operations`` draws a sequence from a
  weighted table of generators.
* ``run_differential``: runs each operation on the oracle, then on the mount,
  and requires equal results (and equal ``state`` after every step, when a
  mode compares more than results).

A mode brings the rest: the two sides (kernel tmpfs and mmfs in tmpfs mode, a
``cp -a`` copy of LOWERDIR on tmpfs and an overlay in overlay mode), its
``Draw`` subclass and generator table (which operations, over which paths),
and its final comparison of the trees (``support.trees.compare_trees``).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import random
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from support.syscalls import Result, attempt, linkat_fd, renameat2
from support.trees import digest

PAGE = mmap.PAGESIZE

Ref = bytes | int  # a path relative to the mount, or an fd slot


# --- the two sides ------------------------------------------------------------------
class Side:
    """One filesystem under test and the descriptors a sequence holds open on it."""

    def __init__(self, root: str | bytes | os.PathLike[str], stat_blocks: bool = True) -> None:
        self.root = os.fsencode(os.path.realpath(root))
        self.stat_blocks = stat_blocks  # whether results hold st_blocks (overlay mode: not a lower file's business)
        self.fds: dict[int, int] = {}  # slot -> fd
        self.opened_as: dict[int, bytes] = {}  # slot -> the path it was opened by

    def path(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def fd(self, slot: int) -> int:
        return self.fds.get(slot, -1)  # -1: EBADF, the same on both sides

    def ref(self, ref: Ref) -> bytes | int:
        return self.fd(ref) if isinstance(ref, int) else self.path(ref)

    def close(self, slot: int) -> None:
        fd = self.fds.pop(slot, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        for slot in list(self.fds):
            self.close(slot)

    def stays_inside(self, rel: bytes, follow: bool) -> bool:
        """Whether the path (only its parent, if not followed) resolves inside this root."""
        path = self.path(rel)
        real = os.path.realpath(path if follow else os.path.dirname(path))
        return real == self.root or real.startswith(self.root + b"/")

    def summary(self, st: os.stat_result) -> tuple[Any, ...]:
        """What two filesystems must agree on in a stat: no times, no inode numbers."""
        shared = (oct(st.st_mode), st.st_size, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev)
        return (*shared, st.st_blocks) if self.stat_blocks else shared


@dataclass(frozen=True)
class Op:
    """One operation: a name in OPERATIONS and its arguments; ``touches`` lists
    (path, whether a final symlink is followed) that must resolve inside the mount."""

    name: str
    args: tuple[Any, ...]
    touches: tuple[tuple[bytes, bool], ...] = ()

    def __str__(self) -> str:
        return f"{self.name}({', '.join(map(short, self.args))})"

    def stays_inside(self, *sides: Side) -> bool:
        """Never let a path resolve out of its mount (a symlink to /etc/shadow, or to ../..)."""
        return all(side.stays_inside(path, follow) for side in sides for path, follow in self.touches)


def short(value: Any) -> str:
    if isinstance(value, bytes) and len(value) > 24:
        return f"<{len(value)} bytes {value[:8]!r}... {digest(value)}>"
    return repr(value)


# --- the operations, each run on one side ------------------------------------------
def op_open(side: Side, slot: int, path: bytes, flags: int, mode: int) -> Any:
    side.close(slot)
    # O_NONBLOCK: opening a FIFO must not wait for the other end.
    fd = os.open(side.path(path), flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    side.fds[slot], side.opened_as[slot] = fd, path
    return side.summary(os.fstat(fd))


def op_close(side: Side, slot: int) -> Any:
    os.close(side.fds.pop(slot, -1))


def op_pwrite(side: Side, slot: int, offset: int, data: bytes) -> Any:
    return os.pwrite(side.fd(slot), data, offset)


def op_write(side: Side, slot: int, data: bytes) -> Any:
    written = os.write(side.fd(slot), data)
    return written, os.lseek(side.fd(slot), 0, os.SEEK_CUR)


def op_pread(side: Side, slot: int, offset: int, length: int) -> Any:
    data = os.pread(side.fd(slot), length, offset)
    return len(data), digest(data)


def op_read(side: Side, slot: int, length: int) -> Any:
    data = os.read(side.fd(slot), length)
    return len(data), digest(data), os.lseek(side.fd(slot), 0, os.SEEK_CUR)


def op_seek(side: Side, slot: int, offset: int, whence: int) -> Any:
    return os.lseek(side.fd(slot), offset, whence)


def op_truncate(side: Side, ref: Ref, size: int) -> Any:
    """truncate, or ftruncate of a slot; then the size stat reports."""
    os.truncate(side.ref(ref), size)
    return os.stat(side.ref(ref)).st_size


def op_write_path(side: Side, path: bytes, offset: int, data: bytes) -> Any:
    fd = os.open(side.path(path), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.pwrite(fd, data, offset), os.fstat(fd).st_size
    finally:
        os.close(fd)


def read_all(path: bytes) -> tuple[int, str]:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        data = b"".join(iter(lambda: os.read(fd, 1 << 22), b""))
    finally:
        os.close(fd)
    return len(data), digest(data)


def op_read_path(side: Side, path: bytes) -> Any:
    return read_all(side.path(path))


def op_hard_links(side: Side, names: tuple[bytes, ...], offset: int, data: bytes) -> Any:
    """Write through the first name, then read the file through every name."""
    written = op_write_path(side, names[0], offset, data)
    return written, [read_all(side.path(name)) for name in names]


def op_stat(side: Side, ref: Ref, follow: bool) -> Any:
    return side.summary(os.stat(side.ref(ref), follow_symlinks=follow))


def op_listdir(side: Side, path: bytes) -> Any:
    return os.listdir(side.path(path))  # in getdents order: the order must match too


def op_mkdir(side: Side, path: bytes, mode: int) -> Any:
    os.mkdir(side.path(path), mode)


def op_rmdir(side: Side, path: bytes) -> Any:
    os.rmdir(side.path(path))


def op_unlink(side: Side, path: bytes) -> Any:
    os.unlink(side.path(path))


def op_rename(side: Side, old: bytes, new: bytes, flags: int) -> Any:
    renameat2(side.path(old), side.path(new), flags)


def op_link(side: Side, old: bytes, new: bytes, follow: bool) -> Any:
    os.link(side.path(old), side.path(new), follow_symlinks=follow)
    return os.lstat(side.path(new)).st_nlink


def op_flink(side: Side, slot: int, new: bytes) -> Any:
    """linkat(fd, "", AT_EMPTY_PATH): a name for an open file; ENOENT once unlinked."""
    linkat_fd(side.fd(slot), side.path(new))


def op_symlink(side: Side, path: bytes, target: bytes) -> Any:
    os.symlink(target, side.path(path))


def op_readlink(side: Side, path: bytes) -> Any:
    return os.readlink(side.path(path))


def op_chmod(side: Side, ref: Ref, mode: int) -> Any:
    os.chmod(side.ref(ref), mode)
    return oct(os.stat(side.ref(ref)).st_mode)


def op_chown(side: Side, ref: Ref, uid: int, gid: int, follow: bool) -> Any:
    os.chown(side.ref(ref), uid, gid, follow_symlinks=follow)
    return side.summary(os.stat(side.ref(ref), follow_symlinks=follow))


def op_utime(side: Side, ref: Ref, times: tuple[int, int], follow: bool) -> Any:
    """Set both times; then the mtime stat reports, and whether the atime is as set.

    Not always: when the path walks through the very symlink whose times were
    set, the walk itself may update its atime (relatime), to two different
    "now"s on the two filesystems.  So the atime is compared "as set or not".
    """
    os.utime(side.ref(ref), ns=times, follow_symlinks=follow)
    st = os.stat(side.ref(ref), follow_symlinks=follow)
    return st.st_atime_ns == times[0], st.st_mtime_ns


def op_setxattr(side: Side, ref: Ref, name: bytes, value: bytes, flags: int, follow: bool) -> Any:
    os.setxattr(side.ref(ref), name, value, flags, follow_symlinks=follow)


def op_getxattr(side: Side, ref: Ref, name: bytes, follow: bool) -> Any:
    value = os.getxattr(side.ref(ref), name, follow_symlinks=follow)
    return len(value), digest(value)


def op_listxattr(side: Side, ref: Ref, follow: bool) -> Any:
    return sorted(os.listxattr(side.ref(ref), follow_symlinks=follow))


def op_removexattr(side: Side, ref: Ref, name: bytes, follow: bool) -> Any:
    os.removexattr(side.ref(ref), name, follow_symlinks=follow)


def op_mknod(side: Side, path: bytes, kind: str, mode: int) -> Any:
    """A FIFO ("fifo"), /dev/null's device ("chr") or an empty file ("reg")."""
    if kind == "fifo":
        os.mkfifo(side.path(path), mode)
    elif kind == "chr":
        os.mknod(side.path(path), stat.S_IFCHR | mode, os.makedev(1, 3))
    else:
        os.mknod(side.path(path), stat.S_IFREG | mode)
    return side.summary(os.lstat(side.path(path)))


def mapped_range(fd: int, where: float, data: bytes, one_page: bool) -> tuple[int, int, bytes]:
    """(file size, offset, data clipped to the file and maybe to one page)."""
    size = os.fstat(fd).st_size
    offset = int(where * size)
    end = min(size, offset + len(data))
    if one_page:
        end = min(end, (offset // PAGE + 1) * PAGE)
    return size, offset, data[: max(0, end - offset)]


@contextlib.contextmanager
def opened_rw(side: Side, ref: Ref) -> Iterator[int]:
    """The slot's fd as it is, or the path opened O_RDWR for the operation."""
    if isinstance(ref, int):
        yield side.fd(ref)
        return
    fd = os.open(side.path(ref), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def fill_in_place(fd: int, offset: int, data: bytes) -> None:
    """pwrite() the bytes already there, O_APPEND or not: the page now holds data."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
    try:
        os.pwrite(fd, data, offset)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def op_mmap_shared(side: Side, ref: Ref, where: float, data: bytes) -> Any:
    """MAP_SHARED write, msync, then read() must see it."""
    with opened_rw(side, ref) as fd:
        size, offset, data = mapped_range(fd, where, data, one_page=False)
        if size == 0:
            return "empty"
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as mapping:
            mapping[offset : offset + len(data)] = data  # write faults only: no hole is read
            mapping.flush()
        return len(data), os.pread(fd, len(data), offset) == data


def op_mmap_private(side: Side, ref: Ref, where: float, data: bytes) -> Any:
    """MAP_PRIVATE write: visible in the mapping, never in the file.

    Only to a page that pwrite() has just filled: a fault that reads a hole
    through a mapping allocates a page on tmpfs (st_blocks grows), while on
    FUSE it is a READ request that mmfs cannot tell from read(2) of a hole.
    """
    with opened_rw(side, ref) as fd:
        size, offset, data = mapped_range(fd, where, data, one_page=True)
        if size == 0:
            return "empty"
        before = os.pread(fd, len(data), offset)
        fill_in_place(fd, offset, before)
        with mmap.mmap(fd, size, mmap.MAP_PRIVATE) as mapping:
            mapping[offset : offset + len(data)] = data
            seen = mapping[offset : offset + len(data)]
        return len(data), seen == data, os.pread(fd, len(data), offset) == before


OPERATIONS: dict[str, Callable[..., Any]] = {
    name[3:]: function for name, function in globals().items() if name.startswith("op_")
}


def run(side: Side, op: Op) -> Result:
    return attempt(lambda: OPERATIONS[op.name](side, *op.args))


# --- drawing sequences of operations ------------------------------------------------
class Draw(random.Random):
    """The seeded source of every choice; a mode's subclass adds the choices
    that read the oracle's state (which ``prepare`` may refresh before each draw)."""

    def __init__(self, seed: int, oracle: Side) -> None:
        super().__init__(seed)
        self.oracle = oracle

    def prepare(self) -> None:
        """Called before each operation is drawn."""


D = TypeVar("D", bound=Draw)
Generators = Sequence[tuple[int, Callable[[D], Op]]]  # (weight, generator)


def operations(draw: D, generators: Generators[D], steps: int) -> Iterator[Op]:
    """``steps`` operations, each from a generator picked by weight.  Lazy: each
    is drawn after the one before has run, so it sees the oracle as it is then."""
    weights = [weight for weight, _ in generators]
    for _ in range(steps):
        draw.prepare()
        yield draw.choices(generators, weights=weights)[0][1](draw)


# --- running a sequence on both sides ------------------------------------------------
def mismatch(seed: int, step: int, history: list[Op], want: Result, got: Result) -> str:
    recent = "\n".join(f"    {i}: {op}" for i, op in enumerate(history) if i >= len(history) - 10)
    return f"seed {seed} step {step}: {history[-1]}\n  tmpfs: {want}\n  mmfs:  {got}\n  last operations:\n{recent}"


def run_differential(
    oracle: Side, subject: Side, ops: Iterable[Op], seed: int, state: Callable[[Side], Any] | None = None
) -> None:
    """Each operation on the oracle, then on the subject: the results must be
    equal, and so must ``state`` of the two sides after every step.  An
    operation whose paths would resolve out of a mount is skipped.  Every
    descriptor the sequence opened is closed at the end."""
    history: list[Op] = []
    try:
        for step, op in enumerate(ops):
            history.append(op)
            if not op.stays_inside(oracle, subject):
                continue
            want, got = run(oracle, op), run(subject, op)
            assert want == got, mismatch(seed, step, history, want, got)
            if state is not None:
                want, got = ("ok", state(oracle)), ("ok", state(subject))
                assert want == got, mismatch(seed, step, history, want, got)
    finally:
        oracle.close_all()
        subject.close_all()
