"""The overlay's side of the model: LOWERDIR's names become inodes lazily, and
each hard-linked lower file is one inode.

A lower directory is listed the first time its names are needed
(``fs.Filesystem.entries``): ``listing`` gives its entries in the order a
``cp -a`` copy on tmpfs would have linked them, and ``inode`` makes the inode of
each, or finds the one already made for another name of the same file.

Link counts of hard-linked lower files: such a file shows the st_nlink it has on
LOWERDIR's filesystem, adjusted by the links made and names removed in the
mount; its names in directories not listed yet are ``hidden_links``.  When its
last name known to the mount goes, ``settle_hidden_links`` finds which of those
are really inside LOWERDIR.

No pyfuse3, no trio; synchronous, like the rest of the model.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable, Iterable

from .inode import Content, Directory, Inode, Lower
from .lower import LowerEntry

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (st_dev, st_ino) of a lower file


def copy_lower_attrs(inode: Inode, entry: LowerEntry) -> None:
    st = entry.st
    inode.mode, inode.uid, inode.gid, inode.rdev = st.st_mode, st.st_uid, st.st_gid, st.st_rdev
    inode.atime_ns, inode.mtime_ns, inode.ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    inode.target, inode.xattrs = entry.target, dict(entry.xattrs or {})


class Overlay:
    """LOWERDIR seen by the model, and the registry of hard-linked lower files."""

    def __init__(self, lower: Lower, content: Callable[[LowerEntry], Content]) -> None:
        self.lower = lower
        self.content = content  # the bytes of a lower regular file
        self.links: dict[Key, Inode] = {}  # hard-linked lower files known to the mount
        # Names of hard-linked lower files in the lower directories not listed
        # yet: counted once (None until then), kept up to date as those
        # directories are listed.
        self.unlisted_links: dict[Key, int] | None = None

    def listing(self, directory: Directory) -> list[LowerEntry]:
        """The entries of a directory's backing directory, which counts as listed
        from now on.  The reference is its ``cp -a`` copy on tmpfs: cp creates
        the entries in the order of their inode numbers (as getdents gives them;
        the same number keeps getdents order), so they are linked in that order
        and list newest first, by descending inode number.  OSError if the
        backing directory cannot be read."""
        assert directory.unlisted is not None
        entries = sorted(self.lower.list(directory.unlisted), key=lambda entry: entry.dirent_ino)
        directory.unlisted = None
        for entry in entries:
            self._listed(entry)
        return entries

    def _listed(self, entry: LowerEntry) -> None:
        """A name counted in ``unlisted_links`` was listed: it counts no more."""
        key = (entry.st.st_dev, entry.st.st_ino)
        if self.unlisted_links is not None and key in self.unlisted_links:
            self.unlisted_links[key] -= 1
            if not self.unlisted_links[key]:
                del self.unlisted_links[key]

    def inode(self, entry: LowerEntry, parent: Inode, new_inode: Callable[[LowerEntry], Inode]) -> Inode:
        """The inode of a listed entry of ``parent``: the one of another name of
        the same file listed before, or a new one (``new_inode(entry)``)."""
        st = entry.st
        key = (st.st_dev, st.st_ino)
        known = self.links.get(key)
        if known is not None and not stat.S_ISDIR(st.st_mode):
            if known.hidden_links:
                known.hidden_links -= 1
            else:
                known.nlink += 1
            return known
        inode = new_inode(entry)
        copy_lower_attrs(inode, entry)
        inode.origin, inode.changed = entry.path, False
        if stat.S_ISDIR(st.st_mode):
            inode.dir, inode.nlink = Directory(parent.ino, unlisted=entry.path), 2
            parent.nlink += 1
        elif stat.S_ISREG(st.st_mode):
            inode.content = self.content(entry)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            inode.nlink, inode.hidden_links = st.st_nlink, st.st_nlink - 1
            inode.lower_key = key
            self.links[key] = inode
        return inode

    def forget(self, inode: Inode) -> None:
        """``inode`` is freed."""
        if inode.lower_key is not None:
            del self.links[inode.lower_key]

    def settle_hidden_links(self, inode: Inode, directories: Iterable[Directory]) -> None:
        """The last name of a hard-linked lower file known to the mount went while
        LOWERDIR's filesystem counts more (``hidden_links``).  Those not in a
        lower directory still to be listed are outside LOWERDIR: they stop
        counting, so that the file is freed if none is left inside.

        Which names are inside is found by walking every lower directory not
        listed yet (among ``directories``, the mount's), once per mount
        (``unlisted_links``).  If the walk fails, the count stays: the file is
        kept rather than freed too early."""
        if self.unlisted_links is None:
            roots = [directory.unlisted for directory in directories if directory.unlisted is not None]
            try:
                self.unlisted_links = self.lower.count_links(roots)
            except OSError as error:
                log.warning("cannot count the hard links in LOWERDIR's directories not listed yet: %s", error)
                return
        assert inode.lower_key is not None
        inside = min(inode.hidden_links, self.unlisted_links.get(inode.lower_key, 0))
        inode.nlink -= inode.hidden_links - inside
        inode.hidden_links = inside
