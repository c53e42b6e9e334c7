"""The emulator's REST 3.0 endpoint (/rest/api/), driven over loopback HTTP (docs/rest-v3.md)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.emulator import Emulator

APP_ID = "local.emu0000000001.00000001"
APP_SECRET = "emu-secret-0123456789"
HOOK_USER = 7
HOOK_CODE = "hook0123456789ab"
V3 = "BITRIX_REST_V3_EXCEPTION_"

Client = TestClient[web.Request, web.Application]
AiohttpClient = Callable[[web.Application], Awaitable[Client]]


class FakeClock:
    """A settable clock so bucket and time-limit tests need no sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        """Start at a fixed unix time."""
        self.now = now

    def __call__(self) -> float:
        """Return the current fake time."""
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """Provide a fresh fake clock."""
    return FakeClock()


@pytest.fixture
def emu(clock: FakeClock) -> Emulator:
    """Build an emulator with an app allowed tasks and a webhook."""
    emulator = Emulator(clock=clock)
    emulator.register_app(APP_ID, APP_SECRET, scope="crm,user,task")
    emulator.register_webhook(HOOK_USER, HOOK_CODE)
    return emulator


@pytest.fixture
async def portal(emu: Emulator, aiohttp_client: AiohttpClient) -> Client:
    """Serve the emulator on a loopback socket and return a client for it."""
    return await aiohttp_client(emu.create_app())


@pytest.fixture
def token(emu: Emulator) -> str:
    """Mint an access token for the app."""
    pair = emu.issue_tokens(APP_ID)
    access: str = pair["access_token"]
    return access


async def v3(
    portal: Client, method: str, token: str | None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    """POST a JSON body to /rest/api/{method}, with the token in the body's `auth`."""
    payload: Any = dict(body or {})
    if token is not None:
        payload["auth"] = token
    response = await portal.post(f"/rest/api/{method}", json=payload)
    answer: dict[str, Any] = await response.json()
    return response.status, answer


def error_code(answer: dict[str, Any]) -> str:
    """Read the code of a v3 error body (an object with code and message)."""
    error = answer["error"]
    assert isinstance(error, dict)
    assert set(error) <= {"code", "message", "validation"}
    assert isinstance(error["message"], str)
    code: str = error["code"]
    return code


# -- methods -------------------------------------------------------------------------------------


async def test_task_add_then_get_answers_item_and_time(
    portal: Client, emu: Emulator, token: str
) -> None:
    status, answer = await v3(portal, "tasks.task.add", token, {
        "fields": {"title": "Prepare report", "creatorId": 1, "responsibleId": 5,
                   "deadline": "2026-12-25T23:00:00+03:00"}})
    assert status == 200
    item = answer["result"]["item"]
    assert item["title"] == "Prepare report"
    assert item["responsibleId"] == 5
    assert item["status"] == "pending"
    assert set(answer["time"]) >= {"start", "finish", "duration", "operating_reset_at"}
    assert emu.task_count == 1

    status, answer = await v3(portal, "tasks.task.get", token, {"id": item["id"]})
    assert status == 200
    assert answer["result"]["item"] == emu.task(item["id"])
    assert "responsible" not in answer["result"]["item"]  # no related objects by default


async def test_task_get_select_keeps_own_fields_and_builds_related_objects(
    portal: Client, emu: Emulator, token: str
) -> None:
    [task_id] = emu.add_tasks(1, title="Seeded", responsible_id=9)
    status, answer = await v3(portal, "tasks.task.get", token, {
        "id": task_id, "select": ["id", "title", "noSuchField", "responsible.email"]})
    assert status == 200
    assert answer["result"] == {"item": {
        "id": task_id, "title": "Seeded", "responsible": {"email": "user9@example.invalid"}}}


async def test_task_get_errors_have_the_v3_shape(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.add_tasks(1)
    status, answer = await v3(portal, "tasks.task.get", token, {})
    assert status == 400
    assert error_code(answer) == V3 + "VALIDATION_REQUESTVALIDATIONEXCEPTION"
    assert answer["error"]["validation"] == [
        {"message": "Required field `id` is not specified", "field": "id"}]

    status, answer = await v3(portal, "tasks.task.get", token, {"id": "1"})
    assert (status, error_code(answer)) == (400, V3 + "VALIDATION_REQUESTVALIDATIONEXCEPTION")

    status, answer = await v3(portal, "tasks.task.get", token, {"id": 999})
    assert (status, error_code(answer)) == (400, V3 + "ENTITYNOTFOUNDEXCEPTION")
    assert "result" not in answer

    status, answer = await v3(portal, "tasks.task.get", token,
                              {"id": 1, "select": ["responsible.stageId"]})
    assert (status, error_code(answer)) == (400, V3 + "UNKNOWNDTOPROPERTYEXCEPTION")
    assert answer["error"]["message"] == "Unknown field `stageId` for entity `UserDto`"


async def test_task_add_validation_names_the_missing_field(portal: Client, token: str) -> None:
    status, answer = await v3(portal, "tasks.task.add", token,
                              {"fields": {"title": "x", "creatorId": 1}})
    assert (status, error_code(answer)) == (400, V3 + "VALIDATION_REQUESTVALIDATIONEXCEPTION")
    assert answer["error"]["validation"][0]["field"] == "responsibleId"
    status, answer = await v3(portal, "tasks.task.add", token, {"fields": {
        "title": "x", "creatorId": 1, "responsibleId": 1, "deadline": "tomorrow"}})
    assert answer["error"]["validation"][0]["field"] == "deadline"


async def test_list_defaults_to_ids_and_50_a_page(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.add_tasks(120)
    status, answer = await v3(portal, "tasks.task.list", token)
    assert status == 200
    items = answer["result"]["items"]
    assert items == [{"id": i} for i in range(1, 51)]
    assert set(answer["result"]) == {"items"}  # no total, no next


async def test_list_pages_to_the_end_by_page_number(
    portal: Client, emu: Emulator, token: str
) -> None:
    ids = emu.add_tasks(2_345)
    seen: list[int] = []
    page = 1
    while True:
        status, answer = await v3(portal, "tasks.task.list", token, {
            "select": ["id", "title"], "pagination": {"page": page, "limit": 1000}})
        assert status == 200
        items = answer["result"]["items"]
        seen += [item["id"] for item in items]
        if len(items) < 1000:
            break
        page += 1
    assert seen == list(ids)
    assert page == 3


async def test_list_walks_100000_tasks_by_keyset_as_b24jssdk_does(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.add_tasks(100_000)
    last, count, pages = 0, 0, 0
    while True:
        status, answer = await v3(portal, "tasks.task.list", token, {
            "filter": [["id", ">", last]], "order": {"id": "ASC"},
            "pagination": {"page": 0, "limit": 1000}})
        assert status == 200
        items = answer["result"]["items"]
        pages += 1
        if not items:
            break
        assert items[0]["id"] == last + 1
        last, count = items[-1]["id"], count + len(items)
    assert (count, last, pages) == (100_000, 100_000, 101)


async def test_list_limit_is_capped_at_1000_and_by_the_page_cap(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.add_tasks(1_500)
    _, answer = await v3(portal, "tasks.task.list", token, {"pagination": {"limit": 5000}})
    assert len(answer["result"]["items"]) == 1000
    emu.v3_task_page_cap = 50
    _, answer = await v3(portal, "tasks.task.list", token, {"pagination": {"limit": 1000}})
    assert len(answer["result"]["items"]) == 50


async def test_list_filter_order_and_offset(portal: Client, emu: Emulator, token: str) -> None:
    emu.add_tasks(30)
    _, answer = await v3(portal, "tasks.task.list", token, {
        "filter": [["id", "between", [5, 20]],
                   {"logic": "or", "conditions": [["id", [6, 7]], ["id", ">=", 18]]}],
        "order": {"id": "DESC"}})
    assert [i["id"] for i in answer["result"]["items"]] == [20, 19, 18, 7, 6]
    _, answer = await v3(portal, "tasks.task.list", token, {
        "order": {"title": "ASC"}, "select": ["title"],
        "pagination": {"offset": 2, "limit": 2}})
    # Titles sort as strings: "Task 1", "Task 10", "Task 11", ...
    assert answer["result"]["items"] == [{"title": "Task 11"}, {"title": "Task 12"}]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"pagination": {"limit": "abc"}}, "INVALIDPAGINATIONEXCEPTION"),
        ({"pagination": {"limit": 0}}, "INVALIDPAGINATIONEXCEPTION"),
        ({"order": {"id": "UP"}}, "INVALIDORDEREXCEPTION"),
        ({"order": {"description": "ASC"}}, "INVALIDORDEREXCEPTION"),
        ({"filter": [["id", "like", 3]]}, "UNKNOWNFILTEROPERATOREXCEPTION"),
        ({"filter": [["nope", "=", 3]]}, "UNKNOWNDTOPROPERTYEXCEPTION"),
        ({"filter": [["title", "=", "x"]]}, "VALIDATION_REQUESTVALIDATIONEXCEPTION"),
        ({"filter": [["id", "=", "3"]]}, "VALIDATION_REQUESTVALIDATIONEXCEPTION"),
        ({"filter": [["id"]]}, "INVALIDFILTEREXCEPTION"),
    ],
)
async def test_list_bad_arguments_are_400_v3_errors(
    portal: Client, token: str, body: dict[str, Any], code: str
) -> None:
    status, answer = await v3(portal, "tasks.task.list", token, body)
    assert (status, error_code(answer)) == (400, V3 + code)


# -- wire: addresses, tokens, errors -------------------------------------------------------------


async def test_webhook_address_needs_no_token_and_is_logged_as_webhook(
    portal: Client, emu: Emulator
) -> None:
    emu.add_tasks(3)
    response = await portal.post(f"/rest/api/{HOOK_USER}/{HOOK_CODE}/tasks.task.list", json={})
    assert response.status == 200
    assert len((await response.json())["result"]["items"]) == 3
    entry = emu.rest_log[-1]
    assert (entry.api, entry.method, entry.token_source, entry.token) == (
        "v3", "tasks.task.list", "webhook", None)

    response = await portal.post(f"/rest/api/{HOOK_USER}/wrongcode/tasks.task.list", json={})
    assert response.status == 401
    assert error_code(await response.json()) == "INVALID_CREDENTIALS"


async def test_token_is_read_from_the_body_auth_only(
    portal: Client, emu: Emulator, token: str
) -> None:
    status, _ = await v3(portal, "tasks.task.list", token)
    assert status == 200
    entry = emu.rest_log[-1]
    assert (entry.api, entry.token, entry.token_source) == ("v3", token, "auth")
    assert "auth" not in entry.params

    # REST 3.0 reads no query string, and the header is not documented for it.
    response = await portal.post("/rest/api/tasks.task.list", params={"auth": token}, json={})
    assert response.status == 401
    assert error_code(await response.json()) == "NO_AUTH_FOUND"
    response = await portal.post("/rest/api/tasks.task.list", json={},
                                 headers={"Authorization": f"Bearer {token}"})
    assert response.status == 401
    assert emu.rest_log[-1].token_source is None


async def test_expired_and_invalid_tokens_are_401_in_the_v3_shape(
    portal: Client, emu: Emulator, token: str
) -> None:
    status, answer = await v3(portal, "tasks.task.list", "made-up")
    assert (status, error_code(answer)) == (401, "invalid_token")
    emu.expire_access_tokens()
    status, answer = await v3(portal, "tasks.task.list", token)
    assert (status, error_code(answer)) == (401, "expired_token")

    emu.v3_flat_errors = True
    status, answer = await v3(portal, "tasks.task.list", token)
    assert (status, answer["error"]) == (401, "expired_token")
    assert answer["error_description"] == "The access token provided has expired."


async def test_unknown_method_is_404_before_the_token(portal: Client, emu: Emulator) -> None:
    status, answer = await v3(portal, "crm.lead.list", None)
    assert (status, error_code(answer)) == (404, "ERROR_METHOD_NOT_FOUND")
    response = await portal.post("/rest/api/a/b/tasks.task.list", json={})
    assert response.status == 404
    # v3 methods live only under /rest/api/: the v2 address does not know them (v2 has its
    # own tasks.task.list, a different method).
    response = await portal.post("/rest/tasks.task.get", json={})
    assert response.status == 404


async def test_missing_scope_is_insufficient_scope(portal: Client, emu: Emulator) -> None:
    emu.register_app("local.noscope.1", "secret-noscope-0123", scope="crm")
    pair = emu.issue_tokens("local.noscope.1")
    status, answer = await v3(portal, "tasks.task.list", pair["access_token"])
    assert (status, error_code(answer)) == (403, V3 + "INSUFFICIENTSCOPEEXCEPTION")


async def test_form_body_is_invalid_json(portal: Client, token: str) -> None:
    response = await portal.post("/rest/api/tasks.task.list", data={"auth": token})
    assert response.status == 400
    assert error_code(await response.json()) == V3 + "INVALIDJSONEXCEPTION"
    response = await portal.post("/rest/api/tasks.task.list", data=b"{nope",
                                 headers={"Content-Type": "application/json"})
    assert error_code(await response.json()) == V3 + "INVALIDJSONEXCEPTION"


async def test_get_without_body_reaches_the_method(portal: Client, emu: Emulator) -> None:
    response = await portal.get(f"/rest/api/{HOOK_USER}/{HOOK_CODE}/tasks.task.get",
                                params={"id": "1"})
    assert response.status == 400  # the query is not read: id is missing
    answer = await response.json()
    assert answer["error"]["validation"][0]["field"] == "id"


async def test_leaky_bucket_refuses_with_503_query_limit_exceeded(
    portal: Client, emu: Emulator, token: str, clock: FakeClock
) -> None:
    emu.rate, emu.burst = 2.0, 3
    statuses = [(await v3(portal, "tasks.task.list", token))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 503]
    status, answer = await v3(portal, "tasks.task.list", token)
    assert (status, error_code(answer)) == (503, "QUERY_LIMIT_EXCEEDED")
    assert emu.stats.limited == 2
    clock.now += 1.0  # drains two
    assert (await v3(portal, "tasks.task.list", token))[0] == 200


async def test_blocked_method_is_429_operation_time_limit(
    portal: Client, emu: Emulator, token: str, clock: FakeClock
) -> None:
    emu.block_method("tasks.task.list", 60)
    status, answer = await v3(portal, "tasks.task.list", token)
    assert (status, error_code(answer)) == (429, "OPERATION_TIME_LIMIT")
    assert answer["time"]["operating_reset_at"] == int(clock.now + 60)
    assert (await v3(portal, "tasks.task.get", token, {"id": 1}))[0] == 400  # others run
    clock.now += 61
    assert (await v3(portal, "tasks.task.list", token))[0] == 200


async def test_injected_failure_answers_once_in_the_v3_shape(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.fail_next_rest(500, "INTERNAL_SERVER_ERROR", "Internal server error")
    status, answer = await v3(portal, "tasks.task.list", token)
    assert (status, answer) == (500, {"error": {
        "code": "INTERNAL_SERVER_ERROR", "message": "Internal server error"}})
    assert emu.stats.rest_calls["tasks.task.list"] == 0
    assert (await v3(portal, "tasks.task.list", token))[0] == 200


# -- batch ---------------------------------------------------------------------------------------


async def test_batch_answers_results_in_call_order(portal: Client, emu: Emulator) -> None:
    emu.add_tasks(3)
    commands = [
        {"method": "tasks.task.get", "query": {"id": 3, "select": ["id", "title"]}},
        {"method": "tasks.task.list", "query": {"pagination": {"limit": 2}}},
        {"method": "tasks.task.add",
         "query": {"fields": {"title": "new", "creatorId": 1, "responsibleId": 1}}},
    ]
    response = await portal.post(f"/rest/api/{HOOK_USER}/{HOOK_CODE}/batch", json=commands)
    assert response.status == 200
    answer = await response.json()
    assert answer["result"][0] == {"item": {"id": 3, "title": "Task 3"}}
    assert answer["result"][1] == {"items": [{"id": 1}, {"id": 2}]}
    assert answer["result"][2]["item"]["id"] == 4
    assert "time" in answer
    assert emu.stats.rest_calls["batch"] == 1


async def test_batch_with_auth_takes_the_numbered_object_form(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.add_tasks(2)
    body = {"0": {"method": "tasks.task.get", "query": {"id": 1, "select": ["id"]}},
            "1": {"method": "tasks.task.get", "query": {"id": 2, "select": ["id"]}},
            "auth": token}
    response = await portal.post("/rest/api/batch", json=body)
    assert response.status == 200
    assert (await response.json())["result"] == [{"item": {"id": 1}}, {"item": {"id": 2}}]
    assert emu.rest_log[-1].token_source == "auth"


async def test_batch_is_all_or_nothing(portal: Client, emu: Emulator, token: str) -> None:
    emu.add_tasks(2)
    body = {"0": {"method": "tasks.task.get", "query": {"id": 1}},
            "1": {"method": "tasks.task.get", "query": {"id": 99}},
            "2": {"method": "tasks.task.get", "query": {"id": 2}},
            "auth": token}
    response = await portal.post("/rest/api/batch", json=body)
    assert response.status == 400
    answer = await response.json()
    assert error_code(answer) == V3 + "ENTITYNOTFOUNDEXCEPTION"
    assert "result" not in answer
    assert emu.stats.rest_calls["tasks.task.get"] == 2  # the third never ran


async def test_batch_refuses_the_v2_cmd_form_nesting_and_length(
    portal: Client, emu: Emulator, token: str
) -> None:
    status, answer = await v3(portal, "batch", token, {"cmd": {"a": "tasks.task.get?id=1"}})
    assert (status, error_code(answer)) == (400, V3 + "INVALIDSELECTEXCEPTION")
    status, answer = await v3(portal, "batch", token, {"0": {"method": "batch", "query": {}}})
    assert (status, error_code(answer)) == (405, "ERROR_BATCH_METHOD_NOT_ALLOWED")
    many = {str(i): {"method": "tasks.task.list"} for i in range(51)}
    status, answer = await v3(portal, "batch", token, many)
    assert (status, error_code(answer)) == (400, "ERROR_BATCH_LENGTH_EXCEEDED")


async def test_batch_counts_once_against_the_bucket_and_honours_time_blocks(
    portal: Client, emu: Emulator, token: str
) -> None:
    emu.rate, emu.burst = 1.0, 1
    body = {str(i): {"method": "tasks.task.list"} for i in range(10)}
    status, _ = await v3(portal, "batch", token, body)
    assert status == 200
    assert (await v3(portal, "batch", token, body))[0] == 503
    emu.rate = None
    emu.block_method("tasks.task.list", 30)
    status, answer = await v3(portal, "batch", token, body)
    assert (status, error_code(answer)) == (429, "OPERATION_TIME_LIMIT")
