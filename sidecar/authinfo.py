"""What a person reads about an authorization: the authorize address, hints, and status JSON."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from sidecar.config import Settings
from sidecar.errors import (
    NotAuthorized,
    OAuthError,
    ReauthorizationRequired,
    SidecarError,
    TokenUnavailable,
)
from sidecar.logging import scrub
from sidecar.oauth import client_error
from sidecar.states import State
from sidecar.storage import MOVED, StoredState, TokenPair

# How each state reads in ``status``; "expired" is told apart by the clock, not by a state.
_SHOWN = {
    State.NOT_AUTHORIZED: "not_authorized",
    State.VALID: "valid",
    State.REFRESHING: "valid",
    State.FAILING: "refresh_failing",
    State.REAUTHORIZATION_REQUIRED: "reauthorization_required",
    State.CLIENT_REJECTED: "reauthorization_required",
}


def shown_state(state: State, pair: TokenPair | None, now: float) -> str:
    """The state as ``status`` names it (a held pair past its end is "expired")."""
    if pair is not None and not state.dead and pair.expires_at <= now:
        return "expired"
    return _SHOWN[state]


def authorize_url(settings: Settings, state: str | None = None) -> str:
    """Return the address a person opens to approve the app."""
    query = {"client_id": settings.client_id}
    if state:
        query["state"] = state
    return f"{settings.portal}/oauth/authorize/?{urlencode(query)}"


def shown_error(text: str, settings: Settings) -> str:
    """Return a recorded error fit to show: its secrets hidden.

    Redacted where the OAuth server's text comes in; again here, where it goes out, since a
    store written by an older version may hold it as it came.
    """
    return scrub(text, settings.client_secret) if text else text


def iso(timestamp: float | None) -> str | None:
    """Format a Unix time as ISO 8601 in UTC, to the second; None for none."""
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def describe(
    settings: Settings,
    stored: StoredState,
    *,
    state: State | None = None,
    now: float | None = None,
    unsaved: bool = False,
) -> dict[str, Any]:
    """Describe an authorization as JSON-ready data, never including a token or the secret.

    ``state`` defaults to what the stored entry alone says (the CLI's ``status`` reads the
    store without running anything).
    """
    now = time.time() if now is None else now
    state = State.of_stored(stored) if state is None else state
    pair = stored.pair
    shown = shown_state(state, pair, now)
    granted = {s.strip() for s in pair.scope.split(",") if s.strip()} if pair else set()
    info: dict[str, Any] = {
        "state": shown,
        "portal": settings.portal,
        "client_id": settings.client_id,
        "oauth_server": settings.oauth_url,
        "member_id": pair.member_id if pair else None,
        "client_endpoint": (pair.client_endpoint or settings.rest_base) if pair else None,
        "scope": pair.scope if pair else None,
        "scope_requested": ",".join(settings.scope),
        "scope_missing": sorted(set(settings.scope) - granted) if pair else [],
        "expires_at": iso(pair.expires_at) if pair else None,
        "expires_in": round(pair.expires_at - now) if pair else None,
        "last_refresh_at": iso(pair.obtained_at) if pair else None,
        "refresh_interval_seconds": settings.refresh_interval,
        "last_error": shown_error(stored.last_error, settings) or None,
        "last_error_at": iso(stored.last_error_at),
        "unsaved": unsaved,
    }
    if stored.foreign:
        info["note"] = stored.foreign + "; it is ignored"
    if shown in ("not_authorized", "reauthorization_required"):
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


def unusable(state: State, has_pair: bool, last_error: str,
             settings: Settings) -> SidecarError | None:
    """The error a call gets from an authorization in ``state``; None if it can be served."""
    if state.dead:
        last_error = shown_error(last_error, settings)
    if state is State.CLIENT_REJECTED:
        return ReauthorizationRequired(
            "the OAuth server rejected the application "
            f"({last_error or 'no detail'}): check BITRIX_CLIENT_ID and the "
            "client secret, and that the app is still installed on the portal, then restart"
        )
    if state is State.REAUTHORIZATION_REQUIRED and last_error.startswith(MOVED):
        return ReauthorizationRequired(f"this sidecar's token store was {last_error}")
    if state is State.REAUTHORIZATION_REQUIRED:
        return ReauthorizationRequired(
            "the OAuth server refused to renew the token "
            f"({last_error or 'no detail'}); a person must authorize the app "
            f"again: {how_to_authorize(settings)}"
        )
    if not has_pair:
        return NotAuthorized(f"bitrix-sidecar holds no token yet: {how_to_authorize(settings)}")
    return None


def renewal_error(error: OAuthError, settings: Settings) -> SidecarError:
    """The error a caller of a failed renewal gets."""
    if client_error(error):
        return ReauthorizationRequired(
            f"{error.description}; check BITRIX_CLIENT_ID and the client secret, and "
            "that the app is still installed on the portal, then restart"
        )
    if error.permanent:
        return ReauthorizationRequired(
            f"{error.description}; a person must authorize the app again: "
            f"{how_to_authorize(settings)}"
        )
    return TokenUnavailable(f"renewing the token failed: {error.description}")
