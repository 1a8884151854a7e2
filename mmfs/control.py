"""The control channel of a mount: where its socket is, and the client's side.

Each daemon serves a Unix socket (channel.py) for ``mmfs status``, ``diff``,
``export`` and remounts.  Where: ``/run/mmfs/`` for a daemon run by root,
``$XDG_RUNTIME_DIR/mmfs/`` (else ``/run/user/UID/mmfs/``) for another user,
or ``$MMFS_RUNTIME_DIR`` when set.  The socket is named after the mount's
device number (``MAJOR:MINOR.sock``), so the CLI finds it from the mountpoint
alone: stat gives the device, the mount table says it is mmfs and which user
mounted it (``user_id=``).

The protocol: one request per connection.  The client sends one JSON object
(at most ``MAX_REQUEST`` bytes, file descriptors with ``SCM_RIGHTS`` in the
first message) and shuts its side down; the daemon answers one JSON object,
``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``, and closes.
Paths travel as ``os.fsdecode`` strings (Python's json keeps the surrogates of
bytes that are not UTF-8).

Imports neither trio nor pyfuse3: the verbs start in a few tens of milliseconds.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import mounts
from .options import UsageError, shown

if TYPE_CHECKING:
    from .daemon import Daemon

RUNTIME_ENV = "MMFS_RUNTIME_DIR"
MAX_REQUEST = 1 << 20

Request = dict[str, Any]
Reply = dict[str, Any]


class RequestError(Exception):
    """A control request that failed; ``str()`` is the one line the user sees."""


Handler = Callable[["Daemon", Request, list[int]], Reply | Awaitable[Reply]]


# --- where the sockets are ---------------------------------------------------
def runtime_dir(uid: int | None = None) -> str:
    """The directory of the sockets of the daemons run by ``uid`` (default: us)."""
    override = os.environ.get(RUNTIME_ENV)
    if override:
        return override
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return "/run/mmfs"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and uid == os.geteuid():
        return os.path.join(xdg, "mmfs")
    return f"/run/user/{uid}/mmfs"


def socket_name(device: str) -> str:
    return f"{device}.sock"


def device_of(st: os.stat_result) -> str:
    """"MAJOR:MINOR" of the filesystem holding a file, as mountinfo writes it."""
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


# --- the client's side ----------------------------------------------------------
def locate(mountpoint: str) -> str:
    """The control socket of the mmfs mount holding ``mountpoint``, or a one-line UsageError."""
    try:
        st = os.stat(mountpoint)
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise UsageError(f"{shown(mountpoint)}: the mmfs mounted there is dead (its daemon stopped)") from None
        raise UsageError(f"{shown(mountpoint)}: {error.strerror}") from None
    device = device_of(st)
    entry = next((entry for entry in mounts.mount_table() if entry.device == device), None)
    if entry is None or entry.fstype != "fuse.mmfs":
        raise UsageError(f"{shown(mountpoint)}: not on an mmfs mount")
    return socket_of(entry)


def socket_of(entry: mounts.MountEntry) -> str:
    """Where the daemon of an mmfs mount listens."""
    uid = entry.user_id if entry.user_id is not None else os.geteuid()
    return os.path.join(runtime_dir(uid), socket_name(entry.device))


def call(mountpoint: str, request: Request, fds: Sequence[int] = ()) -> Reply:
    """Send one request to the daemon serving ``mountpoint`` and return its
    reply; a one-line UsageError if it cannot be reached or refuses."""
    return call_socket(locate(mountpoint), mountpoint, request, fds)


def call_socket(path: str, mountpoint: str, request: Request, fds: Sequence[int] = ()) -> Reply:
    """``call`` to the socket at ``path``; ``mountpoint`` names the mount in errors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(path)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise UsageError(f"{shown(mountpoint)}: its daemon has no control channel ({path})") from None
            raise UsageError(f"{shown(mountpoint)}: cannot reach its daemon: {error.strerror}") from None
        payload = json.dumps(request).encode()
        try:
            try:
                sent = socket.send_fds(sock, [payload], list(fds)) if fds else 0
                sock.sendall(payload[sent:])
                sock.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass  # refused before reading it all: the reply says why
            answer = _read_all(sock)
        except OSError as error:
            raise UsageError(f"{shown(mountpoint)}: the daemon hung up: {error.strerror}") from None
    try:
        reply = json.loads(answer)
    except ValueError:
        raise UsageError(f"{shown(mountpoint)}: the daemon gave no answer (did it stop?)") from None
    if not reply.get("ok"):
        raise UsageError(f"{shown(mountpoint)}: {reply.get('error', 'request failed')}")
    return dict(reply)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
