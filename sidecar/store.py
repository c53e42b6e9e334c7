"""The token store: the only module with SQL.

One SQLite file holds one app's authorizations: the token pair of each portal, plus the state a
person needs to see (last refresh, last error, whether re-authorization is required). Each is a
row under its key: ``""`` for the one portal of a single-portal sidecar, the portal's
``member_id`` in marketplace mode. The file is shared safely between a running sidecar and the
CLI in other processes: writers take SQLite's write lock with ``BEGIN IMMEDIATE``, so a refresh
in one process cannot race a refresh in another (in SQLite that lock is the whole file's, so
renewals of different portals take turns; PostgreSQL locks each row alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from sidecar.errors import StoreError
from sidecar.storage import PAIR_FIELDS, AppGrants, StoredState, TokenPair, pair_from_row

log = structlog.get_logger("sidecar.store")

SCHEMA_VERSION = 3
# Long enough for another process to finish a refresh (an OAuth round trip) under the lock.
BUSY_TIMEOUT_MS = 90_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS token (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    portal TEXT NOT NULL,
    client_id TEXT NOT NULL,
    access_token TEXT,
    refresh_token TEXT,
    expires_at REAL,
    scope TEXT NOT NULL DEFAULT '',
    member_id TEXT NOT NULL DEFAULT '',
    client_endpoint TEXT NOT NULL DEFAULT '',
    server_endpoint TEXT NOT NULL DEFAULT '',
    domain TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    application_token TEXT NOT NULL DEFAULT '',
    obtained_at REAL,
    generation INTEGER NOT NULL DEFAULT 0,
    reauth_required INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_error_at REAL,
    updated_at REAL NOT NULL
)
"""
# Version 2: what the operator grants through the CLI, for a browser or the portal to use once
# (a one-time link that starts the browser flow, a window for the next install event).
_GRANTS = """
CREATE TABLE IF NOT EXISTS grants (
    kind TEXT NOT NULL,
    digest TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    expires_at REAL NOT NULL,
    PRIMARY KEY (kind, digest)
)
"""
# Version 3: one row per authorization under its key (version 2's single row keeps key '', so a
# single-portal sidecar goes on with no new approval); ``seq`` is the store-wide order of writes,
# so that one watch finds what changed among thousands of rows; ``removed_at`` marks a portal's
# authorization removed by its uninstall (its secrets cleared; the row tells other processes).
_AUTHORIZATIONS = """
CREATE TABLE authorizations (
    key TEXT PRIMARY KEY,
    portal TEXT NOT NULL,
    client_id TEXT NOT NULL,
    access_token TEXT,
    refresh_token TEXT,
    expires_at REAL,
    scope TEXT NOT NULL DEFAULT '',
    member_id TEXT NOT NULL DEFAULT '',
    client_endpoint TEXT NOT NULL DEFAULT '',
    server_endpoint TEXT NOT NULL DEFAULT '',
    domain TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    application_token TEXT NOT NULL DEFAULT '',
    obtained_at REAL,
    generation INTEGER NOT NULL DEFAULT 0,
    reauth_required INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_error_at REAL,
    updated_at REAL NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    removed_at REAL
)
"""
_COLUMNS_2 = ("portal, client_id, access_token, refresh_token, expires_at, scope, member_id, "
              "client_endpoint, server_endpoint, domain, user_id, status, application_token, "
              "obtained_at, generation, reauth_required, last_error, last_error_at, updated_at")
_MIGRATIONS = {
    1: (_SCHEMA,),
    2: (_GRANTS,),
    3: (
        _AUTHORIZATIONS,
        f"INSERT INTO authorizations (key, seq, {_COLUMNS_2}) "  # noqa: S608 - our names
        f"SELECT '', 1, {_COLUMNS_2} FROM token",
        "DROP TABLE token",
        "CREATE INDEX authorizations_seq ON authorizations (seq)",
    ),
}
# The key of a single-portal sidecar's authorization.
SINGLE = ""


@dataclass(frozen=True)
class Entry:
    """One authorization the store holds, as ``entries()`` lists it."""

    key: str
    portal: str
    client_id: str
    state: StoredState
    seq: int


class TokenStore:
    """Load and save the token pair of one app on one portal in a SQLite file."""

    def __init__(
        self, path: Path, *, portal: str, client_id: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self.portal = portal
        self.client_id = client_id
        self._db: aiosqlite.Connection | None = None
        self._inode: tuple[int, int] | None = None  # (device, inode) of the file we opened
        self.reopens = 0  # times the file was found deleted or replaced and opened again
        self._healed = 0  # reopens already reported by heal()
        # One connection, one transaction at a time: tasks of this process queue here, other
        # processes at SQLite's own lock.
        self._lock = asyncio.Lock()
        self._single = StoredAuthorization(self, SINGLE, portal)

    async def __aenter__(self) -> TokenStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (creating with mode 0600 if needed) and migrate the store."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Create the file ourselves so it is never world-readable, even for a moment.
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                info = os.fstat(fd)
                if info.st_mode & 0o077:
                    os.fchmod(fd, 0o600)  # an older or hand-made file: tighten it
                self._inode = (info.st_dev, info.st_ino)
            finally:
                os.close(fd)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            await self._db.execute("PRAGMA journal_mode = WAL")
            await self._db.execute("PRAGMA synchronous = FULL")
            await self._migrate()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StoreError(f"cannot open token store {self.path}: {exc}") from exc

    def replaced(self) -> bool:
        """Say whether the file we opened was deleted or replaced under us.

        SQLite keeps writing into a deleted file without a word, and all of it is gone at the
        next start: this is how the watcher notices.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # unreadable for now (EIO, ESTALE...): not proof it is gone
        return self._inode is not None and (info.st_dev, info.st_ino) != self._inode

    async def heal(self) -> bool:
        """Open the file anew if it was deleted or replaced; say whether it was opened anew
        since the last call (here, or by a writer that found it gone)."""
        if self.replaced():
            await self.reopen()
        healed, self._healed = self.reopens != self._healed, self.reopens
        return healed

    async def reopen(self) -> None:
        """Close and open the store again at its path (creating a new file if it is gone)."""
        async with self._lock:
            await self._reopen()

    async def _reopen(self) -> None:
        log.error("token_store_replaced", path=str(self.path),
                  detail="the token store was deleted or replaced while in use; it is opened "
                  "again and the held pair is written back")
        self.reopens += 1
        await self.close()
        await self.open()

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(sqlite3.Error):
                await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        """Return the open connection."""
        if self._db is None:
            raise StoreError("token store is not open")
        return self._db

    async def _migrate(self) -> None:
        async with self.db.execute("PRAGMA user_version") as cursor:
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer bitrix-sidecar (schema {version})"
            )
        if version < SCHEMA_VERSION:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                # Read again under the lock: another process may have migrated meanwhile.
                async with self.db.execute("PRAGMA user_version") as cursor:
                    row = await cursor.fetchone()
                for step in range(int(row[0]) if row else 0, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step + 1]:
                        await self.db.execute(statement)
                await self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def data_version(self) -> int:
        """Return SQLite's counter that moves whenever another connection commits."""
        try:
            async with self._lock, self.db.execute("PRAGMA data_version") as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read token store: {exc}") from exc
        return int(row[0]) if row else 0

    shared = False  # one sidecar per file: it alerts by itself

    async def fleet_episode(self, failing: bool, now: float,
                            retry_at: float | None = None) -> float | None:
        """Return None: a single sidecar keeps its failure episode in memory."""
        return None

    async def listen(self, wake: Callable[[], None]) -> None:
        """Return at once: SQLite tells nobody of a commit, so the watch polls data_version."""

    async def load(self) -> StoredState:
        """Read the stored state of the single-portal authorization."""
        return await self._single.load()

    def locked(self) -> contextlib.AbstractAsyncContextManager[StoredState]:
        """Hold the write lock; yield the single-portal authorization's state under it."""
        return self._single.locked()

    async def save_pair(self, pair: TokenPair) -> int:
        """Store a new pair for the single portal, clearing any error; return the generation."""
        return await self._single.save_pair(pair)

    async def record_error(self, error: str, *, reauth_required: bool) -> None:
        """Remember the single portal's last failure (and whether a person must re-authorize)."""
        await self._single.record_error(error, reauth_required=reauth_required)

    def authorization(self, key: str, portal: str) -> StoredAuthorization:
        """The authorization stored under ``key`` (a portal's member_id) at ``portal``."""
        return StoredAuthorization(self, key, portal)

    async def entries(self) -> list[Entry]:
        """List every authorization held (not removed), oldest key first; never a secret shown."""
        async with self._lock:
            try:
                self.db.row_factory = aiosqlite.Row
                async with self.db.execute(
                    "SELECT * FROM authorizations WHERE removed_at IS NULL ORDER BY key"
                ) as cursor:
                    rows = await cursor.fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read token store: {exc}") from exc
        return [Entry(row["key"], row["portal"], row["client_id"], _state(dict(row), ""),
                      int(row["seq"])) for row in rows]

    async def changes_since(self, seq: int) -> tuple[int, list[str]]:
        """Return the newest write's number and the keys written (or removed) after ``seq``."""
        async with self._lock:
            try:
                async with self.db.execute(
                    "SELECT key, seq FROM authorizations WHERE seq > ? ORDER BY seq", (seq,)
                ) as cursor:
                    rows = list(await cursor.fetchall())
                if not rows:
                    async with self.db.execute(
                        "SELECT COALESCE(MAX(seq), 0) FROM authorizations") as cursor:
                        row = await cursor.fetchone()
                    return (int(row[0]) if row else 0), []
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read token store: {exc}") from exc
        return int(rows[-1][1]), [str(row[0]) for row in rows]

    async def _load(self, key: str = SINGLE, portal: str | None = None) -> StoredState:
        try:
            self.db.row_factory = aiosqlite.Row
            async with self.db.execute("SELECT * FROM authorizations WHERE key = ?",
                                       (key,)) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read token store: {exc}") from exc
        if row is None:
            return StoredState(pair=None)
        data: dict[str, Any] = dict(row)
        foreign = ""
        # The single portal's row names its portal; a portal's own row may change address.
        if (key == SINGLE and data["portal"] != (portal or self.portal)) or (
                data["client_id"] != self.client_id):
            foreign = f"the store holds a token of {data['client_id']} on {data['portal']}"
        return _state(data, foreign)

    @contextlib.asynccontextmanager
    async def _locked(self, key: str, portal: str) -> AsyncIterator[StoredState]:
        """Hold the write lock across processes; yield the state of ``key`` as it is under it.

        Everything saved inside commits together when the block ends, or rolls back on error.
        """
        async with self._lock:
            if self.replaced():
                # Writing on would go into a deleted file, lost at the next start.
                await self._reopen()
            try:
                await self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot lock token store: {exc}") from exc
            try:
                yield await self._load(key, portal)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self.db.execute("ROLLBACK")
                raise
            try:
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await self.db.execute("ROLLBACK")
                raise StoreError(f"cannot write token store: {exc}") from exc

    async def _save_pair(self, key: str, portal: str, pair: TokenPair) -> int:
        fields: dict[str, Any] = {name: getattr(pair, name) for name in PAIR_FIELDS}
        fields |= {"reauth_required": 0, "last_error": "", "last_error_at": None,
                   "removed_at": None}
        return await self._upsert(key, portal, fields, bump=True)

    async def _record_error(self, key: str, portal: str, error: str, *,
                            reauth_required: bool) -> None:
        await self._upsert(key, portal, {"last_error": error, "last_error_at": time.time(),
                                         "reauth_required": int(reauth_required)}, bump=False)

    async def _remove(self, key: str, reason: str) -> None:
        """Inside ``locked()``: clear the authorization's secrets and mark it removed."""
        try:
            await self.db.execute(
                "UPDATE authorizations SET access_token = NULL, refresh_token = NULL, "
                "application_token = '', reauth_required = 1, last_error = ?, "
                "last_error_at = ?, removed_at = ?, updated_at = ?, "
                "seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM authorizations) WHERE key = ?",
                (reason, time.time(), time.time(), time.time(), key))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write token store: {exc}") from exc

    async def _upsert(self, key: str, portal: str, fields: dict[str, Any], *,
                      bump: bool) -> int:
        columns = ["key", "portal", "client_id", "updated_at", *fields]
        values = [key, portal, self.client_id, time.time(), *fields.values()]
        if bump:
            # A new pair takes the row over, whoever held it before.
            updated = columns[1:]
            tail = ", generation = authorizations.generation + 1"
            guard = ""
            columns.append("generation")
            values.append(1)
        else:
            # An error note must not adopt another portal's pair as ours.
            updated = ["updated_at", *fields]
            tail = ""
            guard = (" WHERE authorizations.client_id = excluded.client_id"
                     + (" AND authorizations.portal = excluded.portal" if key == SINGLE else ""))
        updates = ", ".join(f"{name} = excluded.{name}" for name in updated)
        sql = (
            f"INSERT INTO authorizations ({', '.join(columns)}, seq) "  # noqa: S608 - ours
            f"VALUES ({', '.join('?' for _ in columns)}, "
            "(SELECT COALESCE(MAX(seq), 0) + 1 FROM authorizations)) "
            f"ON CONFLICT(key) DO UPDATE SET {updates}{tail}, seq = excluded.seq{guard}"
        )
        try:
            await self.db.execute(sql, values)
            async with self.db.execute("SELECT generation FROM authorizations WHERE key = ?",
                                       (key,)) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write token store: {exc}") from exc
        return int(row[0]) if row else 0

    # -- the operator's grants ---------------------------------------------------------------

    async def add_grant(self, kind: str, digest: str, expires_at: float, detail: str = "") -> None:
        """Record a grant of ``kind`` (replacing one with the same digest); drop expired ones."""
        async with self._lock:
            try:
                await self.db.execute("BEGIN IMMEDIATE")
                try:
                    await self.db.execute("DELETE FROM grants WHERE expires_at <= ?",
                                          (time.time(),))
                    await self.db.execute(
                        "INSERT OR REPLACE INTO grants (kind, digest, detail, expires_at) "
                        "VALUES (?, ?, ?, ?)", (kind, digest, detail, expires_at))
                except BaseException:
                    await self.db.execute("ROLLBACK")
                    raise
                await self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write token store: {exc}") from exc

    async def take_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Use up a grant: delete it and return its detail, or None if none is valid."""
        async with self._lock:
            try:
                async with self.db.execute(
                    "DELETE FROM grants WHERE kind = ? AND digest = ? "
                    "RETURNING detail, expires_at", (kind, digest),
                ) as cursor:
                    row = await cursor.fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write token store: {exc}") from exc
        if row is None or float(row[1]) <= now:
            return None
        return str(row[0])

    async def drop_grants(self, kind: str) -> None:
        """Delete every grant of ``kind`` (inside ``locked()``: it commits with the block)."""
        try:
            await self.db.execute("DELETE FROM grants WHERE kind = ?", (kind,))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write token store: {exc}") from exc

    async def peek_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Return a valid grant's detail without using it up (None if there is none)."""
        async with self._lock:
            try:
                async with self.db.execute(
                    "SELECT detail FROM grants WHERE kind = ? AND digest = ? AND expires_at > ?",
                    (kind, digest, now),
                ) as cursor:
                    row = await cursor.fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read token store: {exc}") from exc
        return None if row is None else str(row[0])


def _state(data: dict[str, Any], foreign: str) -> StoredState:
    """The stored state a row holds (no pair, error or flag of a foreign one)."""
    return StoredState(
        pair=None if foreign else pair_from_row(data),
        generation=int(data["generation"]),
        reauth_required=bool(data["reauth_required"]) and not foreign,
        last_error="" if foreign else data["last_error"],
        last_error_at=None if foreign else data["last_error_at"],
        foreign=foreign,
    )


class StoredAuthorization(AppGrants):
    """One authorization in a ``TokenStore`` (a ``PairStore``): the row under its key."""

    store: TokenStore
    shared = False

    def __init__(self, store: TokenStore, key: str, portal: str) -> None:
        self.store = store
        self.key = key
        self.portal = portal  # where the row says the portal is (written with each save)

    async def load(self) -> StoredState:
        """Read the stored state."""
        async with self.store._lock:
            return await self.store._load(self.key, self.portal)

    def locked(self) -> contextlib.AbstractAsyncContextManager[StoredState]:
        """Hold the write lock (the whole file's); yield this authorization's state."""
        return self.store._locked(self.key, self.portal)

    async def save_pair(self, pair: TokenPair) -> int:
        """Store a new pair, clearing any error; return the new generation."""
        return await self.store._save_pair(self.key, self.portal, pair)

    async def record_error(self, error: str, *, reauth_required: bool) -> None:
        """Remember the last failure (and whether a person must re-authorize)."""
        await self.store._record_error(
            self.key, self.portal, error, reauth_required=reauth_required)

    async def remove(self, reason: str) -> None:
        """Inside ``locked()``: clear this authorization's secrets and mark it removed."""
        await self.store._remove(self.key, reason)

    async def data_version(self) -> int:
        """Return the file's commit counter (it moves on any authorization's write)."""
        return await self.store.data_version()

    async def listen(self, wake: Callable[[], None]) -> None:
        """Return at once: SQLite tells nobody of a commit."""

    async def fleet_episode(self, failing: bool, now: float,
                            retry_at: float | None = None) -> float | None:
        """Return None: a single sidecar keeps its failure episode in memory."""
        return None


    async def heal(self) -> bool:
        """Reopen the file if it was deleted or replaced (see ``TokenStore.heal``)."""
        return await self.store.heal()
