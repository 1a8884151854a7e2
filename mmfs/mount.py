"""Mount lifecycle: build the filesystem, mount it, serve until unmounted.

``pyfuse3.init`` mounts; ``trio.run`` serves requests until the kernel ends the
session (umount, ``fusermount3 -u``) or SIGINT/SIGTERM calls
``pyfuse3.terminate()``; ``pyfuse3.close(unmount=True)`` then makes sure the
mount is gone.  All of it runs on the daemon's single thread.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import resource
import shlex
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyfuse3
import trio

from . import busy_poll, mounts
from .arena import PAGE, SLOT, Arena
from .content import AnonContent, CowContent, MapBudget
from .fs import Filesystem, FsConfig
from .fuse_ops import Operations
from .lower import LowerDir, LowerEntry
from .options import MountConfig, UsageError, atime_rule, shown

log = logging.getLogger(__name__)

# Virtual address space for the arena: free until touched, and enough slots for
# millions of small files whatever size= says.
MIN_RESERVATION = 1 << 40


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


def open_lower(path: str) -> LowerDir:
    """The backing directory, or one clear line saying what is wrong with it."""
    try:
        return LowerDir(path)
    except OSError as error:
        raise UsageError(f"lowerdir {shown(path)}: {error.strerror}") from None


def build(config: MountConfig) -> Operations:
    """The filesystem a config describes, ready to mount."""
    reserve = arena_reservation(config.size)
    page_limit = config.size // PAGE
    if reserve < config.size or not page_limit and reserve < MIN_RESERVATION:
        page_limit = reserve // PAGE  # ulimit -v: df shows what fits
        log.warning("address space limit (ulimit -v): size= is %d MiB", reserve >> 20)
    arena = Arena(reserve, page_limit)
    rule, diratime = atime_rule(config)
    settings = FsConfig(
        max_inodes=config.nr_inodes, atime=rule, diratime=diratime,
        root_mode=config.mode, root_uid=config.uid, root_gid=config.gid,
    )
    if config.lowerdir is None:
        return Operations(Filesystem(lambda: AnonContent(arena), settings), arena)
    lower = open_lower(config.lowerdir)
    maps = MapBudget(map_limit())

    def lower_content(entry: LowerEntry) -> CowContent:
        path = entry.path
        return CowContent(arena, maps, lambda: lower.open(path), entry.st.st_size, entry.st.st_blocks)

    fs = Filesystem(lambda: AnonContent(arena), settings, lower=lower, lower_content=lower_content)
    return Operations(fs, arena, maps)


# Under an address space limit, room kept for the daemon's own heap, stacks and
# private maps of lower files (which fall back to the arena when they don't fit).
MIN_HEADROOM = 256 << 20
MIN_ARENA = 64 << 20


def arena_reservation(size: int) -> int:
    """Bytes of address space for the arena: 1 TiB or twice size=, or what
    RLIMIT_AS (``ulimit -v``) leaves, or a one-line error if too little."""
    wanted = max(MIN_RESERVATION, 2 * size)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - address_space_used()
    fits = (room - max(MIN_HEADROOM, room // 4)) // SLOT * SLOT
    if fits < MIN_ARENA:
        raise UsageError(
            f"address space limit (ulimit -v) of {soft >> 20} MiB leaves too little room: "
            f"mmfs needs about {(soft - room + MIN_HEADROOM + MIN_ARENA) >> 20} MiB"
        )
    return min(wanted, fits)


def address_space_used() -> int:
    """This process's virtual memory size (VmSize), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def map_limit() -> int:
    """How many lower files may be mapped at once: each map is a VMA and holds two
    descriptors; keep well inside vm.max_map_count and the descriptor limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with open("/proc/sys/vm/max_map_count") as max_map_count:
        vmas = int(max_map_count.read())
    return max(0, min(vmas // 2, (hard - 1024) // 2))


def serve(config: MountConfig, ready: Callable[[], None]) -> None:
    """Mount, call ``ready()``, and serve until the mount ends."""
    operations = build(config)
    mountpoint = os.path.realpath(config.mountpoint)  # resolving it after the mount would deadlock
    pyfuse3.init(operations, mountpoint, fuse_options(config))
    os.chdir("/")  # never pin the caller's directory (its filesystem could not be unmounted)
    ready()
    log.info("mounted %s on %s", config.source, mountpoint)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)
    try:
        trio.run(_serve_until_stopped, operations, mountpoint, config.busy_poll)
    finally:
        pyfuse3.close(unmount=True)
        log.info("requests served: %s", operations.requests.summary())


SERVING_TASKS = 16  # more than the asynchronous requests the kernel keeps in flight (max_background 12)
READAHEAD_KB = 1024  # as large as one FUSE request (max_pages x 4 KiB)


def widen_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB at a time instead of 128 KiB: sequential
    reads then take a quarter of the requests.  Best effort (needs root).
    ``mountpoint`` is a real path: nothing here may touch the new mount."""
    entry = mounts.mounted_at(mountpoint)
    if entry is None or entry.fstype != "fuse.mmfs":
        log.warning("cannot widen readahead: no mmfs mount found on %s", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{entry.device}/read_ahead_kb", "w") as setting:
            setting.write(str(READAHEAD_KB))
    except OSError as error:
        log.debug("cannot widen readahead of %s: %s", mountpoint, error)


async def _serve_until_stopped(operations: Operations, mountpoint: str, poll: bool) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_terminate_on_signal)
        await nursery.start(_log_requests_on_signal, operations)
        if operations.maps is not None:
            await nursery.start(_retire_maps_on_lease_break, operations.maps)
        nursery.start_soon(_widen_readahead_after_init, operations, mountpoint)
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


async def _widen_readahead_after_init(operations: Operations, mountpoint: str) -> None:
    """The kernel caps readahead at what the INIT reply said: widen it after that."""
    await operations.initialized.wait()
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


async def _log_requests_on_signal(operations: Operations, task_status: trio.TaskStatus[None]) -> None:
    """SIGUSR2: log the requests served so far (benchmarks read the counts per phase)."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        task_status.started()
        async for _ in signals:
            log.info("requests served: %s", operations.requests.summary())


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return
