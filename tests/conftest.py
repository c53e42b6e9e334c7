"""Shared fixtures: a real emulator on loopback, settings pointing at it, a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient, TestServer

from sidecar.app import LIFECYCLE, TOKENS, create_app, proxy_runner
from sidecar.authorization import Authorization
from sidecar.config import Settings, load_settings
from sidecar.emulator import Emulator, run_emulator
from tests.pg import Server, postgresql

CLIENT_ID = "local.test0000000001.00000001"
CLIENT_SECRET = "test-client-secret-0123456789"

AiohttpClient = Callable[[web.Application], Any]


class OffsetClock:
    """The wall clock moved by ``offset`` seconds, for the emulator's idea of time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class ProxyTestServer(TestServer):
    """A test server that serves a proxy app as ``bitrix-sidecar run`` does: fast lane first
    (or, with ``fast_lane=False``, as with ``SIDECAR_FAST_LANE=off``: all through aiohttp)."""

    def __init__(self, app: web.Application, *, fast_lane: bool = True, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.fast_lane = fast_lane

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return proxy_runner(self.app, fast_lane=self.fast_lane, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers this conftest reads."""
    config.addinivalue_line(
        "markers", "lane_only: a test of the fast lane itself, run with the lane only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that can build a proxy app (from ``make_settings``) twice: served with the
    fast lane, as ``bitrix-sidecar run`` serves, and without it, as with
    ``SIDECAR_FAST_LANE=off`` or an aiohttp lacking what the lane needs; so the two paths cannot
    drift apart. Tests of the lane itself (``lane_only``) run once, with it."""
    if "fast_lane" not in metafunc.fixturenames or not (
            "make_settings" in metafunc.fixturenames
            or "market_settings" in metafunc.fixturenames):
        return
    if metafunc.definition.get_closest_marker("lane_only"):
        metafunc.parametrize("fast_lane", [True], ids=["lane"], indirect=True)
    else:
        metafunc.parametrize("fast_lane", [True, False], ids=["lane", "plain"], indirect=True)


@pytest.fixture
def fast_lane(request: pytest.FixtureRequest) -> bool:
    """Whether proxy apps are served with the fast lane (see pytest_generate_tests)."""
    return bool(getattr(request, "param", True))


@pytest.fixture
def aiohttp_client(aiohttp_client: Callable[..., Any], fast_lane: bool) -> Callable[..., Any]:
    """pytest-aiohttp's client fixture, serving a proxy app with the fast lane or without."""

    async def client(app: web.Application | BaseTestServer, **kwargs: Any) -> Any:
        if isinstance(app, web.Application) and LIFECYCLE in app:
            return await aiohttp_client(ProxyTestServer(app, fast_lane=fast_lane), **kwargs)
        return await aiohttp_client(app, **kwargs)

    return client


@pytest.fixture
def emulator_clock() -> OffsetClock:
    """Return the clock the emulator fixture runs on."""
    return OffsetClock()


@pytest.fixture
async def emulator(emulator_clock: OffsetClock) -> AsyncIterator[Emulator]:
    """Serve a fresh emulator with the test app registered."""
    emu = Emulator(clock=emulator_clock)
    emu.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user")
    async with run_emulator(emu):
        yield emu


def settings_env(emulator: Emulator, tmp_path: Path) -> dict[str, str]:
    """The settings every test sidecar starts from: the emulator, a fresh store, free ports."""
    return {
        "BITRIX_PORTAL": emulator.base_url,
        "BITRIX_CLIENT_ID": CLIENT_ID,
        "BITRIX_CLIENT_SECRET": CLIENT_SECRET,
        "BITRIX_SCOPE": "crm,user",
        "SIDECAR_DB": str(tmp_path / "tokens.db"),
        "SIDECAR_LISTEN": "127.0.0.1:0",
        "SIDECAR_ADMIN_LISTEN": "127.0.0.1:0",
        # The core's tests run without the rate limiter; tests/test_limits.py turns it on.
        "SIDECAR_RATE": "0",
    }


@pytest.fixture
def make_settings(emulator: Emulator, tmp_path: Path) -> Callable[..., Settings]:
    """Build settings for the emulator; keyword arguments are flags by their ``dest``."""

    def make(**flags: Any) -> Settings:
        return load_settings(settings_env(emulator, tmp_path),
                             {k: None if v is None else str(v) for k, v in flags.items()})

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings], emulator: Emulator) -> Settings:
    """Settings whose first code is exchanged at start-up."""
    return make_settings(auth_code=emulator.issue_code(CLIENT_ID))


@pytest.fixture
async def sidecar(
    settings: Settings, aiohttp_client: Callable[..., Any]
) -> TestClient[web.Request, web.Application]:
    """Serve an authorized sidecar on loopback and return a client for it."""
    client: TestClient[web.Request, web.Application] = await aiohttp_client(
        create_app(settings, watch_interval=0.05)
    )
    return client


def tokens_of(client: TestClient[web.Request, web.Application]) -> Authorization:
    """Return the token manager of a served sidecar."""
    return client.app[TOKENS]


@pytest.fixture
def env(emulator: Emulator, tmp_path: Path) -> dict[str, str]:
    """Environment for the CLI pointing at the emulator, with a fresh store and free ports."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BITRIX_", "SIDECAR_"))}
    return base | settings_env(emulator, tmp_path)


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None if it has none).

    A connection from it to a listener on 0.0.0.0 comes from a peer that is not loopback, as
    from another machine. Connecting a UDP socket sends nothing; it only picks the address.
    """
    candidates: list[str] = []
    for probe in ("192.0.2.1", "10.255.255.255", "198.51.100.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect((probe, 9))
            except OSError:
                continue
            candidates.append(str(sock.getsockname()[0]))
    with contextlib.suppress(OSError):
        candidates += [str(info[4][0]) for info in socket.getaddrinfo(
            socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)]
    for address in candidates:
        if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0":  # noqa: S104
            continue
        with socket.socket() as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
        return address
    return None


@pytest.fixture(scope="session")
def outside() -> str:
    """This machine's non-loopback address, for calls from a peer that is not loopback."""
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    return address


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1 and its key."""

    cert: Path
    key: Path


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """Make a self-signed certificate for 127.0.0.1 with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed for the TLS terminator")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return Certificate(cert, key)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """Run one real PostgreSQL 15 server for the session (fails, never skips, without it)."""
    with postgresql() as server:
        yield server


@pytest.fixture
async def pg_url(pg_server: Server) -> AsyncIterator[str]:
    """Create a database of this test's own on the session's server; return its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server.url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield pg_server.url(name)
    admin = await asyncpg.connect(pg_server.url("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes one way until end of stream, then close the writing side (a TLS relay's half)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


@dataclass
class AlertSink:
    """A real webhook on loopback that keeps every alert posted to it."""

    url: str
    alerts: list[dict[str, Any]]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Return the alerts whose event is ``name``."""
        return [alert for alert in self.alerts if alert["event"] == name]


@pytest.fixture
async def alert_sink() -> AsyncIterator[AlertSink]:
    """Serve a webhook for SIDECAR_ALERT_WEBHOOK; collect what arrives."""
    alerts: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        alerts.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/alerts", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield AlertSink(f"http://127.0.0.1:{port}/alerts", alerts)
    finally:
        await runner.cleanup()
