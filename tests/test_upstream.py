"""The portal client (sidecar/upstream.py) against real loopback servers, scripted byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from sidecar.portalwire import HIGH_WATER, PortalConnectionError
from sidecar.upstream import BadHeader, Origin, Pool
from tests.conftest import Certificate

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback TCP server that runs ``script`` on every connection and counts them."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await self.script(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def origin(self) -> Origin:
        return Origin.parse(f"http://127.0.0.1:{self.port}/rest/")


async def read_request(reader: asyncio.StreamReader, server: RawServer) -> bytes:
    """Read one request head (and a Content-Length body); record it."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    server.requests.append(head + body)
    return head + body


def answer(body: bytes, *extra: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"".join(extra)
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def keep_answering(*replies: bytes) -> Script:
    """Answer each request on a connection with the next reply (the last one repeats)."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        while True:
            await read_request(reader, server_of[script])
            writer.write(replies[min(index, len(replies) - 1)])
            await writer.drain()
            index += 1
    return script


server_of: dict[Any, RawServer] = {}


@contextlib.asynccontextmanager
async def serving(script: Script) -> AsyncIterator[RawServer]:
    async with RawServer(script) as server:
        server_of[script] = server
        try:
            yield server
        finally:
            del server_of[script]


async def get(pool: Pool, server: RawServer, path: str = "/rest/profile?auth=x", *,
              headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
              time_limit: float = 5.0) -> tuple[int, bytes, Any]:
    response = await pool.request("POST" if body is not None else "GET", server.origin, path,
                                  headers or [], body=body, time_limit=time_limit)
    try:
        return response.status, await response.read(), response.headers
    finally:
        response.release()


class TestKeptAlive:
    async def test_calls_share_one_connection_and_arrive_intact(self) -> None:
        async with serving(keep_answering(answer(b'{"result":1}', b"X-Extra: yes\r\n"))) as srv:
            pool = Pool()
            for n in range(20):
                status, body, headers = await get(
                    pool, srv, f"/rest/crm.lead.get?id={n}&auth=t",
                    headers=[("Authorization", "Bearer t"), ("X-Request-ID", f"r{n}")])
                assert (status, body, headers["X-Extra"]) == (200, b'{"result":1}', "yes")
            assert srv.connections == 1
            assert pool.connections_made == 1
            assert pool.counts() == (1, 0)
            last = srv.requests[-1]
            assert last.startswith(b"GET /rest/crm.lead.get?id=19&auth=t HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in last
            assert b"X-Request-ID: r19\r\n" in last
            assert b"Content-Length" not in last  # a GET without a body says nothing of one
            await pool.close()

    async def test_a_post_body_is_sent_with_its_length(self) -> None:
        async with serving(keep_answering(answer(b"{}"))) as srv:
            pool = Pool()
            await get(pool, srv, body=b"fields[TITLE]=x")
            await get(pool, srv, body=b"")
            assert srv.requests[0].endswith(b"Content-Length: 15\r\n\r\nfields[TITLE]=x")
            assert srv.requests[1].endswith(b"Content-Length: 0\r\n\r\n")
            await pool.close()

    async def test_chunked_answers_are_joined_and_the_connection_kept(self) -> None:
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        async with serving(keep_answering(chunked)) as srv:
            pool = Pool()
            assert (await get(pool, srv))[:2] == (200, b"hello world")
            assert (await get(pool, srv))[:2] == (200, b"hello world")
            assert srv.connections == 1
            await pool.close()

    async def test_an_answer_until_close_is_read_whole_and_the_connection_not_reused(
        self,
    ) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
            await writer.drain()
        async with serving(script) as srv:
            pool = Pool()
            assert (await get(pool, srv))[:2] == (200, b"all of it")
            assert (await get(pool, srv))[:2] == (200, b"all of it")
            assert srv.connections == 2
            await pool.close()

    async def test_an_interim_100_continue_is_skipped(self) -> None:
        async with serving(keep_answering(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"ok"))) \
                as srv:
            pool = Pool()
            assert (await get(pool, srv))[:2] == (200, b"ok")
            await pool.close()

    async def test_connection_close_is_obeyed(self) -> None:
        async with serving(keep_answering(answer(b"ok", b"Connection: close\r\n"))) as srv:
            pool = Pool()
            for _ in range(3):
                assert (await get(pool, srv))[:2] == (200, b"ok")
            assert srv.connections == 3
            await pool.close()

    async def test_an_idle_connection_past_its_keepalive_is_not_reused(self) -> None:
        async with serving(keep_answering(answer(b"ok"))) as srv:
            pool = Pool(keepalive=0.05)
            await get(pool, srv)
            await asyncio.sleep(0.1)
            await get(pool, srv)
            assert srv.connections == 2
            await pool.close()

    async def test_a_connection_the_server_dropped_while_idle_is_not_reused(self) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
            writer.write(answer(b"ok"))  # keep-alive promised, then dropped
            await writer.drain()
        async with serving(script) as srv:
            pool = Pool()
            await get(pool, srv)
            await asyncio.sleep(0.05)
            assert (await get(pool, srv))[:2] == (200, b"ok")
            assert srv.connections == 2
            await pool.close()

    async def test_bytes_nobody_asked_for_close_the_connection(self) -> None:
        async with serving(keep_answering(answer(b"ok") + answer(b"surprise"))) as srv:
            pool = Pool()
            assert (await get(pool, srv))[:2] == (200, b"ok")
            assert (await get(pool, srv))[:2] == (200, b"ok")
            assert srv.connections == 2
            await pool.close()


class TestBroken:
    async def test_refused_connection(self) -> None:
        async with serving(keep_answering(b"")) as srv:
            port = srv.port
        pool = Pool()
        with pytest.raises(PortalConnectionError, match=r"cannot connect \(Connect"):
            await pool.request("GET", Origin.parse(f"http://127.0.0.1:{port}/rest/"),
                               "/rest/x", [], body=None, time_limit=5)
        assert pool.counts() == (0, 0)

    async def test_a_connect_that_hangs_is_a_timeout(self) -> None:
        """The deadline, not the network: a TimeoutError (a 504 for the client), not a 502."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue: further SYNs are dropped, connects hang
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        pool = Pool()
        try:
            with pytest.raises(TimeoutError):
                await pool.request("GET", Origin.parse(f"http://127.0.0.1:{port}/rest/"),
                                   "/rest/x", [], body=None, time_limit=0.5)
            assert pool.counts() == (0, 0)
        finally:
            for filler in fillers:
                filler.close()
            listener.close()

    async def test_closed_before_answering(self) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
        async with serving(script) as srv:
            pool = Pool()
            with pytest.raises(PortalConnectionError, match="before answering"):
                await get(pool, srv)
            assert pool.counts() == (0, 0)

    async def test_closed_in_the_middle_of_the_body(self) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
            await writer.drain()
        async with serving(script) as srv:
            pool = Pool()
            response = await pool.request("GET", srv.origin, "/rest/x", [], body=None,
                                          time_limit=5)
            with pytest.raises(PortalConnectionError, match="in the middle of its answer"):
                await response.read()
            response.release()
            assert pool.counts() == (0, 0)

    async def test_not_http_at_all(self) -> None:
        async with serving(keep_answering(b"<html>hello</html>\r\n\r\n")) as srv:
            pool = Pool()
            with pytest.raises(PortalConnectionError, match="not valid HTTP"):
                await get(pool, srv)
            assert pool.counts() == (0, 0)

    async def test_a_silent_server_times_out_and_frees_the_slot(self) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
            await asyncio.sleep(10)
        async with serving(script) as srv:
            pool = Pool()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await get(pool, srv, time_limit=0.3)
            assert 0.25 < time.monotonic() - started < 2
            assert pool.counts() == (0, 0)

    async def test_the_deadline_covers_a_body_that_trickles(self) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(1000):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.01)
        async with serving(script) as srv:
            pool = Pool()
            response = await pool.request("GET", srv.origin, "/rest/x", [], body=None,
                                          time_limit=0.3)
            with pytest.raises(TimeoutError):
                await response.read()
            response.release()
            assert pool.counts() == (0, 0)

    async def test_a_header_with_a_line_break_is_refused_before_connecting(self) -> None:
        async with serving(keep_answering(answer(b"ok"))) as srv:
            pool = Pool()
            for bad in (("X-A", "1\r\nX-Smuggled: 1"), ("X-A\nB", "1"), ("X-A", "1\r")):
                with pytest.raises(BadHeader):
                    await get(pool, srv, headers=[bad])
            assert srv.connections == 0

    async def test_a_cancelled_call_drops_its_connection(self) -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader, server_of[script])
            await asyncio.sleep(10)
        async with serving(script) as srv:
            pool = Pool()
            task = asyncio.ensure_future(get(pool, srv))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.counts() == (0, 0)

    async def test_an_unread_answer_is_not_pooled(self) -> None:
        async with serving(keep_answering(answer(b"x" * 8_000_000))) as srv:
            pool = Pool()
            response = await pool.request("GET", srv.origin, "/rest/x", [], body=None,
                                          time_limit=5)
            response.release()  # body never read: the connection cannot be trusted
            await get(pool, srv)
            assert srv.connections == 2
            await pool.close()


class TestLimits:
    async def test_no_more_connections_than_the_limit(self) -> None:
        active = peak = 0

        async def slow(request: web.Request) -> web.Response:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.05)
            active -= 1
            return web.Response(body=b"ok")

        app = web.Application()
        app.router.add_get("/rest/{m}", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        pool = Pool(limit=3)
        origin = Origin.parse(f"http://127.0.0.1:{port}/rest/")

        async def call() -> bytes:
            response = await pool.request("GET", origin, "/rest/x", [], body=None, time_limit=5)
            try:
                return await response.read()
            finally:
                response.release()

        try:
            assert await asyncio.gather(*(call() for _ in range(12))) == [b"ok"] * 12
            assert peak == 3
            assert pool.connections_made == 3
        finally:
            await pool.close()
            await runner.cleanup()

    async def test_a_streamed_body_is_read_no_faster_than_it_is_consumed(self) -> None:
        size = 8 * 1024 * 1024
        async with serving(keep_answering(answer(b"y" * size))) as srv:
            pool = Pool()
            response = await pool.request("GET", srv.origin, "/rest/x", [], body=None,
                                          time_limit=30)
            total = biggest = 0
            while chunk := await response.next_chunk():
                total += len(chunk)
                biggest = max(biggest, len(chunk))
                await asyncio.sleep(0.002)  # a slow client
            response.release()
            assert total == size
            # Reading pauses past the high-water mark; at most one socket read more arrives.
            assert biggest <= HIGH_WATER + 256 * 1024
            assert pool.counts() == (1, 0)  # complete: the connection is reused
            await pool.close()


class TestTLS:
    async def test_an_untrusted_certificate_is_refused_and_a_trusted_one_works(
        self, certificate: Certificate
    ) -> None:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(certificate.cert, certificate.key)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(b"secure"))
                await writer.drain()
                await reader.read()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        origin = Origin.parse(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/rest/")
        try:
            with pytest.raises(PortalConnectionError, match="TLS certificate not trusted"):
                await Pool().request("GET", origin, "/rest/x", [], body=None, time_limit=5)
            trusting = ssl.create_default_context(cafile=str(certificate.cert))
            pool = Pool(ssl_context=trusting)
            response = await pool.request("GET", origin, "/rest/x", [], body=None, time_limit=5)
            assert await response.read() == b"secure"
            response.release()
            await pool.close()
        finally:
            server.close()


class TestOrigin:
    @pytest.mark.parametrize(("base", "expected"), [
        ("https://corp.bitrix24.com/rest/", ("https", "corp.bitrix24.com", 443,
                                             "corp.bitrix24.com", "/rest/")),
        ("http://127.0.0.1:9000/rest", ("http", "127.0.0.1", 9000, "127.0.0.1:9000", "/rest/")),
        ("http://[::1]:8000/rest/", ("http", "::1", 8000, "[::1]:8000", "/rest/")),
    ])
    def test_parse(self, base: str, expected: tuple[Any, ...]) -> None:
        origin = Origin.parse(base)
        assert (origin.scheme, origin.host, origin.port, origin.host_header,
                origin.base_path) == expected

    @pytest.mark.parametrize("base", ["ftp://x/rest/", "/rest/", "https:///rest/"])
    def test_not_http(self, base: str) -> None:
        with pytest.raises(ValueError, match="not an http"):
            Origin.parse(base)
