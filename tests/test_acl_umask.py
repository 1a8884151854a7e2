"""Never more permission than asked for: the umask, default ACLs and setgid, against kernel tmpfs.

A new entry gets the mode asked for less the umask, unless its directory has a
default ACL, which rules instead of the umask (posix_acl_create).  mmfs asks the
kernel for FUSE_DONT_MASK (pyfuse3 with patches/pyfuse3-init-capabilities.patch) so it
sees the mode asked for and the umask, and decides as tmpfs does.  Without the
patch the kernel applies the umask first, and mmfs must still never give more
than that mode allows.  Setting an access ACL clears the setgid bit when the
caller is neither in the file's group nor privileged (posix_acl_update_mode).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.trees import snapshot

NOBODY = 65534
UMASKS = (0o022, 0o077, 0o722)
MODES = (0o600, 0o644, 0o666, 0o700, 0o777)
DEFAULT_ACLS = {
    "none": None,
    "issue": "u::r-x,g::---,o::---",
    "open": "u::rwx,g::rwx,o::rwx",
    "mask": "u::rw-,u:1234:rwx,g::r-x,g:2345:-wx,m::rwx,o::r--",
}
# The daemon as an unpatched pyfuse3 runs it: the kernel applies the umask.
WITHOUT_DONT_MASK = [
    sys.executable,
    "-c",
    "import sys; from mmfs import fuse_ops; fuse_ops.Operations.enable_dont_mask = False; "
    "from mmfs.cli import main; sys.exit(main())",
]


def run(*args: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run([str(a) for a in args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def acls(root: Path) -> dict[str, str]:
    """getfacl of every entry under ``root``, by relative path."""
    listing = run("getfacl", "-R", "-p", ".", cwd=root)
    blocks = {}
    for block in listing.strip().split("\n\n"):
        header, _, body = block.partition("\n")
        assert header.startswith("# file: "), block
        blocks[header.removeprefix("# file: ")] = body
    return blocks


def modes(root: Path) -> dict[str, str]:
    """ls -l's mode of every entry under ``root``, by relative path."""
    tree = snapshot(root, stats=("mode",), target=False, xattrs=False)
    return {os.fsdecode(rel): stat.filemode(int(entry["mode"], 8)) for rel, entry in tree.items() if rel}


def make(name: str, kind: str, mode: int) -> None:
    if kind == "file":
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    elif kind == "dir":
        os.mkdir(name, mode)
    else:
        os.mkfifo(name, mode)


def populate(root: Path) -> None:
    """Every umask x mode x kind, in a directory per default ACL."""
    old_cwd, old_umask = os.getcwd(), os.umask(0o022)
    try:
        for label, default_acl in DEFAULT_ACLS.items():
            directory = root / label
            directory.mkdir()
            if default_acl is not None:
                run("setfacl", "-d", "-m", default_acl, directory)
            os.chdir(directory)
            for umask in UMASKS:
                os.umask(umask)
                for mode in MODES:
                    for kind in ("file", "dir", "fifo"):
                        make(f"{kind}-{mode:o}-umask{umask:03o}", kind, mode)
                os.umask(0o022)
    finally:
        os.umask(old_umask)
        os.chdir(old_cwd)


def differences(mine: dict[str, str], oracle: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {k: (mine.get(k), oracle.get(k)) for k in sorted(set(mine) | set(oracle)) if mine.get(k) != oracle.get(k)}


def test_the_issue_case(mnt: Path, kernel_tmpfs: Path) -> None:
    """umask 0722, open(O_CREAT, 0600) under default ACL u::r-x,g::---,o::---: r-------- (not r-x------)."""
    old = os.umask(0o022)
    try:
        for root in (kernel_tmpfs, mnt):
            run("setfacl", "-d", "-m", "u::r-x,g::---,o::---", root / ".")
            os.umask(0o722)
            os.close(os.open(root / "f", os.O_CREAT | os.O_WRONLY, 0o600))
            os.umask(0o022)
    finally:
        os.umask(old)
    assert stat.filemode(os.stat(kernel_tmpfs / "f").st_mode) == "-r--------"
    assert stat.filemode(os.stat(mnt / "f").st_mode) == "-r--------"


def test_umask_and_default_acls_like_tmpfs(mnt: Path, kernel_tmpfs: Path) -> None:
    populate(kernel_tmpfs)
    populate(mnt)
    assert differences(modes(mnt), modes(kernel_tmpfs)) == {}
    assert differences(acls(mnt), acls(kernel_tmpfs)) == {}


def test_without_dont_mask_never_more_than_tmpfs(
    mmfs_factory: Callable[..., object], kernel_tmpfs: Path
) -> None:
    """Where the kernel applies the umask (an unpatched pyfuse3), a default ACL
    never adds back bits the umask took: every entry gets at most tmpfs's bits."""
    mount = mmfs_factory(program=WITHOUT_DONT_MASK)
    root = mount.path  # type: ignore[attr-defined]
    populate(kernel_tmpfs)
    populate(root)
    mine, oracle = modes(root), modes(kernel_tmpfs)
    assert mine.keys() == oracle.keys()
    more = {}
    for name in mine:
        have = stat.S_IMODE(os.lstat(root / name).st_mode)
        allowed = stat.S_IMODE(os.lstat(kernel_tmpfs / name).st_mode)
        if have & ~allowed:
            more[name] = (oct(have), oct(allowed))
    assert more == {}
    # what stays different: under a default ACL the umask still took bits
    assert stat.filemode(os.lstat(root / "issue" / "file-600-umask722").st_mode) == "----------"
    assert stat.filemode(os.lstat(kernel_tmpfs / "issue" / "file-600-umask722").st_mode) == "-r--------"
    # without a default ACL it is exact
    none = {k: v for k, v in mine.items() if k.startswith("none")}
    assert none == {k: v for k, v in oracle.items() if k.startswith("none")}


# --- setgid through an ACL -----------------------------------------------------


def as_nobody(root: Path, *command: str, groups: str = "") -> None:
    ids = ["--reuid", str(NOBODY), "--regid", str(NOBODY)]
    ids += ["--groups", groups] if groups else ["--clear-groups"]
    subprocess.run(["setpriv", *ids, *command], cwd=root, check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize(
    ("extended", "command"),
    [
        (False, ("-m", "u::rwx,g::r-x,o::rwx")),
        (False, ("-m", "u:1234:r-x")),
        (False, ("-m", "m::r-x")),
        (True, ("-m", "u:1234:r--")),
        (True, ("-x", "u:1234")),
        (True, ("-b",)),
    ],
    ids=["equivalent", "named-user", "mask", "change", "remove-entry", "remove-all"],
)
def test_setfacl_clears_setgid_like_tmpfs(
    mmfs_factory: Callable[..., object], kernel_tmpfs: Path, extended: bool, command: tuple[str, ...]
) -> None:
    """The owner, not in the file's group, sets an access ACL: setgid goes (as chmod
    clears it); in the file's group (also through a supplementary group) it stays;
    root keeps it."""
    mount = mmfs_factory(options="size=64m,allow_other")
    root_of_mount: Path = mount.path  # type: ignore[attr-defined]
    names = ("root-group", "other-group", "own-group", "supplementary", "by-root")
    for root in (kernel_tmpfs, root_of_mount):
        for name, gid in zip(names, (0, 1234, NOBODY, 1234, 1234), strict=True):
            path = root / name
            path.write_bytes(b"#!/bin/sh\n")
            os.chown(path, NOBODY, gid)
            if extended:
                run("setfacl", "-m", "u:1234:rwx", path)
            os.chmod(path, 0o2777)
        for name in ("root-group", "other-group", "own-group"):
            as_nobody(root, "setfacl", *command, name)
        as_nobody(root, "setfacl", *command, "supplementary", groups="1234")
        run("setfacl", *command, "by-root", cwd=root)
    mine, oracle = modes(root_of_mount), modes(kernel_tmpfs)
    assert differences(mine, oracle) == {}
    assert differences(acls(root_of_mount), acls(kernel_tmpfs)) == {}
    assert {name: bool(os.stat(kernel_tmpfs / name).st_mode & stat.S_ISGID) for name in names} == {
        "root-group": False, "other-group": False, "own-group": True, "supplementary": True, "by-root": True
    }
