"""The anonymous shared memory "device" that holds every file's bytes.

One ``MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE`` region, reserved once and never
resized (a shared anonymous map cannot grow: touching past its original length
is SIGBUS).  It is cut into fixed-size slots; a file's content owns whole
slots, and inside a slot the pages actually written are tracked by the content.
Virtual space costs nothing; a page costs memory only once written, and
``MADV_REMOVE`` gives it back.

Bytes go in with ``pwrite`` on the region's own shmem file
(``/proc/self/map_files/``, which only a privileged daemon may open): a write
into shmem allocates a page without first zero-filling it as a page fault
does, so storing runs at twice the speed of a copy into the map.  Without
that file, bytes are copied into the map.

The arena counts pages held (``pages_held``: what ``df`` shows as used)
against the ``size=`` limit, once per physical copy, however many contents
share the slot (``AnonContent.snapshot``, for checkpoints):

- A slot's pages are charged to the one content holding it (its ``Account``)
  or, while ``shared`` lists the slot with its number of holders, to the arena.
  A snapshot moves the charge of a content's own slots to the arena; it takes
  no page.
- The first change of a shared slot by one holder copies the pages it keeps
  into a new slot, charged to that holder: that write (or truncate) needs free
  pages like any other and fails with ENOSPC, or is cut short, without them;
  the other holders keep the old pages.
- The last holder to let go gives the pages back.  A holder left alone keeps
  the slot listed (count 1) until it changes or drops it, and then takes the
  charge over (``Account.adopt``).
- A file settled early (``Account.settle``: nameless and closed, the kernel may
  still refer to it) gives back the pages of its own slots; the pages it shares
  stay counted until it lets go of them, or is left alone with them and
  changes them.

So a checkpoint costs the pages only it still holds, and ``pages_held``
returns exactly to where it was once every snapshot and file is released.
It knows only bytes: no inodes, no names, no FUSE.  Synchronous; the
single-threaded daemon is its only caller.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
from collections.abc import Iterable

from .linux import MAP_NORESERVE

Buffer = bytes | bytearray | memoryview
PAGE = mmap.PAGESIZE
SLOT = 64 * 1024
PAGES_PER_SLOT = SLOT // PAGE


class NoSpace(OSError):
    """The page budget (``size=``) is exhausted."""

    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, "no space left in the arena")


class Arena:
    """Slots of anonymous shared memory, with page accounting.

    ``page_limit`` of 0 means unlimited (only the reservation bounds it).  It
    may change while the arena is in use (a remount), between ``pages_held``
    and ``capacity()``.
    """

    def __init__(self, reserve_bytes: int, page_limit: int = 0, store_with_pwrite: bool = True) -> None:
        slots = max(1, reserve_bytes // SLOT)
        self.map = mmap.mmap(-1, slots * SLOT, flags=mmap.MAP_SHARED | MAP_NORESERVE)
        self.view = memoryview(self.map)
        self.file = shmem_file(self.map) if store_with_pwrite else None
        self.slot_count = slots
        self.page_limit = page_limit
        self.pages_held = 0
        self._free_slots: list[int] = []
        self._next_slot = 0
        # Slots held by several contents -> how many.  A holder never changes a
        # slot listed here: it copies it first (or takes it back when it is the
        # only one left, at 1).  The pages of a listed slot are charged here,
        # not to a file's Account.
        self.shared: dict[int, int] = {}
        self.generations = itertools.count(1)  # Content.generation: a new number for each change

    def store(self, offset: int, data: memoryview) -> None:
        """Put ``data`` at ``offset`` of the region.

        Raises NoSpace when the system has no memory for the pages (``refused``).
        Bytes of a partial store may have landed; the caller undoes its pages.
        """
        if self.file is None:
            self.view[offset : offset + len(data)] = data
            return
        done = 0
        try:
            while done < len(data):
                written = os.pwrite(self.file, data[done:], offset + done)
                if written == 0:  # no progress: no room for the next page
                    raise NoSpace()
                done += written
        except OSError as error:
            if refused(error):
                raise NoSpace() from error
            raise

    def copy(self, source: int, target: int, length: int) -> None:
        """Copy ``length`` bytes of the region from ``source`` to ``target`` (the
        ranges do not overlap), in the kernel when there is a shmem file.  Raises
        NoSpace as ``store`` does."""
        if self.file is None:
            self.view[target : target + length] = self.view[source : source + length]
            return
        done = 0
        try:
            while done < length:
                copied = os.copy_file_range(self.file, self.file, length - done, source + done, target + done)
                if copied == 0:
                    raise NoSpace()
                done += copied
        except OSError as error:
            if refused(error):
                raise NoSpace() from error
            raise

    def load_into(self, target: memoryview, offset: int) -> None:
        """Fill ``target`` with the bytes at ``offset``: read from the shmem file
        when there is one (the map would take a fault per page not yet touched)."""
        done = os.preadv(self.file, [target], offset) if self.file is not None else 0
        if done < len(target):
            target[done:] = self.view[offset + done : offset + len(target)]

    # --- page budget ----------------------------------------------------
    def capacity(self) -> int:
        """The pages the reserved region can hold: the highest ``page_limit``."""
        return self.slot_count * PAGES_PER_SLOT

    def pages_free(self) -> int:
        """Pages that may still be taken; a large number when unlimited."""
        if self.page_limit == 0:
            return self.capacity() - self.pages_held
        return max(0, self.page_limit - self.pages_held)

    def take_pages(self, count: int) -> None:
        """Charge ``count`` newly written pages, or raise NoSpace."""
        if count > self.pages_free():
            raise NoSpace()
        self.pages_held += count

    def give_pages(self, count: int) -> None:
        """Return ``count`` pages to the budget."""
        assert 0 <= count <= self.pages_held, (count, self.pages_held)
        self.pages_held -= count

    # --- slots ----------------------------------------------------------
    def alloc_slot(self) -> int:
        """A zero-filled slot number (its pages are not charged yet)."""
        if self._free_slots:
            return self._free_slots.pop()
        if self._next_slot >= self.slot_count:
            raise NoSpace()
        self._next_slot += 1
        return self._next_slot - 1

    def free_slot(self, slot: int) -> None:
        """Release a slot; its memory goes back to the system."""
        self.map.madvise(mmap.MADV_REMOVE, slot * SLOT, SLOT)
        self._free_slots.append(slot)

    def punch(self, slot: int, first_page: int, pages: int) -> None:
        """Give the memory of ``pages`` pages of ``slot`` back (they read zero)."""
        self.map.madvise(mmap.MADV_REMOVE, slot * SLOT + first_page * PAGE, pages * PAGE)

    def sync(self, slot: int) -> None:
        """msync(MS_SYNC) the slot's pages (no durability: shmem has no backing store)."""
        self.map.flush(slot * SLOT, SLOT)

    def slots_in_use(self) -> int:
        return self._next_slot - len(self._free_slots)

    # --- shared slots ---------------------------------------------------
    def share(self, slots: Iterable[int]) -> None:
        """One more holder for each of ``slots`` (a content was snapshotted).
        The caller hands the pages of those that were its own over to the arena
        first (``Account.hand_over``)."""
        shared = self.shared
        for slot in slots:
            shared[slot] = shared.get(slot, 1) + 1

    def let_go(self, slot: int, pages: int) -> None:
        """A holder of shared ``slot`` (holding ``pages`` pages) drops it; the last
        one gives the pages back and frees the slot."""
        holders = self.shared.pop(slot) - 1
        if holders:
            self.shared[slot] = holders
            return
        self.give_pages(pages)
        self.free_slot(slot)

    def take_back(self, slot: int) -> None:
        """The only holder left of a shared slot makes it its own again (its
        ``Account.adopt`` takes the charge over)."""
        assert self.shared[slot] == 1, (slot, self.shared[slot])
        del self.shared[slot]


def refused(error: OSError) -> bool:
    """shmem's ENOSPC or ENOMEM (out of memory, a memory cgroup limit) is a full
    filesystem to the client, as on kernel tmpfs, not a broken one."""
    return error.errno in (errno.ENOSPC, errno.ENOMEM)


def shmem_file(region: mmap.mmap) -> int | None:
    """A descriptor of the shmem file behind a shared anonymous map, if we may open it."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))  # the export ends with the statement
    try:
        return os.open(f"/proc/self/map_files/{address:x}-{address + len(region):x}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None


class Account:
    """The pages one file has charged to an arena's budget: those of the slots it
    holds alone (the pages of shared slots are the arena's, see ``Arena.shared``).

    A file that lost its last name and handle gives its pages back to the budget
    at once (``settle``), as tmpfs frees them at once, even though the kernel may
    still hold a reference that keeps the bytes alive until FORGET.  Whatever
    it frees afterwards is refunded only up to what it still has charged.  The
    pages of its shared slots are the arena's to count (see the module).
    """

    __slots__ = ("arena", "charged", "settled")

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.charged = 0
        self.settled = False  # settle() ran: the file's own pages no longer count

    def take(self, count: int) -> None:
        self.arena.take_pages(count)
        self.charged += count

    def give(self, count: int) -> None:
        count = min(count, self.charged)
        self.arena.give_pages(count)
        self.charged -= count

    def settle(self) -> None:
        self.give(self.charged)
        self.settled = True

    def hand_over(self, count: int) -> None:
        """``count`` pages of this file's own slots become shared: the arena
        charges them from now on.  Those a settled file no longer counted count
        again (NoSpace if they do not fit; nothing changed then)."""
        moved = min(count, self.charged)
        if moved < count:
            self.arena.take_pages(count - moved)
        self.charged -= moved

    def adopt(self, count: int) -> None:
        """``count`` pages of a shared slot are this file's alone now: charged to
        it, or given back if it is settled."""
        if self.settled:
            self.arena.give_pages(count)
        else:
            self.charged += count
