"""The records every part of the emulator shares: errors, callers, method results, counters, log.

Nothing here serves HTTP or holds portal state; the other modules build on these and this module
imports none of them.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Caller",
    "EmulatorStats",
    "Handler",
    "Method",
    "MethodResult",
    "OAuthFailure",
    "OutputFormat",
    "RestCall",
    "RestError",
    "TokenSource",
]

OAuthFailure = Literal["html", "garbage", "500", "invalid_client", "slow", "reset"]
TokenSource = Literal["header", "auth", "access_token", "webhook"]
OutputFormat = Literal["json", "xml"]


@dataclass
class EmulatorStats:
    """Counters a test reads to see what the sidecar did upstream."""

    # Every /oauth/token/ request, keyed by the grant_type it named ("" when none).
    token_requests: collections.Counter[str] = field(default_factory=collections.Counter)
    # Refresh grants that issued a new pair; refresh_rejected counts all other refresh answers
    # (injected failures included), so the two add up to token_requests["refresh_token"].
    refresh_ok: int = 0
    refresh_rejected: int = 0
    # Method runs: requests that passed auth and the rate limit, plus each dispatched batch command.
    rest_calls: collections.Counter[str] = field(default_factory=collections.Counter)
    limited: int = 0
    upstream_requests: int = 0
    # 429 OPERATION_TIME_LIMIT answers sent for methods blocked with block_method().
    time_limited: int = 0


@dataclass(frozen=True)
class RestCall:
    """One REST HTTP request as the emulator received it."""

    method: str
    http_method: str
    path: str
    query: str
    params: dict[str, Any]
    token: str | None
    token_source: TokenSource | None
    headers: dict[str, str]
    body: bytes
    fmt: OutputFormat
    # "v3" for REST 3.0 requests (/rest/api/...), whose params are the JSON body less `auth`.
    api: Literal["v2", "v3"] = "v2"


class RestError(Exception):
    """A Bitrix error answer: HTTP status plus the error body."""

    def __init__(self, status: int, error: str, description: str) -> None:
        """Keep the status and body fields."""
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description

    def body(self) -> dict[str, str]:
        """Return the JSON error body."""
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True)
class Caller:
    """Who is calling: an app by token, or a webhook user (client_id None, any scope)."""

    client_id: str | None
    scope: frozenset[str] | None
    user_id: int


@dataclass(frozen=True)
class MethodResult:
    """What a method returns: its result and, for a list, the next page's offset and the total."""

    result: Any
    next: int | None = None
    total: int | None = None


Handler = Callable[[Caller, dict[str, Any]], MethodResult]


@dataclass(frozen=True)
class Method:
    """A REST method: the scope an app needs to call it (None: any), and what runs it."""

    scope: str | None
    handler: Handler
