"""Keep an authorization and its store in step: pairs written by another process, and pairs the
store refused that wait in memory for a write that succeeds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from sidecar.errors import StoreError
from sidecar.metrics import Metrics
from sidecar.states import Life
from sidecar.storage import UNINSTALLED, PairStore, StoredState, lost, older

log = structlog.get_logger("sidecar.storesync")

Adopt = Callable[[StoredState, str], None]


class StoreSync:
    """Whether the held pair is in the store, and the watch that keeps it so."""

    def __init__(self, store: PairStore, life: Life, adopt: Adopt, metrics: Metrics,
                 interval: float = 1.0, *, shown: str = "the token store",
                 on_back: Callable[[], None] = lambda: None,
                 on_written: Callable[[float | None], None] = lambda since: None) -> None:
        self._store = store
        self._life = life
        self._adopt = adopt  # how the owner takes a stored entry in (with its side effects)
        self._metrics = metrics
        self._interval = interval
        self.shown = shown  # the store's name for people (a URL without its password)
        self._on_back = on_back  # told when the store answers again after an outage
        self._on_written = on_written  # told when a pair held in memory has been written
        self.store_ok = True
        self.down_since: float | None = None  # when the current outage began (wall clock)
        self.last_error = ""  # the outage's first error, without secrets
        self.unsaved = False  # the held pair is newer than what the store holds
        self._unsaved_base = 0  # the stored generation an unsaved pair was renewed from
        metrics.store_available.set(1)

    @property
    def writable(self) -> bool:
        """Say whether the store takes writes and holds what we hold."""
        return self.store_ok and not self.unsaved

    def keep_unsaved(self, base: int) -> None:
        """The store refused a pair the OAuth server has already issued: hold it until saved."""
        self.unsaved = True
        self._unsaved_base = base

    def saved(self) -> None:
        """A write went through."""
        self.unsaved = False
        self.reachable()

    def reachable(self) -> None:
        """The store answered (a lock was taken): an outage, if any, is over."""
        if self.store_ok:
            return
        self.store_ok = True
        since, self.down_since, self.last_error = self.down_since, None, ""
        self._metrics.store_available.set(1)
        log.info("token_store_recovered", store=self.shown,
                 outage=round(time.time() - since, 1) if since is not None else None)
        self._on_back()

    def failed(self, exc: StoreError, *, kept: bool) -> None:
        """A store operation failed; ``kept``: a new pair waits in memory.

        The first failure of an outage warns; later ones are only counted, until the store
        answers again (one warning per outage, however long it lasts).
        """
        self._metrics.store_errors.inc()
        if self.store_ok:
            self.store_ok = False
            self.down_since = time.time()
            self.last_error = exc.description
            self._metrics.store_available.set(0)
            log.warning("token_store_unavailable", store=self.shown, error=exc.description,
                        detail="calls are served with the held token while it is valid; no "
                        "renewal without the store's lock; retried every "
                        f"{self._interval:g} s")
        if kept:
            log.error("token_store_write_failed", store=self.shown, error=exc.description,
                      detail="the new pair is kept in memory and saved when the store allows")

    def newer_in_store(self, stored: StoredState) -> bool:
        """Say whether ``stored`` (read under the lock) was written by someone else since."""
        held = self._life.stored
        return (not self.unsaved and not lost(stored, held) and not older(stored, held) and (
            stored.generation != held.generation or stored.pair != held.pair
            or _died(stored, held)))

    async def sync(self) -> None:
        """Adopt whatever another process stored since we last looked."""
        if self.unsaved:
            return  # ours is newer than the store's; save_unsaved() will write it
        stored = await self._store.load()
        held = self._life.stored
        if lost(stored, held) or older(stored, held):
            # The store was emptied and made anew, or went back to an older pair: ours goes
            # back in (the watch writes it), not the other way.
            if not self._life.state.dead:
                self._metrics.store_errors.inc()
                log.error("token_store_went_back", store=self.shown,
                          stored_generation=stored.generation, held_generation=held.generation,
                          detail="the store lost the newest pair (restored from a backup, or "
                          "made anew); the pair held here is written back")
                self.keep_unsaved(stored.generation)
            return
        if stored.generation != held.generation or stored.pair != held.pair or _died(stored,
                                                                                     held):
            self._adopt(stored, "store")

    async def save_unsaved(self) -> bool:
        """Write a pair the store refused earlier; return whether nothing is left unsaved."""
        pair = self._life.pair
        if not self.unsaved or pair is None:
            return True
        async with self._store.locked() as stored:
            if not self.unsaved:
                return True  # saved, or removed (an uninstall), while this waited for the lock
            if stored.pair is None and stored.last_error.startswith(UNINSTALLED):
                # The portal was uninstalled (another process, or forget --portal): its pair,
                # ours included, is not to be stored again.
                self.unsaved = False
                self._adopt(stored, "store")
                return True
            held = self._life.stored
            if (stored.generation != self._unsaved_base and not lost(stored, held)
                    and not older(stored, held)):
                # Someone stored a pair after ours was renewed (a new authorization): theirs
                # is newer than ours, so it wins.
                self.unsaved = False
                self._adopt(stored, "store")
                return True
            generation = await self._store.save_pair(pair)
            # A replica that failed meanwhile (it spent the refresh token ours replaced) may
            # have opened the fleet's failure episode: this pair closes it.
            closed = (await self._store.fleet_episode(False, time.time())
                      if self._store.shared else None)
        self._life.saved_as(generation)
        log.info("token_store_write_recovered", store=self.shown, generation=generation)
        self.saved()
        self._on_written(closed)
        return True

    async def run(self) -> None:
        """Notice pairs stored by other processes, and retry a save the store refused.

        The store's notifications wake the watch at once; it polls every interval besides,
        for a store that cannot notify and for notifications lost with a connection.
        """
        wake = asyncio.Event()
        listener = asyncio.create_task(self._listen(wake), name="token-store-listen")
        try:
            await self._watch(wake)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self, wake: asyncio.Event) -> None:
        try:
            await self._store.listen(wake.set)
        except Exception:
            # Polling goes on: a failed listener costs speed, not correctness.
            log.exception("token_store_listen_error")

    async def _watch(self, wake: asyncio.Event) -> None:
        version: int | None = None  # unknown until the store answers
        first = True
        while True:
            if not first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._interval)
            first = False
            wake.clear()
            try:
                if await self._store.heal():
                    await self._found_anew()
                if self.unsaved:
                    await self.save_unsaved()
                current = await self._store.data_version()
                if version is None:
                    version = current
                elif current != version:
                    version = current
                    await self.sync()
                if not self.store_ok and not self.unsaved:
                    # A write failed earlier: probe until the lock can be taken again.
                    async with self._store.locked():
                        pass
                    self.reachable()
            except StoreError as exc:
                if self.store_ok:
                    self.failed(exc, kept=self.unsaved)
                else:
                    self._metrics.store_errors.inc()
            except Exception:
                log.exception("token_watch_error")

    async def _found_anew(self) -> None:
        """The store was deleted or replaced and opened anew: write our pair back in, if the
        new store is empty; if it holds a pair (another process, the CLI), that one is newer."""
        self._metrics.store_errors.inc()
        stored = await self._store.load()
        if not lost(stored, self._life.stored):
            await self.sync()
        elif not self._life.state.dead:  # a dead pair is not worth writing back
            self.keep_unsaved(stored.generation)


def _died(stored: StoredState, held: StoredState) -> bool:
    """Say whether another process recorded the held pair as dead (no new generation comes
    with that: an uninstall, a refresh token found spent, a store moved away)."""
    return stored.reauth_required and not held.reauth_required and stored.pair == held.pair
