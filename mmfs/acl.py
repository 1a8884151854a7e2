"""POSIX ACL inheritance: what a new file gets from its directory's default ACL.

ACLs are stored as the kernel's ``system.posix_acl_*`` xattr values (version 2
header, then (tag, perm, id) entries).  The kernel checks them and validates what
it sends; the filesystem
has to apply a directory's default ACL to new entries
(the kernel's ``posix_acl_create_masq``) and to keep the access ACL and the
mode bits in step both ways, clearing the setgid bit as the kernel's
``posix_acl_update_mode`` does when who sets an access ACL is neither in the
file's group nor privileged.  Pure functions over bytes and credentials.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
HEADER = struct.Struct("<I")
ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


@dataclass(frozen=True)
class Caller:
    """Who sets an ACL: the groups the kernel counts (fsgid and supplementary
    groups) and whether it holds CAP_FSETID."""

    groups: frozenset[int]
    fsetid: bool

    def keeps_setgid(self, gid: int) -> bool:
        """Whether a file of group ``gid`` keeps its setgid bit when this caller
        sets its access ACL (the kernel's in_group_or_capable)."""
        return self.fsetid or gid in self.groups


def inherit(default_acl: bytes, mode: int) -> tuple[int, bytes | None]:
    """The new mode and access ACL (None if the mode says it all) for a file
    created with ``mode`` under a directory with ``default_acl``."""
    entries = _entries(default_acl)
    perms = mode & 0o777
    extended = False
    group_obj = mask = None
    for entry in entries:
        tag = entry[0]
        if tag == USER_OBJ:
            entry[1] &= perms >> 6
            perms &= (entry[1] << 6) | 0o077
        elif tag == OTHER:
            entry[1] &= perms & 0o7
            perms &= entry[1] | 0o770
        elif tag == GROUP_OBJ:
            group_obj = entry
        elif tag == MASK:
            mask, extended = entry, True
        else:
            extended = True
    governing = mask if mask is not None else group_obj
    if governing is not None:
        governing[1] &= (perms >> 3) & 0o7
        perms &= (governing[1] << 3) | 0o707
    new_mode = (mode & ~0o777) | perms
    if not extended:
        return new_mode, None
    return new_mode, _pack(default_acl, entries)


def _entries(value: bytes) -> list[list[int]]:
    return [list(ENTRY.unpack_from(value, offset)) for offset in range(HEADER.size, len(value), ENTRY.size)]


def _pack(header: bytes, entries: list[list[int]]) -> bytes:
    return header[: HEADER.size] + b"".join(ENTRY.pack(*entry) for entry in entries)


def mode_from(access_acl: bytes) -> tuple[int, bool]:
    """Permission bits an access ACL implies, and whether the mode says it all."""
    perms = {tag: perm for tag, perm, _ in (tuple(e) for e in _entries(access_acl))}
    group = perms.get(MASK, perms.get(GROUP_OBJ, 0))
    equivalent = not any(tag in perms for tag in (USER, GROUP, MASK))
    return perms.get(USER_OBJ, 0) << 6 | group << 3 | perms.get(OTHER, 0), equivalent


def chmod(access_acl: bytes, mode: int) -> bytes:
    """The access ACL rewritten to agree with new permission bits (posix_acl_chmod)."""
    entries = _entries(access_acl)
    has_mask = any(entry[0] == MASK for entry in entries)
    for entry in entries:
        if entry[0] == USER_OBJ:
            entry[1] = mode >> 6 & 7
        elif entry[0] == MASK or (entry[0] == GROUP_OBJ and not has_mask):
            entry[1] = mode >> 3 & 7
        elif entry[0] == OTHER:
            entry[1] = mode & 7
    return _pack(access_acl, entries)
