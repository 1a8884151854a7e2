"""The verbs that act on a running mount: ``mmfs status``, ``diff`` and ``export``.

Each is a client of the mount's control channel (control.py): it sends one
request and prints the reply, for people or, with ``--json``, for programs.
Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import control, manual, mounts
from .options import HelpRequested, UsageError, shown
from .quoting import quote_path


def main(verb: str, argv: list[str]) -> int:
    """Run ``mmfs VERB ARGV...``."""
    try:
        return VERBS[verb](parse(verb, argv))
    except HelpRequested as text:
        print(text)
        return 0
    except UsageError as error:
        print(f"mmfs {verb}: {error}", file=sys.stderr)
        return 1


@dataclass
class Args:
    """A verb's arguments: positional ones, the flags given, and options with values."""

    positional: list[str]
    flags: set[str]
    values: dict[str, str]  # --since NAME


def parse(verb: str, argv: list[str]) -> Args:
    """Positional arguments and flags (``--json``); ``--help``; one line for the rest."""
    positional: list[str] = []
    flags: set[str] = set()
    values: dict[str, str] = {}
    described = manual.VERBS[verb]
    args = iter(argv)
    for arg in args:
        name, has_value, value = arg.partition("=")
        if arg in ("-h", "--help"):
            raise HelpRequested(manual.verb_help(verb))
        if name in described.valued:
            given = value if has_value else next(args, None)
            if not given:
                raise UsageError(f"{name} needs a value (see mmfs {verb} --help)")
            values[name] = given
        elif arg.startswith("-") and arg != "-":
            if arg not in described.flags:
                raise UsageError(f"unknown argument: {arg!r} (see mmfs {verb} --help)")
            flags.add(arg)
        else:
            positional.append(arg)
    low, high = described.arguments
    if not low <= len(positional) <= high:
        raise UsageError(f"usage: {described.synopsis}")
    return Args(positional, flags, values)


# --- status -------------------------------------------------------------------
def status(args: Args) -> int:
    if args.positional:
        reply = control.call(args.positional[0], {"op": "status"})
        print(json.dumps(public(reply), indent=2) if "--json" in args.flags else status_text(reply))
        return 0
    replies = [public(reply) for reply in all_statuses()]
    if "--json" in args.flags:
        print(json.dumps(replies, indent=2))
    else:
        for reply in replies:
            print(status_line(reply))
    return 0


def public(reply: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in reply.items() if key != "ok"}


def all_statuses() -> list[dict[str, Any]]:
    """The status of every mmfs mount in our mount table whose daemon serves us.
    Mounts are found through the mount table and reached by their sockets, never
    by touching the mounts themselves (a dead or busy one would hang us)."""
    replies = []
    for entry in mounts.mount_table():
        if entry.fstype != "fuse.mmfs":
            continue
        try:
            path = control.socket_of(entry)
            replies.append(control.call_socket(path, os.fsdecode(entry.mountpoint), {"op": "status"}))
        except UsageError:
            continue  # another user's, or its daemon is gone: not one we may control
    return replies


def size(count: float) -> str:
    """A byte count for people: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """An age for people: 3 s, 5 min, 2 h 10 min, 4 d 3 h."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def limit(value: int, shown_as: Callable[[int], str] = str) -> str:
    return shown_as(value) if value else "unlimited"


def status_text(reply: dict[str, Any]) -> str:
    """The status of one mount, a few aligned lines."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reply["mounted_at"]))
    rows = [("mode", reply["mode"] + (", read-only" if reply["read_only"] else "")), ("source", reply["source"])]
    if reply["lowerdir"] is not None:
        rows.append(("lowerdir", shown(reply["lowerdir"])))
    rows += [
        ("size", f"{limit(reply['size'], size)}, {size(reply['bytes_used'])} held"),
        ("inodes", f"{limit(reply['nr_inodes'])}, {reply['inodes_used']} used"),
    ]
    if "files_changed" in reply:
        changed = "?" if reply["files_changed"] is None else reply["files_changed"]
        rows.append(("files", f"{changed} changed, {reply['files_mapped']} mapped"))
    rows += [
        ("daemon", f"pid {reply['pid']}, {size(reply['rss_bytes'])} resident"),
        ("requests", f"{reply['requests']} served"),
        ("checkpoints", str(reply["checkpoints"])),
        ("mounted", f"{started} ({duration(reply['uptime_seconds'])} ago)"),
    ]
    return "\n".join([shown(reply["mountpoint"]) + ":"] + [f"  {name:<11} {value}" for name, value in rows])


def status_line(reply: dict[str, Any]) -> str:
    """One mount in one line, for ``mmfs status`` without a mountpoint."""
    return (
        f"{shown(reply['mountpoint'])}  {reply['mode']}  {size(reply['bytes_used'])} of "
        f"{limit(reply['size'], size)}  {reply['inodes_used']} inodes  pid {reply['pid']}  "
        f"up {duration(reply['uptime_seconds'])}"
    )


# --- diff -------------------------------------------------------------------------
def diff(args: Args) -> int:
    request = {"op": "diff"} | ({"since": args.values["--since"]} if "--since" in args.values else {})
    changes = control.call(args.positional[0], request)["changes"]
    if "--json" in args.flags:
        print(json.dumps([json_change(kind, os.fsencode(path)) for kind, path in changes], indent=1))
    else:
        for kind, path in changes:
            print(kind, quote_path(os.fsencode(path)))
    return 0


def json_change(kind: str, path: bytes) -> dict[str, str]:
    """One change for ``--json``: the path as UTF-8 text, and, when it is not valid
    UTF-8, its exact bytes in base64 as well (``path`` then shows U+FFFD for them)."""
    entry = {"change": kind, "path": path.decode(errors="replace")}
    try:
        path.decode()
    except UnicodeDecodeError:
        entry["path_base64"] = base64.b64encode(path).decode()
    return entry


# --- export -----------------------------------------------------------------------
def export(args: Args) -> int:
    mountpoint, directory = args.positional
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise UsageError(f"{shown(directory)}: {error.strerror}") from None
    try:
        report = control.call(mountpoint, {"op": "export"}, fds=[fd])
    finally:
        os.close(fd)
    print(f"exported to {shown(directory)}: " + ", ".join(f"{key} {value}" for key, value in public(report).items()))
    return 0


# --- checkpoints ---------------------------------------------------------------------
def checkpoint(args: Args) -> int:
    mountpoint, name = args.positional
    if "--delete" in args.flags:
        control.call(mountpoint, {"op": "delete-checkpoint", "name": name})
        print(f"checkpoint {shown(name)} of {shown(mountpoint)} deleted")
        return 0
    reply = control.call(mountpoint, {"op": "checkpoint", "name": name})
    print(f"checkpoint {shown(name)} of {shown(mountpoint)}: {reply['files']} files in {reply['seconds']:.3f} s")
    return 0


def rollback(args: Args) -> int:
    mountpoint, name = args.positional
    reply = control.call(mountpoint, {"op": "rollback", "name": name})
    print(f"{shown(mountpoint)} rolled back to {shown(name)} in {reply['seconds']:.3f} s")
    return 0


def reset(args: Args) -> int:
    mountpoint = args.positional[0]
    reply = control.call(mountpoint, {"op": "reset"})
    print(f"{shown(mountpoint)} shows LOWERDIR as mounted again ({reply['seconds']:.3f} s)")
    return 0


def list_checkpoints(args: Args) -> int:
    found = control.call(args.positional[0], {"op": "checkpoints"})["checkpoints"]
    if "--json" in args.flags:
        print(json.dumps(found, indent=2))
        return 0
    for entry in found:
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["taken_at"]))
        print(f"{shown(entry['name'])}  {taken}  {entry['files']} files  {size(entry['exclusive_bytes'])} only here")
    return 0


VERBS: dict[str, Callable[[Args], int]] = {
    "status": status, "diff": diff, "export": export,
    "checkpoint": checkpoint, "rollback": rollback, "checkpoints": list_checkpoints, "reset": reset,
}
