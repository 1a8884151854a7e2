"""The pyfuse3 adapter without a kernel: ``fuse_ops.Operations`` handlers called
directly (as s3ql's tests call its operations) over a tmpfs-mode model built as
``daemon.build`` builds it.  Milliseconds each; the model's invariants are
checked after every test."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pyfuse3
import pytest
import trio
from support.models import overlay_model

from mmfs.arena import PAGE, Arena
from mmfs.content import AnonContent
from mmfs.fs import NAME_MAX, ROOT_INO, Filesystem, FsConfig
from mmfs.fuse_ops import CACHE_TIMEOUT, Operations

T = TypeVar("T")
MiB = 1 << 20


@dataclass
class FakeContext:
    """Stands in for ``pyfuse3.RequestContext``: the caller of a request."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


CTX = cast(pyfuse3.RequestContext, FakeContext())


def make_ops(size: int = 0, nr_inodes: int = 0) -> Operations:
    """An adapter over a tmpfs-mode model, as ``daemon.build`` makes one for size= and nr_inodes=."""
    arena = Arena(256 * MiB, size // PAGE)
    return Operations(Filesystem(lambda: AnonContent(arena), FsConfig(max_inodes=nr_inodes), space=arena))


@pytest.fixture
def ops() -> Iterator[Operations]:
    operations = make_ops(size=16 * MiB, nr_inodes=100)
    yield operations
    operations.fs.check_invariants()


def call(coro_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run one async handler to completion, as pyfuse3's main loop would."""
    return trio.run(coro_fn, *args)


def fuse_errno(coro_fn: Callable[..., Awaitable[Any]], *args: Any) -> int:
    """The errno of the FUSEError the handler answers with."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        call(coro_fn, *args)
    return info.value.errno


def references(ops: Operations) -> dict[int, int]:
    """Every inode's kernel reference count (``Inode.lookups``)."""
    return {ino: inode.lookups for ino, inode in ops.fs.inodes.items()}


def new_file(ops: Operations, name: bytes, data: bytes = b"", parent: int = ROOT_INO) -> int:
    """Create ``name`` with ``data`` through the adapter and close it; its inode (one reference held)."""
    info, attr = call(ops.create, parent, name, 0o644, os.O_CREAT | os.O_WRONLY, CTX)
    if data:
        assert call(ops.write, info.fh, 0, data) == len(data)
    call(ops.release, info.fh)
    return attr.st_ino


@dataclass
class FakeToken:
    """A readdir buffer with room for ``room`` entries; what was accepted, in order."""

    room: int
    accepted: list[tuple[bytes, int]] = field(default_factory=list)  # (name, next offset)


def fake_readdir_reply(token: FakeToken, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
    """``pyfuse3.readdir_reply`` needs a token from a kernel request; this one accepts ``room`` entries."""
    if len(token.accepted) == token.room:
        return False
    token.accepted.append((name, next_id))
    return True


# --- lookup counts ---------------------------------------------------------------
def test_entry_replies_take_one_reference_each(ops: Operations) -> None:
    """lookup, create, mknod, mkdir, symlink and link each take exactly one
    reference on the inode of their entry reply, and nothing else."""
    info, attr = call(ops.create, ROOT_INO, b"file", 0o644, os.O_CREAT | os.O_RDWR, CTX)
    call(ops.release, info.fh)
    made = {
        "create": attr,
        "mknod": call(ops.mknod, ROOT_INO, b"fifo", stat.S_IFIFO | 0o644, 0, CTX),
        "mkdir": call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX),
        "symlink": call(ops.symlink, ROOT_INO, b"link", b"file", CTX),
    }
    for how, entry in made.items():
        assert entry.st_ino > ROOT_INO and ops.fs.inodes[entry.st_ino].lookups == 1, how
    file_ino, before = attr.st_ino, references(ops)
    assert call(ops.link, file_ino, made["mkdir"].st_ino, b"again", CTX).st_ino == file_ino
    assert call(ops.lookup, ROOT_INO, b"dir", CTX).st_ino == made["mkdir"].st_ino
    after = references(ops)
    assert after[file_ino] == before[file_ino] + 1
    assert after[made["mkdir"].st_ino] == before[made["mkdir"].st_ino] + 1
    assert after[ROOT_INO] == before[ROOT_INO] == 1  # the parent takes none


def test_failed_entry_requests_take_no_reference(ops: Operations) -> None:
    """An entry request answered with an error leaves every count as it was."""
    file_ino = new_file(ops, b"file")
    call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX)
    before = references(ops)
    assert fuse_errno(ops.create, ROOT_INO, b"file", 0o644, os.O_CREAT | os.O_EXCL, CTX) == errno.EEXIST
    assert fuse_errno(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX) == errno.EEXIST
    assert fuse_errno(ops.link, file_ino, ROOT_INO, b"dir", CTX) == errno.EEXIST
    assert references(ops) == before


def test_readdir_references_only_accepted_entries(ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each entry readdir_reply accepts takes one reference; a refused entry and
    "." and ".." take none; a resumed listing references the rest exactly once."""
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)
    directory = call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX).st_ino
    files = {name: new_file(ops, name, parent=directory) for name in (b"a", b"b", b"c")}
    call(ops.forget, [(ino, 1) for ino in files.values()])  # from 0: the listing's references only
    before = references(ops)
    fh = call(ops.opendir, directory, CTX)
    first = FakeToken(room=3)
    call(ops.readdir, fh, 0, first)
    assert [name for name, _ in first.accepted] == [b".", b"..", b"c"]  # newest first, as on tmpfs
    assert {name: ops.fs.inodes[ino].lookups for name, ino in files.items()} == {b"a": 0, b"b": 0, b"c": 1}
    assert references(ops)[directory] == before[directory] and references(ops)[ROOT_INO] == before[ROOT_INO]
    rest = FakeToken(room=10)
    call(ops.readdir, fh, first.accepted[-1][1], rest)
    assert [name for name, _ in rest.accepted] == [b"b", b"a"]
    assert {name: ops.fs.inodes[ino].lookups for name, ino in files.items()} == {b"a": 1, b"b": 1, b"c": 1}
    call(ops.releasedir, fh)
    after = references(ops)
    assert after[directory] == before[directory] and after[ROOT_INO] == before[ROOT_INO]


def test_readdir_with_a_full_real_token_references_nothing(ops: Operations) -> None:
    """pyfuse3's own readdir_reply (typed Cython) takes what the adapter passes it;
    a token made outside a request has no room (size 0), so it refuses the
    first entry, and the listing ends with no reference taken."""
    new_file(ops, b"a")
    call(ops.forget, [(ino, 1) for ino in ops.fs.inodes if ino != ROOT_INO])
    before = references(ops)
    fh = call(ops.opendir, ROOT_INO, CTX)
    call(ops.readdir, fh, 0, pyfuse3.ReaddirToken())
    call(ops.releasedir, fh)
    assert references(ops) == before


def test_forget_gives_references_back_and_frees_an_unlinked_inode(ops: Operations) -> None:
    """forget subtracts its count; an unlinked, closed inode stays (bytes and all)
    while the kernel holds a reference and is freed when the count reaches 0."""
    ino = new_file(ops, b"file", b"x" * (3 * PAGE))
    assert call(ops.lookup, ROOT_INO, b"file", CTX).st_ino == ino
    assert ops.fs.inodes[ino].lookups == 2
    call(ops.unlink, ROOT_INO, b"file", CTX)
    call(ops.forget, [(ino, 1)])
    assert ops.fs.inodes[ino].lookups == 1  # nameless and closed, but still referenced
    assert call(ops.getattr, ino, CTX).st_nlink == 0
    call(ops.forget, [(ino, 1)])
    assert ino not in ops.fs.inodes
    assert fuse_errno(ops.getattr, ino, CTX) == errno.ESTALE
    assert ops.requests["FORGET"].count == 2


def test_forget_with_too_large_a_count_is_contained(ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    """A forget of more references than were taken is a bug: logged with its
    traceback, nothing raised (FORGET has no reply), the count left alone, and
    the other inodes of the batch still forgotten."""
    a, b, c = (new_file(ops, name) for name in (b"a", b"b", b"c"))
    with caplog.at_level(logging.ERROR, logger="mmfs.fuse_ops"):
        call(ops.forget, [(a, 1), (b, 5), (c, 1)])
    assert [ops.fs.inodes[ino].lookups for ino in (a, b, c)] == [0, 1, 0]
    [record] = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert f"internal error in forget of inode {b} (count 5)" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is AssertionError
    assert ops.requests["FORGET"].count == 1
    assert call(ops.lookup, ROOT_INO, b"b", CTX).st_ino == b  # still served


def overlay_ops(lower: Path) -> Operations:
    """An adapter over an overlay-mode model of ``lower``, as ``daemon.build`` makes one."""
    return Operations(overlay_model(lower))


def test_entry_replies_never_list_a_backing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overlay mode: lookup and readdir replies carry a directory not listed yet
    without listing it, with attributes the kernel must not cache (its size and
    link count are not known yet); getattr lists it.  So a backing directory
    that vanished fails only the getattr (EIO), and leaves no reference."""
    lower = tmp_path / "lower"
    for name in ("a", "gone", "z"):
        (lower / name).mkdir(parents=True)
    ops = overlay_ops(lower)
    fh = call(ops.opendir, ROOT_INO, CTX)  # lists the root: "a", "gone" and "z" are known, not listed
    (lower / "gone").rmdir()
    entry = call(ops.lookup, ROOT_INO, b"gone", CTX)
    assert entry.attr_timeout == 0 and entry.entry_timeout == CACHE_TIMEOUT
    gone = ops.fs.inodes[entry.st_ino]
    assert gone.lookups == 1 and gone.dir is not None and gone.dir.unlisted == b"gone"
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)
    token = FakeToken(room=10)
    call(ops.readdir, fh, 0, token)
    assert [name for name, _ in token.accepted] == [b".", b"..", b"z", b"gone", b"a"]  # newest first
    assert gone.lookups == 2 and gone.dir.unlisted == b"gone"
    assert fuse_errno(ops.getattr, entry.st_ino, CTX) == errno.EIO
    assert gone.lookups == 2
    a = call(ops.getattr, call(ops.lookup, ROOT_INO, b"a", CTX).st_ino, CTX)  # listed now: cached a day
    assert a.attr_timeout == CACHE_TIMEOUT and a.st_nlink == 2 and a.st_size == 40
    call(ops.releasedir, fh)


# --- negative entries --------------------------------------------------------------
def test_negative_lookup_is_cacheable_and_takes_no_reference(ops: Operations) -> None:
    """A missing name is an entry with st_ino 0 and a positive entry timeout (the
    kernel caches the absence), not ENOENT; and no inode gains a reference."""
    directory = call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX).st_ino
    before = references(ops)
    for parent in (ROOT_INO, directory):
        negative = call(ops.lookup, parent, b"missing", CTX)
        assert negative.st_ino == 0
        assert negative.entry_timeout == CACHE_TIMEOUT > 0
    assert references(ops) == before
    assert ops.requests["LOOKUP"].count == 2


# --- O_TRUNC -------------------------------------------------------------------------
def test_open_with_o_trunc_empties_the_file_and_sets_mtime(ops: Operations) -> None:
    """The kernel leaves O_TRUNC to open (atomic_o_trunc): the bytes and their
    pages go and mtime and ctime move; an open without it keeps the data."""
    ino = new_file(ops, b"file", b"x" * (2 * PAGE + 1))
    fh = call(ops.open, ino, os.O_RDONLY, CTX).fh
    assert bytes(call(ops.read, fh, 0, 10)) == b"x" * 10
    call(ops.release, fh)
    inode = ops.fs.inodes[ino]
    inode.mtime_ns = inode.ctime_ns = 1
    fh = call(ops.open, ino, os.O_WRONLY | os.O_TRUNC, CTX).fh
    attr = call(ops.getattr, ino, CTX)
    assert attr.st_size == 0 and attr.st_blocks == 0
    assert attr.st_mtime_ns > 1 and attr.st_ctime_ns > 1
    assert call(ops.statfs, CTX).f_bfree == 16 * MiB // PAGE  # every page given back
    assert call(ops.write, fh, 0, b"new") == 3
    call(ops.release, fh)
    fh = call(ops.open, ino, os.O_RDONLY, CTX).fh
    assert bytes(call(ops.read, fh, 0, 100)) == b"new"
    call(ops.release, fh)


def test_create_with_o_trunc_makes_a_new_empty_file(ops: Operations) -> None:
    """create passes O_TRUNC of a new file without tripping on it; the handle writes."""
    info, attr = call(ops.create, ROOT_INO, b"new", 0o644, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, CTX)
    assert stat.S_ISREG(attr.st_mode) and attr.st_size == 0
    assert call(ops.write, info.fh, 0, b"data") == 4
    call(ops.release, info.fh)
    assert call(ops.getattr, attr.st_ino, CTX).st_size == 4


# --- statfs --------------------------------------------------------------------------
def test_statfs_reports_size_and_nr_inodes(ops: Operations) -> None:
    """With size= and nr_inodes=, statfs counts pages and inodes in all and
    free, and the free counts follow writes and new inodes."""
    total = 16 * MiB // PAGE
    data = call(ops.statfs, CTX)
    assert (data.f_bsize, data.f_frsize, data.f_namemax) == (PAGE, PAGE, NAME_MAX)
    assert (data.f_blocks, data.f_bfree, data.f_bavail) == (total, total, total)
    assert (data.f_files, data.f_ffree, data.f_favail) == (100, 99, 99)  # the root counts
    new_file(ops, b"file", b"x" * (3 * PAGE))
    call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX)
    data = call(ops.statfs, CTX)
    assert (data.f_blocks, data.f_bfree, data.f_bavail) == (total, total - 3, total - 3)
    assert (data.f_files, data.f_ffree, data.f_favail) == (100, 97, 97)


def test_statfs_without_limits_reports_zero_counts() -> None:
    """With no size= and no nr_inodes=, the block and inode counts are 0 (df shows
    no limit), written data or not; the block size and name limit still hold."""
    ops = make_ops()
    new_file(ops, b"file", b"x" * PAGE)
    data = call(ops.statfs, CTX)
    assert (data.f_blocks, data.f_bfree, data.f_bavail) == (0, 0, 0)
    assert (data.f_files, data.f_ffree, data.f_favail) == (0, 0, 0)
    assert (data.f_bsize, data.f_namemax) == (PAGE, NAME_MAX)
    ops.fs.check_invariants()


# --- errors --------------------------------------------------------------------------
def test_model_errors_come_back_with_their_errno(ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    """FsError becomes FUSEError with the same errno, and is an answer, not a bug: nothing is logged."""
    directory = call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX).st_ino
    file_ino = new_file(ops, b"file", parent=directory)
    dir_fh = call(ops.opendir, directory, CTX)
    cases: list[tuple[int, Callable[..., Awaitable[Any]], tuple[Any, ...]]] = [
        (errno.EISDIR, ops.read, (dir_fh, 0, 1)),  # a directory's handle (the kernel never sends this)
        (errno.EISDIR, ops.write, (dir_fh, 0, b"x")),
        (errno.EISDIR, ops.fsync, (dir_fh, False)),
        (errno.ENOENT, ops.unlink, (ROOT_INO, b"missing", CTX)),
        (errno.EEXIST, ops.mkdir, (ROOT_INO, b"dir", 0o755, CTX)),
        (errno.ENOTEMPTY, ops.rmdir, (ROOT_INO, b"dir", CTX)),
        (errno.EISDIR, ops.open, (directory, os.O_RDONLY, CTX)),
        (errno.EISDIR, ops.unlink, (ROOT_INO, b"dir", CTX)),
        (errno.ENOTDIR, ops.lookup, (file_ino, b"x", CTX)),
        (errno.ENODATA, ops.getxattr, (file_ino, b"user.missing", CTX)),
        (errno.EOPNOTSUPP, ops.getxattr, (file_ino, b"other.name", CTX)),
        (errno.ENAMETOOLONG, ops.lookup, (ROOT_INO, b"n" * (NAME_MAX + 1), CTX)),
        (errno.ESTALE, ops.getattr, (10_000, CTX)),
        (errno.EBADF, ops.read, (10_000, 0, 1)),
        (errno.EBADF, ops.write, (10_000, 0, b"x")),
        (errno.EBADF, ops.release, (10_000,)),
        (errno.EBADF, ops.fsyncdir, (10_000, False)),
    ]
    with caplog.at_level(logging.DEBUG, logger="mmfs"):
        got = [fuse_errno(coro_fn, *args) for _, coro_fn, args in cases]
    assert got == [expected for expected, _, _ in cases]
    assert not caplog.records
    call(ops.releasedir, dir_fh)


def test_bug_in_the_model_is_answered_eio_logged_and_contained(
    ops: Operations, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Any other exception is a bug: EIO, its traceback logged at ERROR, and the
    next request is served as usual."""
    get = ops.fs.get
    faults = iter([RuntimeError("injected getattr fault")])

    def faulty_get(ino: int) -> Any:
        for fault in faults:  # once
            raise fault
        return get(ino)

    monkeypatch.setattr(ops.fs, "get", faulty_get)
    with caplog.at_level(logging.ERROR, logger="mmfs.fuse_ops"):
        assert fuse_errno(ops.getattr, ROOT_INO, CTX) == errno.EIO
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage() == "internal error in getattr; answering EIO"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "Traceback" in caplog.text and "injected getattr fault" in caplog.text
    assert call(ops.getattr, ROOT_INO, CTX).st_ino == ROOT_INO
    assert ops.requests["GETATTR"].count == 2


# --- request counts --------------------------------------------------------------------
def test_requests_are_counted_by_opcode_errors_included(ops: Operations) -> None:
    """Each handler call counts once under its opcode, answered or failed."""
    call(ops.getattr, ROOT_INO, CTX)
    call(ops.getattr, ROOT_INO, CTX)
    fuse_errno(ops.getattr, 10_000, CTX)
    fuse_errno(ops.unlink, ROOT_INO, b"missing", CTX)
    new_file(ops, b"file", b"data")  # CREATE, WRITE (through _write), RELEASE
    fuse_errno(ops.flush, 1)  # ENOSYS, counted by hand
    counts = {opcode: served.count for opcode, served in ops.requests.items()}
    assert counts == {"GETATTR": 3, "UNLINK": 1, "CREATE": 1, "WRITE": 1, "RELEASE": 1, "FLUSH": 1}
    assert ops.requests["GETATTR"].ns > 0
