"""The token's life: the current pair, single-flight refresh, the schedule, backoff and states."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import structlog

from sidecar.alerts import Alerter
from sidecar.config import Settings
from sidecar.errors import (
    NotAuthorized,
    OAuthError,
    ReauthorizationRequired,
    Refused,
    SidecarError,
    StoreError,
    TokenUnavailable,
)
from sidecar.metrics import Metrics
from sidecar.oauth import CLIENT_ERRORS, OAuthClient
from sidecar.store import StoredState, TokenPair, TokenStore

# A token this close to its end is treated as expired, so a call never leaves with a dying token.
EXPIRY_SKEW = 30.0
# With SIDECAR_REFRESH_INTERVAL=0 the pair is still renewed this often, so an idle sidecar's
# refresh token (180 days, 28 in older docs) never dies unused.
KEEPALIVE = 20 * 86400.0
BACKOFF_FIRST = 1.0
MIN_GAP = 1.0
BACKOFF_MAX = 300.0

log = structlog.get_logger("sidecar.tokens")


def authorize_url(settings: Settings, state: str | None = None) -> str:
    """Return the address a person opens to approve the app."""
    query = {"client_id": settings.client_id}
    if state:
        query["state"] = state
    return f"{settings.portal}/oauth/authorize/?{urlencode(query)}"


def _iso(timestamp: float | None) -> str | None:
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def describe(
    settings: Settings,
    stored: StoredState,
    *,
    now: float | None = None,
    refresh_failing: bool = False,
    unsaved: bool = False,
) -> dict[str, Any]:
    """Describe the token's state as JSON-ready data, never including a token or the secret."""
    now = time.time() if now is None else now
    pair = stored.pair
    if stored.reauth_required:
        state = "reauthorization_required"
    elif pair is None:
        state = "not_authorized"
    elif pair.expires_at <= now:
        state = "expired"
    elif refresh_failing:
        state = "refresh_failing"
    else:
        state = "valid"
    granted = {s.strip() for s in pair.scope.split(",") if s.strip()} if pair else set()
    info: dict[str, Any] = {
        "state": state,
        "portal": settings.portal,
        "client_id": settings.client_id,
        "oauth_server": settings.oauth_url,
        "member_id": pair.member_id if pair else None,
        "client_endpoint": (pair.client_endpoint or settings.rest_base) if pair else None,
        "scope": pair.scope if pair else None,
        "scope_requested": ",".join(settings.scope),
        "scope_missing": sorted(set(settings.scope) - granted) if pair else [],
        "expires_at": _iso(pair.expires_at) if pair else None,
        "expires_in": round(pair.expires_at - now) if pair else None,
        "last_refresh_at": _iso(pair.obtained_at) if pair else None,
        "refresh_interval_seconds": settings.refresh_interval,
        "last_error": stored.last_error or None,
        "last_error_at": _iso(stored.last_error_at),
        "unsaved": unsaved,
    }
    if stored.foreign:
        info["note"] = stored.foreign + "; it is ignored"
    if state in ("not_authorized", "reauthorization_required"):
        info["authorize_url"] = authorize_url(settings)
    return info


def code_hint(error: OAuthError, settings: Settings) -> str:
    """Say what to do when a code exchange failed because the code was used or expired."""
    if error.error.lower() in ("invalid_grant", "expired_token"):
        return (
            ". The code was already used or has expired (codes live 30 seconds): open "
            f"{authorize_url(settings)} again and hand over the new code at once (or let "
            "/oauth/start and /oauth/callback take it with no copying)"
        )
    return ""


def how_to_authorize(settings: Settings) -> str:
    """Say, in one sentence, how a person authorizes the app."""
    return (
        f"open {authorize_url(settings)} in a browser, approve the app, then run "
        "'bitrix-sidecar authorize <code or the whole redirect address>' within 30 seconds"
    )


def _retrieve(task: asyncio.Task[TokenPair]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(
        exc, SidecarError
    ):
        log.error("token_refresh_crashed", error=repr(exc))


def _lost(stored: StoredState, held: StoredState) -> bool:
    """Say whether the store came back empty (deleted and recreated) while we hold a pair."""
    return stored.pair is None and stored.generation == 0 and held.pair is not None


@dataclass
class Episode:
    """A run of failed renewals, from the first failure to the next success."""

    first_failure_at: float
    attempts: int = 0
    reauth_alerted: bool = False


class TokenManager:
    """Hold the current pair and renew it: one refresh at a time, across tasks and processes."""

    def __init__(
        self,
        store: TokenStore,
        oauth: OAuthClient,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        on_secret: Callable[[str], None] = lambda _: None,
        watch_interval: float = 1.0,
        metrics: Metrics | None = None,
        alerts: Alerter | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._alerts = alerts or Alerter(None, "", self._metrics)
        self._episode: Episode | None = None
        self._client_rejected = False  # the final refusal was of the app, not of the token
        self._seen_reopens = 0
        self.store_ok = True
        self._store = store
        self._oauth = oauth
        self._settings = settings
        self._clock = clock
        self._on_secret = on_secret
        self._watch_interval = watch_interval
        self._stored = StoredState(pair=None)
        self._refresh_task: asyncio.Task[TokenPair] | None = None
        self._failures = 0
        self._next_attempt_at = 0.0
        self._last_attempt_at = 0.0
        self._unsaved = False
        self._unsaved_base = 0  # the stored generation an unsaved pair was renewed from
        self._changed = asyncio.Event()
        self.refreshes = 0  # successful refreshes by this process

    # -- reading ---------------------------------------------------------------------------

    @property
    def pair(self) -> TokenPair | None:
        """Return the pair held in memory, valid or not."""
        return self._stored.pair

    def current(self) -> TokenPair | None:
        """Return the pair if it can be used right now; the hot path, no I/O."""
        pair = self._stored.pair
        if pair is None or self._stored.reauth_required:
            return None
        if pair.expires_at - self._clock() <= EXPIRY_SKEW:
            return None
        return pair

    async def get(self) -> TokenPair:
        """Return a usable pair, renewing it first if it has expired."""
        pair = self.current()
        if pair is not None:
            return pair
        if self._stored.pair is None or self._stored.reauth_required:
            # Another process (the CLI) may have just stored a new pair.
            await self.sync()
            pair = self.current()
            if pair is not None:
                return pair
        self._raise_if_unusable()
        stale = self._stored.pair
        assert stale is not None  # _raise_if_unusable saw to it
        return await self.refresh(stale.access_token, trigger="on_demand")

    def status(self) -> dict[str, Any]:
        """Describe the state for ``status``; never a token."""
        return describe(
            self._settings,
            self._stored,
            now=self._clock(),
            refresh_failing=self._failures > 0,
            unsaved=self._unsaved,
        ) | {
            "refresh": {
                "failing": self._episode is not None,
                "consecutive_failures": self._failures,
                "failing_since": _iso(self._episode.first_failure_at) if self._episode else None,
                "next_attempt_at": _iso(self.next_due()) if self.next_due() < float("inf")
                else None,
                "refreshes_by_this_process": self.refreshes,
            },
            "store_writable": self.store_ok and not self._unsaved,
        }

    def readiness(self) -> tuple[bool, str]:
        """Say whether calls can be served now, and if not, why (never calls Bitrix24).

        An expired token that can be renewed on demand is ready: with
        SIDECAR_REFRESH_INTERVAL=0 an idle sidecar's token expires, and the next call renews it.
        """
        if self._stored.pair is None:
            return False, "not_authorized: no token pair is held"
        if self._stored.reauth_required and self._client_rejected:
            return False, ("client_rejected: check BITRIX_CLIENT_ID and the client secret, "
                           "then restart")
        if self._stored.reauth_required:
            return False, "reauthorization_required: a person must authorize the app again"
        if self.current() is None and self._episode is not None:
            return False, f"expired: renewing the token fails: {self._stored.last_error}"
        if not self.store_ok or self._unsaved:
            return False, "store_unwritable: the token store cannot be written"
        return True, "ok"

    def _raise_if_unusable(self) -> None:
        if self._stored.reauth_required and self._client_rejected:
            raise ReauthorizationRequired(
                "the OAuth server rejected the application "
                f"({self._stored.last_error or 'no detail'}): check BITRIX_CLIENT_ID and the "
                "client secret, and that the app is still installed on the portal, then restart"
            )
        if self._stored.reauth_required:
            raise ReauthorizationRequired(
                "the OAuth server refused to renew the token "
                f"({self._stored.last_error or 'no detail'}); a person must authorize the app "
                f"again: {how_to_authorize(self._settings)}"
            )
        if self._stored.pair is None:
            raise NotAuthorized(
                f"bitrix-sidecar holds no token yet: {how_to_authorize(self._settings)}"
            )

    # -- changing --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored pair; exchange ``BITRIX_AUTH_CODE`` if none is stored."""
        self._adopt(await self._store.load(), source="store")
        if self._stored.pair is None and self._settings.auth_code:
            try:
                await self.authorize(self._settings.auth_code, trigger="startup")
            except SidecarError as exc:
                log.error("auth_code_exchange_failed", error=exc.description,
                          hint=how_to_authorize(self._settings))

    async def sync(self) -> None:
        """Adopt whatever another process stored since we last looked."""
        if self._unsaved:
            return  # ours is newer than the file's; save_unsaved() will write it
        stored = await self._store.load()
        if _lost(stored, self._stored):
            return  # the file was deleted and made anew: ours goes back in, not the other way
        if stored.generation != self._stored.generation or stored.pair != self._stored.pair:
            self._adopt(stored, source="store")

    async def authorize(self, code: str, *, trigger: str = "cli") -> TokenPair:
        """Exchange a first authorization code and store the pair."""
        started = self._clock()
        try:
            pair = await self._oauth.exchange_code(code)
        except OAuthError as exc:
            log.error("authorization_failed", trigger=trigger, error=exc.error,
                      description=exc.description)
            raise
        self.check_portal(pair)
        await self.install(pair, trigger=trigger, started=started)
        return pair

    def check_portal(self, pair: TokenPair) -> None:
        """Refuse a pair for another portal than the configured (or already authorized) one.

        With a marketplace app one OAuth server serves every portal, so a code approved on any
        portal exchanges fine: only this check keeps the proxy pointed at our portal.
        """
        held = self._stored.pair
        base = held.client_endpoint if held is not None and held.client_endpoint else (
            self._settings.rest_base)
        expected = urlsplit(base)
        got = urlsplit(pair.client_endpoint or self._settings.rest_base)
        if (got.scheme, got.netloc.lower()) != (expected.scheme, expected.netloc.lower()):
            raise Refused(
                f"the token is for {got.scheme}://{got.netloc}, not the configured portal "
                f"{expected.scheme}://{expected.netloc}"
            )
        if held is not None and held.member_id and pair.member_id != held.member_id:
            raise Refused("the token's member_id is not the authorized portal's")

    async def install(self, pair: TokenPair, *, trigger: str, started: float | None = None) -> None:
        """Store a pair that arrived from outside a refresh (a code exchange, an install event)."""
        self._on_secret(pair.access_token)
        self._on_secret(pair.refresh_token)
        try:
            async with self._store.locked():
                generation = await self._store.save_pair(pair)
            self._unsaved = False
            self.store_ok = True
        except StoreError as exc:
            self._store_failed(exc, kept=True)
            self._unsaved = True
            self._unsaved_base = self._stored.generation
            generation = self._stored.generation + 1
        self._failures = 0
        self._recovered(trigger)
        self._adopt(StoredState(pair=pair, generation=generation), source=trigger)
        log.info("token_authorized", trigger=trigger, member_id=pair.member_id,
                 scope=pair.scope, expires_at=_iso(pair.expires_at),
                 duration=round(self._clock() - (started or self._clock()), 3))

    async def revoke(self, reason: str) -> None:
        """Mark the held pair dead (the app was uninstalled): a person must authorize again."""
        error = OAuthError(reason, error="uninstalled", permanent=True)
        try:
            async with self._store.locked():
                await self._store.record_error(reason, reauth_required=True)
        except StoreError as exc:
            self._store_failed(exc, kept=False)
        self._fail(error, "install_event")

    async def refresh(self, stale_access: str, *, trigger: str) -> TokenPair:
        """Renew the pair unless it has already been replaced since ``stale_access`` was read.

        However many callers ask at once, one refresh runs; it runs in its own task, so a caller
        that goes away cannot cancel it, and callers are released only once the new pair is saved.
        """
        pair = self._stored.pair
        if pair is not None and pair.access_token != stale_access and self.current() is not None:
            return pair
        if self._refresh_task is None or self._refresh_task.done():
            self._raise_if_unusable()
            if self._failures and self._clock() < self._next_attempt_at:
                raise TokenUnavailable(
                    f"renewing the token failed ({self._stored.last_error}); next attempt in "
                    f"{self._next_attempt_at - self._clock():.0f} s"
                )
            self._refresh_task = asyncio.create_task(
                self._refresh(stale_access, trigger), name="token-refresh"
            )
            # Its callers may all have gone; the outcome is logged inside, never lost unseen.
            self._refresh_task.add_done_callback(_retrieve)
        return await asyncio.shield(self._refresh_task)

    async def aclose(self, wait_seconds: float = 35.0) -> None:
        """Let a refresh in flight finish (its answer holds the only live refresh token), and
        make a last attempt to save a pair the store refused."""
        task = self._refresh_task
        if task is not None and not task.done():
            log.info("waiting_for_refresh_before_exit")
            await asyncio.wait({task}, timeout=wait_seconds)
        if self._unsaved:
            try:
                await self.save_unsaved()
            except StoreError as exc:
                log.error("token_lost_at_exit", error=exc.description,
                          detail="the newest pair could not be saved; a person may have to "
                          "authorize the app again")

    async def _refresh(self, stale_access: str, trigger: str) -> TokenPair:
        started = self._clock()
        self._last_attempt_at = started
        outcome: TokenPair | OAuthError | None = None
        adopted = False
        seen = self._stored.generation
        generation = seen
        try:
            async with self._store.locked() as stored:
                seen = stored.generation
                outcome, adopted = await self._refresh_locked(stored, stale_access)
                if isinstance(outcome, OAuthError):
                    # A rejected app (bad id or secret) is a configuration error: it is not
                    # written down as final, so a restart with fixed settings tries again.
                    await self._store.record_error(
                        outcome.description,
                        reauth_required=outcome.permanent
                        and outcome.error.lower() not in CLIENT_ERRORS,
                    )
                elif not adopted:
                    generation = await self._store.save_pair(outcome)
        except StoreError as exc:
            if isinstance(outcome, TokenPair) and not adopted:
                # The OAuth server has rotated the pair: the old refresh token is dead, so
                # the new pair lives in memory until a write succeeds.
                self._store_failed(exc, kept=True)
                self._unsaved = True
                self._unsaved_base = seen
                generation = seen + 1
            elif not isinstance(outcome, OAuthError):
                # No lock, so no renewal: back off as from any transient failure.
                self._store_failed(exc, kept=False)
                self._fail(OAuthError(f"token store unavailable: {exc.description}",
                                      error="store_unavailable", permanent=False), trigger)
                raise
            else:
                self._store_failed(exc, kept=False)
        else:
            self.store_ok = True
            if not adopted and isinstance(outcome, TokenPair):
                self._unsaved = False
        assert outcome is not None
        if isinstance(outcome, OAuthError):
            self._metrics.refreshes.labels(
                trigger=trigger, result="rejected" if outcome.permanent else "failed").inc()
            self._fail(outcome, trigger)
            if outcome.permanent and outcome.error.lower() in CLIENT_ERRORS:
                raise ReauthorizationRequired(
                    f"{outcome.description}; check BITRIX_CLIENT_ID and the client secret, and "
                    "that the app is still installed on the portal, then restart"
                ) from None
            if outcome.permanent:
                raise ReauthorizationRequired(
                    f"{outcome.description}; a person must authorize the app again: "
                    f"{how_to_authorize(self._settings)}"
                ) from None
            raise TokenUnavailable(f"renewing the token failed: {outcome.description}") from None
        if adopted:
            self._metrics.refreshes.labels(trigger=trigger, result="adopted").inc()
            return outcome  # another process renewed it; adopted under the lock
        self.refreshes += 1
        self._metrics.refreshes.labels(trigger=trigger, result="ok").inc()
        self._failures = 0
        self._recovered(trigger)
        self._adopt(StoredState(pair=outcome, generation=generation), source=trigger)
        log.info("token_refreshed", trigger=trigger, expires_at=_iso(outcome.expires_at),
                 duration=round(self._clock() - started, 3))
        return outcome

    async def _refresh_locked(
        self, stored: StoredState, stale_access: str
    ) -> tuple[TokenPair | OAuthError, bool]:
        """Under the store's lock: adopt a newer stored pair, or refresh the freshest one.

        Returns the outcome and whether it was adopted from the store.
        """
        if (not self._unsaved and stored.generation != self._stored.generation
                and not _lost(stored, self._stored)):
            self._adopt(stored, source="store")
            fresh = self.current()
            if fresh is not None and fresh.access_token != stale_access:
                return fresh, True
            self._raise_if_unusable()
        pair = self._stored.pair
        assert pair is not None
        started = time.perf_counter()
        try:
            new = await self._oauth.refresh(pair.refresh_token)
        except OAuthError as exc:
            return exc, False
        finally:
            self._metrics.refresh_duration.observe(time.perf_counter() - started)
        self._on_secret(new.access_token)
        self._on_secret(new.refresh_token)
        # The token answer carries no application token; it outlives refreshes.
        return replace(new, application_token=pair.application_token), False

    def _fail(self, error: OAuthError, trigger: str) -> None:
        self._failures += 1
        now = self._clock()
        self._stored = replace(
            self._stored,
            reauth_required=error.permanent,
            last_error=error.description,
            last_error_at=now,
        )
        self._metrics.refresh_failing.set(1)
        self._metrics.refresh_failures.set(self._failures)
        opened = self._episode is None
        if self._episode is None:
            self._episode = Episode(first_failure_at=now)
        self._episode.attempts += 1
        if opened or (error.permanent and not self._episode.reauth_alerted):
            self._alert(
                "token_refresh_failing" if opened else "token_reauthorization_required",
                error=error,
            )
        self._client_rejected = error.permanent and error.error.lower() in CLIENT_ERRORS
        if error.permanent:
            self._episode.reauth_alerted = True
            self._metrics.reauthorization_required.set(1)
            log.error("reauthorization_required", trigger=trigger, error=error.error,
                      description=error.description, hint=how_to_authorize(self._settings))
            self._changed.set()
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        delay *= random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not cryptography
        self._next_attempt_at = self._clock() + delay
        self._changed.set()
        log.warning("token_refresh_failed", trigger=trigger, error=error.error,
                    description=error.description, attempt=self._failures,
                    retry_in=round(delay, 1))

    def _alert(self, event: str, *, error: OAuthError | None = None) -> None:
        episode = self._episode
        assert episode is not None
        pair = self._stored.pair
        payload: dict[str, Any] = {
            "event": event,
            "portal": self._settings.portal,
            "client_id": self._settings.client_id,
            "state": "reauthorization_required" if self._stored.reauth_required
            else "refresh_failing",
            "first_failure_at": _iso(episode.first_failure_at),
            "attempts": episode.attempts,
            "token_expires_at": _iso(pair.expires_at) if pair else None,
        }
        if error is not None:
            payload["error"] = error.error
            payload["error_description"] = error.description
        if self._stored.reauth_required:
            payload["authorize_url"] = authorize_url(self._settings)
        if event == "token_refresh_recovered":
            payload["recovered_at"] = _iso(self._clock())
            payload["duration_seconds"] = round(self._clock() - episode.first_failure_at, 3)
        self._alerts.send(payload)

    def _recovered(self, trigger: str) -> None:
        """Close an open failure episode after a success."""
        self._metrics.refresh_failing.set(0)
        self._metrics.refresh_failures.set(0)
        self._metrics.reauthorization_required.set(0)
        if self._episode is not None:
            self._alert("token_refresh_recovered")
            self._episode = None

    def _store_failed(self, exc: StoreError, *, kept: bool) -> None:
        self.store_ok = False
        self._metrics.store_errors.inc()
        if kept:
            log.error("token_store_write_failed", error=exc.description,
                      detail="the new pair is kept in memory and saved when the store allows")
        else:
            log.error("token_store_unavailable", error=exc.description)

    def _adopt(self, stored: StoredState, *, source: str) -> None:
        previous = self._stored
        self._stored = stored
        pair = stored.pair
        self._metrics.authorized.set(1 if pair is not None else 0)
        self._metrics.expires_at.set(pair.expires_at if pair else 0)
        self._metrics.last_refresh.set(pair.obtained_at if pair else 0)
        self._metrics.reauthorization_required.set(1 if stored.reauth_required else 0)
        if stored.pair is not None:
            self._on_secret(stored.pair.access_token)
            self._on_secret(stored.pair.refresh_token)
        if stored.pair != previous.pair:
            self._failures = 0
            self._client_rejected = False
            if stored.pair is not None and not stored.reauth_required:
                self._recovered(source)  # a new pair from anywhere ends a failure episode
            if stored.pair is not None and source == "store" and previous.pair is not None:
                log.info("token_loaded", source=source, generation=stored.generation,
                         expires_at=_iso(stored.pair.expires_at))
            self._check_scope(stored.pair)
        if stored.foreign and not previous.foreign:
            log.warning("token_store_foreign", detail=stored.foreign)
        self._changed.set()

    def _check_scope(self, pair: TokenPair | None) -> None:
        if pair is None or not self._settings.scope:
            return
        granted = {s.strip() for s in pair.scope.split(",") if s.strip()}
        missing = sorted(set(self._settings.scope) - granted)
        if missing:
            log.warning("scope_not_granted", requested=",".join(self._settings.scope),
                        granted=pair.scope, missing=missing)

    # -- background ------------------------------------------------------------------------

    def next_due(self) -> float:
        """Return when the background task should next renew the pair (``inf``: never)."""
        pair = self._stored.pair
        if pair is None or self._stored.reauth_required:
            return float("inf")
        if self._failures:
            return self._next_attempt_at
        interval = self._settings.refresh_interval
        if interval <= 0:
            due = pair.obtained_at + KEEPALIVE
        else:
            lifetime = max(pair.expires_at - pair.obtained_at, 0.0)
            early = min(BACKOFF_MAX, lifetime * 0.1)
            due = min(pair.obtained_at + interval, pair.expires_at - early)
        # Whatever the server says of lifetimes, never renew more than once a second.
        return max(due, self._last_attempt_at + MIN_GAP)

    async def run_schedule(self) -> None:
        """Renew the pair when due, forever; wakes early whenever the pair changes."""
        trigger = "startup"
        while True:
            self._changed.clear()
            delay = self.next_due() - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), None if delay == float("inf")
                                           else delay)
                trigger = "schedule"
                continue
            pair = self._stored.pair
            assert pair is not None
            try:
                await self.refresh(pair.access_token, trigger=trigger)
            except SidecarError:
                pass  # logged and backed off inside; the loop just goes round again
            except Exception:
                # A bug must not end renewals for good: say so loudly and go on, slowly.
                log.exception("token_schedule_error")
                await asyncio.sleep(BACKOFF_MAX / 10)
            trigger = "schedule"

    async def run_watch(self) -> None:
        """Notice pairs stored by other processes, and retry a save the store refused."""
        version = await self._store.data_version()
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                if self._store.replaced():
                    await self._store.reopen()
                if self._store.reopens != self._seen_reopens:
                    self._seen_reopens = self._store.reopens
                    await self._store_replaced()
                if self._unsaved:
                    await self.save_unsaved()
                current = await self._store.data_version()
                if current != version:
                    version = current
                    await self.sync()
                if not self.store_ok and not self._unsaved:
                    # A write failed earlier: probe until the lock can be taken again.
                    async with self._store.locked():
                        pass
                    self.store_ok = True
                    log.info("token_store_recovered")
            except StoreError as exc:
                if self.store_ok:
                    self._store_failed(exc, kept=self._unsaved)
                else:
                    self._metrics.store_errors.inc()
            except Exception:
                log.exception("token_watch_error")

    async def _store_replaced(self) -> None:
        """The store's file was deleted or replaced and opened anew: write our pair back in, if
        the new file is empty; if it holds a pair (another process, the CLI), that one is newer."""
        self._metrics.store_errors.inc()
        stored = await self._store.load()
        if not _lost(stored, self._stored):
            await self.sync()
        elif not self._stored.reauth_required:  # a dead pair is not worth writing back
            self._unsaved = True
            self._unsaved_base = stored.generation

    async def save_unsaved(self) -> bool:
        """Write a pair the store refused earlier; return whether nothing is left unsaved."""
        pair = self._stored.pair
        if not self._unsaved or pair is None:
            return True
        async with self._store.locked() as stored:
            if stored.generation != self._unsaved_base and not _lost(stored, self._stored):
                # Someone stored a pair after ours was renewed (a new authorization): theirs
                # is newer than ours, so it wins.
                self._unsaved = False
                self._adopt(stored, source="store")
                return True
            generation = await self._store.save_pair(pair)
        self._unsaved = False
        self.store_ok = True
        self._stored = replace(self._stored, generation=generation)
        log.info("token_store_write_recovered", generation=generation)
        return True

    @property
    def unsaved(self) -> bool:
        """Say whether the held pair is newer than what the store holds."""
        return self._unsaved
