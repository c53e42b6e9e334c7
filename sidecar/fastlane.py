"""The proxy listener's fast lane: ordinary REST calls served without aiohttp's server machinery.

aiohttp's request handling (request and response objects, routing, header serialisation) cost
more per call than everything the sidecar itself does. Every connection to the proxy listener
starts here instead. A request whose head is ordinary is parsed with httptools and given to
the proxy core directly:

- ``GET`` or ``POST`` to ``/rest/...`` (or ``/portal/<portal>/rest/...``), HTTP/1.1 or
  HTTP/1.0, one ``Host`` header;
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

The lane's server is a ``DeadlineServer`` (deadlines.py): the lane's connections and the
aiohttp handlers it hands connections to share its connection cap and its once-a-second sweep,
and are held to the same request deadline and idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol, cast

import aiohttp
import structlog
from aiohttp import web

from sidecar.deadlines import (
    LINGER,
    DeadlineHandler,
    DeadlineRunner,
    Deadlines,
    DeadlineServer,
)
from sidecar.errors import SidecarError
from sidecar.lanecheck import missing_internals
from sidecar.laneparse import (
    FAST_BODY,
    MAX_HEAD,
    MAX_LINE,
    METHOD_START,
    NO_BODY,
    PREFIXES,
    HeadFields,
    Parsed,
    bare_line_feed,
    connection_line,
    head_bytes,
    parse_head,
)
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.replies import Reply, error_reply
from sidecar.rules import api_path

# A kept-alive client connection idle SIDECAR_IDLE_TIMEOUT is closed; a request must arrive
# whole (head and body) within SIDECAR_REQUEST_TIMEOUT of its first byte, or it gets a 408
# (slow-drip clients): both are the server's ``deadlines``.
log = structlog.get_logger("sidecar.fastlane")


class Tracker(Protocol):
    """What the fast lane needs of the listener's lifecycle: counting calls in flight."""

    def begin(self) -> None:
        """A call starts."""

    def end(self) -> None:
        """A call ends."""


class _Sink:
    """Streams an answer onto a fast-lane connection, chunked when its length is unknown."""

    def __init__(self, lane: FastLane, parsed: Parsed) -> None:
        self._lane = lane
        self._parsed = parsed
        self._chunked = False
        self._bodiless = False
        self.reusable = True

    async def start(self, status: int, reason: str, headers: list[tuple[str, str]],
                    length: int | None) -> None:
        keep = self._parsed.keep_alive
        if status in NO_BODY:
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
        framing += connection_line(keep, self._parsed.version11)
        self.reusable = keep
        await self._lane.send(head_bytes(status, reason, headers, framing,
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


class FastLane(asyncio.Protocol):
    """One client connection to the proxy listener."""

    def __init__(self, server: FastServer) -> None:
        self._server = server
        self._loop = server.loop
        self.date = server.date
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._parsed: Parsed | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # no request after the one in flight
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._last_active = 0.0
        self._admitted = False  # counted among the server's open connections
        self._started: float | None = None  # when the request being read began to arrive
        self._discarding = False  # answered and closing: what still arrives is dropped
        self._head: HeadFields | None = None  # the parser, kept between requests without a body
        # How far the head being read has been examined (its request line's end, once found):
        # each packet's search resumes there, so a head sent a byte at a time is read in
        # linear time, not scanned whole for every byte.
        self._scanned = 0
        self._line_end = -1
        self._prechecked = False  # the head of the request being read passed Proxy.precheck
        self._peer = ""  # the client's address, read once per connection

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admit(self):
            self._closing = self._discarding = True  # one too many: closed, nothing read
            transport.close()
            return
        self._admitted = True
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
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
        if self._admitted:
            self._admitted = False
            self._server.release(self)
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
            if buffer[0] not in METHOD_START:
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
                if len(buffer) >= MAX_HEAD or bare_line_feed(buffer, scanned):
                    self._hand_off()  # too long, or a bare LF that may end the head for aiohttp
                    return
                self._scanned = len(buffer)
                return
            self._scanned = 0  # the next head starts afresh at the start of the buffer
            self._line_end = -1
            if not buffer.startswith(PREFIXES):
                self._hand_off()
                return
            collected = self._head or HeadFields()
            parsed = parse_head(collected, bytes(buffer[:end + 4]), self._server.max_body,
                                self._transport, self._peer)
            if parsed is None:
                self._hand_off()
                return
            # A head with no body leaves the parser ready for the next request; after a
            # body it would wait for that body, so the next request gets a fresh parser.
            self._head = collected if parsed.length == 0 else None
            self._parsed = parsed
        total = parsed.head_length + parsed.length
        if len(buffer) < total:
            # The body is still coming. What the head alone decides is decided now: a caller
            # without the key, or a foreign page, holds no body here while it drips.
            if not self._prechecked:
                self._prechecked = True
                try:
                    self._server.proxy.precheck(parsed.call)
                except SidecarError as exc:
                    self._refuse(exc, parsed.call.raw_path)
            return
        self._prechecked = False
        parsed.call.payload = bytes(buffer[parsed.head_length:total])
        del buffer[:total]
        self._parsed = None
        self._started = None
        self._task = self._loop.create_task(self._serve(parsed))

    async def _serve(self, parsed: Parsed) -> None:
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
                body = b"" if reply.status in NO_BODY else reply.body
                framing = ("" if reply.status in NO_BODY
                           else f"Content-Length: {len(body)}\r\n")
                framing += connection_line(keep, parsed.version11)
                with contextlib.suppress(ConnectionResetError):  # the client left: fine
                    # Through send(): a client that pipelines and never reads is not
                    # answered faster than it reads.
                    await self.send(head_bytes(reply.status, reply.reason, reply.headers,
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
        # The handler keeps this connection's place under the cap, and its request's deadline.
        handler.adopt(self._started)
        self._server.swap(self, handler)
        self._admitted = False
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
        deadlines = self._server.deadlines
        if self._started is not None:
            if now - self._started >= deadlines.request_timeout:
                self._too_slow(now - self._started)
        elif now - self._last_active >= deadlines.idle_timeout:
            self.close_now()

    def _too_slow(self, seconds: float) -> None:
        self._server.too_slow(seconds, len(self._buffer))
        # A head already read names the path: a REST 3.0 call is answered in its shape.
        parsed = self._parsed
        self._answer_and_close(self._server.timeout_reply(
            api=parsed is not None and api_path(parsed.call.raw_path)))

    def _refuse(self, exc: SidecarError, raw_path: str = "") -> None:
        """Answer a request refused on its head alone, and close (its body is not read)."""
        reply = error_reply(exc, api=api_path(raw_path))
        assert reply.body is not None
        log.info("refused_before_body", error=exc.code, status=reply.status)
        self._answer_and_close(head_bytes(
            reply.status, reply.reason, reply.headers,
            f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n", True,
            date=self._server.date) + reply.body)

    def _answer_and_close(self, answer: bytes) -> None:
        transport = self._transport
        self._closing = True
        self._parsed = None
        if transport is None or transport.is_closing():
            return
        transport.write(answer)
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


class FastServer(DeadlineServer):
    """aiohttp's low-level server, whose connections start in the fast lane."""

    def __init__(self, base: web.Server, *, proxy: Proxy, tracker: Tracker,
                 max_body: int, deadlines: Deadlines | None = None,
                 metrics: Metrics | None = None) -> None:
        super().__init__(base, deadlines=deadlines or Deadlines(), listener="proxy",
                         metrics=metrics)
        self.proxy = proxy
        self.tracker = tracker
        self.max_body = max_body
        self.served = 0  # calls the fast lane served itself
        self.handed_off = 0  # connections it gave to aiohttp

    def __call__(self) -> FastLane:  # type: ignore[override]
        return FastLane(self)

    def aiohttp_handler(self) -> DeadlineHandler:
        """A request handler of aiohttp's own, for a connection the fast lane hands over."""
        handler = super().__call__()
        assert isinstance(handler, DeadlineHandler)
        return handler

    def register(self, lane: FastLane, transport: asyncio.Transport) -> None:
        """Count a fast-lane connection among the server's (for shutdown)."""
        self._connections[cast(Any, lane)] = transport

    def unregister(self, lane: FastLane) -> None:
        """Forget a connection that closed or was handed over."""
        self._connections.pop(cast(Any, lane), None)


class ProxyRunner(DeadlineRunner):
    """An AppRunner whose server puts connections in the fast lane first.

    With ``fast_lane`` false, or when ``checker`` (``missing_internals``) names something
    missing at ``setup()``, it is a plain AppRunner: aiohttp serves every request.
    """

    def __init__(self, app: web.Application,
                 lane: Callable[[web.Application], tuple[Proxy, Tracker, int]], *,
                 fast_lane: bool = True, checker: Callable[[], list[str]] = missing_internals,
                 deadlines: Deadlines | None = None, metrics: Metrics | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, deadlines=deadlines or Deadlines(), listener="proxy",
                         metrics=metrics, **kwargs)
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
        if not self.fast_lane:
            return await super()._make_server()
        base = await self.base_server()  # the app starts up here: its proxy exists after
        proxy, tracker, max_body = self._lane(self.app)
        return FastServer(base, proxy=proxy, tracker=tracker, max_body=max_body,
                          deadlines=self.deadlines, metrics=self.metrics)
