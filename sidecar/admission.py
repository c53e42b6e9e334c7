"""A bound on work an unauthenticated request can start: at most a few at once, a short queue,
and a prompt 503 for the rest (used around /oauth/install's ``app.info`` check)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from sidecar.errors import Overloaded

# An install check is one app.info call (at most 15 s); the portal sends one install event.
CHECKS_AT_ONCE = 4
CHECKS_WAITING = 8
# A check waits this long for its turn at most (a queue never holds a request longer).
WAIT_LIMIT = 15.0


class Admission:
    """At most ``at_once`` holders at a time and ``waiting`` more in line; others are refused."""

    def __init__(self, at_once: int = CHECKS_AT_ONCE, waiting: int = CHECKS_WAITING, *,
                 wait_limit: float = WAIT_LIMIT, what: str = "install payloads",
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self._slots = asyncio.Semaphore(at_once)
        self._room = waiting
        self._waiting = 0
        self._wait_limit = wait_limit
        self._what = what
        self._on_refused = on_refused
        self.refused = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the block, or raise ``Overloaded`` (503) when none comes in time."""
        if self._slots.locked() and self._waiting >= self._room:
            self._refuse()
        self._waiting += 1
        try:
            async with asyncio.timeout(self._wait_limit):
                await self._slots.acquire()
        except TimeoutError:
            self._refuse()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def _refuse(self) -> None:
        self.refused += 1
        self._on_refused()
        raise Overloaded(f"too many {self._what} are being checked at once; try again shortly",
                         retry_after=5)
