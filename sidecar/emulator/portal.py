"""A small Bitrix24 portal and OAuth server in one aiohttp app, faithful to the wire protocol.

Tests (and local experiments) point the sidecar at it instead of a real portal. All state lives on
the `Emulator` instance, so a test can inspect and poke it while the app is serving.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from yarl import URL

from sidecar import phpquery
from sidecar.emulator.account import Account
from sidecar.emulator.crm import PAGE_SIZE, Crm
from sidecar.emulator.model import (
    Caller,
    EmulatorStats,
    Method,
    MethodResult,
    OAuthFailure,
    RestCall,
    RestError,
)
from sidecar.emulator.oauth import IssuedPair, OAuthServer
from sidecar.emulator.wire import (
    Route,
    body_params,
    credentials,
    parse_route,
    render,
    render_xml,
    time_block,
)

__all__ = [
    "BATCH_MAX_LENGTH",
    "EMULATOR_KEY",
    "PAGE_SIZE",
    "Emulator",
    "EmulatorStats",
    "IssuedPair",
    "OAuthFailure",
    "RestCall",
    "render_xml",
    "run_emulator",
]

BATCH_MAX_LENGTH = 50

_RESULT_REF = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")
_REF_SEGMENT = re.compile(r"\[([^\]]*)\]")

def _php_map(items: dict[str, Any]) -> Any:
    """Serialize a keyed map as PHP's json_encode would: `[]` when empty, a list when 0..n-1."""
    if all(key == str(i) for i, key in enumerate(items)):
        return list(items.values())
    return items


def _truthy(value: Any) -> bool:
    """Read a flag the way PHP casts a request value to bool."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


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
    ) -> None:
        """Set up an empty portal; register apps and webhooks before use."""
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.call_delay = call_delay
        self.stats = EmulatorStats()
        self.rest_log: list[RestCall] = []
        self._oauth = OAuthServer(
            clock=clock, stats=self.stats, access_ttl=access_ttl, code_ttl=code_ttl
        )
        self._webhooks: set[tuple[int, str]] = set()
        self._injected: collections.deque[RestError] = collections.deque()
        self._bucket_level = 0.0
        self._bucket_at: float | None = None
        self._blocked: dict[str, float] = {}  # method -> clock() its time budget resets
        self._crm = Crm(clock=clock)
        self._methods: dict[str, Method] = {
            "batch": Method(None, self._batch),
            **Account(self._oauth).methods(),
            **self._crm.methods(),
        }

    # -- test controls -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The address the emulator is served at ("" until bound)."""
        return self._oauth.base_url

    @property
    def member_id(self) -> str:
        """The portal's member_id, as token answers and install events carry it."""
        return self._oauth.member_id

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

    def issue_code(self, client_id: str) -> str:
        """Issue an authorization code as if a person approved the app in a browser now."""
        return self._oauth.issue_code(client_id)

    def issue_tokens(self, client_id: str) -> dict[str, Any]:
        """Mint a token pair without a code, as ONAPPINSTALL delivers one; return the token body."""
        return self._oauth.issue_tokens(client_id)

    def application_token(self, client_id: str) -> str:
        """Return the token the portal signs this app's events with."""
        app = self._oauth.app(client_id)
        if app is None:
            raise KeyError(client_id)
        return app.application_token

    async def send_install_event(
        self, url: str, client_id: str, *, ui: bool = False, event: str = "ONAPPINSTALL",
        application_token: str | None = None, member_id: str | None = None,
        client_endpoint: str | None = None,
    ) -> tuple[int, str]:
        """POST an install event to an app's handler, as the portal does; return status and body.

        ``ui=False`` sends the server-side ``ONAPPINSTALL`` event (``auth[...]`` fields);
        ``ui=True`` sends what a UI app's install page receives (``AUTH_ID``, ``REFRESH_ID``, ...).
        The keyword overrides forge a field, for tests of the receiver's checks.
        """
        import aiohttp  # noqa: PLC0415 - only this test control needs a client

        pair = self.issue_tokens(client_id)
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
            http.post(url, params=query, data=form, allow_redirects=False) as response,
        ):
            return response.status, await response.text()

    def block_method(self, method: str, seconds: float) -> None:
        """Use up a method's time budget: it answers 429 OPERATION_TIME_LIMIT for ``seconds``."""
        self._blocked[method.lower()] = self.clock() + seconds

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401 expired_token."""
        self._oauth.expire_access_tokens()

    def revoke_access_token(self, access_token: str) -> None:
        """Forget one access token, so it answers 401 invalid_token as if rotated away elsewhere."""
        self._oauth.revoke_access_token(access_token)

    def fail_next_rest(
        self, status: int, error: str, description: str = "Injected failure"
    ) -> None:
        """Queue an error answer for the next REST request, which is then logged but not run."""
        self._injected.append(RestError(status, error, description))

    def issued_secrets(self) -> list[str]:
        """List every code, access token and refresh token issued so far, oldest first."""
        return self._oauth.issued_secrets()

    def revoke_refresh_tokens(self) -> None:
        """Make every refresh token issued so far answer invalid_grant."""
        self._oauth.revoke_refresh_tokens()

    def register_webhook(self, user_id: int, code: str) -> None:
        """Create an inbound webhook served at /rest/{user_id}/{code}/{method}."""
        self._webhooks.add((user_id, code))

    def current_tokens(self) -> list[IssuedPair]:
        """List the pairs whose refresh token is still usable, oldest first."""
        return self._oauth.current_tokens()

    @property
    def leads(self) -> dict[int, dict[str, Any]]:
        """Expose stored leads by ID, for assertions."""
        return self._crm.leads

    def create_app(self) -> web.Application:
        """Build a fresh aiohttp application serving this emulator's state."""
        app = web.Application()
        app[EMULATOR_KEY] = self
        for path in ("/oauth/token/", "/oauth/token"):
            app.router.add_get(path, self._oauth.handle_token, allow_head=False)
            app.router.add_post(path, self._oauth.handle_token)
        for path in ("/oauth/authorize/", "/oauth/authorize"):
            app.router.add_get(path, self._oauth.handle_authorize, allow_head=False)
        app.router.add_get("/rest/{tail:.*}", self._handle_rest, allow_head=False)
        app.router.add_post("/rest/{tail:.*}", self._handle_rest)
        return app

    # -- REST ----------------------------------------------------------------------------------

    def _authenticate(self, route: Route, token: str | None) -> Caller:
        """Check webhook credentials or the access token; raise the Bitrix 401 on failure."""
        if route.webhook is not None:
            if route.webhook not in self._webhooks:
                raise RestError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
            return Caller(None, None, route.webhook[0])
        if token is None:
            raise RestError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        return self._oauth.caller_for(token)

    def _admit(self) -> bool:
        """Pass one request through the leaky bucket, or refuse it when the bucket is full."""
        if self.rate is None:
            return True
        now = self.clock()
        last = now if self._bucket_at is None else self._bucket_at
        # A clock that steps backwards drains nothing rather than overfilling the bucket.
        elapsed = max(0.0, now - last)
        self._bucket_at = max(last, now)
        self._bucket_level = max(0.0, self._bucket_level - elapsed * self.rate)
        if self._bucket_level + 1 > self.burst:
            return False
        self._bucket_level += 1
        return True

    def _run(self, caller: Caller, method: str, params: dict[str, Any]) -> MethodResult:
        """Run a known method for a caller, checking its scope."""
        spec = self._methods[method]
        if spec.scope is not None and caller.scope is not None and spec.scope not in caller.scope:
            raise RestError(
                401,
                "insufficient_scope",
                "The request requires higher privileges than provided by the access token",
            )
        self.stats.rest_calls[method] += 1
        return spec.handler(caller, params)

    async def _handle_rest(self, request: web.Request) -> web.Response:
        """Serve /rest/...: log, check method, auth and rate limit, run, render."""
        start = self.clock()
        body = await request.read()
        route = parse_route(request.match_info["tail"])
        params: dict[str, Any] = phpquery.parse_qs(request.rel_url.raw_query_string)
        body_error: str | None = None
        try:
            params |= body_params(request, body)
        except ValueError as exc:
            body_error = str(exc)
        token, source = credentials(request, params, route)
        self.stats.upstream_requests += 1
        self.rest_log.append(
            RestCall(
                method=route.method,
                http_method=request.method,
                path=request.rel_url.raw_path,
                query=request.rel_url.raw_query_string,
                params=params,
                token=token,
                token_source=source,
                headers=dict(request.headers),
                body=body,
                fmt=route.fmt,
            )
        )
        try:
            if self._injected:
                raise self._injected.popleft()
            if not route.known_shape or route.method not in self._methods:
                raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
            if body_error is not None:
                raise RestError(400, "ERROR_ARGUMENT", body_error)
            caller = self._authenticate(route, token)
            if not self._admit():
                self.stats.limited += 1
                raise RestError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            blocked_until = self._blocked.get(route.method, 0.0)
            if self.clock() < blocked_until:
                self.stats.time_limited += 1
                spent = time_block(start, self.clock())
                spent |= {"operating": 480, "operating_reset_at": int(blocked_until)}
                return render(route.fmt, 429, {
                    "error": "OPERATION_TIME_LIMIT",
                    "error_description": "Method is blocked due to operation time limit.",
                    "time": spent,
                })
            if self.call_delay > 0:
                await asyncio.sleep(self.call_delay)
            answer = self._run(caller, route.method, params)
        except RestError as exc:
            return render(route.fmt, exc.status, exc.body())
        finish = self.clock()
        payload: dict[str, Any] = {"result": answer.result}
        if answer.next is not None:
            payload["next"] = answer.next
        if answer.total is not None:
            payload["total"] = answer.total
        payload["time"] = time_block(start, finish)
        response = render(route.fmt, 200, payload)
        response.headers["X-Bitrix-Rest-Application"] = caller.client_id or "webhook"
        response.headers["X-Bitrix-Rest-Time"] = f"{max(0.0, finish - start):.6f}"
        return response

    # -- methods -------------------------------------------------------------------------------

    def _resolve_refs(self, value: Any, results: Mapping[str, Any]) -> Any:
        """Replace `$result[key][field]` references to earlier batch results."""
        if isinstance(value, dict):
            return {k: self._resolve_refs(v, results) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_refs(v, results) for v in value]
        if not isinstance(value, str) or "$result[" not in value:
            return value

        def lookup(match: re.Match[str]) -> Any:
            """Follow one reference; an unresolvable one stays as written."""
            if match.group(1) not in results:
                return match.group(0)
            found: Any = results[match.group(1)]
            for segment in _REF_SEGMENT.findall(match.group(2)):
                if isinstance(found, Mapping) and segment in found:
                    found = found[segment]
                elif isinstance(found, list) and segment.isdigit() and int(segment) < len(found):
                    found = found[int(segment)]
                else:
                    return match.group(0)
            return found

        whole = _RESULT_REF.fullmatch(value)
        if whole is not None:
            return lookup(whole)
        return _RESULT_REF.sub(lambda m: str(lookup(m)), value)

    def _batch(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Run up to 50 commands, each as if called alone; later ones get LENGTH_EXCEEDED."""
        cmd = params.get("cmd")
        halt = _truthy(params.get("halt", 0))
        if isinstance(cmd, Mapping):
            commands = [(str(k), v) for k, v in cmd.items()]
        elif isinstance(cmd, list):
            commands = [(str(i), v) for i, v in enumerate(cmd)]
        else:
            commands = []
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        totals: dict[str, Any] = {}
        nexts: dict[str, Any] = {}
        times: dict[str, Any] = {}
        for index, (key, command) in enumerate(commands):
            start = self.clock()
            try:
                if index >= BATCH_MAX_LENGTH:
                    raise RestError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
                if not isinstance(command, str):
                    raise RestError(400, "ERROR_ARGUMENT", "Batch command must be a string")
                name, _, query = command.partition("?")
                method = parse_route(name.strip().lstrip("/")).method
                if method == "batch":
                    raise RestError(
                        405,
                        "ERROR_BATCH_METHOD_NOT_ALLOWED",
                        "Method is not allowed for batch usage",
                    )
                if method not in self._methods:
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                command_params = self._resolve_refs(phpquery.parse_qs(query), results)
                answer = self._run(caller, method, command_params)
            except RestError as exc:
                errors[key] = exc.body()
                if halt:
                    break
                continue
            results[key] = answer.result
            if answer.total is not None:
                totals[key] = answer.total
            if answer.next is not None:
                nexts[key] = answer.next
            times[key] = time_block(start, self.clock())
        return MethodResult(
            {
                "result": _php_map(results),
                "result_error": _php_map(errors),
                "result_total": _php_map(totals),
                "result_next": _php_map(nexts),
                "result_time": _php_map(times),
            }
        )


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
