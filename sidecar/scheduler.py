"""One renewal schedule for every portal of a marketplace sidecar.

A loop per portal would cost thousands of tasks and timers, and renewals due together (the
portals installed in one afternoon, a sidecar back after an outage) would all reach the OAuth
server at once. Here one task keeps a heap of when each portal is due, and starts at most
``rate`` renewals a second (a token bucket of one second's worth), each in a task of its own,
at most ``parallel`` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

import structlog

from sidecar.errors import SidecarError
from sidecar.renewal import BACKOFF_MAX

log = structlog.get_logger("sidecar.scheduler")

# How many renewals may run at once (each waits on the OAuth server, and in SQLite on the file).
PARALLEL = 8


class Renewable(Protocol):
    """What the scheduler needs of a portal's authorization."""

    def next_due(self) -> float:
        """When it should next be renewed (``inf``: never)."""
        ...

    async def renew(self, trigger: str) -> object:
        """Renew it now."""
        ...


class Scheduler:
    """Renew each registered authorization when due, at most ``rate`` renewals a second."""

    def __init__(self, rate: float, clock: Callable[[], float], *,
                 parallel: int = PARALLEL) -> None:
        self.rate = rate
        self._clock = clock
        self._heap: list[tuple[float, int, str]] = []
        self._held: dict[str, Renewable] = {}
        # Each key's earliest entry in the heap: a later due pushes nothing (that entry comes
        # up first and is pushed again at the actual time), so a portal whose renewals move
        # its keep-alive 20 days on each time holds one entry, not one per renewal.
        self._queued: dict[str, float] = {}
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(parallel)
        self._running: set[asyncio.Task[None]] = set()
        self._busy: set[str] = set()  # keys whose renewal is under way
        self._tokens = 1.0  # the bucket of starts: one second's worth at most
        self._filled = clock()
        self.started = 0  # renewals started, for status and the benchmark

    def add(self, key: str, item: Renewable) -> None:
        """Schedule ``item`` under ``key`` (again, if its schedule may have moved)."""
        self._held[key] = item
        self.moved(key)

    def remove(self, key: str) -> None:
        """Stop scheduling ``key`` (its entries in the heap are dropped when they come up)."""
        self._held.pop(key, None)
        self._queued.pop(key, None)

    def moved(self, key: str) -> None:
        """``key``'s schedule may have moved: put it in the heap at its new time."""
        item = self._held.get(key)
        if item is None:
            return
        self._push(key, item.next_due())

    def _push(self, key: str, due: float) -> None:
        """Put ``key`` in the heap at ``due``, unless an entry of its comes up no later."""
        queued = self._queued.get(key)
        if due == float("inf") or (queued is not None and queued <= due):
            return
        self._queued[key] = due
        heapq.heappush(self._heap, (due, next(self._counter), key))
        if self._heap[0][2] == key:
            self._wake.set()

    def __len__(self) -> int:
        return len(self._held)

    async def run(self) -> None:
        """Start renewals as they fall due, forever."""
        try:
            while True:
                self._wake.clear()
                try:
                    key = self._next()
                except Exception:
                    # A bug must not end every portal's renewals: say so loudly, go on slowly.
                    log.exception("token_schedule_error")
                    await asyncio.sleep(BACKOFF_MAX / 10)
                    continue
                if key is None:
                    delay = self._heap[0][0] - self._clock() if self._heap else None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    continue
                await self._take_start()
                await self._slots.acquire()
                self._busy.add(key)
                task = asyncio.create_task(self._renew(key), name=f"renew-{key}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            for task in list(self._running):
                task.cancel()
            for task in list(self._running):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _next(self) -> str | None:
        """Pop the key due now, skipping stale entries (removed, moved, already renewing)."""
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            if self._queued.get(key) == due:
                del self._queued[key]
            item = self._held.get(key)
            if item is None or key in self._busy:
                continue
            actual = item.next_due()
            if actual > now:
                self._push(key, actual)
                continue
            return key
        return None

    async def _take_start(self) -> None:
        """Wait until the OAuth server may see one more renewal start."""
        if self.rate <= 0:
            return
        while True:
            now = self._clock()
            self._tokens = min(1.0, self._tokens + (now - self._filled) * self.rate)
            self._filled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)

    async def _renew(self, key: str) -> None:
        item = self._held.get(key)
        try:
            # While it waited for a start and a slot, a call may have renewed it, or its pair
            # gone (an uninstall the watch read): then it is not due any more.
            if item is not None and item.next_due() <= self._clock():
                self.started += 1
                await item.renew("schedule")
        except SidecarError:
            pass  # logged and backed off inside; the schedule goes on
        except Exception:
            log.exception("token_schedule_error", portal=key)
            await asyncio.sleep(BACKOFF_MAX / 10)
        finally:
            self._busy.discard(key)
            self._slots.release()
            self.moved(key)
