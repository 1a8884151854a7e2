"""Checkpoints: a mount's whole tree recorded at one moment, and rollback to it.

A checkpoint holds a frozen copy of every inode that has a name: attributes,
all timestamps, xattrs (ACLs included), symlink target, directory entries with
their readdir cookies, and a snapshot of the content that shares every storage
slot with the live file (copy-on-write: ``content.snapshot``).  No data is
copied when it is taken; a write afterwards copies what it changes.

Rollback makes the live tree that of the checkpoint again, in one synchronous
step (atomic with respect to requests): inodes are restored in place under
their numbers, so what the kernel and open handles refer to stays valid.

- An inode that exists in the checkpoint gets its state back; if it is open,
  its holders see the checkpoint's bytes.  Inodes whose state is the
  checkpoint's already are left alone.
- An inode that did not exist (or had no name) then loses every name: an open
  one lives on like an unlinked open file and is freed at its last close.
- The checkpoint itself is never changed: rollback snapshots its contents
  again, so one can roll back to it again and again.

What the kernel cached (names, negative entries, attributes, pages) is then
invalidated for what changed (``Invalidations``; the adapter sends them).
Readdir cookies are never reused: a directory's next cookie stays past every
cookie handed out before.

Limits: pages count once per physical copy, so a checkpoint costs the pages
only it still holds (written over or deleted since); inode numbers only
checkpoints hold count against nr_inodes (``Filesystem.pinned``).

Pure model code: no pyfuse3, no trio.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .changes import Change, differs, join
from .fs import ROOT_INO, Filesystem, FsError
from .inode import Content, Directory, Inode

Key = tuple[int, int]


@dataclass
class Checkpoint:
    """One recorded tree."""

    name: str
    taken_at: float  # seconds since the epoch
    inodes: dict[int, Inode]  # frozen copies, by number: nobody else refers to them
    links: dict[Key, int] = field(default_factory=dict)  # overlay: hard-linked lower files' numbers
    unlisted_links: dict[Key, int] | None = None  # overlay: see Overlay.unlisted_links

    def release(self) -> None:
        """Give the contents' shared storage back (the checkpoint is dropped)."""
        for inode in self.inodes.values():
            if inode.content is not None:
                inode.content.release()
        self.inodes.clear()

    def exclusive_pages(self) -> int:
        """Pages of file data only this checkpoint still holds."""
        return sum(inode.content.exclusive_pages() for inode in self.inodes.values() if inode.content is not None)


@dataclass
class Invalidations:
    """What the kernel may have cached that a rollback changed."""

    inodes: list[int] = field(default_factory=list)  # attributes and pages
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (directory, name): names and negative entries


def frozen(inode: Inode) -> Inode:
    """A copy of ``inode`` that shares nothing mutable with it (its content is a
    copy-on-write snapshot), with no kernel references and no handles."""
    directory = inode.dir
    return Inode(
        inode.ino, inode.mode, inode.uid, inode.gid, inode.atime_ns, inode.mtime_ns, inode.ctime_ns,
        nlink=inode.nlink, rdev=inode.rdev,
        content=inode.content.snapshot() if inode.content is not None else None,
        dir=None if directory is None else Directory(
            directory.parent, dict(directory.entries), directory.next_cookie, directory.unlisted
        ),
        target=inode.target, xattrs=dict(inode.xattrs), hidden_links=inode.hidden_links, counted=inode.counted,
        lower_key=inode.lower_key, origin=inode.origin, changed=inode.changed,
    )


def take(fs: Filesystem, name: str) -> Checkpoint:
    """Record the tree as it is: every inode with a name.  All or nothing: if a
    content cannot be snapshotted (no room to move written pages), nothing is kept."""
    copies: dict[int, Inode] = {}
    try:
        for ino, inode in fs.inodes.items():
            if inode.nlink:
                copies[ino] = frozen(inode)
    except BaseException:
        Checkpoint(name, 0, copies).release()
        raise
    checkpoint = Checkpoint(name, time.time(), copies)
    if fs.overlay is not None:
        checkpoint.links = {key: inode.ino for key, inode in fs.overlay.links.items()}
        unlisted = fs.overlay.unlisted_links
        checkpoint.unlisted_links = None if unlisted is None else dict(unlisted)
    pin(fs, checkpoint, 1)
    return checkpoint


def drop(fs: Filesystem, checkpoint: Checkpoint) -> None:
    """Forget a checkpoint: its storage and its inode numbers go back."""
    pin(fs, checkpoint, -1)
    checkpoint.release()


def pin(fs: Filesystem, checkpoint: Checkpoint, by: int) -> None:
    """Count (1) or stop counting (-1) the checkpoint's inode numbers in ``fs.pinned``."""
    for ino, inode in checkpoint.inodes.items():
        if inode.counted:
            count = fs.pinned.get(ino, 0) + by
            if count:
                fs.pinned[ino] = count
            else:
                del fs.pinned[ino]
    fs.recount_inodes()


def rollback(fs: Filesystem, checkpoint: Checkpoint) -> Invalidations:
    """Make the live tree the checkpoint's; what the kernel must forget of it."""
    restored = {ino: frozen(state) for ino, state in checkpoint.inodes.items() if not same(fs.inodes.get(ino), state)}
    gone = [inode for inode in fs.inodes.values() if inode.nlink and inode.ino not in checkpoint.inodes]
    known = known_state(fs, [*restored, *(inode.ino for inode in gone)])  # nothing else changes
    held: dict[bytes, Inode] = {}  # overlay: lower files the kernel holds that the checkpoint had not listed yet
    for inode in gone:
        if inode.origin is not None and (inode.lookups or inode.opens):
            held[inode.origin] = inode
        unname(fs, inode)
    for ino, state in restored.items():
        restore(fs, ino, state)
    if fs.overlay is not None:
        restore_links(fs, checkpoint)
        adopt(fs, held)
    fs.recount_inodes()
    return invalidations(fs, known)


def adopt(fs: Filesystem, held: dict[bytes, Inode]) -> None:
    """Lower files that existed at the checkpoint, though it had not listed their
    directories yet, and that the kernel or a handle holds: list those
    directories now, so that each becomes its lower path's file again under
    its number (an open one then reads LOWERDIR's bytes, as at the checkpoint)."""
    awaiting = {
        inode.dir.unlisted: inode for inode in fs.inodes.values() if inode.dir and inode.dir.unlisted is not None
    }
    for path in sorted(held, key=len):  # a directory before what is in it
        directory = awaiting.get(path.rpartition(b"/")[0])
        if path not in held or directory is None or not directory.awaits_listing:
            continue  # adopted already, or its place is not LOWERDIR's in the checkpoint
        try:
            listed = fs.entries(directory, adopt=held)
        except FsError:  # LOWERDIR unreadable there: those files stay nameless, the rollback is whole
            continue
        for ino, _ in listed.values():
            child = fs.inodes[ino]
            if child.dir is not None and child.dir.unlisted is not None:
                awaiting[child.dir.unlisted] = child


def same(live: Inode | None, state: Inode) -> bool:
    """Whether a live inode is in the checkpoint's state already (its atime aside:
    only what a rollback would change).  Cheap: no bytes compared."""
    if live is None or live.nlink != state.nlink or attributes(live) != attributes(state):
        return False
    if live.content is not None or state.content is not None:
        return live.content is not None and state.content is not None and live.content.same_as(state.content)
    if live.dir is not None and state.dir is not None:
        return (live.dir.entries, live.dir.parent, live.dir.unlisted) == (
            state.dir.entries, state.dir.parent, state.dir.unlisted
        )
    return True


def attributes(inode: Inode) -> tuple[object, ...]:
    return (
        inode.mode, inode.uid, inode.gid, inode.rdev, inode.atime_ns, inode.mtime_ns, inode.ctime_ns,
        inode.target, inode.xattrs, inode.hidden_links, inode.lower_key, inode.origin, inode.changed,
    )


def unname(fs: Filesystem, inode: Inode) -> None:
    """An inode the checkpoint does not have: no name is left to it.  Open, it
    lives on like an unlinked file; otherwise it is freed (``_maybe_free``)."""
    inode.nlink = inode.hidden_links = 0
    if inode.dir is not None:
        inode.dir.entries = {}
        inode.dir.unlisted = None
    if fs.overlay is not None and inode.lower_key is not None:
        if fs.overlay.links.get(inode.lower_key) is inode:
            del fs.overlay.links[inode.lower_key]
        inode.lower_key = None
    fs.free_if_unused(inode)


def restore(fs: Filesystem, ino: int, state: Inode) -> None:
    """Put a checkpoint's inode (a fresh frozen copy) in place under its number."""
    live = fs.inodes.get(ino)
    if live is None:
        fs.inodes[ino] = state
        return
    old: Content | None = live.content
    next_cookie = live.dir.next_cookie if live.dir is not None else 0
    for name in ATTRIBUTE_NAMES:
        setattr(live, name, getattr(state, name))
    if live.dir is not None:  # cookies handed out since the checkpoint are never handed out again
        live.dir.next_cookie = max(live.dir.next_cookie, next_cookie)
    if old is not None and old is not live.content:
        old.uncharge()
        old.release()


ATTRIBUTE_NAMES = (
    "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "nlink", "rdev", "content", "dir", "target",
    "xattrs", "hidden_links", "counted", "lower_key", "origin", "changed",
)  # every Inode field but ino, lookups and opens


def restore_links(fs: Filesystem, checkpoint: Checkpoint) -> None:
    overlay = fs.overlay
    assert overlay is not None
    overlay.links = {key: fs.inodes[ino] for key, ino in checkpoint.links.items()}
    unlisted = checkpoint.unlisted_links
    overlay.unlisted_links = None if unlisted is None else dict(unlisted)


# --- what the kernel must forget ---------------------------------------------------
KnownState = tuple[dict[int, tuple[object, ...]], dict[int, dict[bytes, int]]]


def known_state(fs: Filesystem, changing: Iterable[int]) -> KnownState:
    """What the kernel may have cached of the inodes a rollback will change: the
    attributes and contents of those it holds, and the names of the
    directories among them."""
    inodes: dict[int, tuple[object, ...]] = {}
    names: dict[int, dict[bytes, int]] = {}
    for ino in changing:
        inode = fs.inodes.get(ino)
        if inode is not None and inode.lookups:
            inodes[ino] = seen(inode)
            if inode.dir is not None:
                names[ino] = names_of(inode)
    return inodes, names


def seen(inode: Inode) -> tuple[object, ...]:
    return (*attributes(inode), inode.nlink, inode.size, id(inode.content))


def names_of(directory: Inode) -> dict[bytes, int]:
    assert directory.dir is not None
    return {name: ino for name, (ino, _) in directory.dir.entries.items()}


def invalidations(fs: Filesystem, known: KnownState) -> Invalidations:
    """The inodes the kernel holds whose attributes or bytes changed, and every
    name that changed in a directory it holds (appeared: it may be cached as
    missing; went or points elsewhere: it may be cached as it was)."""
    inodes, names = known
    result = Invalidations()
    for ino, before in inodes.items():
        inode = fs.inodes.get(ino)
        if inode is not None and seen(inode) != before:
            result.inodes.append(ino)
    for ino, before_names in names.items():
        directory = fs.inodes.get(ino)
        after = names_of(directory) if directory is not None and directory.dir is not None else {}
        if after != before_names:
            changed = {name for name in before_names.keys() | after.keys() if before_names.get(name) != after.get(name)}
            result.entries += [(ino, name) for name in sorted(changed)]
    return result


def reset_point(fs: Filesystem) -> Checkpoint:
    """Overlay mode: the untouched LOWERDIR, as a checkpoint (``mmfs reset``):
    the root as mounted, not listed yet, and nothing else."""
    return Checkpoint("", time.time(), {ROOT_INO: fs.mounted_root})


# --- what changed since a checkpoint (mmfs diff --since) -----------------------------
@dataclass(frozen=True)
class Lowered:
    """A name of the checkpoint's tree in a directory it had not listed: LOWERDIR's
    entry at ``path``, as it is (overlay mode)."""

    path: bytes  # in LOWERDIR
    is_dir: bool


Node = Inode | Lowered


def since(fs: Filesystem, checkpoint: Checkpoint) -> list[Change]:
    """Every path whose file differs between the checkpoint and the live tree,
    in ``changes.diff``'s form and order: path by path, atime and ctime aside;
    the same file (inode number) with another content or attributes is ``M``,
    another file at a path is ``M`` with everything beneath each side added or
    deleted.  Reads no file; may list directories of the live tree."""
    return Since(fs, checkpoint).run()


class Since:
    """One ``since`` walk: the live tree against a checkpoint's."""

    def __init__(self, fs: Filesystem, checkpoint: Checkpoint) -> None:
        self.fs = fs
        self.old = checkpoint.inodes
        self.found: list[Change] = []

    def run(self) -> list[Change]:
        root, old_root = self.fs.inodes[ROOT_INO], self.old[ROOT_INO]
        if not same_file(root, old_root):
            self.found.append(Change("M", b".", root))
        self.directory(b"", root, old_root)
        self.found.sort(key=lambda change: b"" if change.path == b"." else change.path)
        return self.found

    def names(self, node: Node) -> dict[bytes, Node]:
        """The names of a directory of the checkpoint's tree."""
        if isinstance(node, Lowered) or node.awaits_listing:
            lower_path = node.path if isinstance(node, Lowered) else node.dir.unlisted  # type: ignore[union-attr]
            assert self.fs.overlay is not None and lower_path is not None
            return {
                name: Lowered(join(lower_path, name), is_dir)
                for name, is_dir in self.fs.overlay.lower.names(lower_path)
            }
        assert node.dir is not None
        return {name: self.old[ino] for name, (ino, _) in node.dir.entries.items()}

    def directory(self, path: bytes, live: Inode, old: Node) -> None:
        """Compare the entries of a live directory with those it had."""
        if isinstance(old, Inode) and old.awaits_listing and live.awaits_listing:
            assert old.dir is not None and live.dir is not None
            if old.dir.unlisted == live.dir.unlisted:
                return  # neither listed: LOWERDIR's, as it is
        entries = self.fs.entries(live)
        before = self.names(old)
        for name, (ino, _) in entries.items():
            child, child_path = self.fs.inodes[ino], join(path, name)
            if name not in before:
                self.added(child_path, child)
            else:
                self.in_both(child_path, child, before[name])
        for name, node in before.items():
            if name not in entries:
                self.deleted(join(path, name), node)

    def in_both(self, path: bytes, live: Inode, old: Node) -> None:
        if isinstance(old, Lowered):
            same_identity = self.is_lower_file(live, old)
            previous = self.old.get(live.ino)  # another name of a hard-linked lower file, listed at the checkpoint
            if previous is not None:
                kept = same_identity and same_file(live, previous)
            else:
                kept = same_identity and not (live.changed and self.differs_from_lower(live, old.path))
        else:
            same_identity = live.ino == old.ino and stat.S_IFMT(live.mode) == stat.S_IFMT(old.mode)
            kept = same_identity and same_file(live, old)
        if not kept:
            self.found.append(Change("M", path, live))
        if not same_identity:
            if live.dir is not None:
                self.added_beneath(path, live)
            if is_directory(old):
                self.deleted_beneath(path, old)
        elif live.dir is not None:
            self.directory(path, live, old)

    def is_lower_file(self, live: Inode, old: Lowered) -> bool:
        """Whether a live inode is the lower file at ``old.path``: made from that
        path, or (a hard-linked lower file made from another of its names) the
        same file of LOWERDIR's filesystem."""
        if (live.dir is not None) != old.is_dir:
            return False
        if live.origin == old.path:
            return True
        if live.lower_key is None:
            return False
        assert self.fs.overlay is not None
        parent, _, name = old.path.rpartition(b"/")
        st = self.fs.overlay.lower.entry(parent, name).st
        return live.lower_key == (st.st_dev, st.st_ino)

    def differs_from_lower(self, live: Inode, lower_path: bytes) -> bool:
        assert self.fs.overlay is not None
        parent, _, name = lower_path.rpartition(b"/")
        return differs(live, self.fs.overlay.lower.entry(parent, name))

    def added(self, path: bytes, live: Inode) -> None:
        self.found.append(Change("A", path, live))
        if live.dir is not None:
            self.added_beneath(path, live)

    def added_beneath(self, path: bytes, live: Inode) -> None:
        for name, (ino, _) in self.fs.entries(live).items():
            self.added(join(path, name), self.fs.inodes[ino])

    def deleted(self, path: bytes, old: Node) -> None:
        self.found.append(Change("D", path))
        if is_directory(old):
            self.deleted_beneath(path, old)

    def deleted_beneath(self, path: bytes, old: Node) -> None:
        for name, node in self.names(old).items():
            self.deleted(join(path, name), node)


def is_directory(node: Node) -> bool:
    return node.is_dir if isinstance(node, Lowered) else node.dir is not None


def same_file(live: Inode, old: Inode) -> bool:
    """The same file has what it had (atime and ctime aside; a directory's entries
    are compared name by name, not here)."""
    if (live.mode, live.uid, live.gid, live.rdev, live.mtime_ns, live.target, live.xattrs) != (
        old.mode, old.uid, old.gid, old.rdev, old.mtime_ns, old.target, old.xattrs
    ):
        return False
    if live.dir is None and live.nlink != old.nlink:
        return False
    if live.content is not None and old.content is not None:
        return live.content.same_as(old.content)
    return True
