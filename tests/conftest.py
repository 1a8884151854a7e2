"""Shared fixtures: real mmfs mounts, kernel tmpfs mounts (the oracle), cleanup.

A mount fixture starts the daemon in the foreground with its log captured,
waits for the mount, fails fast if the daemon died, and on teardown unmounts
normally (never lazily) and requires exit status 0 and a log free of errors
and tracebacks: a bug that was answered with EIO still fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(interval)
    return True


def read_uncached(path: Path) -> bytes:
    """The file's bytes as the filesystem has them, not the page cache's copy."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def mmfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmfs", *args]


def start_mmfs(mountpoint: Path, log: Path, *args: str, options: str = "") -> Mount:
    """Start ``mmfs ARGS MOUNTPOINT -f`` and wait until the mount is live."""
    command = mmfs_command(*args, str(mountpoint), "-f")
    if options:
        command += ["-o", options]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 20
    while not is_mounted(mountpoint):
        if process.poll() is not None:
            raise AssertionError(f"mmfs exited {process.returncode}: {log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"mmfs did not mount: {log.read_text()}")
        time.sleep(0.02)
    return Mount(mountpoint, process, log)


def stop_mmfs(mount: Mount, check_log: bool = True) -> None:
    """Unmount normally and require a clean exit and a clean log."""
    if is_mounted(mount.path):
        subprocess.run(["fusermount3", "-u", str(mount.path)], check=True)
    try:
        code = mount.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        mount.process.kill()
        raise AssertionError("mmfs did not exit after unmount") from None
    text = mount.log_text()
    assert code == 0, f"mmfs exited {code}: {text}"
    if check_log:
        assert "Traceback" not in text and " ERROR " not in text, text


@pytest.fixture
def mmfs_factory(tmp_path: Path) -> Iterator[object]:
    """Call with (args..., options=...) to get a live Mount; all are unmounted after."""
    mounts: list[Mount] = []
    counter = iter(range(1000))

    def make(*args: str, options: str = "size=1g") -> Mount:
        n = next(counter)
        mountpoint = tmp_path / f"mnt{n}"
        mountpoint.mkdir()
        mount = start_mmfs(mountpoint, tmp_path / f"mmfs{n}.log", *(args or ("tmpfs",)), options=options)
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        if mount.process.poll() is None or is_mounted(mount.path):
            stop_mmfs(mount)


@pytest.fixture
def mnt(mmfs_factory) -> Path:  # type: ignore[no-untyped-def]
    """A fresh tmpfs-mode mmfs mount (size=1g)."""
    return mmfs_factory().path  # type: ignore[no-any-return]


@pytest.fixture
def kernel_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh kernel tmpfs: the oracle."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=1777", "oracle", str(path)], check=True)
    yield path
    subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(autouse=True)
def _no_umask_surprises() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)
