"""The proxy listener's fast lane, over real loopback: what it serves, what it hands to aiohttp."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.fastlane import FastServer
from tests.conftest import CLIENT_ID
from tests.test_operations import until

Client = TestClient[web.Request, web.Application]
HOST = b"Host: 127.0.0.1\r\n"


def server_of(client: Client) -> FastServer:
    server = served_by(client)
    assert isinstance(server, FastServer)
    return server


def served_by(client: Client) -> web.Server:
    runner = client.server.runner
    assert runner is not None
    server = runner.server
    assert server is not None
    return server


def lane(client: Client, fast_lane: bool) -> FastServer | None:
    """The FastServer when the test runs with the lane; None (checked) when it runs without."""
    if fast_lane:
        return server_of(client)
    assert not isinstance(served_by(client), FastServer)
    return None


async def exchange(client: Client, data: bytes | list[bytes], *,
                   pause: float = 0.0) -> bytes:
    """Write ``data`` (pieces with a pause between them) on one connection; read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    for piece in [data] if isinstance(data, bytes) else data:
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(pause)
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return received


def answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length or chunked HTTP/1.1 answers."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status < 200 or status in (204, 304):
            body, raw = b"", rest
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, raw = rest[:length], rest[length:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body, rest = body + rest[:size], rest[size + 2:]
                if size == 0:
                    break
            raw = rest
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


def get(path: bytes, *extra: bytes, version: bytes = b"1.1") -> bytes:
    return b"GET " + path + b" HTTP/" + version + b"\r\n" + HOST + b"".join(extra) + b"\r\n"


class TestServedInTheLane:
    @pytest.mark.lane_only
    async def test_kept_alive_calls_never_leave_the_lane(self, sidecar: Client,
                                                         emulator: Emulator) -> None:
        server = server_of(sidecar)
        for _ in range(20):
            response = await sidecar.get("/rest/profile", headers={"X-Request-ID": "r-1"})
            assert response.status == 200
            assert response.headers["X-Request-ID"] == "r-1"
            assert (await response.json())["result"]["ID"] == "1"
        assert server.served == 20
        assert server.handed_off == 0
        assert len(emulator.rest_log) == 20

    async def test_pipelined_calls_are_answered_in_order(self, sidecar: Client,
                                                         fast_lane: bool) -> None:
        raw = await exchange(sidecar, get(b"/rest/profile", b"X-Request-ID: a\r\n")
                             + get(b"/rest/user.current", b"X-Request-ID: b\r\n")
                             + get(b"/rest/profile", b"X-Request-ID: c\r\n",
                                   b"Connection: close\r\n"))
        got = answers(raw)
        assert [(status, headers["x-request-id"]) for status, headers, _ in got] == [
            (200, "a"), (200, "b"), (200, "c")]
        if server := lane(sidecar, fast_lane):
            assert server.handed_off == 0

    async def test_a_head_and_body_in_dribs_and_drabs(self, sidecar: Client,
                                                      emulator: Emulator,
                                                      fast_lane: bool) -> None:
        body = b"fields[TITLE]=slow%20lead&auth=client-token"
        request = (b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST
                   + b"Content-Type: application/x-www-form-urlencoded\r\n"
                   + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        raw = await exchange(sidecar, [request[i:i + 7] for i in range(0, len(request), 7)],
                             pause=0.002)
        [(status, _, answer)] = answers(raw)
        assert status == 200
        assert emulator.leads[int(json.loads(answer)["result"])]["TITLE"] == "slow lead"
        if server := lane(sidecar, fast_lane):
            assert server.served == 1

    async def test_http_1_0(self, sidecar: Client) -> None:
        raw = await exchange(sidecar, get(b"/rest/profile", version=b"1.0"))
        [(status, headers, _)] = answers(raw)
        assert status == 200
        assert headers.get("connection", "close") == "close"  # HTTP/1.0: no header means close
        raw = await exchange(sidecar, get(b"/rest/profile", b"Connection: keep-alive\r\n",
                                          version=b"1.0")
                             + get(b"/rest/profile", version=b"1.0"))
        got = answers(raw)
        assert [(s, h.get("connection", "close")) for s, h, _ in got] == [
            (200, "keep-alive"), (200, "close")]

    async def test_a_large_answer_streams_chunked_or_to_the_close(
        self, sidecar: Client, emulator: Emulator, fast_lane: bool
    ) -> None:
        for _ in range(60):
            await sidecar.post("/rest/crm.lead.add", data={"fields[TITLE]": "t" * 8000})
        for version, framing in ((b"1.1", "content-length"), (b"1.0", None)):
            raw = await exchange(sidecar, get(b"/rest/crm.lead.list", b"Connection: close\r\n",
                                              version=version))
            [(status, headers, body)] = answers(raw)
            assert status == 200
            assert len(json.loads(body)["result"]) == 50
            if framing:
                assert framing in headers
        if server := lane(sidecar, fast_lane):
            assert server.handed_off == 0

    async def test_answers_wait_for_a_client_that_does_not_read(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """A client pipelining many calls and reading none gets no more buffered than a few."""
        await sidecar.post("/rest/crm.lead.add", data={"fields[TITLE]": "t" * 200_000})
        _reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(get(b"/rest/crm.lead.get?id=1") * 300)  # ~60 MB of answers
        await writer.drain()
        await asyncio.sleep(1.0)
        ours = writer.get_extra_info("sockname")
        transports: list[Any] = [t for t in served_by(sidecar)._connections.values()
                                 if t.get_extra_info("peername") == ours]
        [transport] = transports
        buffered = transport.get_write_buffer_size()
        assert buffered < 1_000_000, f"{buffered} bytes waiting for the client"
        assert len(emulator.rest_log) < 250  # the rest wait their turn
        writer.close()

    async def test_a_bodiless_status_gets_no_framing(
        self, make_settings: Any, aiohttp_client: Any, aiohttp_server: Any
    ) -> None:
        """A 204 from the portal goes out with neither length nor chunks: the next answer on
        the connection is read where it starts."""
        where: dict[str, str] = {}

        async def token(request: web.Request) -> web.Response:
            return web.json_response({
                "access_token": "a" * 40, "refresh_token": "r" * 40, "expires_in": 3600,
                "scope": "crm", "member_id": "m" * 32, "domain": where["domain"],
                "client_endpoint": where["base"] + "/rest/", "status": "L", "user_id": 1,
            })

        async def rest(request: web.Request) -> web.Response:
            return web.Response(status=204)

        portal = web.Application()
        portal.router.add_post("/oauth/token/", token)
        portal.router.add_get("/oauth/token/", token)
        portal.router.add_route("*", "/rest/{method}", rest)
        server = await aiohttp_server(portal)
        where["base"] = f"http://127.0.0.1:{server.port}"
        where["domain"] = f"127.0.0.1:{server.port}"
        sidecar = await aiohttp_client(create_app(make_settings(portal=where["base"],
                                                                auth_code="any")))
        raw = await exchange(sidecar, get(b"/rest/app.ping") + get(b"/rest/app.ping")
                             + get(b"/rest/app.ping", b"Connection: close\r\n"))
        got = answers(raw)
        assert [status for status, _, _ in got] == [204, 204, 204]
        for _, headers, body in got:
            assert "transfer-encoding" not in headers
            assert body == b""

    async def test_own_errors_keep_their_shape(self, sidecar: Client) -> None:
        raw = await exchange(sidecar, get(b"/rest/../x", b"Connection: close\r\n"))
        [(status, headers, body)] = answers(raw)
        assert status == 400
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert "date" in headers
        assert set(json.loads(body)) == {"error", "error_description"}


class TestDate:
    @pytest.mark.lane_only
    async def test_the_date_is_the_servers_own(self, sidecar: Client) -> None:
        """Each FastServer keeps its own once-a-second Date (no module-level cache)."""
        server = server_of(sidecar)
        before = server.date()
        raw = await exchange(sidecar, get(b"/rest/../x", b"Connection: close\r\n"))
        after = server.date()
        [(_, headers, _)] = answers(raw)
        assert headers["date"] in (before, after)
        assert parsedate_to_datetime(headers["date"]).tzinfo is not None


class TestHeadsInPieces:
    """The lane resumes its search for a head's end where the last packet left it."""

    POST = (b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST
            + b"Content-Type: application/x-www-form-urlencoded\r\nX-Request-ID: piecemeal\r\n"
            + b"Content-Length: 21\r\nConnection: close\r\n\r\nfields[TITLE]=in+bits")

    def check(self, raw: bytes, emulator: Emulator) -> None:
        [(status, headers, answer)] = answers(raw)
        assert status == 200, answer
        assert headers["x-request-id"] == "piecemeal"
        assert emulator.leads[int(json.loads(answer)["result"])]["TITLE"] == "in bits"

    async def test_a_head_sent_a_byte_at_a_time(self, sidecar: Client, emulator: Emulator,
                                                fast_lane: bool) -> None:
        raw = await exchange(sidecar, [bytes([byte]) for byte in self.POST], pause=0.001)
        self.check(raw, emulator)
        if server := lane(sidecar, fast_lane):
            assert (server.served, server.handed_off) == (1, 0)

    async def test_a_head_cut_in_two_anywhere(self, sidecar: Client, emulator: Emulator,
                                              fast_lane: bool) -> None:
        """Wherever the cut falls (inside a CRLF, inside the blank line), all is read right."""
        head_length = self.POST.index(b"\r\n\r\n") + 4
        for cut in range(1, head_length + 1):
            emulator.leads.clear()
            raw = await exchange(sidecar, [self.POST[:cut], self.POST[cut:]], pause=0.005)
            self.check(raw, emulator)
        if server := lane(sidecar, fast_lane):
            assert (server.served, server.handed_off) == (head_length, 0)

    @pytest.mark.parametrize("request_bytes", [
        b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: b\nConnection: close\n\n",
        b"GET /rest/pro\nfile HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /rest/profile HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n\n",
    ], ids=["in-a-header", "in-the-request-line", "everywhere"])
    @pytest.mark.lane_only
    async def test_a_bare_line_feed_in_a_drip_goes_to_aiohttp_as_it_arrives(
        self, sidecar: Client, request_bytes: bytes
    ) -> None:
        """Not when the head ends: a bare LF may end it for aiohttp, but never for the lane."""
        server = server_of(sidecar)
        bare = request_bytes.replace(b"\r\n", b"  ").index(b"\n")
        _, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        for byte in request_bytes[:bare]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        assert server.handed_off == 0
        writer.write(b"\n")
        await until(lambda: server.handed_off == 1)
        assert server.served == 0
        writer.close()


class TestHandedToAiohttp:
    @pytest.mark.parametrize(("request_bytes", "status"), [
        (get(b"/token", b"Connection: close\r\n"), 200),
        (get(b"/oauth/start", b"Connection: close\r\n"), 200),
        (b"PUT /rest/profile HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n", 405),
        (b"POST /rest/profile HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
         b"Connection: close\r\n\r\n0\r\n\r\n", 200),
        (b"POST /rest/profile HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\n"
         b"Content-Length: 0\r\nConnection: close\r\n\r\n", 200),
        (b"GET /rest/profile HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS hello
    ], ids=["token", "oauth", "put", "chunked", "expect", "no-host", "tls"])
    async def test_unusual_requests_are_served_by_aiohttp(
        self, sidecar: Client, request_bytes: bytes, status: int, fast_lane: bool
    ) -> None:
        raw = await exchange(sidecar, request_bytes)
        assert answers(raw)[-1][0] == status
        if server := lane(sidecar, fast_lane):
            assert server.handed_off == 1
            assert server.served == 0

    async def test_a_compressed_body_is_decoded_by_aiohttp(self, sidecar: Client,
                                                           emulator: Emulator) -> None:
        body = gzip.compress(b"fields[TITLE]=zipped")
        raw = await exchange(sidecar, b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST
                             + b"Content-Type: application/x-www-form-urlencoded\r\n"
                             + b"Content-Encoding: gzip\r\nConnection: close\r\n"
                             + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        [(status, _, answer)] = answers(raw)
        assert status == 200
        assert emulator.leads[int(json.loads(answer)["result"])]["TITLE"] == "zipped"

    async def test_a_connection_moves_to_aiohttp_with_nothing_lost(
        self, sidecar: Client, fast_lane: bool
    ) -> None:
        """Lane, then /token (aiohttp from here on), then REST again: all in order."""
        raw = await exchange(sidecar, get(b"/rest/profile", b"X-Request-ID: one\r\n")
                             + get(b"/token")
                             + get(b"/rest/profile", b"X-Request-ID: three\r\n",
                                   b"Connection: close\r\n"))
        got = answers(raw)
        assert [status for status, _, _ in got] == [200, 200, 200]
        assert got[0][1]["x-request-id"] == "one"
        assert "access_token" in json.loads(got[1][2])
        assert got[2][1]["x-request-id"] == "three"
        if server := lane(sidecar, fast_lane):
            assert server.served == 1
            assert server.handed_off == 1


class TestOddHeads:
    """Heads the lane must not misjudge: whatever it is unsure of, aiohttp answers at once."""

    UPGRADE = get(b"/rest/profile", b"Connection: Upgrade, close\r\nUpgrade: h2c\r\n")

    async def test_an_upgrade_request_is_answered(self, sidecar: Client) -> None:
        raw = await exchange(sidecar, self.UPGRADE)
        assert answers(raw)[-1][0] in (200, 400)

    async def test_an_upgrade_request_pipelined_after_a_call_is_answered(
        self, sidecar: Client
    ) -> None:
        raw = await exchange(sidecar, get(b"/rest/profile") + self.UPGRADE)
        got = answers(raw)
        assert got[0][0] == 200
        assert len(got) == 2

    async def test_a_head_ending_in_bare_line_feeds_is_answered_at_once(
        self, sidecar: Client
    ) -> None:
        started = asyncio.get_running_loop().time()
        raw = await exchange(sidecar, b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\n\n")
        assert answers(raw)[-1][0] in (200, 400)
        assert asyncio.get_running_loop().time() - started < 5


async def quick_sidecar(aiohttp_client: Callable[..., Awaitable[Client]],
                        make_settings: Callable[..., Settings], emulator: Emulator,
                        **deadlines: str) -> Client:
    """An authorized sidecar with the given deadlines (``request_timeout="0.4"``...)."""
    settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), **deadlines)
    return await aiohttp_client(create_app(settings, watch_interval=0.05))


class TestConnections:
    @pytest.mark.lane_only
    async def test_an_idle_connection_is_closed(
        self, aiohttp_client: Callable[..., Awaitable[Client]],
        make_settings: Callable[..., Settings], emulator: Emulator,
    ) -> None:
        sidecar = await quick_sidecar(aiohttp_client, make_settings, emulator,
                                      idle_timeout="0.2")
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(get(b"/rest/profile"))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 5)  # the server closes it
        assert b"result" in rest
        writer.close()
        assert server_of(sidecar).connections == []

    @pytest.mark.parametrize("partial", [
        b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ",
        b"GET /token HTTP/1.1\r\nHo",
        b"POST /rest/crm.lead.add HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\nf",
    ], ids=["rest-head", "token-head", "rest-body"])
    async def test_a_request_too_slow_to_arrive_gets_408(
        self, aiohttp_client: Callable[..., Awaitable[Client]],
        make_settings: Callable[..., Settings], emulator: Emulator, partial: bytes,
    ) -> None:
        sidecar = await quick_sidecar(aiohttp_client, make_settings, emulator,
                                      request_timeout="0.4")
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        started = asyncio.get_running_loop().time()
        for byte in partial:  # a drip: bytes keep coming, the request never completes in time
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break  # the sidecar gave up on us: its answer is waiting to be read
            await asyncio.sleep(0.005)
            if reader.at_eof() or started + 1 < asyncio.get_running_loop().time():
                break
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        [(status, headers, body)] = answers(raw)
        assert status == 408
        assert headers["connection"] == "close"
        assert json.loads(body)["error"] == "SIDECAR_REQUEST_TIMEOUT"
        assert list(emulator.rest_log) == []
        assert (await sidecar.get("/rest/profile")).status == 200

    async def test_a_client_that_hangs_up_mid_body_leaves_nothing(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST
                     + b"Content-Length: 100\r\n\r\nfields[TITLE]=half")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.2)
        assert emulator.leads == {}
        assert served_by(sidecar).connections == []
        response = await sidecar.get("/rest/profile")
        assert response.status == 200

    async def test_calls_pipelined_behind_a_reset_are_never_sent(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        emulator.call_delay = 0.3
        add = (b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST
               + b"Content-Type: application/x-www-form-urlencoded\r\n"
               + b"Content-Length: 19\r\n\r\nfields[TITLE]=piped")
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
        writer.write(add * 3)
        await writer.drain()
        await until(lambda: len(emulator.rest_log) == 1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not a polite close
        await asyncio.sleep(1.0)
        assert len(emulator.leads) == 1  # the first was under way; the other two never left
        del reader

    async def test_shutdown_lets_the_call_in_flight_finish(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        emulator.call_delay = 0.5
        async with aiohttp.ClientSession() as http:
            slow = asyncio.ensure_future(http.get(f"http://127.0.0.1:{sidecar.port}/rest/profile"))
            await asyncio.sleep(0.2)
            server = served_by(sidecar)
            server.pre_shutdown()
            await server.shutdown(5)
            response = await slow
            assert response.status == 200
            assert (await response.json())["result"]["ID"] == "1"
        assert server.connections == []
