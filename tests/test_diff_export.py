"""``mmfs diff`` and ``mmfs export`` on real mounts, changed by real tools.

LOWERDIR, the exported upper directory and kernel overlayfs's work directory
share one kernel tmpfs: overlayfs then shows each file's own inode number, so
the hard-link groups of its tree are comparable.  The oracle is kernel
overlayfs over LOWERDIR and the export: it must show the tree the mmfs mount
shows.  LOWERDIR is compared bit for bit (atimes included) before the kernel
overlay is mounted (which reads it: directory atimes).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Mount, mmfs_command, mounted_kernel_tmpfs
from support.differential import Side, operations, run_differential
from support.trees import ALL_STATS, Tree, differences, extents_digest, file_digest, join, snapshot
from support.trees import compare_trees as compare
from test_overlay import GENERATORS, OverlayDraw, freeze
from test_overlay import build_lower as build_rich_lower

Factory = Callable[..., Mount]
MiB = 1 << 20
RANDOM_STEPS = 400
OLD_NS = 1_000_000_000 * 10**9


def mmfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mmfs_command(*map(str, args)), capture_output=True, text=True, timeout=60)


def sh(cwd: Path, *commands: str) -> None:
    for command in commands:
        subprocess.run(command, shell=True, cwd=cwd, check=True)


def build_lower(root: Path) -> None:
    """Files, directories, symlinks, hard links, xattrs, an ACL, a fifo, a sparse file."""
    for directory in ("texts", "docs", "data", "bin", "tree/sub/deep", "stage/inner", "target", "links",
                      "misc", "odd", "other", "sub"):
        (root / directory).mkdir(parents=True)
    (root / "texts" / "a.txt").write_bytes(b"foo line\n" * 5)
    (root / "texts" / "b.txt").write_bytes(b"untouched foo\n")
    (root / "docs" / "old.txt").write_bytes(b"old name\n")
    (root / "docs" / "readme").write_bytes(b"read me\n")
    (root / "docs" / "dated").write_bytes(b"dated\n")
    (root / "data" / "file").write_bytes(b"linked\n" * 100)
    (root / "other" / "file-twin").hardlink_to(root / "data" / "file")
    (root / "data" / "big").write_bytes(os.urandom(MiB))
    with open(root / "data" / "sparse.img", "wb") as sparse:
        sparse.truncate(8 * MiB)
        sparse.seek(MiB)
        sparse.write(b"island" * 1000)
    (root / "data" / "acl-file").write_bytes(b"acl\n")
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin" / "tool", 0o4755)
    (root / "tree" / "y").write_bytes(b"y\n")
    (root / "tree" / "sub" / "deep" / "x").write_bytes(b"x\n")
    (root / "stage" / "inner" / "s").write_bytes(b"staged\n")
    (root / "stage" / "top").write_bytes(b"top\n")
    (root / "sub" / "keep").write_bytes(b"keep\n")
    os.symlink("target1", root / "links" / "l")
    os.symlink("elsewhere", root / "links" / "keep")
    os.mkfifo(root / "misc" / "fifo")
    os.mkfifo(root / "misc" / "fifo2")
    os.setxattr(root / "docs" / "readme", b"user.comment", b"lower")
    os.setxattr(root / "docs" / "old.txt", b"user.tag", b"moves along")
    os.setxattr(root / "texts" / "b.txt", b"user.tag", b"to remove")
    os.setxattr(root / "stage", b"user.dir", b"a directory's xattr")
    sh(root, "setfacl -m u:1234:r data/acl-file", "setfacl -d -m g:4321:rx docs")
    for rel in snapshot(root, stats=(), target=False, xattrs=False):  # old times: any change is a new mtime
        os.utime(join(root, rel), ns=(OLD_NS, OLD_NS), follow_symlinks=False)


CHANGES = (
    "sed -i s/foo/bar/ texts/a.txt",
    "mv docs/old.txt docs/new.txt",
    "rm -r tree",
    "ln data/file data/file-link",
    "chmod 600 bin/tool",
    "setfattr -n user.new -v 1 docs/readme",
    "setfattr -x user.tag texts/b.txt",
    "truncate -s 100 data/big",
    "mkdir newdir && echo hi > newdir/x",
    "touch -d '2001-02-03 04:05:06' docs/dated",
    "ln -sfn target2 links/l",
    "setfacl -m u:4321:rw data/acl-file",
    "printf odd > \"$(printf 'odd/\\377name')\"",
    "mv sub moved",
    "mv -T stage target",
    # A page of the island: a write into a hole of a lower file on tmpfs fills
    # that hole in LOWERDIR (shmem's fault on a private map; reported, not ours here).
    "dd if=/dev/urandom of=data/sparse.img bs=4096 seek=256 count=1 conv=notrunc status=none",
    "rm misc/fifo2",
)

EXPECTED = """\
M .
M bin/tool
M data
M data/acl-file
M data/big
M data/file
A data/file-link
M data/sparse.img
M docs
M docs/dated
A docs/new.txt
D docs/old.txt
M docs/readme
M links
M links/l
M misc
D misc/fifo2
A moved
A moved/keep
A newdir
A newdir/x
M odd
A "odd/\\377name"
M other/file-twin
D stage
D stage/inner
D stage/inner/s
D stage/top
D sub
D sub/keep
M target
A target/inner
A target/inner/s
A target/top
M texts
M texts/a.txt
M texts/b.txt
D tree
D tree/sub
D tree/sub/deep
D tree/sub/deep/x
D tree/y
"""


@contextmanager
def kernel_overlay(base: Path, lower: Path, upper: Path) -> Iterator[Path]:
    """Kernel overlayfs of ``lower`` and ``upper``, unmounted after."""
    work, merged = base / "work", base / "merged"
    work.mkdir()
    merged.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    try:
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def lower_snapshot(root: Path) -> dict[bytes, dict[str, object]]:
    """Everything about LOWERDIR, atimes included (no readlink: it would set a symlink's atime)."""
    return snapshot(root, stats=ALL_STATS, content=extents_digest, target=False)


def compare_with_kernel_overlay(merged: Path, mount: Mount, label: str) -> None:
    """The kernel overlay of LOWERDIR and the export shows what the mount shows.

    Directories: their link counts and sizes are each filesystem's own
    (overlayfs counts a merged directory's links and entries its way), and
    st_blocks of a copied file holds the pages written, which is mmfs's
    business.  Atimes and ctimes are never the same across filesystems."""

    def skip(rel: bytes, key: str) -> bool:
        directory = stat.S_ISDIR(os.lstat(join(merged, rel)).st_mode)
        return key == "blocks" or directory and key in ("nlink", "size")

    stats = ("type", "mode", "uid", "gid", "size", "nlink", "rdev", "blocks", "mtime_ns")
    compare(merged, mount.path, label, stats=stats, skip=skip, labels=("kernel overlayfs", "mmfs"))


def test_diff_and_export_of_changes_made_by_real_tools(mmfs_factory: Factory, kernel_tmpfs: Path) -> None:
    lower, upper = kernel_tmpfs / "lower", kernel_tmpfs / "upper"
    build_lower(lower)
    before = lower_snapshot(lower)
    mount = mmfs_factory("overlay", str(lower), options="size=256m")
    sh(mount.path, *CHANGES)
    shown = mmfs("diff", mount.path)
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert shown.stdout == EXPECTED
    listed = mmfs("diff", mount.path, "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert [record["change"] + " " + record["path"] for record in records][:3] == ["M .", "M bin/tool", "M data"]
    odd = [record for record in records if "path_base64" in record]
    assert len(odd) == 1 and odd[0]["change"] == "A"
    assert base64.b64decode(odd[0]["path_base64"]) == b"odd/\xffname"

    exported = mmfs("export", mount.path, upper)
    assert exported.returncode == 0, exported.stderr
    assert "whiteouts 5" in exported.stdout and "hard_links 2" in exported.stdout, exported.stdout
    assert not differences(before, lower_snapshot(lower)), differences(before, lower_snapshot(lower))
    assert os.getxattr(upper / "target", b"trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(upper / "tree").st_mode) and not os.path.exists(upper / "tree" / "y")
    with kernel_overlay(kernel_tmpfs, lower, upper) as merged:
        compare_with_kernel_overlay(merged, mount, "export")


# --- random changes ---------------------------------------------------------------------
COMPARED = ("type", "mode", "uid", "gid", "rdev", "mtime_ns", "content", "target", "xattrs")  # and below


def differing_paths(lower: Tree, mounted: Tree) -> dict[str, set[bytes]]:
    """What a diff must say at least, from two snapshots: the paths only in
    one tree, and those whose compared fields differ (the link count of
    non-directories, and the size of regular files, count too)."""

    def changed(rel: bytes) -> bool:
        was, now = lower[rel], mounted[rel]
        keys = COMPARED + (("nlink", "size") if now["type"] != stat.S_IFDIR else ())
        return any(was.get(key) != now.get(key) for key in keys)

    return {
        "A": set(mounted.keys() - lower.keys()),
        "D": set(lower.keys() - mounted.keys()),
        "M": {rel for rel in lower.keys() & mounted.keys() if changed(rel)},
    }


def reported(mount: Mount) -> dict[str, set[bytes]]:
    """``mmfs diff --json``, by kind; the root as b"" (as in snapshots)."""
    listed = mmfs("diff", mount.path, "--json")
    assert listed.returncode == 0, listed.stderr
    found: dict[str, set[bytes]] = {"A": set(), "D": set(), "M": set()}
    for record in json.loads(listed.stdout):
        path = base64.b64decode(record["path_base64"]) if "path_base64" in record else record["path"].encode()
        found[record["change"]].add(b"" if path == b"." else path)
    return found


@pytest.mark.parametrize("seed", range(4))
def test_random_changes_diff_and_export(seed: int, tmp_path: Path, kernel_tmpfs: Path, mmfs_factory: Factory) -> None:
    """Seeded random operations (the overlay differential's, checked against a
    tmpfs copy on the way); then the diff holds every path that differs by its
    snapshot (and more only where content was written or another file took a
    name: a change the snapshot cannot see), and the export mounted with kernel
    overlayfs shows the mount's tree.  LOWERDIR is on tmp_path's filesystem: on
    tmpfs, a write into a hole of a lower file fills that hole in LOWERDIR."""
    lower = tmp_path / "lower"
    build_rich_lower(lower)
    baseline = freeze(lower, kernel_tmpfs)
    mount = mmfs_factory("overlay", str(lower), options="size=1g")
    oracle, subject = Side(kernel_tmpfs, stat_blocks=False), Side(mount.path, stat_blocks=False)
    run_differential(oracle, subject, operations(OverlayDraw(seed, oracle), GENERATORS, RANDOM_STEPS), seed)
    stats = ("type", "mode", "uid", "gid", "size", "nlink", "rdev", "mtime_ns")
    must = differing_paths(snapshot(lower, stats=stats, content=file_digest), snapshot(mount.path, stats=stats,
                                                                                       content=file_digest))
    found = reported(mount)
    assert (found["A"], found["D"]) == (must["A"], must["D"])
    assert must["M"] <= found["M"], sorted(must["M"] - found["M"])
    assert found["M"] <= baseline.tree.keys()
    with mounted_kernel_tmpfs(tmp_path / "layers", "size=1g") as layers:
        upper = layers / "upper"
        exported = mmfs("export", mount.path, upper)
        assert exported.returncode == 0, exported.stderr
        baseline.check()  # before overlayfs reads LOWERDIR's directories (their atimes)
        with kernel_overlay(layers, lower, upper) as merged:
            compare_with_kernel_overlay(merged, mount, f"seed {seed}")


def test_export_into_a_directory_that_is_not_empty_writes_nothing(mmfs_factory: Factory, tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    upper.mkdir()
    (upper / "already").write_bytes(b"here")
    mount = mmfs_factory("overlay", str(lower), options="size=64m")
    (mount.path / "d" / "new").write_bytes(b"new")
    (mount.path / "d").rename(mount.path / "e")
    result = mmfs("export", mount.path, upper)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "not empty" in result.stderr, result.stderr
    assert os.listdir(upper) == ["already"] and (upper / "already").read_bytes() == b"here"
    assert mmfs("diff", mount.path).stdout == "M .\nD d\nA e\nA e/new\n"


def test_diff_and_export_in_tmpfs_mode_are_refused_in_one_line(mnt: Path, tmp_path: Path) -> None:
    (mnt / "f").write_bytes(b"x")
    for args in (("diff", mnt), ("diff", mnt, "--json"), ("export", mnt, tmp_path / "out")):
        result = mmfs(*args)
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.count("\n") == 1 and "overlay mode" in result.stderr, result.stderr
    assert os.listdir(tmp_path / "out") == []
