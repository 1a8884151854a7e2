"""File contents: the bytes of one regular file.

``AnonContent`` maps a file's 64 KiB slot indices to arena slots and remembers,
per slot, which pages have been written (a bitmask).  Holes (slots or pages
never written) read as zeros without touching the map, so they hold no memory.

Invariant: every byte of a held page that lies at or beyond ``size`` is zero, so
growing a file (truncate up, or a write past EOF) exposes zeros for free.

Copy-on-write sharing (checkpoints): ``snapshot()`` gives a second content that
shares every slot with the first; nothing is copied then.  A slot listed in
``Arena.shared`` is never changed in place: the first write or truncate into it
copies the pages it keeps into a new slot (``AnonContent._own``), so a change to
one content is never seen by another.  Two contents with the same
``generation`` hold the same bytes: every change draws a new number, and a
snapshot keeps its original's.

``CowContent`` (overlay mode) serves a lower file from its backing file and
maps it ``MAP_PRIVATE`` at the first write, so only written pages are copied.

Knows only bytes, the arena and backing file descriptors; synchronous, single
caller.  A lease break is handled outside any request, so nothing escapes
``MapBudget.lease_breaks``: what goes wrong there is logged here.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterator

from .arena import PAGE, PAGES_PER_SLOT, SLOT, Account, Arena, Buffer, NoSpace
from .linux import holds_read_lease, in_memory_filesystem
from .maps import MapBudget

log = logging.getLogger(__name__)


def page_mask(inner: int, length: int) -> int:
    """Bitmask of the pages of a slot that bytes [inner, inner+length) touch."""
    first = inner // PAGE
    last = (inner + length - 1) // PAGE
    return ((1 << (last - first + 1)) - 1) << first


class AnonContent:
    """A file's bytes in anonymous shared memory, page-granular and sparse."""

    __slots__ = (
        "_borrowed", "_held", "_shared_pages", "_slots", "_unsynced", "account", "arena", "generation", "pages", "size",
    )

    def __init__(self, arena: Arena, account: Account | None = None) -> None:
        self.arena = arena
        self.account = account or Account(arena)
        self.size = 0
        self.pages = 0  # pages held, for st_blocks
        self.generation = next(arena.generations)  # a new number at each change; equal: the same bytes
        self._slots: dict[int, int] = {}  # file slot index -> arena slot
        self._held: dict[int, int] = {}  # file slot index -> mask of pages written
        self._unsynced: set[int] | None = None  # file slot indices written since the last sync
        # Pages of this content's slots listed in Arena.shared.  Only this
        # content's own calls list or unlist its slots there (no other holder
        # can unlist a slot it still holds), so it keeps the count.
        self._shared_pages = 0
        # _slots and _held may be the very dicts of a snapshot's (most files
        # never change after a checkpoint): copied before the first change.
        self._borrowed = False

    @property
    def modified(self) -> bool:
        """Always: a file made in the mount has no origin to equal."""
        return True

    # --- sharing ----------------------------------------------------------
    def snapshot(self, account: Account | None = None) -> AnonContent:
        """A second content with the same bytes, sharing every slot with this one:
        O(slots), no byte copied and no page taken.  From then on a change to
        either copies the slot it changes (only the pages it keeps), so neither
        ever sees the other's changes.  The pages of this content's own slots are
        handed over to the arena, which charges each shared slot once.
        ``account``: what the copy charges its own pages to (a new one by
        default).  NoSpace only for a settled content, whose pages count again."""
        if self._slots:
            if self.pages > self._shared_pages:
                self.account.hand_over(self.pages - self._shared_pages)
            self.arena.share(self._slots.values())
        # A checkpoint snapshots every file: built field by field, as __init__
        # would only make what is replaced here.
        copy = AnonContent.__new__(AnonContent)
        copy.arena, copy.account = self.arena, account or Account(self.arena)
        copy.size, copy.pages, copy.generation = self.size, self.pages, self.generation
        copy._slots, copy._held, copy._unsynced = self._slots, self._held, None
        copy._borrowed = self._borrowed = True
        copy._shared_pages = self._shared_pages = self.pages
        return copy

    def _unborrow(self) -> None:
        """Own copies of the slot maps, before changing them."""
        self._slots, self._held, self._borrowed = self._slots.copy(), self._held.copy(), False

    def same_as(self, other: object) -> bool:
        """Whether ``other`` holds the same bytes for sure: it is a snapshot of
        this content (or this of it, or both of a third) and neither changed
        since.  Cheap; False says nothing (the bytes may still be equal)."""
        return isinstance(other, AnonContent) and other.generation == self.generation

    def exclusive_pages(self) -> int:
        """Pages of the slots no other content holds: what releasing this content
        would give back to the budget."""
        shared = self.arena.shared
        return sum(held.bit_count() for index, held in self._held.items() if shared.get(self._slots[index], 1) == 1)

    def _own(self, index: int, keep: int = (1 << PAGES_PER_SLOT) - 1) -> int:
        """The arena slot of file slot ``index``, this content's alone so that it
        may be changed.  A shared slot is taken back if every other holder let go
        of it; else its pages in ``keep`` are copied into a new slot, charged to
        this content (NoSpace, and nothing changed, if they do not fit)."""
        slot = self._slots[index]
        holders = self.arena.shared.get(slot)
        if holders is None:
            return slot
        held = self._held[index]
        if holders == 1:
            self._shared_pages -= held.bit_count()
            self.arena.take_back(slot)
            self.account.adopt(held.bit_count())
            return slot
        kept = held & keep
        self.account.take(kept.bit_count())
        copy = None
        try:
            copy = self.arena.alloc_slot()
            for first, count in _bit_runs(kept):
                self.arena.copy(slot * SLOT + first * PAGE, copy * SLOT + first * PAGE, count * PAGE)
        except OSError:
            self.account.give(kept.bit_count())
            if copy is not None:
                self.arena.free_slot(copy)
            raise
        self.arena.let_go(slot, held.bit_count())
        self._shared_pages -= held.bit_count()
        self._slots[index], self._held[index] = copy, kept
        self.pages -= (held & ~kept).bit_count()
        return copy

    # --- reading ----------------------------------------------------------
    def read(self, offset: int, length: int) -> Buffer:
        """Bytes [offset, offset+length) clipped to the size; holes are zeros."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        target = memoryview(out)
        for index, inner, n in _segments(offset, end):
            at = index * SLOT + inner - offset
            self._read_slot_into(target[at : at + n], index, inner)
        return out

    def _read_slot_into(self, target: memoryview, index: int, inner: int) -> None:
        """Fill ``target`` from slot ``index`` at ``inner``; pages never written stay zero."""
        slot = self._slots.get(index)
        if slot is None:
            return
        held = self._held[index]
        base = slot * SLOT
        end = inner + len(target)
        if page_mask(inner, len(target)) & ~held == 0:
            self.arena.load_into(target, base + inner)
            return
        pos = inner
        while pos < end:
            page = pos // PAGE
            stop = min((page + 1) * PAGE, end)
            if held >> page & 1:
                self.arena.load_into(target[pos - inner : stop - inner], base + pos)
            pos = stop

    # --- writing ----------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> int:
        """Store data at offset; returns bytes written (short only at the size limit)."""
        if not data:
            return 0
        if self._borrowed:
            self._unborrow()
        end = offset + len(data)
        if self.pages_needed(offset, end) > self.arena.pages_free():
            end = self._fitting_end(offset, end)
            if end <= offset:
                raise NoSpace()
        source = memoryview(data)
        for index, inner, n in _segments(offset, end):
            pos = index * SLOT + inner - offset
            try:
                self._store(index, inner, source[pos : pos + n])
            except NoSpace:  # the system refused the pages: short, or ENOSPC if nothing went in
                if pos == 0:
                    raise
                end = offset + pos
                break
        self.size = max(self.size, end)
        self.generation = next(self.arena.generations)
        return end - offset

    def _store(self, index: int, inner: int, data: memoryview) -> None:
        """Store bytes inside slot ``index`` at ``inner``, charging the pages they
        take first; if the arena refuses them, those pages are given back."""
        slot = self._slots.get(index)
        if slot is None:
            slot = self._slots[index] = self.arena.alloc_slot()
            self._held[index] = 0
        elif slot in self.arena.shared:
            slot = self._own(index)
        mask = page_mask(inner, len(data))
        fresh = mask & ~self._held[index]
        self.account.take(fresh.bit_count())
        try:
            self.arena.store(slot * SLOT + inner, data)
        except OSError:
            self.account.give(fresh.bit_count())
            self._forget_pages(index, fresh)
            raise
        self.pages += fresh.bit_count()
        self._held[index] |= mask
        if self._unsynced is None:
            self._unsynced = set()
        self._unsynced.add(index)

    def _forget_pages(self, index: int, pages: int) -> None:
        """Punch the pages of slot ``index`` in the mask ``pages`` (a failed store
        may have filled some), and free the slot if it holds nothing else."""
        slot = self._slots[index]
        if self._held[index] == 0:
            self.arena.free_slot(self._slots.pop(index))
            del self._held[index]
            return
        for page in range(PAGES_PER_SLOT):
            if pages >> page & 1:
                self.arena.punch(slot, page, 1)

    def pages_needed(self, offset: int, end: int) -> int:
        """The pages a write of [offset, end) takes: those not held yet, and the
        held pages of each slot it touches that others share (copied first)."""
        shared = self.arena.shared
        needed = 0
        for index, inner, n in _segments(offset, end):
            held = self._held.get(index, 0)
            needed += (page_mask(inner, n) & ~held).bit_count()
            if shared and held and shared.get(self._slots[index], 1) > 1:
                needed += held.bit_count()
        return needed

    def _fitting_end(self, offset: int, end: int) -> int:
        """The furthest end <= ``end`` whose new pages (and shared slots to
        copy) fit in the free budget."""
        budget = self.arena.pages_free()
        shared = self.arena.shared
        page = offset // PAGE
        while page * PAGE < end:
            index, bit = divmod(page, PAGES_PER_SLOT)
            held = self._held.get(index, 0)
            first_in_slot = bit == 0 or page == offset // PAGE
            if first_in_slot and held and shared.get(self._slots[index], 1) > 1:
                if held.bit_count() > budget:
                    return max(offset, page * PAGE)
                budget -= held.bit_count()
            if not held >> bit & 1:
                if budget == 0:
                    return max(offset, page * PAGE)
                budget -= 1
            page += 1
        return end

    # --- size and lifetime ----------------------------------------------
    def truncate(self, size: int) -> None:
        """Set the size; pages wholly past it are returned to the system.  Cutting
        into a shared slot copies the pages it keeps first: that alone may fail
        (NoSpace), before anything changed."""
        if size < self.size:
            if self._borrowed:
                self._unborrow()
            self._own_cut_slot(size)
            self._zero_tail(size)
            self._drop_pages_from(-(-size // PAGE))
        self.size = size
        self.generation = next(self.arena.generations)

    def _own_cut_slot(self, size: int) -> None:
        """Make the slot that ``size`` cuts this content's own, if that cut
        changes it and leaves it any page (one left empty is simply let go)."""
        index, inner = divmod(size, SLOT)
        if not inner or index not in self._slots:
            return
        held = self._held[index]
        keep = (1 << -(-inner // PAGE)) - 1  # the pages holding bytes below size
        zeroed = inner % PAGE and held >> (inner // PAGE) & 1
        if held & keep and (held & ~keep or zeroed):
            self._own(index, keep)

    def _zero_tail(self, size: int) -> None:
        index, inner = divmod(size, SLOT)
        if inner % PAGE == 0 or index not in self._slots:
            return
        if self._held[index] >> (inner // PAGE) & 1:
            start = self._slots[index] * SLOT + inner
            stop = self._slots[index] * SLOT + (inner // PAGE + 1) * PAGE
            self.arena.view[start:stop] = bytes(stop - start)

    def _drop_pages_from(self, first_page: int) -> None:
        """Let go of every page from ``first_page`` on; a slot cut in two is this
        content's own (``_own_cut_slot``)."""
        first_index, first_bit = divmod(first_page, PAGES_PER_SLOT)
        for index in [i for i in self._slots if i >= first_index]:
            held = self._held[index]
            keep = held & ((1 << first_bit) - 1) if index == first_index else 0
            if not keep:
                self._let_go(index)
            elif keep != held:
                assert self._slots[index] not in self.arena.shared, "a shared slot changed in place"
                dropped = (held & ~keep).bit_count()
                self.account.give(dropped)
                self.pages -= dropped
                self._held[index] = keep
                self.arena.punch(self._slots[index], first_bit, PAGES_PER_SLOT - first_bit)

    def _let_go(self, index: int) -> None:
        """Drop file slot ``index`` whole."""
        self._give_up(self._slots.pop(index), self._held.pop(index).bit_count())

    def _give_up(self, slot: int, pages: int) -> None:
        """Let go of arena ``slot`` holding ``pages`` pages: they go back to the
        budget and the slot to the arena, or, if shared, to its other holders."""
        self.pages -= pages
        if slot in self.arena.shared:
            self._shared_pages -= pages
            self.arena.let_go(slot, pages)
        else:
            self.account.give(pages)
            self.arena.free_slot(slot)

    def own_slot(self, index: int) -> None:
        """Make file slot ``index``, if held, this content's own, as a write there
        would first (a shared slot is copied: NoSpace if that does not fit)."""
        if self._borrowed:
            self._unborrow()
        if index in self._slots:
            self._own(index)

    def discard_below(self, end_page: int) -> None:
        """Let go of every page below ``end_page`` (the pages held there are this
        content's alone): ``CowContent`` undoing a move of pages into its tail."""
        if self._borrowed:
            self._unborrow()
        end_index, end_bit = divmod(end_page, PAGES_PER_SLOT)
        for index in [i for i in self._slots if i <= end_index]:
            held = self._held[index]
            gone = held & ((1 << end_bit) - 1) if index == end_index else held
            if gone == held:
                self._let_go(index)
            elif gone:
                assert self._slots[index] not in self.arena.shared, "a shared slot changed in place"
                self.account.give(gone.bit_count())
                self.pages -= gone.bit_count()
                self._held[index] = held & ~gone
                for first, count in _bit_runs(gone):
                    self.arena.punch(self._slots[index], first, count)

    def release(self) -> None:
        """Give every page and slot back (shared ones to their other holders);
        the content is empty afterwards."""
        for index, slot in self._slots.items():  # the maps are left as they are: they may be borrowed
            self._give_up(slot, self._held[index].bit_count())
        self._slots, self._held, self._borrowed = {}, {}, False
        self.size = 0

    def closed(self) -> None:
        """The last handle went; nothing to let go of."""

    def uncharge(self) -> None:
        """Give this file's pages back to the size= budget (it is being freed).
        Those it shares stay counted until the others let go (``Account``)."""
        self.account.settle()

    def sync(self) -> None:
        """msync(MS_SYNC) the slots written since the last sync: fsync costs what
        was written since, not the size of the file."""
        for index in sorted(self._unsynced or ()):
            slot = self._slots.get(index)
            if slot is not None:  # not truncated away since
                self.arena.sync(slot)
        self._unsynced = None


class PageSet:
    """Page numbers of one file (the pages written, or copied), one byte per page.

    Adding a range, counting what a range lacks and splitting a range into runs
    cost what the range covers, in C (bytearray slices, ``count``, ``find``),
    never the size of the file: a bitmask ``int`` is copied whole by every
    change, which made one 8 KiB write to a 1 GiB file cost 45 microseconds."""

    __slots__ = ("_bytes", "count")

    def __init__(self) -> None:
        self._bytes = bytearray()  # 1 at the index of each page in the set
        self.count = 0

    def copy(self) -> PageSet:
        twin = PageSet()
        twin._bytes, twin.count = self._bytes[:], self.count
        return twin

    def __contains__(self, page: int) -> bool:
        return page < len(self._bytes) and self._bytes[page] == 1

    def __iter__(self) -> Iterator[int]:
        page = self._bytes.find(1)
        while page >= 0:
            yield page
            page = self._bytes.find(1, page + 1)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """(first, last) of each run of consecutive pages in the set, in order."""
        first = self._bytes.find(1)
        while first >= 0:
            end = self._bytes.find(0, first)
            end = len(self._bytes) if end < 0 else end
            yield first, end - 1
            first = self._bytes.find(1, end)

    def missing(self, first: int, last: int) -> int:
        """How many of the pages first..last are not in the set."""
        return last - first + 1 - self._bytes.count(1, first, last + 1)

    def add(self, first: int, last: int) -> None:
        """Add the pages first..last."""
        if len(self._bytes) <= last:
            self._bytes.extend(bytes(last + 1 - len(self._bytes)))
        self.count += self.missing(first, last)
        self._bytes[first : last + 1] = b"\x01" * (last - first + 1)

    def discard_from(self, first: int) -> int:
        """Remove every page from ``first`` on; returns how many there were."""
        dropped = self._bytes.count(1, first)
        del self._bytes[first:]
        self.count -= dropped
        return dropped

    def runs(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """Split bytes [offset, end) into runs of pages in the set (True) or not
        (False), in order."""
        first = offset // PAGE
        window = self._bytes[first : (end - 1) // PAGE + 1]
        count = (end - 1) // PAGE - first + 1
        runs: list[tuple[int, int, bool]] = []
        page = 0
        while page < count:
            mine = page < len(window) and window[page] == 1
            following = window.find(0 if mine else 1, page)
            if following < 0:
                following = len(window) if mine else count  # past the window: no page is in the set
            runs.append((max(offset, (first + page) * PAGE), min(end, (first + following) * PAGE), mine))
            page = following
        return runs


def _ranges(pages: list[int]) -> Iterator[tuple[int, int]]:
    """(first, last) of each run of consecutive numbers in sorted ``pages``."""
    for start, page in enumerate(pages):
        if start == 0 or pages[start - 1] != page - 1:
            first = page
        if start == len(pages) - 1 or pages[start + 1] != page + 1:
            yield first, page


def _bit_runs(mask: int) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of set bits in ``mask`` (pages of a slot)."""
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            first = bit
            while mask >> bit & 1:
                bit += 1
            yield first, bit - first
        else:
            bit += 1


def _segments(offset: int, end: int) -> list[tuple[int, int, int]]:
    """Split [offset, end) into (slot index, offset in slot, length) pieces."""
    out = []
    while offset < end:
        index, inner = divmod(offset, SLOT)
        n = min(SLOT - inner, end - offset)
        out.append((index, inner, n))
        offset += n
    return out


MOVE_CHUNK = 1 << 20  # a mapped file's written pages move into the arena a MiB at a time

# Lower files at most this big are copied into the arena at their first write
# instead of being mapped: for a small file per-page copy-on-write saves
# nothing, and every private mapping costs a VMA and a file descriptor.
COPY_UP_LIMIT = 256 * 1024


class BackingGone(OSError):
    """The backing file changed underneath the overlay (unsupported; EIO)."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "backing file changed underneath the overlay")


class PagesLost(OSError):
    """Pages written on the mount could not be kept when the backing file's
    writer took it back (see ``CowContent.retire``); the file answers EIO."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "pages written to this lower file were lost when its backing file changed")


class CowContent:
    """A lower file's bytes: the backing file, copy-on-write per page.

    Bytes [0, lower_size) come from the backing file: read with pread until the
    first write, then from a ``MAP_PRIVATE`` map of it, where the kernel copies
    exactly the pages written.  Where no map may be had (``MapBudget``), or where
    the backing file lives on tmpfs or ramfs (a write fault on a private map of
    a hole there would first allocate that page in the backing file), written
    pages are copied into the arena instead, page by page.  ``lower_size`` only
    ever shrinks (truncate), so everything at or beyond it lives in ``tail``, an
    ``AnonContent`` addressed by file offset: truncate-then-extend reads zeros.
    Small files are copied into the arena whole at their first write.

    A backing file that shrank underneath answers EIO, never SIGBUS: short
    preads are errors, and a mapped file is guarded by a lease whose break moves
    the written pages into the arena before the writer may go on.  If they find
    no room there, they are lost and the file answers EIO from then on (``lost``).

    ``snapshot()`` shares the tail's slots and the backing file: a mapped file
    first moves its written pages into the tail and is never mapped again (its
    map's private pages cannot be shared); one not mapped yet, and the copy, may
    still map at their first write, each with a map of its own.
    """

    __slots__ = (
        "_fd", "account", "arena", "copied", "copying", "dirty", "generation", "lost", "lower_pages", "lower_size",
        "map", "maps", "modified", "open_backing", "original_size", "size", "tail", "unsynced",
    )

    def __init__(self, arena: Arena, maps: MapBudget, open_backing: Callable[[], int], size: int, blocks: int) -> None:
        self.arena = arena
        self.maps = maps
        self.open_backing = open_backing
        self.size = size
        self.lower_size = size
        self.original_size = size
        self.lower_pages = min(-(-blocks * 512 // PAGE), -(-size // PAGE))  # as the backing file holds
        self.account = Account(arena)  # the map's written pages and the tail's
        self.tail = AnonContent(arena, self.account)  # by file offset: bytes past lower_size, and arena-copied pages
        self.tail.size = size
        self.map: mmap.mmap | None = None
        self.dirty = PageSet()  # map pages written (charged to the arena)
        self.unsynced: set[int] = set()  # map pages written since the last sync
        self.copying = False  # copy-on-write into the arena instead of a map
        self.copied = PageSet()  # backing pages copied into the tail
        self.lost = False  # written pages lost in a lease break: every access is EIO
        # Written or truncated since made: the bytes may differ from the backing
        # file's.  Rewriting the bytes it holds counts too (they are not compared).
        self.modified = False
        self.generation = next(arena.generations)  # as AnonContent's: equal means the same bytes
        self._fd: int | None = None

    @property
    def pages(self) -> int:
        return self.lower_pages + self.dirty.count + self.tail.pages

    # --- sharing ------------------------------------------------------------
    def snapshot(self) -> CowContent:
        """A second content with the same bytes, sharing the tail's slots and the
        backing file (unwritten pages are still read from it, through a
        descriptor of the copy's own, opened when needed).  A mapped file moves
        its written pages into the tail first (their charge moves with them) and
        stops mapping: that copies those pages, and may fail with NoSpace (or
        BackingGone), leaving this content as it was."""
        if self.map is not None:
            if self.map.size() < self.original_size:  # the map would be SIGBUS past the new end
                raise BackingGone()
            self._move_written_pages()
            self._unmap()
        # A checkpoint snapshots every file: built field by field, as __init__
        # would only make what is replaced here.
        copy = CowContent.__new__(CowContent)
        copy.arena, copy.maps, copy.open_backing = self.arena, self.maps, self.open_backing
        copy.size, copy.lower_size, copy.original_size, copy.lower_pages = (
            self.size, self.lower_size, self.original_size, self.lower_pages
        )
        copy.account = Account(self.arena)
        copy.tail = self.tail.snapshot(copy.account)
        copy.map, copy.dirty, copy.unsynced, copy._fd = None, PageSet(), set(), None
        copy.copying, copy.copied, copy.lost = self.copying, self.copied.copy(), self.lost
        copy.modified, copy.generation = self.modified, self.generation
        return copy

    def same_as(self, other: object) -> bool:
        """As ``AnonContent.same_as``."""
        return isinstance(other, CowContent) and other.generation == self.generation

    def exclusive_pages(self) -> int:
        """Pages no other content holds (the map's, and the tail's own slots);
        LOWERDIR's pages are not ours."""
        return self.dirty.count + self.tail.exclusive_pages()

    # --- the backing file -------------------------------------------------
    def _backing_fd(self) -> int:
        if self._fd is None:
            self._fd = self.open_backing()
        return self._fd

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._backing_fd(), length, offset)
        if len(data) != length:
            raise BackingGone()
        return data

    def _lower_read(self, offset: int, length: int) -> Buffer:
        """Bytes [offset, offset+length) below ``lower_size``: pages written on the
        mount from where they are kept (the map's private copies, or the arena),
        every other page with pread.  Never through the map for a page not
        written: a read fault would leave it mapped in the daemon (reading a
        2 GiB file would add 2 GiB to its RSS); pread only passes through the
        page cache."""
        if self.map is not None:
            if self.map.size() < self.original_size:  # the map would be SIGBUS past the new end
                raise BackingGone()
            written, kept = self.dirty, self._map_read
        else:
            written, kept = self.copied, self._tail_read  # a mapped file has nothing copied
        pieces = [
            kept(start, stop) if mine else self._pread(start, stop - start)
            for start, stop, mine in written.runs(offset, offset + length)
        ]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _map_read(self, start: int, stop: int) -> Buffer:
        assert self.map is not None
        return self.map[start:stop]

    def _tail_read(self, start: int, stop: int) -> Buffer:
        return self.tail.read(start, stop - start)

    # --- Content ------------------------------------------------------------
    def _check_lost(self) -> None:
        if self.lost:
            raise PagesLost()

    def read(self, offset: int, length: int) -> Buffer:
        self._check_lost()
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        split = max(offset, min(end, self.lower_size))
        low = self._lower_read(offset, split - offset) if split > offset else b""
        if split == end:
            return low
        high = self.tail.read(split, end - split)
        return bytes(low) + bytes(high) if low else high

    def write(self, offset: int, data: Buffer) -> int:
        self._check_lost()
        self.modified = True
        self.generation = next(self.arena.generations)
        end = offset + len(data)
        split = max(offset, min(end, self.lower_size))
        written = 0
        if split > offset:
            written = self._lower_write(offset, memoryview(data)[: split - offset])
        if split < end:
            try:
                written += self.tail.write(split, memoryview(data)[split - offset :])
            except NoSpace:
                if not written:
                    raise
        self.size = max(self.size, offset + written)
        self.tail.size = self.size
        return written

    def _lower_write(self, offset: int, data: memoryview) -> int:
        if self.map is None and not self.copying:
            if self.lower_size > COPY_UP_LIMIT and not in_memory_filesystem(self._backing_fd()):
                self.map = self.maps.try_map(self, self._backing_fd(), self.original_size)
            self.copying = self.map is None
        if self.map is not None:
            return self._map_write(offset, data)
        small = self.lower_size <= COPY_UP_LIMIT
        self._copy_pages(0 if small else offset, self.lower_size if small else offset + len(data))
        return self.tail.write(offset, data)

    def _copy_pages(self, offset: int, end: int) -> None:
        """Copy the backing bytes of the pages under [offset, end) into the arena, once."""
        first, last = offset // PAGE, (end - 1) // PAGE
        missing = [page for page in range(first, last + 1) if page not in self.copied]
        if not missing:
            return
        if self.tail.pages_needed(first * PAGE, min((last + 1) * PAGE, self.lower_size)) > self.arena.pages_free():
            raise NoSpace()
        for page in missing:
            start = page * PAGE
            self.tail.write(start, self._pread(start, min(PAGE, self.lower_size - start)))
            self.copied.add(page, page)
        self._close_backing_unless_mapped()

    def _map_write(self, offset: int, data: memoryview) -> int:
        assert self.map is not None
        if self.map.size() < self.original_size:
            raise BackingGone()
        first, last = offset // PAGE, (offset + len(data) - 1) // PAGE
        fresh = self.dirty.missing(first, last)
        self.account.take(fresh)
        if fresh:  # a fault would read read_ahead_kb around the page (MiBs): ask for these pages only
            os.posix_fadvise(self._backing_fd(), first * PAGE, (last - first + 1) * PAGE, os.POSIX_FADV_WILLNEED)
            self.dirty.add(first, last)
        self.unsynced.update(range(first, last + 1))
        self.map[offset : offset + len(data)] = data
        return len(data)

    def truncate(self, size: int) -> None:
        self._check_lost()
        self.tail.truncate(size)  # first: the one step that may fail (a shared slot of the tail copied)
        self.modified = True
        self.generation = next(self.arena.generations)
        if size < self.lower_size:
            self.lower_size = size
            self.lower_pages = min(self.lower_pages, -(-size // PAGE))
            self._drop_dirty_from(-(-size // PAGE))
            self.copied.discard_from(-(-size // PAGE))
        self.size = size

    def _drop_dirty_from(self, first_page: int) -> None:
        if self.map is None:
            return
        dropped = self.dirty.discard_from(first_page)
        self.unsynced = {page for page in self.unsynced if page < first_page}
        if not dropped:
            return
        self.account.give(dropped)
        self.map.madvise(mmap.MADV_DONTNEED, first_page * PAGE, len(self.map) - first_page * PAGE)

    # --- lifetime -----------------------------------------------------------
    def lease_broken(self) -> bool:
        return self._fd is not None and not holds_read_lease(self._fd)

    def retire(self) -> None:
        """The backing file is about to change (its writer waits for us): keep the
        pages written so far by moving them into the arena, and drop the map.

        Never raises.  Whatever fails, the map is dropped and the backing file
        closed, so that the writer may go on (a map touched after it truncated
        the file would be SIGBUS).  Pages that cannot be kept are lost: from
        then on the file answers EIO (``PagesLost``) rather than stale bytes.
        """
        self.copying = True  # never map this file again: its writer has it
        try:
            self._move_written_pages()
        except NoSpace:
            self.lost = True
            log.error("no room in memory for the pages written to a lower file whose backing file is being "
                      "changed underneath the overlay: they are lost, and that file answers EIO from now on")
        except Exception:
            self.lost = True
            log.exception("internal error moving the pages of a lower file whose backing file is being "
                          "changed; that file answers EIO from now on")
        finally:
            self._unmap()

    def _move_written_pages(self) -> None:
        """Copy the map's written pages into the tail, as ``copied`` pages, taking
        their charge over; the caller then drops the map, and the file is never
        mapped again.  NoSpace if the system refuses pages, or if the tail's
        slot around ``lower_size`` is shared and its copy does not fit: then the
        pages moved so far are dropped from the tail again and the map keeps
        them all (that slot's copy, once made, stays: the tail's own now).

        The tail holds no page wholly below ``lower_size`` while mapped, and the
        bytes it holds below it are never read (reads there go to the map or the
        backing file): the page straddling ``lower_size``, which the tail may
        hold already, is moved last, so undoing drops exactly the pages below.
        The one tail slot that may hold pages already (and be shared with a
        snapshot taken before this file was mapped) is made the tail's own
        first, so that the move itself takes no more pages than the map gives."""
        if self.map is None:
            return
        runs = list(self.dirty.ranges())
        whole = self.lower_size // PAGE * PAGE  # the pages below lie wholly below lower_size
        index = whole // SLOT
        first, last = index * PAGES_PER_SLOT, whole // PAGE
        if self.dirty.missing(first, last) <= last - first:  # pages to move into the slot of lower_size
            self.tail.own_slot(index)
        self.account.give(self.dirty.count)  # the tail takes as many again
        try:
            for first, last in runs:
                self._move_from_map(first * PAGE, min((last + 1) * PAGE, whole))
            for first, last in runs[-1:]:
                self._move_from_map(max(first * PAGE, whole), min((last + 1) * PAGE, self.lower_size))
        except NoSpace:
            self.tail.discard_below(whole // PAGE)
            self.account.take(self.dirty.count)
            raise
        for first, last in runs:
            self.copied.add(first, last)
        self.dirty, self.unsynced = PageSet(), set()  # their pages are the tail's now
        self.copying = True

    def _move_from_map(self, offset: int, end: int) -> None:
        """Write the map's bytes [offset, end) into the tail, a MiB at a time."""
        assert self.map is not None
        for start in range(offset, end, MOVE_CHUNK):
            stop = min(end, start + MOVE_CHUNK)
            if self.tail.write(start, self.map[start:stop]) < stop - start:
                raise NoSpace()  # the system refused a page (the budget has room: it was the map's)

    def _unmap(self) -> None:
        """Drop the map (its written pages go back to the budget) and close the
        backing file; both are gone afterwards even if something fails."""
        mapping, self.map = self.map, None
        try:
            if mapping is not None:
                self.maps.mapped.discard(self)
                self.account.give(self.dirty.count)
                self.dirty, self.unsynced = PageSet(), set()
                mapping.close()
        finally:
            self._close_backing()  # closing the last descriptor gives the lease up

    def release(self) -> None:
        self._unmap()
        self.tail.release()

    def _close_backing(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _close_backing_unless_mapped(self) -> None:
        if self.map is None:
            self._close_backing()

    def closed(self) -> None:
        """The last handle went: don't keep an unmapped backing file open."""
        self._close_backing_unless_mapped()

    def uncharge(self) -> None:
        """Give this file's pages back to the size= budget (it is being freed)."""
        self.account.settle()

    def sync(self) -> None:
        """msync(MS_SYNC) the map's pages written since the last sync, and the tail's."""
        if self.map is not None:
            for first, last in _ranges(sorted(self.unsynced)):
                self.map.flush(first * PAGE, min(len(self.map), (last + 1) * PAGE) - first * PAGE)
        self.unsynced = set()
        self.tail.sync()
