"""The words of ``mmfs --help``, ``mmfs tmpfs --help``, ``mmfs overlay --help``
and the manual page mmfs(8), from one source so that they never disagree.

``python -m mmfs.manual`` prints the manual page (roff), which
``scripts/install`` installs.  Pure text; nothing here touches the system.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

NAME = "mmfs - a scratch filesystem whose file contents live in memory maps"

SYNOPSIS = {
    "tmpfs": "mmfs tmpfs MOUNTPOINT [-o OPTIONS] [-f] [--debug]",
    "overlay": "mmfs overlay LOWERDIR MOUNTPOINT [-o OPTIONS] [-f] [--debug]",
    "mount": "mmfs SOURCE MOUNTPOINT [-o OPTIONS]    (what mount -t fuse.mmfs runs)",
}

MODES = {
    "tmpfs": (
        "A RAM filesystem that ordinary tools cannot tell from kernel tmpfs: same errnos, same df, "
        "a size= limit, memory given back when files go. File bytes live in anonymous shared memory "
        "(MAP_SHARED|MAP_ANONYMOUS); everything is gone at unmount."
    ),
    "overlay": (
        "A scratch copy-on-write view of LOWERDIR. Everything is writable; LOWERDIR is never written "
        "(not data, metadata, xattrs or timestamps). A changed file is a private mapping (MAP_PRIVATE) "
        "of its backing file, so only the 4 KiB pages written take memory. All changes vanish at unmount. "
        "The mount(8) form selects it with -o lowerdir=DIR; a positional LOWERDIR and a different "
        "lowerdir= are an error."
    ),
}

# The fallback log of a daemon in the background when there is no syslog.
ROOT_LOG = "/var/log/mmfs.log"
USER_LOG = "$XDG_STATE_HOME/mmfs/mmfs.log (default ~/.local/state/mmfs/mmfs.log)"


@dataclass(frozen=True)
class Option:
    """One ``-o`` option: its form, what it means and its default per mode."""

    form: str
    meaning: str
    default: str
    overlay_default: str | None = None  # None: as in tmpfs mode

    def default_in(self, mode: str) -> str:
        return self.overlay_default if mode == "overlay" and self.overlay_default is not None else self.default


OPTIONS = [
    Option("size=BYTES", "most bytes of file data, with k/m/g/t suffix or N% of RAM; 0 = unlimited. "
           "In overlay mode: the memory changes may take", "50% of RAM"),
    Option("nr_inodes=N", "most inodes at once; 0 = unlimited. In overlay mode LOWERDIR's own entries "
           "do not count", "RAM pages / 2"),
    Option("mode=OCTAL", "mode of the root directory", "1777", "LOWERDIR's"),
    Option("uid=N", "owner of the root directory", "0", "LOWERDIR's"),
    Option("gid=N", "group of the root directory", "0", "LOWERDIR's"),
    Option("lowerdir=DIR", "overlay mode on DIR (the mount -t fuse.mmfs form)", "none: tmpfs mode"),
    Option("allow_other", "let other users use the mount (FUSE)", "off"),
    Option("ro", "read-only mount; remount,ro and remount,rw switch a running one", "off"),
    Option("fsname=NAME", "name shown by df and /proc/mounts", "SOURCE"),
    Option("log=FILE", "where a daemon in the background logs (appended); - means syslog",
           f"syslog, or without /dev/log {ROOT_LOG} (root) or {USER_LOG}"),
    Option("busy_poll=0|1", "after each request, poll 50 us for the next one before sleeping: about 2x "
           "the requests a second, at the cost of up to one CPU while requests come", "1"),
    Option("debug", "log every request (libfuse trace) and debug messages", "off"),
]

ACCEPTED = (
    "Mount flags (noexec, nosuid, nodev, ...) and what mount(8) and systemd pass along "
    "(defaults, auto, noauto, nofail, _netdev, user, x-*, comment=...) are accepted. The atime "
    "flags (relatime, strictatime, noatime, nodiratime, lazytime and their negations) have tmpfs's "
    "meaning; on a noatime mount a write also keeps the file's cached pages (under relatime the first "
    "read after a write must reach mmfs to update atime), which suits databases. Any other option is "
    "a one-line error before anything is mounted."
)

FLAGS = [
    ("-o OPTIONS", "comma-separated options, as above; may be given more than once"),
    ("-f", "stay in the foreground and log to stderr; without it mmfs returns once the mount is live "
     "(exit 0), or prints one line and exits 1"),
    ("-d, --debug", "the debug option"),
    ("-h, --help", "this help; mmfs tmpfs --help and mmfs overlay --help describe one mode"),
    ("--version", "the versions of mmfs, pyfuse3 and Python"),
]

UNMOUNT = (
    "umount MOUNTPOINT or fusermount3 -u MOUNTPOINT unmounts, and so do SIGINT and SIGTERM to the "
    "daemon; the daemon then exits 0 and every file is gone. If the daemon was killed, the mount "
    "answers 'Transport endpoint is not connected' and fusermount3 -u MOUNTPOINT clears it."
)

LOGGING = (
    f"In the foreground the daemon logs to stderr. In the background it logs to the file of log=, "
    f"else to syslog, else (no /dev/log, as in most containers) to {ROOT_LOG} when run by root and "
    f"to {USER_LOG} otherwise. Crash reports and stack dumps (kill -USR1 PID) go to the same place, "
    "and so do the requests served so far by kind (kill -USR2 PID; also logged at unmount)."
)

REMOUNT = (
    "mount -o remount,OPTIONS MOUNTPOINT changes a running mount, in either mode, as on tmpfs: size= and "
    "nr_inodes= take effect at once (df shows them); ro makes every change fail with EROFS (reads still work "
    "and leave atimes alone); rw makes it writable again. A remount is refused with one line and exit status "
    "32 (what mount(8) gives for tmpfs), and nothing changes, when: size= or nr_inodes= is below what is in "
    "use; a limit is asked of a mount made with size=0 or nr_inodes=0 (unlimited); ro is asked while a file "
    "is open for writing or deleted but open (busy); lowerdir= names another directory. Other options keep "
    "their values from mount time: tmpfs also ignores mode=, uid= and gid= on remount, and mount and atime "
    "flags are not changed either. Run by root, the kernel marks the mount read-only too (statvfs and "
    "/proc/mounts show ro). For a user's own mount, the daemon alone refuses the changes, so removing a "
    "missing name answers ENOENT where tmpfs says EROFS."
)

FSYNC = (
    "fsync and fdatasync become msync(MS_SYNC) on the daemon's maps of the file. As on tmpfs, this "
    "gives no durability: everything is lost at unmount."
)


@dataclass(frozen=True)
class Verb:
    """A command that acts on a running mount, through its control channel."""

    synopsis: str
    meaning: str
    arguments: tuple[int, int] = (1, 1)  # how many positional arguments, least and most
    flags: tuple[str, ...] = ()
    valued: tuple[str, ...] = ()  # options that take a value (--since NAME)


VERBS = {
    "status": Verb(
        "mmfs status [MOUNTPOINT] [--json]",
        "What a mount holds: mode, source and LOWERDIR, size= and the bytes held, nr_inodes= and the inodes "
        "used, in overlay mode the files changed and the lower files mapped, the daemon's pid and resident "
        "memory, the requests served and how long it has been mounted. Without MOUNTPOINT, one line for "
        "every mmfs mount the caller may control.",
        (0, 1), ("--json",),
    ),
    "diff": Verb(
        "mmfs diff MOUNTPOINT [--since CHECKPOINT] [--json]",
        "Every path that differs from LOWERDIR (overlay mode), or with --since from a checkpoint (both "
        "modes; the only diff in tmpfs mode), sorted, one line each: A added, D deleted, "
        "M changed (content, type, mode, owner, mtime, xattrs or ACLs, symlink target or link count; "
        "atime and ctime alone never count). A rename is D old plus A new; a directory whose entries "
        "changed has a new mtime, so it is M; the root is '.'. Answered from what the daemon knows, "
        "without reading unchanged files: a file whose pages were rewritten with the same bytes is M. "
        "Paths that are not printable UTF-8, or hold a double quote or backslash, are quoted as git "
        "quotes them. With --json, a list of {\"change\", \"path\"} objects; a path that is not valid "
        "UTF-8 also has \"path_base64\", its exact bytes.",
        (1, 1), ("--json",), ("--since",),
    ),
    "export": Verb(
        "mmfs export MOUNTPOINT DIR",
        "Overlay mode: write the mount's changes into DIR (made if missing; must be empty) as a kernel "
        "overlayfs upper directory: deletions as 0/0 character-device whiteouts, directories that replace "
        "lower ones opaque (trusted.overlay.opaque, or user.overlay.opaque for the userxattr option when "
        "not run by root), changed files whole with mode, owner, times, xattrs and ACLs, hard links kept. "
        "mount -t overlay overlay -o lowerdir=LOWERDIR,upperdir=DIR,workdir=WORK then shows the tree the "
        "mount shows. To keep the changes, use DIR as an upper directory, or review the mount and copy it "
        "onto LOWERDIR with rsync -aHAX --delete MOUNTPOINT/ LOWERDIR/.",
        (2, 2),
    ),
    "checkpoint": Verb(
        "mmfs checkpoint [--delete] MOUNTPOINT NAME",
        "Record the whole tree as it is now under NAME (both modes), in about 9 us a file (0.9 s for "
        "100,000): every file's data is shared with the live tree, copy-on-write, and a write afterwards "
        "copies only the 64 KiB "
        "slot it changes. Pages count once against size=, so a checkpoint costs what only it still holds; "
        "inode numbers only checkpoints hold count against nr_inodes=; df shows both. With --delete, drop "
        "the checkpoint NAME and what only it holds.",
        (2, 2), ("--delete",),
    ),
    "rollback": Verb(
        "mmfs rollback MOUNTPOINT NAME",
        "Make the mount show the tree of checkpoint NAME again: names, bytes, holes, modes, owners, all "
        "timestamps, xattrs, ACLs, hard links, symlinks and special files. The checkpoint stays. What the "
        "kernel cached is invalidated before the command returns. A file open at the rollback that existed "
        "at the checkpoint is restored under its holder, whose descriptor then reads the checkpoint's "
        "bytes; one that did not exist lives on like an unlinked open file until its last close.",
        (2, 2),
    ),
    "checkpoints": Verb(
        "mmfs checkpoints MOUNTPOINT [--json]",
        "The checkpoints of a mount, oldest first: name, when it was taken, its files and the bytes of "
        "file data only it holds.",
        (1, 1), ("--json",),
    ),
    "reset": Verb(
        "mmfs reset MOUNTPOINT",
        "Overlay mode: go back to the untouched LOWERDIR, as mounted (checkpoints stay).",
        (1, 1),
    ),
    "run": Verb(
        "mmfs run [-o OPTIONS] [--dir DIR] [--keep UPPERDIR] -- COMMAND [ARGS...]",
        "Run COMMAND in a mount namespace of its own where DIR (default: the current directory) is overlaid "
        "by mmfs in overlay mode (-o OPTIONS as for mmfs overlay) at its own path: other processes never see "
        "the overlay, and DIR is never written (as root, not even an atime). COMMAND keeps the caller's "
        "environment, stdin, stdout, stderr and working directory (on the overlay when under DIR). When it "
        "exits, mmfs run prints on stderr how many paths were added, deleted and changed and the first ten "
        "as mmfs diff shows them, writes the changes to UPPERDIR with --keep (made if missing; it must be "
        "empty and outside DIR) as mmfs export does, unmounts, and exits with COMMAND's status: 128+N if "
        "signal N killed it, 127 if it was not found, 126 if it could not be run, 1 if mmfs run itself "
        "failed or --keep could not be written. Ctrl-C reaches COMMAND from the terminal; SIGTERM and SIGHUP "
        "sent to mmfs run are passed on to it; the cleanup happens either way. Processes COMMAND left running "
        "on the overlay lose it. As a normal user mmfs run needs unprivileged user namespaces and read-write "
        "access to /dev/fuse, and says in one line which is missing.",
    ),
}


def verb_help(verb: str) -> str:
    """``mmfs VERB --help``."""
    return f"usage: {VERBS[verb].synopsis}\n\n{_wrap(VERBS[verb].meaning, '')}\n\nSee man mmfs."


def _wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, 79, initial_indent=indent, subsequent_indent=indent)


def _option_lines(mode: str | None) -> list[str]:
    lines = []
    for option in OPTIONS:
        if mode == "tmpfs" and option.form.startswith("lowerdir"):
            continue
        if mode is None and option.overlay_default is not None:
            default = f"{option.default}; overlay: {option.overlay_default}"
        else:
            default = option.default_in(mode or "tmpfs")
        lines.append(f"  {option.form}")
        lines.append(_wrap(f"{option.meaning} (default: {default})", "      "))
    return lines


def help_text(mode: str | None = None) -> str:
    """``mmfs --help`` (``mode`` None) or ``mmfs MODE --help``."""
    forms = [SYNOPSIS[mode]] if mode else [*SYNOPSIS.values(), *(verb.synopsis for verb in VERBS.values())]
    lines = ["usage: " + forms[0]] + ["       " + form for form in forms[1:]]
    lines.append("")
    for name in [mode] if mode else ["tmpfs", "overlay"]:
        lines.append(_wrap(f"{name} mode: {MODES[name]}", ""))
        lines.append("")
    lines.append("options (-o):")
    lines += _option_lines(mode)
    lines.append(_wrap(ACCEPTED))
    lines.append("")
    lines.append("flags:")
    for flag, meaning in FLAGS:
        lines.append(f"  {flag}")
        lines.append(_wrap(meaning, "      "))
    lines.append("")
    if mode is None:
        lines.append("commands on a running mount (mmfs COMMAND --help):")
        for name, verb in VERBS.items():
            lines.append(f"  {name}")
            lines.append(_wrap(verb.meaning.split(". ")[0].rstrip(".") + ".", "      "))
        lines.append("")
    lines.append("remounting:")
    lines.append(_wrap(REMOUNT))
    lines.append("")
    lines.append("unmounting:")
    lines.append(_wrap(UNMOUNT))
    lines.append("")
    lines.append("logging:")
    lines.append(_wrap(LOGGING))
    lines.append("")
    lines.append("See man mmfs.")
    return "\n".join(lines)


def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def man_page() -> str:
    """The manual page mmfs(8), in roff."""
    out = [".TH MMFS 8", ".SH NAME", _roff(NAME), ".SH SYNOPSIS"]
    for form in [*SYNOPSIS.values(), *(verb.synopsis for verb in VERBS.values())]:
        out += [".B " + _roff(form), ".br"]
    out.append(".SH DESCRIPTION")
    for name in ("tmpfs", "overlay"):
        out += [".TP", f".B {name} mode", _roff(MODES[name])]
    out.append(".SH OPTIONS")
    for option in OPTIONS:
        default = option.default
        if option.overlay_default is not None:
            default += f"; overlay: {option.overlay_default}"
        out += [".TP", ".B " + _roff(option.form), _roff(f"{option.meaning} (default: {default})")]
    out += [".PP", _roff(ACCEPTED), ".SH COMMANDS"]
    for verb in VERBS.values():
        out += [".TP", ".B " + _roff(verb.synopsis), _roff(verb.meaning)]
    out += [".SH FLAGS"]
    for flag, meaning in FLAGS:
        out += [".TP", ".B " + _roff(flag), _roff(meaning)]
    out += [".SH REMOUNTING", _roff(REMOUNT), ".SH UNMOUNTING", _roff(UNMOUNT)]
    out += [".SH LOGGING", _roff(LOGGING), ".SH FSYNC", _roff(FSYNC)]
    out += [".SH SEE ALSO", _roff("tmpfs(5), mount(8), mount.fuse3(8), fusermount3(1)")]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(man_page(), end="")
