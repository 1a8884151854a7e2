"""Real tools on a real mount: tar, rsync, git, sqlite3, venv, gcc, mmap, cp/du, strace.

Each test drives an ordinary program against an mmfs mount and checks what a
user would check: the trees that come back are identical (contents, modes,
owners, sizes, link targets, xattrs, hard-link grouping), the tool says all is
well, and where numbers are involved (``du``) they equal those of the same work
done on a kernel tmpfs, the oracle.  Nothing here uses the network.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from conftest import wait_for
from support.trees import compare_trees, join, scan, snapshot

PAGE = mmap.PAGESIZE
MiB = 1 << 20
HOLEY_SIZE = 5 * MiB
# 206 bytes: tmpfs keeps targets of 128 bytes or more in a page of their own (8 blocks)
LONG_TARGET = "../" * 10 + "a-long-symlink-target-" * 8
HOLEY_EXTENTS = [(0, 64 * 1024), (MiB + PAGE, PAGE), (HOLEY_SIZE - 2 * PAGE, 2 * PAGE)]
ODD_MODES = {"none": 0o000, "setuid": 0o4755, "setgid": 0o2750, "readonly": 0o444, "exec": 0o711}


# --- running programs --------------------------------------------------------


def run(
    *command: str | Path,
    cwd: Optional[Path] = None,
    env: Optional[dict[str, str]] = None,
    timeout: float = 120,
) -> str:
    """Run a command, require exit status 0, return its stdout."""
    args = [str(part) for part in command]
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}\n"
        f"stdout: {result.stdout.decode(errors='replace')}\n"
        f"stderr: {result.stderr.decode(errors='replace')}"
    )
    return result.stdout.decode(errors="replace")


def tool_env(**extra: str) -> dict[str, str]:
    """A predictable environment: C locale, no user configuration."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GIT_", "PYTHON", "LD_"))}
    env.update(LC_ALL="C", TZ="UTC")
    env.update(extra)
    return env


# --- building source trees ---------------------------------------------------


def write_holey(path: Path, size: int, extents: list[tuple[int, int]], rng: random.Random) -> None:
    """A sparse file of ``size`` bytes whose only data are the (offset, length) extents."""
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, length in extents:
            file.seek(offset)
            file.write(nonzero_bytes(rng, length))


def nonzero_bytes(rng: random.Random, length: int) -> bytes:
    """Random bytes with no zero byte, so no page of them looks like a hole."""
    return bytes(b | 1 for b in rng.randbytes(length))


def build_tree(root: Path, files: int = 300, seed: int = 1) -> None:
    """A few hundred files of every kind a tmpfs holds, with awkward metadata."""
    rng = random.Random(seed)
    root.mkdir()
    dirs = [root]
    for i in range(30):
        parent = rng.choice(dirs)
        directory = parent / f"dir{i:02d}"
        directory.mkdir()
        dirs.append(directory)
    sizes = [0, 1, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE + 7, 20_000, 70_000]
    regular: list[Path] = []
    for i in range(files):
        path = rng.choice(dirs) / f"file{i:03d}.bin"
        path.write_bytes(nonzero_bytes(rng, rng.choice(sizes)))
        regular.append(path)
    odd = root / "odd"
    odd.mkdir()
    (odd / "empty").write_bytes(b"")
    (odd / "name with spaces & 'quotes'").write_bytes(b"spaces\n")
    (odd / "ünïcødé-名前").write_bytes(b"unicode\n")
    (odd / ("n" * 255)).write_bytes(b"longest name\n")
    write_holey(odd / "holey.img", HOLEY_SIZE, HOLEY_EXTENTS, rng)
    write_holey(odd / "tail-hole.img", 3 * MiB + 123, [(PAGE, 3 * PAGE)], rng)
    os.mkfifo(odd / "pipe.fifo", 0o640)
    os.mknod(odd / "null.chr", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    # links
    os.symlink("../dir00", odd / "to-dir")
    os.symlink(os.path.relpath(regular[0], odd), odd / "to-file")
    os.symlink("/nonexistent/dangling", odd / "dangling")
    os.symlink(LONG_TARGET, odd / "long-link")
    os.link(regular[1], odd / "hardlink-a")
    os.link(regular[1], root / "hardlink-b")
    os.link(odd / "empty", odd / "empty-link")
    # modes and owners
    for name in ODD_MODES:
        (odd / name).write_bytes(f"{name}\n".encode())
    os.chown(odd / "setgid", 1234, 5678)
    os.chown(odd / "exec", 4321, 0)
    os.lchown(odd / "dangling", 1111, 2222)
    for name, mode in ODD_MODES.items():  # after chown, which clears set-id bits
        os.chmod(odd / name, mode)
    for name, mode in [("sticky", 0o1777), ("sgid-dir", 0o2775), ("private", 0o700), ("locked", 0o555)]:
        (odd / name).mkdir()
        (odd / name / "inside").write_bytes(name.encode())
        os.chmod(odd / name, mode)
    # extended attributes
    os.setxattr(regular[2], "user.comment", b"hello xattr")
    os.setxattr(regular[2], "user.binary", bytes(range(256)))
    os.setxattr(regular[3], "user.big", nonzero_bytes(rng, 3000))
    os.setxattr(regular[1], "user.on-a-hardlink", b"shared")
    os.setxattr(odd, "user.dir-attr", b"on a directory")
    os.setxattr(odd / "empty", "user.empty-value", b"")
    os.setxattr(odd / "holey.img", "trusted.mmfs-test", b"trusted value")
    # timestamps last (children change a directory's mtime)
    for i, path in enumerate(sorted(p for p in root.rglob("*") if not p.is_symlink())):
        os.utime(path, ns=(1_500_000_000_123_456_789 + i * 10**9, 1_600_000_000_987_654_321 - i * 10**9))
    for path in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        os.utime(path, ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_001))
    os.utime(odd, ns=(1_300_000_000_000_000_005, 1_300_000_000_000_000_005))


# --- comparing trees -----------------------------------------------------------
# What two copies of a tree must agree on: modes, owners, link counts, sizes,
# rdev, contents, link targets, xattrs and hard-link grouping, and mtimes (not
# a symlink's, nor the root's: the tools leave those as they find them).
TREE_STATS = ("mode", "uid", "gid", "nlink", "size", "rdev", "mtime_ns")


def assert_same_tree(expected_root: Path, actual_root: Path) -> None:
    """Require two trees to agree path by path, listing every difference."""

    def skip(rel: bytes, key: str) -> bool:
        return key == "mtime_ns" and (rel == b"" or os.path.islink(join(expected_root, rel)))

    label = f"{expected_root} vs {actual_root}"
    compare_trees(expected_root, actual_root, label, stats=TREE_STATS, skip=skip, labels=("expected", "actual"))


def blocks_by_path(root: Path) -> dict[bytes, int]:
    tree = snapshot(root, stats=("blocks",), target=False, xattrs=False)
    return {rel: entry["blocks"] for rel, entry in tree.items() if rel}


# --- 1. tar ------------------------------------------------------------------

TAR_CREATE = ["tar", "--xattrs", "--xattrs-include=*", "--format=posix", "--numeric-owner", "-cpf"]
TAR_EXTRACT = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"]


def test_tar_round_trip_through_the_mount(mnt: Path, kernel_tmpfs: Path) -> None:
    """tmpfs -> tar -> mount -> tar -> tmpfs gives back the very same tree."""
    source = kernel_tmpfs / "src"
    build_tree(source)
    first, second = kernel_tmpfs / "first.tar", kernel_tmpfs / "second.tar"
    run(*TAR_CREATE, first, "-C", source, ".")
    (mnt / "x").mkdir()
    run(*TAR_EXTRACT, first, "-C", mnt / "x")
    assert_same_tree(source, mnt / "x")
    run(*TAR_CREATE, second, "-C", mnt / "x", ".")
    (kernel_tmpfs / "out").mkdir()
    run(*TAR_EXTRACT, second, "-C", kernel_tmpfs / "out")
    assert_same_tree(source, kernel_tmpfs / "out")
    listing = run("tar", "-tvf", second, "--numeric-owner")
    assert "./odd/pipe.fifo" in listing and "link to ./" in listing and "./odd/long-link -> " in listing


def test_tar_sparse_keeps_holes_both_ways(mnt: Path, kernel_tmpfs: Path) -> None:
    """``tar --sparse`` from tmpfs into the mount and back keeps every hole."""
    rng = random.Random(7)
    source = kernel_tmpfs / "src"
    source.mkdir()
    write_holey(source / "holey.img", HOLEY_SIZE, HOLEY_EXTENTS, rng)
    write_holey(source / "tail-hole.img", 3 * MiB + 123, [(PAGE, 3 * PAGE)], rng)
    write_holey(source / "all-hole.img", 2 * MiB, [], rng)
    run(*TAR_CREATE, kernel_tmpfs / "a.tar", "--sparse", "-C", source, ".")
    (mnt / "x").mkdir()
    run(*TAR_EXTRACT, kernel_tmpfs / "a.tar", "-C", mnt / "x")
    assert_same_tree(source, mnt / "x")
    assert blocks_by_path(mnt / "x") == blocks_by_path(source)
    run(*TAR_CREATE, kernel_tmpfs / "b.tar", "--sparse", "-C", mnt / "x", ".")
    (kernel_tmpfs / "out").mkdir()
    run(*TAR_EXTRACT, kernel_tmpfs / "b.tar", "-C", kernel_tmpfs / "out")
    assert_same_tree(source, kernel_tmpfs / "out")
    assert blocks_by_path(kernel_tmpfs / "out") == blocks_by_path(source)


# --- 2. rsync ----------------------------------------------------------------


def rsync_itemized(source: Path, destination: Path) -> str:
    """What a checksumming dry run would still change (empty when in sync)."""
    return run("rsync", "-anciHAX", "--delete", f"{source}/", f"{destination}/")


def test_rsync_to_and_from_the_mount(mnt: Path, kernel_tmpfs: Path) -> None:
    """``rsync -aHAX`` both ways leaves nothing for a checksumming dry run to do."""
    source = kernel_tmpfs / "src"
    build_tree(source)
    run("rsync", "-aHAX", f"{source}/", f"{mnt / 'dst'}/")
    assert rsync_itemized(source, mnt / "dst") == ""
    assert_same_tree(source, mnt / "dst")
    back = kernel_tmpfs / "back"
    run("rsync", "-aHAX", f"{mnt / 'dst'}/", f"{back}/")
    assert rsync_itemized(mnt / "dst", back) == ""
    assert rsync_itemized(back, mnt / "dst") == ""
    assert_same_tree(source, back)
    # an incremental update through the mount: change, add, delete
    (source / "dir00" / "new-file").write_bytes(b"new\n")
    singles = [rel for rel in scan(source) if rel.endswith(b".bin") and os.lstat(join(source, rel)).st_nlink == 1]
    victim = source / os.fsdecode(singles[0])
    victim.unlink()
    for directory in (source / "dir00", victim.parent):  # rsync skips same-second mtimes
        os.utime(directory, ns=(1_450_000_000_000_000_042, 1_450_000_000_000_000_042))
    run("rsync", "-aHAX", "--delete", f"{source}/", f"{mnt / 'dst'}/")
    assert rsync_itemized(source, mnt / "dst") == ""
    assert_same_tree(source, mnt / "dst")


def as_user(uid: int, command: str, cwd: Path) -> int:
    """Exit status of ``sh -c COMMAND`` run as ``uid`` (no groups) inside ``cwd``."""
    args = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sh", "-c", command]
    return subprocess.run(args, cwd=cwd, capture_output=True).returncode


def test_rsync_preserves_posix_acls(mmfs_factory: Callable[..., Any], kernel_tmpfs: Path) -> None:
    """``rsync -aHAX`` carries POSIX ACLs onto the mount, where they are enforced as on tmpfs."""
    mnt = mmfs_factory(options="size=1g,allow_other").path  # other users must reach the mount
    source = kernel_tmpfs / "src"
    source.mkdir()
    (source / "shared.txt").write_bytes(b"acl\n")
    (source / "inherit").mkdir()
    run("setfacl", "-m", "u:1234:rw,g:5678:r", source / "shared.txt")
    run("setfacl", "-d", "-m", "u:1234:rwx,o::-", source / "inherit")
    oracle, destination = kernel_tmpfs / "oracle", mnt / "dst"
    for copy in (oracle, destination):
        run("rsync", "-aHAX", f"{source}/", f"{copy}/")
        assert rsync_itemized(source, copy) == ""
        for name in ("shared.txt", "inherit"):
            assert run("getfacl", "-cp", copy / name) == run("getfacl", "-cp", source / name), copy
        # enforced: the named user may write, another may not (the mode alone says 0644)
        assert as_user(1234, "echo more >> shared.txt", copy) == 0, copy
        assert as_user(4321, "echo more >> shared.txt", copy) != 0, copy
        assert (copy / "shared.txt").read_bytes() == b"acl\nmore\n"
        # chmod rewrites the ACL mask: now the named user is shut out too
        os.chmod(copy / "shared.txt", 0o600)
        assert as_user(1234, "echo more >> shared.txt", copy) != 0, copy
    assert run("getfacl", "-cp", destination / "shared.txt") == run("getfacl", "-cp", oracle / "shared.txt")


def test_default_acls_are_inherited_as_on_tmpfs(mnt: Path, kernel_tmpfs: Path) -> None:
    """New files and directories under a default ACL get the ACL and mode tmpfs gives them (umask 022)."""
    for root in (kernel_tmpfs, mnt):
        project = root / "project"
        project.mkdir()
        run("setfacl", "-d", "-m", "u:1234:rwx,g::rwx,o::-", project)
        (project / "file").write_bytes(b"")  # asks for 0666
        (project / "dir").mkdir()  # asks for 0777
        (project / "dir" / "nested").write_bytes(b"")
        os.mkfifo(project / "fifo", 0o640)  # asks for 0640: the umask must not matter under a default ACL
    for name in ("project", "project/file", "project/dir", "project/dir/nested", "project/fifo"):
        expected = run("getfacl", "-cp", kernel_tmpfs / name)
        assert run("getfacl", "-cp", mnt / name) == expected, name
        assert oct(os.stat(mnt / name).st_mode) == oct(os.stat(kernel_tmpfs / name).st_mode), name


# --- 3. git ------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    env = tool_env(
        HOME=str(repo.parent),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="T",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="T",
        GIT_COMMITTER_EMAIL="t@example.invalid",
    )
    return run("git", "-C", repo, *args, env=env)


def generate_sources(root: Path, count: int = 200) -> None:
    rng = random.Random(3)
    for i in range(count):
        path = root / f"pkg{i % 7}" / f"sub{i % 3}" / f"module{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"line {n} of module {i}: {rng.random()}" for n in range(rng.randint(1, 200))]
        path.write_text("\n".join(lines) + "\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("pkg0/sub0/module000.txt", root / "link")


def test_git_commit_gc_fsck_clone(mnt: Path) -> None:
    """A repository on the mount survives edits, renames, gc and fsck, and clones."""
    repo = mnt / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    generate_sources(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    assert git(repo, "status", "--porcelain") == ""
    for i in range(0, 40, 2):
        with open(repo / f"pkg{i % 7}" / f"sub{i % 3}" / f"module{i:03d}.txt", "a") as file:
            file.write("an edit\n")
    for i in range(1, 21, 2):
        old = f"pkg{i % 7}/sub{i % 3}/module{i:03d}.txt"
        git(repo, "mv", old, f"pkg{i % 7}/renamed{i:03d}.txt")
    for i in range(100, 110):
        git(repo, "rm", "-q", f"pkg{i % 7}/sub{i % 3}/module{i:03d}.txt")
    (repo / "new dir").mkdir()
    (repo / "new dir" / "added.txt").write_text("added\n")
    status = git(repo, "status", "--porcelain")
    assert status.count("\n") == 20 + 10 + 10 + 1, status
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "second")
    assert git(repo, "status", "--porcelain") == ""
    git(repo, "gc", "-q", "--prune=now")
    assert list((repo / ".git" / "objects" / "pack").glob("*.pack")), "gc wrote no pack"
    git(repo, "fsck", "--full", "--strict", "--no-progress")
    assert git(repo, "log", "--format=%s").split() == ["second", "first"]
    stat_line = git(repo, "diff", "--shortstat", "HEAD~1", "HEAD")
    assert stat_line.startswith(" 41 files changed"), stat_line
    for clone, how in ((mnt / "clone-local", str(repo)), (mnt / "clone-file", f"file://{repo}")):
        git(mnt, "clone", "-q", how, str(clone))
        assert git(clone, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
        git(clone, "fsck", "--full", "--strict", "--no-progress")
        assert git(clone, "status", "--porcelain") == ""
        assert run("diff", "-r", "--no-dereference", "-x", ".git", repo, clone) == ""
    git(mnt / "clone-local", "checkout", "-q", "HEAD~1")
    assert (mnt / "clone-local" / "pkg3" / "sub2" / "module101.txt").exists()
    assert git(mnt / "clone-local", "status", "--porcelain") == ""


# --- 4. sqlite ---------------------------------------------------------------

SQLITE_WRITER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
def batch(start):
    db.execute("BEGIN")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(n, f"value {n}" * 3) for n in range(start, start + 100)])
    return start + 100
n = 0
while n < 5000:
    n = batch(n)
    db.execute("COMMIT")
n = batch(n)  # an open write transaction while the reader reads
print("ready", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
while n < 10000:
    n = batch(n)
    db.execute("COMMIT")
print("done", flush=True)
"""


def sqlite(db: Path, sql: str) -> str:
    return run("sqlite3", "-cmd", ".timeout 10000", db, sql).strip()


def test_sqlite_wal_with_a_concurrent_reader(mnt: Path) -> None:
    """WAL mode on the mount: a second process reads (through the shared -shm map) while one writes."""
    db = mnt / "data" / "test.db"
    db.parent.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", SQLITE_WRITER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline() == "ready\n", writer.stderr.read() if writer.stderr else ""
        assert (mnt / "data" / "test.db-wal").exists() and (mnt / "data" / "test.db-shm").exists()
        assert sqlite(db, "PRAGMA journal_mode") == "wal"
        assert sqlite(db, "SELECT count(*) FROM t") == "5000"  # the open transaction is invisible
        writer.stdin.write("go\n")
        writer.stdin.flush()
        seen: list[int] = []
        while writer.poll() is None:
            seen.append(int(sqlite(db, "SELECT count(*) FROM t")))
        assert writer.returncode == 0, writer.stderr.read() if writer.stderr else ""
        assert writer.stdout.read() == "done\n"
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        for stream in (writer.stdin, writer.stdout, writer.stderr):
            if stream is not None:
                stream.close()
    assert seen == sorted(seen) and all(count % 100 == 0 and 5000 <= count <= 10000 for count in seen), seen
    assert sqlite(db, "PRAGMA journal_mode") == "wal"
    assert sqlite(db, "PRAGMA integrity_check") == "ok"
    assert sqlite(db, "SELECT count(*), sum(id), max(id) FROM t") == f"10000|{sum(range(10000))}|9999"
    assert sqlite(db, "PRAGMA wal_checkpoint(TRUNCATE)").startswith("0|")
    assert sqlite(db, "SELECT v FROM t WHERE id = 4321") == "value 4321" * 3


# --- 5. Python venv ------------------------------------------------------------


def test_python_venv_on_the_mount(mnt: Path) -> None:
    """A venv with its own python binary and pip lives on the mount and works."""
    venv = mnt / "venv"
    run(sys.executable, "-m", "venv", "--copies", venv, timeout=120)
    python = venv / "bin" / "python"
    assert not python.is_symlink()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    (site / "mmfs_probe").mkdir()
    (site / "mmfs_probe" / "__init__.py").write_text(
        "import sys\n\ndef hello() -> str:\n    return f'hello from {__file__} in {sys.prefix}'\n"
    )
    (site / "mmfs_extra.pth").write_text(f"{mnt / 'extra'}\n")
    (mnt / "extra").mkdir()
    (mnt / "extra" / "mmfs_extra_module.py").write_text("VALUE = 42\n")
    code = "import mmfs_probe, mmfs_extra_module; print(mmfs_probe.hello()); print(mmfs_extra_module.VALUE)"
    env = tool_env()
    out = run(python, "-c", code, env=env).splitlines()
    assert out == [f"hello from {site / 'mmfs_probe' / '__init__.py'} in {venv}", "42"]
    assert list((site / "mmfs_probe" / "__pycache__").glob("__init__.*.pyc")), "no bytecode cached"
    assert run(python, "-c", code, env=env).splitlines() == out  # now from the .pyc
    assert "pip " in run(python, "-m", "pip", "--version", env=env)
    listing = run(python, "-m", "pip", "list", "--disable-pip-version-check", "--no-index", env=env)
    assert re.search(r"^pip\s", listing, re.MULTILINE), listing


# --- 6. gcc: compile and execute from the mount --------------------------------

HELLO_C = r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    unsigned long sum = 0;
    for (unsigned long i = 1; i <= 1000000; i++) sum += i % 7;
    printf("hello %s %lu\n", argc > 1 ? argv[1] : "nobody", sum);
    return 0;
}
"""

LIB_C = r"""
int mmfs_probe_add(int a, int b) { return a + b + 1000; }
const char *mmfs_probe_name(void) { return "libprobe on mmfs"; }
"""

MAIN_C = r"""
#include <stdio.h>
#include <string.h>
int mmfs_probe_add(int, int);
const char *mmfs_probe_name(void);
int main(void) {
    char line[4096];
    int mapped = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, maps)) if (strstr(line, "libprobe.so")) mapped = 1;
    fclose(maps);
    printf("%s %d mapped=%d\n", mmfs_probe_name(), mmfs_probe_add(2, 3), mapped);
    return 0;
}
"""

CTYPES_PY = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.mmfs_probe_name.restype = ctypes.c_char_p
maps = open("/proc/self/maps").read()
print(lib.mmfs_probe_name().decode(), lib.mmfs_probe_add(40, 2), sys.argv[1] in maps)
"""


def test_gcc_builds_and_runs_programs_and_libraries_on_the_mount(mnt: Path) -> None:
    """Sources, objects, temporaries, executables and a shared library all on the mount."""
    src = mnt / "src"
    (src / "tmp").mkdir(parents=True)
    env = tool_env(TMPDIR=str(src / "tmp"))
    (src / "hello.c").write_text(HELLO_C)
    (src / "lib.c").write_text(LIB_C)
    (src / "main.c").write_text(MAIN_C)
    run("gcc", "-O2", "-Wall", "-Werror", "-c", "hello.c", "-o", "hello.o", cwd=src, env=env)
    run("gcc", "hello.o", "-o", "hello", cwd=src, env=env)
    assert os.stat(src / "hello").st_mode & 0o111 == 0o111
    expected_sum = sum(i % 7 for i in range(1, 1000001))
    assert run(src / "hello", "mmfs", env=env) == f"hello mmfs {expected_sum}\n"
    assert run("./hello", cwd=src, env=env) == f"hello nobody {expected_sum}\n"
    run("gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "lib.c", "-o", "libprobe.so", cwd=src, env=env)
    run("gcc", "-Wall", "-Werror", "main.c", "-L.", "-lprobe", "-o", "main", cwd=src, env=env)
    loaded = tool_env(LD_LIBRARY_PATH=str(src))
    assert run(src / "main", env=loaded) == "libprobe on mmfs 1005 mapped=1\n"
    assert str(src / "libprobe.so") in run("ldd", src / "main", env=loaded)
    from_python = run(sys.executable, "-c", CTYPES_PY, src / "libprobe.so", env=env)
    assert from_python == "libprobe on mmfs 1042 True\n"
    assert list((src / "tmp").iterdir()) == []  # gcc cleaned its temporaries up


# --- 7. client mmap ----------------------------------------------------------


def read_direct(path: Path, length: int) -> bytes:
    """Read through O_DIRECT: from the daemon, not from the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, -(-length // PAGE) * PAGE)  # page aligned
    try:
        got = os.preadv(fd, [buffer], 0)
        return bytes(buffer[:got])
    finally:
        buffer.close()
        os.close(fd)


def test_mmap_shared_private_and_grown(mnt: Path) -> None:
    """MAP_SHARED writes reach the file, MAP_PRIVATE writes do not, ftruncate-grown files map."""
    path = mnt / "mapped.bin"
    original = bytes(range(256)) * (3 * PAGE // 256) + b"tail"
    path.write_bytes(original)
    size = len(original)
    # MAP_SHARED: write through the map, msync, read back by other means
    with open(path, "r+b") as file:
        with mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED) as shared:
            shared[10:20] = b"0123456789"
            shared[size - 4 :] = b"TAIL"
            shared.flush()
            other = os.open(path, os.O_RDONLY)
            try:
                assert os.pread(other, 10, 10) == b"0123456789"
                assert os.pread(other, 8, size - 4) == b"TAIL"  # nothing past EOF
            finally:
                os.close(other)
            assert read_direct(path, size)[10:20] == b"0123456789"
    expected = original[:10] + b"0123456789" + original[20 : size - 4] + b"TAIL"
    assert path.read_bytes() == expected
    assert read_direct(path, size) == expected
    # MAP_PRIVATE: copy-on-write stays in the process
    with open(path, "r+b") as file:
        with mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE) as private:
            private[0:10] = b"PRIVATE!!!"
            assert private[0:10] == b"PRIVATE!!!"
            private.flush()
            assert os.pread(file.fileno(), 10, 0) == expected[:10]
            with mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as view:
                assert view[0:10] == expected[:10]
    assert path.read_bytes() == expected
    assert read_direct(path, size) == expected
    # a file grown with ftruncate, mapped, written sparsely
    grown = mnt / "grown.bin"
    with open(grown, "w+b", buffering=0) as file:
        file.write(b"start")
        os.ftruncate(file.fileno(), 8 * MiB)
        with mmap.mmap(file.fileno(), 8 * MiB, flags=mmap.MAP_SHARED) as shared:
            assert shared[:5] == b"start" and shared[5:PAGE] == bytes(PAGE - 5)
            assert shared[4 * MiB : 4 * MiB + PAGE] == bytes(PAGE)
            shared[4 * MiB : 4 * MiB + 6] = b"middle"
            shared[8 * MiB - 3 :] = b"end"
            shared.flush()
        os.ftruncate(file.fileno(), 9 * MiB)  # grow again and map the new part
        with mmap.mmap(file.fileno(), MiB, offset=8 * MiB, flags=mmap.MAP_SHARED) as tail:
            assert tail[:] == bytes(MiB)
            tail[MiB - 1 :] = b"!"
            tail.flush()
    assert os.stat(grown).st_size == 9 * MiB
    fd = os.open(grown, os.O_RDONLY)
    try:
        assert os.pread(fd, 6, 4 * MiB) == b"middle"
        assert os.pread(fd, 4, 8 * MiB - 3) == b"end\0"
        assert os.pread(fd, 2, 9 * MiB - 1) == b"!"
        assert os.pread(fd, PAGE, 2 * MiB) == bytes(PAGE)
    finally:
        os.close(fd)
    data = read_direct(grown, 9 * MiB)
    assert data[:5] == b"start" and data[4 * MiB : 4 * MiB + 6] == b"middle" and data[-1:] == b"!"
    assert data.count(0) == len(data) - 5 - 6 - 3 - 1
    assert os.stat(grown).st_blocks == 4 * (PAGE // 512)  # only the four pages written hold memory


# --- 8. cp -a, diff -r, du ---------------------------------------------------


def du(root: Path, *options: str) -> dict[str, int]:
    """``du -a0 OPTIONS`` as relative path -> number."""
    out = subprocess.run(["du", "-a0", *options, str(root)], capture_output=True, check=True).stdout
    sizes: dict[str, int] = {}
    for record in out.split(b"\0"):
        if record:
            number, _, name = record.partition(b"\t")
            sizes[os.path.relpath(os.fsdecode(name), root)] = int(number)
    return sizes


def test_cp_a_then_diff_and_du_match_kernel_tmpfs(mnt: Path, kernel_tmpfs: Path) -> None:
    """``cp -a`` onto the mount is faithful, and ``du`` counts it as tmpfs does."""
    source = kernel_tmpfs / "src"
    build_tree(source)
    oracle = kernel_tmpfs / "copy"
    run("cp", "-a", source, oracle)
    run("cp", "-a", source, mnt / "copy")
    assert run("diff", "-r", "--no-dereference", "-x", "*.fifo", "-x", "*.chr", source, mnt / "copy") == ""
    assert_same_tree(source, mnt / "copy")
    assert du(mnt / "copy", "-lb") == du(oracle, "-lb")
    assert du(mnt / "copy", "-lB1") == du(oracle, "-lB1")
    assert run("du", "-sb", mnt / "copy").split()[0] == run("du", "-sb", oracle).split()[0]
    assert run("du", "-s", mnt / "copy").split()[0] == run("du", "-s", oracle).split()[0]


# --- 9. fsync runs msync -----------------------------------------------------


def tracer_pid(pid: int, tid: int | None = None) -> int:
    """Who ptraces the process (or its thread ``tid``); 0 for nobody."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    try:
        with open(path) as status:
            for line in status:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:  # the thread ended
        pass
    return 0


def traced_by(pid: int, tracer: int) -> bool:
    """Whether ``tracer`` has attached to every thread of ``pid``."""
    return all(tracer_pid(pid, int(tid)) == tracer for tid in os.listdir(f"/proc/{pid}/task"))


def msync_calls(trace: Path) -> list[str]:
    return [line for line in trace.read_text().splitlines() if "msync(" in line]


def test_fsync_and_fdatasync_msync_the_arena(mmfs_factory: Callable[..., Any], tmp_path: Path) -> None:
    """fsync(2) and fdatasync(2) on the mount each make the daemon call msync(MS_SYNC)."""
    mount = mmfs_factory()
    pid = mount.process.pid
    trace = tmp_path / "msync.trace"
    tracer = subprocess.Popen(
        ["strace", "-f", "-e", "trace=msync", "-p", str(pid), "-o", str(trace)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: tracer.poll() is not None or traced_by(pid, tracer.pid)), "strace never attached"
        assert tracer.poll() is None, f"strace exited {tracer.returncode}"
        assert msync_calls(trace) == []
        fd = os.open(mount.path / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"x" * 100_000)
            os.fsync(fd)
            # strace prints a syscall when it stops at its exit, before the daemon goes
            # on; the daemon answers fsync after its msyncs: they are all written now.
            assert wait_for(lambda: len(msync_calls(trace)) > 0), "no msync after fsync"
            after_fsync = len(msync_calls(trace))
            os.write(fd, b"y")
            os.fdatasync(fd)
            assert wait_for(lambda: len(msync_calls(trace)) > after_fsync), "no msync after fdatasync"
        finally:
            os.close(fd)
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    text = trace.read_text()
    assert all("MS_SYNC" in line for line in msync_calls(trace)), text
    assert "= -1" not in text, text
    assert (mount.path / "synced").read_bytes() == b"x" * 100_000 + b"y"


def traced_msyncs(pid: int, trace: Path, action: Callable[[], None], expect_calls: int) -> list[tuple[int, int]]:
    """(address, length) of each msync the daemon ``pid`` makes during ``action``,
    which must make at least ``expect_calls`` of them (strace writes each line
    before the daemon goes on, so they are all in the trace once counted)."""
    tracer = subprocess.Popen(["strace", "-f", "-e", "trace=msync", "-p", str(pid), "-o", str(trace)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: tracer.poll() is not None or traced_by(pid, tracer.pid)), "strace never attached"
        assert tracer.poll() is None, f"strace exited {tracer.returncode}"
        action()
        assert wait_for(lambda: len(msync_calls(trace)) >= expect_calls), f"fewer than {expect_calls} msyncs"
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    calls = []
    for line in msync_calls(trace):
        address, length = line.split("msync(")[1].split(",")[:2]
        calls.append((int(address, 16), int(length)))
    return calls


@pytest.mark.parametrize("mode", ["tmpfs", "overlay"])
def test_fsync_msyncs_only_what_was_written_since_the_last_sync(
    mmfs_factory: Callable[..., Any], tmp_path: Path, mode: str
) -> None:
    """fsync costs O(pages written since the last fsync), not O(file size)."""
    size, block = 64 << 20, 8192
    if mode == "overlay":
        lower = tmp_path / "lower"
        lower.mkdir()
        with open(lower / "big", "wb") as out:
            out.truncate(size)
        mount = mmfs_factory("overlay", str(lower))
    else:
        mount = mmfs_factory()
        with open(mount.path / "big", "wb") as out:
            for _ in range(size >> 20):
                out.write(b"x" * (1 << 20))
    fd = os.open(mount.path / "big", os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * block, 1 << 20)
        os.fsync(fd)  # everything written so far is synced: from now on, only new writes count

        def write_two_blocks_and_sync() -> None:
            os.pwrite(fd, b"b" * block, 32 << 20)
            os.pwrite(fd, b"c" * block, 48 << 20)
            os.fdatasync(fd)

        calls = traced_msyncs(mount.process.pid, tmp_path / "msync.trace", write_two_blocks_and_sync, 2)
    finally:
        os.close(fd)
    slot = 64 * 1024
    expected_length = slot if mode == "tmpfs" else block  # an arena slot, or the map's written pages
    assert sorted(length for _, length in calls) == [expected_length, expected_length], calls
    if mode == "overlay":  # one map: the two runs are where the blocks were written
        assert sorted(address for address, _ in calls)[1] - min(address for address, _ in calls) == 16 << 20

