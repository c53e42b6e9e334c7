"""One connection to the portal and the answer read on it: httptools' callbacks fill a
``Response``, which hands the body over whole or in chunks with flow control, and gives the
connection back to its pool only after a complete, kept-alive answer."""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict

# A streamed body stops being read from the portal while this much waits for the client.
HIGH_WATER = 256 * 1024


class PortalConnectionError(Exception):
    """The portal could not be reached, or broke the connection before answering in full."""


class Owner(Protocol):
    """What a connection and its answer need of the pool that made them."""

    def watch(self, response: Response) -> None:
        """Check the answer against its deadline until it ends."""

    def unwatch(self, response: Response) -> None:
        """Stop checking the answer."""

    def put_idle(self, conn: Connection) -> None:
        """Take the connection back for reuse."""

    def forget(self, conn: Connection) -> None:
        """The connection is closed: stop counting it."""


class Response:
    """One answer from the portal; the parser's callbacks fill it as bytes arrive."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop,
                 deadline: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self._conn: Connection | None = conn
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._raw: list[tuple[bytes, bytes]] = []
        self._status_line = b""
        self._head: asyncio.Future[None] = loop.create_future()
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._interim = False
        self._until_close = False
        self._streaming = False
        self._paused = False
        self._error: BaseException | None = None
        self.deadline = deadline
        self._pool = conn.pool
        conn.pool.watch(self)

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters."""
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer nobody asked for: the connection is not reused
            self._keep_alive = False

    def on_status(self, status: bytes) -> None:
        self._status_line += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        status = self._parser.get_status_code()
        if status < 200:  # 100 Continue and friends: the real answer follows
            self._interim = True
            self._raw.clear()
            self._status_line = b""
            return
        headers = self.headers
        for name, value in self._raw:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        self._raw.clear()
        self.status = status
        self.reason = self._status_line.decode("latin-1")
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self._until_close = (
            length is None
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        )
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._streaming and self._buffered > HIGH_WATER and not self._paused:
            conn = self._conn
            if conn is not None and conn.transport is not None:
                self._paused = True
                conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._complete:
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._pool.unwatch(self)
        self._wake()

    # -- events from the connection -------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(PortalConnectionError(f"the portal's answer is not valid HTTP ({exc})"))
            self.close()

    def _eof(self, exc: BaseException | None) -> None:
        if self._complete:
            return
        if self._head.done() and self._until_close and exc is None:
            self._complete = True  # the body ran until the connection closed
            self._pool.unwatch(self)
            self._wake()
            return
        reason = f" ({why(exc)})" if exc is not None else ""
        where = "in the middle of its answer" if self._head.done() else "before answering"
        self._fail(PortalConnectionError(f"the portal closed the connection {where}{reason}"))

    def on_timeout(self) -> None:
        """The deadline passed: fail the call and drop its connection."""
        if not self._complete:
            self._fail(TimeoutError())
            self.close()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._pool.unwatch(self)
        if not self._head.done():
            self._head.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    # -- what the caller uses -------------------------------------------------------------

    async def read(self) -> bytes:
        """Return the whole body."""
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def next_chunk(self) -> bytes:
        """Return the next piece of the body (what has arrived, joined); ``b""`` at its end."""
        self._streaming = True
        while not self._chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunk = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            conn = self._conn
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()
        return chunk

    def release(self) -> None:
        """Give the connection back (a complete kept-alive answer) or close it."""
        conn = self._conn
        if conn is None:
            return
        self._pool.unwatch(self)
        self._conn = None
        conn.response = None
        if self._complete and self._keep_alive and self._error is None and not conn.closed:
            if self._paused and conn.transport is not None:
                conn.transport.resume_reading()
            conn.pool.put_idle(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection whatever state the answer is in."""
        conn = self._conn
        self._pool.unwatch(self)
        if conn is not None:
            self._conn = None
            conn.response = None
            conn.close()


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the portal."""

    def __init__(self, pool: Owner, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes on an idle connection: nothing sane to do but drop it
            self.close()
            return
        response._feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        response = self.response
        if response is not None:
            self.response = None
            response._eof(exc)

    def close(self) -> None:
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


def why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
