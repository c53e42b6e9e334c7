"""Deadlines on every listener, over real loopback: a request that drips, a connection that
idles, one connection too many, and too many install checks at once; then 2,000 dripping
connections against a real `bitrix-sidecar run` process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import json
import random
import resource
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.admission import Admission
from sidecar.app import METRICS, create_admin_app, create_app, create_oauth_app, listener_runner
from sidecar.config import Settings
from sidecar.deadlines import DeadlineHandler, DeadlineServer
from sidecar.emulator import Emulator
from sidecar.errors import Overloaded
from tests.conftest import CLIENT_ID
from tests.test_fastlane import answers
from tests.test_operations import until

Client = TestClient[web.Request, web.Application]
HOST = b"Host: 127.0.0.1\r\n"
DEADLINE = 0.5  # SIDECAR_REQUEST_TIMEOUT in these tests
FORM = b"Content-Type: application/x-www-form-urlencoded\r\n"


class ListenerTestServer(TestServer):
    """The admin or OAuth listener of a proxy app, served as ``bitrix-sidecar run`` serves it."""

    def __init__(self, app: web.Application, proxy_app: web.Application, listener: str,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.proxy_app = proxy_app
        self.listener = listener

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return listener_runner(self.app, self.proxy_app, self.listener, **kwargs)


Serve = Callable[..., Awaitable[tuple[Client, Client]]]


@pytest.fixture
def serve(aiohttp_client: Callable[..., Awaitable[Client]],
          make_settings: Callable[..., Settings], emulator: Emulator) -> Serve:
    """Serve a sidecar (authorized unless told) with the given settings; return (listener,
    proxy) clients."""

    async def start(listener: str, authorized: bool = True, **flags: str
                    ) -> tuple[Client, Client]:
        code = emulator.issue_code(CLIENT_ID) if authorized else None
        settings = make_settings(auth_code=code, **flags)
        proxy = await aiohttp_client(create_app(settings, watch_interval=0.05))
        if listener == "proxy":
            return proxy, proxy
        build = create_admin_app if listener == "admin" else create_oauth_app
        server = ListenerTestServer(build(proxy.app), proxy.app, listener)
        return await aiohttp_client(server), proxy

    return start


def server_of(client: Client) -> DeadlineServer:
    runner = client.server.runner
    assert runner is not None
    server = runner.server
    assert isinstance(server, DeadlineServer)
    return server


async def drip(port: int | None, pieces: Iterable[bytes], *, every: float = 0.05,
               limit: float = 10.0) -> tuple[bytes, float]:
    """Send ``pieces`` ``every`` seconds apart on one connection until the sidecar closes it;
    return what it answered and after how long."""
    assert port is not None
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = loop.time()

    async def send() -> None:
        for piece in pieces:
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(every)

    received = await collect(reader, writer, asyncio.create_task(send()), limit)
    return received, loop.time() - started


async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  sender: asyncio.Task[None], limit: float) -> bytes:
    """Read what the sidecar sends until it closes (or ``limit`` passes); then stop sending."""
    received = b""
    try:
        async with asyncio.timeout(limit):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionError:
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        sender.cancel()
        writer.close()
    return received


def endless(first: bytes, then: bytes = b"a") -> Iterator[bytes]:
    """``first``, then ``then`` for ever."""
    return itertools.chain([first], itertools.repeat(then))


def assert_408(received: bytes, seconds: float) -> None:
    [(status, headers, body)] = answers(received)
    assert status == 408, received[:300]
    assert headers["connection"] == "close"
    assert json.loads(body)["error"] == "SIDECAR_REQUEST_TIMEOUT"
    assert DEADLINE <= seconds < DEADLINE + 1.5, seconds


HEADS = {
    "proxy": b"GET /rest/profile HTTP/1.1\r\n" + HOST,
    "admin": b"GET /healthz HTTP/1.1\r\n" + HOST,
    "oauth": b"GET /oauth/start HTTP/1.1\r\n" + HOST,
}
LISTENERS = pytest.mark.parametrize("listener", ["proxy", "admin", "oauth"])


class TestHeads:
    @LISTENERS
    async def test_a_silent_partial_head_gets_408_then_close(self, serve: Serve,
                                                             listener: str) -> None:
        client, _ = await serve(listener, request_timeout=str(DEADLINE))
        received, seconds = await drip(client.port, [HEADS[listener] + b"X-Half: "])
        assert_408(received, seconds)
        assert server_of(client).timed_out == 1
        await until(lambda: server_of(client).open == 0)

    @LISTENERS
    async def test_a_dripped_header_gets_408_then_close(self, serve: Serve,
                                                        listener: str) -> None:
        client, proxy = await serve(listener, request_timeout=str(DEADLINE))
        received, seconds = await drip(client.port, endless(HEADS[listener] + b"X-Drip: "))
        assert_408(received, seconds)
        metrics = proxy.app[METRICS].render().decode()
        assert f'bitrix_sidecar_request_timeouts_total{{listener="{listener}"}} 1.0' in metrics

    async def test_a_head_handed_to_aiohttp_keeps_its_first_byte(self, serve: Serve) -> None:
        """A head the lane hands over (longer than the lane reads) is held to the time its
        first byte reached the lane, not the time aiohttp got it."""
        client, _ = await serve("proxy", request_timeout=str(DEADLINE))
        pads = b"".join(b"X-Pad-%d: %b\r\n" % (i, b"a" * 7000) for i in range(4))
        pieces = [b"GET /token HTTP/1.1\r\n", HOST + pads + b"X-Drip: "]  # 0.4 s apart
        received, seconds = await drip(client.port, [*pieces, *[b"a"] * 20], every=0.4)
        assert_408(received, seconds)
        assert seconds < DEADLINE + 0.3  # from the first byte, not from the hand-over at 0.4 s


class TestBodies:
    @pytest.mark.parametrize("listener", ["proxy", "oauth"])
    async def test_a_dripped_install_body_gets_408(self, serve: Serve, emulator: Emulator,
                                                   listener: str) -> None:
        client, _ = await serve(listener, request_timeout=str(DEADLINE))
        head = (b"POST /oauth/install HTTP/1.1\r\n" + HOST + FORM
                + b"Content-Length: 1000\r\n\r\nevent=ONAPPINSTALL")
        received, seconds = await drip(client.port, endless(head, b"x"))
        assert_408(received, seconds)
        assert list(emulator.rest_log) == []  # no app.info for a payload that never came

    async def test_a_big_rest_body_dripped_gets_408(self, serve: Serve,
                                                    emulator: Emulator) -> None:
        """2 MB announced (beyond the lane: aiohttp reads it), 16 KiB sent, then a drip."""
        client, _ = await serve("proxy", request_timeout=str(DEADLINE))
        head = (b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST + FORM
                + b"Content-Length: 2000000\r\n\r\n" + b"fields[TITLE]=" + b"a" * 16384)
        received, seconds = await drip(client.port, endless(head, b"a"))
        assert_408(received, seconds)
        assert list(emulator.rest_log) == []
        assert emulator.leads == {}

    async def test_a_slow_chunked_rest_body_gets_408(self, serve: Serve,
                                                     emulator: Emulator) -> None:
        client, _ = await serve("proxy", request_timeout=str(DEADLINE))
        head = (b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST + FORM
                + b"Transfer-Encoding: chunked\r\n\r\n")
        received, seconds = await drip(client.port, endless(head, b"4\r\naaaa\r\n"), every=0.2)
        assert_408(received, seconds)
        assert list(emulator.rest_log) == []

    @pytest.mark.parametrize(("listener", "target"), [
        ("oauth", b"/oauth/install"), ("proxy", b"/rest/crm.lead.add")])
    async def test_a_connection_cut_at_its_deadline_is_freed_at_once(
        self, serve: Serve, listener: str, target: bytes
    ) -> None:
        """Its handler, request and buffers go when it closes, not at some later collection
        (the stream keeps the exception that stopped it: no cycle may run through that)."""
        client, _ = await serve(listener, request_timeout=str(DEADLINE))
        head = (b"POST " + target + b" HTTP/1.1\r\n" + HOST + FORM
                + b"Content-Length: 60000\r\n\r\nevent=x&y=" + b"a" * 30000)
        gc.collect()
        # Handlers of earlier tests may be held on purpose (a test keeping log records): only
        # this test's own are counted.
        earlier = {id(o) for o in gc.get_objects() if isinstance(o, DeadlineHandler)}
        gc.disable()
        try:
            received, seconds = await drip(client.port, endless(head, b"a"))
            assert_408(received, seconds)
            await until(lambda: server_of(client).open == 0)
            await asyncio.sleep(0.1)
            alive = [o for o in gc.get_objects()
                     if isinstance(o, DeadlineHandler) and id(o) not in earlier]
        finally:
            gc.enable()
        assert alive == []

    async def test_a_body_in_time_is_served(self, serve: Serve, emulator: Emulator) -> None:
        """A body that arrives whole before the deadline, slowly, is served as ever."""
        client, _ = await serve("proxy", request_timeout="2")
        body = b"fields[TITLE]=slow"
        head = (b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST + FORM
                + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        received, _ = await drip(client.port, [head, *(bytes([b]) for b in body)], every=0.05)
        [(status, _, answer)] = answers(received)
        assert status == 200, answer
        assert [lead["TITLE"] for lead in emulator.leads.values()] == ["slow"]

    async def test_requests_kept_alive_each_get_their_own_deadline(self, serve: Serve) -> None:
        """Requests on one connection, each within the deadline, all served (none inherits the
        first request's start)."""
        client, _ = await serve("proxy", request_timeout="0.6", idle_timeout="5")
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        body = b"fields[TITLE]=again"
        for _ in range(4):  # 4 x 0.4 s on one connection: longer than one deadline
            writer.write(b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST + FORM
                         + b"Content-Length: %d\r\n\r\n" % len(body))
            await asyncio.sleep(0.4)
            writer.write(body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()


class TestIdle:
    @LISTENERS
    async def test_an_idle_kept_alive_connection_is_closed(self, serve: Serve,
                                                           listener: str) -> None:
        client, _ = await serve(listener, idle_timeout="0.5", request_timeout="5")
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(HEADS[listener] + b"\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Connection: close" not in head
        answered = loop.time()
        rest = await asyncio.wait_for(reader.read(), 5)  # what is left, then the close
        assert loop.time() - answered < 2.5
        assert b"HTTP/1.1" not in rest  # no answer to nothing
        writer.close()
        await until(lambda: server_of(client).open == 0)


class TestConnectionCap:
    @LISTENERS
    async def test_one_connection_too_many_is_closed_and_counted(
        self, serve: Serve, listener: str
    ) -> None:
        client, proxy = await serve(listener, max_connections="3")
        server = server_of(client)
        held = []
        for _ in range(3):  # served (so handed over to aiohttp, where the lane does that)
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(HEADS[listener] + b"\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            held.append((reader, writer))
        assert server.open == 3
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(HEADS[listener] + b"\r\n")
        with contextlib.suppress(ConnectionResetError):  # closed at once, unanswered
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.refused == 1
        metrics = proxy.app[METRICS].render().decode()
        assert f'bitrix_sidecar_connections_refused_total{{listener="{listener}"}} 1.0' in metrics
        assert f'bitrix_sidecar_open_connections{{listener="{listener}"}} 3.0' in metrics
        held.pop()[1].close()
        await until(lambda: server.open == 2)
        received, _ = await drip(client.port, [HEADS[listener] + b"Connection: close\r\n\r\n"])
        assert answers(received)[0][0] in (200, 302, 403)  # served: /oauth/start wants a link
        for _, writer in held:
            writer.close()


class TestInstallChecks:
    async def test_beyond_its_limit_an_install_check_is_refused_503(
        self, serve: Serve, emulator: Emulator
    ) -> None:
        """4 app.info checks at once and 8 waiting; the rest 503 at once, never sent.

        Unauthorized: with a working pair held, an unproven install is refused before any
        check, so nothing would reach the limiter.
        """
        client, proxy = await serve("proxy", authorized=False)
        emulator.call_delay = 1.0
        form = {
            "event": "ONAPPINSTALL", "auth[access_token]": "f" * 64,
            "auth[refresh_token]": "e" * 64, "auth[expires_in]": "3600",
            "auth[member_id]": emulator.member_id,
            "auth[client_endpoint]": f"{emulator.base_url}/rest/",
        }
        before = len(emulator.rest_log)

        async def install() -> tuple[int, dict[str, Any], str]:
            async with client.session.post(client.make_url("/oauth/install"),
                                           data=form) as response:
                return (response.status, await response.json(content_type=None),
                        response.headers.get("Retry-After", ""))

        results = await asyncio.gather(*(install() for _ in range(20)))
        busy = [r for r in results if r[0] == 503]
        assert len(busy) == 8
        assert {r[1]["error"] for r in busy} == {"SIDECAR_OVERLOADED"}
        assert {r[2] for r in busy} == {"5"}
        assert {r[0] for r in results if r[0] != 503} == {403}  # checked: the token is bad
        assert len(emulator.rest_log) - before == 12
        metrics = proxy.app[METRICS].render().decode()
        assert "bitrix_sidecar_install_checks_refused_total 8.0" in metrics

    async def test_the_admission_refuses_beyond_its_room_and_its_wait(self) -> None:
        admission = Admission(1, 1, wait_limit=0.2)
        release = asyncio.Event()

        async def hold() -> None:
            async with admission.slot():
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # the queue is full
            async with admission.slot():
                pass
        with pytest.raises(Overloaded):  # it waited its limit
            await waiter
        release.set()
        await holder
        async with admission.slot():  # free again
            pass
        assert admission.refused == 2


# -- 2,000 dripping connections against a real process ------------------------------------------

FLOOD_DEADLINE = 3.0
PACE = 1.0  # seconds between the drips
REST = b"POST /rest/crm.lead.add HTTP/1.1\r\n" + HOST + FORM
INSTALL = b"POST /oauth/install HTTP/1.1\r\n" + HOST + FORM
# (listener, kind, how many, first piece, what drips)
FLOOD: list[tuple[str, str, int, bytes, bytes]] = [
    ("proxy", "silent head", 200, b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A", b""),
    ("proxy", "dripped header", 150, b"GET /rest/profile HTTP/1.1\r\n" + HOST + b"X-D: ", b"a"),
    ("proxy", "dripped install body", 150,
     INSTALL + b"Content-Length: 1000\r\n\r\nevent=ONAPPINSTALL", b"a"),
    ("proxy", "2 MB Content-Length", 150,
     REST + b"Content-Length: 2000000\r\n\r\nfields[TITLE]=" + b"a" * 60000, b"a"),
    ("proxy", "slow chunked body", 150, REST + b"Transfer-Encoding: chunked\r\n\r\n",
     b"4\r\naaaa\r\n"),
    ("oauth", "silent head", 200, b"GET /oauth/start HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A", b""),
    ("oauth", "dripped header", 200, b"GET /oauth/start HTTP/1.1\r\n" + HOST + b"X-D: ", b"a"),
    ("oauth", "60 KB of a 64 KB form", 300,
     INSTALL + b"Content-Length: 65000\r\n\r\nevent=ONAPPINSTALL&x=" + b"a" * 60000, b"a"),
    # Over the install payload's 64 KiB on its head: 413 at once, nothing held.
    ("oauth", "a 1 MB form", 100,
     INSTALL + b"Content-Length: 1048576\r\n\r\nevent=ONAPPINSTALL&x=" + b"a" * 60000, b"a"),
    ("admin", "silent head", 200, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A", b""),
    ("admin", "dripped header", 200, b"GET /metrics HTTP/1.1\r\n" + HOST + b"X-D: ", b"a"),
]


def rss(pid: int) -> int:
    """The process's resident set size in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def more_open_files(wanted: int) -> None:
    """Raise this process's soft limit on open files (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} open files; the hard limit is {hard}")


async def dripper(port: int, first: bytes, then: bytes) -> tuple[int | None, float, float]:
    """One dripping client: its answer's status (None: closed unanswered), when it first sent,
    and how long until the sidecar closed it."""
    loop = asyncio.get_running_loop()
    for attempt in range(50):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:  # the accept queue is full for a moment
            await asyncio.sleep(0.05 * (attempt + 1))
    else:
        raise AssertionError("could not connect")
    started = loop.time()

    async def send() -> None:
        try:
            writer.write(first)
            await writer.drain()
            while then:
                await asyncio.sleep(PACE)
                writer.write(then)
                await writer.drain()
        except ConnectionError:
            return

    received = await collect(reader, writer, asyncio.create_task(send()), FLOOD_DEADLINE + 30)
    closed = loop.time() - started
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.") else None
    return status, started, closed


class TestFlood:
    @pytest.mark.timeout(300)
    async def test_two_thousand_dripping_connections(self) -> None:
        """2,000 connections drip across the three listeners; /rest/ calls keep being served at
        their usual pace, every dripping connection is closed by the deadline, and memory stays
        under the pod's 256 MiB and comes back down."""
        from bench.common import emulator, free_port, sidecar_process

        total = sum(count for _, _, count, _, _ in FLOOD)
        more_open_files(total + 512)
        ports = {"oauth": free_port(), "admin": free_port()}
        async with emulator() as portal, sidecar_process(
            portal, rate="0", request_timeout=f"{FLOOD_DEADLINE:g}s", idle_timeout="30s",
            oauth_listen=f"127.0.0.1:{ports['oauth']}",
            admin_listen=f"127.0.0.1:{ports['admin']}",
        ) as (pid, port):
            ports["proxy"] = port
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                for _ in range(200):  # warm up: imports, the token, the pools
                    async with http.get(f"{base}/rest/profile") as response:
                        assert response.status == 200
                await asyncio.sleep(1.0)
                baseline = rss(pid)
                peak = baseline
                latencies: list[float] = []
                statuses: collections.Counter[int] = collections.Counter()
                stop = asyncio.Event()

                async def probe() -> None:
                    loop = asyncio.get_running_loop()
                    while not stop.is_set():
                        started = loop.time()
                        async with http.get(f"{base}/rest/profile") as response:
                            await response.read()
                            statuses[response.status] += 1
                        latencies.append(loop.time() - started)
                        await asyncio.sleep(0.02)

                async def sample() -> None:
                    nonlocal peak
                    while not stop.is_set():
                        peak = max(peak, rss(pid))
                        await asyncio.sleep(0.1)

                background = [asyncio.create_task(probe()), asyncio.create_task(sample())]
                flood: list[asyncio.Task[tuple[int | None, float, float]]] = []
                kinds: list[str] = []
                plan = [(listener, kind, first, then) for listener, kind, count, first, then
                        in FLOOD for _ in range(count)]
                random.Random(7).shuffle(plan)  # noqa: S311 - an order, not a secret
                opened = asyncio.get_running_loop().time()
                for n, (listener, kind, first, then) in enumerate(plan):
                    flood.append(asyncio.create_task(dripper(ports[listener], first, then)))
                    kinds.append(f"{listener}: {kind}")
                    if n % 100 == 99:
                        await asyncio.sleep(0.05)  # the listeners' accept queues hold 128
                results = await asyncio.gather(*flood)
                all_closed = asyncio.get_running_loop().time() - opened
                await asyncio.sleep(3.0)
                stop.set()
                await asyncio.gather(*background)
                after = rss(pid)
        by_kind: dict[str, collections.Counter[int | None]] = collections.defaultdict(
            collections.Counter)
        for kind, (status, _, _) in zip(kinds, results, strict=True):
            by_kind[kind][status] += 1
        slowest = max(closed for _, _, closed in results)
        ordered = sorted(latencies)
        figures = {
            "connections": total,
            "RSS baseline MiB": round(baseline / 2**20, 1),
            "RSS peak MiB": round(peak / 2**20, 1),
            "RSS after MiB": round(after / 2**20, 1),
            "all closed after s (from the first connect)": round(all_closed, 2),
            "slowest close after its first byte s": round(slowest, 2),
            "/rest/ calls during": len(latencies),
            "/rest/ p50 ms": round(ordered[len(ordered) // 2] * 1000, 2),
            "/rest/ p99 ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2),
            "/rest/ max ms": round(ordered[-1] * 1000, 2),
            "answers by kind": {kind: dict(counter) for kind, counter in by_kind.items()},
        }
        print("\nflood figures:", json.dumps(figures, indent=1))
        assert set(statuses) == {200}
        assert len(latencies) > 50
        # every connection closed by the deadline (plus the sweep, the linger and loop delays)
        assert slowest < FLOOD_DEADLINE + 4, figures
        for kind, counter in by_kind.items():  # each answered 408 (a rare reset loses one)
            expected = 413 if kind == "oauth: a 1 MB form" else 408
            assert counter[expected] >= 0.95 * sum(counter.values()), (kind, counter)
        assert peak < 256 * 2**20, figures
        assert after < baseline + 24 * 2**20, figures
