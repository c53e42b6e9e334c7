"""The `Emulator`: portals assembled from their parts, with the controls a test drives them by.

A test or the CLI holds one `Emulator`: a portal (the default one, whose address is also the
shared OAuth server's) that can add more `Portal`s, each with its own member_id, data, rate
bucket, application tokens and address. Every part's state hangs off them, so a test can inspect
and poke a portal while `create_app()` serves it (`run_emulator` serves them on real sockets).
"""

from __future__ import annotations

import collections
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar.emulator.account import Account
from sidecar.emulator.batch import Batch
from sidecar.emulator.crm import Crm
from sidecar.emulator.lists import Lists
from sidecar.emulator.model import EmulatorStats, Handler, Method, OAuthFailure, RestCall
from sidecar.emulator.oauth import Identity, IssuedPair, OAuthServer
from sidecar.emulator.records import Records
from sidecar.emulator.rest import REST_LOG_LIMIT, RestServer
from sidecar.emulator.v3 import Tasks, V3Server

__all__ = ["EMULATOR_KEY", "PORTAL_KEY", "Emulator", "Portal", "run_emulator", "run_portal"]

# Added portals listen on 127.0.0.2, 127.0.0.3, ...: all of 127.0.0.0/8 is loopback on Linux.
_FIRST_PORTAL_HOST = ipaddress.IPv4Address("127.0.0.2")


class Portal:
    """One Bitrix24 portal: its REST endpoint, data and controls, on a shared OAuth server."""

    def __init__(
        self,
        name: str,
        *,
        oauth: OAuthServer,
        identity: Identity,
        host: str,
        clock: Callable[[], float],
        stats: EmulatorStats,
        rate: float | None,
        burst: int,
        call_delay: float,
        rest_log_limit: int,
    ) -> None:
        """Set up an empty portal known to `oauth` as `identity`, to be served on `host`."""
        self._name = name
        self._host = host
        self._clock = clock
        self._stats = stats
        self._oauth = oauth
        self._identity = identity
        self._rest = RestServer(
            oauth=oauth, portal=identity, clock=clock, stats=stats,
            rate=rate, burst=burst, call_delay=call_delay, rest_log_limit=rest_log_limit,
        )
        self._crm = Crm(clock=clock)
        self._lists = Lists(clock=clock, leads=self._crm.leads, lead_view=self._crm.lead_view)
        self._rest.add_methods(Batch(self._rest, clock=clock).methods())
        self._rest.add_methods(Account(oauth).methods())
        self._rest.add_methods(self._crm.methods())
        self._rest.add_methods(self._lists.methods())
        self._tasks = Tasks(clock=clock)
        self._v3 = V3Server(self._rest, self._tasks)

    def create_app(self) -> web.Application:
        """Build a fresh aiohttp application serving this portal and the shared token endpoint."""
        app = web.Application()
        app[PORTAL_KEY] = self
        for path in ("/oauth/token/", "/oauth/token"):
            app.router.add_get(path, self._oauth.handle_token, allow_head=False)
            app.router.add_post(path, self._oauth.handle_token)
        for path in ("/oauth/authorize/", "/oauth/authorize"):
            app.router.add_get(path, self._handle_authorize, allow_head=False)
        # REST 3.0 first: the v2 route below would take /rest/api/... as well.
        app.router.add_get("/rest/api/{tail:.*}", self._v3.handle, allow_head=False)
        app.router.add_post("/rest/api/{tail:.*}", self._v3.handle)
        app.router.add_get("/rest/{tail:.*}", self._rest.handle, allow_head=False)
        app.router.add_post("/rest/{tail:.*}", self._rest.handle)
        return app

    async def _handle_authorize(self, request: web.Request) -> web.Response:
        """Serve this portal's authorize page."""
        return await self._oauth.handle_authorize(request, self._identity)

    # -- what a test reads ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name the portal was added under ("" for the emulator's own)."""
        return self._name

    @property
    def host(self) -> str:
        """The loopback address `run_emulator` serves this portal on by default."""
        return self._host

    @property
    def clock(self) -> Callable[[], float]:
        """The clock every part reads (fixed at construction)."""
        return self._clock

    @property
    def stats(self) -> EmulatorStats:
        """Counters of what reached the portal (token requests: on the emulator's)."""
        return self._stats

    @property
    def rest_log(self) -> collections.deque[RestCall]:
        """The last `rest_log_limit` REST requests received, oldest first."""
        return self._rest.rest_log

    @property
    def leads(self) -> Records:
        """Expose stored leads by ID, for assertions (the "crm.lead" table)."""
        return self._crm.leads

    def task(self, task_id: int) -> dict[str, Any]:
        """Return a stored task as REST 3.0 tasks.task.get answers it (KeyError if none)."""
        return self._tasks.view(task_id)

    @property
    def task_count(self) -> int:
        """How many tasks the portal holds."""
        return len(self._tasks)

    def records(self, table: str) -> Records:
        """Return a record table by name ("crm.deal", "tasks.task", "lists.element:47", ...)."""
        return self._lists.table(table)

    @property
    def base_url(self) -> str:
        """The address the portal is served at ("" until bound)."""
        return self._identity.base_url

    @property
    def member_id(self) -> str:
        """The portal's member_id, as token answers and install events carry it."""
        return self._identity.member_id

    def current_tokens(self) -> list[IssuedPair]:
        """List this portal's pairs whose refresh token is still usable, oldest first."""
        return self._oauth.current_tokens(self._identity)

    def application_token(self, client_id: str) -> str:
        """Return the token this portal signs this app's events with."""
        if self._oauth.app(client_id) is None:
            raise KeyError(client_id)
        return self._identity.application_token(client_id)

    # -- knobs a test turns --------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """REST requests a second the leaky bucket drains; None turns the limit off."""
        return self._rest.rate

    @rate.setter
    def rate(self, rate: float | None) -> None:
        self._rest.rate = rate

    @property
    def burst(self) -> int:
        """REST requests the leaky bucket holds before it answers 503."""
        return self._rest.burst

    @burst.setter
    def burst(self, burst: int) -> None:
        self._rest.burst = burst

    @property
    def call_delay(self) -> float:
        """Seconds every admitted REST call waits before it runs."""
        return self._rest.call_delay

    @call_delay.setter
    def call_delay(self, seconds: float) -> None:
        self._rest.call_delay = seconds

    @property
    def v3_flat_errors(self) -> bool:
        """Whether REST 3.0 answers auth, limit and not-found errors in v2's flat shape."""
        return self._v3.flat_errors

    @v3_flat_errors.setter
    def v3_flat_errors(self, flat: bool) -> None:
        self._v3.flat_errors = flat

    @property
    def v3_task_page_cap(self) -> int:
        """The most tasks a tasks.task.list page holds, whatever `limit` asks (default 1000)."""
        return self._tasks.page_cap

    @v3_task_page_cap.setter
    def v3_task_page_cap(self, cap: int) -> None:
        self._tasks.page_cap = cap

    @property
    def signed_in_user(self) -> int:
        """The portal user whose browser approves the app on the authorize page."""
        return self._identity.signed_in_user

    @signed_in_user.setter
    def signed_in_user(self, user_id: int) -> None:
        self._identity.signed_in_user = user_id

    # -- test controls -------------------------------------------------------------------------

    def bind(self, base_url: str) -> None:
        """Set the address the portal is served at, as it appears in tokens and redirects."""
        self._identity.base_url = base_url.rstrip("/")

    def register_webhook(self, user_id: int, code: str) -> None:
        """Create an inbound webhook served at /rest/{user_id}/{code}/{method}."""
        self._rest.register_webhook(user_id, code)

    def add_tasks(
        self, count: int, *, title: str = "Task {id}", responsible_id: int = 1,
        creator_id: int = 1,
    ) -> range:
        """Store ``count`` tasks at once (``title`` formatted with each id); return their ids."""
        return self._tasks.add_many(count, title=title, responsible_id=responsible_id,
                                    creator_id=creator_id)

    def issue_code(self, client_id: str, *, user_id: int = 1) -> str:
        """Issue an authorization code as if a person (``user_id``) approved the app now."""
        return self._oauth.issue_code(client_id, self._identity, user_id=user_id)

    def issue_tokens(self, client_id: str, *, user_id: int = 1) -> dict[str, Any]:
        """Mint a token pair without a code, as ONAPPINSTALL delivers one; return the token body."""
        return self._oauth.issue_tokens(client_id, self._identity, user_id=user_id)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far for this portal answer 401 expired_token."""
        self._oauth.expire_access_tokens(self._identity)

    def revoke_access_token(self, access_token: str) -> None:
        """Forget one access token, so it answers 401 invalid_token as if rotated away elsewhere."""
        self._oauth.revoke_access_token(access_token)

    def revoke_refresh_tokens(self) -> None:
        """Make every refresh token issued so far for this portal answer invalid_grant."""
        self._oauth.revoke_refresh_tokens(self._identity)

    def fail_next_rest(
        self, status: int, error: str, description: str = "Injected failure"
    ) -> None:
        """Queue an error answer for the next REST request, which is then logged but not run."""
        self._rest.fail_next(status, error, description)

    def seed(
        self, table: str, count: int, fields: Callable[[int], Mapping[str, Any]] | None = None
    ) -> list[int]:
        """Add ``count`` made-up records to a table (``fields(id)`` adds or overrides fields).

        Tables: "crm.lead", "crm.deal", "crm.contact", "crm.company", "crm.activity",
        "crm.product", "crm.timeline.comment", "tasks.task", "user", "crm.item:{entityTypeId}"
        (128 and up; 1-4 are the crm.lead/deal/contact/company tables), "lists.element:{IBLOCK_ID}"
        and "catalog.product:{iblockId}". Returns the new IDs, ascending.
        """
        return self._lists.seed(table, count, fields)

    def add_method(self, name: str, handler: Handler, *, scope: str | None = None) -> None:
        """Serve one more REST method (by lower-case name), alone and inside ``batch``:
        ``handler(caller, params)`` answers it; ``scope`` is the one an app needs (None: any)."""
        self._rest.add_methods({name.lower(): Method(scope, handler)})

    def add_record(self, table: str, fields: Mapping[str, Any]) -> int:
        """Add one record holding exactly ``fields`` and a new ID; return the ID."""
        return self._lists.add(table, fields)

    def clear_records(self, table: str | None = None) -> None:
        """Remove every record of one table, or of every table (IDs are not handed out again)."""
        self._lists.clear(table)

    def block_method(self, method: str, seconds: float) -> None:
        """Use up a method's time budget: it answers 429 OPERATION_TIME_LIMIT for ``seconds``."""
        self._rest.block_method(method, seconds)

    async def send_install_event(
        self, url: str, client_id: str, *, ui: bool = False, event: str = "ONAPPINSTALL",
        application_token: str | None = None, member_id: str | None = None,
        client_endpoint: str | None = None, user_id: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        """POST an install event to an app's handler, as this portal does; return status and body.

        ``ui=False`` sends the server-side ``ONAPPINSTALL`` event (``auth[...]`` fields);
        ``ui=True`` sends what a UI app's install page receives (``AUTH_ID``, ``REFRESH_ID``, ...).
        The keyword overrides forge a field, for tests of the receiver's checks; ``user_id`` is
        the portal user who installs, ``headers`` go with the POST (a browser's, say).
        """
        pair = self.issue_tokens(client_id, user_id=user_id)
        authority = URL(self.base_url).raw_authority
        query: dict[str, str] = {}
        if ui:
            protocol = "1" if self.base_url.startswith("https") else "0"
            query = {"DOMAIN": authority, "PROTOCOL": protocol, "LANG": "en",
                     "APP_SID": secrets.token_hex(8)}
            form = {
                "AUTH_ID": pair["access_token"], "AUTH_EXPIRES": str(pair["expires_in"]),
                "REFRESH_ID": pair["refresh_token"],
                "member_id": member_id or pair["member_id"], "status": "L",
                "PLACEMENT": "DEFAULT", "PLACEMENT_OPTIONS": "{}",
            }
        else:
            signed = application_token or self.application_token(client_id)
            auth = {**pair, "application_token": signed, "domain": authority}
            if member_id is not None:
                auth["member_id"] = member_id
            if client_endpoint is not None:
                auth["client_endpoint"] = client_endpoint
            form = {"event": event, "data[VERSION]": "1", "data[ACTIVE]": "Y",
                    "data[INSTALLED]": "Y", "data[LANGUAGE_ID]": "en",
                    "ts": str(int(self.clock()))}
            form |= {f"auth[{key}]": str(value) for key, value in auth.items()}
        return await _post_form(url, form, query, headers)

    async def send_uninstall_event(
        self, url: str, client_id: str, *, application_token: str | None = None,
        clean: bool = False, headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        """Uninstall an app from this portal and POST ONAPPUNINSTALL to its handler.

        The app's tokens on this portal die first (an uninstalled app has no access to the
        portal's REST API); its tokens on other portals live on. The event carries ``data[CLEAN]``
        and the portal's ``auth[...]`` fields (domain, endpoints, member_id, application token)
        but no pair, as there is no access left to give; ``application_token`` forges the
        signature, for tests of the receiver's checks.
        """
        signed = application_token or self.application_token(client_id)
        self._oauth.revoke_app(client_id, self._identity)
        server = self._oauth.home.base_url or self.base_url
        auth = {"domain": URL(self.base_url).raw_authority,
                "client_endpoint": f"{self.base_url}/rest/",
                "server_endpoint": f"{server}/rest/", "member_id": self.member_id,
                "status": "L", "application_token": signed}
        form = {"event": "ONAPPUNINSTALL", "data[CLEAN]": "1" if clean else "0",
                "data[LANGUAGE_ID]": "en", "ts": str(int(self.clock()))}
        form |= {f"auth[{key}]": value for key, value in auth.items()}
        return await _post_form(url, form, {}, headers)


class Emulator(Portal):
    """The default portal and the shared OAuth server, which can add more portals."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        access_ttl: float = 3600,
        code_ttl: float = 30,
        rate: float | None = None,
        burst: int = 50,
        call_delay: float = 0.0,
        rest_log_limit: int = REST_LOG_LIMIT,
    ) -> None:
        """Set up an empty portal; register apps and webhooks before use.

        `rest_log` keeps the last `rest_log_limit` REST requests, so a long-running emulator
        stays bounded; the counters in `stats` count every request.
        """
        stats = EmulatorStats()
        oauth = OAuthServer(clock=clock, stats=stats, access_ttl=access_ttl, code_ttl=code_ttl)
        super().__init__(
            "", oauth=oauth, identity=oauth.home, host="127.0.0.1", clock=clock, stats=stats,
            rate=rate, burst=burst, call_delay=call_delay, rest_log_limit=rest_log_limit,
        )
        self._rest_log_limit = rest_log_limit
        self._portals: dict[str, Portal] = {}

    def create_app(self) -> web.Application:
        """Build a fresh aiohttp application serving the default portal and the OAuth server."""
        app = super().create_app()
        app[EMULATOR_KEY] = self
        return app

    # -- more portals --------------------------------------------------------------------------

    def add_portal(self, name: str, *, host: str | None = None) -> Portal:
        """Add a portal with its own member_id, data, rate bucket and application tokens.

        It starts with the emulator's current rate, burst and call delay and knows every
        registered app. `run_emulator` serves it on ``host`` (default: the next of 127.0.0.2,
        127.0.0.3, ...) at a port of its own; `run_portal` serves one added later.
        """
        if not name or name in self._portals:
            raise ValueError(f"portal name {name!r} is empty or taken")
        if host is None:
            host = str(_FIRST_PORTAL_HOST + len(self._portals))
        portal = Portal(
            name, oauth=self._oauth, identity=Identity(), host=host, clock=self.clock,
            stats=EmulatorStats(), rate=self.rate, burst=self.burst,
            call_delay=self.call_delay, rest_log_limit=self._rest_log_limit,
        )
        self._portals[name] = portal
        return portal

    @property
    def portals(self) -> dict[str, Portal]:
        """The added portals by name, in the order added (the default portal is not among them)."""
        return dict(self._portals)

    # -- what a test reads ---------------------------------------------------------------------

    @property
    def oauth_url(self) -> str:
        """The shared OAuth server's address: the default portal's ("" until bound)."""
        return self._oauth.home.base_url

    def issued_secrets(self) -> list[str]:
        """List every code, access token and refresh token issued so far (all portals)."""
        return self._oauth.issued_secrets()

    # -- the shared OAuth server's knobs -------------------------------------------------------

    def register_app(
        self,
        client_id: str,
        client_secret: str,
        *,
        scope: str = "crm,user",
        redirect_uri: str | None = None,
    ) -> None:
        """Install an application on every portal (one client id and secret, as in reality)."""
        self._oauth.register_app(client_id, client_secret, scope=scope, redirect_uri=redirect_uri)

    @property
    def access_ttl(self) -> float:
        """Seconds an access token lives."""
        return self._oauth.access_ttl

    @access_ttl.setter
    def access_ttl(self, seconds: float) -> None:
        self._oauth.access_ttl = seconds

    @property
    def code_ttl(self) -> float:
        """Seconds an authorization code can be traded."""
        return self._oauth.code_ttl

    @code_ttl.setter
    def code_ttl(self, seconds: float) -> None:
        self._oauth.code_ttl = seconds

    @property
    def oauth_failure(self) -> OAuthFailure | None:
        """A failure every token request answers with, until set back to None."""
        return self._oauth.failure

    @oauth_failure.setter
    def oauth_failure(self, failure: OAuthFailure | None) -> None:
        self._oauth.failure = failure

    @property
    def oauth_slow_seconds(self) -> float:
        """How long a token request waits under the "slow" failure."""
        return self._oauth.slow_seconds

    @oauth_slow_seconds.setter
    def oauth_slow_seconds(self, seconds: float) -> None:
        self._oauth.slow_seconds = seconds


async def _post_form(
    url: str, form: Mapping[str, str], query: Mapping[str, str],
    headers: Mapping[str, str] | None,
) -> tuple[int, str]:
    """POST a form as the portal's event sender does; return the status and body."""
    import aiohttp  # noqa: PLC0415 - only the event senders need a client

    async with (
        aiohttp.ClientSession() as http,
        http.post(url, params=query, data=form, headers=headers,
                  allow_redirects=False) as response,
    ):
        return response.status, await response.text()


PORTAL_KEY = web.AppKey("portal", Portal)
EMULATOR_KEY = web.AppKey("emulator", Emulator)


@asynccontextmanager
async def run_portal(
    portal: Portal, host: str | None = None, port: int = 0
) -> AsyncIterator[str]:
    """Serve one portal on a real socket (``host``: its own), bind it and yield its base URL."""
    # A short shutdown timeout keeps teardown fast when a "slow" token answer is still sleeping.
    runner = web.AppRunner(portal.create_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, portal.host if host is None else host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        base_url = f"http://{url_host}:{bound_port}"
        portal.bind(base_url)
        yield base_url
    finally:
        await runner.cleanup()


@asynccontextmanager
async def run_emulator(
    emulator: Emulator, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the emulator and every portal added so far; yield the default portal's base URL.

    Each added portal gets a listener of its own, on its own host (see `Emulator.add_portal`).
    """
    async with AsyncExitStack() as stack:
        base_url = await stack.enter_async_context(run_portal(emulator, host, port))
        for portal in emulator.portals.values():
            await stack.enter_async_context(run_portal(portal))
        yield base_url
