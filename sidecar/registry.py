"""The portals a sidecar holds: one bundle (authorization, gate, coalescer, addresses) each.

A single-portal sidecar holds exactly one, built as it always was. In marketplace mode (several
portals, one app) every authorization the store holds for an allowed portal is one, keyed by its
portal's ``member_id``; calls name theirs by host or member_id, and an install adds one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client.core import GaugeMetricFamily

from sidecar.alerts import Alerter
from sidecar.authinfo import iso
from sidecar.authorization import Authorization, Consent
from sidecar.coalescer import Coalescer
from sidecar.config import PortalSettings, Settings
from sidecar.errors import (
    OAuthError,
    PortalMismatch,
    PortalRequired,
    PortalUnknown,
    Refused,
    StoreError,
)
from sidecar.limits import Gate
from sidecar.metrics import Metrics
from sidecar.oauth import OAuthClient, origin_text
from sidecar.pgbucket import FleetBudgets, PgBucket
from sidecar.pgstore import PgStore
from sidecar.portal import Addresses
from sidecar.rules import shown_whole
from sidecar.scheduler import Scheduler
from sidecar.storage import MOVED, UNINSTALLED, PairStore, StoredState, TokenPair
from sidecar.store import Entry, TokenStore
from sidecar.upstream import Pool

log = structlog.get_logger("sidecar.registry")

# The gauges that describe one authorization: in marketplace mode each portal's would overwrite
# the others', so portals keep their own (unexported) and the registry exports counts instead.
_OWN_GAUGES = ("authorized", "expires_at", "last_refresh", "refresh_failing",
               "refresh_failures", "reauthorization_required", "queue_depth")


class _Unexported:
    """A gauge nobody scrapes."""

    def set(self, value: float) -> None:
        """Forget ``value``."""


def portal_metrics(metrics: Metrics) -> Metrics:
    """The metrics a marketplace portal's parts write: the totals shared, its gauges its own."""
    own = copy.copy(metrics)
    for name in _OWN_GAUGES:
        setattr(own, name, _Unexported())
    return own


_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_names(address: str) -> set[str]:
    """The names a call may give the portal at ``address``: its host:port, and its host alone
    when the port is its scheme's own (lower-cased; none for '')."""
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        return set()
    host = (parts.hostname or "").lower()
    if not host:
        return set()
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if port is None or port == default:
        return {host, f"{host}:{default}"} if default else {host}
    return {f"{host}:{port}"}


def spread(key: str) -> float:
    """Where in the refresh interval a portal renews (0..1), fixed by its key: renewals of
    portals authorized together drift apart instead of falling due together forever."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


def host_of(address: str) -> str:
    """A portal address's host with its port where it has one, lower case ('' if none)."""
    return urlsplit(address).netloc.lower()


def origin_address(endpoint: str) -> str:
    """The portal's address (scheme and host) from a REST endpoint like https://a.b/rest/."""
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


class Portal:
    """One portal's authorization and what serves its calls (built at its first call: most
    of a marketplace's portals are idle most of the time, and each gate costs memory)."""

    def __init__(self, key: str, tokens: Authorization,
                 serving: Callable[[Authorization], tuple[Addresses, Gate, PgBucket | None]],
                 ) -> None:
        self.key = key
        self.tokens = tokens
        self._serving = serving
        self._parts: tuple[Addresses, Gate, PgBucket | None] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def _built(self) -> tuple[Addresses, Gate, PgBucket | None]:
        if self._parts is None:
            self._parts = self._serving(self.tokens)
        return self._parts

    @property
    def addresses(self) -> Addresses:
        """Where this portal's calls go."""
        return self._built()[0]

    @property
    def gate(self) -> Gate:
        """This portal's rate gate (its bucket, queue, pauses and coalescing)."""
        return self._built()[1]

    @property
    def budget(self) -> PgBucket | None:
        """The fleet's shared budget of this portal's calls (single-portal, PostgreSQL)."""
        return self._built()[2]

    @property
    def address(self) -> str:
        """Where the portal is: the held pair's endpoint, else the configured address."""
        pair = self.tokens.pair
        endpoint = origin_address(pair.client_endpoint) if pair is not None else ""
        return endpoint or self.tokens.settings.portal

    @property
    def member_id(self) -> str:
        """The portal's member_id ('' until a pair names it)."""
        pair = self.tokens.pair
        return pair.member_id if pair is not None else self.key

    async def aclose(self) -> None:
        """Stop this portal's tasks and gate; let a renewal in flight finish."""
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._parts is not None:
            _, gate, budget = self._parts
            await gate.aclose()
            if budget is not None:
                await budget.aclose()
        await self.tokens.aclose()


class PortalsCollector:
    """The marketplace gauges, read at scrape time: counts per state, and a label per portal
    only for the bounded set that needs attention (at most ``Portals.SHOWN``), or for every
    portal where the operator turns it on (SIDECAR_METRICS_PER_PORTAL)."""

    def __init__(self, portals: Portals, *, per_portal: bool) -> None:
        self._portals = portals
        self._per_portal = per_portal

    def describe(self) -> list[Any]:
        """Describe nothing up front (the families depend on what is held)."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield the gauges as they are now."""
        states = GaugeMetricFamily("bitrix_sidecar_portals",
                                   "Portals held (marketplace mode), by state.", labels=["state"])
        for state, count in self._portals.summary()["states"].items():
            states.add_metric([state], count)
        yield states
        attention = GaugeMetricFamily(
            "bitrix_sidecar_portal_attention",
            "1 for each portal that needs attention (not valid), at most 20 named.",
            labels=["portal", "member_id", "state"])
        expires = GaugeMetricFamily(
            "bitrix_sidecar_portal_token_expires_at",
            "When each portal's access token expires (SIDECAR_METRICS_PER_PORTAL=on).",
            labels=["portal", "member_id"])
        shown = 0
        for portal in self._portals:
            state = portal.tokens.status_state()
            if state != "valid" and shown < Portals.SHOWN:
                attention.add_metric([portal.address, portal.member_id, state], 1)
                shown += 1
            if self._per_portal:
                pair = portal.tokens.pair
                expires.add_metric([portal.address, portal.member_id],
                                   pair.expires_at if pair else 0)
        yield attention
        if self._per_portal:
            yield expires


class Portals:
    """Every portal this sidecar holds, found by host or member_id."""

    def __init__(
        self,
        settings: Settings,
        store: TokenStore | PgStore,
        oauth: OAuthClient,
        pool: Pool,
        *,
        metrics: Metrics,
        alerts: Alerter,
        on_secret: Callable[[str], None],
        clock: Callable[[], float],
        watch_interval: float,
    ) -> None:
        self.settings = settings
        self.store = store
        self._oauth = oauth
        self._pool = pool
        self._metrics = metrics
        self._own_metrics = portal_metrics(metrics) if settings.marketplace else metrics
        self._alerts = alerts
        self._on_secret = on_secret
        self._clock = clock
        self._watch_interval = watch_interval
        self._portals: dict[str, Portal] = {}  # by key
        self._names: dict[str, Portal] = {}  # by host[:port] and by member_id
        self._named: dict[str, set[str]] = {}  # each portal's names, by its key
        self._watch: asyncio.Task[None] | None = None
        self._seq = 0
        self._adopting = asyncio.Lock()
        # Marketplace mode: one schedule for every portal (a loop each would not scale).
        self.scheduler = Scheduler(settings.refresh_rate, clock)
        # Marketplace mode on PostgreSQL: each portal's rate budget is the fleet's.
        self.budgets: FleetBudgets | None = None
        self._scheduling: asyncio.Task[None] | None = None
        if settings.marketplace:
            metrics.registry.register(PortalsCollector(
                self, per_portal=settings.metrics_per_portal))

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._portals)

    def __iter__(self) -> Any:
        return iter(list(self._portals.values()))

    @property
    def single(self) -> Portal | None:
        """The portal of a single-portal sidecar (None in marketplace mode)."""
        return None if self.settings.marketplace else self._portals.get("")

    def find(self, name: str) -> Portal | None:
        """The portal named by its host[:port] or its member_id (lower case), if held."""
        return self._names.get(name)

    def pick(self, in_path: str, in_header: str) -> Portal:
        """The portal a call names (by its path prefix, its header, or neither); raise the
        Bitrix-shaped refusal when it names none that is held, or two different ones."""
        if not in_path and not in_header:
            if len(self._portals) == 1:
                return next(iter(self._portals.values()))
            if not self._portals:
                raise PortalUnknown("this sidecar holds no portal's authorization yet: install "
                                    "the app on a portal first")
            raise PortalRequired(
                f"this sidecar holds {len(self._portals)} portals: name one with the path "
                "/portal/<host or member_id>/rest/<method> or the header X-Bitrix-Portal")
        by_path = self.find(in_path) if in_path else None
        by_header = self.find(in_header) if in_header else None
        if in_path and in_header and in_path != in_header and (
                by_path is None or by_path is not by_header):
            raise PortalMismatch(
                f"the path names the portal {shown_whole(in_path)} and the X-Bitrix-Portal "
                f"header {shown_whole(in_header)}: name one portal, or the same in both")
        portal = by_path or by_header
        if portal is None:
            raise PortalUnknown(f"this sidecar holds no portal {shown_whole(in_path or in_header)}"
                                + self._served())
        return portal

    def _served(self) -> str:
        """What a single-portal sidecar serves, for an unknown portal's error ('' else)."""
        single = self.single
        if single is None:
            return ""
        shown = min(host_names(single.tokens.settings.rest_base), key=len, default="")
        return f"; it serves {shown} alone" if shown else ""

    # -- what operators see (bounded however many portals are held) ------------------------

    # How many portals that need attention /status names (the rest are counted).
    SHOWN = 20

    def summary(self) -> dict[str, Any]:
        """Describe every portal in a few lines: counts per state, the oldest failure, and at
        most ``SHOWN`` portals that need attention; never a token."""
        counts: dict[str, int] = {}
        attention: list[dict[str, Any]] = []
        oldest: tuple[float, Portal] | None = None
        for portal in self._portals.values():
            tokens = portal.tokens
            state = tokens.status_state()
            counts[state] = counts.get(state, 0) + 1
            if state == "valid":
                continue
            since = tokens.failing_since()
            if since is not None and (oldest is None or since < oldest[0]):
                oldest = (since, portal)
            if len(attention) < self.SHOWN:
                attention.append({"portal": portal.address, "member_id": portal.member_id,
                                  "state": state, "failing_since": iso(since)})
        return {
            "mode": "marketplace",
            "client_id": self.settings.client_id,
            "oauth_server": self.settings.oauth_url,
            "portals": len(self._portals),
            "states": dict(sorted(counts.items())),
            "oldest_failure": None if oldest is None else {
                "portal": oldest[1].address, "member_id": oldest[1].member_id,
                "since": iso(oldest[0])},
            "attention": attention,
            "attention_not_shown": max(0, len(self._portals) - counts.get("valid", 0)
                                       - len(attention)),
        }

    def readiness(self) -> tuple[bool, str]:
        """Readiness of a marketplace sidecar: about the sidecar, not each portal (one portal
        needing re-authorization must not take every portal's calls out of service)."""
        total = len(self._portals)
        broken = sum(1 for portal in self._portals.values()
                     if portal.tokens.status_state() != "valid")
        if not total:
            return True, "ok: no portal has installed the app yet"
        if broken:
            return True, f"ok: {total} portals, {broken} need attention (see /status)"
        return True, f"ok: {total} portals"

    # -- building --------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the portals the store holds (the one configured portal, if single)."""
        if not self.settings.marketplace:
            await self._build("", self.store, self.settings.portal)
            return
        if isinstance(self.store, PgStore) and self.settings.rate > 0:
            self.budgets = FleetBudgets(self.store, rate=self.settings.rate,
                                        burst=self.settings.burst, metrics=self._metrics)
            await self.budgets.start()
        entries = await self._upgraded(await self.store.entries())
        skipped = 0
        for entry in entries:
            address = origin_address(entry.state.pair.client_endpoint) if entry.state.pair \
                else entry.portal
            if not entry.key or "://" in entry.key or not self.settings.portals.allows(address):
                # A single-portal sidecar's row (not taken in: see _upgraded), or a portal
                # BITRIX_PORTAL no longer allows.
                skipped += 1
                continue
            await self._build(entry.key, self.store.authorization(entry.key, address), address,
                              entry.state)
        self._seq = max((entry.seq for entry in entries), default=0)
        if skipped:
            log.warning("portals_skipped", count=skipped,
                        detail="the store holds authorizations of portals BITRIX_PORTAL does "
                        "not allow (or of a single-portal sidecar): they are not served")
        log.info("portals_loaded", count=len(self._portals))
        self._watch = asyncio.create_task(self._run_watch(), name="portals-watch")
        self._scheduling = asyncio.create_task(self.scheduler.run(), name="portals-schedule")

    async def _upgraded(self, entries: list[Entry]) -> list[Entry]:
        """Take a single-portal sidecar's authorization (the store's row for the one portal
        it served) into marketplace mode under its portal's member_id, with no new approval;
        mark the old row moved, so a single-portal sidecar still running on it stops renewing
        a refresh token that is now this one's. Return the entries as they are now."""
        held = {entry.key for entry in entries}
        moved = False
        for entry in entries:
            pair = entry.state.pair
            if entry.key and "://" not in entry.key:
                continue  # a portal's own row already
            if (pair is None or not pair.member_id or entry.state.reauth_required
                    or pair.member_id in held):
                continue
            address = origin_address(pair.client_endpoint) or entry.portal
            if not self.settings.portals.allows(address):
                continue
            row = self.store.authorization(pair.member_id, address)
            async with row.locked() as there:
                if there.pair is not None:
                    continue
                await row.save_pair(pair)
            old = self.store.authorization(entry.key, entry.portal)
            async with old.locked():
                await old.remove(f"{MOVED} marketplace mode, as the portal {pair.member_id}")
            log.warning("portal_upgraded", member_id=pair.member_id,
                        portal=origin_text(address),
                        detail="the single-portal authorization is served in marketplace mode "
                        "from now on, with no new approval")
            moved = True
        return await self.store.entries() if moved else entries

    async def _build(self, key: str, store: PairStore, address: str,
                     stored: StoredState | None = None) -> Portal:
        settings = self.settings
        if settings.marketplace:
            # Everything that names the portal (links, alerts, status) names this one.
            settings = PortalSettings(settings, address)
        metrics = self._own_metrics
        tokens = Authorization(
            store, self._oauth, settings, clock=self._clock, on_secret=self._on_secret,
            watch_interval=self._watch_interval, metrics=metrics, alerts=self._alerts)
        if self.settings.marketplace:
            tokens.allowed = self.settings.portals
        await tokens.start(stored)
        budget = None
        if isinstance(store, PgStore) and settings.rate > 0:
            # One budget for every sidecar on this database.
            budget = PgBucket(store, rate=settings.rate, burst=settings.burst,
                              metrics=self._metrics)
            await budget.start()

        def serving(tokens: Authorization) -> tuple[Addresses, Gate, PgBucket | None]:
            shared = budget
            if self.budgets is not None and isinstance(self.store, PgStore):
                # The fleet's budget of this portal, taken from its own row.
                shared = PgBucket(self.store, rate=settings.rate, burst=settings.burst,
                                  metrics=self._metrics, key=key, fleet=self.budgets)
                shared.attach()
            addresses = Addresses(settings.rest_base)
            coalescer = Coalescer(tokens, self._pool, addresses, self._metrics,
                                  time_limit=settings.upstream_timeout)
            gate = tokens.gate = Gate(
                rate=settings.rate, burst=settings.burst, queue_timeout=settings.queue_timeout,
                coalesce=settings.coalesce, metrics=metrics, send_batch=coalescer.send,
                shared=shared)
            return addresses, gate, shared

        portal = Portal(key, tokens, serving)
        if budget is not None:
            portal.gate  # noqa: B018 - built now: the budget is the fleet's from the start
        # self.settings: the portal's own copy names one address, so it never says marketplace.
        if self.settings.marketplace:
            renewal = tokens.renewal
            renewal.spread = spread(key)
            renewal.on_change = lambda: self.scheduler.moved(key)
            self.scheduler.add(key, tokens)
        else:
            portal.tasks.append(asyncio.create_task(tokens.run_schedule(),
                                                    name="token-schedule"))
            portal.tasks.append(asyncio.create_task(tokens.run_watch(), name="token-watch"))
        self._portals[key] = portal
        self._index(portal)
        return portal

    def _index(self, portal: Portal) -> None:
        """(Re)name ``portal`` by its hosts (configured and held) and its member_id."""
        self._unname(portal)
        names = host_names(portal.tokens.settings.rest_base)
        pair = portal.tokens.pair
        if pair is not None:
            names |= host_names(pair.client_endpoint)
        if portal.member_id:
            names.add(portal.member_id.lower())
        for name in names:
            self._names[name] = portal
        self._named[portal.key] = names

    def _unname(self, portal: Portal) -> None:
        """Drop the names ``portal`` is found by (those another portal took stay its)."""
        for name in self._named.pop(portal.key, set()):
            if self._names.get(name) is portal:
                del self._names[name]

    async def adopt(self, pair: TokenPair) -> tuple[Portal, bool]:
        """The portal of an install's pair: the held one with its member_id, or a new one
        (not yet stored: the install stores the pair through its authorization); and whether
        this call built it (then only this caller may drop it again if its install fails)."""
        # One at a time: the same install event replayed at once must not build two bundles
        # for one key (the second would replace the first, and its failure drop both).
        async with self._adopting:
            portal = self._portals.get(pair.member_id)
            if portal is not None:
                return portal, False
            address = origin_address(pair.client_endpoint)
            other = self._names.get(host_of(address))
            if other is not None:
                # A host already held under another member_id: a portal deleted and made anew
                # at the same address, or a lie. Only the operator moves an authorization.
                raise PortalMismatch(
                    f"the portal {host_of(address)} is held under another member_id: remove "
                    "that authorization first ('bitrix-sidecar forget --portal HOST')")
            assert isinstance(self.store, (TokenStore, PgStore))
            return await self._build(pair.member_id, self.store.authorization(
                pair.member_id, address), address), True

    async def confirm(self, pair: TokenPair) -> TokenPair:
        """Renew a new portal's install pair once at the OAuth server, whose answer (not the
        payload) says which member_id and address the pair is for; refuse it if they differ.

        Nothing on the portal's REST API names its member_id, and a portal BITRIX_PORTAL allows
        may be anyone's: taken on the payload's word, one portal could hold another's member_id
        before that portal installs, and calls naming it would reach the impostor."""
        try:
            new = await self._oauth.refresh(pair.refresh_token)
        except OAuthError as exc:
            raise Refused(f"the OAuth server does not renew the install's pair: "
                          f"{exc.description}") from None
        self._on_secret(new.access_token)
        self._on_secret(new.refresh_token)
        if new.member_id != pair.member_id or origin_address(
                new.client_endpoint) != origin_address(pair.client_endpoint):
            log.error("install_identity_refused", member_id=pair.member_id,
                      portal=origin_text(pair.client_endpoint), oauth_member_id=new.member_id,
                      oauth_portal=origin_text(new.client_endpoint))
            raise Refused("the OAuth server says the install's pair is for another portal "
                          "than its payload names")
        return dataclasses.replace(new, application_token=pair.application_token,
                                   user_id=pair.user_id, scope=new.scope or pair.scope,
                                   domain=pair.domain or new.domain)

    async def authorize(self, code: str, *, trigger: str) -> TokenPair:
        """Exchange an operator's code (the CLI, the browser flow) for whichever allowed
        portal it was approved on; store the pair as that portal's, adding it if new."""
        pair = await self._oauth.exchange_code(code)
        self._on_secret(pair.access_token)
        self._on_secret(pair.refresh_token)
        if not pair.member_id:
            raise Refused("the OAuth server's answer names no member_id")
        if not self.settings.portals.allows(pair.client_endpoint):
            raise Refused(f"the code was approved on {origin_text(pair.client_endpoint)}, "
                          "which BITRIX_PORTAL does not allow")
        portal = self.find(pair.member_id.lower())
        created = False
        if portal is None:
            portal, created = await self.adopt(pair)
        try:
            portal.tokens.check_portal(pair, source="exchange")
            await portal.tokens.install(pair, trigger=trigger, consent=Consent.OPERATOR)
        except BaseException:
            if created and portal.tokens.pair is None:
                await self.remove(portal)
            raise
        self._index(portal)
        if created:
            self.added(pair, trigger)
        return pair

    def added(self, pair: TokenPair, trigger: str) -> None:
        """Say (log, count) that a new portal's authorization is held."""
        self._metrics.portal_events.labels(event="added").inc()
        log.warning("portal_added", member_id=pair.member_id,
                    portal=origin_text(pair.client_endpoint), trigger=trigger)

    def renamed(self, portal: Portal) -> None:
        """A portal's pair changed (its address may have moved): index it anew."""
        self._index(portal)

    async def remove(self, portal: Portal, *, uninstalled: bool = False) -> None:
        """Forget a portal: its authorization was removed (``uninstalled``: here, now), or an
        install that was adding it failed."""
        if self._portals.pop(portal.key, None) is not None and uninstalled:
            self._metrics.portal_events.labels(event="removed").inc()
        self.scheduler.remove(portal.key)
        self._unname(portal)
        await portal.aclose()

    # -- the one watch of marketplace mode ---------------------------------------------------

    async def _run_watch(self) -> None:
        """Notice what other processes (the CLI, other replicas) wrote, for every portal at
        once: one query per interval, not one per portal."""
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                await self._watch_once()
            except StoreError as exc:
                log.warning("portals_watch_failed", error=exc.description)
            except Exception:
                log.exception("portals_watch_error")

    async def _watch_once(self) -> None:
        for portal in self:
            sync = portal.tokens.sync_state
            if sync.unsaved:
                await sync.save_unsaved()
        seq, keys = await self.store.changes_since(self._seq)
        # The position moves only once every change is taken in: a store that fails halfway
        # (a database blip) leaves the rest for the next round, not forgotten.
        for key in dict.fromkeys(keys):
            portal = self._portals.get(key)
            if portal is not None:
                await portal.tokens.sync_state.sync()
                if portal.tokens.pair is None and portal.tokens.life.stored.reauth_required:
                    stored = await self.store.authorization(key, portal.address).load()
                    if stored.pair is None and stored.last_error.startswith(UNINSTALLED):
                        await self.remove(portal)
                        continue
                if self._portals.get(key) is portal:  # not removed while the store answered
                    self._index(portal)
            elif key:
                stored = await self.store.authorization(key, "").load()
                pair = stored.pair
                if pair is not None and self.settings.portals.allows(
                        origin_address(pair.client_endpoint)):
                    # Under adopt's lock, and only if an install here has not built it while
                    # the store answered: a second bundle would replace the first, unclosed.
                    async with self._adopting:
                        if key not in self._portals:
                            await self._build(key, self.store.authorization(
                                key, origin_address(pair.client_endpoint)),
                                origin_address(pair.client_endpoint))
        self._seq = seq

    async def aclose(self) -> None:
        """Stop the watch, the schedule and every portal."""
        for task in (self._watch, self._scheduling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for portal in self:
            await portal.aclose()
        if self.budgets is not None:
            await self.budgets.aclose()
