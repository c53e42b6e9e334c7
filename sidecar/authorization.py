"""One authorization: the pair of one app on one portal, its state machine and its renewal.

Everything the authorization owns hangs off it: its ``Life`` (state and pair), its ``Renewal``
(schedule, backoff, episode), its ``StoreSync`` (the store it lives in) and, where calls are
served, its rate ``gate``. Holding one per portal is a dictionary of these.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.alerts import Alerter
from sidecar.authinfo import (
    describe,
    how_to_authorize,
    iso,
    renewal_error,
    shown_error,
    shown_state,
    unusable,
)
from sidecar.config import Settings
from sidecar.errors import (
    OAuthError,
    Refused,
    SidecarError,
    StoreError,
    TokenUnavailable,
)
from sidecar.grants import INSTALL
from sidecar.metrics import Metrics
from sidecar.oauth import OAuthClient, client_error, origin, origin_text
from sidecar.portals import PortalList
from sidecar.renewal import BACKOFF_MAX, Renewal, run_schedule
from sidecar.states import Life, State
from sidecar.storage import MOVED, PairStore, StoredState, TokenPair
from sidecar.storesync import StoreSync

if TYPE_CHECKING:
    from sidecar.limits import Gate

# A token this close to its end is treated as expired, so a call never leaves with a dying token.
EXPIRY_SKEW = 30.0

log = structlog.get_logger("sidecar.authorization")


class Consent(enum.Enum):
    """Who stands behind a pair that arrives from outside a refresh."""

    OPERATOR = "operator"  # the CLI, a browser flow the operator started, an install window
    APPLICATION_TOKEN = "application_token"  # noqa: S105 - a name: an event proven by the stored token
    NONE = "none"  # nobody in particular: taken only while no working pair is held


def replacement_refusal(held: TokenPair | None, working: bool, pair: TokenPair,
                        consent: Consent, proof: str = "") -> str:
    """Say why ``pair`` may not replace ``held`` ('' when it may).

    Only the operator replaces a working pair at will. An install event proven by the stored
    application token may renew it, for the same portal member and the same user; anything
    else is taken only while no working pair is held.
    """
    if consent is Consent.OPERATOR or held is None or not working:
        return ""
    if consent is Consent.NONE or not held.application_token:
        return (
            "a working authorization is held, and only the operator can replace it: run "
            "'bitrix-sidecar expect-install' before installing again, or authorize with "
            "'bitrix-sidecar authorize-link'"
        )
    if not secrets.compare_digest(proof.encode(), held.application_token.encode()):
        return "the event's application_token does not match the one stored"
    if held.member_id and pair.member_id != held.member_id:
        return "the pair's member_id is not the authorized portal's"
    if not pair.user_id or pair.user_id != held.user_id:
        return (
            f"the pair acts as user {pair.user_id or '(unknown)'}, the held authorization as "
            f"user {held.user_id or '(unknown)'}: only the operator can change the user"
        )
    return ""


def _retrieve(task: asyncio.Task[TokenPair]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(
        exc, SidecarError
    ):
        log.error("token_refresh_crashed", error=repr(exc))


class HeldBack(OAuthError):
    """Another replica's renewal failed moments ago: this one waits for the fleet's retry."""

    def __init__(self, description: str, retry_at: float) -> None:
        super().__init__(description, error="refresh_failing", permanent=False)
        self.retry_at = retry_at


# At exit, how long (and how often) a pair held only in memory is offered to the store.
EXIT_SAVE = 15.0
EXIT_SAVE_PAUSE = 1.0


class Authorization:
    """Hold one pair and renew it: one refresh at a time, across tasks and processes."""

    # The rate gate in front of this authorization's portal, attached by the application that
    # serves calls for it (the CLI's one-shot commands have none).
    gate: Gate

    def __init__(
        self,
        store: PairStore,
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
        # Marketplace mode: the addresses BITRIX_PORTAL allows, where a portal may move.
        self.allowed: PortalList | None = None
        self._store = store
        self._oauth = oauth
        self._settings = settings
        self._clock = clock
        self._on_secret = on_secret
        self.life = Life()
        self.renewal = Renewal(self.life, settings, self._metrics,
                               alerts or Alerter(None, "", self._metrics), clock)
        self._watch_interval = watch_interval
        self.sync_state = StoreSync(store, self.life, self._adopt, self._metrics,
                                    watch_interval, shown=settings.db_shown,
                                    on_back=self._store_back, on_written=self._written)
        self._refresh_task: asyncio.Task[TokenPair] | None = None
        # A renewal found the store's lock out of reach (no renewal without it): retried as
        # soon as the store answers, not after the backoff.
        self._held_back = False
        # The access token the portal refused while no renewal could be made ('' if none):
        # with the store away, the held token no longer serves.
        self._refused = ""

    # -- reading ---------------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """Return the settings of this authorization's portal."""
        return self._settings

    @property
    def state(self) -> State:
        """Return where the authorization stands."""
        return self.life.state

    @property
    def pair(self) -> TokenPair | None:
        """Return the pair held in memory, valid or not."""
        return self.life.pair

    @property
    def unsaved(self) -> bool:
        """Say whether the held pair is newer than what the store holds."""
        return self.sync_state.unsaved

    def current(self) -> TokenPair | None:
        """Return the pair if it can be used right now; the hot path, no I/O."""
        pair = self.life.stored.pair
        if pair is None or self.life.state.dead:
            return None
        if pair.expires_at - self._clock() <= EXPIRY_SKEW:
            return None
        return pair

    async def get(self) -> TokenPair:
        """Return a usable pair, renewing it first if it has expired."""
        pair = self.current()
        if pair is not None:
            return pair
        if self.life.pair is None or self.life.state.dead:
            # Another process (the CLI) may have just stored a new pair.
            await self.sync_state.sync()
            pair = self.current()
            if pair is not None:
                return pair
        self._raise_if_unusable()
        stale = self.life.pair
        assert stale is not None  # _raise_if_unusable saw to it
        return await self.refresh(stale.access_token, trigger="on_demand")

    def status(self) -> dict[str, Any]:
        """Describe the state for ``status``; never a token."""
        state = self.life.state
        if state is State.REFRESHING and self.life.failures:
            state = State.FAILING  # a retry after failures: still failing until it succeeds
        sync = self.sync_state
        pair = self.life.pair
        return describe(self._settings, self.life.stored, state=state,
                        now=self._clock(), unsaved=self.unsaved) | {
            "refresh": self.renewal.status(),
            "store_writable": sync.writable,
            "last_refresh_by": self.life.stored.last_refresh_by or None,
            # Serving, but on the held token alone: no renewal until the store answers.
            "degraded": not sync.store_ok,
            "store": {
                "name": sync.shown,
                "available": sync.store_ok,
                "unavailable_since": iso(sync.down_since),
                "error": shown_error(sync.last_error, self._settings) or None,
                "serving_until": (iso(pair.expires_at - EXPIRY_SKEW)
                                  if not sync.store_ok and self._held_serves() and pair
                                  else None),
            },
        }

    def status_state(self) -> str:
        """The state ``status`` shows, cheaply (for counting thousands of portals)."""
        state = self.life.state
        if state is State.REFRESHING and self.life.failures:
            state = State.FAILING  # as status() says it
        return shown_state(state, self.life.pair, self._clock())

    def failing_since(self) -> float | None:
        """When this authorization's failure episode began (None: not failing)."""
        episode = self.renewal.episode
        return episode.first_failure_at if episode is not None else None

    def _held_serves(self) -> bool:
        """Say whether the held token can still be sent (unexpired, not refused meanwhile)."""
        pair = self.current()
        return pair is not None and pair.access_token != self._refused

    def readiness(self) -> tuple[bool, str]:
        """Say whether calls can be served now, and if not, why (never calls Bitrix24).

        An expired token that can be renewed on demand is ready: with
        SIDECAR_REFRESH_INTERVAL=0 an idle sidecar's token expires, and the next call renews it.
        """
        state = self.life.state
        if state is State.NOT_AUTHORIZED or self.life.pair is None:
            return False, "not_authorized: no token pair is held"
        if state is State.CLIENT_REJECTED:
            return False, ("client_rejected: check BITRIX_CLIENT_ID and the client secret, "
                           "then restart")
        if state is State.REAUTHORIZATION_REQUIRED and self.life.stored.last_error.startswith(
                MOVED):
            return False, f"moved: the authorization was {self.life.stored.last_error}"
        if state is State.REAUTHORIZATION_REQUIRED:
            return False, "reauthorization_required: a person must authorize the app again"
        if not self.sync_state.store_ok and self._store.shared:
            return self._away_readiness()
        if self.current() is None and self.life.failures:
            return False, ("expired: renewing the token fails: "
                           f"{shown_error(self.life.stored.last_error, self._settings)}")
        if not self.sync_state.writable:
            return False, "store_unwritable: the token store cannot be written"
        return True, "ok"

    def _away_readiness(self) -> tuple[bool, str]:
        """Readiness while the shared database is away: ready as long as the held token serves.

        Every replica of the fleet is in the same plight, so taking this one out of service
        would only turn calls its token can still serve into failures.
        """
        shown = self.sync_state.shown
        pair = self.life.pair
        assert pair is not None
        if self._held_serves():
            until = iso(pair.expires_at - EXPIRY_SKEW)
            saved = (" (a renewed pair waits in memory to be written)"
                     if self.sync_state.unsaved else "")
            return True, (f"degraded: the token database {shown} is unreachable: serving with "
                          f"the held token until {until}{saved}; no renewal until it answers")
        why = ("was refused by the portal" if pair.access_token == self._refused
               else f"expired at {iso(pair.expires_at)}")
        return False, (f"token_database_unreachable: the token database {shown} is unreachable "
                       f"and the held token {why}: no renewal without the database's lock; "
                       "renewed as soon as it answers")

    def _written(self, since: float | None) -> None:
        """A pair held in memory while the store was away has been written; ``since``: the
        fleet's failure episode it closed (None: there was none)."""
        self.renewal.recovered(alert=since is not None if self._store.shared else None,
                               since=since)

    def _store_back(self) -> None:
        """The store answers again: a renewal its absence held back may go at once."""
        self._refused = ""
        if self._held_back and self.life.failures and self.life.state is State.FAILING:
            # A replica holding a pair renewed while the database was away writes it within
            # one watch interval of the database's return; the others give it two before
            # renewing, so that none spends the refresh token that pair has replaced.
            grace = 2 * self._watch_interval if self._store.shared else 0.0
            self.life.next_attempt_at = self._clock() + grace
            log.info("token_renewal_resumed", store=self.sync_state.shown,
                     detail="the token store answers again: the held-back renewal goes "
                     + (f"in {grace:g} s" if grace else "now"))
        self._held_back = False
        self.renewal.touch()

    def _raise_if_unusable(self) -> None:
        error = unusable(self.life.state, self.life.pair is not None,
                         self.life.stored.last_error, self._settings)
        if error is not None:
            raise error

    # -- changing from outside a renewal ---------------------------------------------------

    async def start(self, stored: StoredState | None = None) -> None:
        """Load the stored pair (or take ``stored``, just read); exchange ``BITRIX_AUTH_CODE``
        if none is stored."""
        self._adopt(await self._store.load() if stored is None else stored, "store")
        if self.life.pair is None and self._settings.auth_code:
            try:
                await self.authorize(self._settings.auth_code, trigger="startup")
            except SidecarError as exc:
                log.error("auth_code_exchange_failed", error=exc.description,
                          hint=how_to_authorize(self._settings))

    async def save_unsaved(self) -> bool:
        """Write a pair the store refused earlier; return whether nothing is left unsaved."""
        return await self.sync_state.save_unsaved()

    async def authorize(self, code: str, *, trigger: str = "cli") -> TokenPair:
        """Exchange a first authorization code and store the pair."""
        started = self._clock()
        try:
            pair = await self._oauth.exchange_code(code)
        except OAuthError as exc:
            log.error("authorization_failed", trigger=trigger, error=exc.error,
                      description=exc.description)
            raise
        self.check_portal(pair, source="exchange")
        await self.install(pair, trigger=trigger, started=started, consent=Consent.OPERATOR)
        return pair

    def _portal_base(self) -> str:
        """Return the REST base calls go to: the authorized pair's, else the configured one."""
        held = self.life.pair
        return held.client_endpoint if held is not None and held.client_endpoint else (
            self._settings.rest_base)

    def check_portal(self, pair: TokenPair, *, source: str = "install") -> None:
        """Refuse a pair for another portal than the configured (or already authorized) one.

        With a marketplace app one OAuth server serves every portal, so a code approved on any
        portal exchanges fine: only this check keeps the proxy pointed at our portal.
        """
        held = self.life.pair
        base = self._portal_base()
        offered = pair.client_endpoint or self._settings.rest_base
        if not self._same_portal(offered, base, source=source):
            raise Refused(
                f"the token is for {origin_text(offered)}, not the configured portal "
                f"{origin_text(base)}"
            )
        if held is not None and held.member_id and pair.member_id != held.member_id:
            raise Refused("the token's member_id is not the authorized portal's")

    def _same_portal(self, offered: str, known: str, *, source: str) -> bool:
        """Say whether ``offered`` is on the known portal's origin; log and count it if not.

        A sidecar serves one portal: an address on another scheme (https never drops to http),
        host or port is not followed, whoever names it. A renamed portal is authorized again.
        """
        if origin(offered) == origin(known):
            return True
        self._metrics.endpoint_refused.labels(source=source).inc()
        log.error("client_endpoint_refused", source=source, offered=origin_text(offered),
                  kept=origin_text(known),
                  detail="the answer names another portal than the authorized one; calls stay "
                  "where they were (after a portal rename, authorize the app again)")
        return False

    def _moved(self, new: TokenPair, held: TokenPair, known: str) -> bool:
        """Marketplace mode: say whether a token answer moves the portal to another address
        BITRIX_PORTAL allows, for the same member_id (a renamed portal); log it if so."""
        allowed = self.allowed
        if (allowed is None or origin(new.client_endpoint) == origin(known)
                or not held.member_id or new.member_id != held.member_id
                or not allowed.allows(new.client_endpoint)):
            return False
        self._metrics.portal_events.labels(event="moved").inc()
        log.warning("portal_moved", member_id=held.member_id, previous=origin_text(known),
                    address=origin_text(new.client_endpoint),
                    detail="the OAuth server names a new address for this portal; calls go "
                    "there from now on")
        return True

    def working(self) -> bool:
        """Say whether a pair is held that still serves (or can be renewed)."""
        return self.life.pair is not None and not self.life.state.dead

    def check_replacement(self, pair: TokenPair, consent: Consent, proof: str = "") -> None:
        """Raise Refused unless ``consent`` may replace the held pair with ``pair``."""
        reason = replacement_refusal(self.life.pair, self.working(), pair, consent, proof)
        if reason:
            raise Refused(reason)

    async def install(self, pair: TokenPair, *, trigger: str, consent: Consent,
                      proof: str = "", started: float | None = None) -> None:
        """Store a pair that arrived from outside a refresh (a code exchange, an install event).

        The replacement rule is checked against the held pair and again against the store's
        under its lock (another process may have stored one meanwhile).
        """
        self.check_replacement(pair, consent, proof)
        previous = self.life.pair
        self._on_secret(pair.access_token)
        self._on_secret(pair.refresh_token)
        sync = self.sync_state
        try:
            async with self._store.locked() as stored:
                reason = replacement_refusal(
                    stored.pair, stored.pair is not None and not stored.reauth_required,
                    pair, consent, proof)
                if reason:
                    raise Refused(reason)
                generation = await self._store.save_pair(pair)
                # Whoever stored this pair, an install window opened for the one before it is
                # no longer the operator's wish.
                await self._store.drop_grants(INSTALL)
                closed = (await self._store.fleet_episode(False, self._clock())
                          if self._store.shared else None)
            sync.saved()
        except StoreError as exc:
            if consent is not Consent.OPERATOR:
                # Unchecked against the store's pair: only the operator's word is taken so.
                raise
            sync.failed(exc, kept=True)
            sync.keep_unsaved(self.life.stored.generation)
            generation = self.life.stored.generation + 1
            closed = None
        self.renewal.recovered(alert=None if not self._store.shared else closed is not None,
                               since=closed)
        self._adopt(StoredState(pair=pair, generation=generation), trigger)
        if previous is not None and previous.user_id != pair.user_id:
            log.warning("authorization_user_changed", trigger=trigger, consent=consent.value,
                        previous_user_id=previous.user_id, user_id=pair.user_id)
        log.info("token_authorized", trigger=trigger, member_id=pair.member_id,
                 user_id=pair.user_id, consent=consent.value, scope=pair.scope,
                 expires_at=iso(pair.expires_at),
                 duration=round(self._clock() - (started or self._clock()), 3))

    async def forget(self, reason: str) -> None:
        """Remove this authorization (its portal uninstalled the app, marketplace mode): clear
        its secrets in the store and hold no pair; the registry then drops the portal."""
        remove = getattr(self._store, "remove", None)
        if remove is None:
            await self.revoke(reason)
            return
        async with self._store.locked():
            await remove(reason)
            # A pair held only in memory (the store refused it) is the removed portal's too:
            # writing it later (the watch, aclose) would bring the removed row back.
            self.sync_state.unsaved = False
        self.life.revoked(reason, now=self._clock())
        self.renewal.recovered(alert=False)
        log.warning("portal_removed", member_id=self.pair.member_id if self.pair else "",
                    portal=self._settings.portal, reason=reason)

    async def revoke(self, reason: str) -> None:
        """Mark the held pair dead (the app was uninstalled): a person must authorize again."""
        if self.life.pair is None:
            log.warning("uninstall_ignored", detail="no pair is held")
            return
        try:
            async with self._store.locked():
                await self._store.record_error(reason, reauth_required=True)
        except StoreError as exc:
            self.sync_state.failed(exc, kept=False)
        if self.life.pair is None:  # the store's entry, taken in meanwhile, holds none
            return
        self.life.revoked(reason, now=self._clock())
        self.renewal.note_failure(OAuthError(reason, error="uninstalled", permanent=True),
                                  "install_event")

    # -- renewing --------------------------------------------------------------------------

    async def refresh(self, stale_access: str, *, trigger: str) -> TokenPair:
        """Renew the pair unless it has already been replaced since ``stale_access`` was read.

        However many callers ask at once, one refresh runs; it runs in its own task, so a caller
        that goes away cannot cancel it, and callers are released only once the new pair is saved.
        """
        pair = self.life.pair
        if pair is not None and pair.access_token != stale_access and self.current() is not None:
            return pair
        if self._refresh_task is None or self._refresh_task.done():
            self._raise_if_unusable()
            if self.life.failures and self._clock() < self.life.next_attempt_at:
                raise TokenUnavailable(
                    "renewing the token failed "
                    f"({shown_error(self.life.stored.last_error, self._settings)}); next attempt "
                    f"in {self.life.next_attempt_at - self._clock():.0f} s"
                )
            self.life.begin_refresh()
            self._refresh_task = asyncio.create_task(
                self._refresh(stale_access, trigger), name="token-refresh"
            )
            # Its callers may all have gone; the outcome is logged inside, never lost unseen.
            self._refresh_task.add_done_callback(_retrieve)
        return await asyncio.shield(self._refresh_task)

    async def renew(self, trigger: str) -> TokenPair:
        """Renew the held pair now (the schedule's doing)."""
        pair = self.life.pair
        assert pair is not None
        return await self.refresh(pair.access_token, trigger=trigger)

    async def run_schedule(self) -> None:
        """Renew the pair when due, forever; wakes early whenever the pair changes."""
        await run_schedule(self.renewal, self.renew, self._clock)

    async def run_watch(self) -> None:
        """Notice pairs stored by other processes, and retry a save the store refused."""
        await self.sync_state.run()

    def next_due(self) -> float:
        """Return when the background task should next renew the pair (``inf``: never)."""
        return self.renewal.next_due()

    async def aclose(self, wait_seconds: float = 35.0) -> None:
        """Let a refresh in flight finish (its answer holds the only live refresh token), and
        make a last attempt to save a pair the store refused."""
        task = self._refresh_task
        if task is not None and not task.done():
            log.info("waiting_for_refresh_before_exit")
            await asyncio.wait({task}, timeout=wait_seconds)
        # The pair in memory is the only live one: keep trying a store that is away for a
        # while (a pod drained during a database outage), within the pod's grace period.
        deadline = time.monotonic() + EXIT_SAVE
        told = False
        while self.unsaved:
            try:
                await self.save_unsaved()
            except StoreError as exc:
                if time.monotonic() + EXIT_SAVE_PAUSE > deadline:
                    log.error("token_lost_at_exit", error=exc.description,
                              detail="the newest pair could not be saved; a person may have "
                              "to authorize the app again")
                    return
                if not told:
                    log.warning("token_save_retrying_at_exit", error=exc.description,
                                detail=f"the newest pair is held only here: the store is "
                                f"tried again every {EXIT_SAVE_PAUSE:g} s for up to "
                                f"{EXIT_SAVE:g} s")
                    told = True
                await asyncio.sleep(EXIT_SAVE_PAUSE)

    async def _refresh(self, stale_access: str, trigger: str) -> TokenPair:
        try:
            return await self._renew(stale_access, trigger)
        finally:
            self.life.settle()

    async def _renew(self, stale_access: str, trigger: str) -> TokenPair:
        started = self._clock()
        self.renewal.attempted(started)
        sync = self.sync_state
        if self._store.shared and not sync.store_ok:
            # The watch tries the database every interval and lets this renewal go once it
            # answers, after a replica holding an unwritten pair has had time to write it:
            # taking the lock now could spend the refresh token that pair replaced.
            raise self._lockless(sync.last_error, stale_access, trigger)
        delay: float | None = None  # the fleet's retry, after a failure
        outcome: TokenPair | OAuthError | None = None
        adopted = False
        seen = self.life.stored.generation
        generation = seen
        # Among replicas, who alerts: the one whose write opens (or closes) the shared episode,
        # or first records that a person must act. None: this process decides alone.
        alert: bool | None = None
        opened = False
        since: float | None = None
        try:
            async with self._store.locked() as stored:
                seen = stored.generation
                outcome, adopted = await self._refresh_locked(stored, stale_access)
                if isinstance(outcome, HeldBack):
                    delay = min(BACKOFF_MAX, max(0.0, outcome.retry_at - self._clock()))
                elif isinstance(outcome, OAuthError):
                    # A rejected app (bad id or secret) is a configuration error: it is not
                    # written down as final, so a restart with fixed settings tries again.
                    dead = outcome.permanent and not client_error(outcome)
                    await self._store.record_error(outcome.description, reauth_required=dead)
                    if self._store.shared:
                        # The fleet's next try: the replicas that queued on the lock meanwhile
                        # wait for it rather than asking the OAuth server each in turn. None
                        # after a final answer: nothing is retried then, and a replica started
                        # with fixed settings (a rejected app) tries at once.
                        now = self._clock()
                        delay = None if outcome.permanent else self.renewal.backoff()
                        since = await self._store.fleet_episode(
                            True, now, retry_at=None if delay is None else now + delay)
                        opened = since is not None or (dead and not stored.reauth_required)
                elif not adopted:
                    generation = await self._store.save_pair(outcome)
                    if self._store.shared:
                        since = await self._store.fleet_episode(False, self._clock())
                        opened = since is not None
            if self._store.shared:
                alert = opened  # committed: the others see it from now on
        except StoreError as exc:
            if isinstance(outcome, TokenPair) and not adopted:
                # The OAuth server has rotated the pair: the old refresh token is dead, so
                # the new pair lives in memory until a write succeeds.
                sync.failed(exc, kept=True)
                sync.keep_unsaved(seen)
                generation = seen + 1
                if self._store.shared:
                    alert = False  # the write, when it goes through, closes the fleet's episode
            elif not isinstance(outcome, OAuthError):
                # No lock, so no renewal (one without it could spend the single-use refresh
                # token another replica is spending): back off as from any passing failure,
                # and go again as soon as the store answers.
                sync.failed(exc, kept=False)
                raise self._lockless(exc.description, stale_access, trigger) from None
            else:
                sync.failed(exc, kept=False)
                if self._store.shared and not outcome.permanent:
                    # Unrecorded in the fleet's episode: the next attempt, with the database
                    # back, records it and alerts once for all replicas.
                    alert = False
        else:
            if not adopted and isinstance(outcome, TokenPair):
                sync.saved()
            else:
                sync.reachable()
        assert outcome is not None
        if isinstance(outcome, OAuthError):
            result = ("waited" if isinstance(outcome, HeldBack)
                      else "rejected" if outcome.permanent else "failed")
            self._metrics.refreshes.labels(trigger=trigger, result=result).inc()
            self.renewal.failed(outcome, trigger, alert=alert, delay=delay)
            raise renewal_error(outcome, self._settings) from None
        if adopted:
            self._metrics.refreshes.labels(trigger=trigger, result="adopted").inc()
            return outcome  # another process renewed it; adopted under the lock
        self.renewal.succeeded()
        self._metrics.refreshes.labels(trigger=trigger, result="ok").inc()
        self.renewal.recovered(alert=alert, since=since)
        previous = self.life.stored
        self.life.refreshed(outcome, generation,
                            by=self._settings.replica if self._store.shared else "")
        self._adopted(previous, trigger, changed=True)
        log.info("token_refreshed", trigger=trigger, expires_at=iso(outcome.expires_at),
                 duration=round(self._clock() - started, 3))
        return outcome

    def _lockless(self, error: str, stale_access: str, trigger: str) -> TokenUnavailable:
        """Record a renewal held back for want of the store's lock; return the callers' error."""
        self._held_back = True
        if trigger == "auth_error":
            self._refused = stale_access
        why = f"no renewal without the token store's lock: {error}"
        # Among replicas the database's absence is each one's own, and told by readiness, a
        # metric and a warning: the fleet's alerts are the authorization's (one per episode,
        # recorded in the database), so this opens none.
        self.renewal.failed(OAuthError(why, error="store_unavailable", permanent=False),
                            trigger, alert=False if self._store.shared else None)
        return TokenUnavailable(
            f"the token must be renewed, but {why}; renewed as soon as the store answers")

    async def _refresh_locked(
        self, stored: StoredState, stale_access: str
    ) -> tuple[TokenPair | OAuthError, bool]:
        """Under the store's lock: adopt a newer stored pair, or refresh the freshest one.

        Returns the outcome and whether it was adopted from the store.
        """
        newer = self.sync_state.newer_in_store(stored)
        if newer:
            self._adopt(stored, "store")
        # Another replica's pair may also have arrived (NOTIFY, polling) while this one waited
        # for the lock: refreshing again would spend a renewal the fleet does not need.
        fresh = self.current()
        if fresh is not None and fresh.access_token != stale_access:
            return fresh, True
        if newer:
            self._raise_if_unusable()
        if self._store.shared and stored.retry_at is not None and stored.retry_at > self._clock():
            # Another replica's renewal of this very pair failed moments ago: the fleet tries
            # again at its time, with one call, rather than once per replica now.
            return HeldBack(stored.last_error or "renewing the token failed",
                            stored.retry_at), False
        pair = self.life.pair
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
        # The token answer carries no application token; it outlives refreshes. Nor may it move
        # the calls (and the token) to another portal: the known address is kept.
        endpoint = new.client_endpoint
        known = pair.client_endpoint or self._settings.rest_base
        if endpoint and not self._moved(new, pair, known) and not self._same_portal(
                endpoint, known, source="refresh"):
            endpoint = pair.client_endpoint
        member_id = new.member_id
        if pair.member_id and member_id != pair.member_id:
            # Nor may it make this authorization another portal's: in marketplace mode the
            # member_id is the key calls are routed by.
            log.error("member_id_refused", source="refresh", member_id=pair.member_id,
                      offered=member_id, detail="the token answer names another portal's "
                      "member_id; the authorization stays this portal's")
            member_id = pair.member_id
        return replace(new, application_token=pair.application_token,
                       client_endpoint=endpoint, member_id=member_id), False

    # -- taking a stored entry in ----------------------------------------------------------

    def _adopt(self, stored: StoredState, source: str) -> None:
        previous = self.life.stored
        changed = self.life.adopt(stored)
        if changed and stored.pair is not None and not stored.reauth_required:
            # A new pair from anywhere ends a failure episode; among replicas, the one that
            # stored it closed the shared episode and said so.
            self.renewal.recovered(alert=False if self._store.shared else None)
        self._adopted(previous, source, changed=changed)

    def _adopted(self, previous: StoredState, source: str, *, changed: bool) -> None:
        """Tell metrics, the redactor, the log and the schedule of the entry now held."""
        stored = self.life.stored
        pair = stored.pair
        metrics = self._metrics
        metrics.authorized.set(1 if pair is not None else 0)
        metrics.expires_at.set(pair.expires_at if pair else 0)
        metrics.last_refresh.set(pair.obtained_at if pair else 0)
        metrics.reauthorization_required.set(1 if self.life.state.dead else 0)
        if pair is not None:
            self._on_secret(pair.access_token)
            self._on_secret(pair.refresh_token)
        if changed:
            if pair is not None and source == "store" and previous.pair is not None:
                log.info("token_loaded", source=source, generation=stored.generation,
                         expires_at=iso(pair.expires_at))
            self._check_scope(pair)
        if stored.foreign and not previous.foreign:
            log.warning("token_store_foreign", detail=stored.foreign)
        self.renewal.touch()

    def _check_scope(self, pair: TokenPair | None) -> None:
        if pair is None or not self._settings.scope:
            return
        granted = {s.strip() for s in pair.scope.split(",") if s.strip()}
        missing = sorted(set(self._settings.scope) - granted)
        if missing:
            log.warning("scope_not_granted", requested=",".join(self._settings.scope),
                        granted=pair.scope, missing=missing)
