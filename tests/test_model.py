"""Model and storage tests without FUSE: milliseconds each, invariants checked after every test."""

from __future__ import annotations

import ast
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmfs.arena import PAGE, SLOT, Arena
from mmfs.content import AnonContent
from mmfs.fs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    ROOT_INO,
    Attrs,
    Filesystem,
    FsConfig,
    FsError,
)

MiB = 1 << 20


@pytest.fixture(params=[True, False], ids=["pwrite", "copy"])
def arena(request: pytest.FixtureRequest) -> Arena:
    """Both ways of storing bytes: pwrite on the shmem file (root) and a copy into the map."""
    arena = Arena(256 * MiB, page_limit=(16 * MiB) // PAGE, store_with_pwrite=request.param)
    assert (arena.file is not None) == request.param
    return arena


@pytest.fixture
def fs(arena: Arena) -> Iterator[Filesystem]:
    filesystem = Filesystem(lambda: AnonContent(arena), FsConfig(max_inodes=100))
    yield filesystem
    filesystem.check_invariants()


def errno_of(call: object, *args: object) -> int:
    with pytest.raises(FsError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.errno


def test_content_holes_read_zero_and_hold_nothing(arena: Arena) -> None:
    content = AnonContent(arena)
    content.write(10 * SLOT + 5, b"xyz")
    assert content.size == 10 * SLOT + 8
    assert content.pages == 1 and arena.pages_held == 1
    assert bytes(content.read(0, 16)) == bytes(16)
    assert bytes(content.read(10 * SLOT, 8)) == b"\0" * 5 + b"xyz"


def test_content_write_across_slots_and_partial_pages(arena: Arena) -> None:
    content = AnonContent(arena)
    data = bytes(range(256)) * 1000
    content.write(SLOT - 100, data)
    assert bytes(content.read(SLOT - 100, len(data))) == data
    assert bytes(content.read(0, SLOT - 100)) == bytes(SLOT - 100)
    content.write(3 * PAGE, b"a")  # page inside a slot with other pages unheld
    assert bytes(content.read(3 * PAGE - 1, 3)) == b"\0a\0"


def test_truncate_down_zeroes_tail_and_frees_pages(arena: Arena) -> None:
    content = AnonContent(arena)
    content.write(0, b"x" * (3 * SLOT))
    assert arena.pages_held == 3 * SLOT // PAGE
    content.truncate(PAGE + 10)
    assert arena.pages_held == 2 and content.pages == 2
    content.truncate(3 * PAGE)
    assert bytes(content.read(0, 3 * PAGE)) == b"x" * (PAGE + 10) + bytes(2 * PAGE - 10)
    content.release()
    assert arena.pages_held == 0 and arena.slots_in_use() == 0


def test_write_at_limit_is_short_then_enospc(arena: Arena) -> None:
    content = AnonContent(arena)
    limit = arena.page_limit * PAGE
    assert content.write(0, b"a" * (limit - PAGE)) == limit - PAGE
    assert content.write(limit - PAGE, b"b" * (2 * PAGE)) == PAGE
    with pytest.raises(OSError) as info:
        content.write(limit, b"c")
    assert info.value.errno == errno.ENOSPC
    content.write(0, b"z" * 100)  # overwriting held pages needs no new space
    assert bytes(content.read(limit - 1, 10)) == b"b"


@pytest.mark.parametrize("failure", ["/dev/full", "ENOMEM"])
def test_arena_out_of_memory_answers_enospc_and_keeps_the_books(
    failure: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The shmem file refuses pages (ENOSPC as on /dev/full; ENOMEM as from a
    memory cgroup): the write is ENOSPC, as on tmpfs, not EIO, with no warning,
    and neither the file nor the page budget changes."""
    arena = Arena(256 * MiB, page_limit=(16 * MiB) // PAGE)
    fs = Filesystem(lambda: AnonContent(arena), FsConfig())
    f = fs.create_file(ROOT_INO, b"f", 0o644, 0, 0)
    fh = fs.open(f.ino, 0)
    fs.write(fh, 0, b"kept" * 1000)
    held, slots = arena.pages_held, arena.slots_in_use()
    real_file = arena.file
    if failure == "/dev/full":
        arena.file = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    else:
        def no_memory(fd: int, data: object, offset: int) -> int:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")

        monkeypatch.setattr(os, "pwrite", no_memory)
    with caplog.at_level(logging.WARNING):
        assert errno_of(fs.write, fh, 5 * SLOT, b"new" * 10) == errno.ENOSPC  # a fresh slot
        assert errno_of(fs.write, fh, PAGE, b"new" * 2000) == errno.ENOSPC  # fresh pages of a held slot
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    assert (arena.pages_held, arena.slots_in_use(), f.content.pages) == (held, slots, 1)  # type: ignore[union-attr]
    assert f.size == 4000
    if failure == "/dev/full":
        os.close(arena.file)  # type: ignore[arg-type]
        arena.file = real_file
    else:
        monkeypatch.undo()
    assert fs.write(fh, 5 * SLOT, b"new") == 3  # memory is back: writes work again
    assert bytes(fs.read(fh, 0, 8)) == b"keptkept" and bytes(fs.read(fh, 5 * SLOT - 1, 4)) == b"\0new"
    fs.release(fh)
    fs.check_invariants()


def test_namespace_basics(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    f = fs.create_file(d.ino, b"f", 0o644, 0, 0)
    assert fs.get(ROOT_INO).nlink == 3 and d.nlink == 2
    assert errno_of(fs.mkdir, d.ino, b"f", 0o755, 0, 0) == errno.EEXIST
    assert errno_of(fs.rmdir, ROOT_INO, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.unlink, ROOT_INO, b"d") == errno.EISDIR
    assert errno_of(fs.lookup, ROOT_INO, b"x" * 256) == errno.ENAMETOOLONG
    fs.link(f.ino, ROOT_INO, b"g")
    assert f.nlink == 2
    fs.unlink(d.ino, b"f")
    fs.rmdir(ROOT_INO, b"d")
    assert fs.get(ROOT_INO).nlink == 2 and d.nlink == 0


def test_rename_rules(fs: Filesystem) -> None:
    a = fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    b = fs.mkdir(a.ino, b"b", 0o755, 0, 0)
    fs.create_file(ROOT_INO, b"f", 0o644, 0, 0)
    assert errno_of(fs.rename, ROOT_INO, b"a", b.ino, b"x", 0) == errno.EINVAL
    assert errno_of(fs.rename, ROOT_INO, b"f", ROOT_INO, b"a", 0) == errno.EISDIR
    assert errno_of(fs.rename, ROOT_INO, b"a", ROOT_INO, b"f", 0) == errno.ENOTDIR
    assert errno_of(fs.rename, ROOT_INO, b"f", ROOT_INO, b"a", RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(fs.rename, ROOT_INO, b"f", ROOT_INO, b"nope", RENAME_EXCHANGE) == errno.ENOENT
    fs.rename(ROOT_INO, b"f", a.ino, b"b", RENAME_EXCHANGE)
    assert fs.lookup(ROOT_INO, b"f") is b and b.dir is not None and b.dir.parent == ROOT_INO
    assert a.nlink == 2 and fs.get(ROOT_INO).nlink == 4
    empty = fs.mkdir(ROOT_INO, b"e", 0o755, 0, 0)
    fs.rename(ROOT_INO, b"f", ROOT_INO, b"e", 0)  # over an empty directory
    assert empty.nlink == 0 and fs.get(ROOT_INO).nlink == 4


def test_rename_whiteout_leaves_a_character_device_0_0(fs: Filesystem) -> None:
    """As on tmpfs: the whiteout is made first (listed after the moved name), with
    mode 0, the caller's owner, a setgid directory's group, its directory's times."""
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    fs.setattr(d.ino, Attrs(mode=0o2777, gid=42))
    moved = fs.create_file(d.ino, b"a", 0o644, 0, 0)
    size = d.size
    fs.rename(d.ino, b"a", d.ino, b"b", RENAME_WHITEOUT, 1000, 7)
    whiteout = fs.lookup(d.ino, b"a")
    assert whiteout is not None and fs.lookup(d.ino, b"b") is moved
    assert (whiteout.mode, whiteout.rdev, whiteout.nlink, whiteout.uid, whiteout.gid) == (stat.S_IFCHR, 0, 1, 1000, 42)
    assert whiteout.mtime_ns == whiteout.ctime_ns == whiteout.atime_ns == d.mtime_ns == d.ctime_ns
    assert d.size == size + 20 and fs.inode_count() == 4
    fh = fs.opendir(d.ino)
    assert [name for name, _, _ in fs.readdir(fh, 0)] == [b".", b"..", b"b", b"a"]
    fs.releasedir(fh)
    sub = fs.mkdir(ROOT_INO, b"sub", 0o755, 0, 0)
    assert errno_of(fs.rename, ROOT_INO, b"sub", d.ino, b"a", RENAME_WHITEOUT | RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(fs.rename, ROOT_INO, b"sub", d.ino, b"a", RENAME_WHITEOUT) == errno.ENOTDIR
    assert errno_of(fs.rename, ROOT_INO, b"sub", d.ino, b"c", RENAME_WHITEOUT | RENAME_EXCHANGE) == errno.EINVAL
    assert errno_of(fs.rename, ROOT_INO, b"sub", d.ino, b"c", RENAME_WHITEOUT | 8) == errno.EINVAL
    fs.rename(ROOT_INO, b"sub", d.ino, b"sub", RENAME_WHITEOUT)  # a directory moves, its whiteout stays
    root_whiteout = fs.lookup(ROOT_INO, b"sub")
    assert root_whiteout is not None and root_whiteout.mode == stat.S_IFCHR and root_whiteout.gid == 0
    assert sub.dir is not None and sub.dir.parent == d.ino and fs.get(ROOT_INO).nlink == 3 and d.nlink == 3


def test_rename_whiteout_at_the_inode_limit_changes_nothing(arena: Arena) -> None:
    """tmpfs makes the whiteout before it drops the target: ENOSPC even over an
    existing name, and both names stay."""
    fs = Filesystem(lambda: AnonContent(arena), FsConfig(max_inodes=3))
    a = fs.create_file(ROOT_INO, b"a", 0o644, 0, 0)
    b = fs.create_file(ROOT_INO, b"b", 0o644, 0, 0)
    assert errno_of(fs.rename, ROOT_INO, b"a", ROOT_INO, b"c", RENAME_WHITEOUT) == errno.ENOSPC
    assert errno_of(fs.rename, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_WHITEOUT) == errno.ENOSPC
    assert fs.lookup(ROOT_INO, b"a") is a and fs.lookup(ROOT_INO, b"b") is b and fs.inode_count() == 3
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    fs.forget(b.ino, 2)
    fs.rename(ROOT_INO, b"b", ROOT_INO, b"c", RENAME_WHITEOUT)
    assert fs.inode_count() == 3 and fs.lookup(ROOT_INO, b"c") is a
    fs.check_invariants()


def test_dot_lookups_find_inodes_for_file_handles(fs: Filesystem) -> None:
    """The kernel's export operations: "." by inode number (any type), ".." of a
    directory; ESTALE once tmpfs would have evicted the inode."""
    d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    sub = fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
    f = fs.create_file(sub.ino, b"f", 0o644, 0, 0)
    assert fs.lookup(f.ino, b".") is f and f.lookups == 0  # references are the adapter's (test_adapter)
    assert fs.lookup(sub.ino, b".") is sub and fs.lookup(sub.ino, b"..") is d
    assert fs.lookup(ROOT_INO, b"..") is fs.get(ROOT_INO)
    assert errno_of(fs.lookup, f.ino, b"..") == errno.ENOTDIR
    assert errno_of(fs.lookup, 9999, b".") == errno.ESTALE
    fh = fs.open(f.ino, os.O_RDONLY)
    fs.unlink(sub.ino, b"f")
    assert fs.lookup(f.ino, b".") is f  # deleted but open: still reachable, as on tmpfs
    fs.release(fh)
    assert errno_of(fs.lookup, f.ino, b".") == errno.ESTALE  # nameless and closed: tmpfs evicted it
    fs.rmdir(d.ino, b"sub")
    assert errno_of(fs.lookup, sub.ino, b".") == errno.ESTALE
    assert errno_of(fs.lookup, sub.ino, b"..") == errno.ESTALE


def test_unlinked_open_file_lives_until_release(fs: Filesystem, arena: Arena) -> None:
    f = fs.create_file(ROOT_INO, b"f", 0o644, 0, 0)
    fh = fs.open(f.ino, 0)
    fs.write(fh, 0, b"data" * 2000)
    fs.unlink(ROOT_INO, b"f")
    assert bytes(fs.read(fh, 0, 4)) == b"data"
    fs.forget(f.ino, f.lookups)
    assert f.ino in fs.inodes and arena.pages_held == 2
    fs.release(fh)
    assert f.ino not in fs.inodes and arena.pages_held == 0


def test_readdir_lists_newest_first_and_resumes_while_directory_changes(fs: Filesystem) -> None:
    for i in range(10):
        fs.create_file(ROOT_INO, b"f%d" % i, 0o644, 0, 0)
    fh = fs.opendir(ROOT_INO)
    first = list(fs.readdir(fh, 0))[:5]
    fs.unlink(ROOT_INO, b"f5")
    fs.create_file(ROOT_INO, b"new", 0o644, 0, 0)
    fs.rename(ROOT_INO, b"f1", ROOT_INO, b"f1-renamed", 0)  # a new name: listed first, after a rewind
    rest = [name for name, _, _ in fs.readdir(fh, first[-1][2])]
    assert [name for name, _, _ in first] == [b".", b"..", b"f9", b"f8", b"f7"]
    assert rest == [b"f6", b"f4", b"f3", b"f2", b"f0"]
    offsets = [offset for _, _, offset in fs.readdir(fh, 0)]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    names = [name for name, _, _ in fs.readdir(fh, 0)]
    assert names == [b".", b"..", b"f1-renamed", b"new", b"f9", b"f8", b"f7", b"f6", b"f4", b"f3", b"f2", b"f0"]
    fs.rename(ROOT_INO, b"f0", ROOT_INO, b"f9", RENAME_EXCHANGE)  # both to the front, the new name ahead
    assert [name for name, _, _ in fs.readdir(fh, 0)][2:5] == [b"f9", b"f0", b"f1-renamed"]
    fs.releasedir(fh)


def test_setgid_directory_inheritance(fs: Filesystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o2775, 0, 42)
    fs.setattr(d.ino, Attrs(mode=0o2775))
    sub = fs.mkdir(d.ino, b"sub", 0o755, 7, 7)
    f = fs.create_file(d.ino, b"f", 0o644, 7, 7)
    assert sub.gid == 42 and sub.mode & stat.S_ISGID
    assert f.gid == 42 and not f.mode & stat.S_ISGID


def test_inode_limit(arena: Arena) -> None:
    fs = Filesystem(lambda: AnonContent(arena), FsConfig(max_inodes=3))
    fs.create_file(ROOT_INO, b"a", 0o644, 0, 0)
    fs.create_file(ROOT_INO, b"b", 0o644, 0, 0)
    assert errno_of(fs.create_file, ROOT_INO, b"c", 0o644, 0, 0) == errno.ENOSPC
    fs.unlink(ROOT_INO, b"a")
    fs.forget(2, 1)
    fs.create_file(ROOT_INO, b"c", 0o644, 0, 0)


def test_xattr_rules(fs: Filesystem) -> None:
    f = fs.create_file(ROOT_INO, b"f", 0o644, 0, 0)
    assert errno_of(fs.setxattr, f.ino, b"foo.x", b"") == errno.EOPNOTSUPP
    assert errno_of(fs.setxattr, f.ino, b"user.", b"") == errno.EINVAL
    assert errno_of(fs.getxattr, f.ino, b"user.none") == errno.ENODATA
    fs.setxattr(f.ino, b"user.a", b"1")
    assert fs.listxattr(f.ino) == [b"user.a"]
    fs.removexattr(f.ino, b"user.a")
    assert errno_of(fs.removexattr, f.ino, b"user.a") == errno.ENODATA


def test_model_and_storage_do_not_import_fuse_or_trio() -> None:
    package = Path(__file__).resolve().parent.parent / "mmfs"
    modules = ("fs.py", "inode.py", "overlay.py", "acl.py", "content.py", "maps.py", "lower.py", "linux.py", "arena.py")
    for module in (*modules, "options.py", "mounts.py"):
        tree = ast.parse((package / module).read_text())
        nodes = list(ast.walk(tree))
        imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"pyfuse3", "trio"}, module


def overlay_fs(tmp_path: Path, arena: Arena, map_limit: int = 10) -> Filesystem:
    from mmfs.content import CowContent
    from mmfs.maps import MapBudget
    from mmfs.lower import LowerDir

    lower = LowerDir(str(tmp_path / "lower"))
    maps = MapBudget(limit=map_limit, leases=False)  # no SIGIO handler here

    def lower_content(entry):  # type: ignore[no-untyped-def]
        return CowContent(arena, maps, lambda: lower.open(entry.path), entry.st.st_size, entry.st.st_blocks)

    return Filesystem(lambda: AnonContent(arena), FsConfig(), lower=lower, lower_content=lower_content)


@pytest.fixture
def lower_tree(tmp_path: Path) -> Path:
    root = tmp_path / "lower"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "f").write_bytes(b"lower data" * 100_000)
    (root / "small").write_bytes(b"tiny")
    (root / "b" / "link").hardlink_to(root / "a" / "f")
    (root / "sym").symlink_to("/etc/shadow")
    return root


def test_overlay_loads_directories_lazily_and_keeps_hard_links_one_inode(
    tmp_path: Path, arena: Arena, lower_tree: Path
) -> None:
    fs = overlay_fs(tmp_path, arena)
    assert fs.get(ROOT_INO).dir.unlisted == b""  # type: ignore[union-attr]  # nothing listed at mount time
    a = fs.lookup(ROOT_INO, b"a")
    assert a is not None and a.dir is not None and a.dir.unlisted == b"a"
    f = fs.lookup(a.ino, b"f")
    assert f is not None and f.nlink == 2 and f.hidden_links == 1
    b = fs.lookup(ROOT_INO, b"b")
    assert b is not None and fs.lookup(b.ino, b"link") is f and f.hidden_links == 0
    assert fs.readlink(fs.lookup(ROOT_INO, b"sym").ino) == b"/etc/shadow"  # type: ignore[union-attr]
    fs.check_invariants()


@pytest.mark.parametrize("map_limit", [10, 0], ids=["mapped", "arena-copied"])
def test_overlay_copy_on_write_changes_only_the_view(
    tmp_path: Path, arena: Arena, lower_tree: Path, map_limit: int
) -> None:
    fs = overlay_fs(tmp_path, arena, map_limit)
    a = fs.lookup(ROOT_INO, b"a")
    f = fs.lookup(a.ino, b"f")  # type: ignore[union-attr]
    assert f is not None
    fh = fs.open(f.ino, 0)
    fs.write(fh, 500_000, b"NEW")
    assert arena.pages_held == 1  # one page copied, not the file
    assert bytes(fs.read(fh, 499_998, 7)) == b"taNEWer"
    fs.write(fh, 1_000_000, b"+tail")  # past the end of the backing file
    fs.write(fh, 999_999, b"A")  # the page straddling the backing file's end
    assert bytes(fs.read(fh, 999_990, 20)) == b"lower dat" + b"A+tail"
    fs.setattr(f.ino, Attrs(size=10))
    fs.setattr(f.ino, Attrs(size=20))
    assert bytes(fs.read(fh, 0, 100)) == b"lower data" + bytes(10)
    assert arena.pages_held == 0
    fs.release(fh)
    small = fs.lookup(ROOT_INO, b"small")
    assert small is not None
    fh = fs.open(small.ino, 0)
    fs.write(fh, 4, b"!")
    assert bytes(fs.read(fh, 0, 10)) == b"tiny!"
    fs.release(fh)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"renamed", 0)
    assert errno_of(fs.rmdir, ROOT_INO, b"renamed") == errno.ENOTEMPTY
    assert (lower_tree / "a" / "f").read_bytes() == b"lower data" * 100_000
    assert (lower_tree / "small").read_bytes() == b"tiny"
    fs.check_invariants()


def test_page_set_splits_ranges_into_runs_of_its_pages() -> None:
    import random

    from mmfs.content import PageSet

    rng = random.Random(5)
    for _ in range(300):
        pages, model = PageSet(), set()
        for _ in range(rng.randrange(6)):
            first = rng.randrange(40)
            last = first + rng.randrange(8)
            assert pages.missing(first, last) == len(set(range(first, last + 1)) - model)
            pages.add(first, last)
            model |= set(range(first, last + 1))
        if rng.random() < 0.3:
            cut = rng.randrange(50)
            assert pages.discard_from(cut) == len({page for page in model if page >= cut})
            model = {page for page in model if page < cut}
        assert pages.count == len(model) and list(pages) == sorted(model)
        assert all((page in pages) == (page in model) for page in range(60))
        offset = rng.randrange(30 * PAGE)
        end = offset + rng.randrange(1, 30 * PAGE)
        runs = pages.runs(offset, end)
        assert runs[0][0] == offset and runs[-1][1] == end
        for (start, stop, mine), following in zip(runs, runs[1:] + [None], strict=True):
            assert start < stop and all((pos // PAGE in model) == mine for pos in range(start, stop, 512))
            if following is not None:
                assert following[0] == stop and following[2] != mine


@pytest.mark.parametrize("map_limit", [10, 0], ids=["mapped", "arena-copied"])
def test_overlay_reads_span_written_and_unwritten_pages(
    tmp_path: Path, arena: Arena, lower_tree: Path, map_limit: int
) -> None:
    """Reads of every length and offset over a lower file with scattered written
    pages give the backing bytes with the written ones on top."""
    import random

    fs = overlay_fs(tmp_path, arena, map_limit)
    a = fs.lookup(ROOT_INO, b"a")
    f = fs.lookup(a.ino, b"f")  # type: ignore[union-attr]
    assert f is not None
    expected = bytearray((lower_tree / "a" / "f").read_bytes())
    fh = fs.open(f.ino, 0)
    rng = random.Random(9)
    for _ in range(40):
        offset, data = rng.randrange(len(expected) - 100), rng.randbytes(rng.randrange(1, 3 * PAGE))
        data = data[: len(expected) - offset]
        assert fs.write(fh, offset, data) == len(data)
        expected[offset : offset + len(data)] = data
    for _ in range(300):
        offset = rng.randrange(len(expected))
        length = rng.randrange(1, 6 * PAGE)
        assert bytes(fs.read(fh, offset, length)) == expected[offset : offset + length]
    fs.release(fh)
    fs.check_invariants()


def test_overlay_names_outside_lowerdir_stop_counting_with_the_last_name_in_the_mount(
    tmp_path: Path, arena: Arena
) -> None:
    """``a`` has a name outside LOWERDIR only; ``b`` also one in a lower directory
    not listed yet.  Each shows LOWERDIR's st_nlink until its last name in the
    mount goes; then ``a`` is freed with its pages, ``b`` counts the name left
    inside, which is still found when its directory is listed."""
    root, outside = tmp_path / "lower", tmp_path / "outside"
    (root / "d" / "deep").mkdir(parents=True)
    outside.mkdir()
    (root / "a").write_bytes(b"A" * 400_000)  # mapped at its first write
    os.link(root / "a", outside / "a")
    (root / "b").write_bytes(b"B" * 10)  # copied at its first write
    os.link(root / "b", root / "d" / "deep" / "b")
    os.link(root / "b", outside / "b")
    fs = overlay_fs(tmp_path, arena)
    a, b = fs.lookup(ROOT_INO, b"a"), fs.lookup(ROOT_INO, b"b")
    assert a is not None and b is not None and (a.nlink, b.nlink) == (2, 3)
    for inode in (a, b):
        fh = fs.open(inode.ino, 0)
        fs.write(fh, 0, b"x" * 3 * PAGE)
        fs.release(fh)
    assert arena.pages_held == 3 + 3
    fs.unlink(ROOT_INO, b"a")
    assert (a.nlink, a.hidden_links, arena.pages_held) == (0, 0, 3)
    fs.forget(a.ino, a.lookups)
    assert a.ino not in fs.inodes
    fs.unlink(ROOT_INO, b"b")
    assert (b.nlink, b.hidden_links, arena.pages_held) == (1, 1, 3)
    fs.check_invariants()
    d = fs.lookup(ROOT_INO, b"d")
    deep = fs.lookup(d.ino, b"deep")  # type: ignore[union-attr]
    assert fs.lookup(deep.ino, b"b") is b and (b.nlink, b.hidden_links) == (1, 0)  # type: ignore[union-attr]
    fh = fs.open(b.ino, 0)
    assert bytes(fs.read(fh, 0, 4)) == b"xxxx"
    fs.release(fh)
    fs.unlink(deep.ino, b"b")  # type: ignore[union-attr]
    assert b.nlink == 0 and arena.pages_held == 0
    fs.forget(b.ino, b.lookups)
    fs.check_invariants()
