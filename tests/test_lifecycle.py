"""The ``mmfs`` command and the life of a mount, with real mounts.

CLI: background start returns only once the mount is live; umount,
``fusermount3 -u``, SIGTERM and SIGINT end the daemon with status 0; every bad
invocation is status 1, one ``mmfs:`` line, nothing mounted; ``mount -t
fuse.mmfs`` and fstab work.  Limits and memory: statfs, ``size=`` and
``nr_inodes=`` (ENOSPC without losing data), memory given back on delete,
truncate and unmount, sparse files, 200,000 files, open-but-unlinked files.

Where kernel tmpfs can answer the same question, the test is parametrized
over ``kernel`` (the oracle: proves the expectation) and ``mmfs``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from conftest import Mount, ROOT, is_mounted, mmfs_command, mounted_kernel_tmpfs, read_uncached, stop_mmfs, wait_for

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
GiB = 1 << 30
PATH_ENV = {**os.environ, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

# Runs a command with this process as child subreaper, so that the daemon the
# command leaves behind becomes our child and its exit status can be read.
# Prints one JSON line for the command and, if it succeeded, one for the daemon.
REAPER = """
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
done = subprocess.run(json.loads(os.environ["REAPER_ARGV"]), capture_output=True)
print(json.dumps({"rc": done.returncode, "stdout": done.stdout.decode(errors="replace"),
                  "stderr": done.stderr.decode(errors="replace")}), flush=True)
if done.returncode == 0:
    pid, status = os.wait()
    print(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


# --- helpers ------------------------------------------------------------------
def daemon_pids(mountpoint: Path) -> set[int]:
    """Pids (other than ours) with ``mountpoint`` as one of their arguments."""
    target = str(mountpoint).encode()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if target in cmdline.read().split(b"\0"):
                    pids.add(int(entry))
        except OSError:
            pass
    return pids


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def mount_line(path: Path) -> list[str]:
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return next(line.split() for line in mounts if line.split()[1] == target)


def gone(mountpoint: Path) -> bool:
    return not is_mounted(mountpoint) and not daemon_pids(mountpoint)


def cleanup_mount(mountpoint: Path, pids: set[int]) -> None:
    """Unmount if still mounted; the daemon pids we saw get SIGKILL as last resort."""
    if is_mounted(mountpoint):
        subprocess.run(["umount", str(mountpoint)], check=False)
    if not wait_for(lambda: gone(mountpoint), 10):
        for pid in pids & daemon_pids(mountpoint):
            os.kill(pid, signal.SIGKILL)
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def read_json_line(process: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no answer from the reaper"
    line = process.stdout.readline()
    assert line, f"reaper ended early: {process.stderr.read() if process.stderr else ''!r}"
    return json.loads(line)  # type: ignore[no-any-return]


def end_mount(how: str, mountpoint: Path, pid: int) -> None:
    """End a mount the way a user would: a command or a signal to the daemon."""
    if how == "umount":
        subprocess.run(["umount", str(mountpoint)], check=True)
    elif how == "fusermount3":
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    else:
        os.kill(pid, getattr(signal, how))


def statvfs(path: Path) -> os.statvfs_result:
    return os.statvfs(path)


def df(path: Path) -> dict[str, str]:
    fields = "source,size,used,avail,itotal,iused,iavail"
    out = subprocess.run(["df", "-B1", f"--output={fields}", str(path)], check=True, capture_output=True, text=True)
    return dict(zip(fields.split(","), out.stdout.splitlines()[1].split()))


def shmem_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


def daemon_shmem(pid: int) -> int:
    """Bytes of shared memory held by the objects ``pid`` maps shared (its Shmem share).

    Counts every page of each shmem object (shared anonymous map, memfd, SysV),
    mapped or not, by stat()ing it through /proc/PID/map_files.
    """
    seen: set[str] = set()
    total = 0
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            name = fields[5].strip() if len(fields) > 5 else ""
            shmem = name.startswith(("/dev/zero", "/memfd:", "/SYSV", "/dev/shm/"))
            identity = f"{fields[3]}:{fields[4]}"
            if fields[1][3] != "s" or not shmem or identity in seen:
                continue
            seen.add(identity)
            total += os.stat(f"/proc/{pid}/map_files/{fields[0]}").st_blocks * 512
    return total


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_all(fd: int, data: bytes, chunk: int = 64 * 1024) -> tuple[int, Optional[OSError]]:
    """Write ``data`` in chunks until done or an error: (bytes written, error)."""
    view, done = memoryview(data), 0
    while done < len(data):
        try:
            done += os.write(fd, view[done : done + chunk])
        except OSError as error:
            return done, error
    return done, None


def write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written, error = write_all(fd, data, MiB)
        assert error is None and written == len(data), (written, error)
    finally:
        os.close(fd)


def write_pattern(path: Path, size: int) -> None:
    """``size`` bytes of non-zero data, written 1 MiB at a time."""
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, MiB):
            assert os.write(fd, block[: min(MiB, size - offset)]) == min(MiB, size - offset)
    finally:
        os.close(fd)


def create_empty(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE)


def run_mmfs(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(mmfs_command(*args), capture_output=True, timeout=timeout, cwd=ROOT)


# --- fixtures -----------------------------------------------------------------
class TmpfsFactory:
    """Mounts of one kind, ``kernel`` tmpfs or ``mmfs``, all unmounted at the end."""

    def __init__(self, kind: str, tmp_path: Path, mmfs_factory: Callable[..., Mount], mounts: ExitStack) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.mmfs_factory = mmfs_factory
        self.kernel_mounts = mounts
        self.made = 0
        self.mmfs_mounts: dict[Path, Mount] = {}

    def __call__(self, options: str) -> Path:
        if self.kind == "mmfs":
            mount = self.mmfs_factory(options=options)
            self.mmfs_mounts[mount.path] = mount
            return mount.path
        self.made += 1
        return self.kernel_mounts.enter_context(mounted_kernel_tmpfs(self.tmp_path / f"kernel{self.made}", options))


@pytest.fixture(params=["kernel", "mmfs"])
def tmpfs(
    request: pytest.FixtureRequest, tmp_path: Path, mmfs_factory: Callable[..., Mount]
) -> Iterator[TmpfsFactory]:
    """Call with an options string to get a mounted kernel tmpfs or mmfs."""
    with ExitStack() as kernel_mounts:
        yield TmpfsFactory(request.param, tmp_path, mmfs_factory, kernel_mounts)


# --- 1. background mode -------------------------------------------------------
@pytest.mark.parametrize("how", ["umount", "fusermount3", "SIGTERM", "SIGINT"])
def test_background_mount_is_live_on_return_and_ends_cleanly(tmp_path: Path, how: str) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = {**os.environ, "REAPER_ARGV": json.dumps(mmfs_command("tmpfs", str(mountpoint), "-o", "size=64m"))}
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    pids: set[int] = set()
    try:
        started = read_json_line(reaper, 30)
        live = is_mounted(mountpoint)  # immediately: no polling allowed
        pids = daemon_pids(mountpoint)
        assert started == {"rc": 0, "stdout": "", "stderr": ""}
        assert live, "mmfs returned 0 before the mount was live"
        assert mount_line(mountpoint)[2] == "fuse.mmfs"
        assert statvfs(mountpoint).f_blocks * PAGE == 64 * MiB
        write_file(mountpoint / "hello", b"hello\n")
        assert (mountpoint / "hello").read_bytes() == b"hello\n"
        assert len(pids) == 1, f"expected one daemon, found {pids}"
        (pid,) = pids

        end_mount(how, mountpoint, pid)
        ended = read_json_line(reaper, 30)
        assert ended == {"pid": pid, "exit": 0}
        assert wait_for(lambda: gone(mountpoint)), f"mounted={is_mounted(mountpoint)} pids={daemon_pids(mountpoint)}"
        assert reaper.wait(10) == 0
    finally:
        cleanup_mount(mountpoint, pids)
        if reaper.poll() is None:
            reaper.kill()
        reaper.wait()
        for stream in (reaper.stdout, reaper.stderr):
            assert stream is not None
            stream.close()


# --- 2. foreground mode -------------------------------------------------------
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3", "umount"])
def test_foreground_ends_with_status_0_and_mount_gone(mmfs_factory: Callable[..., Mount], how: str) -> None:
    mount = mmfs_factory(options="size=64m")
    write_file(mount.path / "data", os.urandom(100_000))
    end_mount(how, mount.path, mount.process.pid)
    assert mount.process.wait(timeout=30) == 0, mount.log_text()
    assert not is_mounted(mount.path)
    assert not daemon_pids(mount.path)
    assert not (mount.path / "data").exists()
    text = mount.log_text()
    assert "Traceback" not in text and " ERROR " not in text, text


# --- 3. bad invocations -------------------------------------------------------
# Arguments of each bad invocation: {mnt} is an empty directory, {file} a
# regular file, {tmp} the test's directory.
BAD_INVOCATIONS: dict[str, list[str]] = {
    "unknown option": ["tmpfs", "{mnt}", "-o", "frobnicate"],
    "unknown option with value": ["tmpfs", "{mnt}", "-o", "size=1m,bogus=1"],
    "size=abc": ["tmpfs", "{mnt}", "-o", "size=abc"],
    "size=1x": ["tmpfs", "{mnt}", "-o", "size=1x"],
    "size empty": ["tmpfs", "{mnt}", "-o", "size="],
    "nr_inodes=abc": ["tmpfs", "{mnt}", "-o", "nr_inodes=abc"],
    "mode=999": ["tmpfs", "{mnt}", "-o", "mode=999"],
    "uid=-1": ["tmpfs", "{mnt}", "-o", "uid=-1"],
    "gid=abc": ["tmpfs", "{mnt}", "-o", "gid=abc"],
    "-o without value": ["tmpfs", "{mnt}", "-o"],
    "no arguments": [],
    "too many arguments": ["tmpfs", "{mnt}", "{tmp}/extra"],
    "missing mountpoint": ["tmpfs"],
    "mountpoint does not exist": ["tmpfs", "{tmp}/nonexistent"],
    "mountpoint is a regular file": ["tmpfs", "{file}"],
    "unknown flag": ["tmpfs", "{mnt}", "--bogus"],
}


def assert_one_line_error(result: subprocess.CompletedProcess[bytes]) -> None:
    """Status 1, exactly one line on stderr starting with ``mmfs:``, nothing on stdout."""
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, (result.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmfs:"), stderr
    assert result.stdout == b"", result.stdout


@pytest.mark.parametrize("mode", ["background", "foreground"])
@pytest.mark.parametrize("case", list(BAD_INVOCATIONS))
def test_bad_invocation_is_one_line_and_status_1(tmp_path: Path, case: str, mode: str) -> None:
    (tmp_path / "mnt").mkdir()
    (tmp_path / "file").write_text("not a directory\n")
    places = {"mnt": tmp_path / "mnt", "file": tmp_path / "file", "tmp": tmp_path}
    args = [arg.format(**places) for arg in BAD_INVOCATIONS[case]] + (["-f"] if mode == "foreground" else [])
    assert_one_line_error(run_mmfs(*args))
    assert not mounts_under(tmp_path)
    assert not daemon_pids(tmp_path / "mnt")


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_second_mount_on_mmfs_mount_is_refused(mmfs_factory: Callable[..., Mount], mode: str) -> None:
    mount = mmfs_factory(options="size=64m")
    write_file(mount.path / "keep", b"still here")
    before = daemon_pids(mount.path)
    foreground = ["-f"] if mode == "foreground" else []
    assert_one_line_error(run_mmfs("tmpfs", str(mount.path), "-o", "size=64m", *foreground))
    target = str(mount.path.resolve())
    with open("/proc/self/mounts") as mounts:
        assert sum(line.split()[1] == target for line in mounts) == 1
    assert daemon_pids(mount.path) == before
    assert (mount.path / "keep").read_bytes() == b"still here"
    assert mount.process.poll() is None


# --- 4. mount(8) and fstab ----------------------------------------------------
def check_mount_helper_result(mountpoint: Path, source: str) -> None:
    line = mount_line(mountpoint)
    assert line[0] == source and line[2] == "fuse.mmfs", line
    usage = df(mountpoint)
    assert usage["source"] == source
    assert int(usage["size"]) == 10 * MiB
    assert int(usage["itotal"]) == 100
    vfs = statvfs(mountpoint)
    assert vfs.f_blocks * vfs.f_frsize == 10 * MiB and vfs.f_files == 100
    write_file(mountpoint / "probe", b"written through mount(8)")
    assert read_uncached(mountpoint / "probe") == b"written through mount(8)"


def mount_with_mount8_and_check(mountpoint: Path, command: list[str]) -> None:
    """Mount through mount(8), check what it shows, and unmount with umount."""
    pids: set[int] = set()
    try:
        done = subprocess.run(command, env=PATH_ENV, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert is_mounted(mountpoint)
        pids = daemon_pids(mountpoint)
        assert len(pids) == 1, pids
        check_mount_helper_result(mountpoint, "scratch")
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert wait_for(lambda: gone(mountpoint)), daemon_pids(mountpoint)
    finally:
        cleanup_mount(mountpoint, pids)


def test_mount_t_fuse_mmfs(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount_with_mount8_and_check(
        mountpoint, ["mount", "-t", "fuse.mmfs", "scratch", str(mountpoint), "-o", "size=10m,nr_inodes=100"]
    )


def test_mount_from_private_fstab(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# private test fstab\nscratch {mountpoint} fuse.mmfs size=10m,nr_inodes=100,noauto 0 0\n")
    mount_with_mount8_and_check(mountpoint, ["mount", "--fstab", str(fstab), str(mountpoint)])


def test_mount_t_fuse_mmfs_bad_option_fails_cleanly(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "fuse.mmfs", "scratch", str(mountpoint), "-o", "size=abc"],
            env=PATH_ENV, capture_output=True, text=True, timeout=30,
        )
        assert done.returncode != 0
        assert "mmfs:" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not mounts_under(tmp_path)
        assert wait_for(lambda: not daemon_pids(mountpoint))
    finally:
        cleanup_mount(mountpoint, set())


def test_ro_fsname_allow_other_reach_the_mount(mmfs_factory: Callable[..., Mount]) -> None:
    mount = mmfs_factory(options="size=64m,ro,fsname=scratchpad,allow_other")
    line = mount_line(mount.path)
    assert line[0] == "scratchpad" and line[2] == "fuse.mmfs", line
    assert "ro" in line[3].split(",") and "allow_other" in line[3].split(","), line
    assert statvfs(mount.path).f_flag & os.ST_RDONLY
    with pytest.raises(OSError) as info:
        create_empty(mount.path / "f")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.mkdir(mount.path / "d")
    assert info.value.errno == errno.EROFS


# --- 5. statfs and root options -----------------------------------------------
def test_statfs_reports_size_and_inodes(tmpfs: TmpfsFactory) -> None:
    size, nr_inodes = 64 * MiB, 1000
    root = tmpfs(f"size={size},nr_inodes={nr_inodes}")
    vfs = statvfs(root)
    assert vfs.f_frsize == PAGE and vfs.f_bsize == PAGE
    assert vfs.f_blocks * vfs.f_frsize == size
    assert vfs.f_bfree == vfs.f_bavail == vfs.f_blocks
    assert vfs.f_files == nr_inodes
    assert vfs.f_ffree == vfs.f_favail == nr_inodes - 1  # the root directory
    assert vfs.f_namemax == 255
    usage = df(root)
    assert int(usage["size"]) == size and int(usage["used"]) == 0 and int(usage["avail"]) == size
    assert int(usage["itotal"]) == nr_inodes and int(usage["iused"]) == 1

    free = vfs.f_bfree
    fd = os.open(root / "a", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        steps = [(0, 1, 1), (1, PAGE - 1, 1), (PAGE, 1, 2), (MiB, 1, 3), (PAGE, 3 * PAGE, 5)]
        for offset, length, held in steps:  # (where, how much, pages held afterwards)
            assert os.pwrite(fd, b"x" * length, offset) == length
            assert statvfs(root).f_bfree == free - held, (offset, length)
        assert int(df(root)["used"]) == 5 * PAGE
        os.ftruncate(fd, 0)
        assert statvfs(root).f_bfree == free
    finally:
        os.close(fd)

    for n in range(1, 6):
        create_empty(root / f"f{n}")
        assert statvfs(root).f_ffree == nr_inodes - 2 - n
    os.mkdir(root / "dir")
    assert statvfs(root).f_ffree == nr_inodes - 8
    for n in range(1, 6):
        os.unlink(root / f"f{n}")
    os.rmdir(root / "dir")
    assert statvfs(root).f_ffree == nr_inodes - 2
    assert statvfs(root).f_namemax == 255


def test_root_mode_uid_gid_options(tmpfs: TmpfsFactory) -> None:
    root = tmpfs("size=16m,mode=0755,uid=1234,gid=5678")
    info = os.stat(root)
    assert oct(info.st_mode) == oct(0o40755)
    assert (info.st_uid, info.st_gid) == (1234, 5678)


def test_root_defaults(tmpfs: TmpfsFactory) -> None:
    root = tmpfs("size=16m")
    info = os.stat(root)
    assert oct(info.st_mode) == oct(0o41777)
    assert (info.st_uid, info.st_gid) == (0, 0)


# --- 6. ENOSPC ----------------------------------------------------------------
def test_size_limit_enospc_keeps_data_and_frees_on_delete(tmpfs: TmpfsFactory) -> None:
    size = 8 * MiB
    root = tmpfs(f"size={size}")
    file_size = 300 * 1024 + 123  # several writes per file, last page partial
    hashes: dict[Path, str] = {}
    for n in range(100):
        path, data = root / f"f{n}", os.urandom(file_size)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            written, error = write_all(fd, data)
        finally:
            os.close(fd)
        if error is None:
            hashes[path] = sha(data)
            continue
        assert error.errno == errno.ENOSPC, error
        partial, partial_data = path, data[:written]
        break
    else:
        raise AssertionError("never ran out of space")

    assert len(hashes) == size // (pages(file_size) * PAGE)
    assert statvfs(root).f_bfree == 0
    assert partial.stat().st_size == len(partial_data)
    assert read_uncached(partial) == partial_data
    for path, digest in hashes.items():
        assert sha(read_uncached(path)) == digest, path
    # Full: an empty file can still be made, one more byte cannot.
    fd = os.open(root / "empty", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, b"x")
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (root / "empty").stat().st_size == 0

    victim = next(iter(hashes))
    os.unlink(victim)
    del hashes[victim]
    free_after_unlink = statvfs(root).f_bfree  # checked last: the write matters more
    data = os.urandom(file_size)
    write_file(root / "again", data)
    assert read_uncached(root / "again") == data
    for path, digest in hashes.items():
        assert sha(read_uncached(path)) == digest, path
    assert free_after_unlink == pages(file_size), "unlink did not give the space back at once"


def test_nr_inodes_limit(tmpfs: TmpfsFactory) -> None:
    nr_inodes = 50
    root = tmpfs(f"size=8m,nr_inodes={nr_inodes}")
    created = 0
    with pytest.raises(OSError) as info:
        while True:
            create_empty(root / f"f{created}")
            created += 1
    assert info.value.errno == errno.ENOSPC
    assert created == nr_inodes - 1  # the root holds one
    assert statvfs(root).f_ffree == 0
    for make in (os.mkdir, lambda p: os.symlink("target", p), lambda p: os.mknod(p, 0o600)):
        with pytest.raises(OSError) as info:
            make(root / "one-more")
        assert info.value.errno == errno.ENOSPC
    assert not os.path.lexists(root / "one-more")

    os.unlink(root / "f0")
    free_after_unlink = statvfs(root).f_ffree  # checked below: the create matters more
    create_empty(root / "replacement")
    with pytest.raises(OSError) as info:
        create_empty(root / "too-many")
    assert info.value.errno == errno.ENOSPC
    assert len(os.listdir(root)) == nr_inodes - 1
    assert free_after_unlink == 1, "unlink did not give the inode back at once"


def test_single_file_grows_to_size_limit(tmpfs: TmpfsFactory) -> None:
    size = 8 * MiB
    root = tmpfs(f"size={size}")
    data = os.urandom(size)
    fd = os.open(root / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written, error = write_all(fd, data[: size - 2 * PAGE], MiB)
        assert (written, error) == (size - 2 * PAGE, None)
        written, error = write_all(fd, data[size - 2 * PAGE :])
        assert (written, error) == (2 * PAGE, None)
        assert statvfs(root).f_bfree == 0
        with pytest.raises(OSError) as info:
            os.write(fd, b"x")
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (root / "big").stat().st_size == size
    assert sha(read_uncached(root / "big")) == sha(data)
    os.truncate(root / "big", 0)
    assert statvfs(root).f_bfree == size // PAGE


# --- 7. memory comes back -----------------------------------------------------
def test_memory_returns_on_delete_truncate_and_unmount(mmfs_factory: Callable[..., Mount]) -> None:
    """The daemon's shared memory (what it adds to Shmem) follows the data, exactly."""
    amount = 256 * MiB
    start = shmem_bytes()
    mount = mmfs_factory(options="size=2g")
    pid, path = mount.process.pid, mount.path / "big"
    assert daemon_shmem(pid) == 0

    for undo in ("unlink", "truncate"):
        write_pattern(path, amount)
        held = daemon_shmem(pid)
        assert amount <= held <= amount + MiB, f"{held / MiB:.1f} MiB held for {amount / MiB:.0f} MiB of data"
        if undo == "unlink":
            os.unlink(path)
        else:
            os.truncate(path, 0)
        assert wait_for(lambda: daemon_shmem(pid) == 0, 5), f"after {undo}: {daemon_shmem(pid) / MiB:.1f} MiB held"

    write_pattern(path, amount)
    assert daemon_shmem(pid) >= amount
    # Global Shmem also moves with whatever else runs on the machine: judge the
    # drop across the unmount, a short window, rather than the whole test.
    before = shmem_bytes()
    stop_mmfs(mount)
    assert wait_for(lambda: before - shmem_bytes() >= amount - 16 * MiB, 10), (
        f"unmount gave back only {(before - shmem_bytes()) / MiB:.1f} MiB of Shmem; "
        f"now {(shmem_bytes() - start) / MiB:+.1f} MiB from the start"
    )


# --- 8. scale -----------------------------------------------------------------
def test_200k_files(mmfs_factory: Callable[..., Mount], record_property: Callable[[str, object], None]) -> None:
    mount = mmfs_factory(options="size=1g")
    root = mount.path
    dirs, per_dir = 200, 1000
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    began = time.monotonic()
    for d in range(dirs):
        directory = f"{root}/d{d:03}"
        os.mkdir(directory)
        for n in range(per_dir):
            os.close(os.open(f"{directory}/f{n}", flags, 0o644))
    elapsed = time.monotonic() - began
    rate = dirs * per_dir / elapsed
    record_property("create_seconds", round(elapsed, 1))
    record_property("files_per_second", round(rate))
    print(f"\ncreated {dirs * per_dir} files in {elapsed:.1f} s: {rate:.0f} files/s")
    assert mount.process.poll() is None, mount.log_text()

    assert len(os.listdir(root)) == dirs
    assert sum(len(os.listdir(root / f"d{d:03}")) for d in range(dirs)) == dirs * per_dir
    found = subprocess.run(f"find {root} | wc -l", shell=True, check=True, capture_output=True, text=True)
    assert int(found.stdout) == 1 + dirs + dirs * per_dir
    vfs = statvfs(root)
    assert vfs.f_files - vfs.f_ffree == 1 + dirs + dirs * per_dir
    assert mount.process.poll() is None, mount.log_text()
    assert elapsed < 90, f"creating {dirs * per_dir} files took {elapsed:.0f} s ({rate:.0f} files/s)"


# --- 9. sparse files ----------------------------------------------------------
def test_sparse_file_holds_one_page_and_reads_zeros(tmpfs: TmpfsFactory) -> None:
    root = tmpfs("size=2g")
    path = root / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"z", GiB) == 1
        info = os.fstat(fd)
        assert info.st_size == GiB + 1
        assert info.st_blocks == 8
        assert os.stat(path).st_blocks == 8
        zeros = bytes(4 * MiB)
        for offset in range(0, GiB, len(zeros)):
            assert os.pread(fd, len(zeros), offset) == zeros, offset
        assert os.pread(fd, 10, GiB - 5) == bytes(5) + b"z"
    finally:
        os.close(fd)
    assert statvfs(root).f_blocks - statvfs(root).f_bfree == 1
    if tmpfs.kind == "mmfs":  # kernel tmpfs: global Shmem is too noisy to say more
        held = daemon_shmem(tmpfs.mmfs_mounts[root].process.pid)
        assert held == PAGE, f"a 1-byte sparse file, read through, holds {held / MiB:.2f} MiB"


# --- 10. open files whose name is gone ----------------------------------------
def test_unlinked_open_file_stays_readable(tmpfs: TmpfsFactory) -> None:
    root = tmpfs("size=64m,nr_inodes=1000")
    data = os.urandom(200_000)
    write_file(root / "victim", data)
    vfs = statvfs(root)
    fd = os.open(root / "victim", os.O_RDWR)
    try:
        os.unlink(root / "victim")
        assert not os.path.lexists(root / "victim")
        assert os.fstat(fd).st_nlink == 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data) + 10, 0) == data
        assert os.pwrite(fd, b"more", len(data)) == 4
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 10, len(data) - 2) == data[-2:] + b"more"
        assert os.fstat(fd).st_size == len(data) + 4
        assert statvfs(root).f_ffree == vfs.f_ffree  # still held while open
        assert statvfs(root).f_bfree == vfs.f_bfree
    finally:
        os.close(fd)
    assert wait_for(lambda: statvfs(root).f_bfree == vfs.f_blocks, 2), "space not returned after close"
    assert wait_for(lambda: statvfs(root).f_ffree == vfs.f_ffree + 1, 2), "inode not returned after close"


def test_renamed_over_open_file_stays_readable(tmpfs: TmpfsFactory) -> None:
    root = tmpfs("size=64m,nr_inodes=1000")
    old, new = os.urandom(150_000), os.urandom(70_000)
    write_file(root / "target", old)
    write_file(root / "incoming", new)
    vfs = statvfs(root)
    fd = os.open(root / "target", os.O_RDONLY)
    try:
        os.rename(root / "incoming", root / "target")
        assert os.fstat(fd).st_nlink == 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(old) + 10, 0) == old
        assert read_uncached(root / "target") == new
        assert os.stat(root / "target").st_nlink == 1
        assert statvfs(root).f_bfree == vfs.f_bfree  # old data still held
    finally:
        os.close(fd)
    expected_free = vfs.f_bfree + pages(len(old))
    assert wait_for(lambda: statvfs(root).f_bfree == expected_free, 2), "space not returned after close"
    assert wait_for(lambda: statvfs(root).f_ffree == vfs.f_ffree + 1, 2), "inode not returned after close"
