"""Serving without the fast lane (SIDECAR_FAST_LANE=off, or an aiohttp lacking what the lane
needs), the start-up check of aiohttp's internals, and no_resend's: over real loopback sockets
and real subprocesses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import pytest
import structlog
from aiohttp import web

from sidecar.app import create_app, no_resend, oauth_session, proxy_runner, require_no_resend
from sidecar.config import Settings
from sidecar.deadlines import DeadlineServer
from sidecar.emulator import Emulator
from sidecar.errors import SidecarError
from sidecar.fastlane import FastServer
from sidecar.lanecheck import RESEND_SWITCH, missing_client_internals, missing_internals
from tests.conftest import CLIENT_ID
from tests.processes import Env, cli, running

OWN_ERROR = b"GET /rest/../x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


async def raw_answer(port: int, request: bytes) -> tuple[str, dict[str, str]]:
    """Send one request on a fresh connection; return the status line and headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}


# -- aiohttp as the lane and no_resend need it, and stand-ins for an aiohttp that is not ------


class ServerKeepingNoKwargs(web.Server):
    """A Server that keeps its handler arguments somewhere else."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._settings = self._kwargs
        del self._kwargs


class ServerClosingOtherwise(web.Server):
    """A Server whose pre_shutdown no longer walks _connections."""

    def pre_shutdown(self) -> None:
        for handler in self.connections:
            handler.force_close()


class RunnerBuildingOtherwise(web.AppRunner):
    """An AppRunner whose setup() no longer calls _make_server."""

    async def setup(self) -> None:
        raise NotImplementedError


class BufferedHandler(asyncio.BufferedProtocol):
    """A request handler fed through get_buffer()/buffer_updated(): no data_received()."""


class SessionOf310:
    """aiohttp 3.10's ClientSession as no_resend sees it: no switch to turn off resending."""

    def __init__(self) -> None:
        self._connector = None

    async def _request(self, method: str, url: str) -> None:
        return self._connector


class TestInternals:
    async def test_this_aiohttp_has_all_the_lane_and_no_resend_need(self) -> None:
        assert missing_internals() == []
        assert missing_client_internals() == []

    @pytest.mark.parametrize(("parts", "named"), [
        ({"server": ServerKeepingNoKwargs}, ["ServerKeepingNoKwargs._kwargs"]),
        ({"server": ServerClosingOtherwise},
         ["ServerClosingOtherwise.pre_shutdown (calling close() on each of _connections)"]),
        ({"runner": RunnerBuildingOtherwise},
         ["RunnerBuildingOtherwise._make_server (called by setup)"]),
        ({"handler": BufferedHandler}, ["BufferedHandler.connection_made",
                                        "BufferedHandler.data_received",
                                        "BufferedHandler.eof_received"]),
        ({"session": SessionOf310}, ["SessionOf310._retry_connection"]),
    ], ids=["server-kwargs", "server-shutdown", "runner", "handler", "session"])
    async def test_each_missing_part_is_named(self, parts: dict[str, Any],
                                              named: list[str]) -> None:
        assert missing_internals(**parts) == named


# -- the proxy without the lane ------------------------------------------------------------


class TestWithoutTheLane:
    async def test_a_missing_internal_means_plain_aiohttp_said_once(
        self, make_settings: Callable[..., Settings], emulator: Emulator
    ) -> None:
        """A real server whose check reports a part missing serves everything, through aiohttp."""
        app = create_app(make_settings(auth_code=emulator.issue_code(CLIENT_ID)))
        checks: list[int] = []

        def checker() -> list[str]:
            checks.append(1)
            return ["Server._kwargs"]

        runner = proxy_runner(app, checker=checker, handle_signals=False, access_log=None)
        with structlog.testing.capture_logs() as logs:
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = runner.addresses[0][1]
                assert runner.fast_lane is False
                assert type(runner.server) is DeadlineServer  # aiohttp serves, with deadlines
                base = f"http://127.0.0.1:{port}"
                async with aiohttp.ClientSession() as http:
                    for _ in range(3):  # kept alive
                        async with http.get(f"{base}/rest/profile") as response:
                            assert response.status == 200
                            assert (await response.json())["result"]["ID"] == "1"
                    async with http.post(f"{base}/rest/crm.lead.add",
                                         data={"fields[TITLE]": "plain"}) as response:
                        lead = int((await response.json())["result"])
                    async with http.get(f"{base}/token") as response:
                        assert "access_token" in await response.json()
                assert emulator.leads[lead]["TITLE"] == "plain"
                status, headers = await raw_answer(port, OWN_ERROR)
                assert status == "HTTP/1.1 400 Bad Request"
                assert "aiohttp/" in headers["server"]  # aiohttp answered, not the lane
            finally:
                await runner.cleanup()
        warnings = [e for e in logs if e["event"] == "fast_lane_unavailable"]
        assert [(e["log_level"], e["missing"]) for e in warnings] == [
            ("warning", ["Server._kwargs"])]
        assert checks == [1]

    async def test_with_nothing_missing_the_lane_serves_and_says_nothing(
        self, make_settings: Callable[..., Settings], emulator: Emulator
    ) -> None:
        app = create_app(make_settings(auth_code=emulator.issue_code(CLIENT_ID)))
        runner = proxy_runner(app, handle_signals=False, access_log=None)
        with structlog.testing.capture_logs() as logs:
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                server = runner.server
                assert runner.fast_lane is True
                assert isinstance(server, FastServer)
                status, headers = await raw_answer(runner.addresses[0][1], OWN_ERROR)
                assert status == "HTTP/1.1 400 Bad Request"
                assert "server" not in headers  # the lane answered
                assert server.served == 1
            finally:
                await runner.cleanup()
        assert not [e for e in logs if e["event"] == "fast_lane_unavailable"]


class TestTheSetting:
    @pytest.mark.parametrize(("how", "lane"), [
        ((), True), (("SIDECAR_FAST_LANE", "off"), False), (("--fast-lane", "off"), False),
        (("SIDECAR_FAST_LANE", "ON"), True),
    ], ids=["default", "env-off", "flag-off", "env-on"])
    async def test_the_run_command_serves_with_or_without_the_lane(
        self, env: Env, emulator: Emulator, how: tuple[str, ...], lane: bool
    ) -> None:
        run_env = {**env, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}
        args: tuple[str, ...] = ()
        if how and how[0].startswith("--"):
            args = how
        elif how:
            run_env[how[0]] = how[1]
        async with running(run_env, *args) as sidecar:
            [listening] = [e for e in sidecar.events() if e["event"] == "listening"]
            assert listening["fast_lane"] is lane
            port = int(sidecar.base.rpartition(":")[2])
            status, _ = await raw_answer(
                port, b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert status == "HTTP/1.1 200 OK"
            status, headers = await raw_answer(port, OWN_ERROR)
            assert status == "HTTP/1.1 400 Bad Request"
            # aiohttp names itself in a Server header; the lane's own answers carry none
            assert ("server" in headers) is not lane
            assert await sidecar.stop() == 0
        assert not [e for e in sidecar.events() if e["event"] == "fast_lane_unavailable"]

    @pytest.mark.parametrize(("how", "named"), [
        (("SIDECAR_FAST_LANE", "maybe"), "SIDECAR_FAST_LANE"),
        (("SIDECAR_FAST_LANE", "true"), "SIDECAR_FAST_LANE"),
        (("--fast-lane", "yes"), "--fast-lane"),
    ], ids=["env-maybe", "env-true", "flag-yes"])
    async def test_any_other_value_exits_2_with_every_bad_variable(
        self, env: Env, how: tuple[str, str], named: str
    ) -> None:
        bad = {**env, "SIDECAR_LISTEN": "nowhere"}
        args: tuple[str, ...] = ()
        if how[0].startswith("--"):
            args = how
        else:
            bad[how[0]] = how[1]
        code, _, err = await cli("run", *args, env=bad)
        assert code == 2
        assert f"{named}: {how[1]!r} is not on or off" in err
        assert "SIDECAR_LISTEN" in err
        assert err.count("bitrix-sidecar: invalid configuration") == 1


# -- no_resend -----------------------------------------------------------------------------


class TestNoResend:
    async def test_a_dropped_kept_alive_get_is_not_sent_again(self) -> None:
        """The portal's side of a kept-alive connection drops a GET: the caller hears of it,
        and the GET (which may have run) is not sent a second time."""
        received: list[bytes] = []

        async def portal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            first = True
            while head := await reader.readuntil(b"\r\n\r\n"):
                received.append(head.split(b" ")[1])
                if not first:
                    break  # the second call on a connection: gone without an answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                first = False
            writer.close()

        server = await asyncio.start_server(portal, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with oauth_session() as http:
                assert getattr(http, RESEND_SWITCH) is False
                async with http.get(f"http://127.0.0.1:{port}/one") as response:
                    assert await response.text() == "ok"
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    async with http.get(f"http://127.0.0.1:{port}/two"):
                        pass
            assert received == [b"/one", b"/two"]
        finally:
            server.close()
            await server.wait_closed()

    async def test_an_aiohttp_without_the_switch_stops_start_up(self) -> None:
        with pytest.raises(SidecarError) as caught:
            require_no_resend(SessionOf310)
        message = caught.value.description
        assert f"aiohttp {aiohttp.__version__} cannot be told not to send" in message
        assert "missing: SessionOf310._retry_connection" in message
        assert "refresh token twice" in message
        assert "install the aiohttp bitrix-sidecar declares (aiohttp" in message
        assert caught.value.code == "SIDECAR_UNSUPPORTED_AIOHTTP"
        stand_in = SessionOf310()
        with pytest.raises(SidecarError, match="_retry_connection"):
            no_resend(cast(aiohttp.ClientSession, stand_in))
        assert not hasattr(stand_in, RESEND_SWITCH)
