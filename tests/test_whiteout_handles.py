"""RENAME_WHITEOUT and file handles on a real mount, against kernel tmpfs.

Whiteouts: the same renameat2 sequences on kernel tmpfs and on mmfs give the
same results, errnos, whiteouts (mode, owner, rdev, link count, times) and
listings; kernel overlayfs takes an mmfs directory as its upper layer and
leaves its whiteouts there.  File handles (name_to_handle_at and
open_by_handle_at through ctypes; root has CAP_DAC_READ_SEARCH) open after the
kernel dropped its caches, as on tmpfs, and a freed file's handle is ESTALE.
"""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import mounted_kernel_tmpfs
from support.syscalls import (
    AT_FDCWD,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    attempt,
    check,
    errno_name,
    libc,
    renameat2,
)

HANDLE_MAX = 128


class FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * HANDLE_MAX),
    ]


def rename_answer(old: str, new: str, flags: int) -> str:
    """renameat2: 'ok' or the errno's name (paths as strings: pathlib drops "." components)."""
    status, value = attempt(lambda: renameat2(old, new, flags))
    return "ok" if status == "ok" else str(value)


def name_to_handle(path: Path) -> FileHandle:
    handle, mount_id = FileHandle(handle_bytes=HANDLE_MAX), ctypes.c_int()
    check(libc.name_to_handle_at(AT_FDCWD, bytes(path), ctypes.byref(handle), ctypes.byref(mount_id), 0), str(path))
    return handle


def open_by_handle(mount_fd: int, handle: FileHandle, flags: int = os.O_RDONLY) -> int:
    return check(libc.open_by_handle_at(mount_fd, ctypes.byref(handle), flags))


def drop_caches() -> None:
    """Make the kernel drop its unused dentries and inodes (FORGET for FUSE)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def node(path: Path) -> tuple[Any, ...] | None:
    """What tmpfs and mmfs must agree on about one name (None: absent)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_rdev, st.st_nlink, st.st_size, st.st_blocks)


def whiteout_cases(root: Path) -> list[tuple[Any, ...]]:
    """renameat2 with RENAME_WHITEOUT alone and combined, onto new and existing
    names, files and directories; every result, every whiteout and listing."""
    results: list[tuple[Any, ...]] = []

    def rename(label: str, old: str, new: str, flags: int) -> None:
        answer = rename_answer(f"{root}/{old}", f"{root}/{new}", flags)
        results.append((label, answer, node(root / old), node(root / new)))

    (root / "a").write_bytes(b"a")
    (root / "b").write_bytes(b"b")
    for name in ("d", "e", "e/f"):
        (root / name).mkdir()
    (root / "e/g").write_bytes(b"g")
    before = os.stat(root)
    rename("new name", "a", "c", RENAME_WHITEOUT)
    after, whiteout = os.stat(root), os.lstat(root / "a")
    results.append(("directory", after.st_size - before.st_size, after.st_nlink - before.st_nlink))
    results.append(("whiteout times", whiteout.st_mtime_ns == whiteout.st_ctime_ns == after.st_mtime_ns))
    results.append(("parent times", after.st_mtime_ns > before.st_mtime_ns, after.st_ctime_ns > before.st_ctime_ns))
    rename("over a file", "c", "b", RENAME_WHITEOUT)
    rename("noreplace over a file", "b", "d", RENAME_WHITEOUT | RENAME_NOREPLACE)
    rename("noreplace over a whiteout", "b", "a", RENAME_WHITEOUT | RENAME_NOREPLACE)
    rename("noreplace", "b", "h", RENAME_WHITEOUT | RENAME_NOREPLACE)
    rename("exchange", "h", "a", RENAME_WHITEOUT | RENAME_EXCHANGE)
    rename("exchange noreplace", "h", "a", RENAME_WHITEOUT | RENAME_EXCHANGE | RENAME_NOREPLACE)
    rename("unknown flag", "h", "z", RENAME_WHITEOUT | 8)
    rename("directory", "d", "d2", RENAME_WHITEOUT)
    rename("directory over a non-empty one", "d2", "e", RENAME_WHITEOUT)
    rename("directory over a file", "d2", "h", RENAME_WHITEOUT)
    rename("file over a directory", "h", "d2", RENAME_WHITEOUT)
    rename("directory over an empty one", "e/f", "d2", RENAME_WHITEOUT)
    os.link(root / "h", root / "h2")
    rename("hard link onto itself", "h", "h2", RENAME_WHITEOUT)
    rename("a whiteout", "a", "a2", RENAME_WHITEOUT)
    rename("missing source", "nope", "z", RENAME_WHITEOUT)
    rename("into a subdirectory", "h", "e/h", RENAME_WHITEOUT)
    rename("directory into itself", "e", "e/x", RENAME_WHITEOUT)
    rename("dot", "e/.", "z", RENAME_WHITEOUT)
    (root / "sg").mkdir()
    os.chown(root / "sg", 0, 4242)
    os.chmod(root / "sg", 0o2777)
    (root / "sg/x").write_bytes(b"x")
    rename("setgid directory", "sg/x", "sg/y", RENAME_WHITEOUT)
    for directory in ("", "e", "sg"):
        results.append((f"listing {directory or '/'}", os.listdir(root / directory)))
    return results


def test_rename_whiteout_as_on_kernel_tmpfs(mnt: Path, kernel_tmpfs: Path) -> None:
    expected = whiteout_cases(kernel_tmpfs)
    assert ("new name", "ok", ("c---------", 0, 0, 0, 1, 0, 0), ("-rw-r--r--", 0, 0, 0, 1, 1, 8)) in expected
    assert whiteout_cases(mnt) == expected


def as_nobody(directory: Path, action: Callable[[], str]) -> str:
    """``action``'s result in a child running as nobody (uid and gid 65534) in
    ``directory`` (the test's temporary directories are closed to others)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.chdir(directory)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, action().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        result = pipe.read()
    os.waitpid(pid, 0)
    return result


def test_rename_whiteout_needs_no_privilege_and_belongs_to_the_caller(mmfs_factory: Any, kernel_tmpfs: Path) -> None:
    """Since Linux 5.8 RENAME_WHITEOUT needs no CAP_MKNOD; the whiteout is the
    caller's (fsuid, fsgid), as tmpfs's mknod makes it."""
    mount = mmfs_factory(options="size=1g,allow_other")
    results = []
    for root in (kernel_tmpfs, mount.path):
        os.chmod(root, 0o1777)

        def action() -> str:
            Path("mine").write_bytes(b"")
            return rename_answer("mine", "moved", RENAME_WHITEOUT)

        results.append((as_nobody(root, action), node(root / "mine"), node(root / "moved")))
    assert results[0] == ("ok", ("c---------", 65534, 65534, 0, 1, 0, 0), ("-rw-r--r--", 65534, 65534, 0, 1, 0, 0))
    assert results[1] == results[0]


def inode_limit_cases(root: Path) -> list[Any]:
    """Fill nr_inodes=, then rename with RENAME_WHITEOUT (the whiteout is a new inode)."""
    results: list[Any] = []
    count = 0
    while True:
        try:
            (root / f"f{count}").write_bytes(b"")
        except OSError as error:
            results.append(("filled", count, errno_name(error)))
            break
        count += 1
    results.append(("new name", rename_answer(f"{root}/f0", f"{root}/z", RENAME_WHITEOUT), sorted(os.listdir(root))))
    over = rename_answer(f"{root}/f0", f"{root}/f1", RENAME_WHITEOUT)
    results.append(("over a file", over, sorted(os.listdir(root))))
    results.append(("noreplace", rename_answer(f"{root}/f0", f"{root}/f1", RENAME_WHITEOUT | RENAME_NOREPLACE)))
    os.unlink(root / "f2")
    results.append(("one free", rename_answer(f"{root}/f0", f"{root}/z", RENAME_WHITEOUT), node(root / "f0")))
    fs = os.statvfs(root)
    results.append(("statfs", fs.f_files, fs.f_ffree))
    return results


def test_rename_whiteout_at_nr_inodes_as_on_kernel_tmpfs(mmfs_factory: Any, tmp_path: Path) -> None:
    with mounted_kernel_tmpfs(tmp_path / "oracle", "nr_inodes=8") as oracle:
        expected = inode_limit_cases(oracle)
    assert expected[1][1] == "ENOSPC" and expected[2][1] == "ENOSPC"
    assert inode_limit_cases(mmfs_factory(options="size=1g,nr_inodes=8").path) == expected


def overlay_cases(upper_fs: Path, lower: Path, tmp_path: Path, label: str) -> list[Any]:
    """Kernel overlayfs with its upperdir and workdir on ``upper_fs``: deletes
    and renames of lower entries must leave whiteouts in the upper directory."""
    (upper_fs / "u").mkdir()
    (upper_fs / "w").mkdir()
    merged = tmp_path / f"merged-{label}"
    merged.mkdir()
    options = f"lowerdir={lower},upperdir={upper_fs / 'u'},workdir={upper_fs / 'w'}"
    subprocess.run(["mount", "-t", "overlay", "-o", options, "overlay", str(merged)], check=True)
    try:
        os.unlink(merged / "file")
        subprocess.run(["rm", "-r", str(merged / "dir")], check=True)
        os.rename(merged / "keep", merged / "kept")
        (merged / "new").write_bytes(b"new\n")
        (merged / "dir").mkdir()  # over a whiteout: an opaque directory
        view = sorted(os.listdir(merged)), (merged / "kept").read_bytes(), sorted(os.listdir(merged / "dir"))
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    upper = {name: node(upper_fs / "u" / name) for name in sorted(os.listdir(upper_fs / "u"))}
    opaque = os.getxattr(upper_fs / "u" / "dir", "trusted.overlay.opaque")
    # A whiteout's link count is how many names overlayfs gave its shared whiteout: not compared.
    upper_kinds = {name: (info[0], info[3]) if info else None for name, info in upper.items()}
    return [view, upper_kinds, opaque]


def test_kernel_overlayfs_takes_mmfs_as_its_upper_layer(mnt: Path, kernel_tmpfs: Path, tmp_path: Path) -> None:
    """A FUSE upper layer must support d_type, RENAME_WHITEOUT and trusted.*
    xattrs, or overlayfs refuses it ("upper fs missing required features")."""
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "dir/x").write_bytes(b"x\n")
    (lower / "file").write_bytes(b"lower\n")
    (lower / "keep").write_bytes(b"keep\n")
    expected = overlay_cases(kernel_tmpfs, lower, tmp_path, "tmpfs")
    assert expected[1]["file"] == ("c---------", 0) and expected[2] == b"y"
    assert overlay_cases(mnt, lower, tmp_path, "mmfs") == expected


# --- file handles -------------------------------------------------------------------
def handle_cases(root: Path) -> list[Any]:
    """Handles of live, deleted, deleted-but-open files and of directories,
    opened after the kernel dropped its caches."""
    results: list[Any] = []
    mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def try_open(label: str, handle: FileHandle, flags: int = os.O_RDONLY) -> None:
        try:
            fd = open_by_handle(mount_fd, handle, flags)
        except OSError as error:
            results.append((label, errno_name(error)))
            return
        try:
            st = os.fstat(fd)
            content = sorted(os.listdir(fd)) if stat.S_ISDIR(st.st_mode) else os.pread(fd, 100, 0)
            results.append((label, content, st.st_nlink, st.st_ino == inos.get(label)))
        finally:
            os.close(fd)

    try:
        (root / "dir/sub").mkdir(parents=True)
        (root / "dir/sub/deep").write_bytes(b"deep bytes")
        (root / "live").write_bytes(b"live bytes")
        (root / "gone").write_bytes(b"gone bytes")
        (root / "open").write_bytes(b"open bytes")
        names = ("live", "dir", "dir/sub", "dir/sub/deep", "gone", "open")
        handles = {name: name_to_handle(root / name) for name in names}
        inos = {name: os.lstat(root / name).st_ino for name in names}
        held = os.open(root / "open", os.O_RDONLY)
        os.unlink(root / "gone")
        os.unlink(root / "open")
        drop_caches()
        for name in names:
            try_open(name, handles[name])
        os.close(held)
        drop_caches()
        try_open("open, closed since", handles["open"])
        os.rename(root / "dir/sub", root / "moved")
        drop_caches()
        try_open("dir/sub", handles["dir/sub"], os.O_RDONLY | os.O_DIRECTORY)
        try_open("dir/sub/deep", handles["dir/sub/deep"])
        os.rmdir(root / "dir")
        drop_caches()
        try_open("dir, removed", handles["dir"], os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(mount_fd)
    return results


def test_file_handles_outlive_the_kernel_cache_as_on_kernel_tmpfs(mnt: Path, kernel_tmpfs: Path) -> None:
    expected = handle_cases(kernel_tmpfs)
    assert ("live", b"live bytes", 1, True) in expected and ("gone", "ESTALE") in expected
    assert ("open", b"open bytes", 0, True) in expected and ("open, closed since", "ESTALE") in expected
    assert handle_cases(mnt) == expected


def test_file_handles_of_many_forgotten_files(mnt: Path) -> None:
    """Handles of 2,000 files in 20 directories, taken then forgotten by the
    kernel (drop_caches): each opens to its own bytes."""
    handles = []
    for d in range(20):
        directory = mnt / f"d{d}"
        directory.mkdir()
        for f in range(100):
            path = directory / f"f{f}"
            path.write_bytes(f"{d}/{f}".encode())
            handles.append((name_to_handle(path), f"{d}/{f}".encode(), name_to_handle(directory)))
    drop_caches()
    mount_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        wrong = []
        for handle, content, directory_handle in handles:
            fd = open_by_handle(mount_fd, handle)
            data = os.read(fd, 100)
            os.close(fd)
            fd = open_by_handle(mount_fd, directory_handle, os.O_RDONLY | os.O_DIRECTORY)
            listed = f"f{content.split(b'/')[1].decode()}" in os.listdir(fd)
            os.close(fd)
            if data != content or not listed:
                wrong.append((content, data, listed))
        assert not wrong
    finally:
        os.close(mount_fd)
