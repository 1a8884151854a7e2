"""Command line and ``-o`` option parsing into one typed ``MountConfig``.

Pure functions: nothing here touches the mountpoint or the kernel.  Every
problem is a ``UsageError`` whose message is the single line the user sees.
Options have kernel tmpfs's names and meanings; FUSE's own are passed through;
anything else is an error, never silently ignored.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from . import manual

PAGE = os.sysconf("SC_PAGE_SIZE")

# Generic mount flags that mount(8) and fstab may hand to a helper; libfuse
# applies them to the mount itself.
MOUNT_FLAGS = frozenset("rw ro suid nosuid dev nodev exec noexec async sync dirsync".split())
# The atime flags, as mount(8) turns them into MS_* flags: each sets (True) or
# clears (False) one; ``atime_rule`` then decides as the kernel's do_mount does.
ATIME_FLAGS = {
    "noatime": ("noatime", True), "atime": ("noatime", False),
    "nodiratime": ("nodiratime", True), "diratime": ("nodiratime", False),
    "strictatime": ("strictatime", True), "nostrictatime": ("strictatime", False),
    "relatime": ("relatime", True), "norelatime": ("relatime", False),  # relatime is the default anyway
    "lazytime": ("lazytime", True), "nolazytime": ("lazytime", False),  # when inodes are written back: no effect here
}
# Options that mount(8) uses itself and may still pass along: accepted, no effect.
IGNORED = frozenset(["auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "defaults"])
# What mountinfo shows of a FUSE mount, which mount(8) hands back to the helper
# on a remount: accepted then, and only then, with no effect.
REMOUNT_ECHOES = frozenset(["user_id", "group_id"])
# Options for other programs that fstab lines carry (x-systemd.*, x-gvfs-show,
# comment=...): mount(8) and systemd may pass them to the helper; no effect.
IGNORED_PREFIXES = ("x-", "comment=")
SUFFIXES = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class UsageError(Exception):
    """A bad invocation; ``str()`` is the one line to print."""


def shown(path: str) -> str:
    """A path as one line of a message: quoted if it holds a newline, tab or the like."""
    return path if path.isprintable() else repr(path)


class HelpRequested(Exception):
    """``-h``/``--help`` or ``--version``: ``str()`` is the text to print; exit 0."""


@dataclass
class MountConfig:
    mountpoint: str
    source: str = "mmfs"
    lowerdir: str | None = None
    size: int = 0  # bytes; 0 = unlimited
    nr_inodes: int = 0  # 0 = unlimited
    mode: int | None = None  # None: 1777 (tmpfs) or as LOWERDIR (overlay)
    uid: int | None = None
    gid: int | None = None
    foreground: bool = False
    debug: bool = False
    busy_poll: bool = True
    atime_flags: dict[str, bool] = field(default_factory=dict)  # noatime, nodiratime, strictatime... as set
    log: str | None = None  # the daemon's log file in the background; "-" = syslog
    fuse_options: set[str] = field(default_factory=set)
    remount: bool = False  # -o remount: change the running mount at MOUNTPOINT (remount.py)
    named: set[str] = field(default_factory=set)  # the -o options given with a value ("size", "lowerdir"...)


def ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * PAGE


def parse_number(text: str, name: str) -> int:
    """A count with an optional k/m/g/t/p/e suffix (powers of 1024), as tmpfs."""
    match = re.fullmatch(r"(\d+)([kmgtpe]?)", text.lower())
    if not match:
        raise UsageError(f"bad value for {name}: {text!r}")
    return int(match.group(1)) << SUFFIXES[match.group(2)]


def parse_size(text: str) -> int:
    """``size=``: bytes with suffix, or N% of RAM; rounded up to whole pages."""
    if text.endswith("%"):
        percent = parse_number(text[:-1], "size")
        size = ram_bytes() * percent // 100
    else:
        size = parse_number(text, "size")
    return -(-size // PAGE) * PAGE


def parse_octal(text: str, name: str) -> int:
    if not re.fullmatch(r"[0-7]{1,4}", text):
        raise UsageError(f"bad value for {name}: {text!r}")
    return int(text, 8)


def parse_id(text: str, name: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) >= 2**32 - 1:
        raise UsageError(f"bad value for {name}: {text!r}")
    return int(text)


def apply_option(config: MountConfig, option: str) -> None:
    """Apply one ``-o`` item to ``config``."""
    name, has_value, value = option.partition("=")
    if option.startswith(IGNORED_PREFIXES):
        return
    if not has_value:
        if name in ("ro", "rw"):
            config.fuse_options -= {"ro", "rw"}  # the last one given wins
            config.fuse_options.add(name)
        elif name in MOUNT_FLAGS or name == "allow_other":
            config.fuse_options.add(name)
        elif name in ATIME_FLAGS:
            flag, setting = ATIME_FLAGS[name]
            config.atime_flags[flag] = setting
        elif name == "debug":
            config.debug = True
        elif name == "remount":
            config.remount = True
        elif name not in IGNORED and name != "default_permissions":
            raise UsageError(f"unknown option: {option!r}")
        return
    config.named.add(name)
    if name == "size":
        config.size = parse_size(value)
    elif name == "nr_inodes":
        config.nr_inodes = parse_number(value, name)
    elif name == "mode":
        config.mode = parse_octal(value, name)
    elif name == "uid":
        config.uid = parse_id(value, name)
    elif name == "gid":
        config.gid = parse_id(value, name)
    elif name == "lowerdir":
        if not value:
            raise UsageError("bad value for lowerdir: ''")
        if config.lowerdir is not None and os.path.abspath(config.lowerdir) != os.path.abspath(value):
            raise UsageError(f"two different lowerdirs: {shown(config.lowerdir)} and lowerdir={shown(value)}")
        config.lowerdir = value
    elif name == "busy_poll":
        if value not in ("0", "1"):
            raise UsageError(f"bad value for busy_poll: {value!r} (0 or 1)")
        config.busy_poll = value == "1"
    elif name == "log":
        if not value:
            raise UsageError("bad value for log: ''")
        config.log = value
    elif name == "fsname":
        if not value or "," in value:
            raise UsageError(f"bad value for fsname: {value!r}")
        config.source = value
    elif name in REMOUNT_ECHOES and config.remount:
        parse_id(value, name)
    else:
        raise UsageError(f"unknown option: {option!r}")


def atime_rule(config: MountConfig) -> tuple[str, bool]:
    """("relatime" | "strictatime" | "noatime", diratime) from the atime flags:
    relatime unless noatime, and strictatime overrides noatime (fs/namespace.c)."""
    flags = config.atime_flags
    if flags.get("strictatime"):
        rule = "strictatime"
    elif flags.get("noatime"):
        rule = "noatime"
    else:
        rule = "relatime"
    return rule, not flags.get("nodiratime", False)


def default_config(mountpoint: str) -> MountConfig:
    """tmpfs's defaults: half of RAM, half as many inodes as RAM pages."""
    ram = ram_bytes()
    return MountConfig(mountpoint=mountpoint, size=ram // 2 // PAGE * PAGE, nr_inodes=ram // PAGE // 2)


def parse_args(argv: list[str]) -> MountConfig:
    """Parse ``mmfs`` arguments (without the program name) into a config."""
    positional: list[str] = []
    options: list[str] = []
    foreground = debug = wants_help = False
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            wants_help = True
        elif arg == "--version":
            raise HelpRequested(version())
        elif arg == "-o":
            value = next(args, None)
            if value is None:
                raise UsageError("option -o needs a value")
            options.extend(item for item in value.split(",") if item)
        elif arg.startswith("-o") and len(arg) > 2:
            options.extend(item for item in arg[2:].split(",") if item)
        elif arg == "-f":
            foreground = True
        elif arg in ("-d", "--debug"):
            debug = True
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown argument: {arg!r}")
        else:
            positional.append(arg)
    if wants_help:
        mode = positional[0] if positional and positional[0] in MODES else None
        raise HelpRequested(manual.help_text(mode))
    source, lowerdir, mountpoint = split_positional(positional)
    config = default_config(mountpoint)
    config.source, config.lowerdir = source, lowerdir
    config.remount = "remount" in options  # before the others: what they may be depends on it
    for option in options:
        apply_option(config, option)
    if source == "overlay" and config.lowerdir is None and not config.remount:
        raise UsageError("overlay mode needs LOWERDIR: mmfs overlay LOWERDIR MOUNTPOINT (see mmfs overlay --help)")
    config.foreground = foreground
    config.debug = config.debug or debug
    return config


MODES = ("tmpfs", "overlay")


def split_positional(positional: list[str]) -> tuple[str, str | None, str]:
    """(SOURCE, LOWERDIR or None, MOUNTPOINT) from the positional arguments."""
    if len(positional) == 3 and positional[0] == "overlay":
        source, lowerdir, mountpoint = positional
        if not lowerdir:
            raise UsageError("lowerdir is empty")
        return source, lowerdir, mountpoint
    if len(positional) == 2:
        return positional[0], None, positional[1]
    if len(positional) == 1 and positional[0] in MODES:
        raise UsageError(f"missing MOUNTPOINT: {manual.SYNOPSIS[positional[0]]}")
    raise UsageError("expected: mmfs tmpfs MOUNTPOINT or mmfs overlay LOWERDIR MOUNTPOINT (see --help)")


def version() -> str:
    """``mmfs --version``: mmfs and what it runs on."""
    import platform
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return (
        f"mmfs {installed('mmfs')} (pyfuse3 {installed('pyfuse3')}, trio {installed('trio')}, "
        f"Python {platform.python_version()})"
    )
