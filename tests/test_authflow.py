"""Authorization without the race: browser callback, install events, re-authorization."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import SETTINGS, create_app, create_oauth_app
from sidecar.authorization import Consent, replacement_refusal
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.grants import issue_link, open_install_window
from sidecar.storage import TokenPair
from sidecar.store import TokenStore
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


def browser_session() -> aiohttp.ClientSession:
    """A session that keeps cookies as a browser does, for loopback addresses too."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def make_link(client: Client) -> str:
    """Make a one-time start link in the sidecar's store, as 'authorize-link' does."""
    settings = client.app[SETTINGS]
    async with TokenStore(settings.db_path, portal=settings.portal,
                          client_id=settings.client_id) as store:
        return await issue_link(store)


def url(client: Client, path: str) -> str:
    """Return the absolute address of ``path`` on a served app."""
    return str(client.make_url(path))


def origin(client: Client) -> str:
    """The origin of a served app, as its own pages send it."""
    return str(client.make_url("/")).rstrip("/")


async def press_start(client: Client, browser: aiohttp.ClientSession,
                      start: str = "/oauth/start") -> aiohttp.ClientResponse:
    """Open the start page in ``browser`` and press its button; return the unread answer."""
    async with browser.get(url(client, start)) as page:
        assert page.status == 200, await page.text()
        assert "<form method='post' action='/oauth/start'>" in await page.text()
    link = start.partition("link=")[2]
    return await browser.post(url(client, "/oauth/start"), data={"link": link} if link else {},
                              headers={"Origin": origin(client)}, allow_redirects=False)


async def callback_url(client: Client, browser: aiohttp.ClientSession,
                       start: str = "/oauth/start") -> str:
    """Walk /oauth/start and the portal in ``browser``, stopping before the callback."""
    async with await press_start(client, browser, start) as started:
        assert started.status == 303, await started.text()
        portal = started.headers["Location"]
    async with browser.get(portal, allow_redirects=False) as approve:
        return approve.headers["Location"]


class TestCallback:
    async def test_browser_round_trip_authorizes(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """/oauth/start -> portal approval -> /oauth/callback stores the pair; calls then work."""
        assert (await unauthorized.get("/rest/profile")).status == 503
        async with browser_session() as browser:
            async with await press_start(unauthorized, browser) as started:
                portal = started.headers["Location"]
            async with browser.get(portal) as page:
                assert page.status == 200
                text = await page.text()
        assert "/oauth/authorize/?client_id=" in portal
        assert "state=" in portal
        assert "bitrix-sidecar is authorized" in text
        assert emulator.member_id in text
        assert "crm,user" in text
        pair = tokens_of(unauthorized).pair
        assert pair is not None
        assert pair.access_token not in text
        assert pair.refresh_token not in text
        assert (await unauthorized.get("/rest/profile")).status == 200


    async def test_replayed_state_is_refused(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A state is good once: a second callback with it is refused (no login CSRF)."""
        async with browser_session() as browser:
            callback = await callback_url(unauthorized, browser)
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
        async with browser_session() as browser:
            callback = await callback_url(unauthorized, browser)
            emulator_clock.offset += 31
            async with browser.get(callback) as response:
                assert response.status == 400
                body = await response.json()
        assert "30 seconds" in body["error_description"]
        assert "/oauth/start" in body["error_description"]
        assert tokens_of(unauthorized).pair is None

    async def test_callback_from_another_portal_is_refused(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A callback whose domain is not the configured portal is refused."""
        async with browser_session() as browser:
            callback = await callback_url(unauthorized, browser)
            forged = callback.replace("domain=", "domain=evil.bitrix24.com&x=")
            async with browser.get(forged) as response:
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
        # Nothing starts there unbidden, even from loopback: only the operator's link works.
        start = await oauth.get("/oauth/start", allow_redirects=False)
        assert start.status == 403
        assert (await start.json())["error"] == "SIDECAR_REFUSED"
        link = await make_link(unauthorized)
        start = await oauth.post("/oauth/start", data={"link": link},
                                 headers={"Origin": origin(oauth)}, allow_redirects=False)
        assert start.status == 303
        assert [c.method for c in emulator.rest_log] == ["app.info", "profile", "profile"]


async def authorize_as_operator(client: Client, emulator: Emulator, user_id: int = 1) -> None:
    """Authorize through the browser flow from the pod's loopback, as user ``user_id``."""
    emulator.signed_in_user = user_id
    async with browser_session() as browser:
        callback = await callback_url(client, browser)
        async with browser.get(callback) as done:
            assert done.status == 200, await done.text()
    emulator.signed_in_user = 1


async def open_window(client: Client, user_id: str) -> None:
    """Open an install window in the sidecar's store, as 'expect-install' does."""
    settings = client.app[SETTINGS]
    async with TokenStore(settings.db_path, portal=settings.portal,
                          client_id=settings.client_id) as store:
        await open_install_window(store, user_id)


class TestTakeover:
    """Section 1 of the hardening: nobody but the operator replaces or kills a working pair."""

    async def test_a_stranger_cannot_finish_the_operators_flow(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A state used from another browser (no cookie, or another one) is refused and stays
        good for the browser that started it."""
        await authorize_as_operator(unauthorized, emulator)
        held = tokens_of(unauthorized).pair
        async with browser_session() as operator:
            callback = await callback_url(unauthorized, operator)
            state = callback.split("state=")[1].split("&")[0]
            attacker_code = emulator.issue_code(CLIENT_ID, user_id=7)
            forged = url(unauthorized, f"/oauth/callback?code={attacker_code}&state={state}")
            async with browser_session() as attacker:
                async with attacker.get(forged) as response:
                    assert response.status == 403
                    assert "browser that started" in (await response.json())[
                        "error_description"]
                attacker.cookie_jar.update_cookies({"bitrix_sidecar_flow": "guessed"})
                async with attacker.get(forged) as response:
                    assert response.status == 403
            assert tokens_of(unauthorized).pair == held
            assert emulator.stats.token_requests["authorization_code"] == 1
            async with operator.get(callback) as response:
                assert response.status == 200
        assert tokens_of(unauthorized).pair != held

    async def test_the_oauth_listener_starts_nothing_without_a_link(
        self, unauthorized: Client, emulator: Emulator, aiohttp_client: Callable[..., Any]
    ) -> None:
        """On the publishable listener a start needs the operator's link, good once."""
        oauth: Client = await aiohttp_client(create_oauth_app(unauthorized.app))
        for link in ("", "made-up"):
            response = await oauth.get(f"/oauth/start?link={link}")
            assert response.status == 403, link
            assert (await response.json())["error"] == "SIDECAR_REFUSED"
            response = await oauth.post("/oauth/start", data={"link": link},
                                        headers={"Origin": origin(oauth)})
            assert response.status == 403, link
        link = await make_link(unauthorized)
        async with browser_session() as browser:
            # Opening the page (as a chat's link preview does) leaves the link unused.
            for _ in range(3):
                async with browser.get(url(oauth, f"/oauth/start?link={link}")) as page:
                    assert page.status == 200
            callback = await callback_url(oauth, browser, f"/oauth/start?link={link}")
            async with browser.get(callback.replace(
                    str(unauthorized.make_url("/")), str(oauth.make_url("/")))) as done:
                assert done.status == 200, await done.text()
            # Used up: the same link starts nothing again.
            async with browser.get(url(oauth, f"/oauth/start?link={link}")) as again:
                assert again.status == 403

    @pytest.mark.parametrize("headers", [
        {}, {"Origin": "https://attacker.example"}, {"Origin": "null"},
        {"Origin": "http://127.0.0.1:1"},  # another port of the same machine: another origin
    ])
    async def test_the_start_button_is_pressed_only_on_its_own_page(
        self, unauthorized: Client, headers: dict[str, str]
    ) -> None:
        """A POST to /oauth/start from no page or another page starts nothing (no login CSRF
        through a browser without Fetch Metadata)."""
        link = await make_link(unauthorized)
        response = await unauthorized.post("/oauth/start", data={"link": link}, headers=headers,
                                           allow_redirects=False)
        assert response.status == 403
        assert (await response.json())["error"] == "SIDECAR_REFUSED"
        async with browser_session() as browser:  # the link is still good
            assert await callback_url(unauthorized, browser, f"/oauth/start?link={link}")

    async def test_the_start_page_cannot_be_framed_or_cached(self, unauthorized: Client) -> None:
        """Its button must not be clickjacking's target."""
        response = await unauthorized.get("/oauth/start")
        assert response.status == 200
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Cache-Control"] == "no-store"

    async def test_the_cookie_is_secure_where_the_flow_runs_on_https(
        self, make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any],
        emulator: Emulator,
    ) -> None:
        """Secure on an https public address; not on http, where browsers would drop it."""
        for public, secure in (("https://sidecar.example.com", True),
                               ("http://sidecar.example.com", False)):
            app = create_app(make_settings(public_url=public))
            proxy: Client = await aiohttp_client(app)
            oauth: Client = await aiohttp_client(create_oauth_app(proxy.app))
            link = await make_link(proxy)
            response = await oauth.post(
                "/oauth/start", data={"link": link},
                headers={"Origin": public, "Host": public.split("://")[1]},
                allow_redirects=False)
            assert response.status == 303, await response.text()
            cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=Lax" in cookie
            assert ("Secure" in cookie) is secure

    async def test_a_flood_of_starts_does_not_evict_the_operators_flow(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """Thousands of starts from loopback leave a flow begun from a link intact."""
        link = await make_link(unauthorized)
        async with browser_session() as operator:
            callback = await callback_url(unauthorized, operator, f"/oauth/start?link={link}")
            for _ in range(1200):
                response = await unauthorized.post("/oauth/start",
                                                   headers={"Origin": origin(unauthorized)},
                                                   allow_redirects=False)
                assert response.status == 303
            async with operator.get(callback) as done:
                assert done.status == 200, await done.text()

    async def test_a_start_sent_by_another_site_is_refused(self, unauthorized: Client) -> None:
        """A page elsewhere cannot make the operator's browser begin a flow from loopback."""
        posted = {"Sec-Fetch-Site": "Cross-Site", "Sec-Fetch-Mode": "navigate",
                  "Origin": origin(unauthorized)}
        response = await unauthorized.post("/oauth/start", headers=posted,
                                           allow_redirects=False)
        assert response.status == 403
        link = await make_link(unauthorized)
        navigation = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        response = await unauthorized.get(f"/oauth/start?link={link}", headers=navigation)
        assert response.status == 200  # the operator's link, clicked in a chat: its page

    async def test_ui_install_cannot_replace_a_pair_proven_by_an_application_token(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """After an install event stored its token, a plain install-page POST is refused."""
        hook = url(unauthorized, "/oauth/install")
        assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200
        held = tokens_of(unauthorized).pair
        status, body = await emulator.send_install_event(hook, CLIENT_ID, ui=True)
        assert status == 403, body
        assert "expect-install" in body
        assert tokens_of(unauthorized).pair == held

    @pytest.mark.parametrize("headers", [
        {"Origin": "https://attacker.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "HTTPS://ATTACKER.EXAMPLE"},
        {"Sec-Fetch-Site": "CROSS-SITE"},
        {"Sec-Fetch-Site": " same-site "},
        {"Origin": "null"},
    ])
    async def test_cross_site_install_posts_are_refused(
        self, unauthorized: Client, emulator: Emulator, headers: dict[str, str]
    ) -> None:
        """A web page posting an install page form to the loopback listener gets 403."""
        status, body = await emulator.send_install_event(
            url(unauthorized, "/oauth/install"), CLIENT_ID, ui=True, headers=headers)
        assert status == 403, body
        assert set(json.loads(body)) == {"error", "error_description"}
        assert tokens_of(unauthorized).pair is None
        assert emulator.rest_log == type(emulator.rest_log)()  # the portal was never asked

    async def test_the_portals_own_install_page_may_post(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """The install page the portal itself serves posts from the portal's origin."""
        status, body = await emulator.send_install_event(
            url(unauthorized, "/oauth/install"), CLIENT_ID, ui=True,
            headers={"Origin": emulator.base_url, "Sec-Fetch-Site": "cross-site"})
        assert status == 200, body
        pair = tokens_of(unauthorized).pair
        assert pair is not None
        assert pair.user_id == "1"  # asked of the portal: the install page does not say

    @pytest.mark.parametrize("name", ["Origin", "Sec-Fetch-Site", "Host"])
    async def test_a_repeated_header_is_refused(self, unauthorized: Client, name: str) -> None:
        """Two values of a header the checks read make the request unreadable, not lucky."""
        port = unauthorized.make_url("/").port
        values = {"Origin": ["http://127.0.0.1", "https://attacker.example"],
                  "Sec-Fetch-Site": ["same-origin", "cross-site"],
                  "Host": [f"127.0.0.1:{port}", "attacker.example"]}[name]
        head = "".join(f"{name}: {value}\r\n" for value in values)
        if name != "Host":
            head = f"Host: 127.0.0.1:{port}\r\n" + head
        for target in ("/oauth/install", "/rest/profile"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST {target} HTTP/1.1\r\n{head}Content-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            status = int(answer.split(b" ", 2)[1])
            assert status in (400, 403), (target, answer)

    async def test_the_first_install_event_does_not_win_over_a_working_pair(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """Authorized by the operator (no application token): a forged install cannot set one
        nor replace the pair, and a forged uninstall cannot kill it."""
        await authorize_as_operator(unauthorized, emulator)
        held = tokens_of(unauthorized).pair
        assert held is not None
        assert not held.application_token
        hook = url(unauthorized, "/oauth/install")
        status, body = await emulator.send_install_event(
            hook, CLIENT_ID, user_id=7, application_token="chosen-by-attacker")
        assert status == 403, body
        status, body = await emulator.send_install_event(
            hook, CLIENT_ID, event="ONAPPUNINSTALL", application_token="chosen-by-attacker")
        assert status == 403, body
        status, body = await emulator.send_install_event(
            hook, CLIENT_ID, event="ONAPPUNINSTALL", application_token="")
        assert status == 403, body
        assert tokens_of(unauthorized).pair == held
        assert tokens_of(unauthorized).status()["state"] == "valid"
        assert (await unauthorized.get("/rest/profile")).status == 200
        assert [c.method for c in emulator.rest_log] == ["profile"]  # no app.info was asked

    async def test_a_reinstall_must_be_for_the_same_user(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """The stored application token renews the pair for its user, not for another."""
        hook = url(unauthorized, "/oauth/install")
        assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200
        held = tokens_of(unauthorized).pair
        status, body = await emulator.send_install_event(hook, CLIENT_ID, user_id=7)
        assert status == 403, body
        assert "only the operator can change the user" in body
        assert tokens_of(unauthorized).pair == held
        status, body = await emulator.send_install_event(hook, CLIENT_ID, user_id=1)
        assert status == 200, body
        assert tokens_of(unauthorized).pair != held

    async def test_an_install_window_lets_one_install_replace_the_pair(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """The operator's window admits one install, for the user it names, then closes."""
        await authorize_as_operator(unauthorized, emulator)
        hook = url(unauthorized, "/oauth/install")
        await open_window(unauthorized, "1")
        held = tokens_of(unauthorized).pair
        status, body = await emulator.send_install_event(hook, CLIENT_ID, user_id=7)
        assert status == 403, body  # another user: the window stays open for user 1
        assert tokens_of(unauthorized).pair == held
        status, body = await emulator.send_install_event(hook, CLIENT_ID, user_id=1)
        assert status == 200, body
        pair = tokens_of(unauthorized).pair
        assert pair is not None
        assert pair.application_token == emulator.application_token(CLIENT_ID)
        status, body = await emulator.send_install_event(hook, CLIENT_ID, ui=True)
        assert status == 403, body  # used up
        await open_window(unauthorized, "*")
        status, body = await emulator.send_install_event(hook, CLIENT_ID, ui=True)
        assert status == 200, body

    async def test_the_operators_flow_may_change_the_user(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A browser flow the operator started may switch the acting user, and says so."""
        await authorize_as_operator(unauthorized, emulator, user_id=1)
        emulator.signed_in_user = 7
        async with browser_session() as browser:
            callback = await callback_url(unauthorized, browser)
            async with browser.get(callback) as done:
                assert done.status == 200
                assert "now acts as user 7" in await done.text()
        pair = tokens_of(unauthorized).pair
        assert pair is not None
        assert pair.user_id == "7"


def held_pair(user_id: str = "1", application_token: str = "app-token") -> TokenPair:  # noqa: S107 - a test value
    """A working pair as an install left it."""
    return TokenPair("access", "refresh", 0.0, member_id="m1", user_id=user_id,
                     application_token=application_token)


class TestReplacementRule:
    """Who may replace a held pair, as a table."""

    @pytest.mark.parametrize(("held", "working", "new_user", "consent", "proof", "allowed"), [
        (None, False, "7", Consent.NONE, "", True),  # nothing held: the first install is taken
        (held_pair(), False, "7", Consent.NONE, "", True),  # a dead pair: anyone verified
        (held_pair(), True, "1", Consent.NONE, "", False),  # a working pair: not unproven
        (held_pair(), True, "7", Consent.OPERATOR, "", True),  # the operator may change all
        (held_pair(), True, "1", Consent.APPLICATION_TOKEN, "app-token", True),
        (held_pair(), True, "7", Consent.APPLICATION_TOKEN, "app-token", False),  # other user
        (held_pair(), True, "", Consent.APPLICATION_TOKEN, "app-token", False),  # unknown user
        (held_pair(), True, "1", Consent.APPLICATION_TOKEN, "forged", False),
        (held_pair(application_token=""), True, "1", Consent.APPLICATION_TOKEN, "", False),
    ])
    def test_rule(  # noqa: PLR0917 - one table row
        self, held: TokenPair | None, working: bool, new_user: str,
        consent: Consent, proof: str, allowed: bool,
    ) -> None:
        """Each row: whether the replacement is allowed."""
        new = TokenPair("a2", "r2", 0.0, member_id="m1", user_id=new_user)
        assert (replacement_refusal(held, working, new, consent, proof) == "") is allowed

    def test_another_member_is_refused_even_with_the_token(self) -> None:
        """The stored application token does not carry a pair over to another portal member."""
        new = TokenPair("a2", "r2", 0.0, member_id="m2", user_id="1")
        assert replacement_refusal(held_pair(), True, new, Consent.APPLICATION_TOKEN,
                                   "app-token")


class TestInstallWindowAndPortalWord:
    """Found in review: the window outliving its purpose, and the payload's word on the user."""

    async def test_a_pair_stored_any_other_way_closes_the_window(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """An install window is for the next install only: a first install or the operator's
        own flow closes it, and a stranger's install is then refused."""
        hook = url(unauthorized, "/oauth/install")
        await open_window(unauthorized, "*")
        assert (await emulator.send_install_event(hook, CLIENT_ID))[0] == 200  # the first
        status, body = await emulator.send_install_event(
            hook, CLIENT_ID, user_id=7, application_token="chosen-by-attacker")
        assert status == 403, body
        await open_window(unauthorized, "*")
        await authorize_as_operator(unauthorized, emulator)
        held = tokens_of(unauthorized).pair
        status, body = await emulator.send_install_event(hook, CLIENT_ID, user_id=7, ui=True)
        assert status == 403, body
        assert tokens_of(unauthorized).pair == held

    async def test_an_install_the_portal_does_not_name_a_user_for_is_refused(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """If ``profile`` does not answer, the payload's user_id is not taken instead."""
        emulator.block_method("profile", 60)
        status, body = await emulator.send_install_event(url(unauthorized, "/oauth/install"),
                                                         CLIENT_ID)
        assert status == 403, body
        assert "which user" in body
        assert tokens_of(unauthorized).pair is None

    async def test_the_portals_scope_wins_over_the_payloads(
        self, unauthorized: Client, emulator: Emulator
    ) -> None:
        """A payload claiming more scope than app.info grants is stored with the granted one."""
        hook = url(unauthorized, "/oauth/install")
        form_scope = {"auth[scope]": "crm,user,telephony,disk"}
        async with aiohttp.ClientSession() as http:
            minted = emulator.issue_tokens(CLIENT_ID)
            form = {"event": "ONAPPINSTALL",
                    **{f"auth[{k}]": str(v) for k, v in minted.items()},
                    "auth[application_token]": "t", **form_scope}
            async with http.post(hook, data=form) as response:
                assert response.status == 200, await response.text()
        pair = tokens_of(unauthorized).pair
        assert pair is not None
        assert pair.scope == "crm,user"


async def test_a_start_form_arriving_in_pieces_is_read_whole(unauthorized: Client) -> None:
    """The button's form, sent chunked in two pieces a moment apart, still carries its link."""
    link = await make_link(unauthorized)
    body = f"link={link}".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", unauthorized.port)
    writer.write(b"POST /oauth/start HTTP/1.1\r\nHost: " + origin(unauthorized)[7:].encode()
                 + b"\r\nOrigin: " + origin(unauthorized).encode()
                 + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                 + b"%x\r\n%s\r\n" % (10, body[:10]))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 10, body[10:]))
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 303"), answer[:300]
