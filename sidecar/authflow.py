"""Authorization without the 30-second race: the browser callback and Bitrix24's install events."""

from __future__ import annotations

import html
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sidecar import phpquery
from sidecar.adapter import error_response, expect_continue
from sidecar.admission import Admission
from sidecar.authinfo import authorize_url, code_hint
from sidecar.authorization import Authorization
from sidecar.config import Settings
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    OAuthError,
    Refused,
    SidecarError,
)
from sidecar.oauth import valid_endpoint
from sidecar.storage import TokenPair

STATE_TTL = 600.0
MAX_STATES = 1000
VERIFY_TIMEOUT = 15.0
log = structlog.get_logger("sidecar.authflow")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AuthFlow:
    """Serve ``/oauth/start``, ``/oauth/callback`` and ``/oauth/install`` on the proxy listener."""

    def __init__(
        self,
        settings: Settings,
        tokens: Authorization,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
        checks: Admission | None = None,
    ) -> None:
        self._settings = settings
        self._checks = checks or Admission()  # app.info calls unauthenticated requests start
        self._tokens = tokens
        self._session = session
        self._clock = clock
        self._states: OrderedDict[str, float] = OrderedDict()  # state -> issued at
        self._portal_host = urlsplit(settings.portal).netloc.lower()

    def add_routes(
        self, app: web.Application,
        wrap: Callable[[Handler], Handler] = lambda handler: handler,
    ) -> None:
        """Register the three endpoints (before the proxy's catch-all)."""
        app.router.add_get("/oauth/start", wrap(self.start), allow_head=False,
                           expect_handler=expect_continue)
        app.router.add_get("/oauth/callback", wrap(self.callback), allow_head=False,
                           expect_handler=expect_continue)
        app.router.add_post("/oauth/install", wrap(self.install), expect_handler=expect_continue)

    # -- the browser callback ----------------------------------------------------------------

    async def start(self, request: web.Request) -> web.Response:
        """Redirect the browser to the portal's approval page with a fresh, remembered state."""
        self._prune()
        state = secrets.token_urlsafe(24)
        self._states[state] = self._clock()
        while len(self._states) > MAX_STATES:
            self._states.popitem(last=False)
        return web.Response(
            status=302,
            headers={"Location": authorize_url(self._settings, state),
                     "Cache-Control": "no-store"},
        )

    async def callback(self, request: web.Request) -> web.Response:
        """Check the state, exchange the code at once, and say what is now authorized."""
        query = request.query
        try:
            if query.get("error"):
                raise BadRequest(
                    f"the portal answered {query['error']}: "
                    f"{query.get('error_description', 'the app was not approved')}"
                )
            self._take_state(query.get("state", ""))
            code = query.get("code", "")
            if not code:
                raise BadRequest("the callback carries no code")
            self._check_domain(query.get("domain", ""))
            pair = await self._tokens.authorize(code, trigger="callback")
        except OAuthError as exc:
            return error_response(BadRequest(f"{exc.description}{code_hint(exc, self._settings)}"))
        except SidecarError as exc:
            return error_response(exc)
        return web.Response(text=self._success_page(pair), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    def _prune(self) -> None:
        now = self._clock()
        while self._states and now - next(iter(self._states.values())) > STATE_TTL:
            self._states.popitem(last=False)

    def _take_state(self, state: str) -> None:
        """Accept a state once, and only one this sidecar issued in the last 10 minutes."""
        self._prune()
        issued = self._states.pop(state, None) if state else None
        if issued is None:
            raise Refused(
                "unknown, used or expired state: this callback was not started here (or was "
                "already used); start again at /oauth/start"
            )

    def _check_domain(self, domain: str) -> None:
        if domain and domain.lower() != self._portal_host:
            raise Refused(
                f"the authorization came from {domain}, but BITRIX_PORTAL is "
                f"{self._portal_host}"
            )

    def _success_page(self, pair: TokenPair) -> str:
        rows = {
            "Portal": self._settings.portal,
            "Member": pair.member_id,
            "Scope": pair.scope,
            "Access token valid until": _utc(pair.expires_at),
        }
        table = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows.items()
        )
        return _page(
            "bitrix-sidecar is authorized",
            f"<p>bitrix-sidecar now holds a token pair and renews it by itself.</p>"
            f"<table>{table}</table><p>You can close this page.</p>",
        )

    # -- install events ----------------------------------------------------------------------

    async def install(self, request: web.Request) -> web.Response:
        """Take a pair from ONAPPINSTALL or a UI app's install POST, after checking it."""
        try:
            try:
                form = await request.post()
            except web.HTTPRequestEntityTooLarge:
                raise BodyTooLarge("the install payload is too large") from None
            except (ValueError, LookupError, HttpProcessingError, RequestPayloadError):
                # Bad framing, a bogus charset, invalid UTF-8, a broken multipart body.
                raise BadRequest("the install payload cannot be read as a form") from None
            except ConnectionResetError:
                raise ClientGone("the client hung up in the middle of its body") from None
            data = phpquery.parse(
                [(k, v) for k, v in form.items() if isinstance(v, str)]
                + [(k, v) for k, v in request.query.items()]
            )
            if isinstance(data.get("auth"), dict) and data.get("event"):
                if request.headers.get("Origin") or request.headers.get("Sec-Fetch-Site") in (
                    "cross-site", "same-site"
                ):
                    # The portal posts events server to server; a browser never does.
                    raise Refused("an install event from a browser page is refused")
                return await self._event(str(data["event"]).upper(), data["auth"])
            if data.get("AUTH_ID") and data.get("REFRESH_ID"):
                return await self._ui_install(data)
            raise BadRequest(
                "not an install event: expected ONAPPINSTALL (event, auth[...]) or an install "
                "page POST (AUTH_ID, REFRESH_ID, member_id)"
            )
        except SidecarError as exc:
            log.warning("install_refused", error=exc.code, description=exc.description)
            return error_response(exc)

    async def _event(self, event: str, auth: Mapping[str, Any]) -> web.Response:
        held = self._tokens.pair
        live = held is not None and not self._tokens.state.dead
        if event != "ONAPPINSTALL" and not (live and held and held.application_token):
            # Only a token stored from a real install can vouch for other events (an uninstall
            # would otherwise be anyone's to send).
            raise Refused(f"{event} is accepted only with the application_token of an install")
        if live:
            self._check_application_token(str(auth.get("application_token") or ""))
        if event == "ONAPPUNINSTALL":
            await self._tokens.revoke("the app was uninstalled from the portal")
            return web.json_response({"result": True})
        if event != "ONAPPINSTALL":
            log.info("install_event_ignored", install_event=event)
            return web.json_response({"result": True})
        pair = TokenPair(
            access_token=str(auth.get("access_token") or ""),
            refresh_token=str(auth.get("refresh_token") or ""),
            expires_at=time.time() + _seconds(auth.get("expires_in"), 3600),
            scope=str(auth.get("scope") or ""),
            member_id=str(auth.get("member_id") or ""),
            client_endpoint=valid_endpoint(auth.get("client_endpoint")),
            server_endpoint=valid_endpoint(auth.get("server_endpoint")),
            domain=str(auth.get("domain") or ""),
            user_id=str(auth.get("user_id") or ""),
            status=str(auth.get("status") or ""),
            application_token=str(auth.get("application_token") or ""),
            obtained_at=time.time(),
        )
        await self._accept(pair, trigger="install_event")
        return web.json_response({"result": True})

    async def _ui_install(self, data: Mapping[str, Any]) -> web.Response:
        domain = str(data.get("DOMAIN") or "")
        scheme = "http" if str(data.get("PROTOCOL", "1")) == "0" else "https"
        pair = TokenPair(
            access_token=str(data["AUTH_ID"]),
            refresh_token=str(data["REFRESH_ID"]),
            expires_at=time.time() + _seconds(data.get("AUTH_EXPIRES"), 3600),
            member_id=str(data.get("member_id") or ""),
            client_endpoint=valid_endpoint(f"{scheme}://{domain}/rest/") if domain else "",
            domain=domain,
            status=str(data.get("status") or ""),
            obtained_at=time.time(),
        )
        await self._accept(pair, trigger="install_page")
        # The portal's install page waits for this call before it calls the app installed.
        return web.Response(
            text=_page(
                "bitrix-sidecar is installed",
                "<p>bitrix-sidecar now holds a token pair for this portal.</p>"
                '<script src="https://api.bitrix24.com/api/v1/"></script>'
                "<script>BX24.init(function(){BX24.installFinish();});</script>",
            ),
            content_type="text/html",
        )

    def _check_application_token(self, given: str) -> None:
        held = self._tokens.pair
        expected = held.application_token if held is not None else ""
        if expected and not secrets.compare_digest(given.encode(), expected.encode()):
            raise Refused("the event's application_token does not match the one stored")

    async def _accept(self, pair: TokenPair, *, trigger: str) -> None:
        """Refuse a pair for another portal or member, or one the portal does not accept."""
        if not pair.access_token or not pair.refresh_token:
            raise BadRequest("the install payload carries no token pair")
        if not pair.client_endpoint:
            raise BadRequest("the install payload names no usable client_endpoint")
        held = self._tokens.pair
        self._tokens.check_portal(pair)
        async with self._checks.slot():
            scope = await self._verify(pair)
        if scope and not pair.scope:
            pair = replace(pair, scope=scope)
        if held is not None and held.application_token and not pair.application_token:
            pair = replace(pair, application_token=held.application_token)
        await self._tokens.install(pair, trigger=trigger)

    async def _verify(self, pair: TokenPair) -> str:
        """Call ``app.info`` with the new token: only a token the portal accepts is stored.

        Returns the granted scope (comma separated) when the portal tells it.
        """
        url = f"{pair.client_endpoint}app.info"
        try:
            async with self._session.post(
                url, data={"auth": pair.access_token}, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=VERIFY_TIMEOUT),
            ) as response:
                body = await response.json(content_type=None)
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise Refused("the portal could not be asked to confirm the token") from None
        result = body.get("result") if ok and isinstance(body, dict) else None
        if not isinstance(result, dict):
            raise Refused("the portal does not accept the token in the payload")
        code = result.get("CODE")
        if isinstance(code, str) and code and code != self._settings.client_id:
            raise Refused("the token belongs to another application")
        scope = result.get("SCOPE")
        return ",".join(str(s) for s in scope) if isinstance(scope, list) else ""


def _seconds(value: Any, default: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if 0 < seconds < 86400 * 2 else default


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    )


