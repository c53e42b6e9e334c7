"""The portal's OAuth server: installed apps, authorization codes and rotating token pairs.

It serves /oauth/authorize/ and /oauth/token/, and tells REST dispatch which app an access token
belongs to.
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

__all__ = ["App", "IssuedPair", "OAuthServer"]


@dataclass(frozen=True)
class IssuedPair:
    """A token pair whose refresh token is still usable."""

    client_id: str
    access_token: str
    refresh_token: str
    expires: float


@dataclass
class App:
    """An application installed on the portal."""

    client_id: str
    client_secret: str
    scope: str
    redirect_uri: str | None
    application_token: str = field(default_factory=lambda: secrets.token_hex(16))


@dataclass
class _Code:
    client_id: str
    issued_at: float
    user_id: int = 1


@dataclass
class _Access:
    client_id: str
    expires_at: float
    expired: bool = False
    user_id: int = 1


@dataclass
class _Refresh:
    client_id: str
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
        """Start with no apps; `stats` is shared with the rest of the emulator."""
        self.clock = clock
        self.stats = stats
        self.access_ttl = access_ttl
        self.code_ttl = code_ttl
        self.base_url = ""
        self.member_id = secrets.token_hex(16)
        # The portal user whose browser approves the app on the authorize page.
        self.signed_in_user = 1
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
        """Install an application on the portal."""
        self._apps[client_id] = App(client_id, client_secret, scope, redirect_uri)

    def app(self, client_id: str) -> App | None:
        """Return an installed application, or None."""
        return self._apps.get(client_id)

    def issue_code(self, client_id: str, *, user_id: int = 1) -> str:
        """Issue an authorization code as if a person (``user_id``) approved the app now."""
        if client_id not in self._apps:
            raise ValueError(f"unknown client_id {client_id!r}")
        code = secrets.token_hex(34)
        self._codes[code] = _Code(client_id, self.clock(), user_id)
        self._issued.append(code)
        return code

    def issue_tokens(self, client_id: str, *, user_id: int = 1) -> dict[str, Any]:
        """Mint a token pair without a code, as ONAPPINSTALL delivers one; return the token body."""
        app = self._apps.get(client_id)
        if app is None:
            raise ValueError(f"unknown client_id {client_id!r}")
        return self._issue_pair(app, self.base_url, user_id)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401 expired_token."""
        for access in self._access.values():
            access.expired = True

    def revoke_access_token(self, access_token: str) -> None:
        """Forget one access token, so it answers 401 invalid_token as if rotated away elsewhere."""
        self._access.pop(access_token, None)

    def revoke_refresh_tokens(self) -> None:
        """Make every refresh token issued so far answer invalid_grant."""
        self._refresh.clear()

    def issued_secrets(self) -> list[str]:
        """List every code, access token and refresh token issued so far, oldest first."""
        return list(self._issued)

    def current_tokens(self) -> list[IssuedPair]:
        """List the pairs whose refresh token is still usable, oldest first."""
        pairs: list[IssuedPair] = []
        for refresh_token, refresh in self._refresh.items():
            access = self._access.get(refresh.access_token)
            expires = access.expires_at if access is not None else 0.0
            pairs.append(
                IssuedPair(refresh.client_id, refresh.access_token, refresh_token, expires)
            )
        return pairs

    def caller_for(self, token: str) -> Caller:
        """Check an access token and return its app as the caller; raise the Bitrix 401 if bad."""
        access = self._access.get(token)
        if access is None:
            raise RestError(401, "invalid_token", "The access token provided is invalid.")
        if access.expired or self.clock() >= access.expires_at:
            raise RestError(401, "expired_token", "The access token provided has expired.")
        app = self._apps[access.client_id]
        scope = frozenset(s.strip() for s in app.scope.split(",") if s.strip())
        return Caller(app.client_id, scope, access.user_id)

    # -- the endpoints -------------------------------------------------------------------------

    def _base(self, request: web.Request) -> str:
        """Return the bound base URL, or the one this request came in on."""
        return self.base_url or str(request.url.origin())

    def _issue_pair(self, app: App, base: str, user_id: int) -> dict[str, Any]:
        """Create a new access/refresh pair and return the token endpoint's success body."""
        access_token = secrets.token_hex(34)
        refresh_token = secrets.token_hex(34)
        expires = self.clock() + self.access_ttl
        self._access[access_token] = _Access(app.client_id, expires, user_id=user_id)
        self._refresh[refresh_token] = _Refresh(app.client_id, access_token, user_id)
        self._issued += [access_token, refresh_token]
        endpoint = f"{base}/rest/"
        return {
            "access_token": access_token,
            "expires": int(expires),
            "expires_in": int(self.access_ttl),
            "scope": app.scope,
            "domain": URL(base).raw_authority if base else "",
            "server_endpoint": endpoint,
            "status": "L",
            "client_endpoint": endpoint,
            "member_id": self.member_id,
            "user_id": user_id,
            "refresh_token": refresh_token,
        }

    def _grant(self, params: Mapping[str, str], base: str) -> dict[str, Any]:
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
            return self._issue_pair(app, base, code.user_id)
        refresh = self._refresh.get(params["refresh_token"])
        if refresh is None or refresh.client_id != app.client_id:
            raise RestError(400, "invalid_grant", "Invalid refresh token")
        # Rotation: the used refresh token and the access token it came with both die now.
        del self._refresh[params["refresh_token"]]
        self._access.pop(refresh.access_token, None)
        return self._issue_pair(app, base, refresh.user_id)

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
        """Serve /oauth/token/ for both GET query strings and POST forms."""
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
            body = self._grant(params, self._base(request))
        except RestError as exc:
            if is_refresh:
                self.stats.refresh_rejected += 1
            return json_response(exc.status, exc.body())
        if is_refresh:
            self.stats.refresh_ok += 1
        return json_response(200, body)

    async def handle_authorize(self, request: web.Request) -> web.Response:
        """Auto-approve /oauth/authorize/: redirect with a code, or show it on a page."""
        query = dict(parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True))
        client_id = query.get("client_id", "")
        app = self._apps.get(client_id)
        if app is None:
            page = _html_page("Error", "<p>Application not found.</p>")
            return web.Response(status=400, text=page, content_type="text/html")
        code = self.issue_code(client_id, user_id=self.signed_in_user)
        state = query.get("state")
        base = self._base(request)
        authority = URL(base).raw_authority
        if app.redirect_uri:
            extra = {"code": code}
            if state is not None:
                extra["state"] = state
            extra |= {
                "domain": authority,
                "member_id": self.member_id,
                "scope": app.scope,
                "server_domain": authority,
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
