"""A lean HTTP/1.1 client for the portal: kept-alive connections, no resends, nothing decoded.

This module keeps the pool; one connection and the answer read on it are ``portalwire``'s.

The proxy's hot path spent about a third of its time in aiohttp's client, which does far more
than relaying a REST call needs (cookies, redirects, proxies, tracing, automatic headers,
decompression). This client does only that: it writes the request in one go on a pooled
connection, parses the answer with httptools (llhttp, Node.js's parser, from the uvloop
authors) and hands the body over whole or in chunks with flow control.

Rules it keeps:

- A request is never sent twice: a connection that breaks is an error for the caller, who
  knows whether the call may be repeated (a REST GET such as ``crm.lead.add?...`` may not).
- One deadline covers connecting, sending, the headers and the whole body. Calls in flight
  are checked every SWEEP seconds (one timer for all, not one per call), so a call that
  times out is cut within SWEEP of its deadline.
- A connection goes back to the pool only after a complete, kept-alive answer; anything odd
  (a timeout, a parse error, bytes nobody asked for, a caller who stopped reading) closes it.
- Error messages name what went wrong, never the address: the target carries the token.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field

from yarl import URL

from sidecar.portalwire import Connection, PortalConnectionError, Response, why

# A pooled connection to the portal idle this long is closed rather than reused: the portal's
# server may be about to drop it (nginx's default is 75 s).
POOL_IDLE_TIMEOUT = 15.0
# How often calls in flight are checked against their deadlines.
SWEEP = 0.05


class BadHeader(ValueError):
    """A header name or value would break the request's framing."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where calls go: scheme, host and port, and the REST base path."""

    scheme: str
    host: str
    port: int
    host_header: str
    base_path: str
    key: tuple[str, str, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.scheme, self.host, self.port))

    @classmethod
    def parse(cls, base: str) -> Origin:
        """Split a REST base such as ``https://corp.bitrix24.com/rest/``."""
        url = URL(base)
        if url.scheme not in ("http", "https") or not url.host or url.port is None:
            raise ValueError(f"not an http(s) address: {base!r}")
        path = url.raw_path if url.raw_path.endswith("/") else url.raw_path + "/"
        return cls(url.scheme, url.host, url.port, url.host_port_subcomponent or url.host,
                   path)


class Pool:
    """Kept-alive connections to the portal, at most ``limit`` open at once."""

    def __init__(self, *, limit: int = 256, keepalive: float = POOL_IDLE_TIMEOUT,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._limit = limit
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], deque[Connection]] = {}
        self._open: set[Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._watched: set[Response] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.connections_made = 0

    @property
    def limit(self) -> int:
        """The most connections open at once."""
        return self._limit

    def counts(self) -> tuple[int, int]:
        """Connections open now: idle, and in use."""
        idle = sum(len(conns) for conns in self._idle.values())
        return idle, len(self._open) - idle

    async def request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: list[tuple[str, str]],
        *,
        body: bytes | None,
        time_limit: float,
    ) -> Response:
        """Send one request; return once the answer's headers are in.

        ``target`` is the raw path and query; ``body`` None sends no Content-Length;
        ``time_limit`` covers everything up to the body's last byte.
        The caller must ``release()`` the response. Raises TimeoutError or
        PortalConnectionError; BadHeader when a header would break the request's framing.
        """
        head = _head(method, target, origin.host_header, headers, body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + time_limit
        conn = await self._acquire(origin, deadline, loop)
        response = Response(conn, loop, deadline)
        conn.response = response
        assert conn.transport is not None
        if body:
            conn.transport.writelines((head, body))
        else:
            conn.transport.write(head)
        try:
            await response._head
        except BaseException:
            response.close()
            raise
        return response

    def watch(self, response: Response) -> None:
        """Hold a call in flight to its deadline."""
        self._watched.add(response)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def unwatch(self, response: Response) -> None:
        """A call is complete (or failed): its deadline no longer matters."""
        self._watched.discard(response)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for response in [r for r in self._watched if r.deadline <= now]:
            response.on_timeout()
        if self._watched:
            self._sweeper = loop.call_later(SWEEP, self._sweep)

    def put_idle(self, conn: Connection) -> None:
        """Keep a connection whose answer is complete for the next call."""
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.key, deque()).append(conn)
        self._notify()

    def forget(self, conn: Connection) -> None:
        """A connection is closing: it no longer counts, and its slot is free."""
        if conn.closed:
            return
        conn.closed = True
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._notify()

    async def close(self) -> None:
        """Close every connection."""
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await asyncio.sleep(0)  # let the transports finish closing

    async def _acquire(self, origin: Origin, deadline: float,
                       loop: asyncio.AbstractEventLoop) -> Connection:
        while True:
            conn = self._take_idle(origin.key, loop.time())
            if conn is not None:
                return conn
            if len(self._open) >= self._limit:
                self._close_other_idle(origin.key)
            if len(self._open) < self._limit:
                return await self._connect(origin, deadline, loop)
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._notify()  # woken just as it gave up: pass the turn on
                else:
                    waiter.cancel()
                raise

    def _take_idle(self, key: tuple[str, str, int], now: float) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: least likely to be dropped by the server
            transport = conn.transport
            if (conn.closed or transport is None or transport.is_closing()
                    or now - conn.idle_since > self._keepalive):
                conn.close()
                continue
            return conn
        return None

    def _close_other_idle(self, key: tuple[str, str, int]) -> None:
        for other, idle in self._idle.items():
            if other != key and idle:
                idle[0].close()
                return

    async def _connect(self, origin: Origin, deadline: float,
                       loop: asyncio.AbstractEventLoop) -> Connection:
        conn = Connection(self, origin.key)
        self._open.add(conn)
        context = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: conn, origin.host, origin.port,
                                             ssl=context)
        except TimeoutError:  # an OSError too, but it is the deadline, not the network
            self.forget(conn)
            if conn.transport is not None:
                conn.transport.abort()
            raise
        except OSError as exc:
            self.forget(conn)
            raise PortalConnectionError(f"cannot connect ({why(exc)})") from None
        except BaseException:
            self.forget(conn)
            if conn.transport is not None:
                conn.transport.abort()
            raise
        self.connections_made += 1
        return conn

    def _notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _head(method: str, target: str, host: str, headers: list[tuple[str, str]],
          body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Every line break is one we wrote: a name or value carrying CR or LF would smuggle a
    # header or a second request.
    if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
        raise BadHeader("a header name or value holds a line break")
    return text.encode("utf-8", "surrogateescape")
