"""Marketplace mode as operators run it: real ``bitrix-sidecar`` processes, the CLI per portal,
and replicas sharing a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.emulator import Portal
from tests.conftest import CLIENT_ID, settings_env
from tests.processes import Running, cli, get, running
from tests.test_marketplace import Market, direct, host, market  # noqa: F401 - the fixture

Env = dict[str, str]


@pytest.fixture
def market_env(market: Market, tmp_path: Path) -> Env:  # noqa: F811 - the fixture's name
    """The environment of a marketplace sidecar allowing portals A and B."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BITRIX_", "SIDECAR_"))}
    return base | settings_env(market.emulator, tmp_path) | {
        "BITRIX_PORTAL": f"{market.a.base_url},{market.b.base_url}",
        "BITRIX_OAUTH_URL": market.emulator.oauth_url,
        "SIDECAR_LOG_FORMAT": "json",
    }


async def install(sidecar: Running, portal: Portal) -> None:
    """Have ``portal`` install the app through the sidecar's proxy listener."""
    status, body = await portal.send_install_event(f"{sidecar.base}/oauth/install", CLIENT_ID)
    assert status == 200, body


async def call(sidecar: Running, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` through the sidecar."""
    return await get(f"{sidecar.base}{path}")


class TestCommandsPerPortal:
    async def test_status_portals_token_and_authorize_per_portal(
        self, market: Market, market_env: Env  # noqa: F811
    ) -> None:
        """``status`` lists both portals, ``portals`` prints a table, ``--portal`` picks one
        (by host or member_id) for status, token and authorize-url; ``authorize`` stores a
        code approved on an allowed portal as that portal's; an unknown portal exits 1."""
        async with running(market_env) as sidecar:
            await install(sidecar, market.a)
            await install(sidecar, market.b)
            assert (await call(sidecar, f"/portal/{host(market.a)}/rest/profile"))[0] == 200
        code, out, err = await cli("status", env=market_env)
        assert code == 0, err
        summary = json.loads(out)
        assert (summary["portals"], summary["states"]) == (2, {"valid": 2})
        assert {row["member_id"] for row in summary["each"]} == {
            market.a.member_id, market.b.member_id}
        code, out, _ = await cli("portals", env=market_env)
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split()[:3] == ["MEMBER_ID", "PORTAL", "STATE"]
        assert any(market.a.member_id in line and "valid" in line for line in lines[1:])
        code, out, _ = await cli("status", "--portal", host(market.a), env=market_env)
        assert code == 0
        assert json.loads(out)["member_id"] == market.a.member_id
        code, out, err = await cli("token", "--portal", market.b.member_id, env=market_env)
        assert code == 0, err
        token = out.strip()
        assert (await direct(market.b, token), await direct(market.a, token)) == (200, 401)
        code, out, _ = await cli("authorize-url", "--portal", host(market.a), env=market_env)
        assert code == 0
        assert out.startswith(f"{market.a.base_url}/oauth/authorize/?client_id={CLIENT_ID}")
        code, out, err = await cli("authorize", market.b.issue_code(CLIENT_ID),
                                   env=market_env)
        assert code == 0, err
        assert json.loads(out)["member_id"] == market.b.member_id
        code, _, err = await cli("token", "--portal", "nowhere.example.com", env=market_env)
        assert code == 1
        assert "no authorization is held" in err
        code, _, err = await cli("authorize", market.c.issue_code(CLIENT_ID), env=market_env)
        assert code == 1
        assert "does not allow" in err


    async def test_forget_removes_a_portal_from_a_running_sidecar(
        self, market: Market, market_env: Env  # noqa: F811
    ) -> None:
        """``forget --portal`` (the operator's removal) clears A's row; the running sidecar
        stops serving A within moments and B is untouched; forgetting it again exits 1."""
        async with running(market_env) as sidecar:
            await install(sidecar, market.a)
            await install(sidecar, market.b)
            code, out, err = await cli("forget", "--portal", host(market.a), env=market_env)
            assert code == 0, err
            assert json.loads(out)["removed"] == market.a.member_id

            async def gone() -> bool:
                status, _ = await call(sidecar, f"/portal/{market.a.member_id}/rest/profile")
                return status == 404

            await until(gone, 15)
            assert (await call(sidecar, f"/portal/{host(market.b)}/rest/profile"))[0] == 200
        code, out, _ = await cli("status", env=market_env)
        assert json.loads(out)["portals"] == 1
        code, _, err = await cli("forget", "--portal", host(market.a), env=market_env)
        assert code == 1, err


class TestReplicas:
    async def test_replicas_share_every_portal_through_postgresql(
        self, market: Market, market_env: Env, pg_url: str  # noqa: F811
    ) -> None:
        """Two sidecars on one database: a portal installed through one is served by the
        other within moments; its uninstall through the other removes it from both."""
        env = market_env | {"SIDECAR_DB": pg_url}
        async with running(env) as one, running(env) as two:
            await install(one, market.a)

            async def served_by_two() -> bool:
                return (await call(two, f"/portal/{market.a.member_id}/rest/profile"))[0] == 200

            await until(served_by_two, 15)
            status, body = await market.a.send_uninstall_event(
                f"{two.base}/oauth/install", CLIENT_ID)
            assert status == 200, body

            async def gone_from_one() -> bool:
                status, _ = await call(one, f"/portal/{market.a.member_id}/rest/profile")
                return status == 404

            await until(gone_from_one, 15)
            status, summary = await get(f"{one.admin}/status")
            assert (status, summary["portals"]) == (200, 0)


    async def test_replicas_share_each_portals_rate_budget(
        self, market: Market, market_env: Env, pg_url: str  # noqa: F811
    ) -> None:
        """Two replicas send portal A's calls (not coalesced) against A's 2/s, burst 10: A's
        one budget in the database keeps the fleet under A's limit (two budgets would send
        twice what it allows); B, with a budget of its own, is served at once meanwhile."""
        market.a.rate, market.a.burst = 2, 10
        env = market_env | {"SIDECAR_DB": pg_url, "SIDECAR_RATE": "2", "SIDECAR_BURST": "10",
                            "SIDECAR_QUEUE_TIMEOUT": "30s"}
        async with running(env) as one, running(env) as two:
            await install(one, market.a)
            await install(one, market.b)
            await until(lambda: served_everywhere(two, market.b), 15)
            stop = asyncio.get_running_loop().time() + 8
            statuses: list[int] = []
            async with aiohttp.ClientSession() as http:

                async def client(n: int) -> None:
                    base = (one, two)[n % 2].base
                    while asyncio.get_running_loop().time() < stop:
                        async with http.get(
                                f"{base}/portal/{market.a.member_id}/rest/profile",
                                headers={"X-Sidecar-Coalesce": "off"}) as response:
                            await response.read()
                            statuses.append(response.status)

                async def b_meanwhile() -> float:
                    await asyncio.sleep(4)
                    started = asyncio.get_running_loop().time()
                    status, _ = await call(two, f"/portal/{market.b.member_id}/rest/profile")
                    assert status == 200
                    return asyncio.get_running_loop().time() - started

                b_task = asyncio.create_task(b_meanwhile())
                await asyncio.gather(*(client(n) for n in range(20)))
                b_took = await b_task
        assert statuses
        assert set(statuses) == {200}, sorted(set(statuses))
        # Two budgets would send twice what A allows, and A would refuse calls by the dozen
        # (each absorbed by a retry, so the clients could not tell).
        print(f"A refused {market.a.stats.limited} of {len(statuses)} calls")
        assert market.a.stats.limited <= 2, market.a.stats.limited
        assert b_took < 2.0, b_took


    async def test_a_portals_pause_holds_every_replica_and_no_other_portal(
        self, market: Market, market_env: Env, pg_url: str  # noqa: F811
    ) -> None:
        """OPERATION_TIME_LIMIT on portal A at one replica: the other replica does not send
        that method to A until the pause ends (A answers 429 once), while B's same method
        goes at once."""
        env = market_env | {"SIDECAR_DB": pg_url, "SIDECAR_RATE": "10", "SIDECAR_BURST": "50"}
        async with running(env) as one, running(env) as two:
            await install(one, market.a)
            await install(one, market.b)
            await until(lambda: served_everywhere(two, market.a), 15)
            await until(lambda: served_everywhere(two, market.b), 15)
            # Both replicas' gates for A exist (their first calls made them).
            assert (await call(one, f"/portal/{market.a.member_id}/rest/profile"))[0] == 200
            market.a.block_method("crm.lead.list", 5)
            path = f"/portal/{market.a.member_id}/rest/crm.lead.list"
            first = asyncio.create_task(call(one, path))
            for _ in range(100):
                if market.a.stats.time_limited:
                    break
                await asyncio.sleep(0.05)
            assert market.a.stats.time_limited == 1
            await asyncio.sleep(2.5)  # the replicas read every portal's pauses each second
            sent = market.a.stats.rest_calls["crm.lead.list"]
            loop = asyncio.get_running_loop()
            started = loop.time()
            status, _ = await call(two, f"/portal/{market.b.member_id}/rest/crm.lead.list")
            assert status == 200
            assert loop.time() - started < 1.0  # B is not paused
            status, _ = await call(two, path)
            assert status == 200
            assert (await first)[0] == 200
        assert market.a.stats.time_limited == 1
        assert market.a.stats.rest_calls["crm.lead.list"] == sent + 2


async def until(condition: Any, seconds: float) -> None:
    """Wait until the async ``condition`` holds (fail after ``seconds``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.2)

async def served_everywhere(sidecar: Running, portal: Portal) -> bool:
    """Say whether ``sidecar`` serves ``portal`` yet."""
    return (await call(sidecar, f"/portal/{portal.member_id}/rest/profile"))[0] == 200
