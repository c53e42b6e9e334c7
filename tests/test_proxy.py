"""The /rest/ proxy against the emulator over loopback: shapes, token handling, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.storage import TokenPair
from tests.conftest import CLIENT_ID, tokens_of

Client = TestClient[web.Request, web.Application]


async def raw_request(client: Client, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are (no client-side URL cleaning) and return status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body.startswith(b"{") else {"raw": body.decode()}


class TestShapes:
    @pytest.mark.parametrize(
        "path",
        ["/rest/profile", "/rest/profile.json", "/rest/PROFILE", "/rest/Profile.JSON",
         "/rest/12/abcdef123/profile", "/rest/1/x/profile.json", "/rest/user.current"],
    )
    async def test_every_address_shape_reaches_the_method(
        self, sidecar: Client, emulator: Emulator, path: str
    ) -> None:
        """Plain, suffixed, mixed-case and inbound-webhook addresses all reach the method."""
        response = await sidecar.get(path)
        assert response.status == 200
        assert (await response.json())["result"]["ID"] == "1"
        assert emulator.rest_log[-1].token_source == "header"

    async def test_xml_suffix_is_forwarded(self, sidecar: Client, emulator: Emulator) -> None:
        """A .xml call gets the portal's XML answer and content type unchanged."""
        response = await sidecar.get("/rest/profile.xml")
        assert response.status == 200
        assert response.content_type == "text/xml"
        assert (await response.text()).startswith("<?xml")
        assert emulator.rest_log[-1].fmt == "xml"

    async def test_form_body_with_nested_keys(self, sidecar: Client, emulator: Emulator) -> None:
        """A PHP-style nested form body arrives intact."""
        body = "fields[TITLE]=T%26x&fields[PHONE][0][VALUE]=555&fields[PHONE][0][VALUE_TYPE]=WORK"
        response = await sidecar.post(
            "/rest/crm.lead.add", data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        lead_id = (await response.json())["result"]
        lead = (await (await sidecar.get(f"/rest/crm.lead.get?id={lead_id}")).json())["result"]
        assert lead["TITLE"] == "T&x"
        assert lead["PHONE"][0]["VALUE"] == "555"

    async def test_json_body_and_query_are_merged(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """Query and JSON body both reach the portal, byte for byte."""
        response = await sidecar.post(
            "/rest/crm.lead.add.json?extra=1", json={"fields": {"TITLE": "Ünïcode"}}
        )
        assert response.status == 200
        call = emulator.rest_log[-1]
        assert call.params["fields"] == {"TITLE": "Ünïcode"}
        assert call.params["extra"] == "1"

    async def test_multipart_body(self, sidecar: Client, emulator: Emulator) -> None:
        """A multipart body is forwarded with its boundary."""
        form = aiohttp.FormData()
        form.add_field("fields[TITLE]", "From multipart")
        form.add_field("file", b"\x00\x01binary", filename="a.bin")
        response = await sidecar.post("/rest/crm.lead.add", data=form)
        assert response.status == 200
        assert emulator.rest_log[-1].params["fields"]["TITLE"] == "From multipart"


class TestCredentials:
    async def test_client_credentials_are_replaced(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """The client's auth, access_token and Authorization never reach the portal."""
        response = await sidecar.post(
            "/rest/profile?auth=evil-q&access_token=evil-q2&auth[x]=1",
            data={"auth": "evil-body", "access_token": "evil-body2", "keep": "yes"},
            headers={"Authorization": "Bearer evil-header", "Cookie": "PHPSESSID=1"},
        )
        assert response.status == 200
        call = emulator.rest_log[-1]
        held = tokens_of(sidecar).pair
        assert held is not None
        assert call.token == held.access_token
        assert call.token_source == "header"
        assert call.params["auth"] == held.access_token
        sent = call.query + call.body.decode() + json.dumps(call.headers)
        assert "evil" not in sent
        assert call.params["keep"] == "yes"
        assert "Cookie" not in call.headers

    async def test_credentials_in_json_and_multipart_are_removed(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """JSON and multipart bodies lose their auth fields too."""
        await sidecar.post("/rest/profile", json={"auth": "evil-json", "a": 1})
        assert "evil" not in emulator.rest_log[-1].body.decode()
        form = aiohttp.FormData()
        form.add_field("auth", "evil-part")
        form.add_field("b", "2")
        await sidecar.post("/rest/profile", data=form)
        call = emulator.rest_log[-1]
        assert b"evil" not in call.body
        assert call.params["b"] == "2"

    async def test_token_endpoint(self, sidecar: Client) -> None:
        """GET /token gives the token with its endpoint and expiry, for direct calls."""
        response = await sidecar.get("/token")
        data = await response.json()
        held = tokens_of(sidecar).pair
        assert held is not None
        assert data["access_token"] == held.access_token
        assert data["client_endpoint"].endswith("/rest/")
        assert data["expires_in"] > 3000
        assert set(data) >= {"expires_at", "member_id", "scope"}


class TestPassThrough:
    async def test_bitrix_errors_pass_unchanged(self, sidecar: Client) -> None:
        """A portal error keeps its status, body and content type."""
        response = await sidecar.get("/rest/no.such.method")
        assert response.status == 404
        assert (await response.json())["error"] == "ERROR_METHOD_NOT_FOUND"
        response = await sidecar.get("/rest/crm.lead.get?id=999")
        assert response.status == 400

    async def test_bitrix_headers_and_request_id(self, sidecar: Client) -> None:
        """X-Bitrix-* headers come back; X-Request-ID is echoed or generated."""
        response = await sidecar.get("/rest/profile", headers={"X-Request-ID": "abc-123"})
        assert any(h.lower().startswith("x-bitrix-") for h in response.headers)
        assert response.headers["X-Request-ID"] == "abc-123"
        response = await sidecar.get("/rest/profile", headers={"X-Request-ID": "bad\tid"})
        assert len(response.headers["X-Request-ID"]) == 32

    async def test_large_answer_streams_whole(self, sidecar: Client, emulator: Emulator) -> None:
        """An answer larger than the streaming threshold arrives complete."""
        title = "x" * 8000
        await asyncio.gather(*(
            sidecar.post("/rest/crm.lead.add", json={"fields": {"TITLE": title}})
            for _ in range(50)
        ))
        response = await sidecar.get("/rest/crm.lead.list")
        body = await response.read()
        assert len(body) > 400_000
        assert len(json.loads(body)["result"]) == 50


class TestRefreshOnAuthError:
    async def test_concurrent_expired_calls_cause_one_refresh(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """200 concurrent calls with an expired token cause exactly one refresh and all succeed."""
        emulator.expire_access_tokens()
        before = emulator.stats.token_requests["refresh_token"]
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(200)))
        assert [r.status for r in responses] == [200] * 200
        assert emulator.stats.token_requests["refresh_token"] - before == 1
        assert emulator.stats.refresh_rejected == 0

    async def test_post_body_survives_the_retry(self, sidecar: Client, emulator: Emulator) -> None:
        """A POST retried after expired_token is repeated with the same body."""
        emulator.expire_access_tokens()
        response = await sidecar.post(
            "/rest/crm.lead.add", data={"fields[TITLE]": "after retry", "fields[NAME]": "Ann"}
        )
        assert response.status == 200
        lead = emulator.leads[(await response.json())["result"]]
        assert (lead["TITLE"], lead["NAME"]) == ("after retry", "Ann")
        retried = [c for c in emulator.rest_log if c.method == "crm.lead.add"]
        assert len(retried) == 2
        assert retried[0].body == retried[1].body

    async def test_rotated_away_token_is_refreshed(
        self, sidecar: Client, emulator: Emulator, make_settings: Callable[..., Settings]
    ) -> None:
        """invalid_token (the pair was renewed elsewhere) also leads to one refresh and a retry."""
        manager = tokens_of(sidecar)
        held = manager.pair
        assert held is not None
        # Another process refreshed: the portal no longer knows our access token.
        emulator.revoke_access_token(held.access_token)
        response = await sidecar.get("/rest/profile")
        assert response.status == 200
        assert emulator.rest_log[-2].token == held.access_token

    async def test_other_401s_are_not_retried(self, sidecar: Client, emulator: Emulator) -> None:
        """Only expired_token and invalid_token trigger a refresh; other 401s pass through."""
        before = emulator.stats.token_requests["refresh_token"]
        response = await sidecar.get("/rest/1/badcode/profile")  # the path's code is ignored
        assert response.status == 200
        emulator.fail_next_rest(401, "insufficient_scope")
        response = await sidecar.get("/rest/profile")
        assert response.status == 401
        assert (await response.json())["error"] == "insufficient_scope"
        assert emulator.stats.token_requests["refresh_token"] == before

    async def test_expired_token_is_refreshed_before_the_call(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """A token our clock says has expired is renewed before the call leaves."""
        now = [time.time()]
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID))
        client: Client = await aiohttp_client(create_app(settings, clock=lambda: now[0]))
        calls = len(emulator.rest_log)
        now[0] += 4000  # our clock is past the hour; the emulator's is not
        response = await client.get("/rest/profile")
        assert response.status == 200
        assert emulator.stats.token_requests["refresh_token"] == 1
        assert len(emulator.rest_log) == calls + 1, "no wasted call with the old token"


class TestNotAuthorized:
    async def test_no_token_answers_503_with_how_to(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """With no token held, calls get 503 in Bitrix's shape saying how to authorize."""
        client: Client = await aiohttp_client(create_app(make_settings()))
        response = await client.get("/rest/profile")
        assert response.status == 503
        body = await response.json()
        assert body["error"] == "SIDECAR_NOT_AUTHORIZED"
        assert "/oauth/authorize/?client_id=" in body["error_description"]
        assert list(emulator.rest_log) == []

    async def test_dead_refresh_token_stops_refreshing(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """invalid_grant makes re-authorization required: calls fail clearly, no more attempts."""
        emulator.revoke_refresh_tokens()
        emulator.expire_access_tokens()
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(20)))
        assert {r.status for r in responses} == {503}
        body = await responses[0].json()
        assert body["error"] == "SIDECAR_REAUTHORIZATION_REQUIRED"
        more = await sidecar.get("/rest/profile")
        assert more.status == 503
        assert emulator.stats.token_requests["refresh_token"] == 1
        assert tokens_of(sidecar).status()["state"] == "reauthorization_required"


class TestRefused:
    @pytest.mark.parametrize(
        "target",
        [
            b"/rest/../token", b"/rest/%2e%2e/token", b"/rest/crm.lead.list%2F..%2Fx",
            b"/rest/crm%2elead%2elist", b"//rest/profile", b"/rest//profile", b"/rest/",
            b"/rest/a/b/c/profile", b"/rest/profile/", b"/rest/pro-file", b"/rest/1/x/",
            b"http://evil.example/rest/profile", b"/rest/profile%00", b"/REST/profile",
        ],
    )
    async def test_path_tricks_are_refused(
        self, sidecar: Client, emulator: Emulator, target: bytes
    ) -> None:
        """Traversal, encoded slashes and absolute targets get a 4xx and reach nothing."""
        status, body = await raw_request(
            sidecar, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert 400 <= status < 500
        if status != 400 or "error" in body:
            assert body["error"].startswith("SIDECAR_")
            assert body["error_description"]
        assert list(emulator.rest_log) == []

    async def test_other_paths_are_404(self, sidecar: Client, emulator: Emulator) -> None:
        """Only /rest/ and /token are served."""
        for path in ("/", "/oauth/token/", "/metrics", "/rest"):
            response = await sidecar.get(path)
            assert response.status == 404
            assert (await response.json())["error"] == "SIDECAR_NOT_FOUND"
        assert list(emulator.rest_log) == []
        assert emulator.stats.token_requests["refresh_token"] == 0

    async def test_other_http_methods_are_405(self, sidecar: Client) -> None:
        """PUT, DELETE and friends are not REST calls."""
        response = await sidecar.put("/rest/profile")
        assert response.status == 405
        assert (await response.json())["error"] == "SIDECAR_METHOD_NOT_ALLOWED"

    async def test_body_over_limit_with_length(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """A body larger than SIDECAR_MAX_BODY gets 413, by Content-Length or by counting."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), max_body="1KiB")
        client: Client = await aiohttp_client(create_app(settings))
        response = await client.post("/rest/crm.lead.add", data=b"x" * 2000)
        assert response.status == 413
        assert (await response.json())["error"] == "SIDECAR_BODY_TOO_LARGE"

        async def chunks() -> Any:
            for _ in range(3):
                yield b"y" * 500

        response = await client.post("/rest/crm.lead.add", data=chunks())
        assert response.status == 413
        ok = await client.post("/rest/crm.lead.add", data={"fields[TITLE]": "small"})
        assert ok.status == 200
        assert [c.method for c in emulator.rest_log] == ["crm.lead.add"]


def point_at(client: Client, rest_base: str) -> TokenPair:
    """Send the sidecar's calls to another portal address; return the pair as it was."""
    manager = tokens_of(client)
    held = manager.pair
    assert held is not None
    manager.life.stored = replace(manager.life.stored,
                                  pair=replace(held, client_endpoint=rest_base))
    return held


class TestUpstreamFailures:
    async def test_portal_down_is_502(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any], unused_tcp_port: int,
    ) -> None:
        """An unreachable portal is a 502 in Bitrix's shape, with no token in it."""
        client: Client = await aiohttp_client(
            create_app(make_settings(auth_code=emulator.issue_code(CLIENT_ID)))
        )
        held = point_at(client, f"http://127.0.0.1:{unused_tcp_port}/rest/")  # nobody there
        response = await client.get("/rest/profile")
        assert response.status == 502
        text = await response.text()
        assert json.loads(text)["error"] == "SIDECAR_UPSTREAM_ERROR"
        assert held.access_token not in text

    async def test_slow_portal_is_504(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """A portal slower than SIDECAR_UPSTREAM_TIMEOUT gives 504."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 upstream_timeout="300ms")
        client: Client = await aiohttp_client(create_app(settings))
        emulator.call_delay = 1.0
        response = await client.get("/rest/profile")
        assert response.status == 504
        assert (await response.json())["error"] == "SIDECAR_UPSTREAM_TIMEOUT"


    @pytest.mark.parametrize(("status", "behaviour", "expected"), [
        (200, "close", (502, "SIDECAR_UPSTREAM_ERROR")),
        (200, "stall", (504, "SIDECAR_UPSTREAM_TIMEOUT")),
        (401, "close", (502, "SIDECAR_UPSTREAM_ERROR")),
        (401, "stall", (504, "SIDECAR_UPSTREAM_TIMEOUT")),
    ])
    async def test_a_body_that_breaks_off_is_the_portals_fault(  # noqa: PLR0917 - fixtures
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any], status: int, behaviour: str,
        expected: tuple[int, str],
    ) -> None:
        """A portal that sends its head, then closes or stalls inside the body, gets the 502 or
        504 of a failed portal (not a 500 of ours), whether the answer is relayed or read first."""
        release = asyncio.Event()

        async def portal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{".encode())
            await writer.drain()
            if behaviour == "stall":
                await release.wait()
            writer.close()

        server = await asyncio.start_server(portal, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                     upstream_timeout="500ms")
            client: Client = await aiohttp_client(create_app(settings))
            point_at(client, f"http://127.0.0.1:{port}/rest/")
            response = await client.get("/rest/profile")
            assert (response.status, (await response.json())["error"]) == expected
        finally:
            release.set()
            server.close()
            await server.wait_closed()


class TestReviewedEncodings:
    async def test_multipart_auth_in_odd_spellings_is_removed(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """Unquoted and upper-case part names, and an upper-case BOUNDARY, are handled."""
        boundary = "XyZ123"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=auth\r\n\r\nevil-1\r\n"
            f"--{boundary}\r\nCONTENT-DISPOSITION: form-data; NAME=\"AUTH\"\r\n\r\nevil-2\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"keep\"\r\n\r\nyes\r\n"
            f"--{boundary}--\r\n"
        ).encode()
        response = await sidecar.post(
            "/rest/profile", data=body,
            headers={"Content-Type": f"multipart/form-data; BOUNDARY={boundary}"},
        )
        assert response.status == 200
        call = emulator.rest_log[-1]
        assert b"evil" not in call.body
        assert call.params["keep"] == "yes"

    async def test_json_auth_spelled_with_escapes_is_removed(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """A JSON key written as \\u0061uth is still the auth parameter, and is dropped."""
        response = await sidecar.post(
            "/rest/profile", data=b'{"\\u0061uth": "evil-json", "x": 1}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status == 200
        assert b"evil" not in emulator.rest_log[-1].body

    async def test_compressed_request_body_arrives_whole(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """A gzip request body is decoded once and forwarded without a stale Content-Encoding."""
        import gzip

        body = gzip.compress(json.dumps({"fields": {"TITLE": "zipped"}}).encode())
        response = await sidecar.post(
            "/rest/crm.lead.add", data=body,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert response.status == 200
        assert emulator.rest_log[-1].params["fields"]["TITLE"] == "zipped"

    async def test_xml_expired_token_is_refreshed(
        self, sidecar: Client, emulator: Emulator
    ) -> None:
        """An .xml call answered with an XML expired_token is refreshed and repeated too."""
        emulator.expire_access_tokens()
        response = await sidecar.get("/rest/profile.xml")
        assert response.status == 200
        assert emulator.stats.refresh_ok == 1


class TestBrowsersAndHosts:
    @pytest.mark.parametrize(
        "headers",
        [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"},
         {"Host": "evil.example:8080"}, {"Host": "rebind.attacker.test"},
         # A page on another port of this machine is another origin (a browser without Fetch
         # Metadata would not say it is same-site).
         {"Host": "localhost:8080", "Origin": "http://localhost:3000"},
         {"Sec-Fetch-Site": "CROSS-SITE"}],
    )
    async def test_foreign_pages_and_hosts_are_refused(
        self, sidecar: Client, emulator: Emulator, headers: dict[str, str]
    ) -> None:
        """CSRF from a browser and DNS-rebound Host names get 403 and reach nothing."""
        for path in ("/rest/crm.lead.add", "/token"):
            response = await sidecar.post(path, headers=headers) if path != "/token" else (
                await sidecar.get(path, headers=headers))
            assert response.status == 403
            assert (await response.json())["error"] == "SIDECAR_REFUSED"
        assert list(emulator.rest_log) == []

    async def test_loopback_and_configured_hosts_are_served(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """localhost, 127.x, same-origin requests and SIDECAR_ALLOWED_HOSTS names are served."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 allowed_hosts="sidecar,app.internal")
        client: Client = await aiohttp_client(create_app(settings))
        for headers in ({"Host": "localhost:8080"}, {"Host": "127.0.0.2"},
                        {"Host": "sidecar:8080"}, {"Sec-Fetch-Site": "same-origin"},
                        {"Origin": "http://localhost:8080", "Host": "localhost:8080"},
                        {"Host": "[::1]:8080"}):
            response = await client.get("/rest/profile", headers=headers)
            assert response.status == 200, headers
