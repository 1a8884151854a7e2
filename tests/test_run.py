"""``mmfs run``: a command in a throwaway overlay of a directory, on real mounts.

Every test runs the real command, whose daemon mounts in a mount namespace of
its own: the test (another process) never sees the overlay, so what the
command saw is recorded by the command itself.  DIR must come out
bit-identical (atimes included), the summary on stderr must list exactly what
changed, ``--keep`` must be an upper directory that kernel overlayfs turns
back into the command's view, exit statuses and signals must pass as through
a shell, and nothing may be left behind (daemon, private directory).

The tests as a normal user need a directory nobody can reach: pytest's
temporary directories are root's (0700), so those use a directory in /tmp of
their own, removed after; the mounts are in private namespaces all the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Mount, is_mounted, mounted_kernel_tmpfs, start_mmfs, stop_mmfs, wait_for
from support.trees import ALL_STATS, differences, file_digest, link_groups, snapshot

from mmfs import manual

# -P: ``python -m`` would list the current directory (DIR) for modules, which sets
# its atime; the installed ``mmfs`` script does not.
RUN = [sys.executable, "-P", "-m", "mmfs", "run"]
TESTS = Path(__file__).resolve().parent
NOBODY = 65534
RUNTIME_PYTHON = "/opt/mmfs/bin/python"  # what nobody can run (scripts/install); the checkout's mmfs via PYTHONPATH
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def mmfs_run(*args: str, cwd: Path, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*RUN, *args], cwd=cwd, input=stdin, capture_output=True, timeout=timeout)


def one_line(stderr: bytes) -> str:
    """The single line of an error."""
    lines = stderr.decode().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert lines[0].startswith("mmfs run: "), lines[0]
    return lines[0]


def populate(root: Path) -> None:
    """Files, directories, a symlink, hard links and an xattr; then every time
    settles (a second in the past), so that a read would show in an atime."""
    (root / "a.txt").write_text("one\ntwo\n")
    (root / "b.txt").write_text("to delete\n")
    (root / "olddir").mkdir()
    (root / "olddir" / "x").write_text("x\n")
    (root / "sub").mkdir()
    (root / "sub" / "c.txt").write_text("c\n")
    (root / "sub" / "d.txt").write_text("read only\n")
    os.link(root / "sub" / "d.txt", root / "d-link")
    (root / "link").symlink_to("sub/c.txt")
    os.setxattr(root / "sub" / "c.txt", "user.tag", b"kept")
    past = time.time_ns() - 10**9
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(past - 10**9, past), follow_symlinks=False)  # atime before mtime: relatime would update it


def pristine(root: Path) -> dict[bytes, dict[str, object]]:
    """Everything of the tree, atimes and ctimes included (no readlink: it sets an atime)."""
    return snapshot(root, stats=ALL_STATS, content=file_digest, target=False)


def summary(stderr: bytes) -> list[str]:
    """The summary's lines: the header, then one per change."""
    return [line for line in stderr.decode().splitlines() if line.startswith(("mmfs run: ", "  "))]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "dir"
    root.mkdir()
    populate(root)
    return root


# --- what the command did, and DIR ------------------------------------------------------
EDITS = "sed -i s/one/ONE/ a.txt && rm b.txt && rm -r olddir && mkdir newdir && echo hi > newdir/f && " \
        "echo more >> sub/c.txt && cat sub/d.txt link >/dev/null && ls -R >/dev/null && echo done"


def test_edits_leave_dir_identical_and_the_summary_lists_them(tree: Path) -> None:
    before = pristine(tree)
    done = mmfs_run("--", "sh", "-c", EDITS, cwd=tree)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"done\n"  # the command's stdout, nothing else
    assert differences(before, pristine(tree)) == []
    assert summary(done.stderr) == [
        f"mmfs run: 8 changes in {tree}: 2 added, 3 deleted, 3 changed",
        "  M .", "  M a.txt", "  D b.txt", "  A newdir", "  A newdir/f", "  D olddir", "  D olddir/x", "  M sub/c.txt",
    ], done.stderr.decode()
    assert len(done.stderr.decode().splitlines()) == 9  # and no warning of the daemon's


def test_a_command_that_changes_nothing(tree: Path) -> None:
    before = pristine(tree)
    done = mmfs_run("--dir", str(tree), "cat", "sub/d.txt", cwd=tree)
    assert done.returncode == 0 and done.stdout == b"read only\n", done.stderr.decode()
    assert done.stderr.decode() == f"mmfs run: no changes in {tree}\n"
    assert differences(before, pristine(tree)) == []


def test_stdin_reaches_the_command_and_a_long_summary_is_cut(tree: Path, tmp_path: Path) -> None:
    script = "cat > got.txt && cat got.txt && for n in 1 2 3 4 5 6 7 8 9 10 11; do touch new$n; done"
    done = mmfs_run("--dir", "dir", "sh", "-c", f"cd dir && {script}", cwd=tmp_path, stdin=b"hello\n")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"hello\n"
    lines = summary(done.stderr)
    assert lines[0] == f"mmfs run: 13 changes in {tree}: 12 added, 0 deleted, 1 changed"
    assert lines[1:3] == ["  M .", "  A got.txt"] and len(lines) == 12
    assert lines[-1] == "  ... and 3 more"
    assert not (tree / "got.txt").exists()


# --- --keep -----------------------------------------------------------------------
# The command's own changes, then its view of the tree, recorded as JSON.
CHANGE_AND_RECORD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from support.trees import snapshot, file_digest, link_groups
os.unlink("b.txt")
os.rename("olddir", "moved")
with open("a.txt", "r+") as f:
    f.seek(4)
    f.write("TWO")
os.chmod("sub/c.txt", 0o600)
os.setxattr("sub/c.txt", "user.tag", b"changed")
os.mkdir("new")
with open("new/file", "wb") as f:
    f.write(os.urandom(100000))
os.link("new/file", "new/second-name")
os.symlink("../a.txt", "new/link")
os.unlink("d-link")
os.utime("sub/d.txt", ns=(1, 10**18))
tree = snapshot(b".", stats=sys.argv[3].split(","), content=file_digest)
groups = [sorted(map(os.fsdecode, group)) for group in link_groups(b".")]
with open(sys.argv[2], "w") as out:
    json.dump({"tree": {os.fsdecode(k): v for k, v in tree.items()}, "links": sorted(groups)}, out, default=os.fsdecode)
"""
VIEW_STATS = ("type", "mode", "uid", "gid", "size", "nlink", "rdev", "mtime_ns")


def test_keep_is_an_upper_directory_that_reproduces_the_command_view(tree: Path, tmp_path: Path) -> None:
    before = pristine(tree)
    keep, view = tmp_path / "keep", tmp_path / "view.json"
    done = mmfs_run(
        "--keep", str(keep), "--", sys.executable, "-c", CHANGE_AND_RECORD, str(TESTS), str(view), ",".join(VIEW_STATS),
        cwd=tree,
    )
    assert done.returncode == 0, done.stderr.decode()
    kept = f"mmfs run: changes kept in {keep} (an overlayfs upper directory over {tree})"
    assert done.stderr.decode().splitlines()[-1] == kept
    assert differences(before, pristine(tree)) == []
    seen = json.loads(view.read_text())
    work, merged = tmp_path / "work", tmp_path / "merged"
    work.mkdir()
    merged.mkdir()
    options = f"lowerdir={tree},upperdir={keep},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        got = snapshot(merged, stats=VIEW_STATS, content=file_digest)
        links = sorted(sorted(map(os.fsdecode, group)) for group in link_groups(merged))
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    want = {os.fsencode(path): entry for path, entry in seen["tree"].items()}
    got = {path: json.loads(json.dumps(entry, default=os.fsdecode)) for path, entry in got.items()}  # targets as text

    def directory_size_or_links(path: bytes, field: str) -> bool:  # filesystems count those differently
        return field in ("size", "nlink") and stat.S_ISDIR(want.get(path, {}).get("type", 0))

    assert differences(want, got, directory_size_or_links, ("seen by the command", "kernel overlayfs")) == []
    assert links == seen["links"] == [["new/file", "new/second-name"]]


def test_keep_must_be_outside_dir_and_empty(tree: Path, tmp_path: Path) -> None:
    line = one_line(mmfs_run("--keep", "sub/keep", "true", cwd=tree).stderr)
    assert line == f"mmfs run: --keep sub/keep is inside {tree}: keep the changes outside it"
    assert not (tree / "sub" / "keep").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    done = mmfs_run("--keep", str(tmp_path / "full"), "touch", "y", cwd=tree)
    assert done.returncode == 1 and one_line(done.stderr) == f"mmfs run: --keep {tmp_path / 'full'}: not empty"
    assert not (tree / "y").exists()


# --- exit status and signals ----------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "status"),
    [(["sh", "-c", "exit 7"], 7), (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM), (["true"], 0)],
)
def test_the_exit_status_passes_through(tree: Path, command: list[str], status: int) -> None:
    done = mmfs_run("--", *command, cwd=tree)
    assert done.returncode == status, done.stderr.decode()


def test_a_command_that_cannot_run_is_127_or_126(tree: Path) -> None:
    missing = mmfs_run("no-such-command-here", cwd=tree)
    assert missing.returncode == 127
    assert one_line(missing.stderr) == "mmfs run: no-such-command-here: command not found"
    (tree / "not-executable").write_text("#!/bin/sh\n")
    refused = mmfs_run("./not-executable", cwd=tree)
    assert refused.returncode == 126
    assert one_line(refused.stderr) == "mmfs run: ./not-executable: Permission denied"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as raw:
        return [os.fsdecode(arg) for arg in raw.read().split(b"\0")[:-1]]


def runtime_dir_of(pid: int) -> Path:
    with open(f"/proc/{pid}/environ", "rb") as raw:
        variables = dict(item.split(b"=", 1) for item in raw.read().split(b"\0") if b"=" in item)
    return Path(os.fsdecode(variables[b"MMFS_RUNTIME_DIR"]))


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def daemons_of(pid: int) -> list[int]:
    """The children of ``pid`` that run an mmfs daemon (already executed)."""
    return [child for child in children(pid) if "overlay" in cmdline(child)]


def start_waiting_command(tree: Path, ready: Path, command: str) -> tuple[subprocess.Popen[bytes], int]:
    """``mmfs run`` of ``command``, in a process group of its own, once the command
    said it is ready; and its daemon's pid.  Meanwhile the overlay is checked to be
    its alone: the daemon has it mounted, the test does not see it."""
    run = subprocess.Popen([*RUN, "--", "sh", "-c", command], cwd=tree, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: ready.exists() or run.poll() is not None, 20), run.communicate()
    assert run.poll() is None, run.communicate()
    daemons = daemons_of(run.pid)
    assert len(daemons) == 1, [cmdline(pid) for pid in children(run.pid)]
    with open(f"/proc/{daemons[0]}/mountinfo", "rb") as table:
        assert f" {tree} ".encode() in table.read()  # mounted in the daemon's namespace
    assert not is_mounted(tree)  # not in ours
    assert not (tree / "inside").exists()  # what the command wrote is its own
    return run, daemons[0]


def test_sigterm_reaches_the_command_and_the_cleanup_happens(tree: Path, tmp_path: Path) -> None:
    ready, caught = tmp_path / "ready", tmp_path / "caught"
    command = f"trap 'echo TERM > {caught}; exit 5' TERM; touch inside {ready}; while :; do sleep 0.02; done"
    run, daemon = start_waiting_command(tree, ready, command)
    runtime = runtime_dir_of(daemon)
    assert runtime.is_dir()
    os.kill(run.pid, signal.SIGTERM)
    _, stderr = run.communicate(timeout=20)
    assert run.returncode == 5, stderr.decode()
    assert caught.read_text() == "TERM\n"
    assert "A inside" in stderr.decode()
    assert is_gone(daemon) and not runtime.exists()


def test_ctrl_c_reaches_the_command_and_the_cleanup_happens(tree: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    run, daemon = start_waiting_command(tree, ready, f"touch inside {ready}; exec sleep 60")
    runtime = runtime_dir_of(daemon)
    os.killpg(run.pid, signal.SIGINT)  # what the terminal does: the whole foreground process group
    _, stderr = run.communicate(timeout=20)
    assert run.returncode == 128 + signal.SIGINT, stderr.decode()
    assert "A inside" in stderr.decode()
    assert is_gone(daemon) and not runtime.exists()


def test_what_the_command_left_running_loses_the_overlay(tree: Path, tmp_path: Path) -> None:
    """A process still in the overlay after COMMAND: detached, the daemon stopped."""
    leftover = tmp_path / "leftover"
    done = mmfs_run("sh", "-c", f"cd sub && (sleep 60 >/dev/null 2>&1 & echo $! > {leftover})", cwd=tree)
    try:
        assert done.returncode == 0, done.stderr.decode()
        assert f"mmfs run: {tree} is still in use (by what COMMAND left running): detached" in done.stderr.decode()
        assert f"mmfs run: no changes in {tree}" in done.stderr.decode()
    finally:
        os.kill(int(leftover.read_text()), signal.SIGKILL)


def test_options_reach_the_daemon(tree: Path) -> None:
    done = mmfs_run("-o", "ro", "--", "sh", "-c", "echo x > new 2>/dev/null || exit 9", cwd=tree)
    assert done.returncode == 9, done.stderr.decode()
    assert not (tree / "new").exists()


def test_sigterm_while_the_daemon_starts(tree: Path) -> None:
    """SIGTERM as soon as the daemon is there (most likely before it has mounted):
    exit status 143, nothing left, no other message."""
    run = subprocess.Popen([*RUN, "sleep", "30"], cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: run.poll() is not None or bool(daemons_of(run.pid)), 20, interval=0.002)
    [daemon] = daemons_of(run.pid)
    runtime = runtime_dir_of(daemon)
    os.kill(run.pid, signal.SIGTERM)
    _, stderr = run.communicate(timeout=20)
    assert run.returncode == 128 + signal.SIGTERM
    assert stderr.decode() in ("", f"mmfs run: no changes in {tree}\n")
    assert is_gone(daemon) and not runtime.exists()


# --- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dir", "missing", "true"], "mmfs run: no such directory: {tree}/missing"),
        (["--dir", "a.txt", "true"], "mmfs run: not a directory: {tree}/a.txt"),
        (["--dir", str(ROOT), "true"], f"mmfs run: cannot overlay {ROOT}: mmfs runs from {ROOT}, "
                                       "which its daemon would then read through its own mount"),
        (["-o"], "mmfs run: option -o needs a value"),
        (["--bogus", "true"], "mmfs run: unknown argument: '--bogus' (see mmfs run --help)"),
        (["--"], "mmfs run: no COMMAND given: " + manual.VERBS["run"].synopsis),
        (["-o", "size=1g,bogus", "true"], "mmfs run: unknown option: 'bogus'"),
    ],
)
def test_bad_input_is_one_line(tree: Path, args: list[str], message: str) -> None:
    done = mmfs_run(*args, cwd=tree)
    assert done.returncode == 1
    assert one_line(done.stderr) == message.format(tree=tree)


def test_an_mmfs_mount_already_there_is_refused_not_used(mmfs_factory: Callable[..., Mount]) -> None:
    mounted = mmfs_factory().path
    (mounted / "file").write_text("the tmpfs mount's\n")
    done = mmfs_run("cat", "file", cwd=mounted)
    assert done.returncode == 1 and done.stdout == b""
    assert one_line(done.stderr) == f"mmfs run: already mounted: {mounted}"


# --- as a normal user ---------------------------------------------------------------------
@pytest.fixture
def nobody_tree() -> Iterator[Path]:
    """A tree in a directory nobody can reach and owns."""
    base = Path(tempfile.mkdtemp(prefix="mmfs-run-test-"))
    try:
        os.chmod(base, 0o755)
        (base / "dir").mkdir()
        populate(base / "dir")
        for path in [base, *base.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        yield base / "dir"
    finally:
        shutil.rmtree(base)


def symlink_atimes(tree: dict[bytes, dict[str, object]]) -> Callable[[bytes, str], bool]:
    """Leave out the atimes of symlinks: without privilege the daemon cannot make
    its view of DIR noatime (a user namespace may not change the atime flags of
    the mounts it was given), and reading a symlink's target when its directory
    is listed sets its atime; files are opened O_NOATIME where the kernel allows."""
    return lambda rel, field: field == "atime_ns" and tree[rel]["type"] == stat.S_IFLNK


def as_nobody(tree: Path, *args: str, outer: list[str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``mmfs run ARGS`` as nobody (uid and gid 65534, no groups), in ``tree``,
    run through ``outer`` (a command that ends by running its arguments)."""
    env = {"PATH": PATH_ENV, "PYTHONPATH": str(ROOT), "LANG": "C.UTF-8"}
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    command = [*(outer or []), *setpriv, RUNTIME_PYTHON, "-P", "-m", "mmfs", "run", *args]
    return subprocess.run(command, cwd=tree, env=env, capture_output=True, timeout=30)


def nobody_may(*command: str) -> bool:
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command],
                          capture_output=True, timeout=10)
    return done.returncode == 0


def test_as_nobody_on_this_machine_it_works_or_says_why_not(nobody_tree: Path) -> None:
    """Whichever this machine does: both facts are probed independently."""
    user_namespaces = nobody_may("unshare", "--user", "--mount", "true")
    fuse = nobody_may("sh", "-c", "exec 3<>/dev/fuse")
    before = pristine(nobody_tree)
    done = as_nobody(nobody_tree, "--", "sh", "-c", "echo new > new.txt")
    works = user_namespaces and fuse
    if works:
        assert done.returncode == 0, done.stderr.decode()
        assert "  A new.txt" in summary(done.stderr)
    else:
        assert done.returncode == 1
        why = "cannot open /dev/fuse: Permission denied" if user_namespaces else "without root, mmfs run needs a user"
        assert one_line(done.stderr).startswith(f"mmfs run: {why}")
    assert differences(before, pristine(nobody_tree), symlink_atimes(before) if works else None) == []


def test_as_nobody_with_user_namespaces_and_fuse_allowed(nobody_tree: Path, tmp_path: Path) -> None:
    """A machine where normal users may use /dev/fuse, made in a mount namespace
    of the test's own: a node 0666 bound over /dev/fuse there."""
    node = tmp_path / "fuse"
    fuse = os.stat("/dev/fuse")
    os.mknod(node, 0o666 | stat.S_IFCHR, fuse.st_rdev)
    os.chmod(node, 0o666)
    permissive = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  f"mount --bind {node} /dev/fuse && exec \"$@\"", "sh"]
    keep = nobody_tree.parent / "keep"
    before = pristine(nobody_tree)
    done = as_nobody(nobody_tree, "--keep", str(keep), "--", "sh", "-c", "id -u > id; cat sub/d.txt", outer=permissive)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"read only\n"
    assert summary(done.stderr)[:3] == [f"mmfs run: 2 changes in {nobody_tree}: 1 added, 0 deleted, 1 changed",
                                        "  M .", "  A id"]
    assert differences(before, pristine(nobody_tree), symlink_atimes(before)) == []
    kept = keep / "id"
    assert kept.read_text() == f"{NOBODY}\n"  # the command ran as the caller, not as root of its namespace
    assert (kept.stat().st_uid, kept.stat().st_gid) == (NOBODY, NOBODY)


def test_as_nobody_where_user_namespaces_are_refused(nobody_tree: Path) -> None:
    """A user namespace whose limit of nested ones is 0, where the test is
    nobody without capabilities: what a system that refuses them looks like."""
    refusing = ["unshare", "--user", f"--map-user={NOBODY}", f"--map-group={NOBODY}", "--keep-caps", "sh", "-c",
                'echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --inh-caps=-all --ambient-caps=-all "$@"',
                "sh"]
    done = subprocess.run([*refusing, RUNTIME_PYTHON, "-P", "-m", "mmfs", "run", "true"], cwd=nobody_tree,
                          env={"PATH": PATH_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=30)
    assert done.returncode == 1
    assert one_line(done.stderr) == ("mmfs run: without root, mmfs run needs a user namespace; the system refuses "
                                     "one (the limit in /proc/sys/user/max_user_namespaces)")


def test_help() -> None:
    done = subprocess.run([*RUN, "--help"], capture_output=True, timeout=30)
    assert done.returncode == 0 and done.stdout.decode().startswith("usage: mmfs run "), done.stderr.decode()



def test_mounts_unmounted_outside_end_while_a_run_goes_on(tree: Path, tmp_path: Path) -> None:
    """The run's mounts are slaves: an unmount made outside reaches its copy of a
    shared mount, so another mmfs mount unmounted meanwhile ends its daemon at
    once instead of living on in the run's namespace until the run ends.  (Where
    the mount holding it is private, as "/" is in some containers, the kernel
    has no way to tell the copy; hence the shared tmpfs made here.)"""
    with mounted_kernel_tmpfs(tmp_path / "shared", "size=1m") as shared:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        (shared / "mnt").mkdir()
        other = start_mmfs(shared / "mnt", tmp_path / "other.log", "tmpfs")
        ready = tmp_path / "ready"
        run, _ = start_waiting_command(tree, ready, f"touch {ready}; exec sleep 60")
        try:
            stop_mmfs(other)  # unmounts, and requires the daemon to exit 0 within seconds
            assert run.poll() is None
        finally:
            os.killpg(run.pid, signal.SIGTERM)
            run.communicate(timeout=20)
