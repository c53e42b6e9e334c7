"""The neutral shapes of one proxied call, whichever HTTP server read it: the call, the answer,
the sink a streamed answer goes to, and the sidecar's own errors in Bitrix24's shape."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Protocol

from aiohttp.http import HttpVersion
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import (
    BadPage,
    BadRequest,
    BodyTooLarge,
    ClientGone,
    ClientKeyRequired,
    ExpectationFailed,
    ListTooLarge,
    MethodNotAllowed,
    MethodPaused,
    NotAuthorized,
    NotFound,
    Overloaded,
    PortalMismatch,
    PortalRequired,
    PortalUnknown,
    QueueFull,
    ReauthorizationRequired,
    Refused,
    RequestTimeout,
    SidecarError,
    StoreError,
    TokenUnavailable,
    UpstreamError,
    UpstreamTimeout,
)

STATUS_OF: dict[type[SidecarError], int] = {
    BadRequest: 400,
    ListTooLarge: 400,
    BadPage: 502,
    ClientKeyRequired: 401,
    Refused: 403,
    NotFound: 404,
    PortalRequired: 400,
    PortalMismatch: 400,
    PortalUnknown: 404,
    MethodNotAllowed: 405,
    BodyTooLarge: 413,
    ClientGone: 499,  # nginx's "client closed request": never seen by anyone, only logged
    ExpectationFailed: 417,
    MethodPaused: 429,
    QueueFull: 503,
    Overloaded: 503,
    UpstreamError: 502,
    UpstreamTimeout: 504,
    RequestTimeout: 408,
    NotAuthorized: 503,
    ReauthorizationRequired: 503,
    TokenUnavailable: 503,
    StoreError: 503,
}
JSON_TYPE = ("Content-Type", "application/json; charset=utf-8")


@dataclass(slots=True)
class Reply:
    """An answer to a client, whichever HTTP server writes it.

    ``body`` None means the answer has already gone out, streamed through the call's sink.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes | None
    reason: str = ""


class Sink(Protocol):
    """Where a streamed answer goes; ``write`` raises ConnectionResetError once the client left."""

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]],
                    length: int | None) -> None: ...

    async def write(self, chunk: bytes) -> None: ...

    async def finish(self) -> None: ...

    def cut(self) -> None:
        """Drop the connection: the client must see that the answer broke."""


class Call:
    """One client request to the proxy listener, whichever HTTP server read it."""

    __slots__ = ("content_type", "headers", "host", "method", "peer", "raw_path", "transport",
                 "version")

    def __init__(  # noqa: PLR0917 - a plain record
        self, method: str, raw_path: str, version: HttpVersion,
        headers: CIMultiDictProxy[str] | CIMultiDict[str], host: str, content_type: str,
        transport: asyncio.BaseTransport | None, peer: str = "",
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.host = host
        self.content_type = content_type
        self.transport = transport
        self.peer = peer  # the client's address ("" when unknown)

    def alive(self) -> bool:
        """Say whether the client is still there."""
        transport = self.transport
        return transport is not None and not transport.is_closing()

    async def body(self, limit: int) -> bytes:
        """Return the request body as sent (at most ``limit`` bytes)."""
        raise NotImplementedError


def error_reply(error: SidecarError, *, request_id: str | None = None,
                api: bool = False) -> Reply:
    """Answer an error of the sidecar's own, in Bitrix24's shape.

    ``api``: on a REST 3.0 path, where ``error`` is an object with a code and a message (the
    description stays beside it, for a client that reads the old shape).
    """
    status = next((s for cls, s in STATUS_OF.items() if isinstance(error, cls)), 500)
    headers = [JSON_TYPE]
    if request_id:
        headers.append(("X-Request-ID", request_id))
    if isinstance(error, MethodNotAllowed):
        headers.append(("Allow", "GET, POST"))
    if isinstance(error, QueueFull | MethodPaused | Overloaded):
        headers.append(("Retry-After", str(max(1, math.ceil(error.retry_after)))))
    if api:
        body = json.dumps({"error": {"code": error.code, "message": error.description},
                           "error_description": error.description}).encode()
    else:
        body = json.dumps({"error": error.code, "error_description": error.description}).encode()
    return Reply(status, headers, body)
