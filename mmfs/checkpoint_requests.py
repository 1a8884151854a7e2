"""The control requests of checkpoints (checkpoints.py holds the model side):
take, list, delete, roll back, reset to LOWERDIR, and diff since one.

Each request's model work is one synchronous call: a request that fails leaves
the mount as it was.  A rollback then tells the kernel what changed and
answers once it has forgotten it, so that when ``mmfs rollback`` returns no
process can read anything stale.  An export runs as one synchronous request
too, so a rollback can never overlap one: it waits until the export is written.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from . import changes, checkpoints, control
from .arena import PAGE, NoSpace
from .fs import FsError

if TYPE_CHECKING:
    from .daemon import Daemon

Request = dict[str, Any]
Reply = dict[str, Any]
NAME_MAX = 255


def checkpoint_name(request: Request) -> str:
    """The request's checkpoint name, or a one-line error."""
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise control.RequestError("a checkpoint needs a name")
    if not name.isprintable() or "/" in name or len(os.fsencode(name)) > NAME_MAX:
        raise control.RequestError(f"bad checkpoint name {name!r}: printable, no '/', at most {NAME_MAX} bytes")
    return name


def existing(daemon: Daemon, request: Request) -> checkpoints.Checkpoint:
    name = checkpoint_name(request)
    checkpoint = daemon.checkpoints.get(name)
    if checkpoint is None:
        raise control.RequestError(f"no checkpoint named {name!r}" + known_names(daemon))
    return checkpoint


def known_names(daemon: Daemon) -> str:
    names = list(daemon.checkpoints)
    return f" (there are: {', '.join(names)})" if names else " (there are none)"


async def handle_checkpoint(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """``{"op": "checkpoint", "name": NAME}``: record the tree as it is now
    (pages written through shared mappings included: the kernel sends them first)."""
    name = checkpoint_name(request)
    started = time.perf_counter()
    await daemon.operations.write_back(daemon.mountpoint)
    if name in daemon.checkpoints:
        raise control.RequestError(f"a checkpoint named {name!r} exists already (delete it first)")
    try:
        checkpoint = checkpoints.take(daemon.fs, name)
    except NoSpace:
        raise control.RequestError("no room for the checkpoint (size=): nothing was recorded") from None
    daemon.checkpoints[name] = checkpoint
    return {"name": name, "files": len(checkpoint.inodes), "seconds": time.perf_counter() - started}


def handle_delete(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """``{"op": "delete-checkpoint", "name": NAME}``: drop one; its pages and inodes go back."""
    checkpoint = existing(daemon, request)
    del daemon.checkpoints[checkpoint.name]
    checkpoints.drop(daemon.fs, checkpoint)
    return {"name": checkpoint.name}


def handle_list(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """``{"op": "checkpoints"}``: each one's name, time, files and the bytes only it holds."""
    return {
        "checkpoints": [
            {
                "name": checkpoint.name,
                "taken_at": checkpoint.taken_at,
                "files": len(checkpoint.inodes),
                "exclusive_bytes": checkpoint.exclusive_pages() * PAGE,
            }
            for checkpoint in daemon.checkpoints.values()
        ]
    }


def writable(daemon: Daemon) -> None:
    """A rollback changes the tree: not on a read-only mount."""
    if daemon.operations.read_only:
        raise control.RequestError("the mount is read-only (mount -o remount,rw MOUNTPOINT first)")


async def handle_rollback(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """``{"op": "rollback", "name": NAME}``: show the checkpoint's tree again (it stays).
    The kernel first sends what it holds dirty (pages written through shared
    mappings), else those pages would land in the restored files afterwards."""
    started = time.perf_counter()
    writable(daemon)
    existing(daemon, request)  # an unknown name is an error before anything is done
    await daemon.operations.write_back(daemon.mountpoint)
    writable(daemon)  # checked again, with the name: either may have changed meanwhile
    return await rolled_back(daemon, existing(daemon, request), started)


async def handle_reset(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """``{"op": "reset"}`` (overlay mode): back to the untouched LOWERDIR."""
    if daemon.fs.overlay is None:
        raise control.RequestError("reset needs overlay mode (in tmpfs mode, roll back to a checkpoint)")
    writable(daemon)
    started = time.perf_counter()
    await daemon.operations.write_back(daemon.mountpoint)
    return await rolled_back(daemon, checkpoints.reset_point(daemon.fs), started)


async def rolled_back(daemon: Daemon, checkpoint: checkpoints.Checkpoint, started: float) -> Reply:
    """The model's rollback (one synchronous step), then the kernel made to forget."""
    model_started = time.perf_counter()
    forget = checkpoints.rollback(daemon.fs, checkpoint)
    restored = time.perf_counter()
    await daemon.operations.forget_cached(forget.inodes, forget.entries)
    return {
        "name": checkpoint.name,
        "seconds": time.perf_counter() - started,
        "model_seconds": restored - model_started,
        "inodes_invalidated": len(forget.inodes),
        "names_invalidated": len(forget.entries),
    }


def handle_diff(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """``{"op": "diff"}`` against LOWERDIR, or with ``"since": NAME`` against a checkpoint."""
    if "since" not in request:
        return changes.handle_diff(daemon, request, fds)
    checkpoint = existing(daemon, {"name": request["since"]})
    try:
        found = checkpoints.since(daemon.fs, checkpoint)
    except (OSError, FsError) as error:
        raise control.RequestError(f"diff: cannot read LOWERDIR: {changes.error_text(error)}") from None
    return {"changes": [[change.kind, os.fsdecode(change.path)] for change in found]}
