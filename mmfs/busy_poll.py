"""Busy polling: catch the next request without sleeping in between.

Most of a FUSE round trip on a small machine is wake-ups, not work: the
client's request wakes the daemon asleep in trio's epoll loop (often on the
other CPU), and the reply wakes the client.  A client doing one thing after
another sends its next request a few microseconds after our reply.  So after
each request the daemon polls ``/dev/fuse`` for up to ``SPIN`` seconds before
it goes back to sleep in trio.  On 2 cores this triples creates per second and
doubles unlinks and 4 KiB writes (docs/BENCHMARKS.md).  An idle mount costs
nothing; a busy one at most ``SPIN`` of CPU per request, and less when its
requests come too far apart for polling to catch them (``PollingWait``).

pyfuse3 waits for the device in one coroutine, ``_wait_fuse_readable``, which
its session loop looks up by name before every request: ``install`` puts a
polling wait in its place.  A pyfuse3 without it is served as before.

At least every ``YIELD_EVERY`` seconds the wait goes through trio all the
same, so signals and lease breaks are handled however busy the mount is.
Several session tasks may serve (a handler that awaits holds one): one polls
while another waits in trio (see ``PollingWait.shared``).
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Awaitable, Callable

import pyfuse3

log = logging.getLogger(__name__)

SPIN = 50e-6  # seconds; measured: 30 µs already catches nearly every next request
YIELD_EVERY = 1e-3

Wait = Callable[[], Awaitable[bool]]


def install() -> bool:
    """Make pyfuse3 poll the device before it sleeps.  Call after ``pyfuse3.init``."""
    wait_in_trio: Wait | None = getattr(pyfuse3, "_wait_fuse_readable", None)
    device = fuse_device()
    if wait_in_trio is None or device is None:
        log.warning("pyfuse3 %s: no busy polling, requests are served without it", pyfuse3.__version__)
        return False
    pyfuse3._wait_fuse_readable = PollingWait(device, wait_in_trio, shared=True)  # type: ignore[attr-defined]
    return True


class PollingWait:
    """pyfuse3's wait for the next request, polling the device first.

    The polling window shrinks by half each time it runs out, down to nothing,
    and is whole again as soon as a request comes within it: a client that
    sends requests far apart costs a few short polls, not ``SPIN`` each time.

    ``caught_polling`` and ``waits_in_trio`` count the calls each way (every
    call is one or the other): how often polling paid off.

    ``shared``: several session tasks call it.  pyfuse3 starts another task
    whenever it receives a request while no task waits in trio (it counts only
    those), so a task polls only while another one waits there; and a task
    woken by trio checks the request is still there, since the poller may have
    taken it (a second read(2) would block the loop).
    """

    def __init__(
        self,
        device: int,
        wait_in_trio: Wait,
        spin: float = SPIN,
        clock: Callable[[], float] = time.perf_counter,
        shared: bool = False,
    ) -> None:
        self.poller = select.poll()
        self.poller.register(device, select.POLLIN)
        self.wait_in_trio = wait_in_trio
        self.spin = spin
        self.window = spin
        self.clock = clock  # seconds; a test drives the window with a fake one
        self.last_yield = clock()
        self.called = self.last_yield  # when a task last asked for a request
        self.caught_polling = 0  # calls that found a request while polling
        self.waits_in_trio = 0  # calls that went to trio: no request within the window, no window, or time to yield
        self.shared = shared
        self.in_trio = 0  # tasks waiting in trio now

    async def __call__(self) -> bool:
        now = self.called = self.clock()
        if self.window and now - self.last_yield < YIELD_EVERY and (self.in_trio or not self.shared):
            if self._request_within(now + self.window):
                self.window = self.spin
                self.caught_polling += 1
                return True
            self.window = self.window / 2 if self.window > self.spin / 8 else 0.0
        self.waits_in_trio += 1
        self.in_trio += 1
        try:
            ready = await self.wait_in_trio()
            while ready and self.shared and not self.poller.poll(0):  # the poller took it meanwhile
                ready = await self.wait_in_trio()
        finally:
            self.in_trio -= 1
        self.last_yield = self.clock()
        if self.last_yield - self.called < self.spin:
            self.window = self.spin  # polling would have caught this one (timed from the latest call of any task)
        return ready

    def _request_within(self, deadline: float) -> bool:
        while not self.poller.poll(0):
            if self.clock() > deadline:
                return False
        return True


def fuse_device() -> int | None:
    """The descriptor of ``/dev/fuse`` that ``pyfuse3.init`` opened."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None
