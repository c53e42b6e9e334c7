"""What an authorization's storage is: the pair, the stored state, and the narrow store interface.

The state machine (``sidecar.authorization``) reaches its storage only through ``PairStore``; a
second backend implements this interface and nothing else changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TokenPair:
    """An access token and the refresh token that renews it, with what the server said of them."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float
    scope: str = ""
    member_id: str = ""
    client_endpoint: str = ""
    server_endpoint: str = ""
    domain: str = ""
    user_id: str = ""
    status: str = ""
    application_token: str = field(default="", repr=False)
    obtained_at: float = 0.0

    def expires_in(self, now: float | None = None) -> float:
        """Return the seconds left before the access token expires."""
        return self.expires_at - (time.time() if now is None else now)


# The pair's columns, in both stores' tables: named as TokenPair's fields.
PAIR_FIELDS = ("access_token", "refresh_token", "expires_at", "scope", "member_id",
               "client_endpoint", "server_endpoint", "domain", "user_id", "status",
               "application_token", "obtained_at")


def pair_from_row(row: Mapping[str, Any]) -> TokenPair | None:
    """Return the pair a store's row holds (None without both tokens)."""
    if not (row["access_token"] and row["refresh_token"]):
        return None
    values = {name: row[name] for name in PAIR_FIELDS}
    values["expires_at"] = float(values["expires_at"] or 0.0)
    values["obtained_at"] = float(values["obtained_at"] or 0.0)
    return TokenPair(**values)


# How ``migrate`` marks the SQLite store it moved an authorization out of (its last error).
MOVED = "moved to"
# How a removed portal's authorization begins its last error (an uninstall, or ``forget``):
# the other processes' watches drop the portal when they read it.
UNINSTALLED = "uninstalled:"


@dataclass(frozen=True)
class StoredState:
    """What the store holds: the pair (if any, and if it belongs to this portal and app)."""

    pair: TokenPair | None
    generation: int = 0
    reauth_required: bool = False
    last_error: str = ""
    last_error_at: float | None = None
    foreign: str = ""  # non-empty when the stored pair belongs to another portal or app
    last_refresh_by: str = ""  # the replica whose renewal (or authorization) wrote the pair
    # Among replicas: when the fleet tries again after a failed renewal (None: no failure).
    retry_at: float | None = None


class PairStore(Protocol):
    """Where one authorization's pair lives, shared with other processes.

    ``save_pair``, ``record_error`` and ``drop_grants`` are called only inside ``locked()``:
    the lock is held across processes, so two writers never renew the same refresh token.
    ``shared``: several sidecars serve from this store, so alerts go out once for all of them.
    """

    shared: bool

    async def load(self) -> StoredState:
        """Read the stored state."""
        ...

    def locked(self) -> AbstractAsyncContextManager[StoredState]:
        """Hold the write lock; yield the state as it is under it; commit on leaving."""
        ...

    async def save_pair(self, pair: TokenPair) -> int:
        """Store a new pair, clearing any error; return the new generation."""
        ...

    async def record_error(self, error: str, *, reauth_required: bool) -> None:
        """Remember the last failure (and whether a person must re-authorize)."""
        ...

    async def data_version(self) -> int:
        """Return a number that moves whenever another writer commits (the watch polls it)."""
        ...

    async def listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever a writer commits, until cancelled (or return at once where
        the store cannot tell: the watch then polls alone)."""
        ...

    async def fleet_episode(self, failing: bool, now: float,
                            retry_at: float | None = None) -> float | None:
        """Inside ``locked()``: open or extend (``failing``, the fleet retrying at
        ``retry_at``) or close the failure episode the replicas share; return when it started
        if this call opened or closed it, else None."""
        ...

    async def add_grant(self, kind: str, digest: str, expires_at: float, detail: str = "") -> None:
        """Record what the operator grants once (a start link, an install window)."""
        ...

    async def take_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Use up a grant atomically: return its detail, or None if there is no valid one."""
        ...

    async def drop_grants(self, kind: str) -> None:
        """Delete every grant of ``kind``; called only inside ``locked()``."""
        ...

    async def peek_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Return a valid grant's detail without using it up."""
        ...

    async def heal(self) -> bool:
        """Reconnect if the storage vanished under us; say whether it was opened anew since
        the last call (the caller then checks whether it came back empty).

        A backend that cannot lose its data this way returns False.
        """
        ...


def older(stored: StoredState, held: StoredState) -> bool:
    """Say whether the store went back to a pair older than ours (a database restored from a
    backup, or failed over to a standby that missed commits): its refresh token is spent, ours
    is the live one.

    A newer pair always comes with a higher generation, except from a store made anew (a new
    authorization then starts again at 1): obtained later than ours, it is newer all the same.
    """
    if stored.pair is None or held.pair is None or stored.pair == held.pair:
        return False
    return (stored.generation <= held.generation
            and stored.pair.obtained_at < held.pair.obtained_at)


def lost(stored: StoredState, held: StoredState) -> bool:
    """Say whether the store came back empty (deleted and recreated) while we hold a pair."""
    return stored.pair is None and stored.generation == 0 and held.pair is not None


class _Grants(Protocol):
    """The operator's grants as a store keeps them (the app's, shared by its portals)."""

    async def add_grant(self, kind: str, digest: str, expires_at: float,
                        detail: str = "") -> None: ...
    async def take_grant(self, kind: str, digest: str, now: float) -> str | None: ...
    async def drop_grants(self, kind: str) -> None: ...
    async def peek_grant(self, kind: str, digest: str, now: float) -> str | None: ...


class AppGrants:
    """The grant methods of one authorization's view of a store: the store's own grants."""

    store: _Grants

    async def add_grant(self, kind: str, digest: str, expires_at: float, detail: str = "") -> None:
        """Record a grant (the app's, shared by its portals)."""
        await self.store.add_grant(kind, digest, expires_at, detail)

    async def take_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Use up a grant."""
        return await self.store.take_grant(kind, digest, now)

    async def drop_grants(self, kind: str) -> None:
        """Delete every grant of ``kind`` (inside ``locked()``)."""
        await self.store.drop_grants(kind)

    async def peek_grant(self, kind: str, digest: str, now: float) -> str | None:
        """Return a valid grant's detail without using it up."""
        return await self.store.peek_grant(kind, digest, now)
