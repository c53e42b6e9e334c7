"""Deadlines and a connection cap for every listener, whichever server reads the request.

The fast lane (fastlane.py) holds its own connections to a deadline: a request must arrive
whole within ``request_timeout`` of its first byte, or it gets a 408 and the connection closes.
aiohttp's own server has no such deadline (a head or a body may drip for ever) and, in 3.14,
closes an idle kept-alive connection only after an hour. Everything aiohttp serves here (the
admin and OAuth listeners, the proxy listener with ``SIDECAR_FAST_LANE=off``, and what the fast
lane hands over) is served by a ``DeadlineServer`` instead, whose connections are
``DeadlineHandler``s:

- each records when its current request's first byte arrived (a handed-over connection keeps
  the time the lane saw it);
- one sweep a second per server looks at them all: a head still incomplete past the deadline
  is answered 408 (Bitrix shape, ``Connection: close``) and the connection closed; a body
  still incomplete past it has ``BodyOverdue`` set on its stream, so whichever handler is
  reading it (``AiohttpCall.body``, ``request.post()``) stops at once and answers 408;
- an idle kept-alive connection is closed after ``idle_timeout`` (aiohttp's keep-alive timer);
- past ``max_connections`` open connections, a new one is closed at once and counted.

The server owns the cap and the sweep for the lane's connections too (``FastServer`` is one).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    InternalError,
    RequestTimeout,
    SidecarError,
)
from sidecar.lanecheck import missing_deadline_internals
from sidecar.laneparse import HttpDate, head_bytes
from sidecar.replies import error_reply

if TYPE_CHECKING:
    from sidecar.config import Settings
    from sidecar.metrics import Metrics

# A connection answered 408 keeps reading (and dropping) what still arrives this long before it
# closes: closing with the client's bytes unread would reset it and lose the answer.
LINGER = 2.0
# A body past its deadline has been told to stop; a connection still open this much later
# (a handler that never reads its body) is closed without an answer.
BACKSTOP = 5.0
# After this many connections closed since the most open (and half of them gone), the
# allocator is asked to give freed memory back to the system (see DeadlineServer._trim).
TRIM_AFTER = 128
# What aiohttp's own server answers, in the sidecar's words.
_PROTOCOL_ERRORS: dict[int, type[SidecarError]] = {
    400: BadRequest, 413: BodyTooLarge, 500: InternalError,
}
_PROTOCOL_TEXT = {
    400: "the request is not valid HTTP/1.1 and was not read",
    413: "the request is too large",
    500: "the sidecar failed unexpectedly; its log has the details",
}
log = structlog.get_logger("sidecar.deadlines")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class BodyOverdue(TimeoutError):
    """A request body did not arrive whole within the request deadline."""


@dataclass(frozen=True, slots=True)
class Deadlines:
    """How long a request may take to arrive, a connection may idle, and how many may be open."""

    request_timeout: float = 60.0
    idle_timeout: float = 75.0
    max_connections: int = 1024

    @classmethod
    def of(cls, settings: Settings) -> Deadlines:
        """Take the deadlines from the settings."""
        return cls(settings.request_timeout, settings.idle_timeout, settings.max_connections)

    @property
    def sweep_every(self) -> float:
        """How often the connections are looked at."""
        return min(1.0, self.idle_timeout / 4, self.request_timeout / 4)


class Swept(Protocol):
    """A connection the server's sweep looks at."""

    def tick(self, now: float) -> None:
        """Act on a deadline that has passed."""


class DeadlineServer(web.Server):
    """aiohttp's low-level server, whose connections keep the deadlines and the cap."""

    def __init__(self, base: web.Server, *, deadlines: Deadlines, listener: str,
                 metrics: Metrics | None = None) -> None:
        # After an answer that left a body unread (a refusal on the head), aiohttp reads and
        # drops the rest before closing: for LINGER, as the lane does, not its default 10 s.
        kwargs = {**base._kwargs, "keepalive_timeout": deadlines.idle_timeout,
                  "lingering_time": LINGER}
        super().__init__(_tracked(base.request_handler), request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation, loop=base._loop,
                         **kwargs)
        self.loop = base._loop
        self.deadlines = deadlines
        self.listener = listener
        self.date = HttpDate()
        self.open = 0  # connections admitted and not yet lost
        self.refused = 0  # connections closed at once, over the cap
        self.timed_out = 0  # requests that did not arrive in time
        self._live: dict[Swept, None] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._most = 0  # the most connections open since the last trim
        self._trimmer: asyncio.TimerHandle | None = None
        self._malloc_trim = malloc_trim()
        self._refused_metric: Any = None
        self._timeout_metric: Any = None
        if metrics is not None:
            self._refused_metric = metrics.connections_refused.labels(listener=listener)
            self._timeout_metric = metrics.request_timeouts.labels(listener=listener)
            metrics.connections_open.labels(listener=listener).set_function(lambda: self.open)

    def __call__(self) -> RequestHandler:
        return DeadlineHandler(self, loop=self.loop, **self._kwargs)

    def admit(self, connection: Swept) -> bool:
        """Count a new connection in, or say it is one too many (counted as refused)."""
        if self.open >= self.deadlines.max_connections:
            self.refused += 1
            if self._refused_metric is not None:
                self._refused_metric.inc()
            return False
        self.open += 1
        self._most = max(self._most, self.open)
        self._live[connection] = None
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.deadlines.sweep_every, self._sweep)
        return True

    def swap(self, old: Swept, new: Swept) -> None:
        """Sweep ``new`` instead of ``old`` (a connection the fast lane handed over)."""
        self._live.pop(old, None)
        self._live[new] = None

    def release(self, connection: Swept) -> None:
        """Count a connection out."""
        if self._live.pop(connection, 0) is None:
            self.open -= 1
            if (self._most - self.open >= TRIM_AFTER and self.open <= self._most // 2
                    and self._trimmer is None):
                self._trimmer = self.loop.call_later(1.0, self._trim)

    def _trim(self) -> None:
        """Give the memory of many closed connections back to the system.

        Their buffers (a form body held by each of a thousand dripping clients, say) are freed,
        but glibc keeps freed memory for reuse: the process would stay at its high-water mark
        for good. A flood of connections is rare; one trim after it costs a few milliseconds.
        """
        self._trimmer = None
        self._most = self.open
        if self._malloc_trim is not None:
            self._malloc_trim(0)

    def too_slow(self, seconds: float, received: int | None = None) -> None:
        """Count and log a request that did not arrive within the deadline."""
        self.timed_out += 1
        if self._timeout_metric is not None:
            self._timeout_metric.inc()
        log.info("request_too_slow", listener=self.listener, seconds=round(seconds, 1),
                 received=received)

    def timeout_reply(self, *, api: bool = False) -> bytes:
        """The whole 408 answer, in Bitrix's shape (``api``: REST 3.0's), closing the
        connection."""
        reply = error_reply(RequestTimeout(self.timeout_text), api=api)
        assert reply.body is not None
        return head_bytes(reply.status, reply.reason, reply.headers,
                          f"Content-Length: {len(reply.body)}\r\nConnection: close\r\n", True,
                          date=self.date) + reply.body

    @property
    def timeout_text(self) -> str:
        """What a 408 says."""
        return (f"the request did not arrive whole within "
                f"{self.deadlines.request_timeout:g} s")

    def _sweep(self) -> None:
        """Look at every connection for deadlines passed (one timer for all)."""
        self._sweeper = None
        now = self.loop.time()
        for connection in list(self._live):
            connection.tick(now)
        if self._live:
            self._sweeper = self.loop.call_later(self.deadlines.sweep_every, self._sweep)

    def stop_sweeping(self) -> None:
        """Cancel the sweep and a trim (the server is being shut down)."""
        for timer in (self._sweeper, self._trimmer):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._trimmer = None

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - aiohttp's
        await super().shutdown(timeout)
        self.stop_sweeping()


def _tracked(handler: Handler) -> Handler:
    """Wrap the application's handler so each connection knows which request it is serving,
    and a body that stopped at its deadline is answered 408 whoever was reading it."""

    async def tracked(request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if not isinstance(protocol, DeadlineHandler):  # pragma: no cover - ours only
            return await handler(request)
        protocol.begin(request)
        try:
            return await handler(request)
        except BodyOverdue as exc:
            # The stream keeps the exception, and its traceback holds the reader's future,
            # which holds the exception: a cycle that would keep the whole connection (its
            # buffers too) alive until a full collection. Dropping the traceback breaks it.
            exc.__traceback__ = None
            assert protocol.server is not None
            reply = error_reply(RequestTimeout(protocol.server.timeout_text))
            response = web.Response(status=reply.status, body=reply.body,
                                    headers=CIMultiDict(reply.headers))
            response.force_close()
            return response
        finally:
            protocol.end()

    return tracked


class DeadlineHandler(RequestHandler):
    """aiohttp's request handler for one connection, held to the request deadline and the cap."""

    __slots__ = ("_admitted", "_next_since", "_overdue", "_unread", "request", "server",
                 "since")


    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer what aiohttp itself refuses (a request its parser cannot read, a crash) in
        Bitrix24's shape, as every other error of the sidecar; the connection closes."""
        plain = super().handle_error(request, status, exc, message)  # its log, its checks
        error = _PROTOCOL_ERRORS.get(status)
        if error is None:
            return plain
        # Named, never quoted: the parser's message may repeat the request's bytes.
        reason = type(exc).__name__ if exc is not None else "unreadable"
        reply = error_reply(error(f"{_PROTOCOL_TEXT[status]} ({reason})"))
        response = web.Response(status=reply.status, body=reply.body,
                                headers=CIMultiDict(reply.headers))
        response.force_close()
        return response
    def __init__(self, manager: DeadlineServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.server: DeadlineServer | None = manager
        self.since: float | None = None  # the first byte of the request being received
        self._next_since: float | None = None  # the next request's, pipelined behind
        self.request: web.BaseRequest | None = None  # the request a handler is serving
        self._unread: Any = None  # a body the last handler left unread (aiohttp drains it)
        self._admitted = False
        self._overdue = False

    def adopt(self, started: float | None) -> None:
        """Take over a connection the fast lane admitted, with its request's first byte."""
        self._admitted = True
        self.since = started

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        assert server is not None
        if not self._admitted:
            if not server.admit(self):
                self.server = None
                self.force_close()  # and read nothing
                transport.close()
                return
            self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self.server
        if server is None:
            return  # refused at once: aiohttp never saw it
        if self._admitted:
            self._admitted = False
            server.release(self)
        self.request = None
        self._unread = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:
            request = self.request
            if request is None:
                # Bytes of a body the last handler left unread are not a new request.
                if self.since is None and (self._unread is None or self._unread.is_eof()):
                    self.since = self._time()
            elif self._next_since is None and request.content.is_eof():
                self._next_since = self._time()  # the request is in; these start the next
        super().data_received(data)

    # -- the request a handler serves -----------------------------------------------------

    def begin(self, request: web.BaseRequest) -> None:
        """A handler starts on ``request``."""
        self.request = request
        if self.since is None:  # it came in one packet behind the last: its time is now
            self.since = self._time()

    def end(self) -> None:
        """The handler is done (aiohttp writes its answer, and drains a body left unread)."""
        request = self.request
        self.request = None
        content = request.content if request is not None else None
        self._unread = None if content is None or content.is_eof() else content
        self.since, self._next_since = self._next_since, None

    # -- the sweep ------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Answer 408 to a head too slow to arrive; stop a body too slow to arrive."""
        since = self.since
        server = self.server
        if since is None or server is None:
            return
        late = now - since - server.deadlines.request_timeout
        if late < 0:
            return
        if self._overdue:
            if late >= BACKSTOP:
                self.force_close()  # told to stop long ago, and still open
            return
        request = self.request
        if request is None:
            # Only while aiohttp waits for a head: not while it writes an answer or drains a
            # body left unread (bounded by its lingering time).
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                self._overdue = True
                self._head_too_slow(server, now - since)
        elif not request.content.is_eof():
            self._overdue = True
            server.too_slow(now - since)
            request.content.set_exception(BodyOverdue(server.timeout_text))

    def _head_too_slow(self, server: DeadlineServer, seconds: float) -> None:
        transport = self.transport
        server.too_slow(seconds)
        if transport is None or transport.is_closing():
            return
        transport.write(server.timeout_reply())
        # A lingering close (as the fast lane does): no further request, what still arrives
        # is dropped, and the connection closes a moment later.
        self.close()
        if transport.can_write_eof():
            transport.write_eof()
        server.loop.call_later(LINGER, self.force_close)

    def _time(self) -> float:
        server = self.server
        return server.loop.time() if server is not None else 0.0


class DeadlineRunner(web.AppRunner):
    """An AppRunner whose server is a ``DeadlineServer`` (the admin and OAuth listeners)."""

    def __init__(self, app: web.Application, *, deadlines: Deadlines, listener: str,
                 metrics: Metrics | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.deadlines = deadlines
        self.listener = listener
        self.metrics = metrics

    async def setup(self) -> None:
        require_deadlines()
        await super().setup()

    async def base_server(self) -> web.Server:
        """The server aiohttp's runner would serve with."""
        return await super()._make_server()

    async def _make_server(self) -> web.Server:
        return DeadlineServer(await self.base_server(), deadlines=self.deadlines,
                              listener=self.listener, metrics=self.metrics)


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


def require_deadlines() -> None:
    """Raise, naming what is missing, unless this aiohttp has what the deadlines stand on."""
    missing = missing_deadline_internals()
    if missing:
        raise SidecarError(
            f"aiohttp {aiohttp.__version__} lacks what the request deadlines need "
            f"(missing: {', '.join(missing)}); without them a client could hold connections "
            "open for ever; install the aiohttp bitrix-sidecar declares",
            code="SIDECAR_UNSUPPORTED_AIOHTTP",
        )


def server_of(runner: web.BaseRunner) -> DeadlineServer | None:
    """The runner's server, if it keeps deadlines."""
    server = runner.server
    return server if isinstance(server, DeadlineServer) else None
