"""Authorization without the race: browser callback, install events, re-authorization."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import create_app, create_oauth_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OffsetClock, tokens_of

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def unauthorized(
    make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any],
    emulator: Emulator,
) -> Client:
    """Serve a sidecar with no token, whose callback is the app's handler address."""
    client: Client = await aiohttp_client(create_app(make_settings(), watch_interval=0.05))
    emulator.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user",
                          redirect_uri=str(client.make_url("/oauth/callback")))
    return client


def url(client: Client, path: str) -> str:
    """Return the absolute address of ``path`` on a served app."""
    return str(client.make_url(path))


class TestCallback:
    async def test_browser_round_trip_authorizes(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """/oauth/start -> portal approval -> /oauth/callback stores the pair; calls then work."""
        assert (await unauthorized.get("/rest/profile")).status == 503
        async with aiohttp.ClientSession() as browser, browser.get(
            url(unauthorized, "/oauth/start")
        ) as page:
            assert page.status == 200
            text = await page.text()
            hops = [str(r.url) for r in page.history]
        assert "/oauth/authorize/?client_id=" in hops[1]
        assert "state=" in hops[1]
        assert "bitrix-sidecar is authorized" in text
        assert emulator.member_id in text
        assert "crm,user" in text
        pair = tokens_of(unauthorized).pair
        assert pair is not None
        assert pair.access_token not in text
        assert pair.refresh_token not in text
        assert (await unauthorized.get("/rest/profile")).status == 200

    async def _callback_url(self, client: Client) -> str:
        """Walk /oauth/start and the portal, stopping before the callback is called."""
        async with aiohttp.ClientSession() as browser:
            async with browser.get(url(client, "/oauth/start"), allow_redirects=False) as start:
                portal = start.headers["Location"]
            async with browser.get(portal, allow_redirects=False) as approve:
                return approve.headers["Location"]

    async def test_replayed_state_is_refused(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A state is good once: a second callback with it is refused (no login CSRF)."""
        callback = await self._callback_url(unauthorized)
        async with aiohttp.ClientSession() as browser:
            async with browser.get(callback) as first:
                assert first.status == 200
            replay = callback.replace(callback.split("code=")[1].split("&")[0],
                                      emulator.issue_code(CLIENT_ID))
            async with browser.get(replay) as second:
                assert second.status == 403
                assert (await second.json())["error"] == "SIDECAR_REFUSED"
        assert emulator.stats.token_requests["authorization_code"] == 1

    @pytest.mark.parametrize("state", ["", "made-up-state"])
    async def test_unknown_state_is_refused(
        self, unauthorized: Client, emulator: Emulator, state: str
    ) -> None:
        """A callback this sidecar did not start is refused before any code exchange."""
        code = emulator.issue_code(CLIENT_ID)
        response = await unauthorized.get(f"/oauth/callback?code={code}&state={state}")
        assert response.status == 403
        assert emulator.stats.token_requests["authorization_code"] == 0
        assert tokens_of(unauthorized).pair is None

    async def test_code_used_after_30_seconds(
        self, unauthorized: Client, emulator: Emulator, emulator_clock: OffsetClock
    ) -> None:
        """A code older than 30 seconds fails clearly, saying what to do."""
        callback = await self._callback_url(unauthorized)
        emulator_clock.offset += 31
        async with aiohttp.ClientSession() as browser, browser.get(callback) as response:
            assert response.status == 400
            body = await response.json()
        assert "30 seconds" in body["error_description"]
        assert "/oauth/start" in body["error_description"]
        assert tokens_of(unauthorized).pair is None

    async def test_callback_from_another_portal_is_refused(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A callback whose domain is not the configured portal is refused."""
        callback = await self._callback_url(unauthorized)
        forged = callback.replace("domain=", "domain=evil.bitrix24.com&x=")
        async with aiohttp.ClientSession() as browser, browser.get(forged) as response:
            assert response.status == 403
        assert emulator.stats.token_requests["authorization_code"] == 0


class TestInstallEvents:
    async def test_onappinstall_authorizes_without_a_code(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """ONAPPINSTALL's pair is verified, stored with its application_token, and used."""
        status, body = await emulator.send_install_event(
            url(unauthorized, "/oauth/install"), CLIENT_ID)
        assert status == 200, body
        tokens = tokens_of(unauthorized)
        assert tokens.status()["state"] == "valid"
        assert tokens.pair is not None
        assert tokens.pair.application_token == emulator.application_token(CLIENT_ID)
        assert (await unauthorized.get("/rest/profile")).status == 200
        assert emulator.stats.token_requests["authorization_code"] == 0

    async def test_ui_install_page(self, unauthorized: Client, emulator: Emulator) -> None:
        """A UI app's install POST stores the pair and answers the installFinish page."""
        status, body = await emulator.send_install_event(
            url(unauthorized, "/oauth/install"), CLIENT_ID, ui=True)
        assert status == 200
        assert "BX24.installFinish" in body
        assert (await unauthorized.get("/rest/profile")).status == 200
        assert tokens_of(unauthorized).status()["scope"] == "crm,user"

    async def test_later_events_must_carry_the_stored_application_token(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """After the first install, events with another application_token are refused."""
        hook = url(unauthorized, "/oauth/install")
        assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200
        held = tokens_of(unauthorized).pair
        status, _ = await emulator.send_install_event(hook, CLIENT_ID,
                                                      application_token="forged")
        assert status == 403
        assert tokens_of(unauthorized).pair == held

    @pytest.mark.parametrize(
        "forge",
        [{"member_id": "someone-else"}, {"client_endpoint": "https://evil.example/rest/"}],
    )
    async def test_payload_for_another_portal_is_refused(
        self, unauthorized: Client, emulator: Emulator, forge: dict[str, str]
    ) -> None:
        """A member_id or client_endpoint that is not the authorized portal's is refused."""
        hook = url(unauthorized, "/oauth/install")
        if "member_id" in forge:  # member_id can only clash with an authorized portal
            assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200
        held = tokens_of(unauthorized).pair
        status, body = await emulator.send_install_event(
            hook, CLIENT_ID, member_id=forge.get("member_id"),
            client_endpoint=forge.get("client_endpoint"),
        )
        assert status == 403, body
        assert tokens_of(unauthorized).pair == held

    async def test_tokens_the_portal_rejects_are_not_stored(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A forged event with made-up tokens is refused after the portal says no."""
        form = {
            "event": "ONAPPINSTALL", "auth[access_token]": "f" * 64,
            "auth[refresh_token]": "e" * 64, "auth[expires_in]": "3600",
            "auth[member_id]": emulator.member_id,
            "auth[client_endpoint]": f"{emulator.base_url}/rest/",
            "auth[application_token]": "x",
        }
        response = await unauthorized.post("/oauth/install", data=form)
        assert response.status == 403
        assert tokens_of(unauthorized).pair is None

    async def test_uninstall_requires_a_person_again(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """ONAPPUNINSTALL (with the right token) ends the authorization, loudly."""
        hook = url(unauthorized, "/oauth/install")
        assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200
        status, _ = await emulator.send_install_event(hook, CLIENT_ID, event="ONAPPUNINSTALL")
        assert status == 200
        response = await unauthorized.get("/rest/profile")
        assert response.status == 503
        body = await response.json()
        assert body["error"] == "SIDECAR_REAUTHORIZATION_REQUIRED"
        assert "/oauth/authorize/?client_id=" in body["error_description"]
        # A new pair by any path ends it, without a restart.
        assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200
        assert (await unauthorized.get("/rest/profile")).status == 200

    async def test_not_an_install_payload(self, unauthorized: Client) -> None:
        """Anything else POSTed to /oauth/install is a clear 400."""
        response = await unauthorized.post("/oauth/install", data={"hello": "world"})
        assert response.status == 400
        assert (await response.json())["error"] == "SIDECAR_BAD_REQUEST"


class TestOAuthListener:
    async def test_separate_listener_serves_only_oauth(
        self, unauthorized: Client, emulator: Emulator, aiohttp_client: Callable[..., Any]
    ) -> None:
        """SIDECAR_OAUTH_LISTEN takes install events and never proxies or shows a token."""
        oauth: Client = await aiohttp_client(create_oauth_app(unauthorized.app))
        status, body = await emulator.send_install_event(url(oauth, "/oauth/install"),
                                                         CLIENT_ID)
        assert status == 200, body
        assert (await unauthorized.get("/rest/profile")).status == 200
        for path in ("/rest/profile", "/token", "/metrics"):
            response = await oauth.get(path)
            assert response.status == 404
            assert (await response.json())["error"] == "SIDECAR_NOT_FOUND"
        start = await oauth.get("/oauth/start", allow_redirects=False)
        assert start.status == 302
        assert [c.method for c in emulator.rest_log] == ["app.info", "profile"]
