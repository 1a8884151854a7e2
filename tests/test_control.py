"""The control channel and ``mmfs status``: found from the mountpoint, private,
invisible inside the mount, and unharmed by bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_mounted, mmfs_command, wait_for

from mmfs import channel, control

NOBODY = 65534


def mmfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(mmfs_command(*args), capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def status(mountpoint: Path) -> dict[str, object]:
    return dict(json.loads(mmfs("status", str(mountpoint), "--json").stdout))


def raw_request(mountpoint: Path, payload: bytes, fds: list[int] | None = None) -> dict[str, object]:
    """Send ``payload`` as it is and return the daemon's reply."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(control.locate(str(mountpoint)))
        if fds:
            socket.send_fds(sock, [payload], fds)
        else:
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return dict(json.loads(control._read_all(sock)))


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private socket directory for the mounts of this test (daemons and clients)."""
    directory = tmp_path / "run"
    monkeypatch.setenv(control.RUNTIME_ENV, str(directory))
    return directory


def test_status_of_a_tmpfs_mount(mmfs_factory) -> None:  # type: ignore[no-untyped-def]
    mount = mmfs_factory("tmpfs", options="size=64m,nr_inodes=1000")
    mnt = mount.path
    before = status(mnt)
    (mnt / "f").write_bytes(b"x" * (1 << 20))
    (mnt / "d").mkdir()
    after = status(mnt)
    assert before["mode"] == "tmpfs" and before["lowerdir"] is None
    assert before["mountpoint"] == str(mnt) and before["pid"] == mount.process.pid
    assert before["size"] == 64 << 20 and before["nr_inodes"] == 1000
    assert before["bytes_used"] == 0 and after["bytes_used"] == 1 << 20
    assert after["inodes_used"] == before["inodes_used"] + 2  # type: ignore[operator]
    assert after["requests"] > before["requests"]  # type: ignore[operator]
    assert after["requests_by_opcode"]["WRITE"] >= 1  # type: ignore[index]
    assert 0 <= after["uptime_seconds"] < 60 and after["rss_bytes"] > 1 << 20  # type: ignore[operator]
    text = mmfs("status", str(mnt)).stdout
    assert text.startswith(f"{mnt}:\n") and "1.0 MiB held" in text and "1000, 3 used" in text
    listing = mmfs("status").stdout.splitlines()
    assert any(line.startswith(f"{mnt}  tmpfs  1.0 MiB of 64.0 MiB") for line in listing), listing


def test_status_of_an_overlay_mount(mmfs_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "big").write_bytes(b"a" * (1 << 20))
    mnt = mmfs_factory("overlay", str(lower)).path
    with open(mnt / "big", "r+b", buffering=0) as big:
        big.write(b"b")
        assert status(mnt)["files_mapped"] == 1
    (mnt / "new").write_text("new")
    reply = status(mnt)
    assert reply["mode"] == "overlay" and reply["lowerdir"] == str(lower) and reply["source"] == "overlay"
    assert reply["files_changed"] == 2  # M big, A new (the root's M is not a file)
    assert "2 changed, 1 mapped" in mmfs("status", str(mnt)).stdout
    assert reply["bytes_used"] == 2 * 4096  # the page written in big, and the new file's


def test_the_socket_is_private_and_goes_at_unmount(mmfs_factory, tmp_path: Path, runtime: Path) -> None:  # type: ignore[no-untyped-def]
    mount = mmfs_factory("tmpfs")
    path = Path(control.locate(str(mount.path)))
    assert path.parent == runtime
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    subprocess.run(["fusermount3", "-u", str(mount.path)], check=True)
    mount.process.wait(timeout=30)
    assert not path.exists()


def test_nothing_of_it_shows_inside_the_mount(mnt: Path) -> None:
    status(mnt)
    assert os.listdir(mnt) == [] and os.listxattr(mnt) == []
    assert not control.locate(str(mnt)).startswith(str(mnt) + "/")


def test_a_stale_socket_is_replaced(tmp_path: Path, runtime: Path) -> None:
    runtime.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(runtime / "0:999.sock"))
    stale.close()  # a killed daemon's socket: the file stays, nobody listens
    listener = channel.listen("0:999")
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(runtime / "0:999.sock"))
    finally:
        channel.remove(listener)
    assert not (runtime / "0:999.sock").exists()


def test_a_runtime_directory_open_to_others_is_refused(runtime: Path) -> None:
    runtime.mkdir(mode=0o755)
    runtime.chmod(0o755)
    with pytest.raises(OSError, match="0700"):
        channel.listen("0:998")


@pytest.fixture
def public_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A socket directory that other users can reach (tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="mmfs-control-"))
    base.chmod(0o755)
    monkeypatch.setenv(control.RUNTIME_ENV, str(base / "run"))
    yield base / "run"
    shutil.rmtree(base)


@pytest.mark.expect_log("control request from uid 65534 refused")
def test_only_the_user_who_mounted_and_root_are_served(public_runtime: Path, mmfs_factory) -> None:  # type: ignore[no-untyped-def]
    runtime = public_runtime
    mount = mmfs_factory("tmpfs")
    path = control.locate(str(mount.path))
    runtime.chmod(0o755)  # as if the file modes let everyone in: the credentials still rule
    os.chmod(path, 0o666)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                sock.sendall(b'{"op": "status"}')
                sock.shutdown(socket.SHUT_WR)
                os.write(write_end, control._read_all(sock))
        except OSError as error:
            os.write(write_end, json.dumps({"client failed": str(error)}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reply = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert reply == {"ok": False, "error": "permission denied: only the user who mounted and root may use this"}
    assert status(mount.path)["mode"] == "tmpfs"


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x00\xffgarbage", "bad request: not JSON"),
        (b"[1, 2]", 'bad request: expected a JSON object with "op"'),
        (b'{"op": "format-disk"}', "unknown request: 'format-disk'"),
        (b'{"op": "status", "x": "' + b"y" * (2 << 20) + b'"}', "request too large (more than 1048576 bytes)"),
    ],
    ids=["garbage", "not-an-object", "unknown-op", "huge"],
)
def test_bad_requests_get_an_error_and_harm_nothing(mnt: Path, payload: bytes, error: str) -> None:
    (mnt / "kept").write_bytes(b"data")
    assert raw_request(mnt, payload) == {"ok": False, "error": error}
    assert (mnt / "kept").read_bytes() == b"data" and status(mnt)["mode"] == "tmpfs"


def test_a_client_that_hangs_up_or_stalls_harms_nothing(mnt: Path) -> None:
    path = control.locate(str(mnt))
    with socket.socket(socket.AF_UNIX) as half:
        half.connect(path)
        half.sendall(b'{"op": "sta')  # and hangs up mid-request
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(path)  # sends nothing, keeps the connection open
        started = time.monotonic()
        assert status(mnt)["mode"] == "tmpfs"  # others are served meanwhile
        assert time.monotonic() - started < channel.READ_SECONDS
    (mnt / "f").write_text("still serving")
    assert (mnt / "f").read_text() == "still serving"


def test_descriptors_sent_with_a_request_are_closed(mmfs_factory) -> None:  # type: ignore[no-untyped-def]
    mount = mmfs_factory("tmpfs")
    mnt, daemon = mount.path, mount.process.pid
    status(mnt)  # trio opens what it needs at the first request
    before = len(os.listdir(f"/proc/{daemon}/fd"))
    files = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    try:
        assert raw_request(mnt, b'{"op": "status"}', files)["ok"] is True
    finally:
        for fd in files:
            os.close(fd)
    assert wait_for(lambda: len(os.listdir(f"/proc/{daemon}/fd")) == before)


def test_a_mount_that_is_gone_or_dead_is_one_line(mmfs_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plain = tmp_path / "plain"
    plain.mkdir()
    result = mmfs("status", str(plain), check=False)
    assert result.returncode == 1 and result.stderr == f"mmfs status: {plain}: not on an mmfs mount\n"
    mount = mmfs_factory("tmpfs")
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait()
    try:
        result = mmfs("status", str(mount.path), check=False)
        assert result.returncode == 1
        assert result.stderr == f"mmfs status: {mount.path}: the mmfs mounted there is dead (its daemon stopped)\n"
        assert all(str(mount.path) not in line for line in mmfs("status").stdout.splitlines())
    finally:
        subprocess.run(["fusermount3", "-u", str(mount.path)], check=True)
        assert wait_for(lambda: not is_mounted(mount.path))


def test_verb_usage_errors_are_one_line() -> None:
    for args, message in [
        (("status", "--frobnicate"), "mmfs status: unknown argument: '--frobnicate' (see mmfs status --help)\n"),
        (("diff",), "mmfs diff: usage: mmfs diff MOUNTPOINT [--since CHECKPOINT] [--json]\n"),
        (("diff", "x", "--since"), "mmfs diff: --since needs a value (see mmfs diff --help)\n"),
        (("export", "x"), "mmfs export: usage: mmfs export MOUNTPOINT DIR\n"),
        (("checkpoint", "x"), "mmfs checkpoint: usage: mmfs checkpoint [--delete] MOUNTPOINT NAME\n"),
    ]:
        result = mmfs(*args, check=False)
        assert (result.returncode, result.stderr) == (1, message)
    assert mmfs("status", "--help").stdout.startswith("usage: mmfs status [MOUNTPOINT] [--json]\n")


def test_the_verbs_start_without_trio_or_pyfuse3(mnt: Path) -> None:
    """They are clients: importing the daemon's libraries would triple their start-up time."""
    code = (
        "import sys; from mmfs import cli; cli.main(['status', sys.argv[1]]); "
        "print(sorted({'trio', 'pyfuse3'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(mnt)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
