"""File contents: the bytes of one regular file.

``AnonContent`` maps a file's 64 KiB slot indices to arena slots and remembers,
per slot, which pages have been written (a bitmask).  Holes (slots or pages
never written) read as zeros without touching the map, so they hold no memory.

Invariant: every byte of a held page that lies at or beyond ``size`` is zero, so
growing a file (truncate up, or a write past EOF) exposes zeros for free.

``CowContent`` (overlay mode) serves a lower file from its backing file and
maps it ``MAP_PRIVATE`` at the first write, so only written pages are copied.

Knows only bytes, the arena and backing file descriptors; synchronous, single
caller.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Callable, Optional, Union

from .arena import PAGE, PAGES_PER_SLOT, SLOT, Arena, NoSpace

Buffer = Union[bytes, bytearray, memoryview]


def page_mask(inner: int, length: int) -> int:
    """Bitmask of the pages of a slot that bytes [inner, inner+length) touch."""
    first = inner // PAGE
    last = (inner + length - 1) // PAGE
    return ((1 << (last - first + 1)) - 1) << first


class AnonContent:
    """A file's bytes in anonymous shared memory, page-granular and sparse."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.size = 0
        self.pages = 0  # pages held, for st_blocks
        self._slots: dict[int, int] = {}  # file slot index -> arena slot
        self._held: dict[int, int] = {}  # file slot index -> mask of pages written

    # --- reading ----------------------------------------------------------
    def read(self, offset: int, length: int) -> Buffer:
        """Bytes [offset, offset+length) clipped to the size; holes are zeros."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        pieces = [self._read_slot(index, inner, n) for index, inner, n in _segments(offset, end)]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_slot(self, index: int, inner: int, length: int) -> Buffer:
        slot = self._slots.get(index)
        if slot is None:
            return bytes(length)
        held = self._held[index]
        base = slot * SLOT
        if page_mask(inner, length) & ~held == 0:
            return self.arena.view[base + inner : base + inner + length]
        out = bytearray(length)
        pos = inner
        while pos < inner + length:
            page = pos // PAGE
            stop = min((page + 1) * PAGE, inner + length)
            if held >> page & 1:
                out[pos - inner : stop - inner] = self.arena.view[base + pos : base + stop]
            pos = stop
        return out

    # --- writing ----------------------------------------------------------
    def write(self, offset: int, data: Buffer) -> int:
        """Store data at offset; returns bytes written (short only at the size limit)."""
        if not data:
            return 0
        end = offset + len(data)
        if self._new_pages(offset, end) > self.arena.pages_free():
            end = self._fitting_end(offset, end)
            if end <= offset:
                raise NoSpace()
        source = memoryview(data)
        for index, inner, n in _segments(offset, end):
            slot = self._slots.get(index)
            if slot is None:
                slot = self._slots[index] = self.arena.alloc_slot()
                self._held[index] = 0
            mask = page_mask(inner, n)
            fresh = (mask & ~self._held[index]).bit_count()
            self.arena.take_pages(fresh)
            self.pages += fresh
            self._held[index] |= mask
            start = slot * SLOT + inner
            pos = index * SLOT + inner - offset
            self.arena.view[start : start + n] = source[pos : pos + n]
        self.size = max(self.size, end)
        return end - offset

    def _new_pages(self, offset: int, end: int) -> int:
        return sum(
            (page_mask(inner, n) & ~self._held.get(index, 0)).bit_count()
            for index, inner, n in _segments(offset, end)
        )

    def _fitting_end(self, offset: int, end: int) -> int:
        """The furthest end <= ``end`` whose new pages fit in the free budget."""
        budget = self.arena.pages_free()
        page = offset // PAGE
        while page * PAGE < end:
            index, bit = divmod(page, PAGES_PER_SLOT)
            if not self._held.get(index, 0) >> bit & 1:
                if budget == 0:
                    return max(offset, page * PAGE)
                budget -= 1
            page += 1
        return end

    # --- size and lifetime ----------------------------------------------
    def truncate(self, size: int) -> None:
        """Set the size; pages wholly past it are returned to the system."""
        if size < self.size:
            self._zero_tail(size)
            self._drop_pages_from(-(-size // PAGE))
        self.size = size

    def _zero_tail(self, size: int) -> None:
        index, inner = divmod(size, SLOT)
        if inner % PAGE == 0 or index not in self._slots:
            return
        if self._held[index] >> (inner // PAGE) & 1:
            start = self._slots[index] * SLOT + inner
            stop = self._slots[index] * SLOT + (inner // PAGE + 1) * PAGE
            self.arena.view[start:stop] = bytes(stop - start)

    def _drop_pages_from(self, first_page: int) -> None:
        first_index, first_bit = divmod(first_page, PAGES_PER_SLOT)
        for index in [i for i in self._slots if i >= first_index]:
            keep = (1 << first_bit) - 1 if index == first_index else 0
            dropped = (self._held[index] & ~keep).bit_count()
            self.arena.give_pages(dropped)
            self.pages -= dropped
            self._held[index] &= keep
            if self._held[index] == 0:
                self.arena.free_slot(self._slots.pop(index))
                del self._held[index]
            elif dropped:
                self.arena.punch(self._slots[index], first_bit, PAGES_PER_SLOT - first_bit)

    def release(self) -> None:
        """Give every page and slot back; the content is empty afterwards."""
        self._drop_pages_from(0)
        self.size = 0

    def closed(self) -> None:
        """The last handle went; nothing to let go of."""

    def sync(self) -> None:
        """msync(MS_SYNC) every slot that holds this file's pages."""
        for slot in self._slots.values():
            self.arena.sync(slot)


def _segments(offset: int, end: int) -> list[tuple[int, int, int]]:
    """Split [offset, end) into (slot index, offset in slot, length) pieces."""
    out = []
    while offset < end:
        index, inner = divmod(offset, SLOT)
        n = min(SLOT - inner, end - offset)
        out.append((index, inner, n))
        offset += n
    return out


# Lower files at most this big are copied into the arena at their first write
# instead of being mapped: a private mapping per modified file would run into
# vm.max_map_count (65530) long before memory runs out, and for a small file
# per-page copy-on-write saves nothing.
COPY_UP_LIMIT = 256 * 1024


class BackingGone(OSError):
    """The backing file shrank underneath the overlay (unsupported; EIO)."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "backing file changed underneath the overlay")


class CowContent:
    """A lower file's bytes: the backing file, copy-on-write per page.

    Bytes [0, lower_size) come from the backing file: read with pread until the
    first write, then from a ``MAP_PRIVATE`` map of it, where the kernel copies
    exactly the pages written.  ``lower_size`` only ever shrinks (truncate), so
    everything at or beyond it lives in ``tail``, an ``AnonContent`` addressed by
    file offset: truncate-then-extend reads zeros.  Small files are copied into
    the arena at their first write instead of being mapped.

    Before any access to the backing file its size is checked: a backing file
    truncated underneath answers EIO instead of killing the daemon with SIGBUS.
    """

    def __init__(self, arena: Arena, open_backing: Callable[[], int], size: int, blocks: int) -> None:
        self.arena = arena
        self.open_backing = open_backing
        self.size = size
        self.lower_size = size
        self.original_size = size
        self.lower_pages = min(-(-blocks * 512 // PAGE), -(-size // PAGE))  # as the backing file holds
        self.tail = AnonContent(arena)
        self.tail.size = size
        self.map: Optional[mmap.mmap] = None
        self.dirty = 0  # bitmask of map pages written (charged to the arena)
        self._fd: Optional[int] = None

    @property
    def pages(self) -> int:
        return self.lower_pages + self.dirty.bit_count() + self.tail.pages

    # --- the backing file -------------------------------------------------
    def _backing_fd(self) -> int:
        if self._fd is None:
            self._fd = self.open_backing()
        return self._fd

    def _check_backing(self) -> None:
        size = self.map.size() if self.map is not None else os.fstat(self._backing_fd()).st_size
        if size < self.original_size:
            raise BackingGone()

    def _lower_read(self, offset: int, length: int) -> Buffer:
        self._check_backing()
        if self.map is not None:
            return self.map[offset : offset + length]
        data = os.pread(self._backing_fd(), length, offset)
        if len(data) != length:
            raise BackingGone()
        return data

    # --- Content ------------------------------------------------------------
    def read(self, offset: int, length: int) -> Buffer:
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
        if offset < self.lower_size and self.map is None and self.lower_size <= COPY_UP_LIMIT:
            self._copy_up()
        end = offset + len(data)
        split = max(offset, min(end, self.lower_size))
        written = self._map_write(offset, memoryview(data)[: split - offset]) if split > offset else 0
        if split < end:
            try:
                written += self.tail.write(split, memoryview(data)[split - offset :])
            except NoSpace:
                if not written:
                    raise
        self.size = max(self.size, offset + written)
        self.tail.size = self.size
        return written

    def _copy_up(self) -> None:
        if -(-self.lower_size // PAGE) > self.arena.pages_free():
            raise NoSpace()
        data = self._lower_read(0, self.lower_size)
        self.lower_size = self.lower_pages = 0
        self.tail.write(0, data)
        self._close_backing()

    def _map_write(self, offset: int, data: memoryview) -> int:
        self._check_backing()
        if self.map is None:
            self.map = mmap.mmap(self._backing_fd(), self.original_size, flags=mmap.MAP_PRIVATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._close_backing()  # the map keeps its own reference to the file
        first, last = offset // PAGE, (offset + len(data) - 1) // PAGE
        fresh = (((1 << (last - first + 1)) - 1) << first) & ~self.dirty
        self.arena.take_pages(fresh.bit_count())
        self.dirty |= fresh
        self.map[offset : offset + len(data)] = data
        return len(data)

    def truncate(self, size: int) -> None:
        if size < self.lower_size:
            self.lower_size = size
            self.lower_pages = min(self.lower_pages, -(-size // PAGE))
            self._drop_dirty_from(-(-size // PAGE))
        self.tail.truncate(size)
        self.size = size

    def _drop_dirty_from(self, first_page: int) -> None:
        dropped = self.dirty >> first_page << first_page
        if not dropped or self.map is None:
            return
        self.arena.give_pages(dropped.bit_count())
        self.dirty &= ~dropped
        self.map.madvise(mmap.MADV_DONTNEED, first_page * PAGE, len(self.map) - first_page * PAGE)

    def release(self) -> None:
        self._drop_dirty_from(0)
        if self.map is not None:
            self.map.close()
            self.map = None
        self.tail.release()
        self._close_backing()

    def _close_backing(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def closed(self) -> None:
        """The last handle went: don't keep the backing file open for nothing."""
        self._close_backing()

    def sync(self) -> None:
        if self.map is not None:
            self.map.flush()
        self.tail.sync()
