"""The PostgreSQL store: one authorization shared by every sidecar that names the same database.

The same interface and semantics as the SQLite ``TokenStore``. The write lock is a row lock
(``SELECT ... FOR UPDATE``) held by a transaction, so PostgreSQL itself releases it if its holder
dies: there is no lease that could expire while an OAuth call is still running. One row per
(portal, client_id), so several authorizations can share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import asyncpg
import structlog

from sidecar.config import shown_db, url_passwords
from sidecar.errors import StoreError
from sidecar.logging import scrub
from sidecar.storage import PAIR_FIELDS, AppGrants, StoredState, TokenPair, pair_from_row
from sidecar.store import Entry

log = structlog.get_logger("sidecar.pgstore")

SCHEMA_VERSION = 5
# Any fixed number: the advisory lock that lets one sidecar at a time migrate the schema.
MIGRATION_LOCK = 0x5B1D_EC42
# The longest one command may take (SIDECAR_DB_TIMEOUT): past it the database counts as away.
# Every query, every wait for a pooled connection and every release has a deadline, so a
# database gone silent (a partition, no RST) is noticed in seconds, never waited on forever.
TIMEOUT = 10.0
# How long a lock holder may sit silent inside its transaction (a renewal's OAuth round trip
# plus TIMEOUT) before PostgreSQL ends its session and frees the lock for the others. Without
# it, a holder cut off by the network would hold the lock until TCP gives up (hours).
HOLD = 40.0
CONNECT_TIMEOUT = 10.0
# The server probes a silent client's socket after this long idle (then every 10 s, 3 times).
KEEPALIVE_IDLE = 30
# The channel every write notifies (payload: the row's key) and the watches listen on.
CHANNEL = "sidecar_authorization"
# How often the listener checks its connection is alive, and waits before reconnecting.
LISTEN_CHECK = 30.0
LISTEN_RETRY = 5.0

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE sidecar_authorization (
            portal TEXT NOT NULL,
            client_id TEXT NOT NULL,
            access_token TEXT,
            refresh_token TEXT,
            expires_at DOUBLE PRECISION,
            scope TEXT NOT NULL DEFAULT '',
            member_id TEXT NOT NULL DEFAULT '',
            client_endpoint TEXT NOT NULL DEFAULT '',
            server_endpoint TEXT NOT NULL DEFAULT '',
            domain TEXT NOT NULL DEFAULT '',
            user_id TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT '',
            application_token TEXT NOT NULL DEFAULT '',
            obtained_at DOUBLE PRECISION,
            generation BIGINT NOT NULL DEFAULT 0,
            reauth_required BOOLEAN NOT NULL DEFAULT FALSE,
            last_error TEXT NOT NULL DEFAULT '',
            last_error_at DOUBLE PRECISION,
            updated_at DOUBLE PRECISION NOT NULL,
            -- Moves on every write: what data_version() reports to the other sidecars.
            version BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (portal, client_id)
        )
        """,
        """
        CREATE TABLE sidecar_grants (
            portal TEXT NOT NULL,
            client_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            digest TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            expires_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (portal, client_id, kind, digest)
        )
        """,
    ),
    2: (
        # The fleet's failure episode (one alert for all replicas) and who renewed last.
        "ALTER TABLE sidecar_authorization ADD COLUMN failing_since DOUBLE PRECISION",
        "ALTER TABLE sidecar_authorization ADD COLUMN last_refresh_by TEXT NOT NULL DEFAULT ''",
    ),
    # The fleet's shared rate budget (sidecar/pgbucket.py).
    3: (
        """
        CREATE TABLE sidecar_rate (
            portal TEXT NOT NULL,
            client_id TEXT NOT NULL,
            -- GCRA: the theoretical arrival time (epoch seconds, the server's clock).
            tat DOUBLE PRECISION NOT NULL DEFAULT 0,
            PRIMARY KEY (portal, client_id)
        )
        """,
        """
        CREATE TABLE sidecar_pauses (
            portal TEXT NOT NULL,
            client_id TEXT NOT NULL,
            method TEXT NOT NULL,
            until DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (portal, client_id, method)
        )
        """,
        """
        CREATE TABLE sidecar_replicas (
            portal TEXT NOT NULL,
            client_id TEXT NOT NULL,
            replica TEXT NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (portal, client_id, replica)
        )
        """,
    ),
    # When the fleet tries again after a failed renewal: one OAuth call per round, not one
    # per replica.
    4: ("ALTER TABLE sidecar_authorization ADD COLUMN retry_at DOUBLE PRECISION",),
    # Many authorizations per app (marketplace mode): a row's key is the configured portal for
    # a single-portal sidecar (so version 4's rows are kept as they are) or a portal's
    # member_id; ``portal`` is where that portal is now. ``seq`` orders every write across
    # rows, so one watch finds what changed; ``removed_at`` marks an uninstalled portal.
    5: (
        "ALTER TABLE sidecar_authorization RENAME COLUMN portal TO key",
        "ALTER TABLE sidecar_authorization ADD COLUMN portal TEXT NOT NULL DEFAULT ''",
        "UPDATE sidecar_authorization SET portal = key",
        "CREATE SEQUENCE sidecar_seq",
        "ALTER TABLE sidecar_authorization ADD COLUMN seq BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE sidecar_authorization ADD COLUMN removed_at DOUBLE PRECISION",
        "CREATE INDEX sidecar_authorization_seq ON sidecar_authorization (client_id, seq)",
    ),
}

# What a failure of the database or of the way to it looks like from asyncpg.
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
FAILURES = _FAILURES  # for the shared rate budget, which uses this store's pool

Connection = Any  # asyncpg.Connection (or its pool proxy); asyncpg ships no type information


class PgStore:
    """Load and save the token pair of one app on one portal in a PostgreSQL database."""

    shared = True  # every sidecar naming the database serves from it

    def __init__(self, url: str, *, portal: str, client_id: str, max_size: int = 4,
                 replica: str = "", timeout: float = TIMEOUT, hold: float = HOLD) -> None:
        self._url = url
        self.timeout = timeout
        self._hold = hold
        # A waiter gives up once the holder has had its whole time and a command's besides.
        self._lock_wait = hold + timeout
        self.replica = replica  # written as last_refresh_by with each pair
        self.shown = shown_db(url)  # the URL without its password, for messages
        self._secrets = url_passwords(url)
        self.portal = portal
        self.client_id = client_id
        self._max_size = max_size
        self._pool: Any = None  # asyncpg.Pool
        # The connection whose transaction holds the lock, in the task (context) holding it.
        self._held: ContextVar[Connection | None] = ContextVar(f"pgstore-{id(self)}",
                                                               default=None)

    async def __aenter__(self) -> PgStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        """A StoreError naming the database without its password."""
        detail = scrub(str(exc) or type(exc).__name__, *self._secrets)
        return StoreError(f"cannot {doing} token store {self.shown}: {detail}")

    async def open(self) -> None:
        """Connect (a small pool) and create or migrate the schema."""
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=1, max_size=self._max_size,
                timeout=min(CONNECT_TIMEOUT, self.timeout), command_timeout=self.timeout,
                server_settings=self.session_settings(),
            )
            await self._migrate()
        except StoreError:
            await self.close()
            raise
        except (*_FAILURES, ValueError) as exc:
            await self.close()
            raise self._error("open", exc) from None

    def session_settings(self) -> dict[str, str]:
        """Settings for every session: deadlines on the server's side too."""
        return {
            "application_name": "bitrix-sidecar",
            "lock_timeout": f"{round(self._lock_wait * 1000)}ms",
            "idle_in_transaction_session_timeout": f"{round(self._hold * 1000)}ms",
            # A client gone without a word (its host off the network) is noticed by the server.
            "tcp_keepalives_idle": str(KEEPALIVE_IDLE),
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
        }

    def acquire(self) -> Any:
        """A pooled connection (``async with``), waited for and released within the deadline."""
        return self.pool.acquire(timeout=self.timeout)

    async def close(self) -> None:
        """Close the pool; safe to call twice."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), self.timeout)
            except _FAILURES:
                pool.terminate()

    @property
    def pool(self) -> Any:
        """Return the open pool."""
        if self._pool is None:
            raise StoreError("token store is not open")
        return self._pool

    def failure(self, doing: str, exc: BaseException) -> StoreError:
        """Describe a failure to reach the database, naming it without its password."""
        return self._error(doing, exc)

    async def _migrate(self) -> None:
        async with self.acquire() as conn, conn.transaction():
            # One sidecar at a time: several starting at once would race on CREATE TABLE.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS sidecar_schema_version (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM sidecar_schema_version")
            version = int(version or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.shown} was written by a newer bitrix-sidecar "
                                 f"(schema {version})")
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step + 1]:
                    await conn.execute(statement)
            if version < SCHEMA_VERSION:
                await conn.execute("DELETE FROM sidecar_schema_version")
                await conn.execute("INSERT INTO sidecar_schema_version VALUES ($1)",
                                   SCHEMA_VERSION)
                log.info("token_store_migrated", store=self.shown, schema=SCHEMA_VERSION)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """The lock holder's connection inside ``locked()``, else one from the pool."""
        held = self._held.get()
        if held is not None:
            yield held
            return
        async with self.acquire() as conn:
            yield conn

    async def data_version(self, key: str | None = None) -> int:
        """Return the row's write counter: it moves whenever anyone commits a write to it."""
        try:
            async with self._connection() as conn:
                value = await conn.fetchval(
                    "SELECT version FROM sidecar_authorization "
                    "WHERE key = $1 AND client_id = $2", self._key(key), self.client_id)
        except _FAILURES as exc:
            raise self._error("read", exc) from None
        return int(value or 0)

    def _key(self, key: str | None) -> str:
        return self.portal if key is None else key

    def authorization(self, key: str, portal: str) -> PgAuthorization:
        """The authorization stored under ``key`` (a portal's member_id) at ``portal``."""
        return PgAuthorization(self, key, portal)

    async def entries(self) -> list[Entry]:
        """List every authorization of this app held (not removed); never a secret shown."""
        try:
            async with self._connection() as conn:
                rows = await conn.fetch(
                    "SELECT * FROM sidecar_authorization WHERE client_id = $1 "
                    "AND removed_at IS NULL ORDER BY key", self.client_id)
        except _FAILURES as exc:
            raise self._error("read", exc) from None
        return [Entry(row["key"], row["portal"], row["client_id"], _state(row),
                      int(row["seq"])) for row in rows]

    async def changes_since(self, seq: int) -> tuple[int, list[str]]:
        """Return the newest write's number and the keys written (or removed) after ``seq``."""
        try:
            async with self._connection() as conn:
                rows = await conn.fetch(
                    "SELECT key, seq FROM sidecar_authorization WHERE client_id = $1 "
                    "AND seq > $2 ORDER BY seq", self.client_id, seq)
                if not rows:
                    newest = await conn.fetchval(
                        "SELECT COALESCE(MAX(seq), 0) FROM sidecar_authorization "
                        "WHERE client_id = $1", self.client_id)
                    return max(int(newest), seq), []
        except _FAILURES as exc:
            raise self._error("read", exc) from None
        return int(rows[-1]["seq"]), [str(row["key"]) for row in rows]

    async def load(self, key: str | None = None) -> StoredState:
        """Read the stored state (of the single portal's authorization, or ``key``'s)."""
        try:
            async with self._connection() as conn:
                return await self._load(conn, self._key(key), lock=False)
        except _FAILURES as exc:
            raise self._error("read", exc) from None

    async def _load(self, conn: Connection, key: str, *, lock: bool) -> StoredState:
        sql = "SELECT * FROM sidecar_authorization WHERE key = $1 AND client_id = $2"
        # Waiting for the lock may take as long as a renewal by another sidecar.
        row = await conn.fetchrow(f"{sql} FOR UPDATE" if lock else sql,
                                  key, self.client_id,
                                  timeout=self._lock_wait + self.timeout if lock else None)
        if row is None:
            return StoredState(pair=None)
        return _state(row)

    @contextlib.asynccontextmanager
    async def locked(self, key: str | None = None,
                     portal: str | None = None) -> AsyncIterator[StoredState]:
        """Hold the authorization's row lock; yield the state as it is under it.

        Everything saved inside commits together when the block ends, or rolls back on error.
        If this process dies, PostgreSQL ends the transaction and the lock with it. Each
        authorization has its own row, so one portal's renewal never waits for another's.
        """
        key = self._key(key)
        if self._held.get() is not None:
            raise StoreError("the token store's lock is already held by this task")
        try:
            conn = await self.pool.acquire(timeout=self.timeout)
        except _FAILURES as exc:
            raise self._error("lock", exc) from None
        try:
            transaction = conn.transaction()
            try:
                await transaction.start()
                # A row to lock even before the first pair: two first writers queue on it too.
                await conn.execute(
                    "INSERT INTO sidecar_authorization (key, portal, client_id, updated_at) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (key, client_id) DO NOTHING",
                    key, portal or key, self.client_id, time.time(),
                    timeout=self._lock_wait + self.timeout)
                stored = await self._load(conn, key, lock=True)
            except _FAILURES as exc:
                with contextlib.suppress(*_FAILURES):
                    await transaction.rollback()
                raise self._error("lock", exc) from None
            token = self._held.set(conn)
            try:
                yield stored
            except BaseException:
                with contextlib.suppress(*_FAILURES):
                    await transaction.rollback()
                raise
            finally:
                self._held.reset(token)
            try:
                await transaction.commit()
            except _FAILURES as exc:
                with contextlib.suppress(*_FAILURES):
                    await transaction.rollback()
                raise self._error("write", exc) from None
        finally:
            with contextlib.suppress(*_FAILURES):
                await self.pool.release(conn, timeout=self.timeout)

    async def save_pair(self, pair: TokenPair, key: str | None = None,
                        portal: str | None = None) -> int:
        """Store a new pair, clearing any error; return the new generation."""
        fields: dict[str, Any] = {name: getattr(pair, name) for name in PAIR_FIELDS}
        fields |= {"reauth_required": False, "last_error": "", "last_error_at": None,
                   "last_refresh_by": self.replica, "removed_at": None}
        return await self._upsert(fields, bump=True, key=key, portal=portal)

    async def record_error(self, error: str, *, reauth_required: bool,
                           key: str | None = None, portal: str | None = None) -> None:
        """Remember the last failure (and whether a person must re-authorize) for status."""
        await self._upsert({"last_error": error, "last_error_at": time.time(),
                            "reauth_required": reauth_required}, bump=False, key=key,
                           portal=portal)

    async def remove(self, reason: str, key: str) -> None:
        """Inside ``locked()``: clear the authorization's secrets and mark it removed."""
        now = time.time()
        try:
            async with self._connection() as conn:
                await conn.execute(
                    "UPDATE sidecar_authorization SET access_token = NULL, refresh_token = NULL, "
                    "application_token = '', reauth_required = TRUE, last_error = $3, "
                    "last_error_at = $4, removed_at = $4, updated_at = $4, failing_since = NULL, "
                    "retry_at = NULL, version = version + 1, seq = nextval('sidecar_seq') "
                    "WHERE key = $1 AND client_id = $2", key, self.client_id, reason, now)
                await conn.execute(f"SELECT pg_notify('{CHANNEL}', $1)", key)
        except _FAILURES as exc:
            raise self._error("write", exc) from None

    async def fleet_episode(self, failing: bool, now: float,
                            retry_at: float | None = None, key: str | None = None
                            ) -> float | None:
        """Inside ``locked()``: open or extend (``failing``, the fleet retrying at
        ``retry_at``) or close the replicas' failure episode; return when it started if this
        call opened or closed it, else None."""
        key = self._key(key)
        try:
            async with self._connection() as conn:
                since = await conn.fetchval(
                    "SELECT failing_since FROM sidecar_authorization "
                    "WHERE key = $1 AND client_id = $2", key, self.client_id)
                if since is None and not failing:
                    return None  # already closed (or never opened)
                await conn.execute(
                    "UPDATE sidecar_authorization SET failing_since = $3, retry_at = $4 "
                    "WHERE key = $1 AND client_id = $2", key, self.client_id,
                    (since if since is not None else now) if failing else None,
                    retry_at if failing else None)
        except _FAILURES as exc:
            raise self._error("write", exc) from None
        if failing:
            return now if since is None else None  # None: someone else opened it
        return float(since)

    async def put_state(self, stored: StoredState, generation: int) -> None:
        """Write a whole stored state at ``generation`` (inside ``locked()``; for ``migrate``)."""
        pair = stored.pair
        assert pair is not None
        fields: dict[str, Any] = {name: getattr(pair, name) for name in PAIR_FIELDS}
        fields |= {"reauth_required": stored.reauth_required, "last_error": stored.last_error,
                   "last_error_at": stored.last_error_at, "generation": generation,
                   # A fresh start: no failure episode of the fleet is open for this pair.
                   "failing_since": None, "retry_at": None,
                   "last_refresh_by": stored.last_refresh_by, "removed_at": None}
        await self._upsert(fields, bump=False)

    async def _upsert(self, fields: dict[str, Any], *, bump: bool, key: str | None = None,
                      portal: str | None = None) -> int:
        key = self._key(key)
        columns = ["key", "portal", "client_id", "updated_at", *fields]
        values = [key, portal or key, self.client_id, time.time(), *fields.values()]
        updates = [f"{name} = excluded.{name}" for name in columns[1:] if name != "client_id"]
        updates.append("version = sidecar_authorization.version + 1")
        updates.append("seq = excluded.seq")
        if bump:
            columns.append("generation")
            values.append(1)
            updates.append("generation = sidecar_authorization.generation + 1")
        # The NOTIFY rides in the same statement and is delivered when the transaction commits:
        # the other sidecars' watches wake at once, at no extra round trip.
        sql = (
            "WITH written AS ("  # noqa: S608 - names and placeholders are ours
            f"INSERT INTO sidecar_authorization ({', '.join(columns)}, seq) "
            f"VALUES ({', '.join(f'${n}' for n in range(1, len(columns) + 1))}, "
            "nextval('sidecar_seq')) "
            f"ON CONFLICT (key, client_id) DO UPDATE SET {', '.join(updates)} "
            "RETURNING generation, key) "
            f"SELECT generation, pg_notify('{CHANNEL}', key) FROM written"
        )
        try:
            async with self._connection() as conn:
                return int(await conn.fetchval(sql, *values))
        except _FAILURES as exc:
            raise self._error("write", exc) from None

    # -- the operator's grants ---------------------------------------------------------------

    async def add_grant(self, kind: str, digest: str, expires_at: float, detail: str = "") -> None:
        """Record a grant of ``kind`` (replacing one with the same digest); drop expired ones."""
        try:
            async with self._connection() as conn, conn.transaction():
                await conn.execute(
                    "DELETE FROM sidecar_grants WHERE portal = $1 AND client_id = $2 "
                    "AND expires_at <= $3", self.portal, self.client_id, time.time())
                await conn.execute(
                    "INSERT INTO sidecar_grants (portal, client_id, kind, digest, detail, "
                    "expires_at) VALUES ($1, $2, $3, $4, $5, $6) "
                    "ON CONFLICT (portal, client_id, kind, digest) DO UPDATE SET "
                    "detail = excluded.detail, expires_at = excluded.expires_at",
                    self.portal, self.client_id, kind, digest, detail, expires_at)
        except _FAILURES as exc:
            raise self._error("write", exc) from None

    async def take_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Use up a grant: delete it and return its detail, or None if none is valid."""
        try:
            async with self._connection() as conn:
                row = await conn.fetchrow(
                    "DELETE FROM sidecar_grants WHERE portal = $1 AND client_id = $2 "
                    "AND kind = $3 AND digest = $4 RETURNING detail, expires_at",
                    self.portal, self.client_id, kind, digest)
        except _FAILURES as exc:
            raise self._error("write", exc) from None
        if row is None or float(row["expires_at"]) <= now:
            return None
        return str(row["detail"])

    async def drop_grants(self, kind: str) -> None:
        """Delete every grant of ``kind`` (inside ``locked()``: it commits with the block)."""
        try:
            async with self._connection() as conn:
                await conn.execute(
                    "DELETE FROM sidecar_grants WHERE portal = $1 AND client_id = $2 "
                    "AND kind = $3", self.portal, self.client_id, kind)
        except _FAILURES as exc:
            raise self._error("write", exc) from None

    async def peek_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Return a valid grant's detail without using it up (None if there is none)."""
        try:
            async with self._connection() as conn:
                detail = await conn.fetchval(
                    "SELECT detail FROM sidecar_grants WHERE portal = $1 AND client_id = $2 "
                    "AND kind = $3 AND digest = $4 AND expires_at > $5",
                    self.portal, self.client_id, kind, digest, now)
        except _FAILURES as exc:
            raise self._error("read", exc) from None
        return None if detail is None else str(detail)

    async def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a sidecar commits a write, over a connection apart from the
        pool; reconnect while that fails (the watch polls meanwhile). Runs until cancelled."""
        told = [False]  # a loss was logged, and no connection has listened since
        while True:
            try:
                await self._listen_once(wake, told)
            except (*_FAILURES, ValueError) as exc:
                if not told[0]:
                    # Once per loss: the attempts every LISTEN_RETRY s are quiet. Info, not a
                    # warning: an outage of the database is the watch's warning to give.
                    log.info("token_store_listen_lost",
                             error=self._error("listen", exc).description,
                             detail="changes are picked up by polling until it reconnects")
                    told[0] = True
            await asyncio.sleep(LISTEN_RETRY)

    async def _listen_once(self, wake: Callable[[], None], told: list[bool]) -> None:
        """Listen on one connection until it is lost."""
        lost = asyncio.Event()
        conn = await asyncpg.connect(self._url, timeout=min(CONNECT_TIMEOUT, self.timeout),
                                     command_timeout=self.timeout,
                                     server_settings=self.session_settings())
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, lambda *_args: wake())
            if told[0]:
                log.info("token_store_listen_restored", store=self.shown)
                told[0] = False
            wake()  # whatever was committed while nobody listened
            while not conn.is_closed():
                # A peer gone without a word is not always noticed by the socket: ask now and then.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), LISTEN_CHECK)
                if not lost.is_set():
                    await conn.execute("SELECT 1", timeout=self.timeout)
        finally:
            try:
                await asyncio.wait_for(conn.close(), self.timeout)
            except _FAILURES:
                conn.terminate()

    async def heal(self) -> bool:
        """Return False: a database is not deleted under us the way a file can be."""
        return False


def _state(row: Any) -> StoredState:
    """The stored state a row holds."""
    return StoredState(
        pair=pair_from_row(row),
        generation=int(row["generation"]),
        reauth_required=bool(row["reauth_required"]),
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
        last_refresh_by=row["last_refresh_by"],
        retry_at=row["retry_at"],
    )


class PgAuthorization(AppGrants):
    """One authorization in a ``PgStore`` (a ``PairStore``): its own row and row lock."""

    store: PgStore
    shared = True

    def __init__(self, store: PgStore, key: str, portal: str) -> None:
        self.store = store
        self.key = key
        self.portal = portal  # where the row says the portal is (written with each save)

    async def load(self) -> StoredState:
        """Read the stored state."""
        return await self.store.load(self.key)

    def locked(self) -> contextlib.AbstractAsyncContextManager[StoredState]:
        """Hold this authorization's row lock; yield its state."""
        return self.store.locked(self.key, self.portal)

    async def save_pair(self, pair: TokenPair) -> int:
        """Store a new pair, clearing any error; return the new generation."""
        return await self.store.save_pair(pair, key=self.key, portal=self.portal)

    async def record_error(self, error: str, *, reauth_required: bool) -> None:
        """Remember the last failure (and whether a person must re-authorize)."""
        await self.store.record_error(error, reauth_required=reauth_required, key=self.key,
                                      portal=self.portal)

    async def remove(self, reason: str) -> None:
        """Inside ``locked()``: clear this authorization's secrets and mark it removed."""
        await self.store.remove(reason, self.key)

    async def data_version(self) -> int:
        """Return the row's write counter."""
        return await self.store.data_version(self.key)

    async def listen(self, wake: Callable[[], None]) -> None:
        """Return at once: the registry's one watch listens for every authorization."""

    async def fleet_episode(self, failing: bool, now: float,
                            retry_at: float | None = None) -> float | None:
        """Inside ``locked()``: open, extend or close the replicas' failure episode."""
        return await self.store.fleet_episode(failing, now, retry_at, key=self.key)


    async def heal(self) -> bool:
        """Return False: a database is not deleted under us."""
        return False
