"""The composition root: everything one mount's daemon holds, built from its config.

``build`` makes the arena (the memory file contents live in), the model
(``fs.Filesystem``), in overlay mode the backing directory and the budget of
lower files mapped at once (``maps.MapBudget``), and the pyfuse3 adapter
(``fuse_ops.Operations``) over the model.  ``mount.serve`` mounts and serves a
``Daemon``; the tasks it runs beside the requests (lease breaks, readahead,
signals, the control channel) take what they need from it, never from the
adapter.  The daemon also names what the control channel answers
(``control_handlers``) and keeps the mount's checkpoints.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass, field

import trio

from . import changes, channel, checkpoint_requests, control, export, remount
from .arena import PAGE, SLOT, Arena
from .checkpoints import Checkpoint
from .content import AnonContent, CowContent
from .fs import Filesystem, FsConfig, FsError
from .fuse_ops import Operations, RequestCounts
from .lower import LowerDir, LowerEntry
from .maps import MapBudget
from .options import MountConfig, UsageError, atime_rule, shown

log = logging.getLogger(__name__)

# Virtual address space for the arena: free until touched, and enough slots for
# millions of small files whatever size= says.
MIN_RESERVATION = 1 << 40


@dataclass
class Daemon:
    """One mount's daemon: the model, what serves it to the kernel, and what
    the daemon's own tasks need."""

    config: MountConfig
    fs: Filesystem
    arena: Arena
    maps: MapBudget | None = None  # overlay mode: lower files mapped privately
    initialized: trio.Event = field(default_factory=trio.Event)  # set when the kernel's INIT arrives
    operations: Operations = field(init=False)
    mountpoint: str = ""  # its real path, once mounted
    device: str = ""  # "MAJOR:MINOR" of the mount, once mounted
    mounted_at: float = 0.0  # when, in seconds since the epoch
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)  # by name, oldest first

    def __post_init__(self) -> None:
        self.operations = Operations(self.fs, on_init=self.initialized.set)

    @property
    def control_handlers(self) -> dict[str, control.Handler]:
        """What the control channel answers, by request."""
        return {
            "status": channel.handle_status,
            "diff": checkpoint_requests.handle_diff,
            "export": export.handle_export,
            "remount": remount.handle_remount,
            "checkpoint": checkpoint_requests.handle_checkpoint,
            "delete-checkpoint": checkpoint_requests.handle_delete,
            "checkpoints": checkpoint_requests.handle_list,
            "rollback": checkpoint_requests.handle_rollback,
            "reset": checkpoint_requests.handle_reset,
        }

    def files_changed(self) -> int | None:
        """Overlay mode: how many paths differ from LOWERDIR (``mmfs diff``'s
        lines, the root aside); None if LOWERDIR cannot be read."""
        try:
            return sum(change.path != b"." for change in changes.diff(self.fs))
        except (OSError, FsError):
            return None

    def bytes_held(self) -> int:
        """Bytes of memory file contents hold (what df counts as used)."""
        return self.arena.pages_held * PAGE

    @property
    def requests(self) -> RequestCounts:
        """The requests served so far, by opcode."""
        return self.operations.requests


def open_lower(path: str) -> LowerDir:
    """The backing directory, or one clear line saying what is wrong with it."""
    try:
        return LowerDir(path)
    except OSError as error:
        raise UsageError(f"lowerdir {shown(path)}: {error.strerror}") from None


def build(config: MountConfig) -> Daemon:
    """The daemon a config describes, ready to mount."""
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
        return read_only_if_asked(Daemon(config, Filesystem(lambda: AnonContent(arena), settings, space=arena), arena))
    lower = open_lower(config.lowerdir)
    maps = MapBudget(map_limit())

    def lower_content(entry: LowerEntry) -> CowContent:
        path = entry.path
        return CowContent(arena, maps, lambda: lower.open(path), entry.st.st_size, entry.st.st_blocks)

    fs = Filesystem(lambda: AnonContent(arena), settings, space=arena, lower=lower, lower_content=lower_content)
    return read_only_if_asked(Daemon(config, fs, arena, maps))


def read_only_if_asked(daemon: Daemon) -> Daemon:
    """``-o ro``: the kernel refuses changes; the model must not stamp atimes either."""
    if "ro" in daemon.config.fuse_options:
        remount.set_read_only(daemon, True)
    return daemon


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
