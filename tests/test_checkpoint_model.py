"""Checkpoints in the model (checkpoints.py): no mount, milliseconds each.

A rollback must give back the whole tree as it was, under the same inode
numbers, leave the checkpoint as it was, keep what the kernel and open
handles refer to valid, and say exactly what the kernel must forget.  The
mount-level tests (test_checkpoints.py) check the same against kernel tmpfs.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from support.models import ino, write
from support.models import overlay_model as overlay_model_at

from mmfs import checkpoints
from mmfs.arena import PAGE, Arena
from mmfs.content import AnonContent
from mmfs.fs import RENAME_EXCHANGE, ROOT_INO, Attrs, Filesystem, FsConfig, FsError
from mmfs.inode import Inode

MiB = 1 << 20


class Clock:
    """A clock that ticks by one second at each reading: every change has its own time."""

    def __init__(self) -> None:
        self.now = 10**18

    def __call__(self) -> int:
        self.now += 10**9
        return self.now


def overlay_model(lower: Path) -> Filesystem:
    return overlay_model_at(lower, map_limit=16, clock=Clock())


def tmpfs_model(max_inodes: int = 0) -> Filesystem:
    arena = Arena(256 * MiB, 0)
    return Filesystem(lambda: AnonContent(arena), FsConfig(max_inodes=max_inodes), clock=Clock(), space=arena)


def read(fs: Filesystem, path: bytes) -> bytes:
    inode = fs.inodes[ino(fs, path)]
    assert inode.content is not None
    return bytes(inode.content.read(0, inode.size))


def tree(fs: Filesystem) -> dict[bytes, tuple[Any, ...]]:
    """Everything a process could see of the tree, by path, inode numbers included."""
    seen: dict[bytes, tuple[Any, ...]] = {}
    pending = [(b"", fs.inodes[ROOT_INO])]
    while pending:
        path, inode = pending.pop()
        if inode.dir is not None:
            fs.entries(inode)  # listed first: a directory's size and link count count its entries
        data = bytes(inode.content.read(0, inode.size)) if inode.content is not None else None
        seen[path or b"."] = (
            inode.ino, inode.mode, inode.uid, inode.gid, inode.rdev, inode.nlink, inode.size, inode.blocks,
            inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.target, dict(inode.xattrs), data,
        )
        if inode.dir is not None:
            for name, (child, _) in fs.entries(inode).items():
                pending.append((path + b"/" + name if path else name, fs.inodes[child]))
    return seen


def populate(fs: Filesystem) -> None:
    fs.mkdir(ROOT_INO, b"dir", 0o755, 1000, 1000)
    fs.create_file(ino(fs, b"dir"), b"file", 0o640, 1000, 1000)
    write(fs, b"dir/file", b"first bytes" * 1000)
    fs.create_file(ROOT_INO, b"sparse", 0o600, 0, 0)
    write(fs, b"sparse", b"end", offset=3 * MiB)
    fs.link(ino(fs, b"dir/file"), ROOT_INO, b"hardlink")
    fs.symlink(ROOT_INO, b"link", b"dir/file", 0, 0)
    fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0)
    fs.setxattr(ino(fs, b"dir"), b"user.note", b"kept")


def mutate(fs: Filesystem) -> None:
    write(fs, b"dir/file", b"OVERWRITTEN")
    fs.setattr(ino(fs, b"sparse"), Attrs(size=10))
    fs.unlink(ROOT_INO, b"hardlink")
    fs.rename(ROOT_INO, b"link", ino(fs, b"dir"), b"moved", 0)
    fs.setattr(ino(fs, b"dir"), Attrs(mode=0o700, uid=5))
    fs.removexattr(ino(fs, b"dir"), b"user.note")
    fs.mkdir(ROOT_INO, b"new", 0o755, 0, 0)
    fs.create_file(ino(fs, b"new"), b"inside", 0o644, 0, 0)
    write(fs, b"new/inside", b"new bytes")
    fs.unlink(ROOT_INO, b"fifo")


def test_rollback_gives_back_the_whole_tree_under_the_same_numbers() -> None:
    fs = tmpfs_model()
    populate(fs)
    before = tree(fs)
    checkpoint = checkpoints.take(fs, "one")
    mutate(fs)
    assert tree(fs) != before
    checkpoints.rollback(fs, checkpoint)
    assert tree(fs) == before
    fs.check_invariants()


def test_the_checkpoint_stays_as_it_was() -> None:
    fs = tmpfs_model()
    populate(fs)
    before = tree(fs)
    checkpoint = checkpoints.take(fs, "one")
    mutate(fs)
    checkpoints.rollback(fs, checkpoint)
    mutate(fs)  # writing after a rollback changes the live tree only
    checkpoints.rollback(fs, checkpoint)
    assert tree(fs) == before
    fs.check_invariants()


def test_a_rollback_to_an_older_checkpoint_and_back() -> None:
    fs = tmpfs_model()
    populate(fs)
    first = tree(fs)
    old = checkpoints.take(fs, "old")
    mutate(fs)
    second = tree(fs)
    new = checkpoints.take(fs, "new")
    checkpoints.rollback(fs, old)
    assert tree(fs) == first
    checkpoints.rollback(fs, new)
    assert tree(fs) == second
    fs.check_invariants()


def test_storage_is_shared_and_comes_back_when_checkpoints_go() -> None:
    fs = tmpfs_model()
    arena = fs.space
    assert isinstance(arena, Arena)
    baseline = arena.pages_held
    fs.create_file(ROOT_INO, b"big", 0o644, 0, 0)
    write(fs, b"big", os.urandom(4 * MiB))
    held = arena.pages_held
    checkpoint = checkpoints.take(fs, "one")
    assert arena.pages_held == held  # nothing copied
    write(fs, b"big", b"x", offset=MiB)
    assert held < arena.pages_held <= held + 64 * 1024 // PAGE  # one storage slot at most
    assert checkpoint.exclusive_pages() * PAGE <= 64 * 1024
    fs.unlink(ROOT_INO, b"big")
    assert arena.pages_held >= 4 * MiB // PAGE  # the checkpoint holds the bytes
    checkpoints.drop(fs, checkpoint)
    assert arena.pages_held == baseline


def test_inode_numbers_only_checkpoints_hold_count_against_nr_inodes() -> None:
    fs = tmpfs_model(max_inodes=6)
    for n in range(5):
        fs.create_file(ROOT_INO, b"f%d" % n, 0o644, 0, 0)
    checkpoint = checkpoints.take(fs, "one")
    for n in range(5):
        fs.unlink(ROOT_INO, b"f%d" % n)
    assert fs.inode_count() == 6  # the root, and five numbers the checkpoint holds
    with pytest.raises(FsError) as full:
        fs.create_file(ROOT_INO, b"more", 0o644, 0, 0)
    assert full.value.errno == errno.ENOSPC
    checkpoints.drop(fs, checkpoint)
    assert fs.inode_count() == 1
    fs.create_file(ROOT_INO, b"more", 0o644, 0, 0)


def test_open_files_across_a_rollback() -> None:
    fs = tmpfs_model()
    fs.create_file(ROOT_INO, b"old", 0o644, 0, 0)
    write(fs, b"old", b"checkpoint bytes")
    checkpoint = checkpoints.take(fs, "one")
    write(fs, b"old", b"LATER")
    fs.create_file(ROOT_INO, b"new", 0o644, 0, 0)
    old_fh = fs.open(ino(fs, b"old"), os.O_RDWR)
    new_ino = ino(fs, b"new")
    new_fh = fs.open(new_ino, os.O_RDWR)
    fs.write(new_fh, 0, b"scratch")
    checkpoints.rollback(fs, checkpoint)
    assert bytes(fs.read(old_fh, 0, 100)) == b"checkpoint bytes"  # restored under its holder
    assert bytes(fs.read(new_fh, 0, 100)) == b"scratch"  # an unlinked open file now
    assert fs.write(new_fh, 7, b"!") == 1 and fs.inodes[new_ino].nlink == 0
    assert fs.lookup(ROOT_INO, b"new") is None
    fs.release(new_fh)
    assert new_ino not in fs.inodes  # freed at its last close
    fs.release(old_fh)
    fs.check_invariants()


def test_what_the_kernel_must_forget() -> None:
    fs = tmpfs_model()
    populate(fs)
    for path in (b"dir", b"dir/file", b"sparse", b"link"):
        fs.remember(fs.inodes[ino(fs, path)])  # the kernel holds these
    checkpoint = checkpoints.take(fs, "one")
    forget = checkpoints.rollback(fs, checkpoint)
    assert forget.inodes == [] and forget.entries == []  # nothing changed: nothing to forget
    write(fs, b"dir/file", b"changed")
    fs.create_file(ROOT_INO, b"created", 0o644, 0, 0)
    fs.unlink(ROOT_INO, b"fifo")
    forget = checkpoints.rollback(fs, checkpoint)
    assert set(forget.inodes) == {ino(fs, b"dir/file"), ROOT_INO}
    assert set(forget.entries) == {(ROOT_INO, b"created"), (ROOT_INO, b"fifo")}


def test_cookies_are_never_handed_out_twice() -> None:
    fs = tmpfs_model()
    fs.create_file(ROOT_INO, b"a", 0o644, 0, 0)
    checkpoint = checkpoints.take(fs, "one")
    fs.create_file(ROOT_INO, b"b", 0o644, 0, 0)
    after_b = fs.inodes[ROOT_INO].dir.next_cookie  # type: ignore[union-attr]
    checkpoints.rollback(fs, checkpoint)
    fs.create_file(ROOT_INO, b"c", 0o644, 0, 0)
    cookies = [cookie for _, cookie in fs.inodes[ROOT_INO].dir.entries.values()]  # type: ignore[union-attr]
    assert cookies[-1] >= after_b  # c's cookie is newer than b's ever was


def test_diff_since_a_checkpoint() -> None:
    fs = tmpfs_model()
    populate(fs)
    checkpoint = checkpoints.take(fs, "one")
    assert checkpoints.since(fs, checkpoint) == []
    mutate(fs)
    found = [(change.kind, change.path) for change in checkpoints.since(fs, checkpoint)]
    assert found == [
        ("M", b"."), ("M", b"dir"), ("M", b"dir/file"), ("A", b"dir/moved"), ("D", b"fifo"), ("D", b"hardlink"),
        ("D", b"link"), ("A", b"new"), ("A", b"new/inside"), ("M", b"sparse"),
    ]
    later = checkpoints.take(fs, "two")
    fs.setattr(ino(fs, b"new/inside"), Attrs(atime_ns=5))  # atime (and the ctime it sets) alone is no change
    assert checkpoints.since(fs, later) == []


def test_exchange_is_seen_as_two_changed_paths() -> None:
    fs = tmpfs_model()
    fs.create_file(ROOT_INO, b"a", 0o644, 0, 0)
    fs.create_file(ROOT_INO, b"b", 0o644, 0, 0)
    checkpoint = checkpoints.take(fs, "one")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    found = [(change.kind, change.path) for change in checkpoints.since(fs, checkpoint)]
    assert found == [("M", b"."), ("M", b"a"), ("M", b"b")]


def lower_tree(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "sub" / "file").write_bytes(b"lower bytes")
    (root / "top").write_bytes(b"top")
    os.link(root / "top", root / "sub" / "hard")


def test_overlay_rollback_and_reset(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    lower_tree(lower)
    fs = overlay_model(lower)
    checkpoint = checkpoints.take(fs, "one")  # nothing listed yet
    write(fs, b"sub/file", b"UPPER")
    fs.unlink(ino(fs, b"sub"), b"hard")
    fs.create_file(ROOT_INO, b"new", 0o644, 0, 0)
    found = [(change.kind, change.path) for change in checkpoints.since(fs, checkpoint)]
    assert found == [("M", b"."), ("A", b"new"), ("M", b"sub"), ("M", b"sub/file"), ("D", b"sub/hard"), ("M", b"top")]
    checkpoints.rollback(fs, checkpoint)
    assert fs.inodes[ROOT_INO].awaits_listing  # as at the checkpoint: LOWERDIR's, not listed
    assert without_numbers(tree(fs)) == without_numbers(tree(overlay_model(lower)))
    assert read(fs, b"sub/file") == b"lower bytes"
    fs.check_invariants()


def test_overlay_files_the_checkpoint_had_not_listed_keep_their_numbers(tmp_path: Path) -> None:
    """Held by the kernel (or open), a lower file the checkpoint knew only as
    LOWERDIR's is that file again after the rollback, under its number."""
    lower = tmp_path / "lower"
    lower.mkdir()
    lower_tree(lower)
    fs = overlay_model(lower)
    checkpoint = checkpoints.take(fs, "one")
    held = {path: ino(fs, path) for path in (b"sub", b"sub/file")}
    for number in held.values():
        fs.remember(fs.inodes[number])
    fh = fs.open(held[b"sub/file"], os.O_RDWR | os.O_NOATIME)  # reading it leaves its atime as LOWERDIR has it
    fs.write(fh, 0, b"UPPER")
    forget = checkpoints.rollback(fs, checkpoint)
    assert {path: ino(fs, path) for path in held} == held
    assert bytes(fs.read(fh, 0, 100)) == b"lower bytes" and fs.inodes[held[b"sub/file"]].nlink == 1
    assert held[b"sub/file"] in forget.inodes
    fs.release(fh)
    assert without_numbers(tree(fs)) == without_numbers(tree(overlay_model(lower)))
    assert read(fs, b"sub/file") == b"lower bytes"
    fs.check_invariants()
    write(fs, b"top", b"changed")
    checkpoints.rollback(fs, checkpoints.reset_point(fs))
    assert without_numbers(tree(fs)) == without_numbers(tree(overlay_model(lower)))
    assert read(fs, b"top") == b"top"
    fs.check_invariants()


def without_numbers(seen: dict[bytes, tuple[Any, ...]]) -> dict[bytes, tuple[Any, ...]]:
    return {path: value[1:] for path, value in seen.items()}


def test_a_checkpoint_is_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fs = tmpfs_model()
    populate(fs)
    arena = fs.space
    assert isinstance(arena, Arena)
    held = arena.pages_held
    calls = 0
    real = AnonContent.snapshot

    def failing(self: AnonContent) -> AnonContent:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOMEM, "injected")
        return real(self)

    monkeypatch.setattr(AnonContent, "snapshot", failing)
    with pytest.raises(OSError):
        checkpoints.take(fs, "one")
    assert arena.pages_held == held and not fs.pinned
    fs.check_invariants()


def test_frozen_copies_share_nothing_mutable() -> None:
    fs = tmpfs_model()
    populate(fs)
    live = fs.inodes[ino(fs, b"dir")]
    copy: Inode = checkpoints.frozen(live)
    assert copy.xattrs == live.xattrs and copy.xattrs is not live.xattrs
    assert copy.dir is not None and live.dir is not None and copy.dir.entries is not live.dir.entries
    assert copy.lookups == 0 and copy.opens == 0
