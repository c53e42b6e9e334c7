"""Talk to the Bitrix24 OAuth server: exchange a code, refresh a pair, parse the answer."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from sidecar.errors import OAuthError
from sidecar.logging import REDACTED, Redactor, scrub
from sidecar.storage import TokenPair

# Errors that retrying cannot fix: the refresh token or code is dead, or the app is refused.
PERMANENT_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "payment_required", "wrong_client", "expired_token"}
)
# A rejected application: a configuration problem rather than a dead token.
CLIENT_ERRORS = frozenset({"invalid_client", "wrong_client"})


def client_error(error: OAuthError) -> bool:
    """Say whether the OAuth server refused the application itself (its id or secret)."""
    return error.permanent and error.error.lower() in CLIENT_ERRORS

_MAX_DESCRIPTION = 300
_MAX_ERROR = 64
# Anything shaped like a token (long hex or base64-ish run) is cut from server-supplied text.
_TOKENISH_RE = re.compile(r"[A-Za-z0-9_\-]{32,}")


def valid_endpoint(url: object) -> str:
    """Return ``url`` if it is a usable REST base (``http(s)://host/.../rest/``), else ``""``."""
    if not isinstance(url, str):
        return ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it validates it
    except ValueError:
        return ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    if parts.username or parts.password or parts.query or parts.fragment:
        return ""
    if not parts.path.endswith("/rest/"):
        return ""
    return url


def origin(url: str) -> tuple[str, str, int]:
    """Return the scheme, host and port of an http(s) address (the default port filled in)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def origin_text(url: str) -> str:
    """Name an address by its origin only (``scheme://host:port``): safe to log and show."""
    scheme, host, port = origin(url)
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def parse_token_response(data: object, *, now: float | None = None,
                         redact: Callable[[str], str] = scrub) -> TokenPair:
    """Turn the token endpoint's JSON into a TokenPair, or raise OAuthError.

    The server's error text is redacted here, where it enters: it goes on to the status, the
    store, error bodies and alerts, and a server may echo what it was sent (the secret).
    """
    if not isinstance(data, dict):
        raise OAuthError("OAuth server answered JSON that is not an object",
                         error="invalid_response", permanent=False)
    if data.get("error"):
        error = _server_text(str(data["error"]), redact)[:_MAX_ERROR]
        description = _server_text(str(data.get("error_description") or ""), redact)[
            :_MAX_DESCRIPTION]
        raise OAuthError(
            f"OAuth server refused: {error}" + (f" ({description})" if description else ""),
            error=error,
            permanent=error.lower() in PERMANENT_ERRORS,
        )
    access, refresh = data.get("access_token"), data.get("refresh_token")
    if not isinstance(access, str) or not access or not isinstance(refresh, str) or not refresh:
        raise OAuthError("OAuth server answered without a token pair",
                         error="invalid_response", permanent=False)
    now = time.time() if now is None else now
    expires_at = now + 3600.0
    expires_in, expires = data.get("expires_in"), data.get("expires")
    # Prefer the relative lifetime: it is immune to a skew between our clock and theirs.
    if isinstance(expires_in, int | float | str) and str(expires_in).strip().isdigit():
        expires_at = now + float(expires_in)
    elif isinstance(expires, int | float | str) and str(expires).strip().isdigit():
        expires_at = float(expires)
    return TokenPair(
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        scope=_text(data.get("scope")),
        member_id=_text(data.get("member_id")),
        client_endpoint=valid_endpoint(data.get("client_endpoint")),
        server_endpoint=valid_endpoint(data.get("server_endpoint")),
        domain=_text(data.get("domain")),
        user_id=_text(data.get("user_id")),
        status=_text(data.get("status")),
        obtained_at=now,
    )


def _server_text(text: str, redact: Callable[[str], str]) -> str:
    """Hide known secrets, secret parameters and token-shaped runs in the server's text."""
    # Whole before cut: a secret cut in half would no longer be recognized.
    return _TOKENISH_RE.sub(REDACTED, redact(text))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class OAuthClient:
    """Exchange codes and refresh tokens at ``{oauth_url}/oauth/token/``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        timeout: float,
        redactor: Redactor | None = None,
    ) -> None:
        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # What hides secrets in the server's error text: the logs' redactor where there is
        # one (it knows the tokens held), and the secret and what each request sends.
        self._redactor = redactor or Redactor()
        self._redactor.add(client_secret, permanent=True)

    async def exchange_code(self, code: str) -> TokenPair:
        """Trade a first authorization code for a pair."""
        return await self._token({"grant_type": "authorization_code", "code": code})

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Trade a refresh token for a new pair (the old refresh token dies)."""
        return await self._token({"grant_type": "refresh_token", "refresh_token": refresh_token})

    async def _token(self, params: dict[str, str]) -> TokenPair:
        form = {"client_id": self._client_id, "client_secret": self._client_secret, **params}
        for name in ("code", "refresh_token"):
            if params.get(name):
                self._redactor.add(params[name])
        try:
            # POST keeps the secret out of URLs (and so out of every access log on the way);
            # the docs show GET, so a server that refuses POST gets the documented form.
            status, body = await self._send("POST", form)
            if status == 405:
                status, body = await self._send("GET", form)
        # ``from None`` throughout: a chained aiohttp error may carry the request's address,
        # and the GET form's address holds the secret.
        except TimeoutError:
            raise OAuthError("OAuth server did not answer in time",
                             error="timeout", permanent=False) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise OAuthError(f"OAuth server unreachable: {type(exc).__name__}",
                             error="unreachable", permanent=False) from None
        try:
            data = json.loads(body)
        except ValueError:
            raise OAuthError(
                f"OAuth server answered HTTP {status} that is not JSON",
                error="invalid_response", permanent=False,
            ) from None
        return parse_token_response(data, redact=self._redactor.redact)

    async def _send(self, method: str, form: dict[str, str]) -> tuple[int, bytes]:
        kwargs: dict[str, Any] = {"data": form} if method == "POST" else {"params": form}
        async with self._session.request(
            method, self._token_url, timeout=self._timeout, allow_redirects=False, **kwargs
        ) as response:
            return response.status, await response.read()
