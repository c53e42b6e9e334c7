"""REST 3.0 (/rest/api/) through the sidecar, over real loopback sockets (issue 15).

The emulator serves /rest/api/ (docs/rest-v3.md); its app here holds the ``task`` scope, which
the tasks methods need. Each test runs served by the fast lane and by plain aiohttp (conftest).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator, run_emulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OffsetClock, tokens_of

Client = TestClient[web.Request, web.Application]
SCOPE = "crm,user,task"
KEY = "v3_client_key_0123456789ABCDEFabcdef"
OWN_V3 = {"error", "error_description"}


@pytest.fixture
async def emulator(emulator_clock: OffsetClock) -> AsyncIterator[Emulator]:
    """Serve an emulator whose app may call the tasks methods (scope ``task``)."""
    emu = Emulator(clock=emulator_clock)
    emu.register_app(CLIENT_ID, CLIENT_SECRET, scope=SCOPE)
    async with run_emulator(emu):
        yield emu


@pytest.fixture
def start(
    make_settings: Callable[..., Settings], emulator: Emulator,
    aiohttp_client: Callable[..., Any],
) -> Callable[..., Any]:
    """Start an authorized sidecar with extra settings (flags by their ``dest``)."""

    async def run(**flags: Any) -> Client:
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), scope=SCOPE, **flags)
        client: Client = await aiohttp_client(create_app(settings, watch_interval=0.05))
        return client

    return run


@pytest.fixture
async def v3side(start: Callable[..., Any]) -> Client:
    """An authorized sidecar with the limiter off."""
    client: Client = await start()
    return client


def host_of(emulator: Emulator) -> str:
    """The emulator portal's host:port."""
    return URL(emulator.base_url).raw_authority


def held_token(client: Client) -> str:
    """The access token the sidecar holds now."""
    pair = tokens_of(client).pair
    assert pair is not None
    return pair.access_token


def v3_calls(emulator: Emulator) -> list[Any]:
    """The REST 3.0 requests the portal received."""
    return [call for call in emulator.rest_log if call.api == "v3"]


async def own_v3_error(response: aiohttp.ClientResponse, status: int) -> str:
    """Assert the sidecar's own error in REST 3.0's shape with ``status``; return its code."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    body = json.loads(text)
    assert set(body) == OWN_V3, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert set(error) == {"code", "message"}, body
    assert isinstance(error["code"], str), body
    assert error["message"] == body["error_description"], body
    assert error["message"], body
    code: str = error["code"]
    return code


async def flat_error(response: aiohttp.ClientResponse, status: int) -> str:
    """Assert Bitrix24's v2 error shape with ``status``; return its code."""
    text = await response.text()
    assert response.status == status, text
    body = json.loads(text)
    assert set(body) == OWN_V3, body
    assert isinstance(body["error"], str), body
    assert body["error_description"], body
    code: str = body["error"]
    return code


def v3_code(body: Any) -> str:
    """The code of a portal's v3 error body."""
    assert isinstance(body, dict), body
    error = body["error"]
    assert isinstance(error, dict), body
    code: str = error["code"]
    return code


def sent_body(call: Any) -> Any:
    """The JSON body a v3 request carried to the portal."""
    return json.loads(call.body)


# -- 1. forwarding ---------------------------------------------------------------------------


class TestForwarding:
    @pytest.mark.parametrize("path", [
        "/rest/api/tasks.task.add",
        "/rest/api/7/webhookcode0123/tasks.task.add",
        "/portal/{host}/rest/api/tasks.task.add",
        "/portal/{host}/rest/api/1/web_hook_Code/tasks.task.add",
        "/portal/{member}/rest/api/tasks.task.add",
    ])
    async def test_each_shape_reaches_the_portals_v3_method(
        self, v3side: Client, emulator: Emulator, path: str,
    ) -> None:
        """App and webhook shapes, behind /portal/<portal> or not, reach /rest/api/<method> as
        a JSON POST with the held token in the body's auth; the webhook code never goes."""
        target = path.replace("{host}", host_of(emulator)).replace("{member}",
                                                                   emulator.member_id)
        fields = {"title": "v3 task", "creatorId": 1, "responsibleId": 1}
        response = await v3side.post(target, json={"fields": fields})
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert answer["result"]["item"]["title"] == "v3 task"
        (call,) = v3_calls(emulator)
        assert (call.http_method, call.path, call.query) == ("POST", "/rest/api/tasks.task.add",
                                                             "")
        assert call.token == held_token(v3side)
        assert call.token_source == "auth"
        assert call.params == {"fields": fields}
        assert sent_body(call) == {"fields": fields, "auth": held_token(v3side)}
        assert call.headers["Content-Type"] == "application/json"
        assert "Authorization" not in call.headers
        assert "webhookcode" not in repr(call).lower()
        assert "web_hook_code" not in repr(call).lower()
        assert emulator.task(int(answer["result"]["item"]["id"]))["title"] == "v3 task"

    async def test_the_clients_own_credentials_are_replaced(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """auth and access_token in the body (any case, \\u-escaped too), auth and
        access_token in the query, an Authorization header: none reaches the portal; the
        telemetry parameters b24jssdk adds are forwarded as they are."""
        emulator.add_tasks(3)
        body = (b'{"id": 2, "auth": "evil-body", "ACCESS_TOKEN": "evil-body2", '
                b'"\\u0061uth": "evil-escaped", "select": ["id", "title"]}')
        response = await v3side.post(
            "/rest/api/tasks.task.get?bx24_request_id=r1&auth=evil-q&bx24_sdk_ver=1.0"
            "&access_token=evil-q2&auth[x]=1&bx24_sdk_type=b24-js-sdk",
            data=body, headers={"Content-Type": "application/json",
                                "Authorization": "Bearer evil-header",
                                "Cookie": "PHPSESSID=evil"})
        assert response.status == 200, await response.text()
        assert (await response.json())["result"]["item"] == {"id": 2, "title": "Task 2"}
        (call,) = v3_calls(emulator)
        assert call.query == "bx24_request_id=r1&bx24_sdk_ver=1.0&bx24_sdk_type=b24-js-sdk"
        assert call.token == held_token(v3side)
        assert sent_body(call) == {"id": 2, "select": ["id", "title"],
                                   "auth": held_token(v3side)}
        assert "evil" not in call.query + call.body.decode() + json.dumps(call.headers)
        assert "Authorization" not in call.headers
        assert "Cookie" not in call.headers

    async def test_a_get_without_a_body_is_forwarded_as_a_post(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """A method taking no parameters may be called by GET: it goes as a JSON POST holding
        only auth."""
        emulator.add_tasks(2)
        response = await v3side.get("/rest/api/tasks.task.list")
        assert response.status == 200, await response.text()
        assert (await response.json())["result"]["items"] == [{"id": 1}, {"id": 2}]
        (call,) = v3_calls(emulator)
        assert call.http_method == "POST"
        assert call.path == "/rest/api/tasks.task.list"
        assert sent_body(call) == {"auth": held_token(v3side)}

    async def test_a_json_body_under_another_content_type_goes_as_json(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """A JSON body sent as text/plain (some clients do) is forwarded as application/json."""
        emulator.add_tasks(1)
        response = await v3side.post("/rest/api/tasks.task.get", data=b'{"id": 1}',
                                     headers={"Content-Type": "text/plain"})
        assert response.status == 200, await response.text()
        (call,) = v3_calls(emulator)
        assert call.headers["Content-Type"] == "application/json"

    async def test_the_portals_v3_error_is_relayed_as_it_is(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """A validation error and a missing task come back with the portal's status and body."""
        response = await v3side.post("/rest/api/tasks.task.get", json={})
        assert response.status == 400
        body = await response.json()
        assert v3_code(body).endswith("VALIDATION_REQUESTVALIDATIONEXCEPTION")
        assert body["error"]["validation"][0]["field"] == "id"
        response = await v3side.post("/rest/api/tasks.task.get", json={"id": 99})
        assert response.status == 400
        assert v3_code(await response.json()).endswith("ENTITYNOTFOUNDEXCEPTION")
        response = await v3side.post("/rest/api/no.such.method", json={})
        assert response.status == 404
        assert v3_code(await response.json()) == "ERROR_METHOD_NOT_FOUND"


# -- 2. one refresh and one retry --------------------------------------------------------------


class TestAuthErrors:
    @pytest.mark.parametrize("flat", [False, True], ids=["v3-shape", "flat-shape"])
    async def test_an_expired_token_is_refreshed_once_and_the_call_retried(
        self, v3side: Client, emulator: Emulator, flat: bool,
    ) -> None:
        """401 expired_token, as an error object or in v2's flat shape: one refresh, the call
        sent again with the new token, the client sees only the answer."""
        emulator.add_tasks(1)
        emulator.v3_flat_errors = flat
        old = held_token(v3side)
        emulator.expire_access_tokens()
        response = await v3side.post("/rest/api/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        assert (await response.json())["result"]["item"]["id"] == 1
        first, second = v3_calls(emulator)
        assert (first.token, second.token) == (old, held_token(v3side))
        assert old != held_token(v3side)
        assert emulator.stats.refresh_ok == 1

    async def test_an_invalid_token_is_refreshed_once_and_the_call_retried(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """401 invalid_token (the token rotated away elsewhere): the same cure."""
        emulator.add_tasks(1)
        old = held_token(v3side)
        emulator.revoke_access_token(old)
        response = await v3side.post("/rest/api/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        assert [c.token for c in v3_calls(emulator)] == [old, held_token(v3side)]
        assert emulator.stats.refresh_ok == 1

    @pytest.mark.parametrize("code", ["expired_token", "invalid_token"])
    async def test_a_second_auth_error_is_relayed_not_looped(
        self, v3side: Client, emulator: Emulator, code: str,
    ) -> None:
        """An auth error after the retry comes back to the client as the portal said it."""
        emulator.fail_next_rest(401, code, "first")
        emulator.fail_next_rest(401, code, "second")
        response = await v3side.post("/rest/api/tasks.task.list", json={})
        assert response.status == 401
        body = await response.json()
        assert body == {"error": {"code": code, "message": "second"}}
        assert len(v3_calls(emulator)) == 2
        assert emulator.stats.refresh_ok == 1


# -- 3. the sidecar's own errors on v3 paths -----------------------------------------------------


class TestOwnErrors:
    async def test_reauthorization_required_is_a_v3_503(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """With the refresh token gone and the access token expired, a v3 call gets 503 in
        REST 3.0's shape, a v2 call in the flat one."""
        emulator.revoke_refresh_tokens()
        emulator.expire_access_tokens()
        response = await v3side.post("/rest/api/tasks.task.list", json={})
        assert await own_v3_error(response, 503) == "SIDECAR_REAUTHORIZATION_REQUIRED"
        response = await v3side.get("/rest/api/tasks.task.list")
        assert await own_v3_error(response, 503) == "SIDECAR_REAUTHORIZATION_REQUIRED"
        response = await v3side.get("/rest/profile")
        assert await flat_error(response, 503) == "SIDECAR_REAUTHORIZATION_REQUIRED"

    @pytest.mark.parametrize(("body", "content_type"), [
        (b'{"id": ', "application/json"),
        (b"not json at all", "application/json"),
        (b"\xff\xfe{}", "application/json"),
        (b'"a string"', "application/json"),
        (b"42", "application/json"),
        (b"null", "application/json"),
        (b"true", "application/json"),
        (b"id=1&auth=x", "application/x-www-form-urlencoded"),
        (b'--b\r\nContent-Disposition: form-data; name="id"\r\n\r\n1\r\n--b--\r\n',
         "multipart/form-data; boundary=b"),
    ], ids=["truncated", "garbage", "bad-utf8", "string", "number", "null", "true", "form",
            "multipart"])
    async def test_a_bad_body_is_a_v3_400_and_goes_nowhere(
        self, v3side: Client, emulator: Emulator, body: bytes, content_type: str,
    ) -> None:
        """Not JSON, a JSON scalar, a form or multipart body: 400 in REST 3.0's shape."""
        for path in ("/rest/api/tasks.task.get", "/rest/api/1/code/tasks.task.get",
                     f"/portal/{host_of(emulator)}/rest/api/tasks.task.get",
                     "/all/rest/api/tasks.task.list"):
            response = await v3side.post(path, data=body, headers={"Content-Type": content_type})
            assert await own_v3_error(response, 400) == "SIDECAR_BAD_REQUEST", path
        assert list(emulator.rest_log) == []

    async def test_a_bad_address_is_a_v3_400_and_v2_stays_flat(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """A malformed v3 address and a suffix (v3 methods take none) get REST 3.0's shape;
        the same mistakes on v2 paths keep the flat shape."""
        for path in ("/rest/api/tasks..list", "/rest/api/tasks.task.list.json",
                     "/rest/api/1/x/y/tasks.task.list", "/rest/api/", "/all/rest/api/x..y",
                     f"/portal/{host_of(emulator)}/rest/api/tasks.task.list.xml"):
            response = await v3side.get(path)
            assert await own_v3_error(response, 400) == "SIDECAR_BAD_REQUEST", path
        for path in ("/rest/tasks..list", "/rest/1/x/y/profile", "/all/rest/x..y"):
            response = await v3side.get(path)
            assert await flat_error(response, 400) == "SIDECAR_BAD_REQUEST", path
        response = await v3side.put("/rest/api/tasks.task.list")
        assert await own_v3_error(response, 405) == "SIDECAR_METHOD_NOT_ALLOWED"
        response = await v3side.put("/rest/profile")
        assert await flat_error(response, 405) == "SIDECAR_METHOD_NOT_ALLOWED"
        assert list(emulator.rest_log) == []

    async def test_a_mixed_case_api_segment_gets_the_v3_shape(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """/rest/API/... is served as REST 3.0 (the address is read without regard to case),
        so its refusals take REST 3.0's shape too."""
        emulator.add_tasks(1)
        response = await v3side.post("/rest/API/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        assert v3_calls(emulator)[-1].path == "/rest/api/tasks.task.get"
        for path in ("/rest/API/tasks.task.get", "/rest/Api/1/x/tasks.task.get",
                     "/all/rest/aPI/tasks.task.list",
                     f"/portal/{host_of(emulator)}/all/rest/API/tasks.task.list"):
            response = await v3side.post(path, data=b"x",
                                         headers={"Content-Type": "application/json"})
            assert await own_v3_error(response, 400) == "SIDECAR_BAD_REQUEST", path
        response = await v3side.get("/rest/API/tasks..get")
        assert await own_v3_error(response, 400) == "SIDECAR_BAD_REQUEST"

    async def test_an_unknown_portal_is_a_v3_404(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """A portal this sidecar does not hold, by prefix or header: 404 in REST 3.0's shape."""
        response = await v3side.post("/portal/corp.bitrix24.com/rest/api/tasks.task.list",
                                     json={})
        assert await own_v3_error(response, 404) == "SIDECAR_PORTAL_UNKNOWN"
        response = await v3side.post("/rest/api/tasks.task.list", json={},
                                     headers={"X-Bitrix-Portal": "corp.bitrix24.com"})
        assert await own_v3_error(response, 404) == "SIDECAR_PORTAL_UNKNOWN"
        assert list(emulator.rest_log) == []

    async def test_an_unknown_expectation_is_a_v3_417(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """Expect other than 100-continue: 417 in REST 3.0's shape on a v3 path (v2: flat);
        100-continue is served."""
        emulator.add_tasks(1)
        response = await v3side.post("/rest/api/tasks.task.get", json={"id": 1},
                                     headers={"Expect": "something-else"})
        assert await own_v3_error(response, 417) == "SIDECAR_EXPECTATION_FAILED"
        response = await v3side.post("/rest/profile", json={},
                                     headers={"Expect": "something-else"})
        assert await flat_error(response, 417) == "SIDECAR_EXPECTATION_FAILED"
        assert list(emulator.rest_log) == []
        response = await v3side.post("/rest/api/tasks.task.get", json={"id": 1},
                                     headers={"Expect": "100-continue"})
        assert response.status == 200, await response.text()

    async def test_a_body_too_large_is_a_v3_413(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """A body over SIDECAR_MAX_BODY: 413 in REST 3.0's shape (v2: flat)."""
        client: Client = await start(max_body="4096")
        big = json.dumps({"id": 1, "pad": "x" * 10_000}).encode()
        response = await client.post("/rest/api/tasks.task.get", data=big,
                                     headers={"Content-Type": "application/json"})
        assert await own_v3_error(response, 413) == "SIDECAR_BODY_TOO_LARGE"
        response = await client.post("/rest/profile", data=big,
                                     headers={"Content-Type": "application/json"})
        assert await flat_error(response, 413) == "SIDECAR_BODY_TOO_LARGE"
        assert list(emulator.rest_log) == []

    async def test_a_missing_client_key_is_a_v3_401(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """SIDECAR_CLIENT_KEY set: a v3 call without it is a 401 in REST 3.0's shape; with it
        in the header or as the webhook code, it is served and the key never reaches the
        portal."""
        emulator.add_tasks(1)
        client: Client = await start(client_key=KEY)
        for path, headers in (("/rest/api/tasks.task.get", {}),
                              ("/rest/api/1/wrongkey/tasks.task.get", {}),
                              ("/all/rest/api/tasks.task.list", {}),
                              ("/rest/api/tasks.task.get", {"X-Sidecar-Key": "wrong"})):
            response = await client.post(path, json={"id": 1}, headers=headers)
            assert await own_v3_error(response, 401) in (
                "SIDECAR_CLIENT_KEY_REQUIRED", "SIDECAR_CLIENT_KEY_INVALID"), path
            assert KEY not in await response.text()
        response = await client.post("/rest/profile")
        assert await flat_error(response, 401) == "SIDECAR_CLIENT_KEY_REQUIRED"
        assert list(emulator.rest_log) == []
        for path, headers in ((f"/rest/api/1/{KEY}/tasks.task.get", {}),
                              ("/rest/api/tasks.task.get", {"X-Sidecar-Key": KEY})):
            response = await client.post(path, json={"id": 1}, headers=headers)
            assert response.status == 200, await response.text()
        assert len(v3_calls(emulator)) == 2
        assert all(KEY not in repr(call) for call in emulator.rest_log)

    async def test_a_missing_client_key_is_refused_before_the_body_in_v3_shape(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """The fast lane's precheck refuses a keyless v3 call on its head alone (its body
        still dripping): the answer is in REST 3.0's shape too."""
        client: Client = await start(client_key=KEY)
        head = (b"POST /rest/api/tasks.task.get HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"id\": ")
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            writer.write(head)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), 5)
        finally:
            writer.close()
        status_line, _, rest = data.partition(b"\r\n")
        assert b" 401 " in status_line, data
        body = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert body["error"]["code"] == "SIDECAR_CLIENT_KEY_REQUIRED", body
        assert body["error"]["message"] == body["error_description"]
        assert list(emulator.rest_log) == []

    async def test_a_body_too_slow_to_arrive_is_a_v3_408(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """A v3 call whose body stalls past SIDECAR_REQUEST_TIMEOUT: 408 in REST 3.0's shape
        (its head, and so its path, has arrived); nothing forwarded."""
        client: Client = await start(request_timeout="0.5")
        for path, v3 in ((b"/rest/api/tasks.task.get", True), (b"/rest/profile", False)):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            try:
                writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\nContent-Length: 100\r\n\r\n{\"id\": "
                             % path)
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            assert b" 408 " in head.partition(b"\r\n")[0], data
            error = json.loads(body)
            assert set(error) == OWN_V3, error
            if v3:
                assert error["error"] == {"code": "SIDECAR_REQUEST_TIMEOUT",
                                          "message": error["error_description"]}
            else:
                assert error["error"] == "SIDECAR_REQUEST_TIMEOUT"
        assert list(emulator.rest_log) == []


# -- 3b and 5. the limiter on v3 paths -----------------------------------------------------------


class TestLimiter:
    async def test_a_long_time_block_is_passed_on_then_refused_locally_in_v3_shape(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """A block past the queue timeout: the portal's 429 comes back (Retry-After added),
        then the sidecar itself answers 429 OPERATION_TIME_LIMIT in REST 3.0's shape without
        asking the portal; other methods and v2's method of the same name are not held."""
        emulator.add_tasks(1)
        client: Client = await start(rate=100, burst=100, queue_timeout="1s")
        emulator.block_method("tasks.task.list", 120)
        response = await client.post("/rest/api/tasks.task.list", json={})
        assert response.status == 429
        assert v3_code(await response.json()) == "OPERATION_TIME_LIMIT"
        assert int(response.headers["Retry-After"]) > 60
        response = await client.post("/rest/api/tasks.task.list", json={})
        assert await own_v3_error(response, 429) == "OPERATION_TIME_LIMIT"
        assert int(response.headers["Retry-After"]) > 60
        assert len(v3_calls(emulator)) == 1
        response = await client.post("/rest/api/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        response = await client.get("/rest/profile")
        assert response.status == 200

    async def test_a_short_time_block_is_waited_out_once(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """A block shorter than the queue timeout: the call waits it out and is answered."""
        emulator.add_tasks(1)
        client: Client = await start(rate=100, burst=100, queue_timeout="10s")
        emulator.block_method("tasks.task.get", 1.5)
        response = await client.post("/rest/api/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        assert emulator.stats.time_limited == 1
        assert len(v3_calls(emulator)) == 2

    async def test_a_short_time_block_is_waited_out_without_the_gate_too(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """With the limiter off, the call still waits a short block out once (rather than
        sending it again at once into the same block); so does a v2 call."""
        emulator.add_tasks(1)
        emulator.block_method("tasks.task.get", 1.5)
        response = await v3side.post("/rest/api/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        assert emulator.stats.time_limited == 1
        assert len(v3_calls(emulator)) == 2
        emulator.block_method("profile", 1.5)
        response = await v3side.get("/rest/profile")
        assert response.status == 200, await response.text()
        assert emulator.stats.time_limited == 2

    async def test_queue_full_is_a_v3_503(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """More calls than the bucket passes within the queue timeout: the rest get 503
        QUERY_LIMIT_EXCEEDED in REST 3.0's shape, with Retry-After."""
        emulator.add_tasks(1)
        client: Client = await start(rate=1, burst=1, queue_timeout="1s", coalesce="off")
        responses = await asyncio.gather(*(
            client.post("/rest/api/tasks.task.get", json={"id": 1}) for _ in range(6)))
        refused = [r for r in responses if r.status == 503]
        assert refused
        for response in refused:
            assert await own_v3_error(response, 503) == "QUERY_LIMIT_EXCEEDED"
            assert int(response.headers["Retry-After"]) >= 1
        assert len(v3_calls(emulator)) == 6 - len(refused)

    async def test_the_bucket_holds_v3_calls_to_the_portals_pace(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """A burst of v3 calls over the portal's bucket waits its turn in the sidecar's:
        every call answered, the portal's 503 (if loopback jitter tips it) absorbed."""
        emulator.add_tasks(3)
        emulator.rate, emulator.burst = 10, 3
        client: Client = await start(rate=10, burst=3, coalesce="off")
        responses = await asyncio.gather(*(
            client.post("/rest/api/tasks.task.get", json={"id": 1 + n % 3}) for n in range(12)))
        assert [r.status for r in responses] == [200] * 12
        ids = [(await r.json())["result"]["item"]["id"] for r in responses]
        assert ids == [1 + n % 3 for n in range(12)]
        assert emulator.stats.limited <= 2

    async def test_query_limit_exceeded_from_the_portal_is_retried(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """The portal's 503 QUERY_LIMIT_EXCEEDED (REST 3.0's shape) is absorbed by a retry."""
        emulator.add_tasks(1)
        client: Client = await start(rate=100, burst=100)
        emulator.fail_next_rest(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        response = await client.post("/rest/api/tasks.task.get", json={"id": 1})
        assert response.status == 200, await response.text()
        assert len(v3_calls(emulator)) == 2


# -- 4. batch, and never coalesced ---------------------------------------------------------------


class TestBatch:
    async def test_a_clients_batch_array_is_forwarded_with_the_token(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """A root array of {method, query}: sent as b24jssdk sends it (numbered keys beside
        auth), answered as the portal answers."""
        emulator.add_tasks(5)
        commands = [{"method": "tasks.task.get", "query": {"id": 2, "select": ["title"]}},
                    {"method": "tasks.task.list",
                     "query": {"filter": [["id", ">", 3]], "select": ["id"]}},
                    {"method": "tasks.task.add", "query": {"fields": {
                        "title": "from batch", "creatorId": 1, "responsibleId": 1}}}]
        response = await v3side.post("/rest/api/batch", json=commands)
        assert response.status == 200, await response.text()
        result = (await response.json())["result"]
        assert result[0] == {"item": {"title": "Task 2"}}
        assert result[1] == {"items": [{"id": 4}, {"id": 5}]}
        assert result[2]["item"]["title"] == "from batch"
        (call,) = v3_calls(emulator)
        assert call.path == "/rest/api/batch"
        assert sent_body(call) == {"0": commands[0], "1": commands[1], "2": commands[2],
                                   "auth": held_token(v3side)}

    async def test_a_numbered_batch_with_the_clients_auth_gets_ours(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """b24jssdk's own form, its auth replaced; a failing command fails the batch, relayed."""
        emulator.add_tasks(1)
        body = {"0": {"method": "tasks.task.get", "query": {"id": 1}}, "auth": "evil"}
        response = await v3side.post("/rest/api/batch", json=body)
        assert response.status == 200, await response.text()
        assert sent_body(v3_calls(emulator)[-1]) == {"0": body["0"], "auth": held_token(v3side)}
        response = await v3side.post("/rest/api/batch", json=[
            {"method": "tasks.task.get", "query": {"id": 1}},
            {"method": "tasks.task.get", "query": {"id": 404}}])
        assert response.status == 400
        assert v3_code(await response.json()).endswith("ENTITYNOTFOUNDEXCEPTION")

    async def test_v3_calls_are_never_coalesced(
        self, start: Callable[..., Any], emulator: Emulator,
    ) -> None:
        """With coalescing on and the gate queueing, each v3 call is its own upstream request
        and no v2 batch goes out; v2 calls in the same queue are coalesced (the control)."""
        emulator.add_tasks(20)
        client: Client = await start(rate=20, burst=1, coalesce="on", queue_timeout="30s")
        responses = await asyncio.gather(*(
            client.post("/rest/api/tasks.task.get", json={"id": n + 1}) for n in range(20)))
        assert [r.status for r in responses] == [200] * 20
        ids = [(await r.json())["result"]["item"]["id"] for r in responses]
        assert ids == list(range(1, 21))
        calls = list(emulator.rest_log)
        assert [c.api for c in calls] == ["v3"] * 20
        assert sorted(sent_body(c)["id"] for c in calls) == list(range(1, 21))
        responses = await asyncio.gather(*(client.get("/rest/profile") for _ in range(20)))
        assert [r.status for r in responses] == [200] * 20
        v2 = [c for c in emulator.rest_log if c.api == "v2"]
        assert any(c.method == "batch" for c in v2)
        assert len(v2) < 20


# -- 6. secrets ----------------------------------------------------------------------------------


class TestSecrets:
    async def test_no_token_in_v3_error_bodies_or_logs(
        self, start: Callable[..., Any], emulator: Emulator, caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Across retries, relayed auth errors, own errors, a batch and a whole list, no token
        or secret shows in an answer or a log line."""
        caplog.set_level(logging.INFO)
        emulator.add_tasks(120)
        emulator.v3_task_page_cap = 50
        answers: list[str] = []
        with structlog.testing.capture_logs() as events:
            client: Client = await start(rate=100, burst=100, queue_timeout="1s")

            async def call(path: str, body: Any = None, **kwargs: Any) -> None:
                response = await client.post(path, json=body if body is not None else {},
                                             **kwargs)
                answers.append(f"{response.status} {dict(response.headers)} "
                               f"{await response.text()}")

            emulator.expire_access_tokens()
            await call("/rest/api/tasks.task.get", {"id": 1, "auth": "evil"})
            emulator.fail_next_rest(401, "expired_token", "Access token expired")
            emulator.fail_next_rest(401, "invalid_token", "The access token provided is invalid")
            await call("/rest/api/tasks.task.get", {"id": 1})
            await call("/rest/api/batch", [{"method": "tasks.task.get", "query": {"id": 9999}}])
            await call("/all/rest/api/tasks.task.list", {"filter": [["title", "=", "x"]]})
            await call("/all/rest/api/tasks.task.list", {})
            await call("/all/rest/api/tasks.task.list", {},
                       headers={"Accept": "application/x-ndjson"})
            emulator.block_method("tasks.task.list", 120)
            await call("/rest/api/tasks.task.list")
            await call("/rest/api/tasks.task.list")
            await call("/rest/api/tasks..list")
            emulator.fail_next_rest(500, "INTERNAL_SERVER_ERROR", "boom")
            await call("/rest/api/tasks.task.get", {"id": 1})
            emulator.revoke_refresh_tokens()
            emulator.expire_access_tokens()
            await call("/rest/api/tasks.task.get", {"id": 1})
        secrets = [*emulator.issued_secrets(), CLIENT_SECRET]
        assert len(secrets) >= 4
        texts = [*answers, *(repr(e) for e in events),
                 *(logging.Formatter("%(name)s %(message)s").format(r) for r in caplog.records)]
        assert any("SIDECAR_REAUTHORIZATION_REQUIRED" in a for a in answers)
        for text in texts:
            for secret in secrets:
                assert secret not in text, text


# -- 8. whole v3 lists ---------------------------------------------------------------------------

TASKS = 3456


class TestWholeLists:
    @pytest.mark.parametrize("cap", [50, 1000])
    @pytest.mark.parametrize("ask", ["prefix", "header"])
    @pytest.mark.parametrize("order", ["id", "offset"])
    async def test_every_task_once_and_in_order(
        self, v3side: Client, emulator: Emulator, cap: int, ask: str, order: str,
    ) -> None:
        """3,456 tasks by id (no order) or by offset (id descending), pages capped at 50 or
        not: each task exactly once, in order, in {"result": {"items"}, "total"}."""
        emulator.add_tasks(TASKS)
        emulator.v3_task_page_cap = cap
        body: dict[str, Any] = {"select": ["id", "title"]}
        if order == "offset":
            body["order"] = {"id": "DESC"}
        path, headers = (("/all/rest/api/tasks.task.list", {}) if ask == "prefix" else
                         ("/rest/api/tasks.task.list", {"X-Bitrix-Pages": "all"}))
        response = await v3side.post(path, json=body, headers=headers)
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert set(answer) <= {"result", "total", "time"}
        assert set(answer["result"]) == {"items"}
        items = answer["result"]["items"]
        expected = list(range(1, TASKS + 1))
        if order == "offset":
            expected.reverse()
        assert [item["id"] for item in items] == expected
        assert all(item["title"] == f"Task {item['id']}" for item in items)
        assert answer["total"] == TASKS
        pages = -(-TASKS // cap) + (1 if TASKS % cap == 0 else 0)
        calls = v3_calls(emulator)
        assert len(calls) == pages
        assert len(emulator.rest_log) == pages  # no v2 request at all
        assert all(c.path == "/rest/api/tasks.task.list" for c in calls)
        assert response.headers["X-Bitrix-Requests"] == str(pages)

    async def test_streamed_as_ndjson(self, v3side: Client, emulator: Emulator) -> None:
        """Accept: application/x-ndjson: one task a line, each once, in order."""
        emulator.add_tasks(TASKS)
        emulator.v3_task_page_cap = 50
        response = await v3side.post("/all/rest/api/tasks.task.list",
                                     json={"select": ["id"]},
                                     headers={"Accept": "application/x-ndjson"})
        assert response.status == 200
        assert response.content_type == "application/x-ndjson"
        lines = (await response.text()).splitlines()
        assert [json.loads(line) for line in lines] == [{"id": n} for n in range(1, TASKS + 1)]

    async def test_an_error_before_the_first_page_is_relayed_in_v3_shape(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """The portal's refusal of the first page comes back as it said it, whole or streamed."""
        emulator.add_tasks(10)
        for accept in ("application/json", "application/x-ndjson"):
            response = await v3side.post("/all/rest/api/tasks.task.list",
                                         json={"filter": [["title", "=", "x"]]},
                                         headers={"Accept": accept})
            assert response.status == 400, accept
            body = await response.json()
            assert v3_code(body).endswith("VALIDATION_REQUESTVALIDATIONEXCEPTION"), body
            emulator.fail_next_rest(403, "ACCESS_DENIED", "no")
            response = await v3side.post("/rest/api/tasks.task.list", json={},
                                         headers={"X-Bitrix-Pages": "all", "Accept": accept})
            assert response.status == 403, accept
            assert await response.json() == {"error": {"code": "ACCESS_DENIED",
                                                       "message": "no"}}

    async def test_an_expired_token_midway_is_refreshed(
        self, v3side: Client, emulator: Emulator,
    ) -> None:
        """An auth error between pages: one refresh, the fetch goes on, nothing repeated."""
        emulator.add_tasks(300)
        emulator.v3_task_page_cap = 50
        emulator.fail_next_rest(401, "expired_token", "expired")
        response = await v3side.post("/all/rest/api/tasks.task.list", json={})
        assert response.status == 200, await response.text()
        items = (await response.json())["result"]["items"]
        assert [item["id"] for item in items] == list(range(1, 301))
        assert emulator.stats.refresh_ok == 1

    async def test_an_empty_list(self, v3side: Client, emulator: Emulator) -> None:
        """No tasks: an empty list, total 0, one request."""
        response = await v3side.post("/all/rest/api/tasks.task.list", json={})
        assert response.status == 200, await response.text()
        answer = await response.json()
        assert answer["result"] == {"items": []}
        assert answer["total"] == 0
        assert len(v3_calls(emulator)) == 1
