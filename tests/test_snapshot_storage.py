"""Copy-on-write snapshots of file contents (checkpoints, the storage side), in process.

``content.snapshot()`` shares every arena slot with the original; the first
change of a shared slot by either copies that slot (the pages it keeps), and
nothing else.  Every test checks the books against the contents themselves
(``check_books``): each physical slot's pages are counted once in
``Arena.pages_held``, ``Arena.shared`` counts the holders of each shared slot,
and holders of one slot see the same pages.  Lower files (``CowContent``) are
backed by real files in tmp_path, on a disk (mapped files must not be on tmpfs).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from mmfs.arena import PAGE, SLOT, Account, Arena, NoSpace
from mmfs.content import COPY_UP_LIMIT, AnonContent, CowContent
from mmfs.maps import MapBudget

MiB = 1 << 20
Contents = list[AnonContent | CowContent]


@pytest.fixture(params=[True, False], ids=["pwrite", "copy"])
def arena(request: pytest.FixtureRequest) -> Arena:
    """Both ways of storing bytes: pwrite and copy_file_range on the shmem file (root), or through the map."""
    arena = Arena(256 * MiB, page_limit=(16 * MiB) // PAGE, store_with_pwrite=request.param)
    assert (arena.file is not None) == request.param
    return arena


# --- the books ------------------------------------------------------------------
def anon_parts(content: AnonContent | CowContent) -> AnonContent:
    return content.tail if isinstance(content, CowContent) else content


def check_books(arena: Arena, contents: Contents, baseline: int = 0) -> None:
    """Every physical slot counted once; shared slots look the same to every
    holder and are listed with their number of holders; accounts and the
    arena's share add up to ``pages_held`` (no content here is settled)."""
    holders: Counter[int] = Counter()
    masks: dict[int, int] = {}
    accounts: dict[int, Account] = {}
    for content in contents:
        anon = anon_parts(content)
        assert set(anon._slots) == set(anon._held) and all(anon._held.values())
        assert anon.pages == sum(mask.bit_count() for mask in anon._held.values())
        shared_pages = sum(anon._held[i].bit_count() for i, slot in anon._slots.items() if slot in arena.shared)
        assert anon._shared_pages == shared_pages
        for index, slot in anon._slots.items():
            holders[slot] += 1
            assert masks.setdefault(slot, anon._held[index]) == anon._held[index], "holders see different pages"
        accounts[id(anon.account)] = anon.account
    physical = sum(mask.bit_count() for mask in masks.values())
    dirty = sum(content.dirty.count for content in contents if isinstance(content, CowContent))
    assert arena.pages_held == baseline + physical + dirty
    for slot, count in holders.items():
        assert arena.shared.get(slot, 1) == count or count == 1 and arena.shared.get(slot) in (None, 1)
    assert set(arena.shared) <= set(holders), "a shared slot nobody holds"
    charged = sum(account.charged for account in accounts.values())
    assert charged + sum(masks[slot].bit_count() for slot in arena.shared) == physical + dirty
    assert arena.slots_in_use() == len(holders)


def release_all(arena: Arena, contents: Contents, order: random.Random | None = None) -> None:
    """Release in a random order, checking the books each time; nothing is left."""
    remaining = list(contents)
    if order is not None:
        order.shuffle(remaining)
    while remaining:
        remaining.pop().release()
        check_books(arena, remaining)
    assert (arena.pages_held, arena.slots_in_use(), arena.shared) == (0, 0, {})


def everything(content: AnonContent | CowContent) -> bytes:
    return bytes(content.read(0, content.size))


def written(arena: Arena) -> AnonContent:
    """Three slots: the first with pages 0, 1, 2 and 5 written (the rest holes),
    a slot-sized hole, then a slot with one page; 5 MiB away, one byte."""
    content = AnonContent(arena)
    content.write(0, b"a" * (3 * PAGE))
    content.write(5 * PAGE + 10, b"b" * 20)
    content.write(2 * SLOT + PAGE, b"c" * PAGE)
    content.write(5 * MiB, b"d")
    return content


# --- AnonContent ------------------------------------------------------------------
def test_a_snapshot_shares_every_slot_and_copies_nothing(arena: Arena) -> None:
    content = written(arena)
    held, slots, before = arena.pages_held, arena.slots_in_use(), everything(content)
    copy = content.snapshot()
    assert (arena.pages_held, arena.slots_in_use()) == (held, slots)
    assert everything(copy) == before and copy.size == content.size and copy.pages == content.pages == 6
    assert copy.same_as(content) and content.same_as(copy)
    assert content.exclusive_pages() == copy.exclusive_pages() == 0
    assert content.account.charged == copy.account.charged == 0  # the arena charges shared slots
    assert sorted(arena.shared.values()) == [2, 2, 2]
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


@pytest.mark.parametrize("writer", ["original", "copy"])
def test_a_write_into_a_shared_slot_copies_that_slot_and_is_not_seen_by_the_other(arena: Arena, writer: str) -> None:
    content = written(arena)
    copy = content.snapshot()
    before = everything(content)
    changed, other = (content, copy) if writer == "original" else (copy, content)
    held = arena.pages_held
    assert changed.write(PAGE + 7, b"X") == 1  # slot 0 holds 4 pages: they are copied, nothing else
    assert arena.pages_held == held + 4 and changed.pages == other.pages == 6
    assert everything(other) == before and not changed.same_as(other)
    assert bytes(changed.read(PAGE, 9)) == b"a" * 7 + b"X" + b"a"
    assert changed.exclusive_pages() == 4 and other.exclusive_pages() == 4  # slot 0 each alone now
    changed.write(PAGE + 8, b"Y")
    changed.write(3 * PAGE, b"hole")  # a page not held in a slot already copied: one page
    assert arena.pages_held == held + 5
    changed.write(3 * SLOT, b"new slot")  # a slot nobody had: one page
    assert arena.pages_held == held + 6 and everything(other) == before
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


def test_holes_stay_holes_in_both(arena: Arena) -> None:
    content = written(arena)
    copy = content.snapshot()
    copy.write(SLOT + 100, b"in the hole slot")  # a new slot for the copy only
    assert bytes(content.read(SLOT, SLOT)) == bytes(SLOT)
    assert bytes(copy.read(4 * PAGE, PAGE)) == bytes(PAGE) and bytes(content.read(4 * PAGE, PAGE)) == bytes(PAGE)
    assert bytes(copy.read(3 * SLOT, 5 * MiB - 3 * SLOT)) == bytes(5 * MiB - 3 * SLOT)
    assert copy.pages == content.pages + 1
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


@pytest.mark.parametrize("cutter", ["original", "copy"])
def test_truncate_either_leaves_the_other_whole(arena: Arena, cutter: str) -> None:
    content = written(arena)
    copy = content.snapshot()
    before = everything(content)
    cut, other = (content, copy) if cutter == "original" else (copy, content)
    held = arena.pages_held
    cut.truncate(2 * SLOT)  # whole slots let go: no page taken, none freed (the other holds them)
    assert arena.pages_held == held and cut.pages == 4 and everything(other) == before
    cut.truncate(4 * PAGE)  # slot 0 loses page 5, keeps 0-2: those are copied
    assert arena.pages_held == held + 3 and cut.pages == 3
    cut.truncate(PAGE + 100)  # its own slot now: page 2 freed, page 1's tail zeroed
    assert arena.pages_held == held + 2
    cut.truncate(3 * SLOT)  # growing exposes zeros
    assert everything(cut) == b"a" * (PAGE + 100) + bytes(3 * SLOT - PAGE - 100)
    assert everything(other) == before and other.pages == 6
    check_books(arena, [content, copy])
    other.truncate(0)
    assert everything(cut) == b"a" * (PAGE + 100) + bytes(3 * SLOT - PAGE - 100)
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


def test_truncating_mid_page_into_a_shared_slot_copies_the_pages_kept(arena: Arena) -> None:
    content = AnonContent(arena)
    content.write(0, b"z" * (10 * PAGE))
    copy = content.snapshot()
    copy.truncate(3 * PAGE + 1)  # keeps pages 0-3, zeroes the tail of page 3
    assert arena.pages_held == 10 + 4 and copy.pages == 4
    copy.truncate(8 * PAGE)
    assert everything(copy) == b"z" * (3 * PAGE + 1) + bytes(5 * PAGE - 1)
    assert everything(content) == b"z" * (10 * PAGE)
    content.truncate(5 * PAGE)  # page-aligned into a slot the copy let go of: taken back, no copy
    assert arena.pages_held == 5 + 4 and arena.shared == {}
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


def test_enospc_when_the_copy_does_not_fit_and_nothing_changed(arena: Arena) -> None:
    arena.page_limit = 13
    content = AnonContent(arena)
    content.write(0, b"x" * (2 * PAGE))  # slot 0: 2 pages
    content.write(SLOT, b"y" * (8 * PAGE))  # slot 1: 8 pages
    copy = content.snapshot()
    before, shared = everything(content), dict(arena.shared)
    with pytest.raises(NoSpace) as info:
        copy.write(SLOT, b"!")  # slot 1's 8 pages must be copied: 3 are free
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(NoSpace):
        copy.truncate(SLOT + 5 * PAGE + 1)  # keeps 6 pages of slot 1: a copy of 6
    assert (arena.pages_held, arena.shared, everything(copy), copy.size) == (10, shared, before, content.size)
    assert copy.same_as(content)
    assert copy.write(SLOT - 1, b"ab") == 1  # short: slot 0's copy and its page 15 fit, slot 1's copy does not
    assert arena.pages_held == 13 and bytes(copy.read(SLOT - 2, 3)) == b"\0ay"
    assert everything(content) == before
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


def test_a_write_into_a_shared_slot_is_cut_short_at_the_last_page_that_fits(arena: Arena) -> None:
    arena.page_limit = 5
    content = AnonContent(arena)
    content.write(0, b"x" * (2 * PAGE))
    copy = content.snapshot()
    assert copy.write(0, b"y" * (4 * PAGE)) == 3 * PAGE  # the slot's 2 pages copied, then 1 new page: 3 free
    assert arena.pages_held == 5 and everything(content) == b"x" * (2 * PAGE)
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


def test_the_system_refusing_the_copy_changes_nothing(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    content = written(arena)
    copy = content.snapshot()

    def refuse(*args: object) -> None:
        raise NoSpace()  # as Arena.copy says shmem's ENOMEM

    monkeypatch.setattr(arena, "copy", refuse)
    held, shared, slots = arena.pages_held, dict(arena.shared), arena.slots_in_use()
    with pytest.raises(NoSpace):
        copy.write(0, b"!")
    assert (arena.pages_held, arena.shared, arena.slots_in_use()) == (held, shared, slots)
    monkeypatch.undo()
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


@pytest.mark.parametrize("seed", range(6))
def test_releasing_everything_in_any_order_returns_to_the_baseline(arena: Arena, seed: int) -> None:
    rng = random.Random(seed)
    bystander = AnonContent(arena)
    bystander.write(0, b"not shared")
    baseline = arena.pages_held
    contents: Contents = [written(arena)]
    for _ in range(5):
        source = rng.choice(contents)
        contents.append(source.snapshot())
        if rng.random() < 0.7:
            target = rng.choice(contents)
            target.write(rng.randrange(3 * SLOT), rng.randbytes(rng.randrange(1, 2 * PAGE)))
    check_books(arena, [bystander, *contents])
    remaining = list(contents)
    rng.shuffle(remaining)
    while remaining:
        remaining.pop().release()
        check_books(arena, [bystander, *remaining])
    assert arena.pages_held == baseline and arena.shared == {}
    bystander.release()
    assert arena.pages_held == 0


def test_chains_of_snapshots(arena: Arena) -> None:
    first = written(arena)
    second = first.snapshot()
    third = second.snapshot()
    assert sorted(arena.shared.values()) == [3, 3, 3] and third.same_as(first)
    second.write(0, b"2")
    assert bytes(first.read(0, 1)) == bytes(third.read(0, 1)) == b"a" and bytes(second.read(0, 1)) == b"2"
    fourth = second.snapshot()
    assert fourth.same_as(second) and not fourth.same_as(first)
    first.release()
    assert bytes(third.read(0, 2)) == b"aa" and bytes(fourth.read(0, 2)) == b"2a"
    check_books(arena, [second, third, fourth])
    third.write(0, b"3")  # slot 0: held by third alone now (second copied it, first let go): no copy
    assert arena.pages_held == 6 + 4 and bytes(fourth.read(0, 1)) == b"2"
    check_books(arena, [second, third, fourth])
    release_all(arena, [second, third, fourth])


def test_snapshots_of_many_small_files_are_cheap() -> None:
    arena = Arena(2 << 30, 0)
    contents = []
    for number in range(20_000):
        content = AnonContent(arena)
        content.write(0, number.to_bytes(4, "little"))
        contents.append(content)
    start = time.process_time()
    copies = [content.snapshot() for content in contents]
    elapsed = time.process_time() - start
    assert elapsed < 0.5, f"{elapsed:.2f} s for 20,000 snapshots"  # about 0.05 s here
    assert arena.pages_held == 20_000 and bytes(copies[12_345].read(0, 4)) == (12_345).to_bytes(4, "little")
    for content in contents + copies:
        content.release()
    assert (arena.pages_held, arena.shared) == (0, {})


def test_uncharge_gives_back_only_the_pages_a_file_holds_alone(arena: Arena) -> None:
    """A file that loses its last name while a checkpoint shares its pages: its
    own pages go back at once, the shared ones stay counted until the last
    holder lets go, or go back when the settled file takes them over alone."""
    content = AnonContent(arena)
    content.write(0, b"s" * (3 * PAGE))  # slot 0: will be shared
    copy = content.snapshot()
    content.write(SLOT, b"own" * 10)  # slot 1: its own
    content.uncharge()
    assert arena.pages_held == 3  # the shared slot still counts: the copy holds it
    copy.release()
    assert arena.pages_held == 3  # now the settled file's alone, but charged until it lets go or changes it
    content.write(0, b"!")  # it takes the slot back: its pages no longer count
    assert arena.pages_held == 0 and bytes(content.read(0, 2)) == b"!s"
    content.release()
    assert (arena.pages_held, arena.slots_in_use(), arena.shared) == (0, 0, {})
    settled = AnonContent(arena)
    settled.write(0, b"x" * PAGE)
    settled.uncharge()
    twin = settled.snapshot()  # a settled file's pages count again once shared
    assert arena.pages_held == 1
    settled.release()
    twin.release()
    assert (arena.pages_held, arena.slots_in_use()) == (0, 0)


def test_contents_sharing_an_account_keep_it_exact(arena: Arena) -> None:
    account = Account(arena)
    content = AnonContent(arena, account)
    content.write(0, b"x" * (2 * PAGE))
    copy = content.snapshot(account)
    assert account.charged == 0
    copy.write(0, b"y")
    assert account.charged == 2 and arena.pages_held == 4
    release_all(arena, [content, copy])
    assert account.charged == 0


# --- CowContent -------------------------------------------------------------------
@pytest.fixture
def lower_file(tmp_path: Path) -> Path:
    path = tmp_path / "lower"
    path.write_bytes(random.Random(1).randbytes(MiB + 1000))  # over COPY_UP_LIMIT, ends mid-page
    return path


def cow(arena: Arena, maps: MapBudget, path: Path) -> CowContent:
    size = path.stat().st_size
    return CowContent(arena, maps, lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC), size, -(-size // 512))


def test_a_mapped_lower_file_moves_its_written_pages_and_stops_mapping(arena: Arena, lower_file: Path) -> None:
    maps = MapBudget(limit=4, leases=False)
    content = cow(arena, maps, lower_file)
    lower = lower_file.read_bytes()
    expected = bytearray(lower)
    for offset, data in [(5, b"head"), (3 * PAGE, b"p" * (3 * PAGE)), (len(expected) - 10, b"across the end")]:
        content.write(offset, data)
        expected[offset : offset + len(data)] = data
    assert content.map is not None and content.dirty.count == 1 + 3 + 1 and arena.pages_held == 5 + 1
    copy = content.snapshot()
    assert content.map is None and maps.mapped == set() and content.copying and copy.copying
    # The page straddling the backing file's end was held twice (the map's
    # copy below the end, the tail's above it): it is one page now.
    assert arena.pages_held == 5 and content.dirty.count == 0 and content.copied.count == 5
    assert everything(content) == everything(copy) == expected and copy.same_as(content)
    assert copy.pages == content.pages and copy.modified
    assert content.exclusive_pages() == copy.exclusive_pages() == 0
    check_books(arena, [content, copy])
    copy.write(4 * PAGE, b"COPY")  # a shared slot of the tail: copied (4 pages), the original unchanged
    content.write(100 * PAGE, b"ORIG")  # a backing page: copied from the backing file, one page
    assert arena.pages_held == 5 + 4 + 1
    assert copy.exclusive_pages() == 4 and content.exclusive_pages() == 4 + 1  # slot 0 each alone; page 100
    assert everything(content) == expected[: 100 * PAGE] + b"ORIG" + expected[100 * PAGE + 4 :]
    assert everything(copy) == expected[: 4 * PAGE] + b"COPY" + expected[4 * PAGE + 4 :]
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])
    assert lower_file.read_bytes() == lower


def test_a_lower_file_never_written_shares_the_backing_file_and_both_may_map(arena: Arena, lower_file: Path) -> None:
    maps = MapBudget(limit=4, leases=False)
    content = cow(arena, maps, lower_file)
    assert content.read(0, 4) == lower_file.read_bytes()[:4]
    copy = content.snapshot()
    assert arena.pages_held == 0 and not copy.copying and copy.pages == content.pages
    copy.write(0, b"copy")
    content.write(PAGE, b"orig")
    assert copy.map is not None and content.map is not None and maps.mapped == {copy, content}
    lower = lower_file.read_bytes()
    assert everything(copy) == b"copy" + lower[4:]
    assert everything(content) == lower[:PAGE] + b"orig" + lower[PAGE + 4 :]
    assert arena.pages_held == 2
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])
    assert maps.mapped == set()


@pytest.mark.parametrize("size", [1000, MiB + 1000], ids=["small", "large"])
def test_an_arena_copied_lower_file_shares_its_tail(arena: Arena, tmp_path: Path, size: int) -> None:
    path = tmp_path / "lower"
    path.write_bytes(b"L" * size)
    maps = MapBudget(limit=0, leases=False)  # no map: written pages are copied into the tail
    content = cow(arena, maps, path)
    content.write(10, b"written")
    content.write(size + 5, b"tail")
    held = arena.pages_held
    copy = content.snapshot()
    assert arena.pages_held == held and copy.copied.count == content.copied.count
    content.truncate(5)
    copy.write(0, b"Q")
    lower = b"L" * size
    assert everything(content) == b"LLLLL" and copy.lower_size == size
    assert everything(copy) == b"Q" + lower[1:10] + b"written" + lower[17:] + bytes(5) + b"tail"
    check_books(arena, [content, copy])
    content.truncate(size)
    assert everything(content) == b"LLLLL" + bytes(size - 5)
    release_all(arena, [content, copy])


def test_a_failed_move_of_mapped_pages_leaves_the_file_mapped_and_whole(
    arena: Arena, lower_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    maps = MapBudget(limit=4, leases=False)
    content = cow(arena, maps, lower_file)
    content.write(len(lower_file.read_bytes()) + 10, b"tail")  # the tail holds the page past the end
    for page in (0, 1, 2, 50, 51, 255):
        content.write(page * PAGE + 1, b"w")
    content.write(MiB + 100, b"x")  # the page straddling the backing file's end
    before, held = everything(content), arena.pages_held
    stores = itertools.count()
    real_store = arena.store

    def fails_at_the_third(offset: int, data: memoryview) -> None:
        if next(stores) == 2:
            raise NoSpace()
        real_store(offset, data)

    monkeypatch.setattr(arena, "store", fails_at_the_third)
    with pytest.raises(NoSpace):
        content.snapshot()
    monkeypatch.undo()
    assert content.map is not None and content.dirty.count == 7 and not content.copying and content.copied.count == 0
    assert (arena.pages_held, everything(content)) == (held, before)
    check_books(arena, [content])
    copy = content.snapshot()
    assert everything(copy) == everything(content) == before and arena.pages_held == held - 1  # the straddling page
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


def test_a_lower_file_mapped_after_a_snapshot_of_its_tail_copies_the_shared_slot_before_moving(
    arena: Arena, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written past its end (the tail), snapshotted, then written below its end
    (mapped): the tail slot around the end is shared, and the next snapshot's
    move writes into it.  It is copied first: if that does not fit, or if the
    system refuses a page of the move, the snapshot fails and the file is as it
    was (only the copy of that slot, if made, stays: the same bytes)."""
    path = tmp_path / "lower"
    size = MiB + 5 * PAGE + 1000  # ends in page 261, in slot 16 (pages 256-271)
    path.write_bytes(b"L" * size)
    maps = MapBudget(limit=4, leases=False)
    content = cow(arena, maps, path)
    content.write(size + 10, b"past the end")  # tail page 261
    first = content.snapshot()
    content.write(MiB + PAGE, b"below the end")  # mapped: page 257
    content.write(size - 10, b"straddles")  # page 261 of the map
    assert content.map is not None and arena.pages_held == 1 + 2
    expected = everything(content)

    def unchanged(held: int) -> None:
        assert content.map is not None and content.dirty.count == 2 and arena.pages_held == held
        assert everything(content) == expected
        check_books(arena, [content, first])

    arena.page_limit = 3  # the copy of the shared tail slot (1 page) does not fit
    with pytest.raises(NoSpace):
        content.snapshot()
    unchanged(3)
    arena.page_limit = 4
    stores = itertools.count()
    real_store = arena.store

    def refuses_the_straddling_page(offset: int, data: memoryview) -> None:
        if next(stores) == 1:  # page 257 went in, then page 261
            raise NoSpace()
        real_store(offset, data)

    monkeypatch.setattr(arena, "store", refuses_the_straddling_page)
    with pytest.raises(NoSpace):
        content.snapshot()
    monkeypatch.undo()
    assert content.tail._slots[16] not in arena.shared  # the copy made stays: the same bytes, one page more
    unchanged(4)
    second = content.snapshot()
    assert content.map is None and arena.pages_held == 3  # first's slot 16, and the tail's: pages 257 and 261
    assert everything(second) == everything(content) == expected
    assert everything(first) == b"L" * size + bytes(10) + b"past the end"
    check_books(arena, [content, first, second])
    release_all(arena, [content, first, second])


def test_a_lease_break_still_moves_the_pages_of_a_snapshot(arena: Arena, lower_file: Path) -> None:
    maps = MapBudget(limit=4, leases=False)
    content = cow(arena, maps, lower_file)
    copy = content.snapshot()
    copy.write(PAGE, b"mapped copy")
    assert copy.map is not None
    copy.retire()  # what lease_breaks does
    assert copy.map is None and copy.copying and not copy.lost and copy.copied.count == 1
    assert bytes(copy.read(PAGE, 11)) == b"mapped copy" and arena.pages_held == 1
    check_books(arena, [content, copy])
    release_all(arena, [content, copy])


# --- random operations against bytearrays ------------------------------------------
class Model:
    """Contents and the bytes each should hold."""

    def __init__(self, arena: Arena, rng: random.Random, make: Callable[[], tuple[AnonContent | CowContent, bytes]]):
        self.arena, self.rng = arena, rng
        first, data = make()
        self.pairs: list[tuple[AnonContent | CowContent, bytearray]] = [(first, bytearray(data))]

    def step(self) -> None:
        rng = self.rng
        content, expected = rng.choice(self.pairs)
        action = rng.random()
        if action < 0.45:
            offset = rng.randrange(len(expected) + 3 * PAGE)
            data = rng.randbytes(rng.choice([1, 100, PAGE, 3 * PAGE + 7, SLOT + 1]))
            assert content.write(offset, data) == len(data)
            if offset > len(expected):
                expected.extend(bytes(offset - len(expected)))
            expected[offset : offset + len(data)] = data
        elif action < 0.6:
            size = rng.choice([0, rng.randrange(len(expected) + 1), rng.randrange(2 * SLOT + 1)])
            content.truncate(size)
            del expected[size:]
            expected.extend(bytes(size - len(expected)))
        elif action < 0.8 and len(self.pairs) < 6:
            self.pairs.append((content.snapshot(), bytearray(expected)))
        elif action < 0.9 and len(self.pairs) > 1:
            self.pairs.remove((content, expected))
            content.release()
        else:
            offset = rng.randrange(len(expected) + 1)
            length = rng.randrange(3 * SLOT)
            assert bytes(content.read(offset, length)) == expected[offset : offset + length]

    def check(self) -> None:
        for content, expected in self.pairs:
            assert content.size == len(expected) and everything(content) == expected
            other = next((twin for twin, _ in self.pairs if twin is not content and twin.same_as(content)), None)
            if other is not None:
                assert everything(other) == expected
        check_books(self.arena, [content for content, _ in self.pairs])


@pytest.mark.parametrize("seed", range(3))
def test_random_operations_on_an_original_and_its_snapshots(arena: Arena, seed: int) -> None:
    rng = random.Random(seed)
    model = Model(arena, rng, lambda: (AnonContent(arena), b""))
    for _ in range(250):
        model.step()
        model.check()
    release_all(arena, [content for content, _ in model.pairs], rng)


@pytest.mark.parametrize("map_limit", [8, 0], ids=["mapped", "arena-copied"])
@pytest.mark.parametrize("seed", range(2))
def test_random_operations_on_a_lower_file_and_its_snapshots(
    arena: Arena, tmp_path: Path, seed: int, map_limit: int
) -> None:
    rng = random.Random(seed)
    path = tmp_path / "lower"
    path.write_bytes(rng.randbytes(COPY_UP_LIMIT + 3 * SLOT + 100))
    maps = MapBudget(limit=map_limit, leases=False)
    model = Model(arena, rng, lambda: (cow(arena, maps, path), path.read_bytes()))
    for _ in range(200):
        model.step()
        model.check()
    release_all(arena, [content for content, _ in model.pairs], rng)
    assert maps.mapped == set()


def test_pages_are_counted_once_however_many_snapshots(arena: Arena) -> None:
    content = AnonContent(arena)
    content.write(0, os.urandom(3 * MiB))
    copies = [content.snapshot() for _ in range(10)]
    assert arena.pages_held == 3 * MiB // PAGE and set(arena.shared.values()) == {11}
    assert sum(copy.exclusive_pages() for copy in copies) == 0
    for copy in copies:
        copy.release()
    assert arena.shared == {i: 1 for i in arena.shared} and content.exclusive_pages() == 3 * MiB // PAGE
    content.write(0, b"!")  # takes its first slot back: nothing copied
    assert arena.pages_held == 3 * MiB // PAGE and len(arena.shared) == 3 * MiB // SLOT - 1
    content.release()
    assert (arena.pages_held, arena.shared) == (0, {})

