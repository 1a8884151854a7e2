"""Tree snapshots: what each entry under a root looks like, compared path by path.

``scan`` lists a tree without touching an access time: directories are opened
with O_NOATIME (root may) and symlinks are never followed.  ``snapshot``
records, for each path relative to the root (the root itself is b""), the
stat fields asked for, then, if asked, a digest of each regular file's bytes,
each symlink's target and each entry's xattrs.  Every lstat comes before any
of those reads, so a snapshot may record atimes; but ``readlink`` updates a
symlink's atime, so two snapshots of one tree that must agree on atimes leave
``target`` out (or settle the symlinks' atimes first).

``differences`` lists what differs between two snapshots; ``compare_trees``
requires two trees (an oracle and mmfs) to agree on everything two
filesystems must agree on, hard-link groups included.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from support.syscalls import attempt

MiB = 1 << 20
NOATIME_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC
NOATIME_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC

Root = Path | bytes
Tree = dict[bytes, dict[str, Any]]  # relative path -> field -> value
Skip = Callable[[bytes, str], bool]  # (relative path, field): leave this one out of a comparison?

STAT_FIELDS: dict[str, Callable[[os.stat_result], Any]] = {
    "type": lambda st: stat.S_IFMT(st.st_mode),
    "mode": lambda st: oct(st.st_mode),
    "uid": lambda st: st.st_uid,
    "gid": lambda st: st.st_gid,
    "size": lambda st: st.st_size,
    "blocks": lambda st: st.st_blocks,
    "ino": lambda st: st.st_ino,
    "nlink": lambda st: st.st_nlink,
    "rdev": lambda st: st.st_rdev,
    "mtime_ns": lambda st: st.st_mtime_ns,
    "ctime_ns": lambda st: st.st_ctime_ns,
    "atime_ns": lambda st: st.st_atime_ns,
}
ALL_STATS = tuple(STAT_FIELDS)
# What two filesystems holding the same tree must agree on: no times, no inode numbers.
SHARED_STATS = ("mode", "uid", "gid", "size", "nlink", "rdev", "blocks")


def join(root: Root, rel: bytes) -> bytes:
    """The path of ``rel`` (relative, b"" for the root itself) under ``root``."""
    base = os.fsencode(root)
    return base + b"/" + rel if rel else base


def digest(data: bytes) -> str:
    """A short digest of some bytes, for results and messages."""
    return hashlib.sha256(data).hexdigest()[:16]


def scan(root: Root) -> list[bytes]:
    """Every path under root, relative (root itself is b""), sorted; O_NOATIME, no symlink followed."""
    out = [b""]

    def visit(rel: bytes) -> None:
        fd = os.open(join(root, rel), NOATIME_DIR)
        try:
            with os.scandir(fd) as entries:
                children = sorted((os.fsencode(entry.name), entry.is_dir(follow_symlinks=False)) for entry in entries)
        finally:
            os.close(fd)
        for name, is_dir in children:
            child = rel + b"/" + name if rel else name
            out.append(child)
            if is_dir:
                visit(child)

    visit(b"")
    return sorted(out)


def read_noatime(path: bytes | Path) -> bytes:
    """A file's bytes, read without touching its atime."""
    fd = os.open(path, NOATIME_FILE)
    try:
        return b"".join(iter(lambda: os.read(fd, 4 * MiB), b""))
    finally:
        os.close(fd)


def file_digest(path: bytes) -> str:
    """The digest of a file's bytes, read without touching its atime."""
    fd = os.open(path, NOATIME_FILE)
    try:
        hasher = hashlib.sha256()
        while chunk := os.read(fd, 4 * MiB):
            hasher.update(chunk)
        return hasher.hexdigest()[:16]
    finally:
        os.close(fd)


def extents_digest(path: bytes) -> str:
    """A file's bytes hashed extent by extent (SEEK_DATA/SEEK_HOLE), with O_NOATIME:
    a sparse file of many GiB costs only its data.  Only for comparing a file
    with itself: a filesystem without holes (mmfs) hashes the same bytes differently."""
    fd = os.open(path, NOATIME_FILE)
    try:
        size = os.fstat(fd).st_size
        hasher = hashlib.sha256(b"%d:" % size)
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fd, offset, os.SEEK_HOLE)
            hasher.update(b"%d:" % offset)
            while offset < end:
                chunk = os.pread(fd, min(4 * MiB, end - offset), offset)
                assert chunk, f"{path!r} shrank while hashed"
                hasher.update(chunk)
                offset += len(chunk)
        return hasher.hexdigest()[:16]
    finally:
        os.close(fd)


def xattr_digests(path: bytes) -> dict[str, str]:
    """Name -> digest of the value, or the errno reading it (an empty security.capability reads as EINVAL)."""
    out = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        status, value = attempt(functools.partial(os.getxattr, path, name, follow_symlinks=False))
        out[name] = digest(value) if status == "ok" else value
    return out


def snapshot(
    root: Root,
    paths: Sequence[bytes] | None = None,
    *,
    stats: Sequence[str] = SHARED_STATS,
    content: Callable[[bytes], str] | None = None,
    target: bool = True,
    xattrs: bool = True,
) -> Tree:
    """Per relative path: the ``stats`` fields (names in STAT_FIELDS), then
    ``content(path)`` of regular files, the ``target`` of symlinks and the
    ``xattrs``, each only if asked.  All lstats come first.

    Given ``paths``, no directory is listed at all (each path is only looked up).
    """
    paths = scan(root) if paths is None else paths
    stat_results = {rel: os.lstat(join(root, rel)) for rel in paths}  # atime-sensitive: before anything else
    tree: Tree = {}
    for rel, st in stat_results.items():
        path = join(root, rel)
        entry = {field: STAT_FIELDS[field](st) for field in stats}
        if content is not None and stat.S_ISREG(st.st_mode):
            entry["content"] = content(path)
        if target and stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        if xattrs:
            entry["xattrs"] = xattr_digests(path)
        tree[rel] = entry
    return tree


def differences(
    want: Tree, got: Tree, skip: Skip | None = None, labels: tuple[str, str] = ("before", "now")
) -> list[str]:
    """One line per path only in one tree and per field that differs (unless ``skip`` says so)."""
    problems = [f"only {labels[0]}: {rel!r}" for rel in sorted(want.keys() - got.keys())]
    problems += [f"only {labels[1]}: {rel!r}" for rel in sorted(got.keys() - want.keys())]
    for rel in sorted(want.keys() & got.keys()):
        for key in sorted(want[rel].keys() | got[rel].keys()):
            if (skip is None or not skip(rel, key)) and want[rel].get(key) != got[rel].get(key):
                was, now = want[rel].get(key), got[rel].get(key)
                problems.append(f"{rel!r} {key}: {labels[0]} {was!r}, {labels[1]} {now!r}")
    return problems


def link_groups(root: Root) -> set[frozenset[bytes]]:
    """The names of each non-directory that has several, within one tree."""
    groups: dict[int, set[bytes]] = {}
    for rel in scan(root):
        st = os.lstat(join(root, rel))
        if not stat.S_ISDIR(st.st_mode):
            groups.setdefault(st.st_ino, set()).add(rel)
    return {frozenset(names) for names in groups.values() if len(names) > 1}


def compare_trees(
    oracle: Root,
    subject: Root,
    label: str,
    *,
    stats: Sequence[str] = SHARED_STATS,
    skip: Skip | None = None,
    labels: tuple[str, str] = ("on tmpfs", "on mmfs"),
) -> None:
    """Require equal trees: the ``stats`` fields, contents, symlink targets,
    xattrs (less what ``skip`` leaves out) and hard-link groups."""
    want = snapshot(oracle, stats=stats, content=file_digest)
    got = snapshot(subject, stats=stats, content=file_digest)
    problems = differences(want, got, skip, labels)
    want_links, got_links = link_groups(oracle), link_groups(subject)
    if want_links != got_links:
        problems.append(
            f"hard links: {labels[0]} {sorted(map(sorted, want_links))}, {labels[1]} {sorted(map(sorted, got_links))}"
        )
    assert not problems, f"{label}: trees differ:\n" + "\n".join(problems[:40])
