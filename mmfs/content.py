"""File contents: the bytes of one regular file, kept in arena slots.

``AnonContent`` maps a file's 64 KiB slot indices to arena slots and remembers,
per slot, which pages have been written (a bitmask).  Holes (slots or pages
never written) read as zeros without touching the map, so they hold no memory.

Invariant: every byte of a held page that lies at or beyond ``size`` is zero, so
growing a file (truncate up, or a write past EOF) exposes zeros for free.

Knows only bytes and the arena; synchronous, single caller.
"""

from __future__ import annotations

from typing import Union

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
