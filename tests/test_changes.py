"""``mmfs diff`` and ``mmfs export`` in the model: no mount, milliseconds each.

An overlay model over a real LOWERDIR in tmp_path, driven through the model's
own methods, answers ``changes.diff``: A, D and M per path as ``diff -r``
between LOWERDIR and the mount would see them, from what the model knows
(it never reads an unchanged lower file nor lists a directory not listed
yet: ``LowerDir`` is watched).  ``export.export`` writes the upper directory
whose layout (whiteouts, opaque directories, hard links, holes) is checked
here; the mount-level test (test_diff_export.py) mounts it with kernel
overlayfs.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import asdict
from pathlib import Path

import pytest
from support.models import ino, overlay_model, split, write

from mmfs import control
from mmfs.arena import Arena
from mmfs.changes import diff
from mmfs.content import AnonContent
from mmfs.export import data_runs, export
from mmfs.fs import RENAME_EXCHANGE, ROOT_INO, Attrs, Filesystem, FsConfig
from mmfs.lower import LowerDir, LowerEntry
from mmfs.quoting import quote_path

MiB = 1 << 20
OLD_NS = 1_000_000_000 * 10**9


def create(fs: Filesystem, path: bytes, data: bytes = b"") -> None:
    parent, name = split(fs, path)
    fs.create_file(parent, name, 0o644, 0, 0)
    if data:
        write(fs, path, data)


def unlink(fs: Filesystem, path: bytes) -> None:
    fs.unlink(*split(fs, path))


def rename(fs: Filesystem, old: bytes, new: bytes, flags: int = 0) -> None:
    fs.rename(*split(fs, old), *split(fs, new), flags)


def kinds(fs: Filesystem) -> list[tuple[str, bytes]]:
    changes = diff(fs)
    fs.check_invariants()
    return [(change.kind, change.path) for change in changes]


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    """A small LOWERDIR with old times: a file's new mtime always differs."""
    root = tmp_path / "lower"
    (root / "dir" / "sub" / "deeper").mkdir(parents=True)
    (root / "dir" / "a.txt").write_bytes(b"alpha\n" * 100)
    (root / "dir" / "b.txt").write_bytes(b"beta\n")
    (root / "dir" / "sub" / "c.txt").write_bytes(b"gamma\n")
    (root / "dir" / "sub" / "deeper" / "d.txt").write_bytes(b"delta\n")
    (root / "empty").mkdir()
    (root / "top.txt").write_bytes(b"top\n")
    (root / "link").symlink_to("top.txt")
    os.setxattr(root / "top.txt", b"user.tag", b"lower")
    (root / "other").mkdir()
    (root / "other" / "twin").hardlink_to(root / "dir" / "b.txt")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(OLD_NS, OLD_NS), follow_symlinks=False)
    os.utime(root, ns=(OLD_NS, OLD_NS))
    return root


@pytest.fixture
def fs(lower: Path) -> Filesystem:
    return overlay_model(lower)


# --- kinds of change --------------------------------------------------------------------
def test_an_untouched_mount_has_no_changes(fs: Filesystem) -> None:
    assert kinds(fs) == []
    ino(fs, b"dir/sub/deeper/d.txt")  # listing directories changes nothing
    assert kinds(fs) == []


def test_new_file_and_new_directory_with_contents_are_added(fs: Filesystem) -> None:
    create(fs, b"dir/new.txt", b"new")
    fs.mkdir(ROOT_INO, b"fresh", 0o755, 0, 0)
    fs.mkdir(ino(fs, b"fresh"), b"inner", 0o755, 0, 0)
    create(fs, b"fresh/inner/file", b"x")
    assert kinds(fs) == [
        ("M", b"."), ("M", b"dir"), ("A", b"dir/new.txt"), ("A", b"fresh"), ("A", b"fresh/inner"),
        ("A", b"fresh/inner/file"),
    ]


def test_deleted_file_and_deleted_tree(fs: Filesystem) -> None:
    unlink(fs, b"top.txt")
    for path in (b"dir/sub/deeper/d.txt", b"dir/sub/c.txt"):
        unlink(fs, path)
    fs.rmdir(ino(fs, b"dir/sub"), b"deeper")
    fs.rmdir(ino(fs, b"dir"), b"sub")
    assert kinds(fs) == [
        ("M", b"."), ("M", b"dir"), ("D", b"dir/sub"), ("D", b"dir/sub/c.txt"), ("D", b"dir/sub/deeper"),
        ("D", b"dir/sub/deeper/d.txt"), ("D", b"top.txt"),
    ]


def test_a_renamed_directory_is_deleted_and_added_with_everything_beneath(fs: Filesystem) -> None:
    """Nothing beneath "dir" was listed: the deletions come from LOWERDIR's
    names, the additions from the model (which lists what it has to)."""
    rename(fs, b"dir", b"moved")
    assert kinds(fs) == [
        ("M", b"."), ("D", b"dir"), ("D", b"dir/a.txt"), ("D", b"dir/b.txt"), ("D", b"dir/sub"),
        ("D", b"dir/sub/c.txt"), ("D", b"dir/sub/deeper"), ("D", b"dir/sub/deeper/d.txt"),
        ("A", b"moved"), ("A", b"moved/a.txt"), ("A", b"moved/b.txt"), ("A", b"moved/sub"),
        ("A", b"moved/sub/c.txt"), ("A", b"moved/sub/deeper"), ("A", b"moved/sub/deeper/d.txt"),
    ]


def test_a_directory_renamed_onto_a_lower_one_is_changed_and_compared_by_path(fs: Filesystem) -> None:
    rename(fs, b"dir/sub", b"empty")
    assert kinds(fs) == [
        ("M", b"."), ("M", b"dir"), ("D", b"dir/sub"), ("D", b"dir/sub/c.txt"), ("D", b"dir/sub/deeper"),
        ("D", b"dir/sub/deeper/d.txt"), ("M", b"empty"), ("A", b"empty/c.txt"), ("A", b"empty/deeper"),
        ("A", b"empty/deeper/d.txt"),
    ]


def test_rename_over_a_file_deletes_the_old_name_and_changes_the_new(fs: Filesystem) -> None:
    rename(fs, b"dir/a.txt", b"dir/b.txt")
    assert kinds(fs) == [("M", b"dir"), ("D", b"dir/a.txt"), ("M", b"dir/b.txt"), ("M", b"other/twin")]


def test_exchanged_files_are_both_changed(fs: Filesystem) -> None:
    rename(fs, b"dir/a.txt", b"top.txt", RENAME_EXCHANGE)
    assert kinds(fs) == [("M", b"."), ("M", b"dir"), ("M", b"dir/a.txt"), ("M", b"top.txt")]


@pytest.mark.parametrize(
    "attrs", [Attrs(mode=0o600), Attrs(uid=1000), Attrs(gid=1000), Attrs(mtime_ns=OLD_NS + 1)], ids=repr
)
def test_mode_owner_and_mtime_changes(fs: Filesystem, attrs: Attrs) -> None:
    fs.setattr(ino(fs, b"dir/a.txt"), attrs)
    assert kinds(fs) == [("M", b"dir/a.txt")]


def test_atime_and_ctime_alone_are_no_change(fs: Filesystem) -> None:
    fs.setattr(ino(fs, b"dir/a.txt"), Attrs(atime_ns=OLD_NS + 10**9))
    fs.setattr(ino(fs, b"top.txt"), Attrs(mode=0o644))  # ctime only: the mode it had
    fh = fs.open(ino(fs, b"dir/b.txt"), os.O_RDONLY)
    fs.read(fh, 0, 100)  # atime
    fs.release(fh)
    assert kinds(fs) == []


def test_the_root_itself(fs: Filesystem) -> None:
    fs.setattr(ROOT_INO, Attrs(mode=0o700))
    assert kinds(fs) == [("M", b".")]


def test_xattrs_set_and_removed(fs: Filesystem) -> None:
    fs.setxattr(ino(fs, b"dir/a.txt"), b"user.new", b"1")
    fs.removexattr(ino(fs, b"top.txt"), b"user.tag")
    assert kinds(fs) == [("M", b"dir/a.txt"), ("M", b"top.txt")]
    fs.removexattr(ino(fs, b"dir/a.txt"), b"user.new")
    fs.setxattr(ino(fs, b"top.txt"), b"user.tag", b"lower")
    assert kinds(fs) == []  # as they were: compared, not just touched


def test_acl_is_an_xattr_change(fs: Filesystem) -> None:
    from mmfs import acl

    value = acl.chmod(bytes.fromhex("0200000001000600ffffffff04000400ffffffff10000400ffffffff20000400ffffffff"), 0o640)
    fs.setxattr(ino(fs, b"dir/a.txt"), acl.ACCESS, value)
    assert kinds(fs) == [("M", b"dir/a.txt")]


def test_a_retargeted_symlink_is_changed(fs: Filesystem) -> None:
    unlink(fs, b"link")
    fs.symlink(ROOT_INO, b"link", b"dir/a.txt", 0, 0)
    assert kinds(fs) == [("M", b"."), ("M", b"link")]


def test_a_new_hard_link_adds_a_name_and_changes_the_link_count(fs: Filesystem) -> None:
    fs.link(ino(fs, b"top.txt"), ino(fs, b"dir"), b"top-again")
    assert kinds(fs) == [("M", b"dir"), ("A", b"dir/top-again"), ("M", b"top.txt")]


def test_same_bytes_rewritten_count_as_a_change(fs: Filesystem) -> None:
    """Documented: content is never compared, a write is a change (and its mtime)."""
    inode = fs.inodes[ino(fs, b"dir/a.txt")]
    mtime = inode.mtime_ns
    write(fs, b"dir/a.txt", b"alpha\n")
    fs.setattr(inode.ino, Attrs(mtime_ns=mtime))
    assert kinds(fs) == [("M", b"dir/a.txt")]


def test_truncate_is_a_change(fs: Filesystem) -> None:
    fs.setattr(ino(fs, b"dir/a.txt"), Attrs(size=3, mtime_ns=OLD_NS))
    assert kinds(fs) == [("M", b"dir/a.txt")]


def test_a_file_replaced_by_a_directory_is_changed_and_its_contents_added(fs: Filesystem) -> None:
    unlink(fs, b"top.txt")
    fs.mkdir(ROOT_INO, b"top.txt", 0o755, 0, 0)
    create(fs, b"top.txt/inside")
    assert kinds(fs) == [("M", b"."), ("M", b"top.txt"), ("A", b"top.txt/inside")]


def test_a_directory_replaced_by_a_file_is_changed_and_its_contents_deleted(fs: Filesystem) -> None:
    for path in (b"dir/sub/deeper/d.txt", b"dir/sub/c.txt"):
        unlink(fs, path)
    fs.rmdir(ino(fs, b"dir/sub"), b"deeper")
    fs.rmdir(ino(fs, b"dir"), b"sub")
    create(fs, b"dir/sub", b"a file now")
    assert kinds(fs) == [
        ("M", b"dir"), ("M", b"dir/sub"), ("D", b"dir/sub/c.txt"), ("D", b"dir/sub/deeper"),
        ("D", b"dir/sub/deeper/d.txt"),
    ]


# --- names ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "shown"),
    [
        (b"plain/name.txt", "plain/name.txt"),
        ("caf\u00e9/\u65e5\u672c".encode(), "caf\u00e9/\u65e5\u672c"),
        (b"new\nline", '"new\\nline"'),
        (b"tab\there", '"tab\\there"'),
        (b"bad\xff\xfe", '"bad\\377\\376"'),
        (b'say "hi"', '"say \\"hi\\""'),
        (b"back\\slash", '"back\\\\slash"'),
        (b"bell\x07\x01\x7f", '"bell\\a\\001\\177"'),
        ("caf\u00e9\u0085".encode() + b"\xff", '"caf\u00e9\\302\\205\\377"'),  # U+0085 is not printable
    ],
)
def test_paths_are_quoted_as_git_quotes_them(path: bytes, shown: str) -> None:
    assert quote_path(path) == shown


def test_odd_names_are_reported_as_bytes(fs: Filesystem) -> None:
    names = [b"new\nline", b"bad\xff", b'quo"te', b"back\\slash", b"tab\t"]
    for name in names:
        create(fs, b"dir/" + name)
    assert kinds(fs) == [("M", b"dir")] + [("A", b"dir/" + name) for name in sorted(names)]


# --- what is read ---------------------------------------------------------------------
class Watched:
    """Records what LowerDir is asked for: directories listed, files opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listed: list[bytes] = []
        self.opened: list[bytes] = []
        original_list, original_open = LowerDir.list, LowerDir.open

        def list_(tree: LowerDir, path: bytes) -> list[LowerEntry]:
            self.listed.append(path)
            return original_list(tree, path)

        def open_(tree: LowerDir, path: bytes, flags: int = 0) -> int:
            if not flags & os.O_DIRECTORY:
                self.opened.append(path)
            return original_open(tree, path, flags)

        monkeypatch.setattr(LowerDir, "list", list_)
        monkeypatch.setattr(LowerDir, "open", open_)

    def clear(self) -> None:
        self.listed.clear()
        self.opened.clear()


def test_diff_reads_no_file_and_lists_no_directory_not_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lower = tmp_path / "wide"
    for d in range(20):
        for f in range(20):
            path = lower / f"d{d}" / f"s{f}"
            path.mkdir(parents=True)
            (path / "file").write_bytes(b"x" * f)
    watched = Watched(monkeypatch)
    fs = overlay_model(lower)
    for d in range(10):  # half the tree listed
        for f in range(20):
            ino(fs, b"d%d/s%d/file" % (d, f))
    write(fs, b"d3/s4/file", b"changed")
    fs.setattr(ino(fs, b"d5/s5/file"), Attrs(mode=0o600))
    unlink(fs, b"d7/s1/file")
    watched.clear()
    assert kinds(fs) == [("M", b"d3/s4/file"), ("M", b"d5/s5/file"), ("M", b"d7/s1"), ("D", b"d7/s1/file")]
    assert watched.listed == []
    assert watched.opened == []


def test_other_names_of_a_changed_hard_link_in_directories_not_listed_yet(fs: Filesystem) -> None:
    """dir/b.txt and other/twin are one lower file; "other" is not listed when
    the file changes, so the diff lists it to find the other name."""
    fs.setattr(ino(fs, b"dir/b.txt"), Attrs(mode=0o600))
    other = fs.inodes[fs.lookup(ROOT_INO, b"other").ino]  # type: ignore[union-attr]
    assert other.awaits_listing
    assert kinds(fs) == [("M", b"dir/b.txt"), ("M", b"other/twin")]


def test_diff_is_sorted_by_bytes_with_the_root_first(fs: Filesystem) -> None:
    create(fs, b"!first")
    create(fs, b"dir-z")
    create(fs, b"dir/x")
    paths = [path for _, path in kinds(fs)]
    assert paths == [b".", b"!first", b"dir", b"dir-z", b"dir/x"]


# --- export -----------------------------------------------------------------------
def test_export_writes_whiteouts_opaque_copies_links_and_holes(fs: Filesystem, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    unlink(fs, b"dir/sub/deeper/d.txt")
    rename(fs, b"dir/sub", b"empty")  # an opaque copy of it
    fs.link(ino(fs, b"dir/a.txt"), ino(fs, b"dir"), b"a-again")
    create(fs, b"sparse")
    write(fs, b"sparse", b"data", 3 * MiB)
    fs.setattr(ino(fs, b"sparse"), Attrs(size=5 * MiB))
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        report = export(fs, fd)
    finally:
        os.close(fd)
    fs.check_invariants()
    assert stat.S_ISCHR(os.lstat(upper / "dir" / "sub").st_mode) and os.lstat(upper / "dir" / "sub").st_rdev == 0
    assert os.getxattr(upper / "empty", b"trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(upper / "empty")) == ["c.txt", "deeper"]
    assert os.listdir(upper / "empty" / "deeper") == []
    assert os.lstat(upper / "dir" / "a.txt").st_ino == os.lstat(upper / "dir" / "a-again").st_ino
    assert sorted(os.listdir(upper / "dir")) == ["a-again", "a.txt", "sub"]  # b.txt is LOWERDIR's
    sparse = os.lstat(upper / "sparse")
    assert sparse.st_size == 5 * MiB and sparse.st_blocks * 512 <= 8192
    assert (upper / "sparse").read_bytes() == bytes(3 * MiB) + b"data" + bytes(2 * MiB - 4)
    assert report.whiteouts == 1 and report.opaque_directories == 1 and report.hard_links == 1
    assert report.bytes_written == 4096 + 100 * 6 + 6  # the page of "data", a.txt, c.txt (d.txt is gone)


def test_export_refuses_a_directory_that_is_not_empty(fs: Filesystem, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "something").write_bytes(b"")
    create(fs, b"new")
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(control.RequestError, match="^export: the directory to write to is not empty$"):
            export(fs, fd)
    finally:
        os.close(fd)
    assert os.listdir(upper) == ["something"]


def test_export_keeps_every_name_of_a_file_it_writes(fs: Filesystem, tmp_path: Path) -> None:
    """dir/b.txt moves; its other name (other/twin, not listed, unchanged path
    by path) must be a link to the copy, or overlayfs would show two files."""
    rename(fs, b"dir/b.txt", b"moved")
    assert kinds(fs) == [("M", b"."), ("M", b"dir"), ("D", b"dir/b.txt"), ("A", b"moved")]
    upper = tmp_path / "upper"
    upper.mkdir()
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    try:
        export(fs, fd)
    finally:
        os.close(fd)
    assert os.lstat(upper / "moved").st_ino == os.lstat(upper / "other" / "twin").st_ino
    assert os.lstat(upper / "moved").st_nlink == 2


def test_data_runs_skip_pages_of_zeros() -> None:
    page = 4096
    data = b"a" * page + bytes(2 * page) + b"b" + bytes(page - 1) + b"c" * 10
    assert list(data_runs(data)) == [(0, page), (3 * page, len(data))]
    assert list(data_runs(b"dense" * 1000)) == [(0, 5000)]
    assert list(data_runs(bytes(3 * page))) == []


def test_diff_in_tmpfs_mode_is_refused(tmp_path: Path) -> None:
    from mmfs.changes import handle_diff
    from mmfs.export import handle_export

    class FakeDaemon:
        fs = Filesystem(lambda: AnonContent(Arena(64 * MiB, 0)), FsConfig())

    with pytest.raises(control.RequestError, match="overlay mode"):
        handle_diff(FakeDaemon(), {"op": "diff"}, [])  # type: ignore[arg-type]
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    with pytest.raises(control.RequestError, match="overlay mode"):
        handle_export(FakeDaemon(), {"op": "export"}, [fd])  # type: ignore[arg-type]
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


def test_export_as_a_user_marks_opaque_directories_with_user_xattrs_and_counts_what_it_cannot_keep(
    fs: Filesystem, tmp_path: Path
) -> None:
    """Run in a child that becomes nobody: owners it cannot give and trusted.*
    xattrs are counted, not errors; opaque is ``user.overlay.opaque``."""
    nobody = 65534
    rename(fs, b"dir/sub", b"empty")
    fs.setattr(ino(fs, b"top.txt"), Attrs(uid=1000))
    fs.setxattr(ino(fs, b"top.txt"), b"trusted.note", b"root only")
    upper = tmp_path / "upper"
    upper.mkdir()
    os.chown(upper, nobody, nobody)
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)  # the way there is root's only
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.setgroups([])
            os.setresgid(nobody, nobody, nobody)
            os.setresuid(nobody, nobody, nobody)
            os.write(writing, json.dumps(asdict(export(fs, fd))).encode())
            status = 0
        except (OSError, control.RequestError) as error:  # told to the parent, which fails the test
            os.write(writing, repr(error).encode())
        finally:
            os._exit(status)
    os.close(writing)
    os.close(fd)
    with os.fdopen(reading, "rb") as pipe:
        sent = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0, sent
    report = json.loads(sent)
    assert report["opaque_directories"] == 1 and report["xattrs_not_kept"] == 1
    assert report["files"] == 3 and report["directories"] == 3  # top.txt, and the copy of sub in empty
    assert report["owners_not_kept"] == 3 + 3 + 1  # every one (root's, or uid 1000) and DIR itself
    assert os.getxattr(upper / "empty", b"user.overlay.opaque") == b"y"
    assert os.lstat(upper / "top.txt").st_uid == nobody
    assert os.getxattr(upper / "top.txt", b"user.tag") == b"lower"
