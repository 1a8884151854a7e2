"""Overlay mode at its limits: security, bad lowerdirs, self-overlay, faults, memory, scale.

1. Symlinks in LOWERDIR that point outside it are shown, never followed by the
   daemon: an strace of the daemon while a client walks, stats, readlinks and
   reads everything shows only dir-fd-relative, ``..``-free, no-follow accesses
   that never name the secret; a lower path that turns into a symlink after
   mounting is refused with EIO.
2. A bad LOWERDIR is exit status 1, one ``mmfs:`` line, nothing mounted.
3. ``mmfs overlay DIR DIR`` shows DIR, takes writes, and leaves DIR untouched.
4. A backing file truncated underneath answers EIO (mapped or not), never kills
   the daemon, and the mount keeps serving; so does one truncated and
   re-extended over and over while a client reads it.
5. Writing one byte in the middle of a 1 GiB lower file costs one page;
   reading a modified 2 GiB lower file end to end leaves the daemon small.
6. 100,000 lower files, 70,000 of them modified: more than vm.max_map_count
   private maps would allow; the mount is live at once.
7. A lower file hard-linked outside LOWERDIR is freed (its written pages go
   back to size=) when its last name in the mount goes; one whose other name
   is in a directory not listed yet keeps its bytes for that name.

LOWERDIR is only ever written by a test to simulate an unsupported change
underneath the overlay (test 1's "became a symlink", test 4's truncation).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
import re
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    Mount,
    is_mounted,
    mmfs_command,
    mounted_kernel_tmpfs,
    read_uncached,
    start_mmfs,
    stop_mmfs,
    wait_for,
)
from support.syscalls import errno_of
from support.trees import Tree, file_digest, join, scan, snapshot

PAGE = os.sysconf("SC_PAGE_SIZE")
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
Factory = Callable[..., Mount]


# --- helpers ------------------------------------------------------------------
def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop_cache(fd: int) -> None:
    """Forget the client's page cache of a mount file, so reads reach the daemon."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def pread_uncached(path: Path, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` as the daemon answers them (a fresh fd, no cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_cache(fd)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int, length: int) -> bytes:
    """Bytes of a (lower) file at ``offset``."""
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(length)


def arm_atimes(root: Path) -> None:
    """Set every atime before its mtime, so that any read (relatime) would move it."""
    for rel in scan(root):
        path = join(root, rel)
        st = os.lstat(path)
        os.utime(path, ns=(st.st_mtime_ns - 10**9, st.st_mtime_ns), follow_symlinks=False)


def tree_snapshot(root: Path) -> Tree:
    """Every name under ``root``: type, mode, owner, size, links, inode, times, content hash, xattrs.

    Taken without touching an access time (symlink targets are compared apart:
    readlink always touches one).
    """
    stats = ("mode", "uid", "gid", "size", "nlink", "ino", "mtime_ns", "ctime_ns", "atime_ns")
    return snapshot(root, stats=stats, content=file_digest, target=False)


def daemon_private_bytes(pid: int) -> int:
    """Private_Dirty + Swap of a process, from smaps_rollup."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            key, _, rest = line.partition(":")
            if key in ("Private_Dirty", "Swap"):
                total += int(rest.split()[0]) * KiB
    return total


def shmem_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no Shmem in /proc/meminfo")


def daemon_memory(pid: int) -> int:
    """What the daemon holds: its private dirty memory plus the system's Shmem."""
    return daemon_private_bytes(pid) + shmem_bytes()


def map_count(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum(1 for _ in maps)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_alive(mount: Mount) -> None:
    assert mount.process.poll() is None, f"the daemon died ({mount.process.returncode}): {mount.log_text()}"


def make_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- 1. symlinks pointing outside are never followed by the daemon -------------
# Every syscall that takes a file name (open, openat, openat2, readlink(at),
# newfstatat, statx, the xattr calls, ...): a superset of what LowerDir uses.
TRACED = "%file"
# Fixed paths libfuse itself opens (the device; the splice pipe size limit).
ALLOWED_ABSOLUTE = re.compile(r"^(/dev/fuse\b.*|/proc/sys/fs/pipe-max-size|/proc/self/fd/\d+(/[^/]+)?)$")
TRACE_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
AT_ARGS = re.compile(r'^(AT_FDCWD|-?\d+),\s*"((?:[^"\\]|\\.)*)"')
PATH_ARG = re.compile(r'^"((?:[^"\\]|\\.)*)"')


class Strace:
    """strace attached to a running process, writing its trace to a file.

    Tracing has begun once every task has a tracer and a call that ``probe``
    makes the process do shows in the trace with ``probe_text``."""

    def __init__(self, pid: int, output: Path, probe: Callable[[], object], probe_text: str) -> None:
        self.pid, self.output = pid, output
        command = ["strace", "-f", "-qq", "-s", "4096", "-e", f"trace={TRACED}", "-p", str(pid), "-o", str(output)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        attached = wait_for(self._attached, 10) and wait_for(lambda: self._traced(probe, probe_text), 10)
        if not attached or self.process.poll() is not None:
            self.stop()
            raise AssertionError(f"strace did not attach to {pid}")

    def _traced(self, probe: Callable[[], object], probe_text: str) -> bool:
        probe()
        return self.output.exists() and probe_text in self.output.read_text(errors="replace")

    def _attached(self) -> bool:
        tasks = os.listdir(f"/proc/{self.pid}/task")
        return all(self._tracer(task) != 0 for task in tasks)

    def _tracer(self, task: str) -> int:
        with open(f"/proc/{self.pid}/task/{task}/status") as status:
            line = next(line for line in status if line.startswith("TracerPid:"))
        return int(line.split()[1])

    def stop(self) -> list[str]:
        """Detach and return the trace's lines."""
        if self.process.poll() is None:
            self.process.terminate()
        _, stderr = self.process.communicate(timeout=30)
        assert self.process.returncode in (0, -15), stderr
        return self.output.read_text(errors="replace").splitlines()


def parse_trace(lines: list[str]) -> list[tuple[str, str | None, str, str]]:
    """(syscall, dirfd or None, path, whole line) for every traced call that names a path."""
    calls = []
    for line in lines:
        match = TRACE_LINE.match(line)
        if not match or match.group(2) == "resumed":
            continue
        name, args = match.group(2), match.group(3)
        at_call, path_call = AT_ARGS.match(args), PATH_ARG.match(args)
        if at_call:
            calls.append((name, at_call.group(1), at_call.group(2), line))
        elif path_call:
            calls.append((name, None, path_call.group(1), line))
        else:
            raise AssertionError(f"cannot parse: {line}")
    return calls


def check_trace(lines: list[str], secret_token: str) -> list[tuple[str, str | None, str, str]]:
    """Every path the daemon named was dir-fd relative, ``..``-free, no-follow, not the secret."""
    calls = parse_trace(lines)
    for name, dirfd, path, line in calls:
        assert secret_token not in path, f"the daemon named the secret: {line}"
        assert ".." not in path.split("/"), f"'..' in a daemon path: {line}"
        if path.startswith("/"):
            assert ALLOWED_ABSOLUTE.match(path), f"absolute path outside LOWERDIR: {line}"
        elif path:
            assert dirfd not in (None, "AT_FDCWD"), f"path relative to the cwd: {line}"
        if name == "openat2":
            assert "RESOLVE_BENEATH" in line and "RESOLVE_NO_SYMLINKS" in line and "O_NOFOLLOW" in line, line
        if name in ("newfstatat", "statx") and path:
            assert "AT_SYMLINK_NOFOLLOW" in line, f"stat that follows symlinks: {line}"
        if name in ("listxattr", "getxattr"):
            assert not re.match(r"^/proc/self/fd/\d+/", path), f"xattr call that follows symlinks: {line}"
        if name == "openat":
            assert path.startswith("/") or dirfd != "AT_FDCWD", line
    for line in lines:  # only a symlink's target (readlinkat's answer) may mention the secret
        match = TRACE_LINE.match(line)
        assert secret_token not in line or (match is not None and match.group(2) == "readlinkat"), line
    return calls


def build_escape_tree(tmp_path: Path, token: str) -> tuple[Path, Path, Path]:
    """LOWERDIR with symlinks to a secret and a directory outside it: (lower, secret, outside).

    The same escapes sit at the top and in ``t/``: the root may be listed as soon
    as it is mounted, ``t`` only when a client first looks into it (traced).
    """
    secret = tmp_path / f"{token}-shadow"
    secret.write_text("root:TOPSECRET:19000:0:99999:7:::\n")
    outside = tmp_path / f"{token}-outside"
    outside.mkdir()
    (outside / "x").write_text("outside x\n")
    lower = tmp_path / "a" / "lower"  # lower/../../ is tmp_path
    for top, up in ((lower, "../.."), (lower / "t", "../../..")):
        make_file(top / "plain", b"plain file\n")
        make_file(top / "d" / "inner", b"inner file\n")
        make_file(top / "big", os.urandom(300 * KiB))
        os.symlink(str(secret), top / "abs_link")
        os.symlink(f"{up}/{secret.name}", top / "rel_link")
        os.symlink(f"{up}/../{secret.name}", top / "d" / "deep_rel_link")
        os.symlink(str(outside), top / "dirlink")
        os.symlink("..", top / "d" / "up")
        os.symlink("/", top / "rootlink")
    return lower, secret, outside


def walk_like_a_client(mnt: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """List everything, lstat and readlink every entry, read every regular file."""
    contents: dict[str, bytes] = {}
    targets: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(mnt):
        for name in dirnames + filenames:
            path = Path(directory) / name
            rel = str(path.relative_to(mnt))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                targets[rel] = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                contents[rel] = read_uncached(path)
    return contents, targets


def test_symlinks_outside_lowerdir_are_never_followed_by_the_daemon(tmp_path: Path, mmfs_factory: Factory) -> None:
    token = f"secret{os.getpid()}x{time.monotonic_ns()}"
    lower, secret, outside = build_escape_tree(tmp_path, token)
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    mnt = mount.path
    # the probe: the daemon opens the backing file of an uncached read (openat2 of "plain")
    tracer = Strace(mount.process.pid, tmp_path / "daemon.trace", lambda: read_uncached(mnt / "plain"), '"plain"')
    try:
        contents, targets = walk_like_a_client(mnt)
        via_dirlink = [subprocess.run(["cat", str(mnt / top / "dirlink" / "x")], capture_output=True,
                                      check=True).stdout for top in ("", "t")]
    finally:
        lines = tracer.stop()
    assert_alive(mount)
    held = [os.readlink(f"/proc/{mount.process.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{mount.process.pid}/fd")]
    assert not [target for target in held if token in target], held

    expected: dict[str, str] = {}
    for top, up in (("", "../.."), ("t/", "../../..")):
        expected |= {
            f"{top}abs_link": str(secret),
            f"{top}rel_link": f"{up}/{secret.name}",
            f"{top}d/deep_rel_link": f"{up}/../{secret.name}",
            f"{top}dirlink": str(outside),
            f"{top}d/up": "..",
            f"{top}rootlink": "/",
        }
    assert targets == expected
    regular = [f"{top}{name}" for top in ("", "t/") for name in ("plain", "d/inner", "big")]
    assert contents == {name: (lower / name).read_bytes() for name in regular}
    assert via_dirlink == [b"outside x\n"] * 2  # followed by the client's kernel, outside the mount
    for name in targets:
        assert stat.S_ISLNK(os.lstat(mnt / name).st_mode), name

    calls = check_trace(lines, token)  # the heart of the test
    opened = {path for name, _, path, _ in calls if name == "openat2"}
    assert set(regular) <= opened, f"strace missed lower reads: {sorted(opened)}"
    readlinks = {path for name, _, path, _ in calls if name == "readlinkat"}
    assert {"abs_link", "rel_link", "deep_rel_link", "dirlink", "up", "rootlink"} <= readlinks, lines


@pytest.mark.expect_log(r"^mmfs WARNING mmfs\.fs: backing storage failed, answering EIO: \[Errno (40|20)\]")
def test_lower_path_that_became_a_symlink_is_refused(tmp_path: Path, mmfs_factory: Factory) -> None:
    """Names the daemon already knows are swapped in LOWERDIR for symlinks leading
    outside: its own opens of those paths must refuse (EIO), never follow.

    A directory is listed when the kernel first learns of it (its size counts
    its entries), its subdirectories only when the kernel learns of them (a
    lookup or a readdir of their parent).
    """
    token = f"secret{os.getpid()}y{time.monotonic_ns()}"
    lower, secret, outside = build_escape_tree(tmp_path, token)
    make_file(lower / "victim", b"harmless\n")  # the file itself becomes a symlink
    make_file(lower / "outer" / "inner" / "x", b"inside x\n")  # a directory not listed yet becomes one
    make_file(lower / "outer" / "f", b"f\n")
    make_file(lower / "via" / secret.name, b"decoy\n")  # a directory on the way becomes one
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    mnt = mount.path
    assert stat.S_ISREG(os.lstat(mnt / "victim").st_mode)
    assert stat.S_ISREG(os.lstat(mnt / "outer" / "f").st_mode)  # lists outer, not inner
    assert stat.S_ISREG(os.lstat(mnt / "via" / secret.name).st_mode)

    os.symlink(str(secret), lower / "victim.new")
    os.rename(lower / "victim.new", lower / "victim")
    os.rename(lower / "outer" / "inner", lower / "outer" / "inner.old")
    os.symlink(str(outside), lower / "outer" / "inner")
    os.rename(lower / "via", lower / "via.old")
    os.symlink(str(secret.parent), lower / "via")

    with open(mnt / "victim", "rb") as victim:
        assert errno_of(victim.read) == errno.EIO
    assert errno_of(lambda: os.listdir(mnt / "outer" / "inner")) == errno.EIO
    assert errno_of(lambda: (mnt / "outer" / "inner" / "x").read_bytes()) == errno.EIO
    assert errno_of(lambda: (mnt / "via" / secret.name).read_bytes()) == errno.EIO
    assert_alive(mount)
    assert (mnt / "plain").read_bytes() == b"plain file\n"
    assert os.readlink(mnt / "abs_link") == str(secret)


# --- 2. bad lowerdir ---------------------------------------------------------
def _bad_lowerdirs(tmp: Path) -> dict[str, str]:
    regular = tmp / "regular"
    regular.write_text("not a directory\n")
    real_dir = tmp / "real_dir"
    real_dir.mkdir()
    (real_dir / "f").write_text("f\n")
    os.symlink(real_dir, tmp / "dir_symlink")
    os.symlink(tmp / "nowhere", tmp / "dangling")
    return {
        "missing": str(tmp / "missing"),
        "under missing parents": str(tmp / "no" / "such" / "lower"),
        "regular file": str(regular),
        "symlink to a directory": str(tmp / "dir_symlink"),
        "dangling symlink": str(tmp / "dangling"),
        "empty string": "",
    }


@pytest.mark.parametrize("mode", ["background", "foreground"])
@pytest.mark.parametrize("case", ["missing", "under missing parents", "regular file", "symlink to a directory",
                                  "dangling symlink", "empty string"])
def test_bad_lowerdir_is_one_line_and_status_1(tmp_path: Path, case: str, mode: str) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    lowerdir = _bad_lowerdirs(tmp_path)[case]
    command = mmfs_command("overlay", lowerdir, str(mountpoint)) + (["-f"] if mode == "foreground" else [])
    result = subprocess.run(command, capture_output=True, timeout=30, cwd=ROOT)
    stderr = result.stderr.decode(errors="replace")
    try:
        assert result.returncode == 1, (result.returncode, stderr)
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mmfs:"), stderr
        assert "Traceback" not in stderr and result.stdout == b"", (stderr, result.stdout)
        assert not is_mounted(mountpoint) and not mounts_under(tmp_path)
        assert os.listdir(mountpoint) == []
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["umount", str(mountpoint)], check=False)


# --- 3. overlay on itself -----------------------------------------------------
def test_overlay_on_itself_shows_dir_and_leaves_it_untouched(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    make_file(directory / "small", b"small original\n")
    make_file(directory / "sub" / "nested", b"nested original\n")
    big = os.urandom(2 * MiB)
    make_file(directory / "big", big)
    os.symlink("small", directory / "link")
    listing = sorted(os.listdir(directory))
    arm_atimes(directory)  # the daemon reads LOWERDIR noatime: not one atime may move
    before = tree_snapshot(directory)

    mount = start_mmfs(directory, tmp_path / "self.log", "overlay", str(directory), options="size=1g")
    try:
        assert sorted(os.listdir(directory)) == listing
        assert (directory / "small").read_bytes() == b"small original\n"
        assert (directory / "sub" / "nested").read_bytes() == b"nested original\n"
        assert read_uncached(directory / "big") == big
        assert os.readlink(directory / "link") == "small"

        with open(directory / "small", "ab") as small:
            small.write(b"appended\n")
        fd = os.open(directory / "big", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"MIDDLE", MiB) == 6
        finally:
            os.close(fd)
        (directory / "new").write_bytes(b"new file\n")
        (directory / "sub" / "nested").unlink()
        os.rename(directory / "sub", directory / "moved")
        os.mkdir(directory / "newdir")

        assert (directory / "small").read_bytes() == b"small original\nappended\n"
        assert read_uncached(directory / "big") == big[:MiB] + b"MIDDLE" + big[MiB + 6 :]
        assert (directory / "new").read_bytes() == b"new file\n"
        assert sorted(os.listdir(directory)) == ["big", "link", "moved", "new", "newdir", "small"]
        assert os.listdir(directory / "moved") == []
        assert_alive(mount)
    finally:
        stop_mmfs(mount)
    assert not is_mounted(directory)
    assert tree_snapshot(directory) == before
    assert os.readlink(directory / "link") == "small"


# --- 4. faults: a backing file truncated underneath ---------------------------
BACKING_CHANGED = r"^mmfs WARNING mmfs\.fs: backing storage failed, answering EIO: .*changed underneath the overlay"


@pytest.mark.expect_log(BACKING_CHANGED)
def test_backing_file_truncated_underneath_answers_eio(tmp_path: Path, mmfs_factory: Factory) -> None:
    lower = tmp_path / "lower"
    data = {name: os.urandom(4 * MiB) for name in ("mapped", "unmapped", "healthy")}
    for name, content in data.items():
        make_file(lower / name, content)
    small = os.urandom(64 * KiB)
    make_file(lower / "small_copied", small)
    make_file(lower / "small_unmodified", small)
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    mnt = mount.path

    mapped = os.open(mnt / "mapped", os.O_RDWR)
    unmapped = os.open(mnt / "unmapped", os.O_RDONLY)
    try:
        assert os.pwrite(mapped, b"XYZ", 2 * MiB + 100) == 3  # mapped MAP_PRIVATE now
        drop_cache(unmapped)
        assert os.pread(unmapped, PAGE, 0) == data["unmapped"][:PAGE]  # backing fd open
        with open(mnt / "small_copied", "r+b") as copied:
            copied.seek(10)
            copied.write(b"COPIED")
        assert pread_uncached(mnt / "small_unmodified", 16, 0) == small[:16]

        for name in ("mapped", "unmapped", "small_copied", "small_unmodified"):
            os.truncate(lower / name, 0)  # the unsupported change underneath

        for offset in (0, MiB, 3 * MiB, 4 * MiB - PAGE):  # pages never written
            for fd in (mapped, unmapped):
                drop_cache(fd)
                assert errno_of(functools.partial(os.pread, fd, PAGE, offset)) == errno.EIO, offset
            for name in ("mapped", "unmapped"):
                page = functools.partial(pread_uncached, mnt / name, PAGE, offset)
                assert errno_of(page) == errno.EIO, (name, offset)
            assert_alive(mount)
        assert errno_of(lambda: pread_uncached(mnt / "small_unmodified", 16, 0)) == errno.EIO
        assert errno_of(lambda: os.pwrite(mapped, b"again", 3 * MiB)) in (None, errno.EIO)
        assert_alive(mount)
    finally:
        os.close(mapped)
        os.close(unmapped)

    # copied into memory at its first write: the truncation underneath cannot touch it
    assert read_uncached(mnt / "small_copied") == small[:10] + b"COPIED" + small[16:]
    assert read_uncached(mnt / "healthy") == data["healthy"]
    (mnt / "fresh").write_bytes(b"still serving\n")
    assert read_uncached(mnt / "fresh") == b"still serving\n"
    assert os.stat(mnt / "mapped").st_size == 4 * MiB
    assert_alive(mount)
    stop_mmfs(mount)  # exit status 0 and nothing in the log but the expected warnings


@pytest.mark.expect_log(BACKING_CHANGED, required=False)  # the race may or may not catch a shrunk file
def test_backing_file_truncated_during_reads_never_kills_the_daemon(tmp_path: Path, mmfs_factory: Factory) -> None:
    """The same unsupported change, racing the reads: whatever the answers (EIO,
    zeros, old bytes), the daemon must survive and keep serving."""
    lower = tmp_path / "lower"
    size = 16 * MiB
    make_file(lower / "flipping", os.urandom(size))
    make_file(lower / "healthy", b"healthy\n")
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    mnt = mount.path
    fd = os.open(mnt / "flipping", os.O_RDWR)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            os.truncate(lower / "flipping", 0)
            os.truncate(lower / "flipping", size)

    flipper = threading.Thread(target=flip)
    rng = random.Random(4)
    answers: list[int | None] = []
    try:
        assert os.pwrite(fd, b"x", 100) == 1  # mapped MAP_PRIVATE now
        flipper.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and answers[-1:] != [errno.ENOTCONN]:
            drop_cache(fd)
            answers.append(errno_of(lambda: os.pread(fd, 128 * KiB, rng.randrange(size - 128 * KiB))))
    finally:
        stop.set()
        if flipper.is_alive():
            flipper.join()
        errno_of(lambda: os.close(fd))
    fatal = [line for line in mount.log_text().splitlines() if "Fatal" in line]
    died = f"the daemon died ({mount.process.returncode}) after {len(answers)} racing reads: {fatal}"
    assert mount.process.poll() is None, died
    assert set(answers) <= {None, errno.EIO}, set(answers)
    assert (mnt / "healthy").read_bytes() == b"healthy\n"
    stop_mmfs(mount)


# --- 5. copy-on-write memory bound --------------------------------------------
COW_LIMIT = 64 * KiB


def lower_fingerprint(path: Path, middle: int) -> dict[str, object]:
    size = path.stat().st_size
    return {
        "size": size,
        "first MiB": sha(read_at(path, 0, MiB)),
        "middle MiB": sha(read_at(path, middle - MiB // 2, MiB)),
        "last MiB": sha(read_at(path, size - MiB, MiB)),
        "byte": read_at(path, middle, 1),
    }


def test_one_byte_in_a_1gib_lower_file_costs_one_page(tmp_path: Path, mmfs_factory: Factory,
                                                       record_property: Callable[[str, object], None]) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    path, middle = lower / "huge", 512 * MiB
    with open(path, "wb") as huge:  # sparse, with real data where we look
        huge.truncate(GiB)
        for offset in (0, middle - MiB // 2, GiB - MiB):
            huge.seek(offset)
            huge.write(os.urandom(MiB))
    original = read_at(path, middle - MiB // 2, MiB)
    before = lower_fingerprint(path, middle)
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    pid, target = mount.process.pid, mount.path / "huge"

    fd = os.open(target, os.O_RDWR)
    deltas: list[int] = []
    try:
        assert os.pread(fd, PAGE, middle) == original[MiB // 2 : MiB // 2 + PAGE]  # warm the read path
        for attempt in range(5):  # each on a fresh page; the minimum filters unrelated noise
            offset = middle + attempt * 16 * PAGE
            value = bytes([original[MiB // 2 + attempt * 16 * PAGE] ^ 0xFF])
            start = daemon_memory(pid)
            assert os.pwrite(fd, value, offset) == 1
            os.fsync(fd)
            deltas.append(daemon_memory(pid) - start)
            if deltas[-1] <= COW_LIMIT:
                break
        record_property("cow_deltas_kib", [d // KiB for d in deltas])
        print(f"\n1-byte write cost (KiB): {[d // KiB for d in deltas]}")
        drop_cache(fd)
        window = os.pread(fd, 2 * PAGE, middle - PAGE)
        assert window[PAGE] == original[MiB // 2] ^ 0xFF  # the byte reads back
        assert window[:PAGE] == original[MiB // 2 - PAGE : MiB // 2]  # neighbours unchanged
        assert window[PAGE + 1 :] == original[MiB // 2 + 1 : MiB // 2 + PAGE]
        assert os.fstat(fd).st_size == GiB
        assert os.stat(target).st_size == GiB
    finally:
        os.close(fd)
    assert min(deltas) <= COW_LIMIT, f"1 byte cost {[d // KiB for d in deltas]} KiB of daemon memory"
    assert_alive(mount)
    stop_mmfs(mount)
    assert lower_fingerprint(path, middle) == before


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmRSS for {pid}")


def pattern_mib(n: int, block: bytes) -> bytes:
    """MiB number ``n`` of the big lower file: every MiB different."""
    return n.to_bytes(8, "little") + block[8:]


READ_RSS_LIMIT = 64 * MiB


def test_reading_a_modified_2gib_lower_file_keeps_the_daemon_small(
    tmp_path: Path, mmfs_factory: Factory, record_property: Callable[[str, object], None]
) -> None:
    """A lower file with a few pages written on the mount is read end to end,
    uncached (every read reaches the daemon): the pages never written must not
    stay mapped in the daemon, so its VmRSS grows by at most READ_RSS_LIMIT.
    The reads straddle written and unwritten pages and are checked byte for byte.

    LOWERDIR is a kernel tmpfs holding 2 GiB of real data (a sparse file would
    map the zero page and show nothing)."""
    with mounted_kernel_tmpfs(tmp_path / "lowerfs", "size=2200m") as lower:
        block = os.urandom(MiB)
        size = 2 * GiB
        with open(lower / "big", "wb") as big:
            for n in range(size // MiB):
                big.write(pattern_mib(n, block))
        mount = mmfs_factory("overlay", str(lower), options="size=256m")
        pid = mount.process.pid
        written = {GiB + 123: b"W", 5 * MiB - 10: b"across a page edge", size - 3: b"end"}
        fd = os.open(mount.path / "big", os.O_RDWR)
        try:
            for offset, data in written.items():
                assert os.pwrite(fd, data, offset) == len(data)  # the file is mapped MAP_PRIVATE now
            drop_cache(fd)
            before = vm_rss(pid)
            wrong = []
            for n in range(size // MiB):
                chunk = os.pread(fd, MiB, n * MiB)
                os.posix_fadvise(fd, n * MiB, MiB, os.POSIX_FADV_DONTNEED)  # the next read of it reaches the daemon
                expected = bytearray(pattern_mib(n, block))
                for offset, data in written.items():
                    for i, byte in enumerate(data):
                        if n * MiB <= offset + i < (n + 1) * MiB:
                            expected[offset + i - n * MiB] = byte
                if chunk != expected:
                    wrong.append(n)
            grown = vm_rss(pid) - before
        finally:
            os.close(fd)
        record_property("read_2gib_rss_growth_mib", round(grown / MiB, 1))
        print(f"\nreading a modified 2 GiB lower file: daemon VmRSS grew {grown / MiB:.1f} MiB")
        assert not wrong, f"{len(wrong)} MiB read back wrong, e.g. MiB {wrong[:5]}"
        assert grown <= READ_RSS_LIMIT, f"the daemon's VmRSS grew {grown / MiB:.0f} MiB"
        assert_alive(mount)
        stop_mmfs(mount)
        with open(lower / "big", "rb") as big:  # LOWERDIR untouched
            for offset in written:
                big.seek(offset // MiB * MiB)
                assert big.read(MiB) == pattern_mib(offset // MiB, block)


# --- 6. scale ---------------------------------------------------------------
DIRS, PER_DIR, MODIFIED = 100, 1000, 70_000


def file_content(d: int, n: int) -> bytes:
    return (f"dir {d:03} file {n:04} ".encode() * 5)[:100] + b"\n"


def build_many(lower: Path) -> list[Path]:
    """DIRS x PER_DIR files of ~100 bytes; returns the relative paths in order."""
    names = []
    for d in range(DIRS):
        directory = lower / f"d{d:03}"
        directory.mkdir(parents=True)
        for n in range(PER_DIR):
            fd = os.open(directory / f"f{n:04}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, file_content(d, n))
            os.close(fd)
            names.append(Path(f"d{d:03}/f{n:04}"))
    return names


def appended(rel: Path) -> bytes:
    return b"appended to " + str(rel).encode() + b"\n"


def test_modify_70k_of_100k_lower_files(tmp_path: Path, mmfs_factory: Factory,
                                        record_property: Callable[[str, object], None]) -> None:
    lower = tmp_path / "lower"
    began = time.monotonic()
    names = build_many(lower)
    print(f"\nbuilt {len(names)} lower files in {time.monotonic() - began:.1f} s")
    began = time.monotonic()
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    mount_seconds = time.monotonic() - began
    record_property("mount_seconds", round(mount_seconds, 2))
    print(f"mount over {len(names)} files live after {mount_seconds:.2f} s")
    assert mount_seconds < 3, f"mounting over {len(names)} files took {mount_seconds:.1f} s"
    mnt, pid = mount.path, mount.process.pid

    began = time.monotonic()
    for rel in names[:MODIFIED]:
        fd = os.open(mnt / rel, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, appended(rel))
        finally:
            os.close(fd)
    modify_seconds = time.monotonic() - began
    record_property("modify_files_per_second", round(MODIFIED / modify_seconds))
    print(f"modified {MODIFIED} files in {modify_seconds:.1f} s ({MODIFIED / modify_seconds:.0f}/s)")
    assert_alive(mount)
    assert map_count(pid) < 1000, f"{map_count(pid)} maps in the daemon"
    assert fd_count(pid) < 100, f"{fd_count(pid)} fds open in the daemon"

    began = time.monotonic()
    wrong = []
    for index, rel in enumerate(names):
        d, n = divmod(index, PER_DIR)
        expected = file_content(d, n) + (appended(rel) if index < MODIFIED else b"")
        if read_uncached(mnt / rel) != expected:
            wrong.append(str(rel))
    read_seconds = time.monotonic() - began
    record_property("read_files_per_second", round(len(names) / read_seconds))
    print(f"read back {len(names)} files in {read_seconds:.1f} s ({len(names) / read_seconds:.0f}/s)")
    assert not wrong, f"{len(wrong)} files read back wrong, e.g. {wrong[:5]}"
    assert sorted(os.listdir(mnt)) == [f"d{d:03}" for d in range(DIRS)]
    assert map_count(pid) < 1000 and fd_count(pid) < 100
    assert_alive(mount)
    began = time.monotonic()
    stop_mmfs(mount)
    print(f"unmounted in {time.monotonic() - began:.1f} s")
    for index in range(0, len(names), 97):  # LOWERDIR untouched (a sample)
        assert (lower / names[index]).read_bytes() == file_content(*divmod(index, PER_DIR)), names[index]


def test_writer_opening_a_mapped_backing_file_keeps_the_written_pages(tmp_path: Path, mmfs_factory: Factory) -> None:
    """Someone opens a privately mapped backing file for writing: the lease break
    moves the pages written on the mount into the arena before the opener may go
    on, so the mount still shows its own bytes and, for the rest, the file."""
    lower = tmp_path / "lower"
    lower.mkdir()
    original = random.Random(7).randbytes(4 << 20)
    make_file(lower / "big", original)
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    with open(mount.path / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"mount bytes")
        f.flush()
        maps_before = map_count(mount.process.pid)
        os.close(os.open(lower / "big", os.O_WRONLY))  # blocks until the daemon let go
        assert wait_for(lambda: map_count(mount.process.pid) < maps_before)
        expected = bytearray(original)
        expected[1 << 20 : (1 << 20) + 11] = b"mount bytes"
        assert read_uncached(mount.path / "big") == bytes(expected)
        f.seek(3 << 20)
        f.write(b"more")  # goes on in the arena
    expected[3 << 20 : (3 << 20) + 4] = b"more"
    assert read_uncached(mount.path / "big") == bytes(expected)
    assert (lower / "big").read_bytes() == original
    assert_alive(mount)


BUSY_LOOP = """
import os, sys
path = sys.argv[1]
os.close(os.open(path, os.O_RDONLY))
print("looping", flush=True)
while True:
    os.close(os.open(path, os.O_RDONLY))
"""


def test_lease_break_is_answered_while_requests_never_stop(tmp_path: Path, mmfs_factory: Factory) -> None:
    """While other clients keep the polling daemon busy, a lease break is still
    handled between two requests, long before the kernel would give up waiting
    (lease-break-time) and let the opener go on regardless.  (These clients
    leave gaps; a request stream with none is test_busy_poll's.)"""
    lower = tmp_path / "lower"
    lower.mkdir()
    make_file(lower / "big", bytes(4 << 20))
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    (mount.path / "busy").write_bytes(b"x")
    clients = [subprocess.Popen(["python3", "-c", BUSY_LOOP, str(mount.path / "busy")], stdout=subprocess.PIPE)
               for _ in range(4)]
    try:
        with open(mount.path / "big", "r+b") as f:
            f.seek(1 << 20)
            f.write(b"mount bytes")
            f.flush()
            for client in clients:  # each keeps the daemon answering OPEN and RELEASE from now on
                assert client.stdout is not None and client.stdout.readline() == b"looping\n"
            assert all(client.poll() is None for client in clients)
            began = time.monotonic()
            os.close(os.open(lower / "big", os.O_WRONLY))  # waits for the lease break
            waited = time.monotonic() - began
    finally:
        for client in clients:
            client.kill()
            client.communicate()  # reaped, its pipe closed
    with open("/proc/sys/fs/lease-break-time") as setting:
        assert waited < int(setting.read()) / 4, f"the lease break waited {waited:.1f} s"
    assert read_uncached(mount.path / "big")[1 << 20 : (1 << 20) + 11] == b"mount bytes"
    assert_alive(mount)


# --- 7. lower files hard-linked outside LOWERDIR ------------------------------
def used_pages(mnt: Path) -> int:
    vfs = os.statvfs(mnt)
    return vfs.f_blocks - vfs.f_bfree


def test_lower_file_linked_outside_lowerdir_is_freed_with_its_last_name(tmp_path: Path, mmfs_factory: Factory) -> None:
    lower, outside = tmp_path / "lower", tmp_path / "outside"
    data = random.Random(11).randbytes(4 * MiB)
    make_file(outside / "other-name", data)
    lower.mkdir()
    os.link(outside / "other-name", lower / "a")
    make_file(lower / "unlisted" / "x", b"x")  # a directory the mount has not listed yet,
    os.link(lower / "unlisted" / "x", lower / "unlisted" / "y")  # with hard links of its own
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    mnt = mount.path
    assert os.stat(mnt / "a").st_nlink == 2  # as stat shows it on LOWERDIR's filesystem
    before = used_pages(mnt)
    fd = os.open(mnt / "a", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"m" * MiB, MiB) == MiB  # 256 pages of the private map
        assert used_pages(mnt) == before + MiB // PAGE
        os.unlink(mnt / "a")
        assert os.fstat(fd).st_nlink == 0  # as tmpfs shows an unlinked open file
        drop_cache(fd)
        assert os.pread(fd, 8, MiB) == b"m" * 8 and os.pread(fd, 8, 0) == data[:8]
    finally:
        os.close(fd)
    assert used_pages(mnt) == before, "the written pages stay charged to size= after the last name went"
    assert os.stat(mnt / "unlisted" / "y").st_nlink == 2
    assert_alive(mount)
    stop_mmfs(mount)
    assert (outside / "other-name").read_bytes() == data and (lower / "a").read_bytes() == data


def test_lower_file_keeps_its_bytes_for_a_name_in_a_directory_not_listed_yet(
    tmp_path: Path, mmfs_factory: Factory
) -> None:
    """``a`` has a second name in LOWERDIR's ``deep/dir`` (not listed when ``a``
    goes) and a third outside LOWERDIR: the bytes written through ``a`` are
    there under ``deep/dir/b``, which then counts one link, and go once it goes."""
    lower, outside = tmp_path / "lower", tmp_path / "outside"
    data = random.Random(12).randbytes(4 * MiB)
    make_file(lower / "a", data)
    make_file(lower / "deep" / "dir" / "other", b"other")
    os.link(lower / "a", lower / "deep" / "dir" / "b")
    outside.mkdir()
    os.link(lower / "a", outside / "c")
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    mnt = mount.path
    assert os.stat(mnt / "a").st_nlink == 3
    before = used_pages(mnt)
    fd = os.open(mnt / "a", os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"MOUNT BYTES", 2 * MiB) == 11
    finally:
        os.close(fd)
    os.unlink(mnt / "a")
    assert used_pages(mnt) == before + 1  # the page is kept for deep/dir/b
    b = mnt / "deep" / "dir" / "b"
    assert sorted(os.listdir(mnt / "deep" / "dir")) == ["b", "other"]
    assert os.stat(b).st_nlink == 1  # the name outside LOWERDIR no longer counts
    expected = bytearray(data)
    expected[2 * MiB : 2 * MiB + 11] = b"MOUNT BYTES"
    assert read_uncached(b) == bytes(expected)
    os.unlink(b)
    assert used_pages(mnt) == before
    assert_alive(mount)
    stop_mmfs(mount)
    assert (lower / "a").read_bytes() == data == (outside / "c").read_bytes()
