"""Marketplace mode over real sockets: one sidecar holds the authorizations of several portals.

The emulator serves portals A and B on their own loopback addresses with one shared OAuth
server, and each portal refuses the other's tokens, so a call that reaches a portal with the
wrong token fails loudly.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from sidecar.app import create_admin_app, create_app
from sidecar.config import Settings, load_settings
from sidecar.emulator import Emulator, Portal, run_emulator, run_portal
from sidecar.pgstore import PgStore
from sidecar.storage import TokenPair
from tests.conftest import CLIENT_ID, CLIENT_SECRET, settings_env


@dataclass
class Market:
    """A served emulator with portals A and B (and C, which BITRIX_PORTAL does not allow)."""

    emulator: Emulator
    a: Portal
    b: Portal
    c: Portal


@pytest.fixture
async def market() -> AsyncIterator[Market]:
    """Serve an emulator with three added portals."""
    emulator = Emulator()
    emulator.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user")
    a, b, c = emulator.add_portal("a"), emulator.add_portal("b"), emulator.add_portal("c")
    async with run_emulator(emulator):
        yield Market(emulator, a, b, c)


def host(portal: Portal) -> str:
    """The portal's host:port, as an install event's ``domain`` names it."""
    return URL(portal.base_url).raw_authority


@pytest.fixture
def market_settings(market: Market, tmp_path: Path) -> Callable[..., Settings]:
    """Settings of a marketplace sidecar allowing portals A and B (not C)."""

    def make(**env: str) -> Settings:
        base = settings_env(market.emulator, tmp_path) | {
            "BITRIX_PORTAL": f"{market.a.base_url},{market.b.base_url}",
            "BITRIX_OAUTH_URL": market.emulator.oauth_url,
        }
        return load_settings(base | env, {})

    return make


@dataclass
class Sidecar:
    """A running marketplace sidecar: its proxy and admin clients."""

    proxy: Any
    admin: Any

    def url(self, path: str) -> str:
        """An address on the proxy listener."""
        return str(self.proxy.make_url(path))

    async def call(self, path: str, **headers: str) -> tuple[int, dict[str, Any]]:
        """GET ``path`` on the proxy; return status and JSON body."""
        async with self.proxy.get(path, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    async def status(self, query: str = "") -> tuple[int, dict[str, Any]]:
        """GET /status on the admin listener."""
        async with self.admin.get(f"/status{query}") as response:
            return response.status, await response.json(content_type=None)

    async def install(self, portal: Portal, **kwargs: Any) -> tuple[int, str]:
        """Have ``portal`` send its install event to the sidecar."""
        return await portal.send_install_event(self.url("/oauth/install"), CLIENT_ID, **kwargs)


@pytest.fixture
def start(aiohttp_client: Callable[..., Any],
          market_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """Start a marketplace sidecar (proxy and admin apps) on loopback."""

    async def started(**env: str) -> Sidecar:
        app = create_app(market_settings(**env))
        proxy = await aiohttp_client(app)
        admin = await aiohttp_client(create_admin_app(app))
        return Sidecar(proxy, admin)

    return started


def served(portal: Portal) -> int:
    """How many REST calls reached ``portal``."""
    return len(portal.rest_log)


class TestAddressing:
    async def test_calls_reach_the_named_portal_with_its_own_token(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """By path prefix (host or member_id), by header: each call reaches its portal, whose
        answer (200) proves it carried that portal's token."""
        sidecar = await start()
        assert (await sidecar.install(market.a))[0] == 200
        assert (await sidecar.install(market.b))[0] == 200
        for path, headers, portal in (
            (f"/portal/{host(market.a)}/rest/profile", {}, market.a),
            (f"/portal/{market.b.member_id}/rest/profile", {}, market.b),
            ("/rest/profile", {"X-Bitrix-Portal": host(market.b)}, market.b),
            ("/rest/profile", {"X-Bitrix-Portal": market.a.member_id}, market.a),
            (f"/portal/{host(market.a)}/rest/profile",
             {"X-Bitrix-Portal": market.a.member_id}, market.a),
        ):
            before = (served(market.a), served(market.b))
            status, body = await sidecar.call(path, **headers)
            assert status == 200, (path, headers, body)
            after = (served(market.a), served(market.b))
            expected = (before[0] + (portal is market.a), before[1] + (portal is market.b))
            assert after == expected, (path, headers)

    async def test_the_webhook_shape_per_portal(self, market: Market,
                                                start: Callable[..., Any]) -> None:
        """A client library given /portal/<p>/rest/<user>/<code>/ as its webhook works."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        before = served(market.b)
        status, body = await sidecar.call(f"/portal/{host(market.b)}/rest/1/anything/profile")
        assert status == 200, body
        assert served(market.b) == before + 1

    async def test_unaddressed_unknown_and_mismatched_calls(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """One portal held: unaddressed calls go to it. Two: 400 SIDECAR_PORTAL_REQUIRED.
        Unknown: 404. Prefix and header naming two: 400. None of them reaches a portal."""
        sidecar = await start()
        status, body = await sidecar.call("/rest/profile")
        assert (status, body["error"]) == (404, "SIDECAR_PORTAL_UNKNOWN")
        await sidecar.install(market.a)
        assert (await sidecar.call("/rest/profile"))[0] == 200
        await sidecar.install(market.b)
        calls = served(market.a) + served(market.b)
        status, body = await sidecar.call("/rest/profile")
        assert (status, body["error"]) == (400, "SIDECAR_PORTAL_REQUIRED")
        assert "/portal/" in body["error_description"]
        status, body = await sidecar.call(f"/portal/{host(market.c)}/rest/profile")
        assert (status, body["error"]) == (404, "SIDECAR_PORTAL_UNKNOWN")
        status, body = await sidecar.call(f"/portal/{host(market.a)}/rest/profile",
                                          **{"X-Bitrix-Portal": host(market.b)})
        assert (status, body["error"]) == (400, "SIDECAR_PORTAL_MISMATCH")
        assert served(market.a) + served(market.b) == calls


    async def test_token_per_portal(self, market: Market, start: Callable[..., Any]) -> None:
        """/token?portal= (or the header) gives that portal's token, which its portal accepts
        and the other refuses; unaddressed with two portals held, it is refused."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        status, body = await sidecar.call(f"/token?portal={host(market.b)}")
        assert status == 200, body
        assert body["member_id"] == market.b.member_id
        assert (await direct(market.b, body["access_token"]),
                await direct(market.a, body["access_token"])) == (200, 401)
        status, body = await sidecar.call("/token", **{"X-Bitrix-Portal": market.a.member_id})
        assert (status, body["member_id"]) == (200, market.a.member_id)
        status, body = await sidecar.call("/token")
        assert (status, body["error"]) == (400, "SIDECAR_PORTAL_REQUIRED")
        status, body = await sidecar.call(
            f"/token?portal={host(market.a)}&portal={host(market.b)}")
        assert status == 400, body


async def direct(portal: Portal, token: str) -> int:
    """Call ``portal`` itself with ``token``; return the status."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{portal.base_url}/rest/profile", params={"auth": token}) as response:
        return response.status


class TestBrowserFlow:
    async def test_the_browser_flow_points_to_the_cli_in_marketplace_mode(
        self, start: Callable[..., Any]
    ) -> None:
        """/oauth/start names no portal to approve on: it answers 400 with the operator's way
        (authorize-url --portal, then authorize), and starts nothing."""
        sidecar = await start()
        for method in ("GET", "POST"):
            async with sidecar.proxy.request(
                    method, "/oauth/start", headers={"Origin": sidecar.url("/").rstrip("/")},
            ) as response:
                body = await response.json(content_type=None)
            assert response.status == 400, body
            assert "authorize-url --portal" in body["error_description"]


class TestOnboarding:
    async def test_an_install_from_a_portal_outside_the_list_is_refused(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """Portal C is not in BITRIX_PORTAL: its install adds nothing; nor does A's event
        naming an endpoint outside the list."""
        sidecar = await start()
        status, body = await sidecar.install(market.c)
        assert status == 403, body
        assert "BITRIX_PORTAL" in body
        status, body = await sidecar.install(market.a, client_endpoint=f"{market.c.base_url}/rest/")
        assert status == 403, body
        status, summary = await sidecar.status()
        assert (status, summary["portals"]) == (200, 0)

    async def test_a_held_portal_is_replaced_only_with_its_application_token(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """A second install event for A with a forged application token changes nothing; B's
        application token does not vouch for A."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        status, body = await sidecar.install(market.a, application_token="forged")
        assert status == 403, body
        status, body = await sidecar.install(
            market.a, application_token=market.b.application_token(CLIENT_ID))
        assert status == 403, body
        status, body = await sidecar.install(
            market.a, application_token=market.a.application_token(CLIENT_ID))
        assert status == 200, body

    async def test_uninstall_removes_only_that_portal_and_its_secrets(
        self, market: Market, start: Callable[..., Any], tmp_path: Path
    ) -> None:
        """ONAPPUNINSTALL with A's application token removes A (its calls 404, its secrets
        gone from the store); with a forged token it is refused; B serves throughout."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        status, body = await market.a.send_uninstall_event(
            sidecar.url("/oauth/install"), CLIENT_ID, application_token="forged")
        assert status == 403, body
        assert (await sidecar.call(f"/portal/{host(market.b)}/rest/profile"))[0] == 200
        status, body = await market.a.send_uninstall_event(
            sidecar.url("/oauth/install"), CLIENT_ID)
        assert status == 200, body
        status, body = await sidecar.call(f"/portal/{host(market.a)}/rest/profile")
        assert (status, body["error"]) == (404, "SIDECAR_PORTAL_UNKNOWN")
        assert (await sidecar.call("/rest/profile"))[0] == 200  # B alone is left
        _, summary = await sidecar.status()
        assert summary["portals"] == 1
        async with sidecar.admin.get("/metrics") as response:
            metrics = await response.text()
        assert 'bitrix_sidecar_portal_events_total{event="added"} 2.0' in metrics
        assert 'bitrix_sidecar_portal_events_total{event="removed"} 1.0' in metrics
        assert 'bitrix_sidecar_portals{state="valid"} 1.0' in metrics
        with sqlite3.connect(tmp_path / "tokens.db") as raw:
            rows = raw.execute("SELECT key, access_token, refresh_token, application_token "
                               "FROM authorizations ORDER BY key").fetchall()
        assert (market.a.member_id, None, None, "") in rows

    async def test_a_restart_serves_every_portal_again(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """The store keeps each portal's authorization: a new sidecar serves both at once."""
        first = await start()
        await first.install(market.a)
        await first.install(market.b)
        second = await start()
        for portal in (market.a, market.b):
            assert (await second.call(f"/portal/{host(portal)}/rest/profile"))[0] == 200


class TestIsolation:
    async def test_one_portals_dead_authorization_leaves_the_other_untouched(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """A's app is removed on the portal's side (its tokens die, the event never arrives):
        A's calls get the re-authorization 503, B's are served; readiness stays up; /status
        counts A among those needing attention and ?portal= shows it."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        # The portal revokes the app; its event arrives forged (refused), as if lost.
        status, _ = await market.a.send_uninstall_event(
            sidecar.url("/oauth/install"), CLIENT_ID, application_token="lost")
        assert status == 403
        status, body = await sidecar.call(f"/portal/{host(market.a)}/rest/profile")
        assert (status, body["error"]) == (503, "SIDECAR_REAUTHORIZATION_REQUIRED"), body
        assert (await sidecar.call(f"/portal/{host(market.b)}/rest/profile"))[0] == 200
        async with sidecar.admin.get("/readyz") as response:
            assert response.status == 200
        _, summary = await sidecar.status()
        assert summary["states"] == {"reauthorization_required": 1, "valid": 1}
        assert [p["member_id"] for p in summary["attention"]] == [market.a.member_id]
        status, one = await sidecar.status(f"?portal={market.a.member_id}")
        assert (status, one["state"]) == (200, "reauthorization_required")
        status, one = await sidecar.status(f"?portal={host(market.b)}")
        assert (status, one["state"]) == (200, "valid")
        status, one = await sidecar.status("?portal=nobody.example.com")
        assert (status, one["error"]) == (404, "SIDECAR_PORTAL_UNKNOWN")


class TestClientLibrary:
    async def test_fast_bitrix24_with_a_webhook_address_per_portal(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """fast_bitrix24, unchanged, given one webhook address per portal: each client's leads
        land on its own portal (in batches the library makes), none on the other."""
        fast_bitrix24 = pytest.importorskip("fast_bitrix24")
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        on_a = fast_bitrix24.BitrixAsync(sidecar.url(f"/portal/{host(market.a)}/rest/"),
                                         verbose=False)
        on_b = fast_bitrix24.BitrixAsync(
            sidecar.url(f"/portal/{market.b.member_id}/rest/1/anycode/"), verbose=False)
        a_before, b_before = len(market.a.leads), len(market.b.leads)
        for n in range(3):
            await on_a.call("crm.lead.add", {"fields": {"TITLE": f"A {n}"}})
        await on_b.call("crm.lead.add", {"fields": {"TITLE": "B 0"}})
        assert sorted(lead["TITLE"] for lead in list(market.a.leads.values())[a_before:]) == [
            "A 0", "A 1", "A 2"]
        assert [lead["TITLE"] for lead in list(market.b.leads.values())[b_before:]] == ["B 0"]
        leads = await on_b.get_all("crm.lead.list", {"select": ["ID", "TITLE"]})
        assert [lead["TITLE"] for lead in leads] == [
            lead["TITLE"] for lead in market.b.leads.values()]


class TestMoves:
    async def test_a_renamed_portal_moves_within_the_list_and_not_outside(
        self, market: Market, aiohttp_client: Callable[..., Any], tmp_path: Path
    ) -> None:
        """A token answer naming a new address for the same member_id, on a host BITRIX_PORTAL
        allows, moves the portal (calls go there, by its new name too); B's answer naming an
        address outside the list is not followed."""
        old = market.a.base_url
        async with run_portal(market.a, host="127.0.0.9") as new:
            market.a.bind(old)  # the portal is still where it was installed
            settings = load_settings(settings_env(market.emulator, tmp_path) | {
                "BITRIX_PORTAL": f"{old},{new},{market.b.base_url}",
                "BITRIX_OAUTH_URL": market.emulator.oauth_url,
            }, {})
            app = create_app(settings, watch_interval=0.1)
            sidecar = Sidecar(await aiohttp_client(app), await aiohttp_client(
                create_admin_app(app)))
            await sidecar.install(market.a)
            await sidecar.install(market.b)
            market.a.bind(new)  # renamed: token answers name the new address from now on
            market.a.expire_access_tokens()
            before = len(market.a.rest_log)
            status, body = await sidecar.call(f"/portal/{URL(old).raw_authority}/rest/profile")
            assert status == 200, body
            last = market.a.rest_log[-1]
            assert len(market.a.rest_log) == before + 2  # refused (expired), then served
            assert last.headers["Host"] == URL(new).raw_authority
            for _ in range(50):
                status, one = await sidecar.status(f"?portal={URL(new).raw_authority}")
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert (status, one["member_id"]) == (200, market.a.member_id)
            # B's answers name an address BITRIX_PORTAL does not allow: not followed.
            market.b.bind(market.c.base_url)
            market.b.expire_access_tokens()
            b_before = len(market.b.rest_log)
            status, body = await sidecar.call(f"/portal/{market.b.member_id}/rest/profile")
            assert status == 200, body
            assert len(market.b.rest_log) == b_before + 2
            assert not market.c.rest_log


class TestSchedule:
    async def test_every_portal_is_renewed_on_the_sidecars_schedule(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """With SIDECAR_REFRESH_INTERVAL=2s the one scheduler renews each portal's pair in its
        turn (each portal's own settings follow the sidecar's), and calls keep being served."""
        sidecar = await start(SIDECAR_REFRESH_INTERVAL="2s", SIDECAR_REFRESH_RATE="5")
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        before = market.emulator.stats.refresh_ok
        held = {p.member_id: p.current_tokens()[-1].refresh_token for p in (market.a, market.b)}
        for _ in range(100):
            now = {p.member_id: p.current_tokens()[-1].refresh_token
                   for p in (market.a, market.b)}
            if all(now[m] != held[m] for m in held):
                break
            await asyncio.sleep(0.1)
        assert all(now[m] != held[m] for m in held), "a portal was not renewed on schedule"
        assert market.emulator.stats.refresh_ok - before >= 2
        for portal in (market.a, market.b):
            assert (await sidecar.call(f"/portal/{portal.member_id}/rest/profile"))[0] == 200


class TestUpgrade:
    async def test_a_single_portal_store_is_served_in_marketplace_mode_with_no_new_approval(
        self, market: Market, start: Callable[..., Any], aiohttp_client: Callable[..., Any],
        tmp_path: Path,
    ) -> None:
        """A store a single-portal sidecar wrote for portal A: a marketplace sidecar started on
        it serves A under its member_id with no new code; the old row is marked moved, so the
        single-portal sidecar still running on it stops (503) rather than renew the same
        refresh token."""
        single = load_settings(settings_env(market.emulator, tmp_path) | {
            "BITRIX_PORTAL": market.a.base_url, "BITRIX_OAUTH_URL": market.emulator.oauth_url,
            "BITRIX_AUTH_CODE": market.a.issue_code(CLIENT_ID)}, {})
        old = await aiohttp_client(create_app(single, watch_interval=0.1))
        async with old.get("/rest/profile") as response:
            assert response.status == 200
        exchanged = market.emulator.stats.token_requests["authorization_code"]
        sidecar = await start()
        status, body = await sidecar.call(f"/portal/{market.a.member_id}/rest/profile")
        assert status == 200, body
        assert market.emulator.stats.token_requests["authorization_code"] == exchanged
        for _ in range(50):
            async with old.get("/rest/profile") as response:
                if response.status == 503:
                    break
            await asyncio.sleep(0.1)
        assert response.status == 503


class TestPostgresqlUpgrade:
    async def test_a_single_portal_row_left_behind_is_not_served_as_a_portal(
        self, market: Market, start: Callable[..., Any], pg_url: str
    ) -> None:
        """A database's single-portal row that is not taken in (its authorization is dead) is
        not served under its address-shaped key beside the portals: only a live pair moves."""
        answer = market.a.issue_tokens(CLIENT_ID)
        pair = TokenPair(
            access_token=str(answer["access_token"]), refresh_token=str(answer["refresh_token"]),
            expires_at=time.time() + 3600, member_id=str(answer["member_id"]),
            client_endpoint=str(answer["client_endpoint"]), obtained_at=time.time())
        store = PgStore(pg_url, portal=market.a.base_url, client_id=CLIENT_ID)
        async with store, store.locked():
            await store.save_pair(pair)
            await store.record_error("the refresh token is dead", reauth_required=True)
        sidecar = await start(SIDECAR_DB=pg_url)
        _, summary = await sidecar.status()
        assert summary["portals"] == 0, summary
        status, body = await sidecar.call(f"/portal/{market.a.member_id}/rest/profile")
        assert (status, body["error"]) == (404, "SIDECAR_PORTAL_UNKNOWN")


class TestWholeLists:
    async def test_each_portal_lists_its_own_records(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """A whole list is fetched from the portal the call names, with that portal's token
        and gate, whichever way it is named."""
        sidecar = await start()
        assert (await sidecar.install(market.a))[0] == 200
        assert (await sidecar.install(market.b))[0] == 200
        market.a.seed("crm.deal", 3000)
        market.b.seed("crm.deal", 120)
        for path, headers, count in (
            (f"/portal/{host(market.a)}/all/rest/crm.deal.list", {}, 3000),
            (f"/all/portal/{market.b.member_id}/rest/crm.deal.list", {}, 120),
            ("/rest/crm.deal.list", {"X-Bitrix-Portal": host(market.a),
                                     "X-Bitrix-Pages": "all"}, 3000),
        ):
            status, body = await sidecar.call(path, **headers)
            assert status == 200, body
            assert [int(d["ID"]) for d in body["result"]] == list(range(1, count + 1))
        status, body = await sidecar.call("/all/rest/crm.deal.list")
        assert status == 400
        assert body["error"] == "SIDECAR_PORTAL_REQUIRED"
