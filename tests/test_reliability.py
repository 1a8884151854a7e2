"""Reliability: mmfs keeps working and loses nothing under load, faults and bad input.

Most tests run in both modes (the ``target`` fixture): ``tmpfs`` (an empty RAM
filesystem) and ``overlay`` (over a small LOWERDIR on disk, built in tmp_path,
with a few lower files modified through the mount right after mounting; the
LOWERDIR is checked to be untouched at the end).  Where kernel tmpfs can answer
the same question, the same operations run on a kernel tmpfs prepared the same
way (the oracle) and the answers must be equal.

1. Load: 8 worker processes for a bounded time do creates, writes, reads,
   renames, links, unlinks, truncates and client mmaps (shared and private) in
   private directories, checking every byte they read against what they wrote;
   in a shared directory they publish complete, self-checksummed files by
   rename-into-place and read each other's.  Then ``tar x``, ``find``, ``du``
   and ``rm -rf`` run at once over the same tree.  No corruption, no hang, an
   empty mount after ``rm -rf`` of everything, and ``statvfs`` back to the
   figures of a fresh mount.  Distilled from it: opening or truncating a name
   while another process renames new files over it never fails (as on tmpfs).
2. Full: 4 processes fill ``size=`` at once: ENOSPC, every file completed
   before is intact (read past the page cache), deleting makes room, the
   daemon's RSS stays bounded.  The same for ``nr_inodes=``.
3. Largest offset: 1-byte writes at and around 2**63-1, O_APPEND at the limit,
   RLIMIT_FSIZE (EFBIG), truncate to huge sizes: the same answers as tmpfs.
4. Faults: SIGTERM to the daemon under 8 writers; ``fusermount3 -u``/``umount``
   of a busy mount (EBUSY, still serving, then a clean unmount); a client
   SIGKILLed in the middle of a large write loop; the daemon SIGKILLed
   (ENOTCONN, ``fusermount3 -u`` cleans up, a new mount on the same path works).
5. Bad input: 255/256-byte names, newlines and invalid UTF-8 in names, 4095- and
   4096-byte paths, long symlink targets, xattr names of 255/256 bytes and
   values of 65536/65537 bytes, negative offsets, huge truncates, O_DIRECT,
   O_TMPFILE (mmfs: EOPNOTSUPP, a documented FUSE limitation).  The mount keeps
   serving after each.
6. Permissions with ``allow_other``, as user nobody: a 0600 file, a sticky
   directory, chown, trusted.* xattrs, setuid/setgid clearing on write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from conftest import Mount, check_daemon_log, is_mounted, read_uncached, start_mmfs, stop_mmfs, wait_for
from support.syscalls import outcome
from support.trees import Tree, file_digest, snapshot

PAGE = mmap.PAGESIZE
KiB = 1 << 10
MiB = 1 << 20
MAX_OFF = 2**63 - 1  # MAX_LFS_FILESIZE: s_maxbytes of tmpfs and of FUSE
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody (the venv's interpreter may not be)
LOAD_SECONDS = 10.0
Factory = Callable[..., Mount]
Populate = Callable[[Path], None]


# --- the worker processes -------------------------------------------------------
# One script, several roles; its single argument is a JSON object with "role".
# It prints one JSON line with what it did and what it found wrong.
WORKER = r'''
import errno, hashlib, json, mmap, os, random, sys, time, traceback

SHARED_NAMES = 6  # few names: files are often renamed over while others open them

def sha(data):
    return hashlib.sha256(data).hexdigest()

def read_all(path, drop=True):
    fd = os.open(path, os.O_RDONLY)
    try:
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)

def write_all(fd, data, chunk=65536):
    """(bytes written, errno or None)"""
    view, done = memoryview(data), 0
    while done < len(data):
        try:
            done += os.write(fd, view[done:done + chunk])
        except OSError as error:
            return done, error.errno
    return done, None

def write_new(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        done, err = write_all(fd, data)
        if err is not None:
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)

def published(data):
    """A shared file: the sha256 of the payload, a newline, the payload."""
    return sha(data).encode() + b"\n" + data

def check_published(content):
    return len(content) >= 65 and content[64:65] == b"\n" and content[:64] == sha(content[65:]).encode()

class Load:
    def __init__(self, a):
        self.root, self.wid, self.rng = a["root"], a["wid"], random.Random(a["seed"])
        self.mine = os.path.join(self.root, "p%d" % self.wid)
        self.shared = os.path.join(self.root, "shared")
        self.deadline = time.monotonic() + a["seconds"]
        self.files = {}  # name -> bytearray; hard links share one
        self.errors, self.ops, self.counter, self.mine_links = [], {}, 0, []
        for name, digest in a["owned"].items():
            data = read_all(self.p(name))
            if sha(data) != digest:
                self.errors.append("%s: differs from what was there before the load" % name)
            self.files[name] = bytearray(data)

    def p(self, name):
        return os.path.join(self.mine, name)

    def fresh(self, prefix="f"):
        self.counter += 1
        return "%s%d" % (prefix, self.counter)

    def pick(self):
        return self.rng.choice(sorted(self.files)) if self.files else None

    def check(self, name, where):
        expected = self.files[name]
        data = read_all(self.p(name), self.rng.random() < 0.5)
        size = os.stat(self.p(name)).st_size
        if data != expected or size != len(expected):
            first = next((i for i, (x, y) in enumerate(zip(data, expected)) if x != y), min(len(data), len(expected)))
            self.errors.append("%s %s: read %d bytes (st_size %d), expected %d; first difference at %d"
                               % (where, name, len(data), size, len(expected), first))

    # --- private files ---
    def op_create(self):
        if len(self.files) >= 24:
            return self.op_unlink()
        size = self.rng.choice([0, 1, 100, 4096, 5000, 65543, 150000])
        data = self.rng.randbytes(size)
        name = self.fresh()
        write_new(self.p(name), data)
        self.files[name] = bytearray(data)

    def op_write(self):
        name = self.pick()
        if name is None:
            return self.op_create()
        content = self.files[name]
        offset = self.rng.randrange(0, len(content) + 8192)
        data = self.rng.randbytes(self.rng.randrange(1, 20000))
        fd = os.open(self.p(name), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        if offset > len(content):
            content.extend(bytes(offset - len(content)))
        content[offset:offset + len(data)] = data

    def op_read(self):
        name = self.pick()
        if name is not None:
            self.check(name, "read")

    def op_rename(self):
        name = self.pick()
        if name is None:
            return
        target = self.pick() if self.rng.random() < 0.3 else self.fresh()
        os.rename(self.p(name), self.p(target))
        if self.files.get(target) is not self.files[name]:  # two links of one file: nothing happens
            self.files[target] = self.files.pop(name)

    def op_link(self):
        name = self.pick()
        if name is None or len(self.files) >= 24:
            return
        new = self.fresh("l")
        os.link(self.p(name), self.p(new))
        self.files[new] = self.files[name]

    def op_unlink(self):
        name = self.pick()
        if name is not None:
            os.unlink(self.p(name))
            del self.files[name]

    def op_truncate(self):
        name = self.pick()
        if name is None:
            return
        content = self.files[name]
        size = self.rng.randrange(0, 2 * len(content) + 4096)
        os.truncate(self.p(name), size)
        if size < len(content):
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))

    def op_mmap_shared(self):
        name = self.pick()
        if name is None or not self.files[name]:
            return
        content = self.files[name]
        fd = os.open(self.p(name), os.O_RDWR)
        try:
            with mmap.mmap(fd, len(content), flags=mmap.MAP_SHARED) as mapped:
                if mapped[:] != content:
                    self.errors.append("mmap %s: mapped bytes differ" % name)
                offset = self.rng.randrange(len(content))
                data = self.rng.randbytes(min(len(content) - offset, self.rng.randrange(1, 9000)))
                mapped[offset:offset + len(data)] = data
                mapped.flush()
        finally:
            os.close(fd)
        content[offset:offset + len(data)] = data

    def op_mmap_private(self):
        name = self.pick()
        if name is None or not self.files[name]:
            return
        content = self.files[name]
        fd = os.open(self.p(name), os.O_RDONLY)
        try:
            with mmap.mmap(fd, len(content), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mapped:
                mapped[0:1] = bytes([content[0] ^ 0xFF])
                if mapped[1:] != content[1:]:
                    self.errors.append("private mmap %s: mapped bytes differ" % name)
        finally:
            os.close(fd)
        self.check(name, "after private mmap")

    # --- the shared directory ---
    def op_publish(self):
        temp = os.path.join(self.shared, ".tmp.%d.%d" % (self.wid, self.counter))
        self.counter += 1
        write_new(temp, published(self.rng.randbytes(self.rng.randrange(0, 100000))))
        os.rename(temp, os.path.join(self.shared, "s%d" % self.rng.randrange(SHARED_NAMES)))

    def op_shared_read(self):
        names = [n for n in os.listdir(self.shared) if not n.startswith(".tmp.")]
        if not names:
            return
        name = self.rng.choice(names)
        try:
            content = read_all(os.path.join(self.shared, name), self.rng.random() < 0.5)
        except FileNotFoundError:
            return  # unlinked by another worker in between: fine
        except OSError as error:  # tmpfs opens the file renamed over between lookup and open
            self.errors.append("shared %s: open or read failed: %s" % (name, error))
            return
        if not check_published(content):
            self.errors.append("shared %s: %d bytes fail their checksum" % (name, len(content)))

    def op_shared_link(self):
        source = os.path.join(self.shared, "s%d" % self.rng.randrange(SHARED_NAMES))
        link = os.path.join(self.shared, "h%d.%d" % (self.wid, self.counter))
        self.counter += 1
        try:
            os.link(source, link)
        except FileNotFoundError:
            return
        self.mine_links.append(link)
        if len(self.mine_links) > 4:
            os.unlink(self.mine_links.pop(0))

    def op_shared_unlink(self):
        try:
            os.unlink(os.path.join(self.shared, "s%d" % self.rng.randrange(SHARED_NAMES)))
        except FileNotFoundError:
            pass

    WEIGHTS = {"create": 8, "write": 12, "read": 12, "rename": 5, "link": 3, "unlink": 4, "truncate": 5,
               "mmap_shared": 4, "mmap_private": 2, "publish": 6, "shared_read": 10, "shared_link": 2,
               "shared_unlink": 1}

    def run(self):
        names, weights = list(self.WEIGHTS), list(self.WEIGHTS.values())
        while time.monotonic() < self.deadline and not self.errors:
            op = self.rng.choices(names, weights)[0]
            getattr(self, "op_" + op)()
            self.ops[op] = self.ops.get(op, 0) + 1
        for name in sorted(self.files):
            self.check(name, "final")
        listed = sorted(os.listdir(self.mine))
        if listed != sorted(self.files):
            self.errors.append("p%d lists %s, expected %s" % (self.wid, listed, sorted(self.files)))
        return {"ops": self.ops, "errors": self.errors[:10], "files": len(self.files)}

def load(a):
    return Load(a).run()

def fill(a):
    """Write files of a["size"] random bytes until ENOSPC."""
    rng, directory = random.Random(a["seed"]), a["dir"]
    done, n = {}, 0
    while n < 10000:
        data, name = rng.randbytes(a["size"]), "f%d" % n
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            written, err = write_all(fd, data)
        finally:
            os.close(fd)
        if err is not None:
            # A file can still be made when the data is full; one more byte cannot.
            fd = os.open(os.path.join(directory, "empty"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _, err2 = write_all(fd, b"x")
            finally:
                os.close(fd)
            return {"done": done, "partial": [name, written, sha(data[:written])],
                    "errno": err, "errno_one_more_byte": err2}
        done[name] = sha(data)
        n += 1
    return {"done": done, "partial": None, "errno": None}

def inodes(a):
    """Create empty files until ENOSPC; then try a directory and a symlink."""
    directory, made = a["dir"], []
    while len(made) < 100000:
        name = "%s%d" % (a.get("prefix", "i"), len(made))
        try:
            os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except OSError as error:
            result = {"made": made, "errno": error.errno}
            break
        made.append(name)
    else:
        return {"made": made, "errno": None}
    for what, make in (("mkdir", os.mkdir), ("symlink", lambda p: os.symlink("t", p))):
        try:
            make(os.path.join(directory, what))
            result[what] = None
        except OSError as error:
            result[what] = error.errno
    return result

def writer(a):
    """Write until the filesystem goes away (or 60 s): report the errno that stopped it."""
    deadline = time.monotonic() + 60
    chunk = os.urandom(65536)
    fd = os.open(a["path"], os.O_RDWR | os.O_CREAT, 0o644)
    print(json.dumps({"started": True}), flush=True)
    written = 0
    try:
        while time.monotonic() < deadline:
            os.write(fd, chunk)
            written += 1
            if written % 64 == 0:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.stat(os.path.dirname(a["path"]))
    except OSError as error:
        return {"errno": error.errno, "writes": written}
    return {"errno": None, "writes": written}

def block(index):
    """4 KiB that say which 4 KiB of the file they are."""
    return (b"%015d\n" % index) * 256

def bigwrite(a):
    """Append 64 KiB writes of self-describing 4 KiB blocks for up to 60 s."""
    deadline, index = time.monotonic() + 60, 0
    fd = os.open(a["path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while time.monotonic() < deadline:
        data = b"".join(block(index + i) for i in range(16))
        assert os.write(fd, data) == len(data)
        index += 16
    return {"blocks": index}

ROLES = {"load": load, "fill": fill, "inodes": inodes, "writer": writer, "bigwrite": bigwrite}

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    try:
        result = ROLES[args["role"]](args)
    except Exception:
        result = {"errors": ["worker crashed: " + traceback.format_exc()]}
    print(json.dumps(result), flush=True)
'''


class Workers:
    """Worker processes started from WORKER; all reaped (killed if need be) on exit."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, **args: Any) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.processes.append(process)
        return process

    def results(self, timeout: float) -> list[dict[str, Any]]:
        """Each worker's last JSON line, waiting at most ``timeout`` in all; a hang fails."""
        deadline = time.monotonic() + timeout
        results = []
        for process in self.processes:
            try:
                out, err = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {process.pid} hung (> {timeout:.0f} s)") from None
            assert process.returncode == 0, f"worker exited {process.returncode}: {err}"
            results.append(json.loads(out.splitlines()[-1]))
        return results

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


# --- helpers ----------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def det_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmRSS")


def run(*command: str | Path, timeout: float = 60, cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def assert_serving(mount: Mount) -> None:
    """The daemon is alive and the mount answers: statfs, create, write, read, unlink."""
    assert mount.process.poll() is None, f"the daemon died ({mount.process.returncode}): {mount.log_text()}"
    assert is_mounted(mount.path)
    os.statvfs(mount.path)
    probe = mount.path / ".serving-probe"
    data = os.urandom(5000)
    probe.write_bytes(data)
    assert read_uncached(probe) == data
    probe.unlink()


def lower_snapshot(lower: Path) -> Tree:
    """Mode, owner, size, mtime, content hash, symlink target and xattrs of every path in LOWERDIR."""
    return snapshot(lower, stats=("mode", "uid", "size", "mtime_ns"), content=file_digest)


# --- the two modes ----------------------------------------------------------------
# Lower files changed through the mount right after mounting: (path, offset, data).
CHANGES = [("small.txt", 1700, b"<changed through the mount>"), ("big.bin", 300 * KiB + 5, b"X" * 9000)]


def base_tree(root: Path) -> None:
    """What LOWERDIR holds (and, in tmpfs mode, what is written onto the mount first)."""
    os.chmod(root, 0o1777)  # the root of a kernel tmpfs; an overlay's root is LOWERDIR's
    (root / "small.txt").write_bytes(b"a small lower file\n" * 100)
    (root / "big.bin").write_bytes(det_bytes(1, 400 * KiB + 17))  # > 256 KiB: mapped MAP_PRIVATE
    (root / "docs").mkdir()
    for n in range(5):
        (root / "docs" / f"note{n}.txt").write_text(f"note {n}\n" * (n + 1))
    os.symlink("docs/note1.txt", root / "link")


class Target:
    """One mount of the mode under test, prepared the same way as its oracle."""

    def __init__(self, mode: str, tmp_path: Path, factory: Factory) -> None:
        self.mode, self.tmp_path, self.factory = mode, tmp_path, factory
        self.lower: Optional[Path] = None
        self.snapshot: Tree = {}
        self.fresh: Optional[os.statvfs_result] = None  # statvfs of the just-mounted filesystem
        self.expected: dict[str, bytes] = {}  # contents after CHANGES

    def prepare(self, root: Path, populate: Optional[Populate]) -> None:
        base_tree(root)
        if populate is not None:
            populate(root)

    def mount(self, options: str, populate: Optional[Populate] = None) -> Mount:
        if self.mode == "overlay":
            self.lower = self.tmp_path / "lower"
            self.lower.mkdir()
            self.prepare(self.lower, populate)
            self.snapshot = lower_snapshot(self.lower)
            mount = self.factory("overlay", str(self.lower), options=options)
            self.fresh = os.statvfs(mount.path)
        else:
            mount = self.factory("tmpfs", options=options)
            self.fresh = os.statvfs(mount.path)
            self.prepare(mount.path, populate)
        self.apply_changes(mount.path)
        return mount

    def apply_changes(self, root: Path) -> None:
        """Write CHANGES through the mount; remember what each changed file must hold."""
        for name, offset, data in CHANGES:
            content = bytearray(read_uncached(root / name))
            if self.lower is not None:
                assert content == (self.lower / name).read_bytes(), f"{name} is not LOWERDIR's"
            fd = os.open(root / name, os.O_WRONLY)
            try:
                assert os.pwrite(fd, data, offset) == len(data)
            finally:
                os.close(fd)
            content[offset : offset + len(data)] = data
            self.expected[name] = bytes(content)

    def oracle(self, path: Path, populate: Optional[Populate] = None) -> Path:
        """The kernel tmpfs at ``path`` prepared exactly like the mount."""
        if self.lower is not None:
            done = run("cp", "-a", f"{self.lower}/.", str(path))
            assert done.returncode == 0, done.stderr
        else:
            self.prepare(path, populate)
        for name, offset, data in CHANGES:
            fd = os.open(path / name, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        return path

    def check_changes(self, root: Path) -> None:
        for name, content in self.expected.items():
            assert read_uncached(root / name) == content, f"{name} lost its change"

    def check_lower(self) -> None:
        if self.lower is not None:
            assert lower_snapshot(self.lower) == self.snapshot, "LOWERDIR was changed"


@pytest.fixture(params=["tmpfs", "overlay"])
def target(request: pytest.FixtureRequest, tmp_path: Path, mmfs_factory: Factory) -> Iterator[Target]:
    chosen = Target(request.param, tmp_path, mmfs_factory)
    yield chosen
    chosen.check_lower()


# --- 1. load ----------------------------------------------------------------------
WORKERS = 8
OWNED = {"big": 300 * KiB + 11, "small": 10_000}  # per worker, existing before the load


def owned_content(wid: int, name: str) -> bytes:
    return det_bytes(100 * wid + len(name), OWNED[name])


def load_tree(root: Path) -> None:
    (root / "shared").mkdir()
    for wid in range(WORKERS):
        (root / f"p{wid}").mkdir()
        for name in OWNED:
            (root / f"p{wid}" / name).write_bytes(owned_content(wid, name))


def build_archive(tmp_path: Path) -> Path:
    """A tar of 12 directories of small files, symlinks and hard links."""
    source = tmp_path / "archive-src"
    rng = random.Random(5)
    for d in range(12):
        directory = source / f"dir{d:02}" / "sub"
        directory.mkdir(parents=True)
        for n in range(25):
            (directory.parent / f"file{n}.dat").write_bytes(rng.randbytes(rng.choice([0, 10, 3000, 70000])))
        os.symlink("../file0.dat", directory / "up")
        os.link(directory.parent / "file1.dat", directory / "hard")
    archive = tmp_path / "tree.tar"
    done = run("tar", "cf", archive, "-C", source, ".")
    assert done.returncode == 0, done.stderr
    return archive


def tree_listing(root: Path) -> list[str]:
    done = run("find", root)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_load_then_tools_lose_nothing_and_leave_nothing(target: Target, tmp_path: Path) -> None:
    mount = target.mount("size=512m", populate=load_tree)
    root = mount.path
    with Workers() as workers:
        for wid in range(WORKERS):
            owned = {name: sha(owned_content(wid, name)) for name in OWNED}
            workers.start(role="load", root=str(root), wid=wid, seconds=LOAD_SECONDS, seed=wid, owned=owned)
        results = workers.results(timeout=LOAD_SECONDS + 60)
    errors = [error for result in results for error in result.get("errors", [])]
    assert errors == [], errors
    total = sum(sum(result["ops"].values()) for result in results)
    print(f"\n{total} operations by {WORKERS} workers in {LOAD_SECONDS:.0f} s")
    assert all(result["ops"].get("mmap_shared") and result["ops"].get("publish") for result in results), results
    assert_serving(mount)
    target.check_changes(root)

    # tar x, find, du and rm -rf at once over the same tree
    archive = build_archive(tmp_path)
    (root / "t0").mkdir()
    done = run("tar", "xf", archive, "-C", root / "t0")
    assert done.returncode == 0, done.stderr
    done = run("tar", "df", archive, "-C", root / "t0")
    assert done.returncode == 0, done.stdout + done.stderr
    (root / "t1").mkdir()
    commands = {
        "tar": ["tar", "xf", str(archive), "-C", str(root / "t1")],
        "find": ["find", str(root)],
        "du": ["du", "-s", str(root)],
        "rm t0": ["rm", "-rf", str(root / "t0")],
        # rm -rf starts once tar has put something in t1 (or after 5 s), to race the rest of it
        "rm t1": ["sh", "-c", 'for i in $(seq 500); do [ -n "$(ls -A "$1")" ] && break; sleep 0.01; done; rm -rf "$1"',
                  "sh", str(root / "t1")],
    }
    running = {name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for name, cmd in commands.items()}
    try:
        codes = {name: process.wait(timeout=60) for name, process in running.items()}
    finally:
        for process in running.values():
            if process.poll() is None:
                process.kill()
            process.communicate()
    # tar and rm -rf race over t1: either may fail (a directory vanished, or was
    # refilled), find and du may see entries vanish (status 1): none may hang.
    assert codes["rm t0"] == 0 and codes["tar"] in (0, 2) and codes["find"] in (0, 1) and codes["du"] in (0, 1), codes
    assert not (root / "t0").exists()
    assert_serving(mount)
    (root / "t2").mkdir()
    assert run("tar", "xf", archive, "-C", root / "t2").returncode == 0
    done = run("tar", "df", archive, "-C", root / "t2")
    assert done.returncode == 0, done.stdout + done.stderr

    # rm -rf of everything: nothing stale, statfs back to a fresh mount's figures
    done = run("sh", "-c", f"rm -rf {root}/* {root}/.[!.]*")
    assert done.returncode == 0, done.stderr
    assert os.listdir(root) == []
    assert tree_listing(root) == [str(root)]
    assert not (root / "shared").exists() and not (root / "p0" / "big").exists()
    fresh = target.fresh
    assert fresh is not None
    assert wait_for(lambda: os.statvfs(root).f_bfree == fresh.f_bfree, 5), (os.statvfs(root), fresh)
    assert wait_for(lambda: os.statvfs(root).f_ffree == fresh.f_ffree, 5), (os.statvfs(root), fresh)
    assert_serving(mount)


RACE = r'''
import errno, json, os, sys, time
root, role, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
target = os.path.join(root, "published")
deadline = time.monotonic() + seconds
done, failures = 0, {}
while time.monotonic() < deadline:
    try:
        if role == "renamer":  # publish complete new versions over the name
            temp = os.path.join(root, "tmp%d.%d" % (os.getpid(), done))
            with open(temp, "wb") as file:
                file.write(b"version %d\n" % done)
            os.rename(temp, target)
        elif role == "opener":
            fd = os.open(target, os.O_RDONLY)
            try:
                data = os.read(fd, 100)
            finally:
                os.close(fd)
            if not data.startswith(b"version "):
                failures["bad data"] = failures.get("bad data", 0) + 1
        else:
            os.truncate(target, 8)  # keeps b"version "
        done += 1
    except OSError as error:
        name = errno.errorcode[error.errno]
        failures[name] = failures.get(name, 0) + 1
print(json.dumps({"role": role, "done": done, "failures": failures}))
'''


RACE_ROLES = ("renamer", "renamer", "opener", "opener", "truncater")


def race_open_and_truncate_with_rename_over(root: Path, seconds: float) -> list[dict[str, Any]]:
    """Two processes rename new files over a name; two open it, one truncates it."""
    (root / "published").write_bytes(b"version -1\n")
    processes = [subprocess.Popen([sys.executable, "-c", RACE, str(root), role, str(seconds)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for role in RACE_ROLES]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=seconds + 30)
            assert process.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def test_open_and_truncate_racing_rename_over_never_fail(target: Target, kernel_tmpfs: Path) -> None:
    """A name looked up just before another process renames a new file over it:
    on tmpfs the open (or truncate) gets the old file, and never fails."""
    mount = target.mount("size=64m")
    for root in (target.oracle(kernel_tmpfs), mount.path):
        results = race_open_and_truncate_with_rename_over(root, 2.0)
        assert all(result["done"] > 100 for result in results), results
        failures = [(result["role"], result["failures"]) for result in results if result["failures"]]
        assert failures == [], f"on {'kernel tmpfs' if root == kernel_tmpfs else 'mmfs'}: {results}"
    assert_serving(mount)


# --- 2. full ----------------------------------------------------------------------
FILL_WORKERS = 4
RSS_LIMIT = 200 * MiB


def test_size_limit_from_four_processes(target: Target) -> None:
    size = 32 * MiB
    file_size = 700 * KiB + 123
    mount = target.mount(f"size={size // MiB}m")
    root = mount.path
    for wid in range(FILL_WORKERS):
        (root / f"fill{wid}").mkdir()
    with Workers() as workers:
        for wid in range(FILL_WORKERS):
            workers.start(role="fill", dir=str(root / f"fill{wid}"), size=file_size, seed=wid)
        results = workers.results(timeout=120)
    assert [result.get("errno") for result in results] == [errno.ENOSPC] * FILL_WORKERS, results
    assert [result["errno_one_more_byte"] for result in results] == [errno.ENOSPC] * FILL_WORKERS
    assert os.statvfs(root).f_bfree == 0
    assert rss_bytes(mount.process.pid) < RSS_LIMIT, f"daemon RSS {rss_bytes(mount.process.pid) / MiB:.0f} MiB"

    completed = {root / f"fill{wid}" / name: digest for wid, r in enumerate(results) for name, digest in r["done"].items()}
    assert len(completed) >= 30, len(completed)  # 32 MiB hold 46 files, less the partial ones and the tree
    for path, digest in completed.items():
        assert sha(read_uncached(path)) == digest, f"{path} changed"
    for wid, result in enumerate(results):
        name, written, digest = result["partial"]
        path = root / f"fill{wid}" / name
        assert path.stat().st_size == written
        assert sha(read_uncached(path)) == digest
        assert (root / f"fill{wid}" / "empty").stat().st_size == 0
    target.check_changes(root)
    if target.mode == "overlay":  # an unchanged lower page needs memory too
        fd = os.open(root / "big.bin", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"y", 8 * PAGE)
            assert info.value.errno == errno.ENOSPC
        finally:
            os.close(fd)

    # deleting makes room; writing works again, from several processes
    victim = max(range(FILL_WORKERS), key=lambda wid: len(results[wid]["done"]))
    freed = len(results[victim]["done"])
    shutil.rmtree(root / f"fill{victim}")
    assert os.statvfs(root).f_bfree >= freed * (file_size // PAGE)
    if target.mode == "overlay":
        fd = os.open(root / "big.bin", os.O_WRONLY)
        try:
            assert os.pwrite(fd, b"y", 8 * PAGE) == 1
        finally:
            os.close(fd)
        target.expected["big.bin"] = target.expected["big.bin"][: 8 * PAGE] + b"y" + target.expected["big.bin"][8 * PAGE + 1 :]
    (root / "again").mkdir()
    with Workers() as workers:
        for wid in range(2):
            (root / "again" / f"w{wid}").mkdir()
            workers.start(role="fill", dir=str(root / "again" / f"w{wid}"), size=file_size, seed=10 + wid)
        again = workers.results(timeout=120)
    assert sum(len(result["done"]) for result in again) >= freed - 1, again
    for wid, result in enumerate(again):
        for name, digest in result["done"].items():
            assert sha(read_uncached(root / "again" / f"w{wid}" / name)) == digest
    for path, digest in completed.items():
        if path.parent.name != f"fill{victim}":
            assert sha(read_uncached(path)) == digest, f"{path} changed"
    target.check_changes(root)
    assert rss_bytes(mount.process.pid) < RSS_LIMIT, f"daemon RSS {rss_bytes(mount.process.pid) / MiB:.0f} MiB"
    assert_serving_when_full(mount)


def assert_serving_when_full(mount: Mount) -> None:
    """Like assert_serving, on a full mount: only metadata and reads."""
    assert mount.process.poll() is None, mount.log_text()
    os.statvfs(mount.path)
    os.listdir(mount.path)


def test_inode_limit_from_four_processes(target: Target) -> None:
    mount = target.mount("size=32m,nr_inodes=400")
    root = mount.path
    for wid in range(FILL_WORKERS):
        (root / f"ino{wid}").mkdir()
    free = os.statvfs(root).f_ffree
    with Workers() as workers:
        for wid in range(FILL_WORKERS):
            workers.start(role="inodes", dir=str(root / f"ino{wid}"))
        results = workers.results(timeout=60)
    assert [result["errno"] for result in results] == [errno.ENOSPC] * FILL_WORKERS, results
    assert [(result["mkdir"], result["symlink"]) for result in results] == [(errno.ENOSPC, errno.ENOSPC)] * FILL_WORKERS
    assert sum(len(result["made"]) for result in results) == free
    assert os.statvfs(root).f_ffree == 0
    for wid, result in enumerate(results):
        assert sorted(os.listdir(root / f"ino{wid}")) == sorted(result["made"])
    target.check_changes(root)

    victim = max(range(FILL_WORKERS), key=lambda wid: len(results[wid]["made"]))  # made at least 10
    for name in results[victim]["made"][:10]:
        os.unlink(root / f"ino{victim}" / name)
    assert os.statvfs(root).f_ffree == 10
    with Workers() as workers:
        for wid in range(2):
            workers.start(role="inodes", dir=str(root / f"ino{wid + 2}"), prefix="again")
        again = workers.results(timeout=60)
    assert sum(len(result["made"]) for result in again) == 10
    assert [result["errno"] for result in again] == [errno.ENOSPC] * 2
    assert rss_bytes(mount.process.pid) < RSS_LIMIT
    assert_serving_when_full(mount)


# --- 3. the largest offset --------------------------------------------------------
OFFSET_PROBE = r'''
import errno, json, os, resource, signal, sys
root = sys.argv[1]
M = 2**63 - 1
out = []
def r(label, action):
    try:
        value = action()
        out.append([label, "ok", value if isinstance(value, (int, type(None))) else value.hex()])
    except OSError as error:
        out.append([label, errno.errorcode[error.errno]])
for name in ("new", "small.txt", "big.bin"):
    path = os.path.join(root, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for offset, count in ((M - 1, 1), (M, 1), (M - 1, 2), (M - 3, 3), (M - 100, 200), (2**62, 1)):
        r("%s pwrite %d@M-%d" % (name, count, M - offset), lambda: os.pwrite(fd, b"z" * count, offset))
    r(name + " size", lambda: os.fstat(fd).st_size - M)
    r(name + " blocks", lambda: os.fstat(fd).st_blocks)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    r(name + " pread end", lambda: os.pread(fd, 8, M - 8))
    r(name + " pread 2**62", lambda: os.pread(fd, 2, 2**62))
    r(name + " pread head", lambda: os.pread(fd, 16, 0))
    r(name + " pread M", lambda: os.pread(fd, 1, M))
    append = os.open(path, os.O_WRONLY | os.O_APPEND)
    r(name + " append at M", lambda: os.write(append, b"a"))
    os.close(append)
    for size in (M, M - 1, 2**62 + 5, 2**40, 3):
        r("%s ftruncate %d" % (name, size), lambda: os.ftruncate(fd, size))
        r("%s size after ftruncate %d" % (name, size), lambda: os.fstat(fd).st_size)
    r(name + " truncate -1", lambda: os.truncate(path, -1))
    r(name + " truncate M", lambda: os.truncate(path, M))
    r(name + " lseek SEEK_END", lambda: os.lseek(fd, 0, os.SEEK_END))
    r(name + " lseek M+1", lambda: os.lseek(fd, 1, os.SEEK_END))
    r(name + " truncate 100", lambda: os.truncate(path, 100))
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    r(name + " pread after", lambda: os.pread(fd, 200, 0))
    os.close(fd)
sv = os.statvfs(root)
out.append(["pages used", sv.f_blocks - sv.f_bfree])
# RLIMIT_FSIZE: EFBIG (SIGXFSZ ignored) on write and truncate past it
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
fd = os.open(os.path.join(root, "limited"), os.O_RDWR | os.O_CREAT, 0o644)
r("fsize pwrite at limit", lambda: os.pwrite(fd, b"a", 1 << 20))
r("fsize pwrite across", lambda: os.pwrite(fd, b"ab", (1 << 20) - 1))
r("fsize ftruncate past", lambda: os.ftruncate(fd, (1 << 20) + 1))
r("fsize ftruncate to", lambda: os.ftruncate(fd, 1 << 20))
r("fsize size", lambda: os.fstat(fd).st_size)
os.close(fd)
print(json.dumps(out))
'''


def offset_answers(root: Path) -> dict[str, list[Any]]:
    done = run(sys.executable, "-c", OFFSET_PROBE, root, timeout=60)
    assert done.returncode == 0, done.stderr
    return {entry[0]: entry[1:] for entry in json.loads(done.stdout)}


def test_largest_offsets_like_tmpfs(target: Target, kernel_tmpfs: Path) -> None:
    mount = target.mount("size=64m")
    expected = offset_answers(target.oracle(kernel_tmpfs))
    # what tmpfs says, for the record: the last byte a file can hold is at 2**63-2;
    # a write whose end would pass 2**63-1 is EINVAL (offset overflow), an append
    # at the limit EFBIG, and RLIMIT_FSIZE gives EFBIG.
    assert expected["new pwrite 1@M-1"] == ["ok", 1] and expected["new pwrite 1@M-0"] == ["EINVAL"]
    assert expected["new append at M"] == ["EFBIG"] and expected["fsize pwrite at limit"] == ["EFBIG"]
    assert expected["fsize ftruncate past"] == ["EFBIG"] and expected["new ftruncate 9223372036854775807"] == ["ok", None]
    answers = offset_answers(mount.path)
    if target.mode == "overlay":  # a lower file's blocks are the backing filesystem's business
        for key in ("small.txt blocks", "big.bin blocks", "pages used"):
            del expected[key], answers[key]
    differences = {key: (expected.get(key), answers.get(key)) for key in expected.keys() | answers.keys()
                   if expected.get(key) != answers.get(key)}
    assert differences == {}, differences
    assert_serving(mount)
    assert sorted(os.listdir(mount.path)) == sorted(os.listdir(kernel_tmpfs))


# --- 4. faults --------------------------------------------------------------------
def test_sigterm_under_eight_writers(target: Target) -> None:
    mount = target.mount("size=256m")
    with Workers() as workers:
        for wid in range(WORKERS):
            workers.start(role="writer", path=str(mount.path / f"w{wid}"))
        for process in workers.processes:  # every writer is writing
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, f"writer {process.pid} did not start"
            assert json.loads(process.stdout.readline()) == {"started": True}
        # SIGTERM only once writes of every writer have landed (each file seen non-empty;
        # they truncate every 64 writes, so a size of 0 only means "not seen yet")
        landed: set[int] = set()

        def all_writing() -> bool:
            landed.update(wid for wid in range(WORKERS) if os.stat(mount.path / f"w{wid}").st_size > 0)
            return len(landed) == WORKERS

        assert wait_for(all_writing, 30, interval=0.005), f"only writers {sorted(landed)} wrote"
        os.kill(mount.process.pid, signal.SIGTERM)
        code = mount.process.wait(timeout=30)
        results = workers.results(timeout=30)
    text = mount.log_text()
    assert code == 0, text
    assert not is_mounted(mount.path)
    check_daemon_log(text)
    # every writer was stopped by an error (which one is the kernel's business)
    assert all(result["errno"] in (errno.ENOTCONN, errno.ECONNABORTED) for result in results), results
    assert os.listdir(mount.path) == []  # the bare mountpoint directory again


def test_busy_unmount_fails_like_tmpfs_and_mount_keeps_serving(target: Target, kernel_tmpfs: Path) -> None:
    mount = target.mount("size=64m")
    root = mount.path
    # kernel tmpfs: a busy mount refuses a normal umount
    fd = os.open(kernel_tmpfs / "open", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        refused = run("umount", kernel_tmpfs)
        assert refused.returncode != 0 and "busy" in refused.stderr, refused
    finally:
        os.close(fd)

    fd = os.open(root / "open", os.O_RDWR | os.O_CREAT, 0o644)
    sleeper = subprocess.Popen(["sleep", "60"], cwd=root / "docs")
    try:
        os.write(fd, b"before ")
        for command in (["fusermount3", "-u", str(root)], ["umount", str(root)]):
            refused = run(*command)
            assert refused.returncode != 0 and "busy" in refused.stderr.lower(), (command, refused)
            assert is_mounted(root) and mount.process.poll() is None
        os.write(fd, b"after")
        assert read_uncached(root / "open") == b"before after"
        assert_serving(mount)
        target.check_changes(root)
    finally:
        sleeper.kill()
        sleeper.wait()
        os.close(fd)
    done = run("fusermount3", "-u", root)
    assert done.returncode == 0, done.stderr
    assert mount.process.wait(timeout=30) == 0, mount.log_text()
    assert not is_mounted(root)
    check_daemon_log(mount.log_text())


def test_client_killed_mid_write_leaves_a_whole_readable_file(target: Target) -> None:
    mount = target.mount("size=256m")
    path = mount.path / "big-write"
    with Workers() as workers:
        writer = workers.start(role="bigwrite", path=str(path))
        assert wait_for(lambda: path.exists() and path.stat().st_size >= 48 * MiB, 30), "the writer did not get going"
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    assert_serving(mount)
    size = path.stat().st_size
    assert size >= 48 * MiB and size % (64 * KiB) == 0, size  # whole write(2)s only
    data = read_uncached(path)
    assert len(data) == size
    for index in range(size // PAGE):
        assert data[index * PAGE : (index + 1) * PAGE] == (b"%015d\n" % index) * 256, f"block {index} is wrong"
    os.unlink(path)
    target.check_changes(mount.path)
    assert_serving(mount)


def test_daemon_sigkill_enotconn_then_cleanup_and_remount(target: Target, tmp_path: Path) -> None:
    """Uses start_mmfs/stop_mmfs directly: the fixture would reject the killed daemon."""
    mountpoint = tmp_path / "killed"
    mountpoint.mkdir()
    args: list[str] = ["tmpfs"]
    if target.mode == "overlay":
        target.lower = tmp_path / "lower"
        target.lower.mkdir()
        base_tree(target.lower)
        target.snapshot = lower_snapshot(target.lower)
        args = ["overlay", str(target.lower)]
    mounts: list[Mount] = []
    try:
        mount = start_mmfs(mountpoint, tmp_path / "killed.log", *args, options="size=64m")
        mounts.append(mount)
        (mountpoint / "data").write_bytes(b"gone with the daemon")
        fd = os.open(mountpoint / "data", os.O_RDWR)
        try:
            mount.process.kill()
            assert mount.process.wait(timeout=30) == -signal.SIGKILL
            for action in (lambda: os.listdir(mountpoint), lambda: os.statvfs(mountpoint),
                           lambda: os.open(mountpoint / "new", os.O_CREAT | os.O_WRONLY, 0o644),
                           lambda: os.open(mountpoint / "data", os.O_RDONLY),
                           lambda: os.write(fd, b"more")):
                assert outcome(action) == "ENOTCONN"
            # What the kernel has cached (attributes for a day, pages) may still
            # answer without asking the dead daemon: stat and read of an open file.
            assert outcome(lambda: os.stat(mountpoint).st_ino) in ("ENOTCONN", 1)
            assert outcome(lambda: os.pread(fd, 10, 0)) in ("ENOTCONN", b"gone with ")
        finally:
            os.close(fd)
        assert is_mounted(mountpoint)
        done = run("fusermount3", "-u", mountpoint)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mountpoint)
        assert os.listdir(mountpoint) == []

        again = start_mmfs(mountpoint, tmp_path / "again.log", *args, options="size=64m")
        mounts.append(again)
        assert not (mountpoint / "data").exists()
        assert_serving(again)
        stop_mmfs(again)
    finally:
        for each in mounts:
            if each.process.poll() is None:
                each.process.kill()
                each.process.wait()
        if is_mounted(mountpoint):
            run("fusermount3", "-u", mountpoint)
        if is_mounted(mountpoint):
            run("umount", "-l", mountpoint)


# --- 5. bad input -----------------------------------------------------------------
def long_path(length: int) -> str:
    """A relative path of exactly ``length`` bytes: 254-byte directories, then a file name."""
    parts, used = [], 0
    while length - used > 256:
        parts.append("d" * 254)
        used += 255
    parts.append("f" * (length - used))
    return "/".join(parts)


def make_parents(dirfd: int, path: str) -> None:
    """mkdir -p of the parents that a path can name (shorter than PATH_MAX)."""
    parts = path.split("/")[:-1]
    for n in range(1, len(parts) + 1):
        if len("/".join(parts[:n])) >= 4096:
            return
        try:
            os.mkdir("/".join(parts[:n]), dir_fd=dirfd)
        except FileExistsError:
            pass


def case_names(root: Path) -> list[Any]:
    out: list[Any] = []
    for name in (b"a" * 255, b"b" * 256, b"line1\nline2\n", b"\xff\xfe\x80 not utf-8", b"\xc3\x28"):
        path = os.path.join(bytes(root), name)
        out.append(outcome(lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))))
        out.append(outcome(lambda: os.stat(path).st_size))
        out.append(outcome(lambda: os.mkdir(path + b".d")))
        out.append(outcome(lambda: os.symlink(b"target", path + b".l")))
        out.append(outcome(lambda: os.link(bytes(root / "small.txt"), path + b".h")))
        out.append(outcome(lambda: os.rename(bytes(root / "small.txt"), path + b".r")))
        out.append(outcome(lambda: os.rename(path + b".r", bytes(root / "small.txt"))))
        out.append(name in os.listdir(bytes(root)))
        out.append(outcome(lambda: os.setxattr(path, b"user.k", name[:200])))
        out.append(outcome(lambda: os.getxattr(path, b"user.k") == name[:200]))
    out.append(sorted(n for n in os.listdir(bytes(root)) if n[:1] in (b"a", b"b", b"l", b"\xff", b"\xc3")))
    for name in (b"a" * 255, b"line1\nline2\n", b"\xff\xfe\x80 not utf-8", b"\xc3\x28"):
        out.append(outcome(lambda: os.unlink(os.path.join(bytes(root), name))))
    return out


def case_long_paths(root: Path) -> list[Any]:
    out: list[Any] = []
    dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for length in (4095, 4096, 5000):
            path = long_path(length)
            make_parents(dirfd, path)
            out.append(outcome(lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dirfd))))
            out.append(outcome(lambda: os.stat(path, dir_fd=dirfd).st_size))
            out.append(outcome(lambda: os.mkdir(path, dir_fd=dirfd)))
        out.append(outcome(lambda: os.symlink("t" * 4095, "long-target", dir_fd=dirfd)))
        out.append(outcome(lambda: os.readlink("long-target", dir_fd=dirfd) == "t" * 4095))
        out.append(outcome(lambda: os.symlink("t" * 4096, "too-long-target", dir_fd=dirfd)))
        out.append(outcome(lambda: os.lstat("long-target", dir_fd=dirfd).st_size))
        path = long_path(4095)
        fd = os.open(path, os.O_RDWR, dir_fd=dirfd)
        try:
            out.append(os.write(fd, b"deep file"))
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            out.append(os.pread(fd, 20, 0))
        finally:
            os.close(fd)
    finally:
        os.close(dirfd)
    return out


def case_xattrs(root: Path) -> list[Any]:
    out: list[Any] = []
    path = root / "x-target"
    path.write_bytes(b"xattrs")
    for prefix in ("user.", "trusted."):
        for length in (255, 256):
            name = prefix + "n" * (length - len(prefix))
            out.append(outcome(lambda: os.setxattr(path, name, b"v")))
            out.append(outcome(lambda: os.getxattr(path, name)))
            out.append(outcome(lambda: os.removexattr(path, name)))
        for size in (65536, 65537):
            value = det_bytes(size, size)
            out.append(outcome(lambda: os.setxattr(path, prefix + "big", value)))
            out.append(outcome(lambda: sha(os.getxattr(path, prefix + "big")) == sha(value[:65536])))
    out.append(sorted(os.listxattr(path)))
    out.append(outcome(lambda: os.setxattr(path, "user.empty", b"")))
    out.append(outcome(lambda: os.getxattr(path, "user.empty")))
    out.append(outcome(lambda: os.setxattr(path, "user.", b"v")))
    out.append(outcome(lambda: os.setxattr(path, "nonamespace", b"v")))
    out.append(outcome(lambda: os.setxattr(path, "user.big", b"w", os.XATTR_CREATE)))
    out.append(outcome(lambda: os.setxattr(path, "user.absent", b"w", os.XATTR_REPLACE)))
    return out


def case_offsets(root: Path) -> list[Any]:
    """Negative offsets and huge sizes, on a lower file (overlay) and a new one.

    st_blocks is compared for the new file only: a lower file's blocks are the
    backing filesystem's business.
    """
    out: list[Any] = []
    (root / "created").write_bytes(b"c" * 5000)
    for name in ("small.txt", "created"):
        path = root / name
        size = path.stat().st_size
        fd = os.open(path, os.O_RDWR)
        try:
            for action in (lambda: os.pread(fd, 10, -1), lambda: os.pwrite(fd, b"x", -1),
                           lambda: os.pwrite(fd, b"x", -(2**63)), lambda: os.lseek(fd, -1, os.SEEK_SET),
                           lambda: os.ftruncate(fd, -1), lambda: os.truncate(path, -1),
                           lambda: os.ftruncate(fd, 2**63 - 1), lambda: os.fstat(fd).st_size,
                           lambda: os.truncate(path, 2**40), lambda: os.pread(fd, 3, 2**40 - 2),
                           lambda: os.ftruncate(fd, size), lambda: sha(read_uncached(path))):
                out.append(outcome(action))
            if name == "created":
                out.append(os.stat(path).st_blocks)
        finally:
            os.close(fd)
    return out


def case_o_direct(root: Path) -> list[Any]:
    """O_DIRECT with page-aligned buffers and offsets.

    Kernel tmpfs accepts O_DIRECT (since 6.6, served from the page cache); FUSE
    accepts it too and sends the I/O straight to the daemon.  The data written
    and read back is what must agree; so must the errnos here.
    """
    out: list[Any] = []
    data = det_bytes(7, 3 * PAGE)
    fd = os.open(root / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    with mmap.mmap(-1, 3 * PAGE) as buffer:
        try:
            buffer[:] = data
            out.append(outcome(lambda: os.pwrite(fd, buffer, 0)))
            out.append(outcome(lambda: os.pwritev(fd, [memoryview(buffer)[: 2 * PAGE]], 5 * PAGE)))
            buffer[:] = bytes(3 * PAGE)
            out.append(outcome(lambda: os.preadv(fd, [buffer], 0)))
            out.append(sha(buffer[:]) == sha(data))
            out.append(outcome(lambda: os.preadv(fd, [buffer], 5 * PAGE)))
            out.append(bytes(buffer[: 2 * PAGE]) == data[: 2 * PAGE])
            out.append(os.fstat(fd).st_size)
        finally:
            os.close(fd)
    expected = data + bytes(2 * PAGE) + data[: 2 * PAGE]
    out.append(read_uncached(root / "direct") == expected)
    return out


def case_tmpfile(root: Path) -> list[Any]:
    def make() -> str:
        fd = os.open(root, os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            os.write(fd, b"anonymous")
            return "ok"
        finally:
            os.close(fd)

    before = sorted(os.listdir(root))
    return [outcome(make), sorted(os.listdir(root)) == before]


BAD_INPUT_CASES: dict[str, Callable[[Path], list[Any]]] = {
    "names": case_names,
    "long paths": case_long_paths,
    "xattrs": case_xattrs,
    "offsets": case_offsets,
    "O_DIRECT": case_o_direct,
    "O_TMPFILE": case_tmpfile,
}


def test_bad_input_answers_like_tmpfs_and_mount_keeps_serving(target: Target, kernel_tmpfs: Path) -> None:
    mount = target.mount("size=64m")
    oracle = target.oracle(kernel_tmpfs)
    expected: dict[str, list[Any]] = {}
    for case, probe in BAD_INPUT_CASES.items():
        expected[case] = probe(oracle)
        answers = probe(mount.path)
        assert_serving(mount)
        if case == "O_TMPFILE":
            # tmpfs supports O_TMPFILE; FUSE through pyfuse3 cannot (no tmpfile
            # request): documented in the README as EOPNOTSUPP, nothing left behind
            assert expected[case] == ["ok", True] and answers == [errno.errorcode[errno.EOPNOTSUPP], True], (expected[case], answers)
            continue
        assert answers == expected[case], f"{case}: tmpfs {expected[case]!r}\nmmfs {answers!r}"
    # the answers that matter, as tmpfs gives them
    names = expected["names"]
    assert names[0] is None and names[10] == names[11] == names[12] == "ENAMETOOLONG", names
    assert names[20] is None and names[30] is None and names[40] is None  # newline, bad UTF-8
    paths = expected["long paths"]
    assert paths[:4] == [None, 0, "EEXIST", "ENAMETOOLONG"] and paths[-2:] == [9, b"deep file"], paths
    xattrs = expected["xattrs"]
    assert xattrs[0] is None and xattrs[3] == "ERANGE" and xattrs[6] is None and xattrs[8] == "E2BIG", xattrs
    assert expected["offsets"][:6] == ["EINVAL"] * 6
    assert expected["O_DIRECT"][-1] is True
    assert sorted(os.listdir(mount.path)) == sorted(os.listdir(oracle))
    target.check_changes(mount.path)
    assert_serving(mount)


# --- 6. permissions as nobody -----------------------------------------------------
NOBODY_PROBE = r'''
import errno, json, os
out = {}
def r(label, action):
    try:
        value = action()
        out[label] = "ok" if value is None or isinstance(value, int) else value
    except OSError as error:
        out[label] = errno.errorcode[error.errno]
def write(path):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, b"nobody was here")
    finally:
        os.close(fd)
r("read 0600 root file", lambda: open("secret", "rb").read().decode())
r("write 0600 root file", lambda: os.open("secret", os.O_WRONLY))
r("chmod root file", lambda: os.chmod("secret", 0o644))
r("unlink root file in sticky dir", lambda: os.unlink("sticky/rootfile"))
r("unlink other user's file in sticky dir", lambda: os.unlink("sticky/otherfile"))
r("rename other user's file in sticky dir", lambda: os.rename("sticky/otherfile", "sticky/mine-now"))
r("create own file in sticky dir", lambda: os.close(os.open("sticky/own", os.O_CREAT | os.O_WRONLY, 0o644)))
r("unlink own file in sticky dir", lambda: os.unlink("sticky/own"))
r("create in 0755 root dir", lambda: os.close(os.open("rootdir/x", os.O_CREAT | os.O_WRONLY, 0o644)))
r("chown own file to root", lambda: os.chown("mine", 0, -1))
r("chgrp own file to root group", lambda: os.chown("mine", -1, 0))
r("chown own file to self", lambda: os.chown("mine", 65534, 65534))
r("chmod own file", lambda: os.chmod("mine", 0o640))
r("set trusted xattr", lambda: os.setxattr("mine", "trusted.x", b"v"))
r("get trusted xattr", lambda: os.getxattr("mine", "trusted.x"))
r("set user xattr", lambda: os.setxattr("mine", "user.x", b"v"))
r("get user xattr", lambda: os.getxattr("mine", "user.x").decode())
r("set user xattr on root file", lambda: os.setxattr("sticky/rootfile", "user.x", b"v"))
r("write setuid file", lambda: write("suid"))
r("mode after write", lambda: oct(os.stat("suid").st_mode))
r("write setuid+setgid file", lambda: write("sgid"))
r("mode after write (sgid)", lambda: oct(os.stat("sgid").st_mode))
r("truncate setuid file", lambda: os.truncate("suid2", 3))
r("mode after truncate", lambda: oct(os.stat("suid2").st_mode))
r("utime root file", lambda: os.utime("sticky/rootfile", (1, 1)))
r("utime now root file (writable)", lambda: os.utime("sticky/rootfile"))
r("mknod fifo", lambda: os.mkfifo("sticky/fifo"))
r("link root file", lambda: os.link("secret", "sticky/hardlink"))
print(json.dumps(out))
'''


def permission_tree(root: Path) -> None:
    """Files owned by root, by another user and by nobody, set up as root."""
    (root / "secret").write_bytes(b"root only\n")
    os.chmod(root / "secret", 0o600)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    for name, owner in (("rootfile", 0), ("otherfile", 1000)):
        (root / "sticky" / name).write_bytes(b"not yours\n")
        os.chmod(root / "sticky" / name, 0o666)
        os.chown(root / "sticky" / name, owner, owner)
    (root / "rootdir").mkdir(mode=0o755)
    (root / "mine").write_bytes(b"nobody's\n")
    os.chown(root / "mine", NOBODY, NOBODY)
    for name, mode in (("suid", 0o4777), ("sgid", 0o6777), ("suid2", 0o4777)):
        (root / name).write_bytes(b"set-id program\n")
        os.chmod(root / name, mode)


def as_nobody(root: Path) -> dict[str, str]:
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON, "-c", NOBODY_PROBE],
        cwd=root, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def modes(root: Path) -> dict[str, str]:
    return {name: oct(os.lstat(root / name).st_mode) for name in ("suid", "sgid", "suid2", "mine", "secret")}


def test_permissions_as_nobody_like_tmpfs(target: Target, kernel_tmpfs: Path) -> None:
    mount = target.mount("size=64m,allow_other", populate=permission_tree)
    oracle = target.oracle(kernel_tmpfs, populate=permission_tree)
    expected = as_nobody(oracle)
    answers = as_nobody(mount.path)
    assert answers == expected, {k: (expected.get(k), answers.get(k)) for k in expected if expected.get(k) != answers.get(k)}
    # tmpfs's answers, for the record
    assert expected["read 0600 root file"] == "EACCES"
    assert expected["unlink other user's file in sticky dir"] == "EPERM"
    assert expected["unlink root file in sticky dir"] == "EPERM"
    assert expected["chown own file to root"] == "EPERM" and expected["chgrp own file to root group"] == "EPERM"
    assert expected["set trusted xattr"] == "EPERM"
    assert expected["mode after write"] == oct(stat.S_IFREG | 0o777)
    assert expected["mode after write (sgid)"] == oct(stat.S_IFREG | 0o777)
    assert modes(mount.path) == modes(oracle)
    assert os.stat(mount.path / "suid").st_mode & 0o7777 == 0o777
    assert read_uncached(mount.path / "suid") == b"nobody was here"
    assert sorted(os.listdir(mount.path / "sticky")) == sorted(os.listdir(oracle / "sticky"))
    target.check_changes(mount.path)
    assert_serving(mount)
