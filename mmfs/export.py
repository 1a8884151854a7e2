"""``mmfs export``: an overlay mount's changes written as a kernel overlayfs
upper directory.

Mounting ``-t overlay -o lowerdir=LOWERDIR,upperdir=DIR,workdir=W`` then shows
the tree the mmfs mount shows: names, types, bytes, modes, owners, times,
symlink targets, xattrs (ACLs as their raw ``system.posix_acl_*`` bytes) and
hard links.  What goes into DIR, from ``changes.diff``:

- a deleted path: a whiteout, the 0/0 character device (unprivileged users
  may make one); nothing beneath a deleted directory;
- an added or changed file, complete: its bytes (read from the model, holes
  kept: pages of zeros are not written), then owner, xattrs, mode (after the
  owner: chown clears setuid) and times, in that order;
- a directory that replaces a lower one (new, renamed onto it, another type)
  and an added directory: a copy of all of it.  One that replaces a lower
  directory is opaque: ``trusted.overlay.opaque`` = ``y`` as root, else
  ``user.overlay.opaque``, which kernel overlayfs reads with its ``userxattr``
  option (a renamed lower directory is such a copy: no redirect xattrs);
- a directory on the way to a change, or whose own attributes changed: made
  with the mount's attributes, as overlayfs shows an upper directory's over a
  merged one; its times are set after its children are written;
- DIR itself: the root's mode, owner, xattrs and times.

Each file is written once; its other names exported are hard links to it, and
when some of its names would otherwise be left out (a lower file with names
elsewhere), every name it has in the mount is exported.  A 0/0 character
device made in the mount (a whiteout of mmfs used as an upper layer itself)
reads as a whiteout there too: the format cannot hold one.  Names it cannot
hold beyond that, such as hard links to files outside LOWERDIR, are not
exported.

Never follows a symlink in DIR: every call is relative to a directory
descriptor opened without following one.  As a user who cannot set an owner
or a trusted./security. xattr, those are counted in the report, not errors.

Synchronous, on the daemon's loop: FUSE requests wait, and the export is a
consistent snapshot of the mount.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import control
from .changes import Change, diff, error_text, join
from .fs import ROOT_INO, Filesystem, FsError
from .inode import Inode
from .linux import openat2_beneath
from .quoting import quote_path

if TYPE_CHECKING:
    from .daemon import Daemon

PAGE = 4096
CHUNK = 1 << 20  # bytes read from the model at a time
ZERO_CHUNK = bytes(CHUNK)
ZERO_PAGE = bytes(PAGE)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NOT_PERMITTED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EINVAL)  # an owner or an xattr DIR will not take


@dataclass
class ExportReport:
    """What an export wrote."""

    files: int = 0  # regular files written
    directories: int = 0  # directories made (DIR itself not counted)
    symlinks: int = 0
    special_files: int = 0  # devices, fifos and sockets
    hard_links: int = 0  # further names of files written
    whiteouts: int = 0
    opaque_directories: int = 0
    bytes_written: int = 0
    owners_not_kept: int = 0  # files whose owner could not be set (not root)
    xattrs_not_kept: int = 0  # xattrs that DIR refused (trusted.* and security.* when not root)


@dataclass
class Plan:
    """Which paths of the mount an export visits, from the diff."""

    whole: dict[bytes, Change] = field(default_factory=dict)  # written complete (A and M)
    on_the_way: set[bytes] = field(default_factory=set)  # directories above a change
    deleted: dict[bytes, list[bytes]] = field(default_factory=dict)  # directory -> names to white out

    def add(self, change: Change) -> None:
        parent, _, name = change.path.rpartition(b"/")
        if change.kind == "D":
            self.deleted.setdefault(parent, []).append(name)
        elif change.path != b".":
            self.whole[change.path] = change
        while parent and parent not in self.on_the_way:
            self.on_the_way.add(parent)
            parent = parent.rpartition(b"/")[0]


@dataclass(frozen=True)
class Step:
    """One thing to do in DIR, in order: enter (make) a directory, write a
    file or a whiteout, leave a directory (set its attributes)."""

    action: str  # "enter", "write", "whiteout" or "leave"
    path: bytes  # relative to DIR; b"" for DIR itself
    inode: Inode | None = None
    opaque: bool = False  # enter: the directory hides LOWERDIR's of its path


def export(fs: Filesystem, dirfd: int) -> ExportReport:
    """Write the changes of ``fs`` (overlay mode) into the empty directory ``dirfd``."""
    root = os.open(".", DIR_FLAGS, dir_fd=dirfd)
    try:
        if os.listdir(root):
            raise control.RequestError("export: the directory to write to is not empty")
        try:
            plan = Plan()
            for change in diff(fs):
                plan.add(change)
            steps = list(walk(fs, plan))
            if complete_links(fs, plan, steps):
                steps = list(walk(fs, plan))
        except (OSError, FsError) as error:
            raise control.RequestError(f"export: cannot read LOWERDIR: {error_text(error)}") from None
        writer = Writer(root)
        writer.run(steps)
        return writer.report
    finally:
        os.close(root)


def walk(fs: Filesystem, plan: Plan) -> Iterator[Step]:
    """The steps of an export, depth first through the mount's directories."""
    root = fs.inodes[ROOT_INO]
    yield Step("enter", b"", root)
    yield from whiteouts(plan, b"")
    pending = [(b"", root, False, iter(fs.entries(root).items()))]  # directory, its inode, copied whole, its names
    while pending:
        path, directory, whole, names = pending[-1]
        item = next(names, None)
        if item is None:
            pending.pop()
            yield Step("leave", path, directory)
            continue
        name, (ino, _) = item
        child, child_path = fs.inodes[ino], join(path, name)
        change = plan.whole.get(child_path)
        if not whole and change is None and child_path not in plan.on_the_way:
            continue
        if child.dir is None:
            yield Step("write", child_path, child)
            continue
        replaces = change is not None and (change.kind == "A" or change.replaces)
        hides_lower = change is not None and change.replaces and change.lower_dir
        yield Step("enter", child_path, child, opaque=not whole and hides_lower)
        if not whole and not replaces:
            yield from whiteouts(plan, child_path)
        pending.append((child_path, child, whole or replaces, iter(fs.entries(child).items())))


def whiteouts(plan: Plan, directory: bytes) -> Iterator[Step]:
    for name in plan.deleted.get(directory, ()):
        yield Step("whiteout", join(directory, name))


def complete_links(fs: Filesystem, plan: Plan, steps: list[Step]) -> bool:
    """Add to ``plan`` the names left out of files written with some of their
    names only: overlayfs would show those as other files (LOWERDIR's).  Lists
    the whole mount, in that rare case.  Whether any name was added."""
    names: dict[int, int] = {}
    for step in steps:
        if step.action == "write" and step.inode is not None and step.inode.nlink > 1:
            names[step.inode.ino] = names.get(step.inode.ino, 0) + 1
    short = {ino for ino, count in names.items() if count < fs.inodes[ino].nlink}
    if not short:
        return False
    written = {step.path for step in steps if step.action == "write"}
    added = False
    pending = [(b"", fs.inodes[ROOT_INO])]
    while pending:
        path, directory = pending.pop()
        for name, (ino, _) in fs.entries(directory).items():
            child, child_path = fs.inodes[ino], join(path, name)
            if child.dir is not None:
                pending.append((child_path, child))
            elif ino in short and child_path not in written:
                plan.add(Change("M", child_path, child))
                added = True
    return added


class Writer:
    """Carries out the steps in DIR."""

    def __init__(self, root: int) -> None:
        self.report = ExportReport()
        self.directories: list[int] = [root]  # descriptors of the directories entered, DIR first
        self.first_names: dict[int, bytes] = {}  # inode number -> the path its bytes were written at
        self.opaque = b"trusted.overlay.opaque" if os.geteuid() == 0 else b"user.overlay.opaque"

    def run(self, steps: list[Step]) -> None:
        try:
            for step in steps:
                try:
                    self.do(step)
                except (OSError, FsError) as error:
                    shown = quote_path(step.path or b".")
                    raise control.RequestError(f"export: {shown}: {error_text(error)}") from None
        finally:
            for fd in self.directories[1:]:
                os.close(fd)

    def do(self, step: Step) -> None:
        name = step.path.rpartition(b"/")[2]
        here = self.directories[-1]
        if step.action == "whiteout":
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=here)
            self.report.whiteouts += 1
            return
        inode = step.inode
        assert inode is not None
        if step.action == "write":
            self.write(here, name, step.path, inode)
        elif step.action == "enter" and step.path:
            os.mkdir(name, 0o700, dir_fd=here)
            self.directories.append(os.open(name, DIR_FLAGS, dir_fd=here))
            self.report.directories += 1
            if step.opaque:
                os.setxattr(self.directories[-1], self.opaque, b"y")
                self.report.opaque_directories += 1
        elif step.action == "leave":
            fd = self.directories[-1]
            self.set_attributes(fd, inode)
            if step.path:
                os.close(self.directories.pop())

    def write(self, here: int, name: bytes, path: bytes, inode: Inode) -> None:
        """A non-directory: written at its first name, linked at the others."""
        first = self.first_names.get(inode.ino)
        if first is not None:
            self.link(first, here, name)
            return
        if inode.nlink > 1:
            self.first_names[inode.ino] = path
        kind = stat.S_IFMT(inode.mode)
        if kind == stat.S_IFREG:
            self.regular_file(here, name, inode)
        elif kind == stat.S_IFLNK:
            os.symlink(inode.target, name, dir_fd=here)
            self.set_attributes_by_name(here, name, inode)
            self.report.symlinks += 1
        else:
            os.mknod(name, kind | 0o600, inode.rdev, dir_fd=here)
            self.set_attributes_by_name(here, name, inode)
            self.report.special_files += 1

    def link(self, first: bytes, here: int, name: bytes) -> None:
        parent, _, first_name = first.rpartition(b"/")
        source = openat2_beneath(self.directories[0], parent or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(first_name, name, src_dir_fd=source, dst_dir_fd=here, follow_symlinks=False)
        finally:
            os.close(source)
        self.report.hard_links += 1

    def regular_file(self, here: int, name: bytes, inode: Inode) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=here)
        try:
            self.write_content(fd, inode)
            self.set_attributes(fd, inode)
        finally:
            os.close(fd)
            if not inode.opens and inode.content is not None:
                inode.content.closed()  # reading it opened its backing file: not kept open
        self.report.files += 1

    def write_content(self, fd: int, inode: Inode) -> None:
        """The file's bytes; pages of zeros are left as holes."""
        content = inode.content
        assert content is not None
        offset = 0
        while offset < content.size:
            data = content.read(offset, CHUNK)
            if isinstance(data, memoryview):
                data = bytes(data)
            if data != ZERO_CHUNK[: len(data)]:
                for start, end in data_runs(data):
                    os.pwrite(fd, memoryview(data)[start:end], offset + start)
                    self.report.bytes_written += end - start
            offset += len(data)
        os.ftruncate(fd, content.size)

    def set_attributes(self, fd: int, inode: Inode) -> None:
        """Owner, xattrs, mode, times of an open file or directory, in that order."""
        try:
            os.chown(fd, inode.uid, inode.gid)
        except PermissionError:
            self.report.owners_not_kept += 1
        for key, value in inode.xattrs.items():
            self.set_xattr(fd, key, value)
        os.chmod(fd, stat.S_IMODE(inode.mode))
        os.utime(fd, ns=(inode.atime_ns, inode.mtime_ns))

    def set_attributes_by_name(self, here: int, name: bytes, inode: Inode) -> None:
        """The same for a symlink or special file (never opened, never followed)."""
        try:
            os.chown(name, inode.uid, inode.gid, dir_fd=here, follow_symlinks=False)
        except PermissionError:
            self.report.owners_not_kept += 1
        for key, value in inode.xattrs.items():
            self.set_xattr(b"/proc/self/fd/%d/%s" % (here, name), key, value)
        if not stat.S_ISLNK(inode.mode):
            os.chmod(name, stat.S_IMODE(inode.mode), dir_fd=here, follow_symlinks=False)
        os.utime(name, ns=(inode.atime_ns, inode.mtime_ns), dir_fd=here, follow_symlinks=False)

    def set_xattr(self, target: int | bytes, key: bytes, value: bytes) -> None:
        """One xattr, on a descriptor or (without following it) a path."""
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as error:
            if error.errno not in NOT_PERMITTED:
                raise
            self.report.xattrs_not_kept += 1


def data_runs(data: bytes | bytearray) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of pages of ``data`` that are not all zeros."""
    if data.find(ZERO_PAGE) < 0:  # no page can be all zeros
        yield 0, len(data)
        return
    start = None
    for page in range(0, len(data), PAGE):
        zero = data[page : page + PAGE] == ZERO_PAGE[: min(PAGE, len(data) - page)]
        if zero and start is not None:
            yield start, page
            start = None
        elif not zero and start is None:
            start = page
    if start is not None:
        yield start, len(data)


# --- the control channel ------------------------------------------------------------
def handle_export(daemon: Daemon, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """``{"op": "export"}`` with the descriptor of DIR (opened by the client):
    the report, as a dict."""
    try:
        if daemon.fs.overlay is None:
            raise control.RequestError("export needs overlay mode (tmpfs mode has nothing to compare with)")
        if len(fds) != 1:
            raise control.RequestError("export: expected the descriptor of the directory to write to")
        return asdict(export(daemon.fs, fds[0]))
    finally:
        for fd in fds:
            os.close(fd)
