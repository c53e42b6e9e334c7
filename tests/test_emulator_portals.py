"""Several portals in one emulator over real sockets: one shared OAuth server, portal-scoped tokens.

Each added portal listens on its own loopback address (127.0.0.2, 127.0.0.3, ...), so a client
tells the portals apart by host, as it would real ones, with no resolver of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from sidecar.app import create_app
from sidecar.config import load_settings
from sidecar.emulator import Emulator, Portal, run_emulator, run_portal
from tests.conftest import CLIENT_ID, CLIENT_SECRET, settings_env

REDIRECT = "http://127.0.0.1:9/callback"


@dataclass
class Emulated:
    """A served emulator with two added portals, A and B."""

    emulator: Emulator
    a: Portal
    b: Portal


@pytest.fixture
async def two() -> AsyncIterator[Emulated]:
    """Serve an emulator whose default portal is joined by portals A and B."""
    emulator = Emulator()
    emulator.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user", redirect_uri=REDIRECT)
    a, b = emulator.add_portal("a"), emulator.add_portal("b")
    async with run_emulator(emulator):
        yield Emulated(emulator, a, b)


@dataclass
class Receiver:
    """A real app handler on loopback that keeps every event posted to it."""

    url: str
    forms: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """Serve an install handler that answers 200 and keeps each posted form."""
    forms: list[dict[str, str]] = []

    async def receive(request: web.Request) -> web.Response:
        form = await request.post()
        forms.append({k: v for k, v in form.items() if isinstance(v, str)})
        return web.json_response({"result": True})

    app = web.Application()
    app.router.add_post("/install", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Receiver(f"http://127.0.0.1:{port}/install", forms)
    finally:
        await runner.cleanup()


async def token_request(oauth_url: str, **params: str) -> tuple[int, dict[str, Any]]:
    """POST a token request to an OAuth server; return the status and JSON body."""
    form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **params}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{oauth_url}/oauth/token/", data=form) as response,
    ):
        return response.status, await response.json()


async def exchange(oauth_url: str, portal: Portal) -> dict[str, Any]:
    """Trade a fresh code from ``portal`` for a pair at ``oauth_url``; return the token body."""
    status, body = await token_request(
        oauth_url, grant_type="authorization_code", code=portal.issue_code(CLIENT_ID))
    assert status == 200, body
    return body


async def call(
    portal: Portal, method: str, token: str, **params: Any
) -> tuple[int, dict[str, Any]]:
    """Call a REST method on ``portal`` with an access token; return the status and JSON body."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{portal.base_url}/rest/{method}.json", json=params,
                  headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        return response.status, await response.json()


class TestAddresses:
    async def test_each_portal_listens_on_a_loopback_host_of_its_own(self, two: Emulated) -> None:
        """Added portals are told apart by host (127.0.0.2, .3), each with its own member_id."""
        hosts = [URL(p.base_url).host for p in (two.emulator, two.a, two.b)]
        assert hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        assert len({p.member_id for p in (two.emulator, two.a, two.b)}) == 3
        assert two.emulator.oauth_url == two.emulator.base_url
        assert two.emulator.portals == {"a": two.a, "b": two.b}
        for portal in (two.a, two.b):
            body = await exchange(two.emulator.oauth_url, portal)
            status, answer = await call(portal, "profile", body["access_token"])
            assert status == 200, answer
            assert len(portal.rest_log) == 1
        assert len(two.emulator.rest_log) == 0

    async def test_a_portal_added_to_a_running_emulator(self, two: Emulated) -> None:
        """run_portal serves a portal added after run_emulator started, on its own host."""
        c = two.emulator.add_portal("c")
        async with run_portal(c) as base_url:
            assert URL(base_url).host == "127.0.0.4"
            assert c.base_url == base_url
            body = await exchange(two.emulator.oauth_url, c)
            assert body["member_id"] == c.member_id
            assert (await call(c, "profile", body["access_token"]))[0] == 200

    def test_names_are_unique(self) -> None:
        """A portal name is given once, and never empty."""
        emulator = Emulator()
        emulator.add_portal("a")
        for name in ("a", ""):
            with pytest.raises(ValueError, match="empty or taken"):
                emulator.add_portal(name)


class TestSharedOAuthServer:
    async def test_a_code_gives_a_pair_scoped_to_its_portal(self, two: Emulated) -> None:
        """A code from A, traded at the shared server, names A; domain names the OAuth server."""
        oauth = two.emulator.oauth_url
        for portal in (two.a, two.b):
            body = await exchange(oauth, portal)
            assert body["member_id"] == portal.member_id
            assert body["client_endpoint"] == f"{portal.base_url}/rest/"
            assert body["server_endpoint"] == f"{oauth}/rest/"
            assert body["domain"] == URL(oauth).raw_authority

    async def test_a_portal_refuses_another_portals_token(self, two: Emulated) -> None:
        """A's access token is invalid_token on B and on the default portal, and works on A."""
        a_token = (await exchange(two.emulator.oauth_url, two.a))["access_token"]
        for other in (two.b, two.emulator):
            status, body = await call(other, "profile", a_token)
            assert (status, body["error"]) == (401, "invalid_token")
        assert (await call(two.a, "profile", a_token))[0] == 200

    async def test_a_refresh_stays_with_its_portal(self, two: Emulated) -> None:
        """Refreshing at any host's token endpoint rotates the pair and keeps it on its portal."""
        oauth = two.emulator.oauth_url
        a_pair, b_pair = await exchange(oauth, two.a), await exchange(oauth, two.b)
        # The token endpoint is one shared server: B's host answers for A's refresh token too.
        for pair, portal, at in ((a_pair, two.a, two.b.base_url), (b_pair, two.b, oauth)):
            status, fresh = await token_request(
                at, grant_type="refresh_token", refresh_token=pair["refresh_token"])
            assert status == 200, fresh
            assert fresh["member_id"] == portal.member_id
            assert fresh["client_endpoint"] == f"{portal.base_url}/rest/"
            assert [p.refresh_token for p in portal.current_tokens()] == [fresh["refresh_token"]]
            assert (await call(portal, "profile", fresh["access_token"]))[0] == 200
            status, old = await call(portal, "profile", pair["access_token"])
            assert (status, old["error"]) == (401, "invalid_token")
        assert two.emulator.stats.refresh_ok == 2
        assert two.emulator.current_tokens() == []

    async def test_expiring_one_portals_tokens_leaves_the_others(self, two: Emulated) -> None:
        """A portal's expire_access_tokens and revoke_refresh_tokens touch its own tokens only."""
        oauth = two.emulator.oauth_url
        a_pair, b_pair = await exchange(oauth, two.a), await exchange(oauth, two.b)
        two.a.expire_access_tokens()
        two.a.revoke_refresh_tokens()
        status, body = await call(two.a, "profile", a_pair["access_token"])
        assert (status, body["error"]) == (401, "expired_token")
        status, body = await token_request(
            oauth, grant_type="refresh_token", refresh_token=a_pair["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")
        assert (await call(two.b, "profile", b_pair["access_token"]))[0] == 200
        assert len(two.b.current_tokens()) == 1

    async def test_the_authorize_page_redirects_with_its_portals_identity(
        self, two: Emulated
    ) -> None:
        """B's authorize page redirects with B's domain and member_id; its code gives B's pair."""
        b, oauth = two.b, two.emulator.oauth_url
        b.signed_in_user = 5
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{b.base_url}/oauth/authorize/", params={"client_id": CLIENT_ID},
                     allow_redirects=False) as response,
        ):
            assert response.status == 302
            location = URL(response.headers["Location"])
        assert location.query["domain"] == URL(b.base_url).raw_authority
        assert location.query["member_id"] == b.member_id
        assert location.query["server_domain"] == URL(oauth).raw_authority
        status, body = await token_request(
            oauth, grant_type="authorization_code", code=location.query["code"])
        assert status == 200, body
        assert (body["member_id"], body["user_id"]) == (b.member_id, 5)


class TestSeparatePortals:
    async def test_data_is_separate(self, two: Emulated) -> None:
        """A lead added on A is on A only."""
        oauth = two.emulator.oauth_url
        a_token = (await exchange(oauth, two.a))["access_token"]
        b_token = (await exchange(oauth, two.b))["access_token"]
        status, added = await call(two.a, "crm.lead.add", a_token, fields={"TITLE": "On A"})
        assert status == 200, added
        assert [lead["TITLE"] for lead in two.a.leads.values()] == ["On A"]
        assert two.b.leads == {}
        assert two.emulator.leads == {}
        status, listed = await call(two.b, "crm.lead.list", b_token)
        assert (status, listed["result"], listed["total"]) == (200, [], 0)

    async def test_rate_buckets_are_separate(self, two: Emulated) -> None:
        """B's full bucket answers 503 on B while A's calls go through; each counts its own."""
        oauth = two.emulator.oauth_url
        a_token = (await exchange(oauth, two.a))["access_token"]
        b_token = (await exchange(oauth, two.b))["access_token"]
        for portal in (two.a, two.b):
            portal.rate, portal.burst = 0.001, 2  # drains next to nothing while the test runs
        statuses = [(await call(two.b, "profile", b_token))[0] for _ in range(3)]
        assert statuses == [200, 200, 503]
        assert [(await call(two.a, "profile", a_token))[0] for _ in range(2)] == [200, 200]
        assert (two.a.stats.limited, two.b.stats.limited) == (0, 1)
        assert (two.a.stats.upstream_requests, two.b.stats.upstream_requests) == (2, 3)
        assert two.emulator.stats.upstream_requests == 0

    async def test_added_portals_take_the_emulators_limits(self) -> None:
        """A portal starts with the emulator's rate, burst and call delay."""
        emulator = Emulator(rate=5.0, burst=7, call_delay=0.25)
        portal = emulator.add_portal("a")
        assert (portal.rate, portal.burst, portal.call_delay) == (5.0, 7, 0.25)


class TestEvents:
    async def test_install_events_carry_their_portals_identity(
        self, two: Emulated, receiver: Receiver
    ) -> None:
        """ONAPPINSTALL from A and from B: each with its portal's domain, member_id, pair and
        application token; the pair works on its own portal only."""
        for portal, other in ((two.a, two.b), (two.b, two.a)):
            status, _ = await portal.send_install_event(receiver.url, CLIENT_ID)
            assert status == 200
            form = receiver.forms[-1]
            assert form["event"] == "ONAPPINSTALL"
            assert form["auth[domain]"] == URL(portal.base_url).raw_authority
            assert form["auth[member_id]"] == portal.member_id
            assert form["auth[client_endpoint]"] == f"{portal.base_url}/rest/"
            assert form["auth[server_endpoint]"] == f"{two.emulator.oauth_url}/rest/"
            assert form["auth[application_token]"] == portal.application_token(CLIENT_ID)
            assert (await call(portal, "profile", form["auth[access_token]"]))[0] == 200
            assert (await call(other, "profile", form["auth[access_token]"]))[0] == 401
        tokens = {p.application_token(CLIENT_ID) for p in (two.emulator, two.a, two.b)}
        assert len(tokens) == 3

    async def test_ui_install_names_its_portal(self, two: Emulated, receiver: Receiver) -> None:
        """A UI install from B carries B's host and member_id."""
        async def page(request: web.Request) -> web.Response:
            pages.append((dict(request.query), dict(await request.post())))
            return web.Response(text="ok")

        pages: list[tuple[dict[str, str], dict[str, Any]]] = []
        app = web.Application()
        app.router.add_post("/page", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/page"
            assert (await two.b.send_install_event(url, CLIENT_ID, ui=True))[0] == 200
        finally:
            await runner.cleanup()
        query, form = pages[0]
        assert query["DOMAIN"] == URL(two.b.base_url).raw_authority
        assert form["member_id"] == two.b.member_id
        assert (await call(two.b, "profile", form["AUTH_ID"]))[0] == 200

    async def test_uninstall_ends_that_portals_tokens_only(
        self, two: Emulated, receiver: Receiver
    ) -> None:
        """ONAPPUNINSTALL from A: A's pair is dead, B's lives; the event names A, signed by A."""
        oauth = two.emulator.oauth_url
        a_pair, b_pair = await exchange(oauth, two.a), await exchange(oauth, two.b)
        status, _ = await two.a.send_uninstall_event(receiver.url, CLIENT_ID, clean=True)
        assert status == 200
        form = receiver.forms[-1]
        assert form["event"] == "ONAPPUNINSTALL"
        assert form["data[CLEAN]"] == "1"
        assert form["auth[member_id]"] == two.a.member_id
        assert form["auth[domain]"] == URL(two.a.base_url).raw_authority
        assert form["auth[application_token]"] == two.a.application_token(CLIENT_ID)
        assert "auth[access_token]" not in form
        assert "auth[refresh_token]" not in form
        status, body = await call(two.a, "profile", a_pair["access_token"])
        assert (status, body["error"]) == (401, "invalid_token")
        status, body = await token_request(
            oauth, grant_type="refresh_token", refresh_token=a_pair["refresh_token"])
        assert (status, body["error"]) == (400, "invalid_grant")
        assert two.a.current_tokens() == []
        assert (await call(two.b, "profile", b_pair["access_token"]))[0] == 200
        # Installed again, A works again.
        await two.a.send_install_event(receiver.url, CLIENT_ID)
        assert (await call(two.a, "profile", receiver.forms[-1]["auth[access_token]"]))[0] == 200

    async def test_a_forged_uninstall_signature(self, two: Emulated, receiver: Receiver) -> None:
        """application_token= forges the uninstall's signature, for tests of a receiver."""
        await two.b.send_uninstall_event(receiver.url, CLIENT_ID, application_token="forged")
        assert receiver.forms[-1]["auth[application_token]"] == "forged"


class TestDefaultPortal:
    async def test_a_single_portal_emulator_is_as_before(self) -> None:
        """Without added portals: one listener on 127.0.0.1, its own OAuth server, portals {}."""
        emulator = Emulator()
        emulator.register_app(CLIENT_ID, CLIENT_SECRET)
        async with run_emulator(emulator) as base_url:
            assert URL(base_url).host == "127.0.0.1"
            assert emulator.portals == {}
            assert emulator.name == ""
            body = await exchange(base_url, emulator)
            assert body["client_endpoint"] == body["server_endpoint"] == f"{base_url}/rest/"
            assert body["domain"] == URL(base_url).raw_authority
            assert body["member_id"] == emulator.member_id
            assert (await call(emulator, "profile", body["access_token"]))[0] == 200
            # The code, then the pair.
            assert emulator.issued_secrets()[1:] == [body["access_token"], body["refresh_token"]]

    async def test_the_default_portal_refuses_an_added_portals_token(self, two: Emulated) -> None:
        """The emulator's own portal is a portal like the others: its tokens are its own."""
        own = await exchange(two.emulator.oauth_url, two.emulator)
        status, body = await call(two.a, "profile", own["access_token"])
        assert (status, body["error"]) == (401, "invalid_token")
        assert set(two.emulator.issued_secrets()) >= {own["access_token"], own["refresh_token"]}


class TestSidecarReachesAnAddedPortal:
    async def test_sidecar_in_front_of_portal_a(
        self, two: Emulated, tmp_path: Path, aiohttp_client: Callable[..., Any]
    ) -> None:
        """The sidecar's own upstream client reaches A at 127.0.0.2 by its URL alone, and its
        refreshes at the shared OAuth server stay A's (the sidecar checks the member_id)."""
        env = settings_env(two.emulator, tmp_path) | {
            "BITRIX_PORTAL": two.a.base_url, "BITRIX_OAUTH_URL": two.emulator.oauth_url}
        settings = load_settings(env, {"auth_code": two.a.issue_code(CLIENT_ID)})
        client = await aiohttp_client(create_app(settings, watch_interval=0.05))
        response = await client.post("/rest/crm.lead.add", json={"fields": {"TITLE": "Via"}})
        assert response.status == 200, await response.text()
        assert [lead["TITLE"] for lead in two.a.leads.values()] == ["Via"]
        two.a.expire_access_tokens()
        response = await client.get("/rest/crm.lead.list")
        assert response.status == 200, await response.text()
        assert (await response.json())["total"] == 1
        assert two.emulator.stats.refresh_ok == 1
        assert [call.method for call in two.a.rest_log] == [
            "crm.lead.add", "crm.lead.list", "crm.lead.list"]
        [current] = two.a.current_tokens()
        assert two.a.rest_log[-1].token == current.access_token
        assert len(two.b.rest_log) == len(two.emulator.rest_log) == 0
