"""The atime mount options of tmpfs, each compared with a kernel tmpfs mounted
with the same option: the same reads must update atime on both, or on neither.

Each case first sets a known atime with utime(2), so that the answer never
depends on clock granularity: "old" (atime = mtime, in the past: relatime
updates it) or "future" (atime after mtime and ctime: only strictatime
updates it).  Page caches are dropped before each read so that the read
reaches the filesystem.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Mount, mounted_kernel_tmpfs

OPTIONS = [
    "relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime", "diratime", "nodiratime",
    "lazytime", "nolazytime", "noatime,strictatime", "strictatime,nostrictatime", "noatime,nodiratime",
    "strictatime,nodiratime",
]


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path) -> None:
    drop_cache(path)
    with open(path, "rb") as file:
        file.read()


def run_program(path: Path) -> None:
    drop_cache(path)
    subprocess.run([str(path)], check=True, timeout=30)


def list_dir(path: Path) -> None:
    os.listdir(path)


def read_link(path: Path) -> None:
    os.readlink(path)


ACTIONS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "read": ("file", read_file),
    "exec": ("prog", run_program),
    "readdir": ("dir", list_dir),
    "readlink": ("link", read_link),
}


def populate(root: Path) -> None:
    (root / "file").write_bytes(b"some bytes\n" * 1000)
    shutil.copy("/bin/true", root / "prog")
    (root / "dir").mkdir()
    (root / "dir" / "entry").write_bytes(b"")
    (root / "link").symlink_to("file")


def atime_updates(root: Path) -> dict[str, bool]:
    """Which reads changed the atime, for each action and starting point."""
    populate(root)
    changed = {}
    for action, (name, act) in ACTIONS.items():
        path = root / name
        for start in ("old", "future"):
            now = time.time_ns()
            past = now - 3600 * 10**9
            atime = past if start == "old" else now + 3600 * 10**9
            os.utime(path, ns=(atime, past), follow_symlinks=False)
            act(path)
            changed[f"{action} {start}"] = os.lstat(path).st_atime_ns != atime
    return changed


def oracle_updates(tmp_path: Path, option: str) -> dict[str, bool]:
    """``atime_updates`` on a kernel tmpfs mounted with ``option``."""
    with mounted_kernel_tmpfs(tmp_path / "oracle", f"size=64m,{option}") as path:
        return atime_updates(path)


@pytest.mark.parametrize("option", OPTIONS)
def test_atime_option_as_on_tmpfs(tmp_path: Path, mmfs_factory: Callable[..., Mount], option: str) -> None:
    expected = oracle_updates(tmp_path, option)
    mount = mmfs_factory("tmpfs", options=f"size=64m,{option}")
    assert atime_updates(mount.path) == expected


@pytest.mark.parametrize("option", ["relatime", "noatime", "strictatime", "nodiratime"])
def test_atime_option_in_overlay_mode(tmp_path: Path, mmfs_factory: Callable[..., Mount], option: str) -> None:
    expected = oracle_updates(tmp_path, option)
    lower = tmp_path / "lower"
    lower.mkdir()
    mount = mmfs_factory("overlay", str(lower), options=f"size=64m,{option}")
    assert atime_updates(mount.path) == expected
