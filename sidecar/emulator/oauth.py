"""The OAuth server: installed apps, authorization codes and rotating token pairs.

One server is shared by every portal of an emulator, as oauth.bitrix.info is shared in reality:
each code and pair belongs to one portal (its `Identity`), and a portal's REST dispatch accepts
only its own access tokens. It serves /oauth/token/ and, for each portal, /oauth/authorize/.
"""

from __future__ import annotations

import asyncio
import html
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from yarl import URL

from sidecar.emulator.model import Caller, EmulatorStats, OAuthFailure, RestError
from sidecar.emulator.wire import json_response

__all__ = ["App", "Identity", "IssuedPair", "OAuthServer"]


@dataclass(frozen=True)
class IssuedPair:
    """A token pair whose refresh token is still usable."""

    client_id: str
    access_token: str
    refresh_token: str
    expires: float


@dataclass
class App:
    """An application, installed on every portal of the emulator (one client id and secret)."""

    client_id: str
    client_secret: str
    scope: str
    redirect_uri: str | None


@dataclass(eq=False)
class Identity:
    """Who a portal is to the OAuth server: its member_id, its address, its signed-in user."""

    member_id: str = field(default_factory=lambda: secrets.token_hex(16))
    base_url: str = ""
    # The portal user whose browser approves the app on the authorize page.
    signed_in_user: int = 1
    # client_id -> the token this portal signs that app's events with (each install its own).
    application_tokens: dict[str, str] = field(default_factory=dict)

    def application_token(self, client_id: str) -> str:
        """Return the token this portal signs an app's events with, made on first use."""
        return self.application_tokens.setdefault(client_id, secrets.token_hex(16))


@dataclass
class _Code:
    client_id: str
    portal: Identity
    issued_at: float
    user_id: int = 1


@dataclass
class _Access:
    client_id: str
    portal: Identity
    expires_at: float
    expired: bool = False
    user_id: int = 1


@dataclass
class _Refresh:
    client_id: str
    portal: Identity
    access_token: str
    user_id: int = 1


def _html_page(title: str, body: str) -> str:
    """Wrap body HTML in a minimal page."""
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"</head><body>{body}</body></html>"
    )


class OAuthServer:
    """Apps, codes and tokens, with the two OAuth endpoints that hand them out."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        stats: EmulatorStats,
        access_ttl: float,
        code_ttl: float,
    ) -> None:
        """Start with no apps; `stats` counts token requests; `home` is the first portal."""
        self.clock = clock
        self.stats = stats
        self.access_ttl = access_ttl
        self.code_ttl = code_ttl
        # The emulator's own portal; its address is the OAuth server's address too.
        self.home = Identity()
        # An injected token-endpoint failure, and how long the "slow" one sleeps.
        self.failure: OAuthFailure | None = None
        self.slow_seconds: float = 5.0
        self._apps: dict[str, App] = {}
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._issued: list[str] = []

    # -- apps and tokens -----------------------------------------------------------------------

    def register_app(
        self, client_id: str, client_secret: str, *, scope: str, redirect_uri: str | None
    ) -> None:
        """Install an application on every portal."""
        self._apps[client_id] = App(client_id, client_secret, scope, redirect_uri)

    def app(self, client_id: str) -> App | None:
        """Return an installed application, or None."""
        return self._apps.get(client_id)

    def issue_code(self, client_id: str, portal: Identity, *, user_id: int = 1) -> str:
        """Issue a code for ``portal`` as if a person (``user_id``) approved the app there now."""
        if client_id not in self._apps:
            raise ValueError(f"unknown client_id {client_id!r}")
        code = secrets.token_hex(34)
        self._codes[code] = _Code(client_id, portal, self.clock(), user_id)
        self._issued.append(code)
        return code

    def issue_tokens(self, client_id: str, portal: Identity, *, user_id: int = 1) -> dict[str, Any]:
        """Mint a pair for ``portal`` without a code, as ONAPPINSTALL delivers one."""
        app = self._apps.get(client_id)
        if app is None:
            raise ValueError(f"unknown client_id {client_id!r}")
        return self._issue_pair(app, portal, user_id, "")

    def expire_access_tokens(self, portal: Identity | None = None) -> None:
        """Make the access tokens issued so far (to ``portal``, or all) answer expired_token."""
        for access in self._access.values():
            if portal is None or access.portal is portal:
                access.expired = True

    def revoke_access_token(self, access_token: str) -> None:
        """Forget one access token, so it answers 401 invalid_token as if rotated away elsewhere."""
        self._access.pop(access_token, None)

    def revoke_refresh_tokens(self, portal: Identity | None = None) -> None:
        """Make the refresh tokens issued so far (to ``portal``, or all) answer invalid_grant."""
        for token, refresh in list(self._refresh.items()):
            if portal is None or refresh.portal is portal:
                del self._refresh[token]

    def revoke_app(self, client_id: str, portal: Identity) -> None:
        """Kill every token of one app on one portal, as uninstalling it there does."""
        for token, refresh in list(self._refresh.items()):
            if refresh.portal is portal and refresh.client_id == client_id:
                del self._refresh[token]
        for token, access in list(self._access.items()):
            if access.portal is portal and access.client_id == client_id:
                del self._access[token]

    def issued_secrets(self) -> list[str]:
        """List every code, access token and refresh token issued so far, oldest first."""
        return list(self._issued)

    def current_tokens(self, portal: Identity | None = None) -> list[IssuedPair]:
        """List the pairs (of ``portal``, or all) whose refresh token is usable, oldest first."""
        pairs: list[IssuedPair] = []
        for refresh_token, refresh in self._refresh.items():
            if portal is not None and refresh.portal is not portal:
                continue
            access = self._access.get(refresh.access_token)
            expires = access.expires_at if access is not None else 0.0
            pairs.append(
                IssuedPair(refresh.client_id, refresh.access_token, refresh_token, expires)
            )
        return pairs

    def caller_for(self, token: str, portal: Identity) -> Caller:
        """Check an access token on ``portal``; return its app as the caller or raise the 401."""
        access = self._access.get(token)
        # A portal knows only its own tokens: another portal's is as unknown as a made-up one.
        if access is None or access.portal is not portal:
            raise RestError(401, "invalid_token", "The access token provided is invalid.")
        if access.expired or self.clock() >= access.expires_at:
            raise RestError(401, "expired_token", "The access token provided has expired.")
        app = self._apps[access.client_id]
        scope = frozenset(s.strip() for s in app.scope.split(",") if s.strip())
        return Caller(app.client_id, scope, access.user_id)

    # -- the endpoints -------------------------------------------------------------------------

    def _issue_pair(
        self, app: App, portal: Identity, user_id: int, fallback: str
    ) -> dict[str, Any]:
        """Create a new pair for ``portal`` and return the token endpoint's success body.

        An address not bound yet is ``fallback``: the one the request came in on.
        """
        access_token = secrets.token_hex(34)
        refresh_token = secrets.token_hex(34)
        expires = self.clock() + self.access_ttl
        self._access[access_token] = _Access(app.client_id, portal, expires, user_id=user_id)
        self._refresh[refresh_token] = _Refresh(app.client_id, portal, access_token, user_id)
        self._issued += [access_token, refresh_token]
        base = portal.base_url or fallback
        server = self.home.base_url or fallback
        return {
            "access_token": access_token,
            "expires": int(expires),
            "expires_in": int(self.access_ttl),
            "scope": app.scope,
            # As in reality, `domain` and `server_endpoint` name the shared OAuth server;
            # `client_endpoint` and `member_id` name the portal the pair is for.
            "domain": URL(server).raw_authority if server else "",
            "server_endpoint": f"{server}/rest/",
            "status": "L",
            "client_endpoint": f"{base}/rest/",
            "member_id": portal.member_id,
            "user_id": user_id,
            "refresh_token": refresh_token,
        }

    def _grant(self, params: Mapping[str, str], fallback: str) -> dict[str, Any]:
        """Run one token request; raise RestError with the OAuth error on refusal."""
        grant = params.get("grant_type", "")
        secret_name = {"authorization_code": "code", "refresh_token": "refresh_token"}.get(grant)
        if secret_name is None:
            raise RestError(400, "invalid_request", "Unsupported or missing grant_type")
        for name in ("client_id", "client_secret", secret_name):
            if not params.get(name):
                raise RestError(400, "invalid_request", f"Parameter {name} is required")
        app = self._apps.get(params["client_id"])
        if app is None or not secrets.compare_digest(app.client_secret, params["client_secret"]):
            raise RestError(401, "invalid_client", "Invalid client credentials")
        if grant == "authorization_code":
            code = self._codes.get(params["code"])
            if code is None or code.client_id != app.client_id:
                raise RestError(400, "invalid_grant", "Invalid authorization code")
            del self._codes[params["code"]]
            if self.clock() - code.issued_at >= self.code_ttl:
                raise RestError(400, "expired_token", "The authorization code has expired")
            return self._issue_pair(app, code.portal, code.user_id, fallback)
        refresh = self._refresh.get(params["refresh_token"])
        if refresh is None or refresh.client_id != app.client_id:
            raise RestError(400, "invalid_grant", "Invalid refresh token")
        # Rotation: the used refresh token and the access token it came with both die now.
        del self._refresh[params["refresh_token"]]
        self._access.pop(refresh.access_token, None)
        return self._issue_pair(app, refresh.portal, refresh.user_id, fallback)

    def _failure_response(self, request: web.Request, failure: OAuthFailure) -> web.Response:
        """Answer the token endpoint with an injected failure."""
        if failure == "html":
            page = _html_page("502 Bad Gateway", "<h1>502 Bad Gateway</h1>")
            return web.Response(status=502, text=page, content_type="text/html")
        if failure == "garbage":
            return web.Response(status=200, text="this is not JSON {", content_type="text/plain")
        if failure == "500":
            error = RestError(500, "INTERNAL_SERVER_ERROR", "Internal server error")
            return json_response(error.status, error.body())
        if failure == "invalid_client":
            return json_response(
                401, {"error": "invalid_client", "error_description": "Invalid client credentials"}
            )
        # "reset": drop the connection; aiohttp quietly discards the response written after it.
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    async def handle_token(self, request: web.Request) -> web.Response:
        """Serve /oauth/token/ for both GET query strings and POST forms, on any portal's host."""
        params = dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        if request.method == "POST":
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        grant = params.get("grant_type", "")
        is_refresh = grant == "refresh_token"
        self.stats.token_requests[grant] += 1
        failure = self.failure
        if failure == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif failure is not None:
            if is_refresh:
                self.stats.refresh_rejected += 1
            return self._failure_response(request, failure)
        try:
            body = self._grant(params, str(request.url.origin()))
        except RestError as exc:
            if is_refresh:
                self.stats.refresh_rejected += 1
            return json_response(exc.status, exc.body())
        if is_refresh:
            self.stats.refresh_ok += 1
        return json_response(200, body)

    async def handle_authorize(self, request: web.Request, portal: Identity) -> web.Response:
        """Auto-approve ``portal``'s /oauth/authorize/: redirect with a code, or show it."""
        query = dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        client_id = query.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None:
            page = _html_page("Error", "<p>Application not found.</p>")
            return web.Response(status=400, text=page, content_type="text/html")
        code = self.issue_code(client_id, portal, user_id=portal.signed_in_user)
        state = query.get("state")
        origin = str(request.url.origin())
        authority = URL(portal.base_url or origin).raw_authority
        if app.redirect_uri:
            extra = {"code": code}
            if state is not None:
                extra["state"] = state
            extra |= {
                "domain": authority,
                "member_id": portal.member_id,
                "scope": app.scope,
                "server_domain": URL(self.home.base_url or origin).raw_authority,
            }
            location = URL(app.redirect_uri).extend_query(extra)
            return web.Response(status=302, headers={"Location": str(location)})
        body = (
            f"<p>Application {html.escape(client_id)} was granted access.</p>"
            f'<p>Authorization code: <code id="code">{code}</code></p>'
        )
        if state is not None:
            body += f'<p>State: <code id="state">{html.escape(state)}</code></p>'
        return web.Response(text=_html_page("Authorization", body), content_type="text/html")
