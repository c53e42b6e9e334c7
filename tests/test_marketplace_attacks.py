# ruff: noqa: F811 - the fixtures imported from test_marketplace are parameters here
"""Marketplace mode attacked over real sockets: what arrives from the network, from someone who
is not the operator, never replaces, moves or kills a working authorization, nor adds one under
another portal's name, nor leaves state behind when refused.

Portals A and B are allowed (BITRIX_PORTAL), C is not; each portal refuses the others' tokens.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from yarl import URL

from sidecar.app import PORTALS, create_admin_app, create_app
from sidecar.config import Settings
from tests.conftest import CLIENT_ID
from tests.test_marketplace import (  # noqa: F401 - fixtures
    Market,
    Sidecar,
    host,
    market,
    market_settings,
    served,
    start,
)


async def serve(aiohttp_client: Callable[..., Any], settings: Settings,
                **kwargs: Any) -> tuple[Sidecar, Any]:
    """Start a marketplace sidecar; return it and its proxy application."""
    app = create_app(settings, **kwargs)
    return Sidecar(await aiohttp_client(app), await aiohttp_client(create_admin_app(app))), app


def rows(tmp_path: Path) -> list[tuple[Any, ...]]:
    """The store's rows: key, portal, removed_at."""
    with sqlite3.connect(tmp_path / "tokens.db") as raw:
        return raw.execute(
            "SELECT key, portal, removed_at FROM authorizations ORDER BY key").fetchall()


class TestInstallClaims:
    async def test_an_install_claiming_a_held_portals_member_id_is_refused(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """B (allowed) sends an install naming A's member_id, with its own valid token or with
        A's client_endpoint: refused both ways; A's calls still reach A with A's token."""
        sidecar = await start()
        assert (await sidecar.install(market.a))[0] == 200
        status, body = await sidecar.install(market.b, member_id=market.a.member_id)
        assert status == 403, body
        status, body = await sidecar.install(
            market.b, member_id=market.a.member_id,
            client_endpoint=f"{market.a.base_url}/rest/")
        assert status == 403, body
        status, body = await sidecar.install(
            market.b, member_id=market.a.member_id.upper(),
            application_token=market.a.application_token(CLIENT_ID))
        assert status == 403, body
        before = served(market.a)
        assert (await sidecar.call(f"/portal/{market.a.member_id}/rest/profile"))[0] == 200
        assert served(market.a) == before + 1
        _, summary = await sidecar.status()
        assert summary["portals"] == 1

    async def test_a_new_member_id_at_a_held_portals_address_is_refused(
        self, market: Market, start: Callable[..., Any], tmp_path: Path
    ) -> None:
        """A's own event under a made-up member_id, and B's token posing at A's endpoint under
        a made-up member_id: refused, nothing added, nothing stored."""
        sidecar = await start()
        await sidecar.install(market.a)
        status, body = await sidecar.install(market.a, member_id="f" * 32)
        assert status in (400, 403), body
        status, body = await sidecar.install(
            market.b, member_id="e" * 32, client_endpoint=f"{market.a.base_url}/rest/")
        assert status == 403, body
        _, summary = await sidecar.status()
        assert summary["portals"] == 1
        assert [row[0] for row in rows(tmp_path)] == [market.a.member_id]

    async def test_an_install_cannot_squat_a_member_id_not_held_yet(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """B (allowed, an attacker's portal) installs first under A's member_id, which the
        payload alone asserts: the portal's real install afterwards must still be taken, and
        calls naming A's member_id must never reach B."""
        sidecar = await start()
        await sidecar.install(market.b, member_id=market.a.member_id)
        status, body = await sidecar.install(market.a)
        assert status == 200, body
        before = served(market.b)
        assert (await sidecar.call(f"/portal/{market.a.member_id}/rest/profile"))[0] == 200
        assert served(market.b) == before


class TestReplays:
    async def test_a_replayed_install_event_changes_nothing(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """The same install event, sent again and again at once: the portal is held once and
        serves throughout; no second bundle is left in the registry or the schedule."""
        sidecar = await start()
        url = sidecar.url("/oauth/install")
        pair = market.a.issue_tokens(CLIENT_ID)
        form = {"event": "ONAPPINSTALL", "data[VERSION]": "1"} | {
            f"auth[{key}]": str(value) for key, value in (pair | {
                "application_token": market.a.application_token(CLIENT_ID),
                "domain": host(market.a)}).items()}
        async def post() -> int:
            async with sidecar.proxy.session.post(url, data=form) as response:
                return int(response.status)
        statuses = await asyncio.gather(*(post() for _ in range(8)))
        assert 200 in statuses, statuses
        status, body = await sidecar.call(f"/portal/{host(market.a)}/rest/profile")
        assert status == 200, body
        portals = sidecar.proxy.app[PORTALS]
        assert len(portals) == 1
        assert len(portals.scheduler) == 1
        # Replayed later, with the working pair held: a no-op or a refusal, never a removal.
        async with sidecar.proxy.session.post(url, data=form) as response:
            assert response.status in (200, 403)
        assert (await sidecar.call(f"/portal/{host(market.a)}/rest/profile"))[0] == 200


class TestUninstall:
    async def test_uninstall_naming_a_with_bs_application_token_is_refused(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """A's uninstall event signed with B's token, and one naming a forged member_id with
        A's token: refused; both portals still serve."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        url = sidecar.url("/oauth/install")
        form = {"event": "ONAPPUNINSTALL", "auth[member_id]": market.a.member_id,
                "auth[application_token]": market.b.application_token(CLIENT_ID)}
        async with sidecar.proxy.session.post(url, data=form) as response:
            assert response.status == 403
        for member_id in ("0" * 32, market.a.member_id.upper() + "x", host(market.b), ""):
            form = {"event": "ONAPPUNINSTALL", "auth[member_id]": member_id,
                    "auth[application_token]": market.a.application_token(CLIENT_ID)}
            async with sidecar.proxy.session.post(url, data=form) as response:
                assert response.status == 403, member_id
        for portal in (market.a, market.b):
            assert (await sidecar.call(f"/portal/{host(portal)}/rest/profile"))[0] == 200


class TestUiInstall:
    async def test_a_ui_install_adds_a_new_portal_but_replaces_no_held_one(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """The install page's POST (AUTH_ID, no application token) adds A; a second one, or
        B's naming A's member_id, does not replace it."""
        sidecar = await start()
        status, body = await sidecar.install(market.a, ui=True)
        assert status == 200, body
        status, body = await sidecar.install(market.a, ui=True)
        assert status == 403, body
        status, body = await sidecar.install(market.b, ui=True, member_id=market.a.member_id)
        assert status == 403, body
        assert (await sidecar.call(f"/portal/{host(market.a)}/rest/profile"))[0] == 200


class TestNames:
    async def test_near_names_of_a_held_portal_are_unknown(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """A prefix, a suffix, a port-less or other-port host, a member_id with a character
        more or less: 404 (or 400), never A."""
        sidecar = await start()
        await sidecar.install(market.a)
        await sidecar.install(market.b)
        a = URL(market.a.base_url)
        before = served(market.a) + served(market.b)
        for name in (f"{a.host}", f"{a.host}:{a.port}0", f"x{a.host}:{a.port}",
                     f"{a.host}.:{a.port}", market.a.member_id[:-1],
                     market.a.member_id + "0", f"{a.host}:{a.port}x"):
            status, body = await sidecar.call(f"/portal/{name}/rest/profile")
            assert status in (400, 404), (name, body)
            status, body = await sidecar.call("/rest/profile", **{"X-Bitrix-Portal": name})
            assert status in (400, 404), (name, body)
        assert served(market.a) + served(market.b) == before


class TestTokenAnswers:
    async def test_a_token_answer_naming_another_member_id_renames_nothing(
        self, market: Market, market_settings: Callable[..., Settings],
        aiohttp_client: Callable[..., Any], tmp_path: Path,
    ) -> None:
        """A's stored refresh token turns out to be B's (the OAuth server's answer names B's
        member_id): the answer does not make A's authorization B's, so calls naming B's
        member_id still go to B's own authorization, and A keeps its name."""
        settings = market_settings()
        first, _ = await serve(aiohttp_client, settings)
        await first.install(market.a)
        await first.install(market.b)
        foreign = market.b.issue_tokens(CLIENT_ID)["refresh_token"]
        with sqlite3.connect(tmp_path / "tokens.db") as raw:
            raw.execute("UPDATE authorizations SET refresh_token = ?, "
                        "seq = (SELECT MAX(seq) + 1 FROM authorizations) WHERE key = ?",
                        (foreign, market.a.member_id))
        sidecar, app = await serve(aiohttp_client, settings, watch_interval=0.05)
        market.a.expire_access_tokens()
        with structlog.testing.capture_logs() as logs:
            await sidecar.call(f"/portal/{host(market.a)}/rest/profile")
            await asyncio.sleep(0.3)  # the watch indexes what was written
        portals = app[PORTALS]
        assert portals.find(market.b.member_id).key == market.b.member_id
        held = portals.find(market.a.member_id)
        assert held is not None
        assert held.key == market.a.member_id
        assert held.member_id == market.a.member_id
        assert any(entry["event"] == "member_id_refused" for entry in logs), logs
        before = served(market.b)
        assert (await sidecar.call(f"/portal/{market.b.member_id}/rest/profile"))[0] == 200
        assert served(market.b) == before + 1


class TestSchedule:
    async def test_an_installed_portal_joins_the_one_schedule(
        self, market: Market, start: Callable[..., Any]
    ) -> None:
        """An installed portal is renewed by the one scheduler (rate-capped, spread), not by
        tasks of its own: a task pair per portal would not scale to thousands."""
        sidecar = await start()
        await sidecar.install(market.a)
        portals = sidecar.proxy.app[PORTALS]
        held = portals.find(market.a.member_id)
        assert held is not None
        assert (len(portals.scheduler), held.tasks) == (1, [])


class TestFlood:
    async def test_refused_installs_leave_nothing_behind(
        self, market: Market, start: Callable[..., Any], tmp_path: Path
    ) -> None:
        """Many install events with random member_ids (outside the list, forged tokens, a held
        portal's address): each is refused and leaves no bundle, schedule entry or row."""
        sidecar = await start()
        await sidecar.install(market.a)
        url = sidecar.url("/oauth/install")
        for n in range(60):
            member_id = secrets.token_hex(16)
            if n % 3 == 0:
                status, _ = await sidecar.install(market.c, member_id=member_id)
            elif n % 3 == 1:
                status, _ = await sidecar.install(market.a, member_id=member_id)
            else:
                form = {"event": "ONAPPINSTALL", "auth[member_id]": member_id,
                        "auth[access_token]": secrets.token_hex(16),
                        "auth[refresh_token]": secrets.token_hex(16),
                        "auth[client_endpoint]": f"{market.b.base_url}/rest/",
                        "auth[application_token]": secrets.token_hex(16)}
                async with sidecar.proxy.session.post(url, data=form) as response:
                    status = response.status
            assert status in (400, 403), n
        portals = sidecar.proxy.app[PORTALS]
        assert (len(portals), len(portals.scheduler)) == (1, 1)
        assert [row[0] for row in rows(tmp_path)] == [market.a.member_id]


class TestSecrets:
    async def test_no_secret_in_status_metrics_or_portal_events(
        self, market: Market, market_settings: Callable[..., Settings],
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """/status, /status?portal=, /metrics (per-portal labels on) and the portal_added and
        portal_removed log events name no token, secret or application token."""
        settings = market_settings(SIDECAR_METRICS_PER_PORTAL="on")
        with structlog.testing.capture_logs() as logs:
            sidecar, _ = await serve(aiohttp_client, settings)
            await sidecar.install(market.a)
            await sidecar.install(market.b)
            market.b.expire_access_tokens()
            await sidecar.call(f"/portal/{host(market.b)}/rest/profile")
            texts = [json.dumps((await sidecar.status())[1]),
                     json.dumps((await sidecar.status(f"?portal={market.a.member_id}"))[1])]
            async with sidecar.admin.get("/metrics") as response:
                texts.append(await response.text())
            await market.a.send_uninstall_event(sidecar.url("/oauth/install"), CLIENT_ID)
        texts.append(json.dumps(logs, default=str))
        assert any(entry["event"] == "portal_removed" for entry in logs)
        assert any(entry["event"] == "portal_added" for entry in logs)
        shown = "\n".join(texts)
        secrets_ = [*market.emulator.issued_secrets(), settings.client_secret,
                    market.a.application_token(CLIENT_ID),
                    market.b.application_token(CLIENT_ID)]
        assert [s for s in secrets_ if s and s in shown] == []
