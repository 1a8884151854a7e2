"""Request counters: what the daemon served, by opcode, logged on SIGUSR2 and at unmount."""

from __future__ import annotations

import os
import re
import signal

from conftest import stop_mmfs, wait_for

from mmfs.fuse_ops import RequestCounts


def served(line: str) -> dict[str, int]:
    """'requests served: WRITE 3 (0.001 s), ...' -> {'WRITE': 3, ...}"""
    return {opcode: int(count) for opcode, count in re.findall(r"([A-Z]+) (\d+) \(\d+\.\d+ s\)", line)}


def last_summary(text: str) -> dict[str, int]:
    lines = [line for line in text.splitlines() if "requests served: " in line]
    assert lines, text
    return served(lines[-1])


def test_summary_is_one_line_most_frequent_first() -> None:
    counts = RequestCounts()
    assert counts.summary() == "none"
    for opcode, ns in [("READ", 1_000_000), ("GETATTR", 5), ("READ", 2_500_000_000), ("WRITE", 7)]:
        counts.add(opcode, ns)
    assert counts.summary() == "READ 2 (2.501 s), GETATTR 1 (0.000 s), WRITE 1 (0.000 s)"


def test_sigusr2_logs_the_requests_served_so_far(mmfs_factory) -> None:  # type: ignore[no-untyped-def]
    mount = mmfs_factory()
    path = mount.path / "file"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for _ in range(3):
            os.write(fd, b"x" * 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.kill(mount.process.pid, signal.SIGUSR2)
    assert wait_for(lambda: "requests served: " in mount.log_text())
    counts = last_summary(mount.log_text())
    assert counts["CREATE"] == 1 and counts["WRITE"] == 3 and counts["FSYNC"] == 1, counts
    assert "READ" not in counts, counts  # nothing was read
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # drops a FUSE file's pages
        assert file.read() == b"x" * 300
    stop_mmfs(mount)
    final = last_summary(mount.log_text())  # at unmount, the whole run
    assert final["READ"] >= 1 and final["WRITE"] == 3 and final["OPEN"] >= 1, final
