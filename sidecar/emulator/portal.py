"""The `Emulator`: one portal assembled from its parts, with the controls a test drives it by.

A test or the CLI holds one `Emulator`; every part's state hangs off it, so a test can inspect and
poke the portal while `create_app()` serves it (`run_emulator` serves it on a real socket).
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar.emulator.account import Account
from sidecar.emulator.batch import Batch
from sidecar.emulator.crm import Crm
from sidecar.emulator.model import EmulatorStats, OAuthFailure, RestCall
from sidecar.emulator.oauth import IssuedPair, OAuthServer
from sidecar.emulator.rest import REST_LOG_LIMIT, RestServer

__all__ = ["EMULATOR_KEY", "Emulator", "run_emulator"]


class Emulator:
    """A Bitrix24 portal and its OAuth server, both served by `create_app()`."""

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
        self._clock = clock
        self._stats = EmulatorStats()
        self._oauth = OAuthServer(
            clock=clock, stats=self._stats, access_ttl=access_ttl, code_ttl=code_ttl
        )
        self._rest = RestServer(
            oauth=self._oauth, clock=clock, stats=self._stats,
            rate=rate, burst=burst, call_delay=call_delay, rest_log_limit=rest_log_limit,
        )
        self._crm = Crm(clock=clock)
        self._rest.add_methods(Batch(self._rest, clock=clock).methods())
        self._rest.add_methods(Account(self._oauth).methods())
        self._rest.add_methods(self._crm.methods())

    def create_app(self) -> web.Application:
        """Build a fresh aiohttp application serving this emulator's state."""
        app = web.Application()
        app[EMULATOR_KEY] = self
        for path in ("/oauth/token/", "/oauth/token"):
            app.router.add_get(path, self._oauth.handle_token, allow_head=False)
            app.router.add_post(path, self._oauth.handle_token)
        for path in ("/oauth/authorize/", "/oauth/authorize"):
            app.router.add_get(path, self._oauth.handle_authorize, allow_head=False)
        app.router.add_get("/rest/{tail:.*}", self._rest.handle, allow_head=False)
        app.router.add_post("/rest/{tail:.*}", self._rest.handle)
        return app

    # -- what a test reads ---------------------------------------------------------------------

    @property
    def clock(self) -> Callable[[], float]:
        """The clock every part reads (fixed at construction)."""
        return self._clock

    @property
    def stats(self) -> EmulatorStats:
        """Counters of what reached the portal, shared by its parts."""
        return self._stats

    @property
    def rest_log(self) -> collections.deque[RestCall]:
        """The last `rest_log_limit` REST requests received, oldest first."""
        return self._rest.rest_log

    @property
    def leads(self) -> dict[int, dict[str, Any]]:
        """Expose stored leads by ID, for assertions."""
        return self._crm.leads

    @property
    def base_url(self) -> str:
        """The address the emulator is served at ("" until bound)."""
        return self._oauth.base_url

    @property
    def member_id(self) -> str:
        """The portal's member_id, as token answers and install events carry it."""
        return self._oauth.member_id

    def issued_secrets(self) -> list[str]:
        """List every code, access token and refresh token issued so far, oldest first."""
        return self._oauth.issued_secrets()

    def current_tokens(self) -> list[IssuedPair]:
        """List the pairs whose refresh token is still usable, oldest first."""
        return self._oauth.current_tokens()

    def application_token(self, client_id: str) -> str:
        """Return the token the portal signs this app's events with."""
        app = self._oauth.app(client_id)
        if app is None:
            raise KeyError(client_id)
        return app.application_token

    # -- knobs a test turns --------------------------------------------------------------------

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

    # -- test controls -------------------------------------------------------------------------

    def bind(self, base_url: str) -> None:
        """Set the address the emulator is served at, as it appears in tokens and redirects."""
        self._oauth.base_url = base_url.rstrip("/")

    def register_app(
        self,
        client_id: str,
        client_secret: str,
        *,
        scope: str = "crm,user",
        redirect_uri: str | None = None,
    ) -> None:
        """Install an application on the portal."""
        self._oauth.register_app(client_id, client_secret, scope=scope, redirect_uri=redirect_uri)

    def register_webhook(self, user_id: int, code: str) -> None:
        """Create an inbound webhook served at /rest/{user_id}/{code}/{method}."""
        self._rest.register_webhook(user_id, code)

    def issue_code(self, client_id: str, *, user_id: int = 1) -> str:
        """Issue an authorization code as if a person (``user_id``) approved the app now."""
        return self._oauth.issue_code(client_id, user_id=user_id)

    def issue_tokens(self, client_id: str, *, user_id: int = 1) -> dict[str, Any]:
        """Mint a token pair without a code, as ONAPPINSTALL delivers one; return the token body."""
        return self._oauth.issue_tokens(client_id, user_id=user_id)

    @property
    def signed_in_user(self) -> int:
        """The portal user whose browser approves the app on the authorize page."""
        return self._oauth.signed_in_user

    @signed_in_user.setter
    def signed_in_user(self, user_id: int) -> None:
        self._oauth.signed_in_user = user_id

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401 expired_token."""
        self._oauth.expire_access_tokens()

    def revoke_access_token(self, access_token: str) -> None:
        """Forget one access token, so it answers 401 invalid_token as if rotated away elsewhere."""
        self._oauth.revoke_access_token(access_token)

    def revoke_refresh_tokens(self) -> None:
        """Make every refresh token issued so far answer invalid_grant."""
        self._oauth.revoke_refresh_tokens()

    def fail_next_rest(
        self, status: int, error: str, description: str = "Injected failure"
    ) -> None:
        """Queue an error answer for the next REST request, which is then logged but not run."""
        self._rest.fail_next(status, error, description)

    def block_method(self, method: str, seconds: float) -> None:
        """Use up a method's time budget: it answers 429 OPERATION_TIME_LIMIT for ``seconds``."""
        self._rest.block_method(method, seconds)

    async def send_install_event(
        self, url: str, client_id: str, *, ui: bool = False, event: str = "ONAPPINSTALL",
        application_token: str | None = None, member_id: str | None = None,
        client_endpoint: str | None = None, user_id: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        """POST an install event to an app's handler, as the portal does; return status and body.

        ``ui=False`` sends the server-side ``ONAPPINSTALL`` event (``auth[...]`` fields);
        ``ui=True`` sends what a UI app's install page receives (``AUTH_ID``, ``REFRESH_ID``, ...).
        The keyword overrides forge a field, for tests of the receiver's checks; ``user_id`` is
        the portal user who installs, ``headers`` go with the POST (a browser's, say).
        """
        import aiohttp  # noqa: PLC0415 - only this test control needs a client

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
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, params=query, data=form, headers=headers,
                      allow_redirects=False) as response,
        ):
            return response.status, await response.text()


EMULATOR_KEY = web.AppKey("emulator", Emulator)


@asynccontextmanager
async def run_emulator(
    emulator: Emulator, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the emulator on a real socket, bind it to its address and yield the base URL."""
    # A short shutdown timeout keeps teardown fast when a "slow" token answer is still sleeping.
    runner = web.AppRunner(emulator.create_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        base_url = f"http://{url_host}:{bound_port}"
        emulator.bind(base_url)
        yield base_url
    finally:
        await runner.cleanup()
