"""The fleet's one rate budget: every sidecar on one PostgreSQL database takes its departures
from one row, so together they stay under the portal's limit.

The row keeps a GCRA "theoretical arrival time" (``tat``, epoch seconds on the server's clock):
a departure moves it to ``greatest(tat, now) + 1/rate`` in one ``UPDATE``, and fits while
``tat - now`` stays within the burst. A single call or a coalesced batch is one departure.
Pauses after OPERATION_TIME_LIMIT go to a table the others read every second, and each sidecar
keeps a heartbeat row so that, with the database away, it knows its share: rate and burst
divided by the replicas it last saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from sidecar.authinfo import iso
from sidecar.limits import LeakyBucket
from sidecar.metrics import Metrics
from sidecar.pgstore import FAILURES, PgStore

log = structlog.get_logger("sidecar.pgbucket")

TICK = 1.0  # how often pauses are read, the heartbeat written and a lost database tried again
WINDOW = 30.0  # a replica seen within this many seconds counts towards the fleet
FORGET = 3600.0  # heartbeat rows older than this are deleted
TIMEOUT = 3.0  # one round trip longer than this counts as the database being away

# One statement: take a slot if one is free now (or always, with $5), and say how far ahead of
# now the row's clock stands after it. A refused take reports where a take would leave it.
_TAKE = """
WITH c AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS t),
u AS (
    UPDATE sidecar_rate r SET tat = greatest(r.tat, c.t) + $3
    FROM c
    WHERE r.portal = $1 AND r.client_id = $2
      AND ($5 OR greatest(r.tat, c.t) + $3 - c.t <= $4)
    RETURNING r.tat - c.t AS ahead
)
SELECT true AS taken, ahead FROM u
UNION ALL
SELECT false, greatest(r.tat, c.t) + $3 - c.t FROM sidecar_rate r, c
WHERE r.portal = $1 AND r.client_id = $2 AND NOT EXISTS (SELECT 1 FROM u)
"""
_FILL = """
UPDATE sidecar_rate SET tat = greatest(tat, extract(epoch FROM clock_timestamp())::float8 + $3)
WHERE portal = $1 AND client_id = $2
"""
_ROW = ("INSERT INTO sidecar_rate (portal, client_id) VALUES ($1, $2) "
        "ON CONFLICT (portal, client_id) DO NOTHING")
_PAUSE = """
INSERT INTO sidecar_pauses (portal, client_id, method, until)
VALUES ($1, $2, $3, extract(epoch FROM clock_timestamp())::float8 + $4)
ON CONFLICT (portal, client_id, method) DO UPDATE SET until = greatest(sidecar_pauses.until,
                                                                       excluded.until)
"""
_PAUSES = """
SELECT method, until - extract(epoch FROM clock_timestamp())::float8 AS remaining
FROM sidecar_pauses WHERE portal = $1 AND client_id = $2
  AND until > extract(epoch FROM clock_timestamp())::float8
"""
_HEARTBEAT = """
INSERT INTO sidecar_replicas (portal, client_id, replica, last_seen)
VALUES ($1, $2, $3, extract(epoch FROM clock_timestamp())::float8)
ON CONFLICT (portal, client_id, replica) DO UPDATE SET last_seen = excluded.last_seen
"""
_REPLICAS = """
SELECT count(*) AS seen,
       count(*) FILTER (WHERE last_seen > extract(epoch FROM clock_timestamp())::float8 - $4)
         AS fresh
FROM sidecar_replicas WHERE portal = $1 AND client_id = $2
  AND last_seen > extract(epoch FROM clock_timestamp())::float8 - $3
"""
# A replica whose heartbeat is older than this many ticks is taken to be on its local share.
STALE_TICKS = 3
_FORGET = """
DELETE FROM sidecar_replicas WHERE portal = $1 AND client_id = $2
  AND last_seen < extract(epoch FROM clock_timestamp())::float8 - $3
"""


def replica_name() -> str:
    """Name this process among the fleet: host, pid and a random tag (pids repeat in pods)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class PgBucket:
    """The shared bucket of one authorization, with a local share while PostgreSQL is away."""

    def __init__(
        self,
        store: PgStore,
        *,
        rate: float,
        burst: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        tick: float = TICK,
        window: float = WINDOW,
        timeout: float = TIMEOUT,
        key: str | None = None,
        fleet: FleetBudgets | None = None,
    ) -> None:
        self.rate = rate
        # The row this budget is: the single portal's (its store's key), or a marketplace
        # portal's member_id, whose heartbeat and pauses the ``fleet`` reads for all at once.
        self.key = store.portal if key is None else key
        self._fleet = fleet
        self.burst = burst
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._tick = tick
        self._window = window
        self._timeout = timeout
        self._interval = 1.0 / rate
        # The interval this replica's takes from the row cost: longer while some replicas are
        # seen to be cut off (on their local shares, which the row does not count).
        self._cost = self._interval
        self.fresh = 1
        # The same 100 ms of drain in hand as the local bucket: requests from several hosts
        # reach the portal with some jitter.
        self._tolerance = (burst - min(0.5, rate * 0.1)) / rate
        self.replica = replica_name()
        self.replicas = 1
        self.available = True
        self._local: LeakyBucket | None = None  # the local share, while the database is away
        self._free_at = 0.0  # when the next slot is free, as last seen (for queue estimates)
        self.away_since: float | None = None  # wall clock: when the local share began
        # Pauses begun while the database was away (method -> until, this clock): the fleet is
        # told of those still running when it returns.
        self._unshared: dict[str, float] = {}
        self.on_pause: Callable[[str, float], None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the row, write the first heartbeat and start the loop; a database away at start
        is survived on the local share. A marketplace portal's budget has no loop of its own:
        its fleet's heartbeat counts the replicas for every portal."""
        if self._fleet is not None:
            self.attach()
            await self._write(_ROW, self.key, self._store.client_id)
            return
        await self._refresh()
        self._loop_task = asyncio.create_task(self._loop(), name="shared-budget")

    def attach(self) -> None:
        """Join the fleet's budgets (a marketplace portal's, at its first call: its row is made
        by its first take)."""
        assert self._fleet is not None
        self._fleet.join(self)
        self.counted(self._fleet.replicas, self._fleet.fresh)

    async def aclose(self) -> None:
        """Stop the loop and the writes under way; leave the fleet."""
        for task in [self._loop_task, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._fleet is not None:
            self._fleet.leave(self)
            return
        if self.available:
            with contextlib.suppress(*FAILURES):
                async with asyncio.timeout(self._timeout), self._conn() as conn:
                    await conn.execute(
                        "DELETE FROM sidecar_replicas WHERE portal = $1 AND client_id = $2 "
                        "AND replica = $3", self.key, self._store.client_id,
                        self.replica)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            await self._refresh()

    async def _refresh(self) -> None:
        """Heartbeat, count the fleet, adopt the others' pauses; notice the database's return."""
        store = self._store
        try:
            async with asyncio.timeout(self._timeout), self._conn() as conn:
                await conn.execute(_ROW, self.key, store.client_id)
                await conn.execute(_HEARTBEAT, self.key, store.client_id, self.replica)
                await conn.execute(_FORGET, self.key, store.client_id, FORGET)
                counts = await conn.fetchrow(_REPLICAS, self.key, store.client_id,
                                             self._window, STALE_TICKS * self._tick)
                pauses = await conn.fetch(_PAUSES, self.key, store.client_id)
        except FAILURES as exc:
            self._lost(exc)
            return
        self.counted(max(1, int(counts["seen"] or 0)), int(counts["fresh"] or 0))
        self._metrics.fleet_replicas.set(self.replicas)
        await self._back_and_paused([(str(row["method"]), float(row["remaining"]))
                                     for row in pauses])

    def counted(self, replicas: int, fresh: int) -> None:
        """The fleet's heartbeats say ``replicas`` replicas, ``fresh`` of them beating now."""
        self.replicas = max(1, replicas)
        self.fresh = min(self.replicas, max(1, fresh))
        # The replicas gone quiet send on their shares (rate / replicas each): the ones still
        # on the row leave that much of it unused, so the fleet stays under the portal's limit.
        self._cost = self._interval * self.replicas / self.fresh

    async def _back_and_paused(self, pauses: list[tuple[str, float]]) -> None:
        """The database answered: rejoin the row if it had been away; adopt the pauses."""
        store = self._store
        if not self.available:
            # The row has not moved while the replicas sent on their shares, so it would offer
            # a whole burst the portal's bucket may not have: it starts from full, as the
            # shares did, and a tick fuller, for the others still sending on theirs until they
            # notice too. Written before the first take from it.
            if not await self._write(_FILL, self.key, store.client_id,
                                     self.burst * self._interval + self._tick):
                return
            self._restored()
        if self.on_pause is not None:
            for method, remaining in pauses:
                self.on_pause(method, remaining)

    def _lost(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        self.away_since = time.time()
        share = self.burst / self.replicas
        self._local = LeakyBucket(self.rate / self.replicas, max(1, int(share)), self._clock)
        # It went away under load, maybe with the portal's bucket full: start from full.
        self._local.fill()
        self._metrics.shared_budget_available.set(0)
        log.warning("shared_budget_unavailable", error=str(self._store.failure("reach", exc)),
                    store=self._store.shown, replicas=self.replicas,
                    local_rate=round(self.rate / self.replicas, 3))

    def _restored(self) -> None:
        self.available = True
        self.away_since = None
        self._local = None
        self._metrics.shared_budget_available.set(1)
        log.info("shared_budget_restored", store=self._store.shown, replicas=self.replicas)
        self._free_at = self._clock() + self._tolerance
        now = self._clock()
        pauses, self._unshared = self._unshared, {}
        for method, until in pauses.items():
            if until > now:
                self.share_pause(method, until - now)

    def status(self) -> dict[str, Any]:
        """Describe the budget for /status."""
        local = self._local is not None
        return {
            "shared": True,
            "available": self.available,
            "replicas": self.replicas,
            # Replicas seen lately but silent now (cut off, on their shares): the others take
            # correspondingly less from the row.
            "replicas_silent": self.replicas - self.fresh,
            "rate": self.rate,
            "burst": self.burst,
            # While the database is away: this replica's share of the fleet's budget.
            "local_rate": round(self.rate / self.replicas, 3) if local else None,
            "unavailable_since": iso(self.away_since),
        }

    def degraded(self) -> str:
        """Say why the budget is not the fleet's one ('' while it is)."""
        if self.available:
            return ""
        return (f"the shared rate budget in {self._store.shown} is unreachable: this replica "
                f"sends at most {self.rate / self.replicas:.3g} requests/s, its share of "
                f"{self.rate:g}/s among the {self.replicas} replicas last seen")

    # -- the gate's side ---------------------------------------------------------------------

    async def take_now(self) -> bool:
        """Take a slot if one is free at once; False leaves the bucket as it was."""
        if self._local is not None:
            if self._local.wait_time() > 0:
                return False
            self._local.take()
            return True
        row = await self._take(force=False)
        if row is None:
            return await self.take_now()
        return bool(row[0])

    async def reserve(self) -> float:
        """Take the next slot, free now or later; return the seconds until it is due."""
        if self._local is not None:
            wait = self._local.wait_time()
            self._local.take()
            return wait
        row = await self._take(force=True)
        if row is None:
            return await self.reserve()
        return max(0.0, float(row[1]) - self._tolerance)

    async def _take(self, *, force: bool) -> tuple[bool, float] | None:
        """One round trip to the row; None if the database is away (the local share answers)."""
        store = self._store
        try:
            async with asyncio.timeout(self._timeout), self._conn() as conn:
                row = await conn.fetchrow(_TAKE, self.key, store.client_id,
                                          self._cost, self._tolerance, force)
                if row is None:  # the row went missing (a database restored from scratch)
                    await conn.execute(_ROW, self.key, store.client_id)
                    row = await conn.fetchrow(_TAKE, self.key, store.client_id,
                                              self._cost, self._tolerance, force)
        except FAILURES as exc:
            self._lost(exc)
            return None
        taken, ahead = bool(row["taken"]), float(row["ahead"])
        self._free_at = self._clock() + max(0.0, ahead - self._tolerance)
        return taken, ahead

    def wait_estimate(self) -> float:
        """Return the seconds until a slot is free, as last seen (no round trip)."""
        if self._local is not None:
            return self._local.wait_time()
        return max(0.0, self._free_at - self._clock())

    def fill(self) -> None:
        """The portal says its bucket is full: fill the fleet's."""
        if self._local is not None:
            self._local.fill()
            return
        self._free_at = max(self._free_at, self._clock() + self._interval)
        store = self._store
        self._spawn(self._write(_FILL, self.key, store.client_id, self.burst * self._interval))

    def share_pause(self, method: str, seconds: float) -> None:
        """Tell the fleet that ``method`` is paused for ``seconds`` (once it can be told)."""
        if self._local is not None:
            until = self._clock() + seconds
            self._unshared[method] = max(until, self._unshared.get(method, 0.0))
            return
        store = self._store
        self._spawn(self._write(_PAUSE, self.key, store.client_id, method, seconds))

    async def _write(self, sql: str, *args: Any) -> bool:
        """Run one write; return whether it went through."""
        try:
            async with asyncio.timeout(self._timeout), self._conn() as conn:
                await conn.execute(sql, *args)
        except FAILURES as exc:
            self._lost(exc)
            return False
        return True

    def _conn(self) -> Any:
        """A pooled connection whose wait and release have this bucket's deadline (a release
        without one can hang on a connection the network has silently dropped)."""
        return self._store.pool.acquire(timeout=self._timeout)

    def _spawn(self, work: Coroutine[Any, Any, bool]) -> None:
        task = asyncio.create_task(work, name="shared-budget-write")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# Every pause of an app's portals still running: one read a tick for all of them.
_ALL_PAUSES = """
SELECT portal, method, until - extract(epoch FROM clock_timestamp())::float8 AS remaining
FROM sidecar_pauses WHERE client_id = $1
  AND until > extract(epoch FROM clock_timestamp())::float8
"""
# The row marketplace replicas beat under: the fleet is the same for every portal.
FLEET_KEY = "*marketplace*"


class FleetBudgets:
    """Marketplace mode on PostgreSQL: one heartbeat and one read of the pauses a tick for the
    shared budgets of every portal in use (a loop per portal would not scale)."""

    def __init__(self, store: PgStore, *, rate: float, burst: int, metrics: Metrics,
                 tick: float = TICK) -> None:
        self._beat = PgBucket(store, rate=rate, burst=burst, metrics=metrics, tick=tick,
                              key=FLEET_KEY)
        self._store = store
        self._tick = tick
        self._members: dict[str, PgBucket] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def replicas(self) -> int:
        """The replicas last seen."""
        return self._beat.replicas

    @property
    def fresh(self) -> int:
        """The replicas beating now."""
        return self._beat.fresh

    def join(self, bucket: PgBucket) -> None:
        """Count ``bucket`` among the portals in use."""
        self._members[bucket.key] = bucket

    def leave(self, bucket: PgBucket) -> None:
        """``bucket``'s portal is gone."""
        if self._members.get(bucket.key) is bucket:
            del self._members[bucket.key]

    async def start(self) -> None:
        """Beat once, then every tick."""
        await self._beat.start()  # its own loop: the heartbeat (and the fleet's row)
        self._task = asyncio.create_task(self._loop(), name="fleet-budgets")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            await self._refresh()

    async def _refresh(self) -> None:
        """Tell every portal's budget the fleet's count and its pauses."""
        if not self._members:
            return
        try:
            async with asyncio.timeout(TIMEOUT), self._store.pool.acquire(
                    timeout=TIMEOUT) as conn:
                rows = await conn.fetch(_ALL_PAUSES, self._store.client_id)
        except FAILURES as exc:
            for bucket in list(self._members.values()):
                bucket._lost(exc)
            return
        pauses: dict[str, list[tuple[str, float]]] = {}
        for row in rows:
            pauses.setdefault(str(row["portal"]), []).append(
                (str(row["method"]), float(row["remaining"])))
        for key, bucket in list(self._members.items()):
            bucket.counted(self.replicas, self.fresh)
            await bucket._back_and_paused(pauses.get(key, []))

    async def aclose(self) -> None:
        """Stop beating; leave the fleet."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._beat.aclose()
