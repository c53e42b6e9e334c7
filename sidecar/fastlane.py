"""The proxy listener's fast lane: ordinary REST calls served without aiohttp's server machinery.

aiohttp's request handling (request and response objects, routing, header serialisation) cost
more per call than everything the sidecar itself does. Every connection to the proxy listener
starts here instead. A request whose head is ordinary is parsed with httptools and given to
the proxy core directly:

- ``GET`` or ``POST`` to ``/rest/...``, HTTP/1.1 or HTTP/1.0, one ``Host`` header;
- a body, if any, framed by one ``Content-Length`` of at most ``FAST_BODY`` bytes;
- no ``Expect``, ``Transfer-Encoding``, ``Content-Encoding`` or ``Upgrade``.

The first request that is anything else (``/token``, ``/oauth/...``, an upload, a chunked or
compressed body, a malformed head) hands the connection over, with every byte not yet served,
to aiohttp's own request handler, which serves it and everything after it exactly as before.
So the unusual and the hostile are still met by aiohttp's well-tried parser and our aiohttp
adapter, and the two paths share the proxy core (``Proxy.serve``).

The lane stands on parts of aiohttp that are not its public API (see ``missing_internals``).
At start-up the runner checks each of them; if one is missing, it says so once (a
``fast_lane_unavailable`` warning) and serves everything through plain aiohttp: correct,
slower. ``SIDECAR_FAST_LANE=off`` does the same on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import inspect
import time
import types
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Protocol, cast

import aiohttp
import httptools
import structlog
from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from sidecar.errors import RequestTimeout
from sidecar.proxy import Proxy
from sidecar.replies import Call, Reply, error_reply

# Bodies up to this size are read by the fast lane; larger ones stream in through aiohttp.
FAST_BODY = 1 << 20
# A head longer than this goes to aiohttp, which answers it as it sees fit (431 or 400);
# so does a long request line, many headers or a long one (aiohttp's limits decide).
MAX_HEAD = 24 * 1024
MAX_LINE = 8190
MAX_HEADERS = 100
_PREFIXES = (b"GET /rest/", b"POST /rest/")
_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# A kept-alive client connection idle this long is closed (aiohttp's default too).
CLIENT_IDLE_TIMEOUT = 75.0
# A request must arrive whole (head and body) within this long of its first byte, or it gets
# a 408 (slow-drip clients). Every connection starts in the lane, so every first request
# is held to it.
REQUEST_TIMEOUT = 60.0
LINGER = 2.0
_HANDED_OFF_HEADERS = frozenset({b"transfer-encoding", b"expect", b"content-encoding",
                                 b"upgrade"})
_REASONS = {status.value: status.phrase for status in http.HTTPStatus}
_NO_BODY = frozenset({204, 304})

log = structlog.get_logger("sidecar.fastlane")


class Tracker(Protocol):
    """What the fast lane needs of the listener's lifecycle: counting calls in flight."""

    def begin(self) -> None:
        """A call starts."""

    def end(self) -> None:
        """A call ends."""


class _Head:
    """httptools callbacks for one request head."""

    __slots__ = ("complete", "headers", "keep_alive", "method", "parser", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)
        self.complete = False
        self.keep_alive = False
        self.method = b""
        self.version = ""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read now: llhttp resets these once the message is complete.
        parser = self.parser
        self.complete = True
        self.keep_alive = parser.should_keep_alive()
        self.method = parser.get_method()
        self.version = parser.get_http_version()


class _Parsed:
    """An ordinary request head, ready to serve once its body is in."""

    __slots__ = ("call", "head_length", "keep_alive", "length", "version11")

    def __init__(self, call: FastCall, head_length: int, length: int, keep_alive: bool,
                 version11: bool) -> None:
        self.call = call
        self.head_length = head_length
        self.length = length
        self.keep_alive = keep_alive
        self.version11 = version11


class FastCall(Call):
    """A call read by the fast lane: its body is already in hand."""

    __slots__ = ("payload",)

    payload: bytes

    async def body(self, limit: int) -> bytes:
        return self.payload  # no larger than FAST_BODY, itself within the limit


def _parse(collected: _Head, head: bytes, max_body: int,
           transport: asyncio.BaseTransport) -> _Parsed | None:
    """Parse an ordinary request head; None when aiohttp should have it."""
    collected.url = b""
    collected.headers = []
    collected.complete = False
    try:
        collected.parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None  # aiohttp answers what it makes of it
    version = collected.version
    if not collected.complete or version not in ("1.1", "1.0"):
        return None
    length = -1
    host: str | None = None
    headers: CIMultiDict[str] = CIMultiDict()
    if len(collected.headers) > MAX_HEADERS:
        return None
    for name, value in collected.headers:
        if len(name) + len(value) > MAX_LINE:
            return None
        lowered = name.lower()
        if lowered in _HANDED_OFF_HEADERS:
            return None
        text = value.decode("utf-8", "surrogateescape")
        if lowered == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif lowered == b"host":
            if host is not None:
                return None
            host = text
        headers.add(name.decode("utf-8", "surrogateescape"), text)
    if host is None or length > min(FAST_BODY, max_body):
        return None
    ctype = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    call = FastCall(collected.method.decode("ascii"),
                    collected.url.decode("utf-8", "surrogateescape"),
                    HttpVersion11 if version == "1.1" else HttpVersion10, headers, host,
                    ctype or "application/octet-stream", transport)
    return _Parsed(call, len(head), max(length, 0), collected.keep_alive, version == "1.1")


class HttpDate:
    """The ``Date`` header's value, formatted once a second (each server owns one)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second, self._text = now, formatdate(now, usegmt=True)
        return self._text


def _head_bytes(status: int, reason: str, headers: list[tuple[str, str]], framing: str,
                version11: bool, *, date: HttpDate) -> bytes:
    """The status line and headers; ``framing`` is the length or connection lines."""
    lines = [f"HTTP/1.{1 if version11 else 0} {status} "
             f"{reason or _REASONS.get(status, 'Unknown')}\r\n"]
    has_date = has_type = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "date":
            has_date = True
        elif lowered == "content-type":
            has_type = True
        lines.append(f"{name}: {value}\r\n")
    if not has_date:
        lines.append(f"Date: {date()}\r\n")
    if not has_type:
        lines.append("Content-Type: application/octet-stream\r\n")  # what aiohttp would say
    lines.append(framing)
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


class _Sink:
    """Streams an answer onto a fast-lane connection, chunked when its length is unknown."""

    def __init__(self, lane: FastLane, parsed: _Parsed) -> None:
        self._lane = lane
        self._parsed = parsed
        self._chunked = False
        self._bodiless = False
        self.reusable = True

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]],
                    length: int | None) -> None:
        keep = self._parsed.keep_alive
        if status in _NO_BODY:
            framing = ""  # no body and no framing, whatever the portal sent
            self._bodiless = True
        elif length is not None:
            framing = f"Content-Length: {length}\r\n"
        elif self._parsed.version11:
            self._chunked = True
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            keep = False  # HTTP/1.0 without a length: the body ends when the connection does
            framing = ""
        framing += _connection_line(keep, self._parsed.version11)
        self.reusable = keep
        await self._lane.send(_head_bytes(status, reason, headers, framing,
                                          self._parsed.version11, date=self._lane.date))

    async def write(self, chunk: bytes) -> None:
        if self._bodiless:
            return
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        await self._lane.send(chunk)

    async def finish(self) -> None:
        if self._chunked and not self._bodiless:
            await self._lane.send(b"0\r\n\r\n")

    def cut(self) -> None:
        self.reusable = False
        self._lane.close_now()


def _bare_line_feed(buffer: bytearray, start: int) -> bool:
    """Whether a line feed at or after ``start`` has no carriage return before it."""
    at = buffer.find(b"\n", start)
    while at >= 0:
        if at == 0 or buffer[at - 1] != 0x0D:
            return True
        at = buffer.find(b"\n", at + 1)
    return False


def _connection_line(keep: bool, version11: bool) -> str:
    if not keep:
        return "Connection: close\r\n"
    return "" if version11 else "Connection: keep-alive\r\n"


class FastLane(asyncio.Protocol):
    """One client connection to the proxy listener."""

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._loop = server.loop
        self.date = server.date
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._parsed: _Parsed | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no request after the one in flight
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._last_active = 0.0
        self._started: float | None = None  # when the request being read began to arrive
        self._discarding = False  # answered and closing: what still arrives is dropped
        self._head: _Head | None = None  # the parser, kept between requests without a body
        # How far the head being read has been examined (its request line's end, once found):
        # each packet's search resumes there, so a head sent a byte at a time is read in
        # linear time, not scanned whole for every byte.
        self._scanned = 0
        self._line_end = -1

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.register(self, self._transport)
        self._last_active = self._loop.time()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._buffer += data
        self._last_active = now = self._loop.time()
        if self._task is None:
            if self._started is None:
                self._started = now
            self._advance()
        elif len(self._buffer) > FAST_BODY + MAX_HEAD and not self._reading_paused:
            assert self._transport is not None
            self._reading_paused = True  # a client pipelining far ahead waits its turn
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        # As aiohttp does: the client is gone, and so is the connection (a call in flight
        # notices; one still waiting for its turn is never sent).
        self._eof = True
        if self._task is None and self._buffer and not self._closing:
            self._hand_off()  # a request cut short: aiohttp reports it as it always has
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # Nothing more is served: requests pipelined behind the one in flight are dropped,
        # as aiohttp drops them (they would run with nobody to answer).
        self._closing = True
        self._buffer.clear()
        self._parsed = None
        self._server.unregister(self)
        self._wake_writer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- what aiohttp's server asks of a connection at shutdown ---------------------------

    def close(self) -> None:
        """Serve no further request; close now if none is in flight."""
        self._closing = True
        if self._task is None:
            self.close_now()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp calls it so
        """Let the call in flight finish within ``timeout``, then close."""
        self._closing = True
        task = self._task
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        self.close_now()

    # -- serving --------------------------------------------------------------------------

    def _advance(self) -> None:
        """Serve the next request in the buffer, wait for more bytes, or hand off."""
        if self._closing or self._transport is None:
            return
        buffer = self._buffer
        parsed = self._parsed
        if parsed is None:
            if not buffer:
                return
            # What cannot be an HTTP/1 request (a TLS hello, an HTTP/0.9 line) goes to aiohttp
            # at once: it may never send a blank line. Anything else is read whole (within
            # REQUEST_TIMEOUT) before it is served here or handed over.
            if buffer[0] not in _METHOD_START:
                self._hand_off()
                return
            # What was examined before held no line feed but in CRLFs, and no head's end; a
            # delimiter may straddle the old and new bytes, hence the steps back.
            scanned = self._scanned
            line_end = self._line_end
            if line_end < 0:
                line_end = buffer.find(b"\r\n", max(scanned - 1, 0), MAX_LINE)
                if line_end < 0:
                    # a bare LF: not ours to judge
                    if len(buffer) >= MAX_LINE or buffer.find(b"\n", scanned) >= 0:
                        self._hand_off()
                        return
                    self._scanned = len(buffer)
                    return
                if not buffer[:line_end].endswith((b" HTTP/1.1", b" HTTP/1.0")):
                    self._hand_off()
                    return
                self._line_end = line_end
            end = buffer.find(b"\r\n\r\n", max(scanned - 3, line_end), MAX_HEAD)
            if end < 0:
                if len(buffer) >= MAX_HEAD or _bare_line_feed(buffer, scanned):
                    self._hand_off()  # too long, or a bare LF that may end the head for aiohttp
                    return
                self._scanned = len(buffer)
                return
            self._scanned = 0  # the next head starts afresh at the start of the buffer
            self._line_end = -1
            if not buffer.startswith(_PREFIXES):
                self._hand_off()
                return
            collected = self._head or _Head()
            parsed = _parse(collected, bytes(buffer[:end + 4]), self._server.max_body,
                            self._transport)
            if parsed is None:
                self._hand_off()
                return
            # A head with no body leaves the parser ready for the next request; after a
            # body it would wait for that body, so the next request gets a fresh parser.
            self._head = collected if parsed.length == 0 else None
            self._parsed = parsed
        total = parsed.head_length + parsed.length
        if len(buffer) < total:
            return  # the body is still coming
        parsed.call.payload = bytes(buffer[parsed.head_length:total])
        del buffer[:total]
        self._parsed = None
        self._started = None
        self._task = self._loop.create_task(self._serve(parsed))

    async def _serve(self, parsed: _Parsed) -> None:
        server = self._server
        server.served += 1
        sink = _Sink(self, parsed)
        keep = parsed.keep_alive
        server.tracker.begin()
        try:
            reply: Reply = await server.proxy.serve(parsed.call, sink)
            if reply.body is None:
                keep = keep and sink.reusable
            else:
                body = b"" if reply.status in _NO_BODY else reply.body
                framing = ("" if reply.status in _NO_BODY
                           else f"Content-Length: {len(body)}\r\n")
                framing += _connection_line(keep, parsed.version11)
                with contextlib.suppress(ConnectionResetError):  # the client left: fine
                    # Through send(): a client that pipelines and never reads is not
                    # answered faster than it reads.
                    await self.send(_head_bytes(reply.status, reply.reason, reply.headers,
                                                framing, parsed.version11, date=server.date)
                                    + body)
        except BaseException:
            self.close_now()
            raise
        finally:
            server.tracker.end()
            self._task = None
        self._last_active = self._loop.time()
        if self._buffer:
            self._started = self._last_active  # the next request, pipelined
        if not keep or self._closing or self._eof:
            self._close_after_writing()
            return
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        self._advance()

    async def send(self, data: bytes) -> None:
        """Write part of a streamed answer; wait while the client reads slower than we write."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client hung up")
        transport.write(data)
        while self._writing_paused:
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
            if transport.is_closing():
                raise ConnectionResetError("the client hung up")

    def _wake_writer(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _hand_off(self) -> None:
        """Give the connection and every unserved byte to aiohttp's request handler."""
        transport = self._transport
        assert transport is not None
        self._server.unregister(self)
        self._server.handed_off += 1
        handler = self._server.aiohttp_handler()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            handler.data_received(data)
        if self._eof:
            handler.eof_received()

    def tick(self, now: float) -> None:
        """Close an idle connection; answer 408 to a request too slow to arrive."""
        if self._task is not None or self._closing:
            return
        if self._started is not None:
            if now - self._started >= REQUEST_TIMEOUT:
                self._too_slow(now - self._started)
        elif now - self._last_active >= CLIENT_IDLE_TIMEOUT:
            self.close_now()

    def _too_slow(self, seconds: float) -> None:
        log.info("request_too_slow", seconds=round(seconds, 1), received=len(self._buffer))
        reply = error_reply(RequestTimeout(
            f"the request did not arrive whole within {REQUEST_TIMEOUT:g} s"))
        assert reply.body is not None
        transport = self._transport
        self._closing = True
        if transport is None or transport.is_closing():
            return
        transport.write(_head_bytes(reply.status, reply.reason, reply.headers,
                                    f"Content-Length: {len(reply.body)}\r\n"
                                    "Connection: close\r\n", True, date=self._server.date)
                        + reply.body)
        # A lingering close: the client may still be sending, and closing with its bytes
        # unread would reset the connection and lose the answer. Stop writing, read and
        # drop what still comes for a moment, then close.
        self._discarding = True
        self._buffer.clear()
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER, self.close_now)

    def _close_after_writing(self) -> None:
        if self._transport is not None:
            self._transport.close()  # what is written still goes out first

    def close_now(self) -> None:
        """Close the connection (what is already written still goes out)."""
        self._closing = True
        self._close_after_writing()


class FastServer(web.Server):
    """aiohttp's low-level server, whose connections start in the fast lane."""

    def __init__(self, base: web.Server, *, proxy: Proxy, tracker: Tracker,
                 max_body: int) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation,
                         loop=base._loop, **base._kwargs)
        self.proxy = proxy
        self.tracker = tracker
        self.max_body = max_body
        self.loop = base._loop
        self.date = HttpDate()
        self.served = 0  # calls the fast lane served itself
        self.handed_off = 0  # connections it gave to aiohttp
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> FastLane:  # type: ignore[override]
        return FastLane(self)

    def aiohttp_handler(self) -> RequestHandler:
        """A request handler of aiohttp's own, for a connection the fast lane hands over."""
        return super().__call__()

    def register(self, lane: FastLane, transport: asyncio.Transport) -> None:
        """Count a fast-lane connection among the server's (for shutdown)."""
        self._connections[cast(Any, lane)] = transport
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_sweep_every(), self._sweep)

    def _sweep(self) -> None:
        """Check every fast-lane connection for idleness and slow requests (one timer for all)."""
        self._sweeper = None
        now = self.loop.time()
        connections: list[object] = list(self._connections)
        lanes = [conn for conn in connections if isinstance(conn, FastLane)]
        for lane in lanes:
            lane.tick(now)
        if any(isinstance(conn, FastLane) for conn in self._connections):
            self._sweeper = self.loop.call_later(_sweep_every(), self._sweep)

    def unregister(self, lane: FastLane) -> None:
        """Forget a connection that closed or was handed over."""
        self._connections.pop(cast(Any, lane), None)


def _sweep_every() -> float:
    return min(1.0, CLIENT_IDLE_TIMEOUT / 4, REQUEST_TIMEOUT / 4)


def _names_used(function: object) -> set[str]:
    """The attribute and global names a function's code (and code nested in it) refers to."""
    code = getattr(function, "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    names: set[str] = set()
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return names


def _set_by_init(cls: type[object], name: str) -> bool:
    """Whether some ``__init__`` in the class's MRO assigns (or at least names) ``name``."""
    return any(name in _names_used(vars(base).get("__init__")) for base in cls.__mro__)


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("a probe server serves nothing")  # pragma: no cover


# The switch ``no_resend`` turns off: aiohttp's client sends an idempotent request again when a
# kept-alive connection turns out dead, unless a session's ``_retry_connection`` is false.
RESEND_SWITCH = "_retry_connection"


def missing_client_internals(session: type[object] = aiohttp.ClientSession) -> list[str]:
    """Name what ``no_resend`` needs of aiohttp's client and this aiohttp lacks."""
    reads = _names_used(getattr(session, "_request", None))
    if RESEND_SWITCH in reads and _set_by_init(session, RESEND_SWITCH):
        return []
    return [f"{session.__name__}.{RESEND_SWITCH}"]


def missing_internals(
    server: type[web.Server] = web.Server,
    runner: type[web.AppRunner] = web.AppRunner,
    handler: type[asyncio.BaseProtocol] = RequestHandler,
    session: type[object] = aiohttp.ClientSession,
) -> list[str]:
    """Name each part of aiohttp outside its public API that the fast lane or ``no_resend``
    relies on and that this aiohttp lacks (or uses differently); empty when all are there.

    Call it with the event loop running: a ``server`` is built (never served) to see what its
    ``__init__`` sets. The classes are parameters so that a test can pass one lacking a part.
    """
    missing: list[str] = []
    name = server.__name__
    # ProxyRunner builds its FastServer by overriding the runner's _make_server, which
    # setup() must call.
    if not (inspect.iscoroutinefunction(getattr(runner, "_make_server", None))
            and "_make_server" in _names_used(getattr(runner, "setup", None))):
        missing.append(f"{runner.__name__}._make_server (called by setup)")
    # A FastServer is built from the Server aiohttp made (its loop and handler arguments) and
    # counts its lanes among the Server's connections.
    try:
        probe: Any = server(_never_called)
    except Exception:  # whatever breaks, the lane cannot copy this server
        missing.append(f"{name}(handler)")
    else:
        for attribute, fits in (
            ("_loop", lambda value: value is asyncio.get_running_loop()),
            ("_kwargs", lambda value: isinstance(value, dict)),
            ("_connections", lambda value: isinstance(value, dict)),
            ("request_handler", lambda value: value is _never_called),
            ("request_factory", callable),
            ("handler_cancellation", lambda value: isinstance(value, bool)),
        ):
            if not hasattr(probe, attribute) or not fits(getattr(probe, attribute)):
                missing.append(f"{name}.{attribute}")
    # At shutdown the Server calls close() and shutdown(timeout) on each of its _connections,
    # which a FastLane answers as aiohttp's RequestHandler does.
    for method, call in (("pre_shutdown", "close"), ("shutdown", "shutdown")):
        used = _names_used(getattr(server, method, None))
        if "_connections" not in used or call not in used:
            missing.append(f"{name}.{method} (calling {call}() on each of _connections)")
    # A connection handed over is given to a RequestHandler with connection_made(), then the
    # bytes already read with data_received() and an EOF with eof_received().
    for method in ("connection_made", "data_received", "eof_received"):
        asyncio_defaults = [getattr(protocol, method, None) for protocol in
                            (asyncio.BaseProtocol, asyncio.Protocol, asyncio.BufferedProtocol)]
        if getattr(handler, method, None) in (None, *asyncio_defaults):
            missing.append(f"{handler.__name__}.{method}")
    missing.extend(missing_client_internals(session))
    return missing


class ProxyRunner(web.AppRunner):
    """An AppRunner whose server puts connections in the fast lane first.

    With ``fast_lane`` false, or when ``checker`` (``missing_internals``) names something
    missing at ``setup()``, it is a plain AppRunner: aiohttp serves every request.
    """

    def __init__(self, app: web.Application,
                 lane: Callable[[web.Application], tuple[Proxy, Tracker, int]], *,
                 fast_lane: bool = True, checker: Callable[[], list[str]] = missing_internals,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._lane = lane
        self._checker = checker
        self.fast_lane = fast_lane  # whether connections start in the lane (known after setup)

    async def setup(self) -> None:
        if self.fast_lane:
            missing = self._checker()
            if missing:
                log.warning("fast_lane_unavailable", missing=missing,
                            aiohttp=aiohttp.__version__,
                            serving="every request through aiohttp (correct, slower)")
                self.fast_lane = False
        await super().setup()

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        if not self.fast_lane:
            return base
        proxy, tracker, max_body = self._lane(self.app)
        return FastServer(base, proxy=proxy, tracker=tracker, max_body=max_body)
