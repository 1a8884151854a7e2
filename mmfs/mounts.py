"""The kernel's mount table, read from ``/proc/self/mountinfo``.

One parser for every place that asks "what is mounted there?": the check
that refuses a second mount, the readahead widening, and the test harness.
Paths are ``bytes`` as the kernel has them: mountinfo escapes space, tab,
newline and backslash as ``\\040 \\011 \\012 \\134`` and leaves every other byte
(UTF-8 or not) as it is, so fields are split on spaces and unescaped as bytes.

Pure parsing plus one read of a proc file; no FUSE, no trio.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> bytes:
    """A mountinfo field with its octal escapes (``\\040`` ...) turned back into bytes."""
    return _ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: the fields mmfs needs."""

    mount_id: int  # unique among the mounts of the namespace (fdinfo's mnt_id)
    device: str  # "major:minor" of the mounted filesystem (st_dev)
    mountpoint: bytes
    fstype: str
    source: bytes
    super_options: bytes = b""

    @property
    def user_id(self) -> int | None:
        """The uid of the user who mounted a FUSE filesystem (its ``user_id=``)."""
        for option in self.super_options.split(b","):
            if option.startswith(b"user_id="):
                return int(option[len(b"user_id=") :])
        return None


def parse_line(line: bytes) -> MountEntry:
    """One mountinfo line; see proc(5) for the layout (optional fields end at "-")."""
    fields = line.rstrip(b"\n").split(b" ")
    tail = fields.index(b"-")
    return MountEntry(
        mount_id=int(fields[0]),
        device=fields[2].decode(),
        mountpoint=unescape(fields[4]),
        fstype=unescape(fields[tail + 1]).decode(errors="replace"),
        source=unescape(fields[tail + 2]),
        super_options=unescape(fields[tail + 3]) if len(fields) > tail + 3 else b"",
    )


def mount_table(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount this process can see, oldest first."""
    with open(mountinfo, "rb") as table:
        return [parse_line(line) for line in table if line.strip()]


def mounted_at(path: str | bytes) -> MountEntry | None:
    """The topmost mount whose mountpoint is exactly ``path`` (already a real path), if any."""
    target = os.fsencode(path)
    found = None
    for entry in mount_table():
        if entry.mountpoint == target:
            found = entry  # later lines are mounted on top of earlier ones
    return found


def device_of_descriptor(fd: int) -> str | None:
    """"MAJOR:MINOR" of the filesystem an open file is on, found without asking
    that filesystem (fdinfo's mount id and the mount table: no stat)."""
    with open(f"/proc/self/fdinfo/{fd}") as info:
        mount_id = next((int(line.split()[1]) for line in info if line.startswith("mnt_id:")), None)
    return next((entry.device for entry in mount_table() if entry.mount_id == mount_id), None)
