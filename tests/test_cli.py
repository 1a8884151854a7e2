"""The ``mmfs`` command as a new user meets it: no traps, messages that reach a
person, and a daemon that survives a bug in work done outside any request.

Each test runs the real command (and usually a real mount); the pure option
parsing has a tier of its own at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Mount, is_mounted, mmfs_command, start_mmfs, stop_mmfs, wait_for
from test_lifecycle import (
    PATH_ENV,
    assert_one_line_error,
    cleanup_mount,
    daemon_pids,
    mount_with_mount8_and_check,
    mounts_under,
    run_mmfs,
)

from mmfs import manual, mounts
from mmfs.options import HelpRequested, UsageError, parse_args

# Runs the daemon with a patch applied first: PATCH is Python source run in the
# daemon before mmfs.cli.main (the injected fault or the changed constant).
PATCHED_DAEMON = """
import os, sys
exec(os.environ["PATCH"])
from mmfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_patched(patch: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``mmfs ARGS`` (background) in a process where ``patch`` ran first."""
    env = {**os.environ, "PATCH": patch}
    return subprocess.run([sys.executable, "-c", PATCHED_DAEMON, *args], env=env, cwd=ROOT,
                          capture_output=True, timeout=timeout)


def start_patched(patch: str, mountpoint: Path, log: Path, *args: str) -> Mount:
    """``mmfs ARGS MOUNTPOINT -f`` with ``patch`` applied, live and logging to ``log``."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", PATCHED_DAEMON, *args, str(mountpoint), "-f"],
                                   env={**os.environ, "PATCH": patch}, stdout=out, stderr=out, cwd=ROOT)
    assert wait_for(lambda: is_mounted(mountpoint) or process.poll() is not None, 20), log.read_text()
    assert process.poll() is None, log.read_text()
    return Mount(mountpoint, process, log)


def single_daemon(mountpoint: Path) -> int:
    pids = daemon_pids(mountpoint)
    assert len(pids) == 1, pids
    return pids.pop()


# --- no traps on the command line ---------------------------------------------
def test_overlay_without_mountpoint_fails_and_mounts_nothing(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "file").write_text("data\n")
    for args in (["overlay", str(lower)], ["overlay", str(lower), "-f"], ["tmpfs"], ["overlay"]):
        result = run_mmfs(*args)
        assert_one_line_error(result)
        assert b"MOUNTPOINT" in result.stderr or b"LOWERDIR" in result.stderr, result.stderr
    assert not mounts_under(tmp_path)
    assert (lower / "file").read_text() == "data\n"


def test_mount8_overlay_form_is_overlay_mode(tmp_path: Path) -> None:
    lower, mountpoint = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mountpoint.mkdir()
    (lower / "file").write_text("from lower\n")
    pids: set[int] = set()
    try:
        done = subprocess.run(["mount", "-t", "fuse.mmfs", "overlay", str(mountpoint), "-o", f"lowerdir={lower}"],
                              env=PATH_ENV, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        pids = daemon_pids(mountpoint)
        assert (mountpoint / "file").read_text() == "from lower\n"
        (mountpoint / "file").write_text("changed\n")
        assert (lower / "file").read_text() == "from lower\n"
    finally:
        cleanup_mount(mountpoint, pids)


def test_two_different_lowerdirs_are_an_error(tmp_path: Path) -> None:
    first, second, mountpoint = tmp_path / "a", tmp_path / "b", tmp_path / "mnt"
    for directory in (first, second, mountpoint):
        directory.mkdir()
    result = run_mmfs("overlay", str(first), str(mountpoint), "-o", f"lowerdir={second}")
    assert_one_line_error(result)
    assert b"two different lowerdirs" in result.stderr
    assert not mounts_under(tmp_path)
    same = run_mmfs("overlay", str(first), str(mountpoint), "-o", f"lowerdir={first}/")
    assert same.returncode == 0, same.stderr
    cleanup_mount(mountpoint, daemon_pids(mountpoint))


def test_daemon_does_not_pin_the_callers_directory(tmp_path: Path) -> None:
    """Started from inside another mount, the daemon must not keep it busy."""
    other, mountpoint = tmp_path / "other", tmp_path / "mnt"
    other.mkdir()
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "callers", str(other)], check=True)
    pids: set[int] = set()
    try:
        done = subprocess.run(mmfs_command("tmpfs", "../mnt", "-o", "size=16m"), cwd=other,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
        pids = daemon_pids(mountpoint) | daemon_pids(Path("../mnt"))
        assert is_mounted(mountpoint)
        assert subprocess.run(["umount", str(other)], capture_output=True).returncode == 0, "the daemon pins it"
    finally:
        cleanup_mount(mountpoint, pids)
        if is_mounted(other):
            subprocess.run(["umount", "-l", str(other)], check=False)


def test_dead_mount_is_named_with_its_cure(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    assert run_mmfs("tmpfs", str(mountpoint), "-o", "size=16m").returncode == 0
    pid = single_daemon(mountpoint)
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not daemon_pids(mountpoint))
    try:
        for args in (["tmpfs", str(mountpoint)], ["tmpfs", str(mountpoint), "-f"]):
            result = run_mmfs(*args)
            assert_one_line_error(result)
            assert b"dead" in result.stderr and f"fusermount3 -u {mountpoint}".encode() in result.stderr
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
        assert run_mmfs("tmpfs", str(mountpoint), "-o", "size=16m").returncode == 0
        (mountpoint / "alive").write_text("yes")
    finally:
        cleanup_mount(mountpoint, daemon_pids(mountpoint))


def test_fstab_options_for_other_programs_are_accepted(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    fstab = tmp_path / "fstab"
    options = "size=10m,nr_inodes=100,noauto,x-systemd.automount,x-gvfs-show,comment=systemd.automount"
    fstab.write_text(f"scratch {mountpoint} fuse.mmfs {options} 0 0\n")
    mount_with_mount8_and_check(mountpoint, ["mount", "--fstab", str(fstab), str(mountpoint)])


STRANGE_NAMES = ["with space", "with\ttab", "with\nnewline", "caf\u00e9 \u00e9t\u00e9", "back\\slash"]


@pytest.mark.parametrize("name", STRANGE_NAMES)
def test_mountpoint_names_the_mount_table_escapes(tmp_path: Path, name: str) -> None:
    mountpoint = tmp_path / name
    mountpoint.mkdir()
    mount = start_mmfs(mountpoint, tmp_path / "mmfs.log", "tmpfs", options="size=16m")
    try:
        entry = mounts.mounted_at(os.path.realpath(mountpoint))
        assert entry is not None and entry.fstype == "fuse.mmfs" and entry.source == b"tmpfs"
        for extra in ([], ["-f"]):
            result = run_mmfs("tmpfs", str(mountpoint), "-o", "size=16m", *extra)
            assert_one_line_error(result)
            assert b"already mounted" in result.stderr
        assert sum(e.mountpoint == os.fsencode(os.path.realpath(mountpoint)) for e in mounts.mount_table()) == 1
        readahead = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
        assert wait_for(lambda: readahead.read_text().strip() == "1024"), readahead.read_text()
    finally:
        stop_mmfs(mount)


def test_mountinfo_unescaping() -> None:
    line = rb"36 35 0:52 / /tmp/a\040b\011c\012d\134e\303\251 rw,relatime shared:1 - fuse.mmfs my\040src rw"
    entry = mounts.parse_line(line + b"\n")
    assert entry.mountpoint == "/tmp/a b\tc\nd\\e\u00e9".encode()
    assert entry.device == "0:52" and entry.fstype == "fuse.mmfs" and entry.source == b"my src"
    assert mounts.parse_line(b"1 0 8:1 / / rw - ext4 /dev/sda1 rw").mountpoint == b"/"


def test_readahead_of_no_mount_touches_nothing(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from mmfs import mount

    opened: list[str] = []
    real_open = open

    def spying_open(path: str, *args: object, **kwargs: object) -> object:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    mount.open = spying_open  # type: ignore[attr-defined]
    caplog.set_level("DEBUG", logger="mmfs.mount")
    try:
        mount.widen_readahead(str(tmp_path))
    finally:
        del mount.open  # type: ignore[attr-defined]
    assert not [path for path in opened if path.startswith("/sys/")], opened
    assert "no mmfs mount found" in caplog.text


# --- messages that reach a person ---------------------------------------------
def test_version() -> None:
    result = run_mmfs("--version")
    assert result.returncode == 0 and result.stderr == b""
    assert result.stdout.decode().startswith("mmfs 0.1.0 (pyfuse3 3.5."), result.stdout


def test_help_into_a_closed_pipe_is_no_error() -> None:
    command = " ".join(mmfs_command("--help")) + " | head -1"
    result = subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, timeout=30)
    assert result.stdout.decode().startswith("usage: mmfs tmpfs MOUNTPOINT"), result.stdout
    assert result.stderr == b"", result.stderr


@pytest.mark.parametrize("mode", ["tmpfs", "overlay"])
def test_help_for_each_mode(mode: str) -> None:
    result = run_mmfs(mode, "--help")
    assert result.returncode == 0 and result.stderr == b""
    text = result.stdout.decode()
    assert text.startswith("usage: " + manual.SYNOPSIS[mode]), text
    assert f"{mode} mode:" in text and ("tmpfs mode:" in text) == (mode == "tmpfs")
    for option in manual.OPTIONS:
        if mode == "tmpfs" and option.form.startswith("lowerdir"):
            continue
        assert f"  {option.form}\n" in text, option.form
        assert f"(default: {option.default_in(mode)})" in " ".join(text.split()), option.form
    for needed in ("-f", "--debug", "umount MOUNTPOINT", "fusermount3 -u"):
        assert needed in text, needed


def test_manual_page_says_what_help_says(tmp_path: Path) -> None:
    page = tmp_path / "mmfs.8"
    page.write_text(manual.man_page())
    shown = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True,
                           env={**os.environ, "MANWIDTH": "200"}, timeout=30)
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.replace("\u2010", "-").split())
    for option in manual.OPTIONS:
        assert option.form in text and option.meaning.split(";")[0] in text, option.form
    assert "umount MOUNTPOINT" in text and "fusermount3 -u MOUNTPOINT" in text


def test_log_option_gets_messages_and_stack_dumps(tmp_path: Path) -> None:
    mountpoint, log = tmp_path / "mnt", tmp_path / "logs" / "mmfs.log"
    mountpoint.mkdir()
    result = run_mmfs("tmpfs", str(mountpoint), "-o", f"size=16m,log={log}")
    assert result.returncode == 0, result.stderr
    pid = single_daemon(mountpoint)
    try:
        os.kill(pid, signal.SIGUSR1)  # faulthandler: a stack dump of every thread
        assert wait_for(lambda: " in serve\n" in log.read_text()), log.read_text()  # the dump's last frame
        text = log.read_text()
        assert f"mmfs[{pid}] INFO mmfs.mount: mounted tmpfs on {mountpoint}" in text, text
        assert "Current thread" in text and 'File "' in text, text
    finally:
        cleanup_mount(mountpoint, {pid})


def test_unwritable_log_is_one_line_before_mounting(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    (tmp_path / "file").write_text("")
    result = run_mmfs("tmpfs", str(mountpoint), "-o", f"log={tmp_path}/file/mmfs.log")
    assert_one_line_error(result)
    assert b"cannot open log file" in result.stderr
    assert not mounts_under(tmp_path)


def test_without_syslog_the_daemon_logs_to_the_documented_file(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    patch = f"import mmfs.cli; mmfs.cli.SYSLOG_SOCKET = {str(tmp_path / 'no-syslog')!r}"
    result = run_patched(patch, "tmpfs", str(mountpoint), "-o", "size=16m")
    assert result.returncode == 0, result.stderr
    pid = single_daemon(mountpoint)
    try:
        assert manual.ROOT_LOG == "/var/log/mmfs.log"  # what --help and the manual promise root
        expected = f"mmfs[{pid}] INFO mmfs.mount: mounted tmpfs on {mountpoint}"
        assert wait_for(lambda: expected in Path(manual.ROOT_LOG).read_text(errors="replace"))
    finally:
        cleanup_mount(mountpoint, {pid})


def test_with_syslog_messages_and_stack_dumps_reach_it(tmp_path: Path) -> None:
    mountpoint, address = tmp_path / "mnt", str(tmp_path / "syslog")
    mountpoint.mkdir()
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(address)
    syslog.settimeout(10)
    received: list[str] = []

    def has(text: str) -> bool:
        while text not in "".join(received):
            try:
                received.append(syslog.recv(65536).decode(errors="replace"))
            except TimeoutError:
                return False
        return True

    pid = 0
    try:
        result = run_patched(f"import mmfs.cli; mmfs.cli.SYSLOG_SOCKET = {address!r}", "tmpfs", str(mountpoint))
        assert result.returncode == 0, result.stderr
        pid = single_daemon(mountpoint)
        assert has(f"mmfs[{pid}]: INFO mmfs.mount: mounted tmpfs on {mountpoint}"), received
        os.kill(pid, signal.SIGUSR1)
        assert has(" in serve"), received  # faulthandler's dump, through logger(1)
    finally:
        cleanup_mount(mountpoint, {pid} if pid else set())
        syslog.close()


# --- ulimit -v ------------------------------------------------------------------
def test_mounts_under_an_address_space_limit(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    limit_kib = 8 << 20  # 8 GiB: far less than the 1 TiB the arena reserves without a limit
    shell = f"ulimit -v {limit_kib}; exec " + " ".join(mmfs_command("tmpfs", str(mountpoint), "-o", "size=1g"))
    done = subprocess.run(["sh", "-c", shell], cwd=ROOT, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    pid = single_daemon(mountpoint)
    try:
        data = os.urandom(1 << 20) * 64
        (mountpoint / "file").write_bytes(data)
        assert (mountpoint / "file").read_bytes() == data
        vfs = os.statvfs(mountpoint)
        assert vfs.f_blocks * vfs.f_frsize == 1 << 30
    finally:
        cleanup_mount(mountpoint, {pid})


@pytest.mark.parametrize("foreground", [False, True])
def test_too_small_an_address_space_limit_is_one_line(tmp_path: Path, foreground: bool) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    args = mmfs_command("tmpfs", str(mountpoint)) + (["-f"] if foreground else [])
    done = subprocess.run(["sh", "-c", "ulimit -v 200000; exec " + " ".join(args)], cwd=ROOT,
                          capture_output=True, timeout=30)
    assert_one_line_error(done)
    assert b"address space limit (ulimit -v)" in done.stderr
    assert not mounts_under(tmp_path)


# --- work outside requests never ends the daemon -------------------------------
def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize("task", ["readahead", "lease break"])
def test_a_bug_in_a_daemon_task_is_contained(tmp_path: Path, task: str) -> None:
    lower, mountpoint = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mountpoint.mkdir()
    (lower / "file").write_bytes(b"lower bytes")
    if task == "readahead":
        patch = "import mmfs.mount\ndef broken(path): raise RuntimeError('injected readahead bug')\n" \
                "mmfs.mount.widen_readahead = broken"
    else:
        patch = "import mmfs.maps\ndef broken(self): raise RuntimeError('injected lease break bug')\n" \
                "mmfs.maps.MapBudget.lease_breaks = broken"
    mount = start_patched(patch, mountpoint, tmp_path / "mmfs.log", "overlay", str(lower))
    try:
        if task == "lease break":
            assert wait_for(lambda: catches(mount.process.pid, signal.SIGIO))  # trio's receiver is in place
            os.kill(mount.process.pid, signal.SIGIO)  # as the kernel sends it when a lease breaks
        assert wait_for(lambda: f"injected {task} bug" in mount.log_text()), mount.log_text()
        (mountpoint / "new").write_bytes(b"after the bug")
        assert (mountpoint / "new").read_bytes() == b"after the bug"
        assert (mountpoint / "file").read_bytes() == b"lower bytes"
        assert mount.process.poll() is None
        assert "Traceback" in mount.log_text() and "the mount keeps serving" in mount.log_text()
    finally:
        stop_mmfs(mount, check_log=False)


# --- the options tier: parse_args as a pure function ----------------------------
def test_parse_overlay_forms() -> None:
    assert parse_args(["overlay", "/srv", "/mnt"]).lowerdir == "/srv"
    assert parse_args(["overlay", "/mnt", "-o", "lowerdir=/srv"]).lowerdir == "/srv"  # mount(8)
    assert parse_args(["scratch", "/mnt", "-o", "lowerdir=/srv"]).source == "scratch"
    assert parse_args(["overlay", "/srv", "/mnt", "-o", "lowerdir=/srv/."]).lowerdir == "/srv/."
    for argv in (["overlay", "/mnt"], ["overlay", "/srv", "/mnt", "-o", "lowerdir=/etc"], ["tmpfs"]):
        with pytest.raises(UsageError):
            parse_args(argv)


def test_parse_busy_poll_log_and_foreign_options() -> None:
    assert parse_args(["tmpfs", "/mnt"]).busy_poll is True
    assert parse_args(["tmpfs", "/mnt", "-o", "busy_poll=0"]).busy_poll is False
    assert parse_args(["tmpfs", "/mnt", "-o", "log=/var/log/x.log"]).log == "/var/log/x.log"
    config = parse_args(["tmpfs", "/mnt", "-o", "x-systemd.requires=a.mount,comment=x=y,x-gvfs-hide,size=1m"])
    assert config.size == 1 << 20 and not config.fuse_options
    for bad in ("busy_poll=2", "busy_poll=", "log=", "xsystemd=1"):
        with pytest.raises(UsageError):
            parse_args(["tmpfs", "/mnt", "-o", bad])


def test_parse_help_and_version() -> None:
    for argv, start in ((["--help"], "usage: mmfs tmpfs"), (["overlay", "-h"], "usage: mmfs overlay"),
                        (["tmpfs", "/mnt", "--help"], "usage: mmfs tmpfs"), (["--version"], "mmfs ")):
        with pytest.raises(HelpRequested) as info:
            parse_args(argv)
        assert str(info.value).startswith(start), argv
