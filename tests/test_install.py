"""mmfs as scripts/install leaves it: a tool for every user, not a checkout.

scripts/test runs scripts/install before the suite, so these tests look at
what is installed on the machine: ``mmfs`` on the PATH (what mount(8) and
fstab run too), the runtime environment in /opt/mmfs and the manual page
mmfs(8).  They run programs as user nobody (runuser), who can read neither
root's home nor, as a rule, a checkout of root's.

The runtime must hold a copy of the checkout, not a link to it, and only mmfs
and what it needs to run; and it must hold this checkout's code, or the
mount(8) and fstab tests test an older mmfs than the rest of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, wait_for
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

RUNTIME = Path("/opt/mmfs")
PYTHON = RUNTIME / "bin" / "python"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAN_PAGE = Path("/usr/local/share/man/man8/mmfs.8")
NOBODY_UID = 65534


def as_nobody(*command: str, home: str = "/nonexistent", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as nobody in "/" with a clean environment and the usual PATH."""
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "-i", f"PATH={PATH}", f"HOME={home}", "LANG=C.UTF-8", *command],
        cwd="/", capture_output=True, text=True, timeout=timeout,
    )


def runtime_python(code: str) -> str:
    """Run ``code`` with the runtime's interpreter, isolated from the checkout."""
    done = subprocess.run([str(PYTHON), "-I", "-c", code], cwd="/", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def site_packages() -> Path:
    return Path(runtime_python("import sysconfig; print(sysconfig.get_path('purelib'))").strip())


def is_under(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def test_mmfs_on_the_path_runs_from_the_runtime_with_the_system_python() -> None:
    found = shutil.which("mmfs", path=PATH)
    assert found == "/usr/local/bin/mmfs"
    script = Path(found).resolve()
    assert script == RUNTIME / "bin" / "mmfs"
    shebang = script.read_text().splitlines()[0]
    assert shebang == f"#!{PYTHON}", shebang
    interpreter = PYTHON.resolve()
    assert interpreter == Path("/usr/bin/python3").resolve()
    for place in (Path("/root"), ROOT, Path.home()):
        assert not is_under(interpreter, place) and not is_under(script, place), (interpreter, place)


def test_nobody_runs_mmfs_and_its_python() -> None:
    helped = as_nobody("mmfs", "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: mmfs"), helped.stdout
    imported = as_nobody(str(PYTHON), "-I", "-c", "import mmfs.cli, pyfuse3, trio; print(mmfs.__file__)")
    assert imported.returncode == 0, imported.stderr
    assert is_under(Path(imported.stdout.strip()), site_packages() / "mmfs"), imported.stdout


def test_installed_mmfs_is_a_copy_not_a_link_to_the_checkout() -> None:
    site = site_packages()
    assert is_under(site, RUNTIME)
    where = Path(runtime_python("import mmfs; print(mmfs.__file__)").strip())
    assert where == site / "mmfs" / "__init__.py"
    assert not is_under(where, ROOT)
    assert not list(site.glob("__editable__*")), "an editable install"
    for pth in site.glob("*.pth"):
        assert str(ROOT) not in pth.read_text(), pth
    direct_url = json.loads(runtime_python(
        "import importlib.metadata as m; print(m.distribution('mmfs').read_text('direct_url.json') or '{}')"
    ))
    assert not direct_url.get("dir_info", {}).get("editable"), direct_url


def test_installed_mmfs_is_this_checkouts_code() -> None:
    """The runtime holds the checkout's mmfs/*.py as they are now: run scripts/install after a change."""
    installed = site_packages() / "mmfs"
    ours = {path.name: path.read_bytes() for path in (ROOT / "mmfs").glob("*.py")}
    theirs = {path.name: path.read_bytes() for path in installed.glob("*.py")}
    differ = sorted(name for name in ours.keys() | theirs.keys() if ours.get(name) != theirs.get(name))
    assert not differ, f"the installed mmfs ({installed}) is not this checkout's, run scripts/install: {differ}"


RUNTIME_DISTRIBUTIONS = """
import json
from importlib.metadata import distributions
from pip._vendor.packaging.markers import default_environment
print(json.dumps({
    "environment": default_environment(),
    "requires": {d.metadata["Name"]: d.requires or [] for d in distributions()},
}))
"""


def test_runtime_holds_only_mmfs_and_what_it_needs_to_run() -> None:
    found = json.loads(runtime_python(RUNTIME_DISTRIBUTIONS))
    environment = {**found["environment"], "extra": ""}
    requires: dict[str, list[str]] = {canonicalize_name(name): lines for name, lines in found["requires"].items()}
    needed: set[str] = set()
    todo = ["mmfs"]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        for line in requires.get(name, []):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(canonicalize_name(requirement.name))
    installed = set(requires)
    assert {"mmfs", "pyfuse3", "trio"} <= installed
    assert not installed & {"pytest", "pytest-timeout", "mypy", "ruff"}
    # pip and setuptools: the venv's own, which scripts/install uses to reinstall mmfs
    assert installed - needed <= {"pip", "setuptools"}, sorted(installed - needed)


NOBODY_MOUNTS = r"""
home=$1  # a directory of nobody's
device=$2  # a 0666 device node for FUSE, if /dev/fuse is not one
if [ -n "$device" ]; then mount --bind "$device" /dev/fuse; fi  # in this mount namespace only
cd /
nobody() { runuser -u nobody -- env -i PATH="$PATH" HOME="$home" XDG_STATE_HOME="$home/state" LANG=C.UTF-8 "$@"; }
nobody mmfs tmpfs "$home/mnt" -o size=10m
grep " $home/mnt " /proc/self/mounts
nobody sh -c 'echo written by nobody >"$0/mnt/file" && cat "$0/mnt/file"' "$home"
nobody fusermount3 -u "$home/mnt"
echo unmounted
"""


def mmfs_daemons(mountpoint: Path) -> set[int]:
    """Pids with ``mountpoint`` as one of their arguments."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if str(mountpoint).encode() in cmdline.read().split(b"\0"):
                    pids.add(int(entry))
        except (OSError, ValueError):
            pass
    return pids


def test_nobody_mounts_and_unmounts_with_the_installed_mmfs() -> None:
    """With fusermount3 setuid root, as Debian ships it, any user can mount.

    The mount is made in a private mount namespace, so that a failure leaves
    nothing mounted for the rest of the machine.  Where /dev/fuse is root's
    alone (some containers; udev makes it 0666), a 0666 node for the same
    device is bound over it in that namespace.
    """
    fusermount = shutil.which("fusermount3", path=PATH)
    assert fusermount is not None
    info = os.stat(fusermount)
    if not (info.st_mode & stat.S_ISUID and info.st_uid == 0):
        pytest.skip("fusermount3 is not setuid root: only root can mount FUSE on this machine")
    home = Path(tempfile.mkdtemp(prefix="mmfs-nobody-"))
    mountpoint = home / "mnt"
    try:
        mountpoint.mkdir()
        os.chown(home, NOBODY_UID, NOBODY_UID)
        os.chown(mountpoint, NOBODY_UID, NOBODY_UID)
        device = ""
        fuse = os.stat("/dev/fuse")
        if fuse.st_mode & 0o006 != 0o006:
            device = str(home / "fuse")
            os.mknod(device, stat.S_IFCHR | 0o666, fuse.st_rdev)
            os.chmod(device, 0o666)
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-euc", NOBODY_MOUNTS, "sh", str(home), device],
            capture_output=True, text=True, timeout=60, env={"PATH": PATH},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        line, written, unmounted = done.stdout.splitlines()
        source, target, kind, options = line.split()[:4]
        assert (source, target, kind) == ("tmpfs", str(mountpoint), "fuse.mmfs"), line
        assert f"user_id={NOBODY_UID}" in options.split(","), line
        assert (written, unmounted) == ("written by nobody", "unmounted")
        assert wait_for(lambda: not mmfs_daemons(mountpoint)), "the daemon did not exit after fusermount3 -u"
        log = (home / "state" / "mmfs" / "mmfs.log").read_text()
        assert "Traceback" not in log and " ERROR " not in log, log
    finally:
        for pid in mmfs_daemons(mountpoint):  # nobody's daemon, started by this test
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home)


def test_man_mmfs_for_every_user() -> None:
    if not (ROOT / "mmfs" / "manual.py").exists():
        pytest.skip("mmfs/manual.py is not written yet")
    source = subprocess.run([str(PYTHON), "-I", "-m", "mmfs.manual"], cwd="/", capture_output=True, text=True,
                            timeout=30, check=True).stdout
    assert MAN_PAGE.read_text() == source
    assert MAN_PAGE.stat().st_mode & 0o777 == 0o644
    where = as_nobody("man", "-w", "mmfs")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve() == MAN_PAGE.resolve(), where.stdout  # /usr/local/man is a link
    page = as_nobody("man", "-P", "cat", "mmfs")
    assert page.returncode == 0, page.stderr
    assert "NAME" in page.stdout and "mmfs" in page.stdout, page.stdout


@pytest.mark.parametrize("python", [PYTHON, ROOT / ".venv" / "bin" / "python"], ids=["runtime", "dev"])
def test_pyfuse3_carries_the_init_capabilities_patch(python: Path) -> None:
    """patches/install-pyfuse3 (run by scripts/install and scripts/test) built
    pyfuse3 with patches/pyfuse3-init-capabilities.patch: Operations.enable_dont_mask
    and Operations.enable_auto_inval_data."""
    code = (
        "import pyfuse3; names = vars(pyfuse3.Operations); "
        "print(pyfuse3.__version__, {'enable_dont_mask', 'enable_auto_inval_data'} <= set(names))"
    )
    done = subprocess.run([str(python), "-I", "-c", code], cwd="/", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3.5.0", "True"], done.stdout
