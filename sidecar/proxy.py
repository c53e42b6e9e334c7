"""The ``/rest/`` handler: parse path and body, attach the token, forward, retry once, answer."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import math
import os
import re
import time
import zlib
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_plus

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.batching import (
    BATCH_ONLY_ERRORS,
    Answer,
    SingleCall,
    batch_body,
    command_line,
    split_answers,
)
from sidecar.config import Settings
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    ExpectationFailed,
    InternalError,
    MethodNotAllowed,
    MethodPaused,
    NotAuthorized,
    NotFound,
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
from sidecar.limits import Gate, Waiter
from sidecar.logging import AccessLog
from sidecar.metrics import Metrics
from sidecar.store import TokenPair
from sidecar.tokens import TokenManager
from sidecar.upstream import BadHeader, Origin, Pool, PortalConnectionError, Response

log = structlog.get_logger("sidecar.proxy")

# /rest/<method>[.json|.xml] and the inbound-webhook shape /rest/<user>/<code>/<method>[.json|.xml].
# Matched on the raw request target: no percent-escape, dot segment or second slash gets through.
_PATH_RE = re.compile(
    r"/rest/(?:\d{1,10}/[A-Za-z0-9_]{1,64}/)?"
    r"(?P<method>[A-Za-z][A-Za-z0-9_]{0,63}(?:\.[A-Za-z0-9_]{1,64}){0,15}?)"
    r"(?P<suffix>\.json|\.xml)?",
    re.IGNORECASE,
)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Our request IDs: 32 hex digits, a random prefix per process and a counter (uuid4 per call
# cost a system call on the hot path).
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count(1)
_REFRESHABLE = frozenset({"expired_token", "invalid_token"})
_COALESCIBLE_TYPES = frozenset({"", "application/x-www-form-urlencoded", "application/json"})
# A call the portal refused unrun (503 QUERY_LIMIT_EXCEEDED) is sent again at most this often.
LIMIT_RETRIES = 5
# How long a method blocked by OPERATION_TIME_LIMIT rests when the answer does not say.
DEFAULT_PAUSE = 60.0
_XML_ERROR_RE = re.compile(rb"<error>\s*([A-Za-z_]+)\s*</error>")
_CLIENT_AUTH_PARAMS = frozenset({"auth", "access_token"})
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade"}
)
# Not forwarded upstream: hop-by-hop headers, the client's own credentials, and what the
# client library computes for its own connection.
# aiohttp's server has already decoded a compressed request body, so its Content-Encoding goes.
_DROP_REQUEST = HOP_BY_HOP | {
    "host", "authorization", "content-length", "content-encoding", "expect", "cookie",
    "x-request-id",  # ours replaces it
}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "x-request-id"}
# Answers up to this size are read whole (one write to the client); larger ones stream.
STREAM_THRESHOLD = 256 * 1024
CHUNK = 64 * 1024

STATUS_OF: dict[type[SidecarError], int] = {
    BadRequest: 400,
    Refused: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    BodyTooLarge: 413,
    ClientGone: 499,  # nginx's "client closed request": never seen by anyone, only logged
    ExpectationFailed: 417,
    MethodPaused: 429,
    QueueFull: 503,
    UpstreamError: 502,
    UpstreamTimeout: 504,
    RequestTimeout: 408,
    NotAuthorized: 503,
    ReauthorizationRequired: 503,
    TokenUnavailable: 503,
    StoreError: 503,
}


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

    __slots__ = ("content_type", "headers", "host", "method", "raw_path", "transport", "version")

    def __init__(  # noqa: PLR0917 - a plain record
        self, method: str, raw_path: str, version: HttpVersion,
        headers: CIMultiDictProxy[str] | CIMultiDict[str], host: str, content_type: str,
        transport: asyncio.BaseTransport | None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers = headers
        self.host = host
        self.content_type = content_type
        self.transport = transport

    def alive(self) -> bool:
        """Say whether the client is still there."""
        transport = self.transport
        return transport is not None and not transport.is_closing()

    async def body(self, limit: int) -> bytes:
        """Return the request body as sent (at most ``limit`` bytes)."""
        raise NotImplementedError


JSON_TYPE = ("Content-Type", "application/json; charset=utf-8")


def error_reply(error: SidecarError, *, request_id: str | None = None) -> Reply:
    """Answer an error of the sidecar's own, in Bitrix24's shape."""
    status = next((s for cls, s in STATUS_OF.items() if isinstance(error, cls)), 500)
    headers = [JSON_TYPE]
    if request_id:
        headers.append(("X-Request-ID", request_id))
    if isinstance(error, MethodNotAllowed):
        headers.append(("Allow", "GET, POST"))
    if isinstance(error, QueueFull | MethodPaused):
        headers.append(("Retry-After", str(max(1, math.ceil(error.retry_after)))))
    body = json.dumps({"error": error.code, "error_description": error.description}).encode()
    return Reply(status, headers, body)


def web_response(reply: Reply) -> web.Response:
    """Turn a whole reply into aiohttp's response."""
    return web.Response(status=reply.status, reason=reply.reason or None, body=reply.body,
                        headers=CIMultiDict(reply.headers))


def error_response(error: SidecarError, *, request_id: str | None = None) -> web.Response:
    """Answer an error of the sidecar's own, in Bitrix24's shape (aiohttp's response)."""
    return web_response(error_reply(error, request_id=request_id))


class _AiohttpCall(Call):
    """A call read by aiohttp's server."""

    __slots__ = ("request",)

    def __init__(self, request: web.Request) -> None:
        super().__init__(request.method, request.raw_path, request.version, request.headers,
                         request.host, request.content_type, request.transport)
        self.request = request

    async def body(self, limit: int) -> bytes:
        request = self.request
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
        if not request.body_exists:
            return b""
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
                chunks.append(chunk)
        except (RequestPayloadError, HttpProcessingError):
            raise BadRequest("the body cannot be read or decoded (bad framing or "
                             "Content-Encoding)") from None
        except ConnectionResetError:
            raise ClientGone("the client hung up in the middle of its body") from None
        return b"".join(chunks)


class _AiohttpSink:
    """Streams an answer through aiohttp's StreamResponse."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]],
                    length: int | None) -> None:
        response = self.response = web.StreamResponse(status=status, reason=reason or None,
                                                      headers=CIMultiDict(headers))
        if length is not None:
            response.content_length = length
        await response.prepare(self.request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def cut(self) -> None:
        if self.request.transport is not None:
            self.request.transport.close()


@dataclass(frozen=True)
class Target:
    """What a client asked for: a REST method, its output format, and the raw query string."""

    method: str
    suffix: str
    query: str


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` as aiohttp does; refuse other expectations our way."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11:
        if expect.lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the body proper has not started
            return None
        return error_response(ExpectationFailed(
            f"Expect: {_show(expect)} is not supported (only 100-continue)"))
    return None


def parse_target(raw: str) -> Target:
    """Split and check the raw request target; raise NotFound or BadRequest."""
    path, _, query = raw.partition("?")
    if not path.startswith("/rest/"):
        raise NotFound(f"bitrix-sidecar serves /rest/<method> only, not {_show(path)}")
    match = _PATH_RE.fullmatch(path)
    if match is None:
        raise BadRequest(
            f"{_show(path)} is not a REST method address: use /rest/<method>, "
            "/rest/<method>.json or /rest/<user_id>/<code>/<method>"
        )
    if any(c in query for c in "\r\n\0#"):
        raise BadRequest("the query string holds control characters")
    return Target(match["method"], (match["suffix"] or "").lower(), query)


def _show(text: str) -> str:
    """Quote a piece of client input safely for an error description."""
    return json.dumps(text[:120])


def _param_name(segment: bytes | str) -> str:
    """Return the base name of a urlencoded ``key=value`` segment (``auth[x]`` -> ``auth``)."""
    text = segment.decode("latin-1") if isinstance(segment, bytes) else segment
    name = unquote_plus(text.partition("=")[0])
    return name.partition("[")[0].strip().lower()


def strip_query_auth(query: str) -> str:
    """Drop ``auth`` and ``access_token`` parameters from a raw query string, keep the rest raw."""
    lowered = query.lower()
    if "auth" not in lowered and "access_token" not in lowered and "%" not in query:
        return query
    return "&".join(
        seg for seg in query.split("&") if seg and _param_name(seg) not in _CLIENT_AUTH_PARAMS
    )


def strip_body_auth(body: bytes, content_type: str) -> bytes:
    """Drop the client's ``auth``/``access_token`` from a form, JSON or multipart body."""
    lowered = body.lower()
    # JSON may spell a key with \u escapes, forms with %-escapes: those are parsed too.
    if not body or (b"auth" not in lowered and b"\\u" not in body and b"%" not in body):
        return body
    if content_type == "application/x-www-form-urlencoded":
        return b"&".join(
            seg for seg in body.split(b"&")
            if seg and _param_name(seg) not in _CLIENT_AUTH_PARAMS
        )
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest("the body is not valid JSON") from None
        if isinstance(data, dict) and any(k.lower() in _CLIENT_AUTH_PARAMS for k in data):
            data = {k: v for k, v in data.items() if k.lower() not in _CLIENT_AUTH_PARAMS}
            # ASCII escapes carry any string, lone surrogates included, unchanged in meaning.
            return json.dumps(data).encode()
    return body


_PART_NAME_RE = re.compile(rb'\bname\s*=\s*(?:"([^"]*)"|([^\s;]+))')
_PART_HEAD_MAX = 8192  # a part's header block longer than this is not a form field
_BOUNDARY_RE = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def multipart_boundary(content_type: str) -> str:
    """Return the boundary parameter of a multipart content type ('' if none)."""
    match = _BOUNDARY_RE.search(content_type)
    return (match.group(1) or match.group(2)) if match else ""


def strip_multipart_auth(body: bytes, boundary: str) -> bytes:
    """Drop ``auth``/``access_token`` parts of a multipart body, keeping the others byte-exact."""
    if not boundary.isascii():
        raise BadRequest("the multipart boundary is not ASCII")
    delimiter = b"--" + boundary.encode("ascii")
    pieces = body.split(delimiter)
    kept = [pieces[0]]
    for piece in pieces[1:]:
        head = piece[:_PART_HEAD_MAX].split(b"\r\n\r\n", 1)[0].lower()
        # Line by line, so a hostile header block costs linear time, not quadratic.
        disposition = next((line for line in head.split(b"\r\n")
                            if line.lstrip().startswith(b"content-disposition:")), b"")
        name = _PART_NAME_RE.search(disposition)
        value = (name.group(1) or name.group(2) or b"") if name else b""
        if value.partition(b"[")[0].strip().decode("latin-1") in _CLIENT_AUTH_PARAMS:
            continue
        kept.append(piece)
    return delimiter.join(kept)


class Proxy:
    """Forward REST calls to the portal with the current token attached."""

    def __init__(
        self,
        settings: Settings,
        tokens: TokenManager,
        pool: Pool,
        metrics: Metrics,
        gate: Gate,
        *,
        access_log: AccessLog,
    ) -> None:
        self._access_log = access_log
        self._metrics = metrics
        self._gate = gate
        gate.run_batch = self.run_batch
        self._settings = settings
        self._tokens = tokens
        self._pool = pool
        self._origins: dict[str, Origin] = {}
        # Counted here and read at scrape time: a gauge's lock twice per call costs more.
        self._inflight = 0
        metrics.inflight.set_function(lambda: self._inflight)
        self._hosts = frozenset({"localhost", "::1", settings.listen.host.lower(),
                                 *settings.allowed_hosts}) - {"0.0.0.0", "::", ""}  # noqa: S104

    @property
    def pool(self) -> Pool:
        """The connections to the portal."""
        return self._pool

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request aiohttp's server read (the fast lane hands it the unusual ones)."""
        sink = _AiohttpSink(request)
        reply = await self.serve(_AiohttpCall(request), sink)
        if reply.body is None:
            assert sink.response is not None
            return sink.response
        return web_response(reply)

    async def serve(self, call: Call, sink: Sink) -> Reply:
        """Serve one client request to ``/rest/``, ``/token`` or anything else (404)."""
        started = time.perf_counter()
        request_id = call.headers.get("X-Request-ID", "")
        if not _REQUEST_ID_RE.fullmatch(request_id):
            request_id = f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"
        outcome = _Outcome()
        self._inflight += 1
        try:
            response = await self._dispatch(call, sink, request_id, outcome)
        except SidecarError as exc:
            outcome.error = exc.code
            response = error_reply(exc, request_id=request_id)
        except Exception as exc:  # a bug of ours: still an answer in Bitrix's shape
            # Only the type and where: an exception's text may hold an address with the token.
            log.error("unexpected_error", request_id=request_id, error=type(exc).__name__,
                      where=_where(exc))
            outcome.error = InternalError.code
            response = error_reply(InternalError(
                "the sidecar failed unexpectedly; its log has the details (request "
                f"{request_id})"), request_id=request_id)
        finally:
            self._inflight -= 1
        duration = time.perf_counter() - started
        if outcome.method != "/token":
            label = self._metrics.method_label(
                outcome.method, known=outcome.reached and response.status != 404
            )
            self._metrics.observe_request(label, response.status, duration)
        self._access_log.request(
            request_id, outcome.method, call.method, response.status,
            round(duration * 1000, 2), round(outcome.upstream * 1000, 2), outcome.retried,
            outcome.coalesced, outcome.error,
        )
        return response

    def _check_origin(self, request: Call) -> None:
        """Refuse browsers on other sites (CSRF) and foreign Host names (DNS rebinding).

        Whoever reaches the port acts as the app, so a web page must not make a browser do it.
        """
        headers = request.headers
        site = headers.get("Sec-Fetch-Site", "")
        if site in ("cross-site", "same-site"):
            raise Refused("a browser request from another site is refused")
        origin = headers.get("Origin")
        if origin is not None:
            try:
                origin_host = URL(origin).host or ""
            except ValueError:
                origin_host = ""  # unparsable: as foreign as it gets
            if not self._host_allowed(origin_host):
                raise Refused("a request from a foreign Origin is refused")
        host = request.host.rsplit(":", 1)[0] if not request.host.startswith("[") else (
            request.host[1:].split("]", 1)[0]
        )
        if not self._host_allowed(host):
            raise Refused(
                f"Host {_show(request.host)} is not served: call 127.0.0.1 or localhost, or add "
                "the name to SIDECAR_ALLOWED_HOSTS"
            )

    def _host_allowed(self, host: str) -> bool:
        host = host.lower().strip("[]")
        if host in self._hosts or "*" in self._hosts:
            return True
        try:
            # Only an address literal can be loopback: "127.0.0.1.evil.example" is a name.
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    async def _dispatch(
        self, request: Call, sink: Sink, request_id: str, outcome: _Outcome
    ) -> Reply:
        if request.version < HttpVersion10:
            raise BadRequest("HTTP/0.9 requests are not served")
        self._check_origin(request)
        raw = request.raw_path
        if raw == "/token" or raw.startswith("/token?"):
            outcome.method = "/token"
            return await self._token(request, request_id)
        target = parse_target(raw)
        outcome.method = target.method.lower()
        if request.method not in ("GET", "POST"):
            raise MethodNotAllowed(f"{request.method} is not accepted: use GET or POST")
        body = await self._read_body(request)
        return await self._forward(request, sink, request_id, target, body, outcome)

    async def _token(self, request: Call, request_id: str) -> Reply:
        if request.method != "GET":
            raise MethodNotAllowed(f"{request.method} is not accepted: use GET")
        pair = await self._tokens.get()
        return Reply(200, [JSON_TYPE, ("X-Request-ID", request_id), ("Cache-Control", "no-store")],
                     json.dumps({
                "access_token": pair.access_token,
                "expires_at": int(pair.expires_at),
                "expires_in": max(0, int(pair.expires_in())),
                "client_endpoint": pair.client_endpoint or self._settings.rest_base,
                "member_id": pair.member_id,
                "scope": pair.scope,
            }).encode())

    async def _read_body(self, request: Call) -> bytes:
        body = await request.body(self._settings.max_body)
        ctype = request.content_type
        if ctype.startswith("multipart/"):
            boundary = multipart_boundary(request.headers.get("Content-Type", ""))
            if boundary and (b"auth" in body.lower()):
                body = strip_multipart_auth(body, boundary)
            return body
        return strip_body_auth(body, ctype)

    async def _forward(  # noqa: PLR0917 - one call's parts
        self,
        request: Call,
        sink: Sink,
        request_id: str,
        target: Target,
        body: bytes,
        outcome: _Outcome,
    ) -> Reply:
        query = strip_query_auth(target.query)
        headers = _filter_headers(request.headers, _DROP_REQUEST)
        headers.append(("X-Request-ID", request_id))
        headers.append(("Authorization", ""))
        method = target.method.lower()
        ctype = request.content_type if body else ""
        coalescible = (
            self._gate.coalesce
            and target.suffix != ".xml"
            and ctype in _COALESCIBLE_TYPES
            and request.headers.get("X-Sidecar-Coalesce", "").strip().lower() != "off"
        )

        def line() -> str | None:
            if not coalescible or outcome.retried:
                return None
            return command_line(SingleCall(target.method, query, body, ctype))

        alive = request.alive

        pair = await self._tokens.get()
        again = False  # this is a repeat of a call the portal refused unrun: it goes first
        limited = 0
        paused = False
        while True:
            answer = await self._gate.enter(method, line=line, alive=alive, retry=again)
            if isinstance(answer, Answer):
                outcome.reached = True
                outcome.coalesced = True
                return _json_answer(answer, request_id)
            pair = self._tokens.current() or pair
            again = False
            origin, path = self._target(pair, target, query)
            # The header outranks any auth the body may still hide; the parameter serves
            # servers that read only parameters.
            headers[-1] = ("Authorization", f"Bearer {pair.access_token}")
            sent = time.perf_counter()
            try:
                upstream = await self._pool.request(
                    request.method, origin, path, headers,
                    body=body if body or request.method == "POST" else None,
                    time_limit=self._settings.upstream_timeout,
                )
                try:
                    status = upstream.status
                    if status not in (401, 429, 503):
                        self._gate.passed()
                        return await self._relay(sink, upstream=upstream,
                                                 request_id=request_id, target=target,
                                                 sent=sent, outcome=outcome)
                    payload = await upstream.read()
                    self._upstream_done(outcome, sent)
                    encoding = upstream.headers.get("Content-Encoding", "")
                    error = _error_code(payload, encoding)
                    outcome.reached = error is not None  # a REST answer, not a proxy's page
                    if status == 401 and not outcome.retried and error in _REFRESHABLE:
                        outcome.retried = True
                        self._metrics.upstream_retries.labels(reason="auth_error").inc()
                        pair = await self._tokens.refresh(pair.access_token,
                                                          trigger="auth_error")
                        again = True
                        continue
                    if status == 503 and error == "QUERY_LIMIT_EXCEEDED":
                        # The call did not run: our bucket was out of step. Fill it, back
                        # off, and send the call again, up to a bound.
                        self._gate.limited()
                        if limited < LIMIT_RETRIES:
                            limited += 1
                            self._metrics.upstream_retries.labels(reason="rate_limit").inc()
                            again = True
                            continue
                    if status == 429 and error == "OPERATION_TIME_LIMIT":
                        wait = _reset_in(payload, encoding)
                        self._gate.pause(method, wait)
                        self._metrics.upstream_limited.labels(error=error).inc()
                        if not paused and wait <= self._gate.queue_timeout:
                            paused = True  # enter() waits out the pause, then it goes again
                            self._metrics.upstream_retries.labels(reason="time_limit").inc()
                            continue
                        response = self._answer(upstream, payload, request_id)
                        response.headers = [h for h in response.headers
                                            if h[0].lower() != "retry-after"]
                        response.headers.append(("Retry-After", str(math.ceil(wait))))
                        return response
                    return self._answer(upstream, payload, request_id)
                finally:
                    upstream.release()
            except TimeoutError:
                self._upstream_done(outcome, sent, error="timeout")
                raise UpstreamTimeout(
                    f"the portal did not answer within {self._settings.upstream_timeout:g} s"
                ) from None
            except PortalConnectionError as exc:
                self._upstream_done(outcome, sent, error="unreachable")
                raise UpstreamError(f"the portal is unreachable: {exc}") from None
            except BadHeader:
                raise BadRequest("a header name or value holds a line break") from None

    async def run_batch(self, group: list[Waiter]) -> None:
        """Send queued single calls as one ``batch`` and give each its own answer."""
        lines = [waiter.line or "" for waiter in group]
        body = batch_body(lines)
        started = time.perf_counter()
        try:
            pair = await self._tokens.get()
            for attempt in range(2):
                origin, path = self._target(pair, Target("batch", "", ""), "")
                headers = [("Authorization", f"Bearer {pair.access_token}"),
                           ("Content-Type", "application/x-www-form-urlencoded")]
                try:
                    upstream = await self._pool.request(
                        "POST", origin, path, headers, body=body,
                        time_limit=self._settings.upstream_timeout)
                    try:
                        status = upstream.status
                        payload = await upstream.read()
                        encoding = upstream.headers.get("Content-Encoding", "")
                    finally:
                        upstream.release()
                except TimeoutError:
                    self._metrics.upstream_errors.labels(kind="timeout").inc()
                    raise UpstreamTimeout(
                        "the portal did not answer a coalesced batch within "
                        f"{self._settings.upstream_timeout:g} s"
                    ) from None
                except PortalConnectionError as exc:
                    self._metrics.upstream_errors.labels(kind="unreachable").inc()
                    raise UpstreamError(f"the portal is unreachable: {exc}") from None
                finally:
                    self._metrics.upstream_duration.observe(time.perf_counter() - started)
                error = _error_code(payload, encoding) if status != 200 else None
                if status == 401 and attempt == 0 and error in _REFRESHABLE:
                    self._metrics.upstream_retries.labels(reason="auth_error").inc()
                    pair = await self._tokens.refresh(pair.access_token, trigger="auth_error")
                    continue
                break
            if status == 503 and error == "QUERY_LIMIT_EXCEEDED":
                self._gate.limited()
                again = [w for w in group if w.attempts < LIMIT_RETRIES]
                self._metrics.upstream_retries.labels(reason="rate_limit").inc(len(again))
                self._gate.requeue(again)
                for waiter in group:
                    if waiter not in again and not waiter.future.done():
                        waiter.future.set_result(Answer(status, payload))
                return
            if status != 200:
                # The batch itself was refused: each call would have been refused alike.
                for waiter in group:
                    waiter.future.set_result(Answer(status, _plain(payload, encoding)))
                return
            self._gate.passed()
            try:
                answers = split_answers(_plain(payload, encoding), len(group))
            except ValueError:
                self._metrics.upstream_errors.labels(kind="not_rest").inc()
                raise UpstreamError("the portal answered the batch with garbage") from None
            alone: list[Waiter] = []
            for waiter, answer in zip(group, answers, strict=True):
                if _error_code(answer.body, "") in BATCH_ONLY_ERRORS:
                    # Refused by the batch itself, not by the method: it never ran, so it is
                    # sent again, alone.
                    waiter.line = None
                    alone.append(waiter)
                elif not waiter.future.done():
                    waiter.future.set_result(answer)
            if alone:
                self._gate.requeue(alone)
        except SidecarError as exc:
            for waiter in group:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)

    def _upstream_done(self, outcome: _Outcome, sent: float, *, error: str = "") -> None:
        elapsed = time.perf_counter() - sent
        outcome.upstream += elapsed
        self._metrics.upstream_duration.observe(elapsed)
        if error:
            self._metrics.upstream_errors.labels(kind=error).inc()

    def _target(self, pair: TokenPair, target: Target, query: str) -> tuple[Origin, str]:
        """Where the call goes: the portal's origin and the raw path with the token added."""
        base = pair.client_endpoint or self._settings.rest_base
        origin = self._origins.get(base)
        if origin is None:
            try:
                origin = Origin.parse(base)
            except ValueError:
                raise UpstreamError("the portal's REST address is not an http(s) "
                                    "address") from None
            if len(self._origins) > 8:  # the address changes only when a portal is renamed
                self._origins.clear()
            self._origins[base] = origin
        auth = f"auth={pair.access_token}"
        path = f"{origin.base_path}{target.method}{target.suffix}?{query}&{auth}" if query \
            else f"{origin.base_path}{target.method}{target.suffix}?{auth}"
        return origin, path

    async def _relay(
        self,
        sink: Sink,
        *,
        upstream: Response,
        request_id: str,
        target: Target,
        sent: float,
        outcome: _Outcome,
    ) -> Reply:
        if 300 <= upstream.status < 400 and upstream.status != 304:
            location = URL(upstream.headers.get("Location", ""))
            self._upstream_done(outcome, sent, error="redirect")
            raise UpstreamError(
                f"the portal answered {upstream.status} redirecting to "
                f"{location.host or 'an unknown place'}: it may have been renamed; the next "
                "token refresh learns its new address"
            )
        ctype = upstream.content_type
        if upstream.status >= 500 and ctype not in ("application/json", "text/xml"):
            self._upstream_done(outcome, sent, error="not_rest")
            raise UpstreamError(
                f"the portal answered HTTP {upstream.status} with {ctype or 'no content type'} "
                "instead of a REST answer"
            )
        outcome.reached = True
        length = upstream.content_length
        if length is not None and length <= STREAM_THRESHOLD:
            payload = await upstream.read()
            self._upstream_done(outcome, sent)
            return self._answer(upstream, payload, request_id)
        streamed = Reply(upstream.status, [], None)
        try:
            await sink.start(upstream.status, upstream.reason,
                             _response_headers(upstream.headers, request_id), length)
            while chunk := await upstream.next_chunk():
                await sink.write(chunk)
            await sink.finish()
        except ConnectionResetError:
            # The client hung up: nothing to tell it; the upstream connection is released
            # (closed) by the caller's context manager.
            outcome.error = "SIDECAR_CLIENT_GONE"
            self._upstream_done(outcome, sent)
            return streamed
        except (PortalConnectionError, TimeoutError) as exc:
            # Too late for an error answer: cut the connection so the client sees it broke.
            outcome.error = "SIDECAR_UPSTREAM_BROKE_MID_STREAM"
            self._upstream_done(outcome, sent, error="broke_mid_stream")
            log.warning("upstream_broke_mid_stream", request_id=request_id,
                        method=target.method, error=_describe(exc))
            sink.cut()
            return streamed
        except Exception as exc:  # a bug of ours, with the answer under way: no second answer
            log.error("unexpected_error", request_id=request_id, error=type(exc).__name__,
                      where=_where(exc))
            outcome.error = InternalError.code
            self._upstream_done(outcome, sent)
            sink.cut()
            return streamed
        self._upstream_done(outcome, sent)
        return streamed

    def _answer(self, upstream: Response, payload: bytes, request_id: str) -> Reply:
        return Reply(upstream.status, _response_headers(upstream.headers, request_id), payload,
                     upstream.reason)


class _Outcome:
    """What happened to one call, for its access-log event."""

    __slots__ = ("coalesced", "error", "method", "reached", "retried", "upstream")

    def __init__(self) -> None:
        self.method = ""
        self.coalesced = False
        self.reached = False
        self.retried = False
        self.upstream = 0.0
        self.error: str | None = None


def _filter_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str],
                    drop: frozenset[str]) -> list[tuple[str, str]]:
    """Copy headers less ``drop`` and whatever the Connection header names as hop-by-hop."""
    connection = headers.getall("Connection", ())
    if connection:
        drop = drop | {name.strip().lower() for value in connection
                       for name in value.split(",")}
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


def _response_headers(headers: CIMultiDict[str], request_id: str) -> list[tuple[str, str]]:
    out = _filter_headers(headers, _DROP_RESPONSE)
    out.append(("X-Request-ID", request_id))
    return out


def _plain(payload: bytes, encoding: str) -> bytes:
    """Return a body decompressed (gzip or deflate), as our own checks need it."""
    if encoding.strip().lower() in ("gzip", "deflate", "x-gzip"):
        # wbits=47 accepts gzip and zlib headers alike; the cap bounds a zip bomb.
        return zlib.decompressobj(wbits=47).decompress(payload, 1 << 20)
    return payload


def _error_code(payload: bytes, encoding: str) -> str | None:
    """Return the ``error`` of a REST error body: JSON or XML, compressed or not."""
    try:
        payload = _plain(payload, encoding)
        if payload.lstrip().startswith(b"<"):
            match = _XML_ERROR_RE.search(payload)
            return match.group(1).decode("latin-1") if match else None
        data = json.loads(payload)
    except (ValueError, zlib.error):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


def _needs_refresh(payload: bytes, encoding: str) -> bool:
    """Say whether a 401's body is ``expired_token``/``invalid_token``."""
    return _error_code(payload, encoding) in _REFRESHABLE


def _reset_in(payload: bytes, encoding: str) -> float:
    """Seconds until a method blocked by OPERATION_TIME_LIMIT is allowed again."""
    try:
        data = json.loads(_plain(payload, encoding))
        reset = float(data["time"]["operating_reset_at"])
    except (ValueError, TypeError, KeyError, zlib.error):
        return DEFAULT_PAUSE
    # The reset time is whole seconds: a second more makes sure the block has lifted.
    return min(max(reset - time.time() + 1.0, 1.0), 600.0)


def _json_answer(answer: Answer, request_id: str) -> Reply:
    return Reply(answer.status, [JSON_TYPE, ("X-Request-ID", request_id)], answer.body)


def _where(exc: BaseException) -> str:
    """Name the innermost frame of a traceback: file, line and function, never values."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return ""
    code = frame.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.tb_lineno} in {code.co_name}"


def _describe(exc: BaseException) -> str:
    """Name a network error without echoing an address (ours carry the token)."""
    if isinstance(exc, PortalConnectionError):
        return str(exc)  # written to name no address
    return type(exc).__name__

