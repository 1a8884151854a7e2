"""What differs between an overlay mount and its LOWERDIR: ``mmfs diff``.

Path by path, like ``diff -r`` between LOWERDIR and the mount: a path only in
LOWERDIR is deleted (``D``), only in the mount added (``A``), in both changed
(``M``) when another file is there now (another type, or not the lower file of
that path: a rename over it, a new file) or when its content, mode, owner,
mtime, xattrs (ACLs included), symlink target, device number or link count
(not a directory's: filesystems count those differently) differ.  atime and
ctime never count.  Everything beneath an added or deleted directory is added
or deleted too, so a renamed entry is ``D old`` plus ``A new`` with everything
beneath each.

Answered from what the model knows, never by reading a file's bytes: every
mutation marks an inode ``changed`` (``Inode.changed``), and a lower file's
content says whether it was written or truncated (``Content.modified``), so a
file whose pages were rewritten with the same bytes is ``M``.  The walk goes
through the directories listed so far (one not listed yet is LOWERDIR's as
it is), and compares with LOWERDIR only at changed inodes: one lstat and its
xattrs per changed path, and the names (getdents only) of changed directories.
Everything beneath a new directory or a renamed one is listed through the
model; beneath a deleted one, LOWERDIR's names are walked.  Nothing is opened
but directories, and no symlink is followed (``lower.LowerDir``).

Synchronous, on the daemon's loop: a consistent snapshot of the model.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import control
from .fs import ROOT_INO, Filesystem, FsError
from .inode import Inode, Lower
from .lower import LowerEntry

if TYPE_CHECKING:
    from .daemon import Daemon


@dataclass(frozen=True, slots=True)
class Change:
    """One path that differs from LOWERDIR."""

    kind: str  # "A" added, "D" deleted, "M" changed
    path: bytes  # relative to the mount root; the root itself is b"."
    inode: Inode | None = None  # the mount's file at ``path`` (A and M)
    replaces: bool = False  # M: another file than LOWERDIR's is there now (type or origin differ)
    lower_dir: bool = False  # D and M: LOWERDIR has a directory at ``path``


def diff(fs: Filesystem) -> list[Change]:
    """Every path that differs from LOWERDIR, sorted by path (bytes order, the root first)."""
    changes = Walk(fs).run()
    changes.sort(key=lambda change: b"" if change.path == b"." else change.path)
    return changes


def join(parent: bytes, name: bytes) -> bytes:
    """A path relative to the root (b"" for the root itself)."""
    return parent + b"/" + name if parent else name


class Walk:
    """One diff: a walk of the mount's directories against LOWERDIR's."""

    def __init__(self, fs: Filesystem) -> None:
        assert fs.overlay is not None
        self.fs = fs
        self.lower: Lower = fs.overlay.lower
        self.inodes = fs.inodes
        self.found: list[Change] = []
        self.pending: list[tuple[Inode, bytes, bool, bool]] = []  # directories to walk: see ``directory``

    def run(self) -> list[Change]:
        root = self.inodes[ROOT_INO]
        if self.hidden_names_changed():
            self.list_everything()
        if root.changed and differs(root, self.lower.entry(b"", b".")):
            self.found.append(Change("M", b".", root, lower_dir=True))
        self.pending.append((root, b"", True, True))
        while self.pending:
            self.directory(*self.pending.pop())
        return self.found

    def hidden_names_changed(self) -> bool:
        """Whether a changed hard-linked lower file has names in directories not
        listed yet: those names differ from LOWERDIR's too."""
        assert self.fs.overlay is not None
        return any(inode.changed and inode.hidden_links for inode in self.fs.overlay.links.values())

    def list_everything(self) -> None:
        """List every directory not listed yet (rare: see ``hidden_names_changed``)."""
        pending = [self.inodes[ROOT_INO]]
        while pending:
            entries = self.fs.entries(pending.pop())
            pending += [child for ino, _ in entries.values() if (child := self.inodes[ino]).dir is not None]

    def directory(self, inode: Inode, path: bytes, same: bool, lower_dir: bool) -> None:
        """The entries of a mount directory at ``path``.  ``same``: it is the
        lower directory of that path; ``lower_dir``: LOWERDIR has a directory there."""
        assert inode.dir is not None
        if same and inode.dir.unlisted is not None:
            return  # not listed yet: LOWERDIR's names, as they are there
        if same and not inode.changed:
            self.unchanged_directory(inode, path)
            return
        entries = self.fs.entries(inode)
        lower_names = dict(self.lower.names(path)) if lower_dir else {}
        for name, (ino, _) in entries.items():
            child = self.inodes[ino]
            if name in lower_names:
                self.in_both(child, path, name)
            else:
                self.added(child, join(path, name))
        for name, is_dir in lower_names.items():
            if name not in entries:
                self.deleted(join(path, name), is_dir)

    def unchanged_directory(self, inode: Inode, path: bytes) -> None:
        """A lower directory that nothing was linked into or removed from: its
        names are LOWERDIR's, and an unchanged entry is the lower file of its
        path (or another name of that lower file).  The cheap common case."""
        assert inode.dir is not None
        for name, (ino, _) in inode.dir.entries.items():
            child = self.inodes[ino]
            if child.changed:
                self.in_both(child, path, name)
            elif child.dir is not None and child.dir.unlisted is None:
                self.pending.append((child, join(path, name), True, True))

    def in_both(self, inode: Inode, parent: bytes, name: bytes) -> None:
        """A name in the mount and in LOWERDIR."""
        path = join(parent, name)
        if inode.origin == path and not inode.changed:
            if inode.dir is not None:
                self.pending.append((inode, path, True, True))
            return
        entry = self.lower.entry(parent, name)
        lower_dir = stat.S_ISDIR(entry.st.st_mode)
        if stat.S_IFMT(inode.mode) != stat.S_IFMT(entry.st.st_mode):
            self.found.append(Change("M", path, inode, replaces=True, lower_dir=lower_dir))
            if inode.dir is not None:
                self.added_beneath(inode, path)
            if lower_dir:
                self.deleted_beneath(path)
            return
        same = inode.origin == path or inode.lower_key == (entry.st.st_dev, entry.st.st_ino)
        if not same or inode.changed and differs(inode, entry):
            self.found.append(Change("M", path, inode, replaces=not same, lower_dir=lower_dir))
        if inode.dir is not None:
            self.pending.append((inode, path, same, True))

    def added(self, inode: Inode, path: bytes) -> None:
        self.found.append(Change("A", path, inode))
        if inode.dir is not None:
            self.added_beneath(inode, path)

    def added_beneath(self, inode: Inode, path: bytes) -> None:
        """Everything beneath a directory that LOWERDIR does not have at ``path``."""
        pending = [(inode, path)]
        while pending:
            directory, at = pending.pop()
            for name, (ino, _) in self.fs.entries(directory).items():
                child, child_path = self.inodes[ino], join(at, name)
                self.found.append(Change("A", child_path, child))
                if child.dir is not None:
                    pending.append((child, child_path))

    def deleted(self, path: bytes, is_dir: bool) -> None:
        self.found.append(Change("D", path, lower_dir=is_dir))
        if is_dir:
            self.deleted_beneath(path)

    def deleted_beneath(self, path: bytes) -> None:
        """Everything beneath a lower directory the mount does not have at ``path``:
        LOWERDIR's names only."""
        pending = [path]
        while pending:
            at = pending.pop()
            for name, is_dir in self.lower.names(at):
                child_path = join(at, name)
                self.found.append(Change("D", child_path, lower_dir=is_dir))
                if is_dir:
                    pending.append(child_path)


def differs(inode: Inode, entry: LowerEntry) -> bool:
    """Whether a file of the mount differs from the lower file it was made from,
    in anything but its atime and ctime (content: if it was written at all)."""
    st = entry.st
    if (inode.mode, inode.uid, inode.gid, inode.mtime_ns, inode.rdev) != (
        st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev
    ):
        return True
    if inode.xattrs != (entry.xattrs or {}) or inode.target != entry.target:
        return True
    if inode.dir is None and inode.nlink != st.st_nlink:
        return True
    return inode.content is not None and (inode.content.modified or inode.content.size != st.st_size)


# --- the control channel ------------------------------------------------------------
def handle_diff(daemon: Daemon, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """``{"op": "diff"}``: ``{"changes": [[kind, path], ...]}``, paths as
    ``os.fsdecode`` strings (JSON carries their undecodable bytes as lone surrogates)."""
    for fd in fds:
        os.close(fd)
    if daemon.fs.overlay is None:
        raise control.RequestError("diff needs overlay mode, or a checkpoint: mmfs diff MOUNTPOINT --since NAME")
    try:
        changes = diff(daemon.fs)
    except (OSError, FsError) as error:
        raise control.RequestError(f"diff: cannot read LOWERDIR: {error_text(error)}") from None
    return {"changes": [[change.kind, os.fsdecode(change.path)] for change in changes]}


def error_text(error: OSError | FsError) -> str:
    """An OSError or FsError in a few words: its strerror and file name, if any."""
    if isinstance(error, FsError):
        return os.strerror(error.errno)
    name = f" ({os.fsdecode(error.filename)})" if error.filename is not None else ""
    return f"{error.strerror or error}{name}"
