"""A token answer cannot move the portal: a refresh naming another ``client_endpoint`` (another
host, port or scheme) is not followed, and https never drops to http.

Real servers only: the emulator answers the refreshes (told, with ``bind``, to name another
address as ``client_endpoint``), a second HTTP server on loopback stands where that address
points, and, for https, a TLS terminator on loopback sits in front of the emulator.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import create_admin_app, create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.errors import Refused
from sidecar.store import TokenStore
from tests.conftest import CLIENT_ID, Certificate, pipe, tokens_of
from tests.test_operations import scrape, value

Client = TestClient[web.Request, web.Application]
REFUSED = "bitrix_sidecar_endpoint_refused_total"


class Elsewhere:
    """A real HTTP server where a forged ``client_endpoint`` points; it records every request."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int = 0) -> None:
        """Listen on ``host``."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Close the port."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits.append(f"{request.method} {request.raw_path}")
        return web.json_response({"result": "elsewhere"})


@pytest.fixture
async def elsewhere() -> AsyncIterator[Elsewhere]:
    """An address that is not the portal."""
    server = Elsewhere()
    yield server
    await server.stop()


async def serve(settings: Settings, aiohttp_client: Callable[..., Any]) -> tuple[Client, Client]:
    """Serve a sidecar and its admin listener on loopback."""
    proxy: Client = await aiohttp_client(create_app(settings, watch_interval=0.05))
    admin: Client = await aiohttp_client(create_admin_app(proxy.app))
    return proxy, admin


async def stored_endpoint(settings: Settings) -> str:
    """Read the stored pair's client_endpoint as another process would."""
    async with TokenStore(settings.db_path, portal=settings.portal,
                          client_id=settings.client_id) as store:
        pair = (await store.load()).pair
    assert pair is not None
    return pair.client_endpoint


def refusals(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """Return the captured client_endpoint_refused events."""
    return [e for e in logs if e["event"] == "client_endpoint_refused"]


class TestRefreshCannotMoveThePortal:
    @pytest.mark.parametrize("where", ["another port", "another host"])
    async def test_a_refresh_naming_another_address_is_not_followed(
        self, where: str, make_settings: Callable[..., Settings], emulator: Emulator,
        elsewhere: Elsewhere, aiohttp_client: Callable[..., Any],
    ) -> None:
        """The refresh answer's client_endpoint names a live server elsewhere: the calls, and
        the token, keep going to the portal; the event is logged at error level and counted."""
        real = emulator.base_url
        host, port = real.removeprefix("http://").rsplit(":", 1)
        if where == "another port":
            await elsewhere.start(host)
        else:  # the portal's port on another loopback address
            await elsewhere.start("127.0.0.2", int(port))
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID))
        proxy, admin = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None
        assert first.client_endpoint == f"{real}/rest/"

        emulator.bind(elsewhere.url)  # token answers now name the other server
        emulator.expire_access_tokens()
        with structlog.testing.capture_logs() as logs:
            response = await proxy.get("/rest/profile")  # 401 expired_token: renewed, again
            assert response.status == 200, await response.text()
            body = await response.json()
            assert body["result"] != "elsewhere"
            assert body["result"]["ID"] == "1"  # the emulator's answer
            second = await proxy.post("/rest/crm.lead.add", data={"fields[TITLE]": "here"})
            assert second.status == 200, await second.text()
        renewed = tokens.pair
        assert renewed is not None
        assert renewed.access_token != first.access_token  # the refresh itself was taken
        assert emulator.stats.refresh_ok == 1
        assert elsewhere.hits == []  # nothing, and so no token, went there
        assert [lead["TITLE"] for lead in emulator.leads.values()] == ["here"]
        assert renewed.client_endpoint == f"{real}/rest/"
        assert await stored_endpoint(settings) == f"{real}/rest/"
        token = await (await proxy.get("/token")).json()
        assert token["client_endpoint"] == f"{real}/rest/"
        status = await (await admin.get("/status")).json()
        assert status["client_endpoint"] == f"{real}/rest/"

        (event,) = refusals(logs)
        assert event["log_level"] == "error"
        assert event["source"] == "refresh"
        assert event["offered"] == elsewhere.url
        assert event["kept"] == real
        assert value(await scrape(admin), REFUSED, source="refresh") == 1

    async def test_a_refresh_naming_the_same_portal_is_followed(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """Another path on the same scheme, host and port is the same portal: it is taken."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID))
        proxy, admin = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        real = emulator.base_url
        emulator.bind(f"{real}/bitrix")  # {base}/rest/ becomes /bitrix/rest/ on the same origin
        emulator.expire_access_tokens()
        with structlog.testing.capture_logs() as logs:
            response = await proxy.get("/rest/profile")
        # The emulator serves /rest/ only, so the followed address answers 404: proof enough.
        assert response.status == 404
        assert tokens.pair is not None
        assert tokens.pair.client_endpoint == f"{real}/bitrix/rest/"
        assert refusals(logs) == []
        assert value(await scrape(admin), REFUSED, source="refresh") == 0


class TlsFront:
    """TLS in front of the emulator on one loopback port; a request sent there in plain HTTP
    (an http:// address on the same host and port) fails the handshake and is counted."""

    def __init__(self, target: int, certificate: Certificate) -> None:
        self._target = target
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certificate.cert, certificate.key)
        self.plain = 0  # connections that did not speak TLS
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the port and every relay."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                await writer.start_tls(self._context)
            except (ssl.SSLError, ConnectionError):
                self.plain += 1
                writer.transport.abort()
                return
            side_r, side_w = await asyncio.open_connection("127.0.0.1", self._target)
            await asyncio.gather(pipe(reader, side_w), pipe(side_r, writer))
        finally:
            self._tasks.discard(task)


class TestNoDowngrade:
    async def test_https_is_never_dropped_to_http(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        certificate: Certificate, aiohttp_client: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The portal is https; a refresh answer names http on the same host and port. The
        calls stay on https (followed, they would send the token in clear, and fail here)."""
        real = emulator.base_url
        front = TlsFront(int(real.rsplit(":", 1)[1]), certificate)
        await front.start()
        try:
            monkeypatch.setenv("SSL_CERT_FILE", str(certificate.cert))  # trust the terminator
            secure = f"https://127.0.0.1:{front.port}"
            emulator.bind(secure)
            settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), portal=secure,
                                     oauth_url=real)
            proxy, admin = await serve(settings, aiohttp_client)
            tokens = tokens_of(proxy)
            assert tokens.pair is not None
            assert tokens.pair.client_endpoint == f"{secure}/rest/"
            assert (await proxy.get("/rest/profile")).status == 200  # through TLS

            emulator.bind(f"http://127.0.0.1:{front.port}")
            emulator.expire_access_tokens()
            with structlog.testing.capture_logs() as logs:
                response = await proxy.get("/rest/profile")
                assert response.status == 200, await response.text()
            assert emulator.stats.refresh_ok == 1
            assert front.plain == 0  # nothing was sent in clear
            assert tokens.pair.client_endpoint == f"{secure}/rest/"
            assert await stored_endpoint(settings) == f"{secure}/rest/"
            (event,) = refusals(logs)
            assert event["log_level"] == "error"
            assert (event["offered"], event["kept"]) == (
                f"http://127.0.0.1:{front.port}", f"https://127.0.0.1:{front.port}")
            assert value(await scrape(admin), REFUSED, source="refresh") == 1
            status = await (await admin.get("/status")).json()
            assert status["client_endpoint"] == f"{secure}/rest/"
        finally:
            await front.stop()


class TestExchangeForAnotherPortal:
    async def test_an_exchange_for_another_portal_is_refused_logged_and_counted(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        elsewhere: Elsewhere, aiohttp_client: Callable[..., Any],
    ) -> None:
        """A code whose answer names another portal is not stored; the event is counted."""
        await elsewhere.start("127.0.0.1")
        proxy, admin = await serve(make_settings(), aiohttp_client)
        tokens = tokens_of(proxy)
        emulator.bind(elsewhere.url)
        with (structlog.testing.capture_logs() as logs,
              pytest.raises(Refused, match="not the configured portal")):
            await tokens.authorize(emulator.issue_code(CLIENT_ID))
        assert tokens.pair is None
        (event,) = refusals(logs)
        assert (event["log_level"], event["source"]) == ("error", "exchange")
        assert value(await scrape(admin), REFUSED, source="exchange") == 1
        assert elsewhere.hits == []
