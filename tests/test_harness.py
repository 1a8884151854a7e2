"""The test harness itself (tests/conftest.py): a hung FUSE call fails one test
and the run goes on; a daemon log with a warning fails the test that made it
unless the test expects it.

The watchdog and the fixtures can only be seen at work from outside a pytest
session, so these tests run small inner sessions in a subprocess: a generated
test file, with tests/conftest.py loaded as a plugin (``-p conftest``) and its
own basetemp under this test's tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, Mount, check_daemon_log, fuse_mounts_under, stop_mmfs, wait_for

INNER_INI = """\
[pytest]
addopts = --strict-markers -p no:cacheprovider -ra
filterwarnings = error
"""


@dataclass
class InnerRun:
    output: str
    outcomes: dict[str, tuple[str, str]]  # test name -> ("passed" | "failed" | "error" | "skipped", message)


def run_inner_pytest(tmp_path: Path, source: str, deadline: float) -> InnerRun:
    """Run ``source`` as a test file in a pytest session of its own; a session that
    outlives ``deadline`` seconds is killed and fails the calling test."""
    directory = tmp_path / "inner"
    directory.mkdir()
    (directory / "pytest.ini").write_text(INNER_INI)
    (directory / "test_inner.py").write_text(source)
    junit = tmp_path / "inner.xml"
    command = [
        sys.executable, "-m", "pytest", "-p", "conftest", f"--basetemp={tmp_path / 'basetemp'}",
        f"--junitxml={junit}", str(directory / "test_inner.py"),
    ]  # fmt: skip
    path = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    try:
        done = subprocess.run(command, cwd=directory, env=env, capture_output=True, timeout=deadline)
    except subprocess.TimeoutExpired as expired:  # killed: a hang fails this test instead of hanging it
        partial = ((expired.stdout or b"") + (expired.stderr or b"")).decode(errors="replace")
        raise AssertionError(f"the inner pytest session did not end within {deadline} s:\n{partial}") from None
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert junit.exists(), output
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = {"failure": "failed"}.get(child.tag, child.tag), child.get("message", "")
        outcomes[case.get("name", "")] = (outcome, message)
    return InnerRun(output, outcomes)


def clear_leftovers(directory: Path, pid_file: Path) -> None:
    """After a failed run: kill the daemon the inner test stopped, clear its mounts."""
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 9)
        except ProcessLookupError:
            pass
    for entry in fuse_mounts_under(directory):
        subprocess.run(["fusermount3", "-u", os.fsdecode(entry.mountpoint)], capture_output=True)


# --- 1. a hung FUSE call ---------------------------------------------------------------
HUNG_CALL = """
import os
import signal
from pathlib import Path

import pytest

@pytest.mark.timeout(3)
def test_hangs_in_a_fuse_call(mmfs_factory):
    mount = mmfs_factory()
    Path({pid_file!r}).write_text(str(mount.process.pid))
    os.kill(mount.process.pid, signal.SIGSTOP)
    os.stat(mount.path / "never-looked-up")  # a LOOKUP that the stopped daemon never answers

def test_the_next_test_runs_as_usual(mnt):
    (mnt / "f").write_bytes(b"served")
    assert (mnt / "f").read_bytes() == b"served"
"""


def test_a_hung_fuse_call_fails_one_test_and_the_next_runs(tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"
    try:
        run = run_inner_pytest(tmp_path, HUNG_CALL.format(pid_file=str(pid_file)), deadline=60)
    finally:
        leftovers = fuse_mounts_under(tmp_path)
        clear_leftovers(tmp_path, pid_file)
    assert run.outcomes == {
        "test_hangs_in_a_fuse_call": ("failed", run.outcomes["test_hangs_in_a_fuse_call"][1]),
        "test_the_next_test_runs_as_usual": ("passed", ""),
    }, run.output
    assert "Timeout" in run.outcomes["test_hangs_in_a_fuse_call"][1], run.output  # pytest-timeout's failure
    pid = int(pid_file.read_text())
    assert "watchdog: test_inner.py::test_hangs_in_a_fuse_call still runs" in run.output, run.output
    assert "aborted FUSE connection" in run.output and f"killed daemon {pid}" in run.output, run.output
    assert wait_for(lambda: not Path(f"/proc/{pid}").exists()), f"the stopped daemon {pid} is still there"
    assert leftovers == [], leftovers


# --- 2. warnings in the daemon log -------------------------------------------------------
WARNINGS = """
import errno
import os

import pytest

def provoke_a_warning(mmfs_factory, tmp_path):
    '''An overlay whose backing file is truncated underneath: reading it is EIO,
    and the daemon logs "backing storage failed" at WARNING.'''
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "small").write_bytes(b"x" * 65536)
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    assert os.stat(mount.path / "small").st_size == 65536
    os.truncate(lower / "small", 0)
    with pytest.raises(OSError) as failed:
        with open(mount.path / "small", "rb") as file:
            file.read()
    assert failed.value.errno == errno.EIO

def test_an_unexpected_warning(mmfs_factory, tmp_path):
    provoke_a_warning(mmfs_factory, tmp_path)

@pytest.mark.expect_log(r"backing storage failed, answering EIO")
def test_an_expected_warning(mmfs_factory, tmp_path):
    provoke_a_warning(mmfs_factory, tmp_path)

@pytest.mark.expect_log(r"something else entirely")
def test_a_warning_other_than_the_expected_one(mmfs_factory, tmp_path):
    provoke_a_warning(mmfs_factory, tmp_path)

@pytest.mark.expect_log(r"backing storage failed")
def test_an_expected_warning_that_never_comes(mnt):
    (mnt / "f").write_bytes(b"fine")

@pytest.mark.expect_log(r"backing storage failed", required=False)
def test_a_warning_that_may_not_come(mnt):
    (mnt / "f").write_bytes(b"fine")

@pytest.mark.expect_log(r"backing storage failed", required=False)
def test_a_warning_that_may_come(mmfs_factory, tmp_path):
    provoke_a_warning(mmfs_factory, tmp_path)

def test_a_clean_log(mnt):
    (mnt / "f").write_bytes(b"fine")
"""


def test_a_warning_in_the_daemon_log_fails_the_test_unless_expected(tmp_path: Path) -> None:
    try:
        run = run_inner_pytest(tmp_path, WARNINGS, deadline=120)
    finally:
        leftovers = fuse_mounts_under(tmp_path)
        clear_leftovers(tmp_path, tmp_path / "no-pid-file")
    outcomes = {name: outcome for name, (outcome, _) in run.outcomes.items()}
    assert outcomes == {
        "test_an_unexpected_warning": "error",  # at teardown, where the fixture reads the log
        "test_an_expected_warning": "passed",
        "test_a_warning_other_than_the_expected_one": "error",
        "test_an_expected_warning_that_never_comes": "error",
        "test_a_warning_that_may_not_come": "passed",
        "test_a_warning_that_may_come": "passed",
        "test_a_clean_log": "passed",
    }, run.output
    assert "mmfs WARNING mmfs.fs: backing storage failed, answering EIO" in run.output, run.output
    assert "expect_log: no checked daemon log of this test has a record matching ['backing storage failed']" in (
        run.output
    ), run.output
    assert leftovers == [], leftovers


# --- the log check itself, on logs written by hand -------------------------------------------
def finished_mount(tmp_path: Path, log_text: str) -> Mount:
    """A Mount whose daemon has already exited 0 and left ``log_text``."""
    log = tmp_path / "daemon.log"
    log.write_text(log_text)
    process = subprocess.Popen(["true"])
    process.wait()
    return Mount(tmp_path / "never-mounted", process, log)


CLEAN = "mmfs INFO mmfs.mount: mounted tmpfs on /somewhere\nmmfs DEBUG mmfs.fs: an error: ENOENT, at debug level\n"


@pytest.mark.parametrize(
    "line",
    [
        "mmfs WARNING mmfs.fs: backing storage failed, answering EIO: [Errno 5]\n",
        "mmfs ERROR mmfs.fuse_ops: internal error in lookup; answering EIO\n",
        "mmfs CRITICAL mmfs.mount: the end\n",
        "mmfs INFO mmfs.mount: fine\nTraceback (most recent call last):\n  File ...\nValueError: x\n",
        "Fatal Python error: Segmentation fault\n",
        "fuse: reading device: Invalid argument\n",
        "/x/y.py:3: DeprecationWarning: old\n",
    ],
    ids=["warning", "error", "critical", "traceback", "crash", "libfuse", "python-warning"],
)
def test_stop_mmfs_fails_on_a_serious_record(tmp_path: Path, line: str) -> None:
    mount = finished_mount(tmp_path, CLEAN + line + CLEAN)
    with pytest.raises(AssertionError, match="the daemon logged at WARNING or worse"):
        stop_mmfs(mount)
    stop_mmfs(finished_mount(tmp_path, CLEAN + line), check_log=False)  # injected faults: no log check


def test_stop_mmfs_passes_a_clean_log_and_expected_records(tmp_path: Path) -> None:
    stop_mmfs(finished_mount(tmp_path, CLEAN))
    warning = "mmfs WARNING mmfs.fs: backing storage failed, answering EIO: [Errno 5]\n"
    stop_mmfs(finished_mount(tmp_path, CLEAN + warning), expect_log=[r"backing storage failed"])
    with pytest.raises(AssertionError, match="never logged"):
        stop_mmfs(finished_mount(tmp_path, CLEAN), expect_log=[r"backing storage failed"])
    with pytest.raises(AssertionError, match="WARNING or worse"):
        stop_mmfs(finished_mount(tmp_path, CLEAN + warning), expect_log=[r"something else"])


def test_an_expected_pattern_covers_the_traceback_of_its_record() -> None:
    text = (
        "mmfs ERROR mmfs.fuse_ops: internal error in getxattr; answering EIO\n"
        "Traceback (most recent call last):\n  File ...\nRuntimeError: injected fault\n" + CLEAN
    )
    assert check_daemon_log(text, [r"(?s)answering EIO.*injected fault"]) == {r"(?s)answering EIO.*injected fault"}
    with pytest.raises(AssertionError):
        check_daemon_log(text + "mmfs WARNING mmfs.x: another\n", [r"(?s)answering EIO.*injected fault"])
