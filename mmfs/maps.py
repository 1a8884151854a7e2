"""The budget of lower files mapped at once, and the read leases that guard them.

A signal-driven resource manager, not file content: ``content.CowContent``
asks for a private map of its backing file at its first write (``try_map``),
and the daemon calls ``lease_breaks`` when SIGIO says someone wants to write or
truncate a mapped backing file, between two requests.
"""

from __future__ import annotations

import logging
import mmap
from typing import Protocol

from .linux import MAP_NORESERVE, give_up_lease, take_read_lease

log = logging.getLogger(__name__)


class Mapped(Protocol):
    """A file content holding one of the maps (content.CowContent)."""

    def lease_broken(self) -> bool: ...
    def retire(self) -> None: ...


class MapBudget:
    """The private file mappings in use: bounded, and each guarded by a read lease.

    Each mapping costs a VMA (``vm.max_map_count``) and descriptors, so at most
    ``limit`` lower files are mapped; beyond that, copy-on-write falls back to
    pages in the arena.  A read lease (``F_SETLEASE``) on each mapped file makes
    the kernel hold back anyone who would truncate or write it until
    ``lease_breaks()`` has retired the mapping: touching a private map of a
    truncated file would raise SIGBUS and kill the daemon.  The owner of the
    mount calls ``lease_breaks()`` when SIGIO arrives, between requests.
    """

    def __init__(self, limit: int, leases: bool = True) -> None:
        self.limit = limit
        self.leases = leases
        self.mapped: set[Mapped] = set()

    def try_map(self, content: Mapped, fd: int, length: int) -> mmap.mmap | None:
        """A writable private map of the backing file, or None to use the arena."""
        if len(self.mapped) >= self.limit:
            return None
        try:
            if self.leases:
                take_read_lease(fd)
        except OSError:  # a writer has it open, or leases are unsupported here
            return None
        try:
            flags, prot = mmap.MAP_PRIVATE | MAP_NORESERVE, mmap.PROT_READ | mmap.PROT_WRITE
            mapping = mmap.mmap(fd, length, flags=flags, prot=prot)
        except OSError:  # out of address space or VMAs
            if self.leases:
                give_up_lease(fd)
            return None
        self.mapped.add(content)
        return mapping

    def lease_breaks(self) -> None:
        """Retire every mapping whose lease someone is breaking.

        Never raises: it runs on SIGIO, outside any request, and every writer
        waiting on one of these files must be let go.  A lease that cannot be
        queried counts as broken: retiring a map for nothing costs memory,
        keeping the map of a file that is being truncated would cost the
        daemon (SIGBUS).
        """
        for content in list(self.mapped):
            try:
                broken = content.lease_broken()
            except OSError:
                log.exception("cannot query the lease of a mapped lower file; retiring its map to be safe")
                broken = True
            if broken:
                content.retire()
