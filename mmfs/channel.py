"""The daemon's side of the control channel (see control.py for the protocol).

The socket is 0600 in a 0700 directory, and every caller's credentials are
checked too (``SO_PEERCRED``): only the user who mounted and root are served,
whatever the file modes say.  Nothing of this shows inside the mount.

Each request is read on the daemon's trio loop and handled by one synchronous
call, between two FUSE requests: it sees the model as no request has half
changed it.  Bad input (garbage, too large, too slow, a caller that hangs up)
gets an error reply or is dropped; it never harms the mount.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING

import trio

from . import mounts
from .control import MAX_REQUEST, Reply, Request, RequestError, runtime_dir, socket_name

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

MAX_FDS = 4
READ_SECONDS = 10  # a client that sends nothing for this long is dropped
BACKLOG = 16


def listen(device: str) -> socket.socket:
    """Bind the socket of the mount with ``device``, replacing a stale one (a
    killed daemon's: device numbers of live mounts are unique).  OSError if the
    directory is missing, not ours, or open to others."""
    directory = runtime_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(errno.EPERM, "not a private directory of this user (0700)", directory)
    path = os.path.join(directory, socket_name(device))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(BACKLOG)
    except OSError:
        listener.close()
        raise
    return listener


def remove(listener: socket.socket) -> None:
    """Unmounted: the socket goes."""
    path = listener.getsockname()
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warning("cannot remove the control socket %s: %s", path, error)


async def serve(listener: socket.socket, daemon: Daemon, task_status: trio.TaskStatus[None]) -> None:
    """Accept requests until cancelled; each connection in a task of its own."""
    sock = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            connection, _ = await sock.accept()
            nursery.start_soon(_answer, connection, daemon)


async def _answer(connection: trio.socket.SocketType, daemon: Daemon) -> None:
    with connection:
        try:
            fds: list[int] = []
            try:
                reply = await _reply(connection, daemon, fds)
            finally:
                for fd in fds:  # a handler that took them set the list empty
                    os.close(fd)
            await trio.SocketStream(connection).send_all(json.dumps(reply).encode() + b"\n")
            await _drain(connection)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            log.debug("control client went away: %s", error)
        except Exception:
            log.exception("internal error in the control channel; the mount keeps serving")


async def _drain(connection: trio.socket.SocketType) -> None:
    """Answered: read what the client may still be sending (a request refused
    before it was all read), so that closing does not reset the connection
    before the client has read the reply.  Bounded in time and bytes."""
    connection.shutdown(socket.SHUT_WR)
    with trio.move_on_after(1):
        for _ in range(4 * MAX_REQUEST >> 16):
            if not await connection.recv(1 << 16):
                return


async def _reply(connection: trio.socket.SocketType, daemon: Daemon, fds: list[int]) -> Reply:
    uid = peer_uid(connection)
    if uid not in (0, os.geteuid()):
        log.warning("control request from uid %d refused (only uid %d and root)", uid, os.geteuid())
        return failure("permission denied: only the user who mounted and root may use this")
    with trio.move_on_after(READ_SECONDS):
        request = await _receive(connection, fds)
        return await handle(daemon, request, fds)
    return failure(f"no complete request within {READ_SECONDS} s")


def peer_uid(connection: trio.socket.SocketType) -> int:
    creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


async def _receive(connection: trio.socket.SocketType, fds: list[int]) -> bytes | None:
    """The request's bytes until the client's EOF, and the descriptors it sent;
    None if it is too large."""
    data = bytearray()
    while True:
        chunk, ancillary, _, _ = await connection.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_REQUEST:
            return None


async def handle(daemon: Daemon, raw: bytes | None, fds: list[int]) -> Reply:
    """One request's reply.  A handler's model work is one synchronous call, atomic
    with respect to FUSE requests; an asynchronous handler may then await what
    follows from it (telling the kernel what a rollback changed)."""
    if raw is None:
        return failure(f"request too large (more than {MAX_REQUEST} bytes)")
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return failure("bad request: not JSON")
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return failure('bad request: expected a JSON object with "op"')
    handler = daemon.control_handlers.get(request["op"])
    if handler is None:
        return failure(f"unknown request: {request['op']!r}")
    if any(mounts.device_of_descriptor(fd) == daemon.device for fd in fds):
        return failure("a directory on this mount itself: mmfs cannot write into the mount it serves")
    try:
        given: list[int] = []
        if request["op"] in TAKES_DESCRIPTORS:
            given, fds[:] = list(fds), []  # the handler owns them now
        reply = handler(daemon, request, given)
        if inspect.isawaitable(reply):
            reply = await reply
    except RequestError as error:
        return failure(str(error))
    except Exception:
        log.exception("internal error in control request %r; the mount keeps serving", request["op"])
        return failure("internal error in the daemon (see its log); the mount is unharmed")
    return {"ok": True, **reply}


def failure(message: str) -> Reply:
    return {"ok": False, "error": message}


# --- handlers -----------------------------------------------------------------
def handle_status(daemon: Daemon, request: Request, fds: list[int]) -> Reply:
    """What ``mmfs status`` shows of one mount."""
    config, fs = daemon.config, daemon.fs
    stats = fs.statfs()
    page = os.sysconf("SC_PAGE_SIZE")
    reply: Reply = {
        "mountpoint": os.fsdecode(daemon.mountpoint),
        "mode": "tmpfs" if config.lowerdir is None else "overlay",
        "source": config.source,
        "lowerdir": config.lowerdir,
        "size": stats.pages * page,
        "bytes_used": daemon.bytes_held(),
        "read_only": daemon.operations.read_only,
        "nr_inodes": stats.inodes,
        "inodes_used": fs.inode_count(),
        "pid": os.getpid(),
        "rss_bytes": resident_bytes(),
        "requests": sum(served.count for served in daemon.requests.values()),
        "requests_by_opcode": {opcode: served.count for opcode, served in daemon.requests.items()},
        "checkpoints": len(daemon.checkpoints),
        "mounted_at": daemon.mounted_at,
        "uptime_seconds": time.time() - daemon.mounted_at,
    }
    if daemon.maps is not None:
        reply["files_changed"] = daemon.files_changed()
        reply["files_mapped"] = len(daemon.maps.mapped)
    return reply


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


TAKES_DESCRIPTORS = {"export"}  # the requests whose handler closes the descriptors sent; others' are closed here
