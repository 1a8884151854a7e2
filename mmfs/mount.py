"""Mount lifecycle: build the daemon (daemon.py), mount it, serve until unmounted.

``pyfuse3.init`` mounts; ``trio.run`` serves requests until the kernel ends the
session (umount, ``fusermount3 -u``) or SIGINT/SIGTERM calls
``pyfuse3.terminate()``; ``pyfuse3.close(unmount=True)`` then makes sure the
mount is gone.  All of it runs on the daemon's single thread.
"""

from __future__ import annotations

import errno
import faulthandler
import gc
import logging
import os
import shlex
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyfuse3
import trio

from . import busy_poll, channel, mounts
from .daemon import Daemon, build
from .fuse_ops import RequestCounts
from .maps import MapBudget
from .options import MountConfig, UsageError, atime_rule, shown

log = logging.getLogger(__name__)


def check_mountpoint(path: str) -> None:
    """One clear line for the usual mistakes, before anything is mounted."""
    try:
        st = os.stat(path)
        if is_mmfs_mount(path):
            os.statvfs(path)  # never cached by the kernel: only a live daemon answers
            raise UsageError(f"already mounted: {shown(path)}")
    except FileNotFoundError:
        raise UsageError(f"mountpoint does not exist: {shown(path)}") from None
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            raise UsageError(
                f"{shown(path)}: the filesystem mounted there is dead (its daemon stopped); "
                f"clear it with: fusermount3 -u {shlex.quote(path) if path.isprintable() else shown(path)}"
            ) from None
        raise UsageError(f"cannot use mountpoint {shown(path)}: {error.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mountpoint is not a directory: {shown(path)}")
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: is the fuse kernel module loaded?")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as error:
        raise UsageError(f"cannot open /dev/fuse: {error.strerror}") from None


def is_mmfs_mount(path: str) -> bool:
    entry = mounts.mounted_at(os.path.realpath(path))
    return entry is not None and entry.fstype == "fuse.mmfs"


def fuse_options(config: MountConfig) -> set[str]:
    options = set(config.fuse_options) | {"default_permissions", "subtype=mmfs", f"fsname={config.source}"}
    if config.debug:
        options.add("debug")
    if atime_rule(config)[0] == "noatime":  # the model applies the atime rules; libfuse knows only this one
        options.add("noatime")
    if os.geteuid() == 0:  # like a kernel tmpfs mount, unless told otherwise
        options |= {"suid"} if "nosuid" not in options else set()
        options |= {"dev"} if "nodev" not in options else set()
    return options


# The cyclic garbage collector's first threshold (700 allocations by default).
# The model is hundreds of thousands of long-lived objects that make few
# cycles; at the default, bursts of allocation (listing a large lower
# directory, taking a checkpoint of 100,000 files) spent about 40% of their
# time in the collector.
GC_THRESHOLD = (100_000, 50, 100)


def serve(config: MountConfig, ready: Callable[[], None]) -> None:
    """Mount, call ``ready()``, and serve until the mount ends."""
    gc.set_threshold(*GC_THRESHOLD)
    daemon = build(config)
    mountpoint = os.path.realpath(config.mountpoint)  # resolving it after the mount would deadlock
    for signum in (signal.SIGIO, signal.SIGUSR2):  # until trio's receivers take them: never their default, exit
        signal.signal(signum, signal.SIG_IGN)
    pyfuse3.init(daemon.operations, mountpoint, fuse_options(config))
    daemon.mountpoint, daemon.mounted_at = mountpoint, time.time()
    os.chdir("/")  # never pin the caller's directory (its filesystem could not be unmounted)
    listener = control_socket(daemon, mountpoint)  # before ready(): mmfs status works once the command returns
    ready()
    log.info("mounted %s on %s", config.source, mountpoint)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)
    try:
        trio.run(_serve_until_stopped, daemon, listener, config.busy_poll)
    finally:
        pyfuse3.close(unmount=True)
        if listener is not None:
            channel.remove(listener)
        log.info("requests served: %s", daemon.requests.summary())


def control_socket(daemon: Daemon, mountpoint: str) -> socket.socket | None:
    """The mount's control socket, or None (logged) if it cannot be made: the
    mount still serves, only the mmfs verbs cannot reach it.  ``mountpoint`` is
    a real path: nothing here may touch the new mount."""
    entry = mounts.mounted_at(mountpoint)
    if entry is None or entry.fstype != "fuse.mmfs":
        log.warning("no control channel: no mmfs mount found on %s", mountpoint)
        return None
    daemon.device = entry.device
    try:
        return channel.listen(entry.device)
    except OSError as error:
        log.warning("no control channel: %s", error)
        return None


SERVING_TASKS = 16  # more than the asynchronous requests the kernel keeps in flight (max_background 12)
READAHEAD_KB = 1024  # as large as one FUSE request (max_pages x 4 KiB)


def widen_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB at a time instead of 128 KiB: sequential
    reads then take a quarter of the requests.  Best effort (needs root).
    ``mountpoint`` is a real path: nothing here may touch the new mount."""
    entry = mounts.mounted_at(mountpoint)
    if entry is None or entry.fstype != "fuse.mmfs":  # unmounted already, e.g. right after INIT
        log.debug("cannot widen readahead: no mmfs mount found on %s", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as setting:
            setting.write(str(READAHEAD_KB))
    except OSError as error:
        log.debug("cannot widen readahead of %s: %s", mountpoint, error)


async def _serve_until_stopped(daemon: Daemon, listener: socket.socket | None, poll: bool) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await nursery.start(_log_requests_on_signal, daemon.requests)
        if daemon.maps is not None:
            await nursery.start(_retire_maps_on_lease_break, daemon.maps)
        if listener is not None:
            await nursery.start(channel.serve, listener, daemon)
        nursery.start_soon(_widen_readahead_after_init, daemon.initialized, daemon.mountpoint)
        if poll:
            busy_poll.install()
        # One task serves nearly everything (no model call awaits); others serve
        # while direct writes wait for the kernel to drop stale pages.
        await pyfuse3.main(max_tasks=SERVING_TASKS)
        nursery.cancel_scope.cancel()


@contextmanager
def contained(what: str) -> Iterator[None]:
    """A bug in work done outside any request is logged, never ends the daemon."""
    try:
        yield
    except Exception:
        log.exception("internal error in %s; the mount keeps serving", what)


async def _widen_readahead_after_init(initialized: trio.Event, mountpoint: str) -> None:
    """The kernel caps readahead at what the INIT reply said: widen it after that."""
    await initialized.wait()
    with contained("readahead widening"):
        widen_readahead(mountpoint)


async def _retire_maps_on_lease_break(maps: MapBudget, task_status: trio.TaskStatus[None]) -> None:
    """SIGIO: someone is truncating or writing a mapped backing file.  Between two
    requests, retire its map; only then does the kernel let them go on."""
    with trio.open_signal_receiver(signal.SIGIO) as signals:
        task_status.started()
        async for _ in signals:
            with contained("lease break"):
                maps.lease_breaks()


async def _log_requests_on_signal(requests: RequestCounts, task_status: trio.TaskStatus[None]) -> None:
    """SIGUSR2: log the requests served so far (benchmarks read the counts per phase)."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        task_status.started()
        async for _ in signals:
            log.info("requests served: %s", requests.summary())


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
