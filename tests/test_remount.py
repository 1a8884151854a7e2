"""``mount -o remount,...``: size=, nr_inodes=, ro and rw on a running mount, as on kernel tmpfs.

Two tiers.  The daemon's side (``remount.handle_remount``) over a daemon built
as ``daemon.build`` builds one, its adapter called directly: what a remount
changes, what it refuses (and that a refused one changes nothing), and the
adapter's read-only answers.  Then real mounts remounted through mount(8),
the way users do it, with kernel tmpfs remounted the same way in the same
test as the oracle for exit statuses, errnos and what df shows.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyfuse3
import pytest
import trio
from conftest import Mount, mmfs_command, mounted_kernel_tmpfs
from support.syscalls import outcome

from mmfs import control, mounts
from mmfs.daemon import Daemon, build
from mmfs.fs import ROOT_INO
from mmfs.options import parse_args
from mmfs.remount import handle_remount

PAGE = 4096
KiB = 1024


@dataclass
class FakeContext:
    """Stands in for ``pyfuse3.RequestContext``."""

    uid: int = 0
    gid: int = 0
    pid: int = os.getpid()
    umask: int = 0o022


CTX = cast(pyfuse3.RequestContext, FakeContext())


def built(options: str, lowerdir: Path | None = None) -> Daemon:
    """A daemon as ``mmfs tmpfs /mnt -o OPTIONS`` (or overlay LOWERDIR) builds it, not mounted."""
    mode = ["tmpfs"] if lowerdir is None else ["overlay", str(lowerdir)]
    config = parse_args([*mode, "/mnt", "-o", options])
    if config.lowerdir is not None:
        config.lowerdir = os.path.abspath(config.lowerdir)
    return build(config)


def remount(daemon: Daemon, **fields: Any) -> dict[str, Any]:
    return handle_remount(daemon, {"op": "remount", **fields}, [])


def refused(daemon: Daemon, **fields: Any) -> str:
    """The one line a refused remount answers; nothing about the mount may have changed."""
    before = limits(daemon)
    with pytest.raises(control.RequestError) as error:
        remount(daemon, **fields)
    assert limits(daemon) == before
    message = str(error.value)
    assert message and "\n" not in message
    return message


def limits(daemon: Daemon) -> tuple[object, ...]:
    """Everything a remount may change, as statfs and the adapter show it."""
    return daemon.fs.statfs(), daemon.config.size, daemon.config.nr_inodes, daemon.operations.read_only


def call(handler: Callable[..., Any], *args: Any) -> Any:
    """Run one adapter handler as pyfuse3's loop would."""
    return trio.run(handler, *args)


def fuse_errno(handler: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        call(handler, *args)
    return info.value.errno


def new_file(daemon: Daemon, name: bytes, data: bytes = b"") -> int:
    """Create ``name`` holding ``data`` through the adapter and close it; its inode."""
    ops = daemon.operations
    info, attr = call(ops.create, ROOT_INO, name, 0o644, os.O_CREAT | os.O_WRONLY, CTX)
    if data:
        assert call(ops.write, info.fh, 0, data) == len(data)
    call(ops.release, info.fh)
    return int(attr.st_ino)


# --- the daemon's side ------------------------------------------------------------------
def test_size_grows_and_shrinks_at_once_but_never_below_what_is_held() -> None:
    daemon = built("size=1m,nr_inodes=100")
    new_file(daemon, b"f", b"x" * (600 * KiB))
    assert remount(daemon, size=2 << 20) == {"before": {"op": "remount", "size": 1 << 20}}
    assert daemon.fs.statfs().pages == 512 and daemon.config.size == 2 << 20
    remount(daemon, size=600 * KiB)  # exactly what is held, as tmpfs allows
    assert daemon.fs.statfs().pages == 150 and daemon.fs.statfs().pages_free == 0
    assert refused(daemon, size=596 * KiB) == "size=596k is too small for current use (600k in use)"
    assert refused(daemon, size=1, nr_inodes=50).startswith("size=4k is too small")  # nr_inodes untouched too
    remount(daemon, size=600 * KiB + 1)  # rounded up to whole pages, as tmpfs does
    assert daemon.fs.statfs().pages == 151
    daemon.fs.check_invariants()


def test_nr_inodes_changes_but_never_below_the_inodes_in_use() -> None:
    daemon = built("size=1m,nr_inodes=100")
    for n in range(5):
        new_file(daemon, b"f%d" % n)
    remount(daemon, nr_inodes=1000)
    assert daemon.fs.statfs().inodes == 1000
    remount(daemon, nr_inodes=6)  # the root and five files: all in use, none free
    assert daemon.fs.statfs().inodes_free == 0
    assert fuse_errno(daemon.operations.create, ROOT_INO, b"more", 0o644, os.O_CREAT | os.O_WRONLY, CTX) == errno.ENOSPC
    assert refused(daemon, nr_inodes=5) == "nr_inodes=5 is too few for current use (6 in use)"
    daemon.fs.check_invariants()


def test_unlimited_stays_unlimited_and_a_limit_can_be_lifted() -> None:
    """tmpfs: "Cannot retroactively limit size" (and inodes) on a mount made without the limit."""
    daemon = built("size=0,nr_inodes=0")
    assert refused(daemon, size=1 << 20).startswith("cannot retroactively limit size")
    assert refused(daemon, nr_inodes=10).startswith("cannot retroactively limit inodes")
    remount(daemon, size=0, nr_inodes=0)  # unlimited again: nothing to refuse
    limited = built("size=1m,nr_inodes=100")
    remount(limited, size=0, nr_inodes=0)
    assert limited.fs.statfs() == daemon.fs.statfs()
    assert limited.fs.statfs().pages == 0 and limited.fs.statfs().inodes == 0


@pytest.mark.parametrize(
    "request_fields",
    [{"size": -1}, {"size": "2G"}, {"size": 1.5}, {"nr_inodes": True}, {"read_only": 1}, {"lowerdir": 7}],
)
def test_bad_requests_change_nothing(request_fields: dict[str, Any]) -> None:
    daemon = built("size=1m,nr_inodes=100")
    assert refused(daemon, **request_fields).startswith("bad remount request: ")


def test_lowerdir_may_only_name_the_mounts_own(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    overlay = built("size=1m", lower)
    remount(overlay, lowerdir=str(lower), size=2 << 20)
    assert refused(overlay, lowerdir=str(tmp_path)).startswith("lowerdir cannot change on remount (mounted with ")
    assert refused(built("size=1m"), lowerdir=str(lower)).startswith("lowerdir cannot change on remount")


def test_read_only_answers_erofs_to_every_change_and_reads_leave_atime(tmp_path: Path) -> None:
    daemon = built("size=1m,nr_inodes=100,strictatime")
    ops = daemon.operations
    ino = new_file(daemon, b"f", b"data")
    directory = call(ops.mkdir, ROOT_INO, b"d", 0o755, CTX).st_ino
    assert remount(daemon, read_only=True) == {"before": {"op": "remount", "read_only": False}}
    attributes = call(ops.getattr, ino, CTX)
    changes: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (ops.create, (ROOT_INO, b"new", 0o644, os.O_CREAT | os.O_WRONLY, CTX)),
        (ops.mknod, (ROOT_INO, b"node", stat.S_IFIFO | 0o644, 0, CTX)),
        (ops.mkdir, (ROOT_INO, b"dir", 0o755, CTX)),
        (ops.symlink, (ROOT_INO, b"link", b"f", CTX)),
        (ops.link, (ino, ROOT_INO, b"hard", CTX)),
        (ops.unlink, (ROOT_INO, b"f", CTX)),
        (ops.rmdir, (ROOT_INO, b"d", CTX)),
        (ops.rename, (ROOT_INO, b"f", directory, b"g", 0, CTX)),
        (ops.setattr, (ino, attributes, pyfuse3.SetattrFields(), None, CTX)),
        (ops.setxattr, (ino, b"user.a", b"1", CTX)),
        (ops.removexattr, (ino, b"user.a", CTX)),
        (ops.open, (ino, os.O_WRONLY, CTX)),
        (ops.open, (ino, os.O_RDWR, CTX)),
        (ops.open, (ino, os.O_RDONLY | os.O_TRUNC, CTX)),
    ]
    for handler, args in changes:
        assert fuse_errno(handler, *args) == errno.EROFS, handler.__name__
    fh = call(ops.open, ino, os.O_RDONLY, CTX).fh
    assert bytes(call(ops.read, fh, 0, 100)) == b"data"
    call(ops.release, fh)
    assert call(ops.getattr, ino, CTX).st_atime_ns == attributes.st_atime_ns  # strictatime, yet read-only
    remount(daemon, read_only=False)
    fh = call(ops.open, ino, os.O_RDWR | os.O_TRUNC, CTX).fh
    assert call(ops.write, fh, 0, b"again") == 5
    assert bytes(call(ops.read, fh, 0, 100)) == b"again"
    call(ops.release, fh)
    assert call(ops.getattr, ino, CTX).st_atime_ns > attributes.st_atime_ns  # the mount's rule again
    call(ops.mkdir, ROOT_INO, b"dir", 0o755, CTX)
    daemon.fs.check_invariants()


def test_read_only_waits_for_writers_and_deleted_open_files() -> None:
    """The kernel's rule for a read-only remount (sb_prepare_remount_readonly): busy while a
    file is open for writing, or deleted but open; a read-only open is no obstacle."""
    daemon = built("size=1m")
    ops = daemon.operations
    ino = new_file(daemon, b"f", b"data")
    writer = call(ops.open, ino, os.O_WRONLY, CTX).fh
    assert refused(daemon, read_only=True, size=2 << 20).startswith("mount point is busy")
    call(ops.release, writer)
    reader = call(ops.open, ino, os.O_RDONLY, CTX).fh
    call(ops.unlink, ROOT_INO, b"f", CTX)
    assert refused(daemon, read_only=True).startswith("mount point is busy")
    call(ops.release, reader)
    kept = call(ops.open, new_file(daemon, b"g"), os.O_RDONLY, CTX).fh
    remount(daemon, read_only=True)
    remount(daemon, read_only=True)  # already: nothing to wait for
    call(ops.release, kept)


def test_overlay_limits_count_only_what_the_mount_changed(tmp_path: Path) -> None:
    """The backing directory's files hold no pages and no inodes of the mount."""
    lower = tmp_path / "lower"
    lower.mkdir()
    for n in range(10):
        (lower / f"f{n}").write_bytes(b"x" * (64 * KiB))
    daemon = built("size=1m,nr_inodes=100", lower)
    ops = daemon.operations
    ino = call(ops.lookup, ROOT_INO, b"f0", CTX).st_ino
    fh = call(ops.open, ino, os.O_WRONLY, CTX).fh
    assert call(ops.write, fh, 0, b"y" * PAGE) == PAGE
    call(ops.release, fh)
    held = daemon.arena.pages_held  # what that write copied up: a small part of 640 KiB
    assert 0 < held <= 16
    remount(daemon, size=held * PAGE, nr_inodes=1)  # those pages, and the root
    stats = daemon.fs.statfs()
    assert (stats.pages, stats.pages_free, stats.inodes, stats.inodes_free) == (held, 0, 1, 0)
    assert fuse_errno(ops.create, ROOT_INO, b"new", 0o644, os.O_CREAT | os.O_WRONLY, CTX) == errno.ENOSPC
    fh = call(ops.open, call(ops.lookup, ROOT_INO, b"f1", CTX).st_ino, os.O_WRONLY, CTX).fh
    assert fuse_errno(ops.write, fh, 0, b"y") == errno.ENOSPC
    call(ops.release, fh)
    daemon.fs.check_invariants()


# --- real mounts, remounted through mount(8) ---------------------------------------------
PATH_ENV = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
MOUNT_FAILED = 32  # mount(8)'s exit status when tmpfs refuses a remount


def mount8_remount(path: Path, options: str) -> subprocess.CompletedProcess[str]:
    """``mount -o remount,OPTIONS PATH``, as a user types it."""
    command = ["mount", "-o", f"remount,{options}", str(path)]
    return subprocess.run(command, env=PATH_ENV, capture_output=True, text=True, timeout=30)


def remounted(paths: Iterable[Path], options: str) -> list[int]:
    """The exit status of the same remount of each; mmfs's errors are one line."""
    codes = []
    for path in paths:
        done = mount8_remount(path, options)
        if done.returncode and "mmfs" in str(mounts.mounted_at(str(path))):
            assert done.stderr.startswith("mmfs: ") and done.stderr.count("\n") == 1, done.stderr
        codes.append(done.returncode)
    return codes


def attempt_on(path: Path, action: Callable[[Path], object]) -> object:
    """What ``action(path)`` returns, or the name of its errno."""
    return outcome(lambda: action(path))


def size_of(path: Path) -> tuple[int, int]:
    """What df shows: (size, available) in bytes."""
    vfs = os.statvfs(path)
    return vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize


@pytest.fixture
def pair(mmfs_factory: Callable[..., Mount], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(kernel tmpfs, mmfs), both size=1m,nr_inodes=100."""
    with mounted_kernel_tmpfs(tmp_path / "tmpfs", "size=1m,nr_inodes=100,mode=1777") as tmpfs:
        yield tmpfs, mmfs_factory(options="size=1m,nr_inodes=100").path


def test_size_grows_and_shrinks_as_on_tmpfs(pair: tuple[Path, Path]) -> None:
    for path in pair:
        (path / "f").write_bytes(b"x" * (600 * KiB))
    assert remounted(pair, "size=2m") == [0, 0]
    assert [size_of(path) for path in pair] == [(2 << 20, (2 << 20) - 600 * KiB)] * 2  # df shows it at once
    assert remounted(pair, "size=4k") == [MOUNT_FAILED] * 2  # below what is held: refused, nothing changed
    assert [size_of(path)[0] for path in pair] == [2 << 20] * 2
    assert remounted(pair, "size=600k") == [0, 0]
    assert [size_of(path) for path in pair] == [(600 * KiB, 0)] * 2
    assert [attempt_on(path, lambda p: (p / "g").write_bytes(b"y")) for path in pair] == ["ENOSPC"] * 2
    tmpfs_code, mmfs_code = remounted(pair, "size=abc")  # a bad value: one line, before asking the daemon
    assert (tmpfs_code, mmfs_code) == (MOUNT_FAILED, MOUNT_FAILED)
    assert [size_of(path)[0] for path in pair] == [600 * KiB] * 2


def test_nr_inodes_changes_as_on_tmpfs(pair: tuple[Path, Path]) -> None:
    for path in pair:
        for n in range(5):
            (path / f"f{n}").touch()
    assert remounted(pair, "nr_inodes=6") == [0, 0]  # the root and five files
    assert [(os.statvfs(path).f_files, os.statvfs(path).f_ffree) for path in pair] == [(6, 0)] * 2
    assert [attempt_on(path, lambda p: (p / "more").touch()) for path in pair] == ["ENOSPC"] * 2
    assert remounted(pair, "nr_inodes=5") == [MOUNT_FAILED] * 2
    assert remounted(pair, "nr_inodes=1k") == [0, 0]
    assert [os.statvfs(path).f_files for path in pair] == [1024] * 2


def changes(path: Path) -> dict[str, object]:
    """Every kind of change, tried on a tree made by ``populate``: what each answers."""
    f, d = path / "f", path / "d"
    return {
        "open O_RDWR": outcome(lambda: os.close(os.open(f, os.O_RDWR))),
        "open O_TRUNC": outcome(lambda: os.close(os.open(f, os.O_RDONLY | os.O_TRUNC))),
        "create": outcome(lambda: os.close(os.open(path / "new", os.O_CREAT | os.O_WRONLY, 0o644))),
        "mkdir": outcome(lambda: os.mkdir(path / "newdir")),
        "mknod": outcome(lambda: os.mkfifo(path / "fifo")),
        "symlink": outcome(lambda: os.symlink("f", path / "s2")),
        "link": outcome(lambda: os.link(f, path / "h")),
        "unlink": outcome(lambda: os.unlink(f)),
        "rmdir": outcome(lambda: os.rmdir(d)),
        "rename": outcome(lambda: os.rename(f, d / "g")),
        "truncate": outcome(lambda: os.truncate(f, 0)),
        "chmod": outcome(lambda: os.chmod(f, 0o600)),
        "chown": outcome(lambda: os.chown(f, 1, 1)),
        "utime": outcome(lambda: os.utime(f, (0, 0))),
        "setxattr": outcome(lambda: os.setxattr(f, "user.b", b"2")),
        "removexattr": outcome(lambda: os.removexattr(f, "user.a")),
    }


def readings(path: Path) -> dict[str, object]:
    """What reading the tree made by ``populate`` gives (atime included: a read-only mount keeps it)."""
    f = path / "f"
    return {
        "bytes": f.read_bytes(), "listing": sorted(os.listdir(path)), "xattr": os.getxattr(f, "user.a"),
        "target": os.readlink(path / "s"), "atime": os.stat(f).st_atime_ns, "mode": os.stat(f).st_mode,
    }


def populate(path: Path) -> None:
    (path / "f").write_bytes(b"contents")
    os.setxattr(path / "f", "user.a", b"1")
    (path / "d").mkdir()
    (path / "d" / "inside").touch()
    os.symlink("f", path / "s")
    os.utime(path / "f", ns=(1, 1))  # an atime that any read would move, under relatime


def test_read_only_refuses_every_change_as_tmpfs_does(pair: tuple[Path, Path]) -> None:
    for path in pair:
        populate(path)
    before = [readings(path) for path in pair]
    assert remounted(pair, "ro") == [0, 0]
    for path in pair:
        entry = mounts.mounted_at(str(path))
        assert entry is not None and entry.super_options.startswith(b"ro,")
        assert mount_options(path)[0] == "ro"  # the mount too, as mount(8) leaves a tmpfs
        assert os.statvfs(path).f_flag & os.ST_RDONLY
    tmpfs, mmfs = (changes(path) for path in pair)
    assert set(tmpfs.values()) == {"EROFS"}
    assert mmfs == tmpfs
    assert [readings(path) for path in pair] == before  # reads work, and leave atimes alone
    assert remounted(pair, "size=2m") == [0, 0]  # mount(8) passes "ro" again: still read-only
    assert [changes(path)["create"] for path in pair] == ["EROFS"] * 2
    assert remounted(pair, "rw") == [0, 0]
    for path in pair:
        assert mount_options(path)[0] == "rw" and not os.statvfs(path).f_flag & os.ST_RDONLY
        (path / "f").write_bytes(b"writable again")
        assert (path / "f").read_bytes() == b"writable again"
        (path / "newdir").mkdir()


def mount_options(path: Path) -> list[str]:
    """The mount's own options in mountinfo (the column before the superblock's)."""
    with open("/proc/self/mountinfo", "rb") as table:
        lines = [line.split() for line in table if line.split()[4] == os.fsencode(path)]
    return lines[-1][5].decode().split(",")


def test_read_only_waits_for_files_open_for_writing_as_tmpfs_does(pair: tuple[Path, Path]) -> None:
    """A remount,ro with a file open for writing is busy on tmpfs (the kernel's rule): refused,
    and the writer goes on writing."""
    writers = [os.open(path / "f", os.O_CREAT | os.O_WRONLY, 0o644) for path in pair]
    try:
        assert remounted(pair, "ro,size=2m") == [MOUNT_FAILED] * 2
        for fd, path in zip(writers, pair, strict=True):
            assert os.write(fd, b"still") == 5
            assert size_of(path)[0] == 1 << 20  # the size= of the refused remount did not happen either
            (path / "g").touch()
    finally:
        for fd in writers:
            os.close(fd)
    assert remounted(pair, "ro") == [0, 0]


def test_a_remount_the_kernel_refuses_is_undone_in_the_daemon(pair: tuple[Path, Path]) -> None:
    """A process in a removed directory keeps the kernel from making the superblock read-only
    (busy, on tmpfs too), which the daemon cannot see: it had agreed, and is put back as it was."""
    for path in pair:
        (path / "d").mkdir()
    sleepers = [subprocess.Popen(["sleep", "60"], cwd=path / "d") for path in pair]
    try:
        for path in pair:
            (path / "d").rmdir()
        assert remounted(pair, "ro,size=2m") == [MOUNT_FAILED] * 2
        for path in pair:
            assert size_of(path)[0] == 1 << 20 and not os.statvfs(path).f_flag & os.ST_RDONLY
            (path / "f").write_bytes(b"still writable")
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def test_read_only_without_the_kernel_is_the_daemons(mnt: Path, kernel_tmpfs: Path) -> None:
    """Without the privilege to mark the kernel's superblock read-only (a user's own mount),
    the daemon alone refuses: every change that reaches it is EROFS, as on tmpfs, and reads
    leave atimes alone; the kernel answers first where it needs no request (a missing name,
    an existing one)."""
    populate(mnt)
    populate(kernel_tmpfs)
    control.call(str(mnt), {"op": "remount", "read_only": True})
    assert not os.statvfs(mnt).f_flag & os.ST_RDONLY  # the kernel was not told
    subprocess.run(["mount", "-o", "remount,ro", str(kernel_tmpfs)], check=True)
    assert readings(mnt) == readings(kernel_tmpfs) and readings(mnt)["atime"] == 1  # a read leaves atime alone
    assert changes(mnt) == changes(kernel_tmpfs)
    assert names_the_kernel_knows(mnt) == {"unlink missing": "ENOENT", "mkdir existing": "EEXIST"}
    assert names_the_kernel_knows(kernel_tmpfs) == {"unlink missing": "EROFS", "mkdir existing": "EEXIST"}
    control.call(str(mnt), {"op": "remount", "read_only": False})
    (mnt / "new").touch()


def names_the_kernel_knows(path: Path) -> dict[str, object]:
    return {
        "unlink missing": attempt_on(path, lambda p: os.unlink(p / "missing")),
        "mkdir existing": attempt_on(path, lambda p: os.mkdir(p / "d")),
    }


def test_overlay_mount_remounts_too(mmfs_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """mount(8) passes an overlay's source ("overlay") and mountpoint only: that is enough."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "kept").write_bytes(b"lower bytes")
    path = mmfs_factory("overlay", str(lower), options="size=1m,nr_inodes=100").path
    (path / "new").write_bytes(b"y" * (8 * KiB))
    assert remounted([path], "size=8k,nr_inodes=2") == [0]
    assert size_of(path) == (8 * KiB, 0) and os.statvfs(path).f_ffree == 0
    assert remounted([path], "size=4k") == [MOUNT_FAILED]
    assert remounted([path], "ro") == [0]
    assert outcome(lambda: (path / "kept").write_bytes(b"x")) == "EROFS"
    assert (path / "kept").read_bytes() == b"lower bytes" and (path / "new").read_bytes() == b"y" * (8 * KiB)
    assert remounted([path], f"rw,size=1m,lowerdir={tmp_path}") == [MOUNT_FAILED]  # not another LOWERDIR
    assert remounted([path], f"rw,size=1m,lowerdir={lower}") == [0]
    (path / "kept").write_bytes(b"changed")
    assert (lower / "kept").read_bytes() == b"lower bytes"


def test_remount_of_what_is_not_an_mmfs_mount_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        mmfs_command("tmpfs", str(tmp_path), "-o", "remount,size=1m"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == MOUNT_FAILED
    assert done.stderr == f"mmfs: {tmp_path}: not a mountpoint\n"


def test_a_mount_made_read_only_never_stamps_atime(mmfs_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """-o ro: the kernel refuses the changes, and the daemon, which keeps atimes, leaves them alone."""
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_bytes(b"lower bytes")
    os.utime(lower / "f", ns=(10**18, 10**18))
    mnt = mmfs_factory("overlay", str(lower), options="ro").path
    assert (mnt / "f").read_bytes() == b"lower bytes"
    assert os.stat(mnt / "f").st_atime_ns == 10**18
    assert attempt_on(mnt, lambda p: (p / "g").write_bytes(b"y")) == "EROFS"
