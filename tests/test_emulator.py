"""The Bitrix24 emulator, driven over loopback HTTP as the sidecar would drive a real portal."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from sidecar import phpquery
from sidecar.emulator import EMULATOR_KEY, Emulator, run_emulator

APP_ID = "local.emu0000000001.00000001"
APP_SECRET = "emu-secret-0123456789"
HOOK_USER = 7
HOOK_CODE = "hook0123456789ab"

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[[web.Application], Awaitable[Client]]


class FakeClock:
    """A settable clock so expiry and leaky-bucket tests need no sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        """Start at a fixed unix time."""
        self.now = now

    def __call__(self) -> float:
        """Return the current fake time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """Provide a fresh fake clock."""
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Emulator:
    """Build an emulator on the fake clock with one app and one webhook."""
    emulator = Emulator(clock=clock)
    emulator.register_app(APP_ID, APP_SECRET, scope="crm,user")
    emulator.register_webhook(HOOK_USER, HOOK_CODE)
    return emulator


@pytest.fixture
async def portal(emu: Emulator, aiohttp_client: AiohttpClient) -> Client:
    """Serve the emulator on loopback and return a client for it."""
    return await aiohttp_client(emu.create_app())


async def exchange(
    portal: Client, code: str, *, client_id: str = APP_ID, secret: str = APP_SECRET
) -> aiohttp.ClientResponse:
    """Trade an authorization code at the token endpoint."""
    params = {
        "grant_type": "authorization_code",
        "client_id": client_id,
        "client_secret": secret,
        "code": code,
    }
    return await portal.get("/oauth/token/", params=params)


async def refresh(
    portal: Client, refresh_token: str, *, client_id: str = APP_ID, secret: str = APP_SECRET
) -> aiohttp.ClientResponse:
    """Use a refresh token at the token endpoint, by POST form as some clients do."""
    data = {
        "grant_type": "refresh_token",
        "client_id": client_id,
        "client_secret": secret,
        "refresh_token": refresh_token,
    }
    return await portal.post("/oauth/token", data=data)


async def tokens(portal: Client, emu: Emulator) -> dict[str, Any]:
    """Authorize the app and return the token body."""
    response = await exchange(portal, emu.issue_code(APP_ID))
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def call(
    portal: Client, method: str, token: str | None, **params: Any
) -> tuple[int, dict[str, Any]]:
    """Call a REST method by POST JSON with the token in the header; return status and body."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = await portal.post(f"/rest/{method}.json", json=params, headers=headers)
    body: dict[str, Any] = await response.json()
    return response.status, body


# -- OAuth ---------------------------------------------------------------------------------------


async def test_code_exchange_answers_the_protocol_token_body(clock: FakeClock) -> None:
    """A fresh code trades for a pair whose body has every field the real server sends."""
    emulator = Emulator(clock=clock)
    emulator.register_app(APP_ID, APP_SECRET, scope="crm,user")
    async with run_emulator(emulator) as base_url, aiohttp.ClientSession() as session:
        assert emulator.base_url == base_url
        params = {
            "grant_type": "authorization_code",
            "client_id": APP_ID,
            "client_secret": APP_SECRET,
            "code": emulator.issue_code(APP_ID),
        }
        async with session.get(f"{base_url}/oauth/token/", params=params) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            body = await response.json()
    authority = URL(base_url).raw_authority
    assert body == {
        "access_token": body["access_token"],
        "expires": int(clock.now) + 3600,
        "expires_in": 3600,
        "scope": "crm,user",
        "domain": authority,
        "server_endpoint": f"{base_url}/rest/",
        "status": "L",
        "client_endpoint": f"{base_url}/rest/",
        "member_id": emulator.member_id,
        "user_id": 1,
        "refresh_token": body["refresh_token"],
    }
    assert re.fullmatch(r"[0-9a-f]{32}", emulator.member_id)
    for name in ("access_token", "refresh_token"):
        assert re.fullmatch(r"[0-9a-f]{64,70}", body[name])
    assert body["access_token"] != body["refresh_token"]
    assert emulator.stats.token_requests["authorization_code"] == 1


async def test_code_is_single_use(portal: Client, emu: Emulator) -> None:
    """A used code answers 400 invalid_grant, as does one never issued."""
    code = emu.issue_code(APP_ID)
    assert (await exchange(portal, code)).status == 200
    for bad in (code, "not-a-code"):
        response = await exchange(portal, bad)
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_grant"


async def test_code_expires_after_code_ttl(
    portal: Client, emu: Emulator, clock: FakeClock
) -> None:
    """A code 29 s old still works; at 30 s it answers 400 expired_token."""
    fresh = emu.issue_code(APP_ID)
    stale = emu.issue_code(APP_ID)
    clock.advance(29)
    assert (await exchange(portal, fresh)).status == 200
    clock.advance(1)
    response = await exchange(portal, stale)
    assert response.status == 400
    assert (await response.json())["error"] == "expired_token"


async def test_bad_client_credentials_are_invalid_client(portal: Client, emu: Emulator) -> None:
    """A wrong secret or an unknown client_id answers 401 invalid_client and keeps the code."""
    code = emu.issue_code(APP_ID)
    for client_id, secret in ((APP_ID, "wrong"), ("local.nobody.1", APP_SECRET)):
        response = await exchange(portal, code, client_id=client_id, secret=secret)
        assert response.status == 401
        body = await response.json()
        assert body["error"] == "invalid_client"
        assert body["error_description"]
    assert (await exchange(portal, code)).status == 200


async def test_missing_token_params_are_invalid_request(portal: Client) -> None:
    """A token request without grant_type or without the code answers 400 invalid_request."""
    for params in (
        {"client_id": APP_ID, "client_secret": APP_SECRET, "code": "x"},
        {"grant_type": "authorization_code", "client_id": APP_ID, "client_secret": APP_SECRET},
    ):
        response = await portal.get("/oauth/token/", params=params)
        assert response.status == 400
        assert (await response.json())["error"] == "invalid_request"


async def test_refresh_rotates_the_pair(portal: Client, emu: Emulator) -> None:
    """A refresh gives a new pair; the old refresh token and the old access token are dead."""
    first = await tokens(portal, emu)
    response = await refresh(portal, first["refresh_token"])
    assert response.status == 200
    second = await response.json()
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]

    again = await refresh(portal, first["refresh_token"])
    assert again.status == 400
    assert (await again.json())["error"] == "invalid_grant"

    status, body = await call(portal, "profile", first["access_token"])
    assert (status, body["error"]) == (401, "invalid_token")
    status, body = await call(portal, "profile", second["access_token"])
    assert status == 200
    assert body["result"]["ID"] == "1"

    assert emu.stats.token_requests["refresh_token"] == 2
    assert (emu.stats.refresh_ok, emu.stats.refresh_rejected) == (1, 1)
    assert [p.refresh_token for p in emu.current_tokens()] == [second["refresh_token"]]


async def test_refresh_token_belongs_to_its_client(portal: Client, emu: Emulator) -> None:
    """Another app's refresh token answers invalid_grant and stays usable by its owner."""
    emu.register_app("local.other.2", "other-secret")
    pair = await tokens(portal, emu)
    response = await refresh(
        portal, pair["refresh_token"], client_id="local.other.2", secret="other-secret"
    )
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"
    assert (await refresh(portal, pair["refresh_token"])).status == 200


async def test_revoked_refresh_tokens_are_invalid_grant(portal: Client, emu: Emulator) -> None:
    """After revoke_refresh_tokens every refresh token answers invalid_grant."""
    pair = await tokens(portal, emu)
    emu.revoke_refresh_tokens()
    response = await refresh(portal, pair["refresh_token"])
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_grant"


async def test_access_tokens_expire(portal: Client, emu: Emulator, clock: FakeClock) -> None:
    """Access tokens answer 401 expired_token after access_ttl or after expire_access_tokens."""
    first = await tokens(portal, emu)
    clock.advance(3600)
    status, body = await call(portal, "profile", first["access_token"])
    assert (status, body["error"]) == (401, "expired_token")

    second = await tokens(portal, emu)
    assert (await call(portal, "profile", second["access_token"]))[0] == 200
    emu.expire_access_tokens()
    status, body = await call(portal, "profile", second["access_token"])
    assert (status, body["error"]) == (401, "expired_token")
    third = await tokens(portal, emu)
    assert (await call(portal, "profile", third["access_token"]))[0] == 200


@pytest.mark.parametrize(
    ("failure", "status", "content_type"),
    [
        ("html", 502, "text/html"),
        ("garbage", 200, "text/plain"),
        ("500", 500, "application/json"),
        ("invalid_client", 401, "application/json"),
    ],
)
async def test_oauth_failure_modes_answer_badly(
    portal: Client, emu: Emulator, failure: Any, status: int, content_type: str
) -> None:
    """Each injected token-endpoint failure gives its status and content type, not a pair."""
    pair = await tokens(portal, emu)
    emu.oauth_failure = failure
    response = await refresh(portal, pair["refresh_token"])
    assert response.status == status
    assert response.content_type == content_type
    text = await response.text()
    assert "access_token" not in text
    if failure == "garbage":
        with pytest.raises(ValueError, match="Expecting"):
            json.loads(text)
    assert emu.stats.refresh_rejected == 1
    emu.oauth_failure = None
    assert (await refresh(portal, pair["refresh_token"])).status == 200


async def test_oauth_reset_drops_the_connection(portal: Client, emu: Emulator) -> None:
    """The "reset" failure closes the connection without any answer."""
    emu.oauth_failure = "reset"
    with pytest.raises(aiohttp.ClientConnectionError):
        await exchange(portal, emu.issue_code(APP_ID))


async def test_oauth_slow_answers_late_but_normally(portal: Client, emu: Emulator) -> None:
    """The "slow" failure waits oauth_slow_seconds and then issues the pair."""
    emu.oauth_failure = "slow"
    emu.oauth_slow_seconds = 0.05
    response = await exchange(portal, emu.issue_code(APP_ID))
    assert response.status == 200
    assert "access_token" in await response.json()


async def test_authorize_redirects_with_code_and_state(
    emu: Emulator, aiohttp_client: AiohttpClient
) -> None:
    """With a handler address, authorize redirects there with code, state, domain and scope."""
    emu.register_app("local.redir.3", "redir-secret", redirect_uri="https://app.test/cb?x=1")
    portal = await aiohttp_client(emu.create_app())
    response = await portal.get(
        "/oauth/authorize",
        params={"client_id": "local.redir.3", "state": "s-42", "response_type": "code"},
        allow_redirects=False,
    )
    assert response.status == 302
    location = URL(response.headers["Location"])
    assert location.with_query(None) == URL("https://app.test/cb")
    query = location.query
    assert query["x"] == "1"
    assert query["state"] == "s-42"
    assert query["member_id"] == emu.member_id
    assert query["scope"] == "crm,user"
    assert query["domain"] == query["server_domain"] == f"{portal.host}:{portal.port}"
    response = await exchange(
        portal, query["code"], client_id="local.redir.3", secret="redir-secret"
    )
    assert response.status == 200


async def test_authorize_without_handler_shows_the_code(portal: Client) -> None:
    """With no handler address, authorize shows the code on an HTML page."""
    response = await portal.get("/oauth/authorize/", params={"client_id": APP_ID})
    assert response.status == 200
    assert response.content_type == "text/html"
    match = re.search(r'<code id="code">([0-9a-f]+)</code>', await response.text())
    assert match is not None
    assert (await exchange(portal, match.group(1))).status == 200


async def test_authorize_unknown_client_is_a_400_page(portal: Client) -> None:
    """An unregistered client_id gets a 400 HTML page and no code."""
    response = await portal.get("/oauth/authorize/", params={"client_id": "local.nobody.1"})
    assert response.status == 400
    assert response.content_type == "text/html"


# -- REST: auth and routing ----------------------------------------------------------------------


async def test_no_credentials_is_no_auth_found(portal: Client) -> None:
    """A known method called with no token answers 401 NO_AUTH_FOUND and no time block."""
    status, body = await call(portal, "profile", None)
    assert status == 401
    assert body == {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}


async def test_unknown_method_is_404_before_auth(portal: Client, emu: Emulator) -> None:
    """An unknown method answers 404 ERROR_METHOD_NOT_FOUND even with no token, and is logged."""
    status, body = await call(portal, "crm.nothing.here", None)
    assert status == 404
    assert body == {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}
    assert emu.rest_log[-1].method == "crm.nothing.here"
    assert emu.stats.upstream_requests == 1
    assert not emu.stats.rest_calls


async def test_unknown_token_is_invalid_token(portal: Client) -> None:
    """A token the server never issued answers 401 invalid_token."""
    status, body = await call(portal, "profile", "f" * 68)
    assert (status, body["error"]) == (401, "invalid_token")


async def test_token_priority_is_header_then_auth_then_access_token(
    portal: Client, emu: Emulator
) -> None:
    """The header beats `auth`, which beats `access_token`; the loser is never looked at."""
    good = (await tokens(portal, emu))["access_token"]
    bad = "0" * 68
    cases: list[tuple[dict[str, str], dict[str, str], int, str]] = [
        ({"Authorization": f"Bearer {good}"}, {"auth": bad}, 200, "header"),
        ({"Authorization": f"Bearer {bad}"}, {"auth": good}, 401, "header"),
        ({}, {"auth": good, "access_token": bad}, 200, "auth"),
        ({}, {"auth": bad, "access_token": good}, 401, "auth"),
        ({}, {"access_token": good}, 200, "access_token"),
    ]
    for headers, params, status, source in cases:
        response = await portal.get("/rest/profile", params=params, headers=headers)
        assert response.status == status
        assert emu.rest_log[-1].token_source == source


async def test_method_names_ignore_case_and_suffix(portal: Client, emu: Emulator) -> None:
    """Mixed-case names with or without .json reach the same method."""
    token = (await tokens(portal, emu))["access_token"]
    for path in ("/rest/USER.Current", "/rest/user.current.json", "/rest/User.Current.JSON"):
        response = await portal.get(path, params={"auth": token})
        assert response.status == 200
        assert (await response.json())["result"]["ID"] == "1"
    assert emu.stats.rest_calls["user.current"] == 3


async def test_success_has_time_block_and_rest_headers(portal: Client, emu: Emulator) -> None:
    """A success carries result, the full time block, JSON utf-8 and X-Bitrix-Rest-* headers."""
    token = (await tokens(portal, emu))["access_token"]
    response = await portal.get("/rest/app.info", params={"auth": token})
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.headers["X-Bitrix-Rest-Application"] == APP_ID
    assert "X-Bitrix-Rest-Time" in response.headers
    body = await response.json()
    assert body["result"]["CODE"] == APP_ID
    assert body["result"]["STATUS"] == "L"
    assert set(body["time"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating",
        "operating_reset_at",
    }


async def test_missing_scope_is_insufficient_scope(
    emu: Emulator, aiohttp_client: AiohttpClient
) -> None:
    """An app without the crm scope gets 401 insufficient_scope from crm methods."""
    emu.register_app("local.useronly.4", "u-secret", scope="user")
    portal = await aiohttp_client(emu.create_app())
    response = await exchange(
        portal, emu.issue_code("local.useronly.4"), client_id="local.useronly.4", secret="u-secret"
    )
    token = (await response.json())["access_token"]
    status, body = await call(portal, "crm.lead.list", token)
    assert (status, body["error"]) == (401, "insufficient_scope")
    assert (await call(portal, "user.current", token))[0] == 200


async def test_webhook_path_needs_no_token(portal: Client, emu: Emulator) -> None:
    """/rest/{user}/{code}/{method} works without a token; a wrong code is INVALID_CREDENTIALS."""
    response = await portal.post(
        f"/rest/{HOOK_USER}/{HOOK_CODE}/crm.lead.add.json", json={"fields": {"TITLE": "hook"}}
    )
    assert response.status == 200
    assert (await response.json())["result"] == 1
    assert emu.rest_log[-1].token_source == "webhook"
    assert emu.rest_log[-1].token is None
    response = await portal.get(f"/rest/{HOOK_USER}/wrong/profile")
    assert response.status == 401
    assert (await response.json())["error"] == "INVALID_CREDENTIALS"
    response = await portal.get(f"/rest/{HOOK_USER}/wrong/no.such.method")
    assert response.status == 404


async def test_xml_suffix_renders_xml(portal: Client, emu: Emulator) -> None:
    """A .xml suffix answers well-formed text/xml, errors included."""
    token = (await tokens(portal, emu))["access_token"]
    response = await portal.get("/rest/profile.xml", params={"auth": token})
    assert response.status == 200
    assert response.content_type == "text/xml"
    text = await response.text()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?><response>')
    root = ElementTree.fromstring(text)  # noqa: S314 - our own emulator's output
    assert root.findtext("result/ID") == "1"
    assert root.findtext("result/ADMIN") == "1"
    assert root.find("time/start") is not None
    response = await portal.get("/rest/profile.xml")
    assert response.status == 401
    root = ElementTree.fromstring(await response.text())  # noqa: S314 - our own output
    assert root.findtext("error") == "NO_AUTH_FOUND"


# -- REST: parameters ----------------------------------------------------------------------------


def _multipart(fields: dict[str, str]) -> aiohttp.FormData:
    """Build a multipart body with the given fields and one file part."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("upload", b"hello", filename="hello.txt", content_type="text/plain")
    return form


@pytest.mark.parametrize("kind", ["form", "json", "multipart"])
async def test_body_params_win_over_query(portal: Client, emu: Emulator, kind: str) -> None:
    """Query and body parameters merge, the body winning, for form, JSON and multipart bodies."""
    token = (await tokens(portal, emu))["access_token"]
    body = {"b": "from-body", "c": "only-body"}
    query = {"auth": token, "a": "only-query", "b": "from-query"}
    if kind == "form":
        response = await portal.post("/rest/profile", params=query, data=body)
    elif kind == "json":
        response = await portal.post("/rest/profile", params=query, json=body)
    else:
        response = await portal.post("/rest/profile", params=query, data=_multipart(body))
    assert response.status == 200
    params = emu.rest_log[-1].params
    assert (params["a"], params["b"], params["c"]) == ("only-query", "from-body", "only-body")
    if kind == "multipart":
        assert params["upload"] == {"filename": "hello.txt", "size": "5"}


async def test_nested_form_keys_reach_the_method(portal: Client, emu: Emulator) -> None:
    """PHP-style form keys build nested fields, multi-field lists included."""
    token = (await tokens(portal, emu))["access_token"]
    form = (
        "fields[TITLE]=Nested+lead&fields[PHONE][0][VALUE]=%2B100&fields[PHONE][0][VALUE_TYPE]=WORK"
        f"&fields[EMAIL][][VALUE]=a%40b.test&auth={token}"
    )
    response = await portal.post(
        "/rest/crm.lead.add",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    lead_id = (await response.json())["result"]
    assert emu.rest_log[-1].params["fields"]["PHONE"] == [{"VALUE": "+100", "VALUE_TYPE": "WORK"}]
    status, body = await call(portal, "crm.lead.get", token, id=lead_id)
    assert status == 200
    lead = body["result"]
    assert lead["TITLE"] == "Nested lead"
    assert [(p["VALUE"], p["VALUE_TYPE"], p["TYPE_ID"]) for p in lead["PHONE"]] == [
        ("+100", "WORK", "PHONE")
    ]
    assert lead["EMAIL"][0]["VALUE"] == "a@b.test"
    assert lead["HAS_PHONE"] == "Y"


async def test_unreadable_json_body_is_a_400(portal: Client, emu: Emulator) -> None:
    """A JSON body that does not parse to an object answers 400 ERROR_ARGUMENT."""
    token = (await tokens(portal, emu))["access_token"]
    response = await portal.post(
        "/rest/profile",
        params={"auth": token},
        data=b"[1, 2",
        headers={"Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"] == "ERROR_ARGUMENT"


async def test_rest_log_records_the_request(portal: Client, emu: Emulator) -> None:
    """Each REST request is logged with its raw path, query, body, headers and format."""
    token = (await tokens(portal, emu))["access_token"]
    await portal.post(
        "/rest/Profile.xml?x=1&auth=" + token,
        data=b"y=2",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    entry = emu.rest_log[-1]
    assert entry.method == "profile"
    assert entry.http_method == "POST"
    assert entry.path == "/rest/Profile.xml"
    assert entry.query == f"x=1&auth={token}"
    assert entry.body == b"y=2"
    assert entry.fmt == "xml"
    assert entry.token == token
    assert entry.params["y"] == "2"
    assert "Host" in entry.headers
    assert portal.app[EMULATOR_KEY] is emu


async def test_rest_log_keeps_only_the_newest_requests(clock: FakeClock) -> None:
    """The log is capped (a long-running emulator stays bounded); the counters still count all."""
    emu = Emulator(clock=clock, rest_log_limit=5)
    emu.register_webhook(HOOK_USER, HOOK_CODE)
    async with run_emulator(emu) as base_url, aiohttp.ClientSession() as http:
        for n in range(12):
            url = f"{base_url}/rest/{HOOK_USER}/{HOOK_CODE}/profile.json?n={n}"
            async with http.get(url) as response:
                assert response.status == 200
    assert [call.params["n"] for call in emu.rest_log] == ["7", "8", "9", "10", "11"]
    assert emu.stats.upstream_requests == 12
    assert emu.stats.rest_calls["profile"] == 12
    assert Emulator().rest_log.maxlen == 10_000  # the default bound


# -- REST: crm.lead ------------------------------------------------------------------------------


async def test_lead_crud(portal: Client, emu: Emulator) -> None:
    """Leads are added, read with string values, updated and deleted."""
    token = (await tokens(portal, emu))["access_token"]
    status, body = await call(
        portal, "crm.lead.add", token, fields={"TITLE": "Deal", "OPPORTUNITY": 1500}
    )
    assert (status, body["result"]) == (200, 1)
    status, body = await call(portal, "crm.lead.get", token, id=1)
    lead = body["result"]
    assert (lead["ID"], lead["TITLE"], lead["OPPORTUNITY"]) == ("1", "Deal", "1500")
    assert lead["STATUS_ID"] == "NEW"
    assert lead["DATE_CREATE"].startswith("2023-11-14T")

    status, body = await call(portal, "crm.lead.update", token, id="1", fields={"TITLE": "Won"})
    assert (status, body["result"]) == (200, True)
    assert (await call(portal, "crm.lead.get", token, ID=1))[1]["result"]["TITLE"] == "Won"

    status, body = await call(portal, "crm.lead.delete", token, id=1)
    assert (status, body["result"]) == (200, True)
    assert emu.leads == {}
    for method, params in (
        ("crm.lead.get", {"id": 1}),
        ("crm.lead.update", {"id": 1, "fields": {"TITLE": "x"}}),
        ("crm.lead.delete", {"id": 1}),
    ):
        status, body = await call(portal, method, token, **params)
        assert status == 400
        assert body == {"error": "", "error_description": "Not found"}
    status, body = await call(portal, "crm.lead.get", token)
    assert status == 400
    assert body["error_description"] == "ID is not defined or invalid."


def _status(number: int) -> str:
    """Give odd-numbered leads NEW and even-numbered ones IN_PROCESS."""
    return "NEW" if number % 2 else "IN_PROCESS"


async def _add_leads(portal: Client, token: str, count: int) -> None:
    """Add leads numbered 1..count through batches of 40 commands."""
    for first in range(1, count + 1, 40):
        cmd = {
            f"n{i}": "crm.lead.add?"
            + phpquery.encode({"fields": {"TITLE": f"Lead {i}", "STATUS_ID": _status(i)}})
            for i in range(first, min(first + 40, count + 1))
        }
        status, body = await call(portal, "batch", token, halt=0, cmd=cmd)
        assert status == 200
        assert body["result"]["result_error"] == []


async def test_lead_list_pages_by_50(portal: Client, emu: Emulator) -> None:
    """120 leads come as pages of 50, 50 and 20 with next and total."""
    token = (await tokens(portal, emu))["access_token"]
    await _add_leads(portal, token, 120)
    pages = []
    for start in (0, 50, 100):
        status, body = await call(portal, "crm.lead.list", token, start=start)
        assert status == 200
        pages.append((len(body["result"]), body.get("next"), body["total"]))
    assert pages == [(50, 50, 120), (50, 100, 120), (20, None, 120)]


async def test_lead_list_filters_selects_and_orders(portal: Client, emu: Emulator) -> None:
    """filter (with ID prefixes), select (ID always in) and order shape the list."""
    token = (await tokens(portal, emu))["access_token"]
    await _add_leads(portal, token, 10)
    status, body = await call(
        portal,
        "crm.lead.list",
        token,
        filter={">ID": 3, "<=ID": 9, "STATUS_ID": "NEW"},
        select=["TITLE"],
        order={"ID": "DESC"},
    )
    assert status == 200
    assert body["result"] == [{"ID": str(i), "TITLE": f"Lead {i}"} for i in (9, 7, 5)]
    assert body["total"] == 3
    assert "next" not in body
    status, body = await call(portal, "crm.lead.list", token, filter={"!STATUS_ID": "NEW"})
    assert [lead["ID"] for lead in body["result"]] == ["2", "4", "6", "8", "10"]
    assert "PHONE" not in body["result"][0]
    assert "DATE_CREATE" in body["result"][0]


# -- REST: batch ---------------------------------------------------------------------------------


async def test_batch_collects_results_errors_and_references(portal: Client, emu: Emulator) -> None:
    """A batch answers 200 with per-command results and errors, [] for empty maps, $result refs."""
    token = (await tokens(portal, emu))["access_token"]
    cmd = {
        "add": "crm.lead.add?fields[TITLE]=Batch+lead",
        "missing": "crm.lead.get?id=999",
        "again": "crm.lead.get?id=$result[add]",
    }
    before = emu.stats.upstream_requests
    status, body = await call(portal, "batch", token, halt=0, cmd=cmd)
    assert status == 200
    batch = body["result"]
    assert batch["result"]["add"] == 1
    assert batch["result"]["again"]["TITLE"] == "Batch lead"
    assert batch["result_error"] == {"missing": {"error": "", "error_description": "Not found"}}
    assert batch["result_total"] == []
    assert batch["result_next"] == []
    assert set(batch["result_time"]) == {"add", "again"}
    assert "time" in body
    assert emu.stats.upstream_requests == before + 1
    assert emu.stats.rest_calls["batch"] == 1
    assert emu.stats.rest_calls["crm.lead.add"] == 1
    assert emu.stats.rest_calls["crm.lead.get"] == 2


async def test_batch_form_keys_and_list_results(portal: Client, emu: Emulator) -> None:
    """cmd sent as PHP form keys with [] gives list-shaped results and totals."""
    token = (await tokens(portal, emu))["access_token"]
    form = phpquery.encode(
        {"auth": token, "cmd": ["crm.lead.add?fields[TITLE]=A", "crm.lead.list?select[]=TITLE"]}
    )
    response = await portal.post(
        "/rest/batch",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    batch = (await response.json())["result"]
    assert batch["result"] == [1, [{"ID": "1", "TITLE": "A"}]]
    assert batch["result_total"] == {"1": 1}


async def test_batch_halt_stops_at_first_error(portal: Client, emu: Emulator) -> None:
    """With halt=1 the commands after a failing one are not run."""
    token = (await tokens(portal, emu))["access_token"]
    cmd = {"bad": "crm.lead.get?id=0", "add": "crm.lead.add?fields[TITLE]=never"}
    status, body = await call(portal, "batch", token, halt=1, cmd=cmd)
    assert status == 200
    assert body["result"]["result"] == []
    assert list(body["result"]["result_error"]) == ["bad"]
    assert emu.leads == {}


async def test_batch_over_50_commands_fails_the_rest(portal: Client, emu: Emulator) -> None:
    """Commands past the 50th each get ERROR_BATCH_LENGTH_EXCEEDED; the first 50 run."""
    token = (await tokens(portal, emu))["access_token"]
    cmd = {f"c{i}": "profile" for i in range(52)}
    status, body = await call(portal, "batch", token, halt=0, cmd=cmd)
    assert status == 200
    assert len(body["result"]["result"]) == 50
    exceeded = {
        "error": "ERROR_BATCH_LENGTH_EXCEEDED",
        "error_description": "Max batch length exceeded",
    }
    assert body["result"]["result_error"] == {"c50": exceeded, "c51": exceeded}
    assert emu.stats.rest_calls["profile"] == 50


async def test_nested_batch_is_a_command_error(portal: Client, emu: Emulator) -> None:
    """A batch inside a batch fails that command only; unknown methods fail theirs."""
    token = (await tokens(portal, emu))["access_token"]
    cmd = {"inner": "batch?cmd[x]=profile", "nope": "no.such.method", "ok": "profile"}
    status, body = await call(portal, "batch", token, halt=0, cmd=cmd)
    assert status == 200
    errors = body["result"]["result_error"]
    assert errors["inner"]["error"] == "ERROR_BATCH_METHOD_NOT_ALLOWED"
    assert errors["nope"]["error"] == "ERROR_METHOD_NOT_FOUND"
    assert list(body["result"]["result"]) == ["ok"]


# -- REST: limits --------------------------------------------------------------------------------


async def test_rate_limit_refuses_over_burst_and_recovers(
    emu: Emulator, clock: FakeClock, aiohttp_client: AiohttpClient
) -> None:
    """Past the burst the bucket answers 503 without running; it drains by rate as time passes."""
    portal = await aiohttp_client(emu.create_app())
    token = (await tokens(portal, emu))["access_token"]
    emu.rate, emu.burst = 2.0, 5
    statuses = [(await call(portal, "profile", token))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [503]
    status, body = await call(portal, "profile", token)
    assert body == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    assert emu.stats.limited == 2
    assert emu.stats.rest_calls["profile"] == 5

    clock.advance(0.5)
    assert [(await call(portal, "profile", token))[0] for _ in range(2)] == [200, 503]
    clock.advance(1.0)
    cmd = {f"c{i}": "profile" for i in range(10)}
    status, body = await call(portal, "batch", token, halt=0, cmd=cmd)
    assert status == 200
    assert len(body["result"]["result"]) == 10
    assert (await call(portal, "profile", token))[0] == 200
    assert (await call(portal, "profile", token))[0] == 503


async def test_call_delay_slows_every_rest_call(portal: Client, emu: Emulator) -> None:
    """With call_delay set, a REST call takes at least that long to answer."""
    token = (await tokens(portal, emu))["access_token"]
    emu.call_delay = 0.05
    began = time.monotonic()
    assert (await call(portal, "profile", token))[0] == 200
    assert time.monotonic() - began >= 0.05


async def test_revoked_access_token_is_invalid_token(portal: Client, emu: Emulator) -> None:
    """revoke_access_token makes just that token answer 401 invalid_token."""
    first = await tokens(portal, emu)
    second = await tokens(portal, emu)
    emu.revoke_access_token(first["access_token"])
    status, body = await call(portal, "profile", first["access_token"])
    assert (status, body["error"]) == (401, "invalid_token")
    assert (await call(portal, "profile", second["access_token"]))[0] == 200


async def test_fail_next_rest_answers_one_injected_error(portal: Client, emu: Emulator) -> None:
    """A queued failure answers the next REST request, unrun but logged, then calls work again."""
    token = (await tokens(portal, emu))["access_token"]
    emu.fail_next_rest(401, "insufficient_scope", "Nope")
    status, body = await call(portal, "profile", token)
    assert (status, body) == (401, {"error": "insufficient_scope", "error_description": "Nope"})
    assert emu.rest_log[-1].method == "profile"
    assert not emu.stats.rest_calls
    assert (await call(portal, "profile", token))[0] == 200


async def test_issued_secrets_lists_codes_and_tokens(portal: Client, emu: Emulator) -> None:
    """issued_secrets holds every code and token handed out, used or not."""
    code = emu.issue_code(APP_ID)
    pair = await (await exchange(portal, code)).json()
    assert emu.issued_secrets() == [code, pair["access_token"], pair["refresh_token"]]


async def test_a_lead_added_after_seeded_ones_gets_a_new_id(portal: Client, emu: Emulator) -> None:
    """Leads stored directly (the emulator's --leads) are not overwritten by crm.lead.add."""
    for n in (1, 2, 3):
        emu.leads[n] = {"ID": str(n), "TITLE": f"Lead {n}", "STATUS_ID": "NEW"}
    token = (await tokens(portal, emu))["access_token"]
    status, body = await call(portal, "crm.lead.add", token, fields={"TITLE": "New"})
    assert (status, body["result"]) == (200, 4)
    assert emu.leads[1]["TITLE"] == "Lead 1"
