"""Whole lists (X-Bitrix-Pages: all, /all/rest/...) against the emulator over loopback: every
strategy returns each record once and in order, streamed or whole; failures are never a
silently short list; a hung-up client stops the fetch; other callers keep their turns."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from tests import wide
from tests.wide import Client, ids

# The wider-scope emulator and its sidecar (tests/wide.py).
emulator = wide.emulator
list_settings = wide.list_settings
sidecar = wide.sidecar

COUNT = 12_345
NDJSON = {"Accept": "application/x-ndjson"}
ALL = {"X-Bitrix-Pages": "all"}


def batches(emulator: Emulator) -> int:
    """The requests the portal has served so far."""
    return emulator.stats.upstream_requests


# (how it is asked, table, records under, id key, strategy requests for COUNT records)
CASES: dict[str, tuple[str, dict[str, Any], str, str, str, int]] = {
    "crm chain": ("/all/rest/crm.deal.list", {}, "crm.deal", "", "ID",
                  math.ceil(COUNT / 2500)),
    "crm chain, webhook shape": ("/all/rest/1/anycode/crm.deal.list", {}, "crm.deal", "", "ID",
                                 math.ceil(COUNT / 2500)),
    "crm by offset, descending": ("/rest/crm.deal.list", {"order": {"ID": "DESC"}}, "crm.deal",
                                  "", "ID", 1 + math.ceil((COUNT - 50) / 2500)),
    "crm.item.list under items": ("/all/rest/crm.item.list", {"entityTypeId": 1032},
                                  "crm.item:1032", "items", "id", math.ceil(COUNT / 2500)),
    "tasks under tasks": ("/all/rest/tasks.task.list", {"order": {"ID": "asc"}}, "tasks.task",
                          "tasks", "id", math.ceil(COUNT / 2500)),
    "user.get chain, sort and order": ("/all/rest/user.get", {"sort": "ID", "order": "ASC"},
                                       "user", "", "ID", math.ceil(COUNT / 2500)),
    "user.get by offset": ("/all/rest/user.get", {"sort": "ID", "order": "DESC"}, "user", "",
                           "ID", 1 + math.ceil((COUNT - 50) / 2500)),
    "lists.element.get": ("/all/rest/lists.element.get",
                          {"IBLOCK_TYPE_ID": "lists", "IBLOCK_ID": 47}, "lists.element:47", "",
                          "ID", math.ceil(COUNT / 2500)),
    "a method outside the table": ("/all/rest/crm.timeline.comment.list", {},
                                   "crm.timeline.comment", "", "ID",
                                   1 + math.ceil((COUNT - 50) / 2500)),
}


class TestStrategies:
    @pytest.mark.parametrize("case", list(CASES))
    async def test_each_record_once_in_order(self, sidecar: Client, emulator: Emulator,
                                             case: str) -> None:
        path, params, table, under, key, requests = CASES[case]
        seeded = emulator.seed(table, COUNT)
        before = batches(emulator)
        headers = {} if path.startswith("/all/") else ALL
        response = await sidecar.post(path, json=params, headers=headers)
        assert response.status == 200, await response.text()
        body = await response.json()
        records = body["result"][under] if under else body["result"]
        assert "next" not in body
        assert body["total"] == COUNT == len(records)
        expected = sorted(seeded, reverse="DESC" in json.dumps(params))
        assert ids(records, key) == expected
        assert batches(emulator) - before == requests
        assert response.headers["X-Bitrix-Requests"] == str(requests)

    async def test_the_chain_sends_start_minus_one_pages_chained_by_reference(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", 120)
        response = await sidecar.get("/all/rest/crm.deal.list?filter[>OPPORTUNITY]=-1")
        assert response.status == 200
        [call] = [c for c in emulator.rest_log if c.method == "batch"]
        commands = call.params["cmd"]
        assert len(commands) == 50
        assert "start=-1" in commands["p0"]
        assert "start=-1" in commands["p49"]
        assert "%24result%5Bp0%5D%5B49%5D%5BID%5D" in commands["p1"]
        assert "filter%5B%3EOPPORTUNITY%5D=-1" in commands["p1"]  # the caller's filter kept
        assert call.token_source == "header"  # the sidecar's, as for any call
        assert call.token is not None
        assert call.token not in json.dumps(commands)

    async def test_records_added_during_the_chain_come_once_in_order(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", COUNT)
        emulator.call_delay = 0.05
        stop = asyncio.Event()

        async def add() -> None:
            while not stop.is_set():
                emulator.seed("crm.deal", 7)
                await asyncio.sleep(0.01)

        adding = asyncio.create_task(add())
        try:
            response = await sidecar.get("/all/rest/crm.deal.list")
            body = await response.json()
        finally:
            stop.set()
            await adding
        got = ids(body["result"])
        assert len(got) > COUNT  # some added while it ran were taken in
        assert got == list(range(1, len(got) + 1))  # each once, in order, none skipped
        assert body["total"] == len(got)

    @pytest.mark.parametrize("path", ["/all/rest/crm.deal.list?filter[>ID]=999999",
                                      "/all/rest/crm.deal.list?filter[TITLE]=none&order[ID]=DESC"])
    async def test_a_filter_that_leaves_none(self, sidecar: Client, emulator: Emulator,
                                             path: str) -> None:
        emulator.seed("crm.deal", 300)
        response = await sidecar.get(path)
        assert response.status == 200
        assert await response.json() == {"result": [], "total": 0, "time": pytest.approx(
            (await response.json())["time"])}
        streamed = await sidecar.get(path, headers=NDJSON)
        assert streamed.status == 200
        assert await streamed.read() == b""

    async def test_a_callers_own_lower_bound_starts_the_chain(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", 3000)
        response = await sidecar.post("/all/rest/crm.deal.list",
                                      json={"filter": {">ID": 2990}})
        assert ids((await response.json())["result"]) == list(range(2991, 3001))
        assert response.headers["X-Bitrix-Requests"] == "1"
        [call] = [c for c in emulator.rest_log if c.method == "batch"]
        assert "start=-1" in call.params["cmd"]["p0"]
        assert "filter%5B%3EID%5D=2990" in call.params["cmd"]["p0"]
        response = await sidecar.post("/all/rest/crm.deal.list",
                                      json={"filter": {">=ID": 2990}})
        assert ids((await response.json())["result"]) == list(range(2990, 3001))


class TestStreamed:
    async def test_one_record_per_line(self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", COUNT)
        response = await sidecar.post("/rest/crm.deal.list", json={"select": ["ID", "TITLE"]},
                                      headers={**ALL, **NDJSON})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = (await response.read()).splitlines()
        records = [json.loads(line) for line in lines]
        assert ids(records) == list(range(1, COUNT + 1))
        assert set(records[0]) == {"ID", "TITLE"}

    async def test_a_failure_halfway_ends_with_an_error_line(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", COUNT)
        emulator.call_delay = 0.1
        async with sidecar.session.get(sidecar.make_url("/all/rest/crm.deal.list"),
                                       headers=NDJSON) as response:
            assert response.status == 200
            first = await response.content.readline()
            assert json.loads(first)["ID"] == "1"
            # Every token dies and cannot be renewed: the next pages fail.
            emulator.revoke_refresh_tokens()
            emulator.expire_access_tokens()
            rest = (await response.read()).splitlines()
        last = json.loads(rest[-1])
        assert last["error"] == "SIDECAR_REAUTHORIZATION_REQUIRED"
        assert set(last) == {"error", "error_description"}
        assert len(rest) < COUNT  # short, and it says so

    async def test_a_refusal_before_the_first_page_is_the_answer(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", 10)
        emulator.fail_next_rest(400, "INVALID_FILTER", "bad filter")
        response = await sidecar.get("/all/rest/crm.deal.list", headers=NDJSON)
        assert response.status == 400
        assert await response.json() == {"error": "INVALID_FILTER",
                                          "error_description": "bad filter"}

    async def test_a_client_that_hangs_up_stops_the_fetch(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", COUNT)
        emulator.call_delay = 0.3
        async with aiohttp.ClientSession() as session:
            response = await session.get(sidecar.make_url("/all/rest/crm.deal.list"),
                                         headers=NDJSON)
            await response.content.readline()
            response.close()  # hang up
        await asyncio.sleep(0.5)  # what was in flight may finish
        sent = batches(emulator)
        await asyncio.sleep(1.5)
        assert batches(emulator) == sent
        assert sent < 1 + math.ceil(COUNT / 2500)


    async def test_a_client_that_reads_nothing_is_cut_off(
            self, list_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any],
            emulator: Emulator) -> None:
        """Its answer waits in buffers for SIDECAR_IDLE_TIMEOUT at most: then the connection
        is cut and the fetch stops, holding one request's records at most meanwhile."""
        client: Client = await aiohttp_client(create_app(list_settings(idle_timeout="1s")))
        emulator.seed("crm.deal", 40_000, lambda _: {"COMMENTS": "x" * 2000})
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(b"GET /all/rest/crm.deal.list HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Accept: application/x-ndjson\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(4)  # reading nothing
        sent = batches(emulator)
        await asyncio.sleep(1)
        assert batches(emulator) == sent < math.ceil(40_000 / 2500)
        received = b""
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += chunk  # what was buffered, then the cut
        assert not received.endswith(b"0\r\n\r\n")  # never a complete answer
        writer.close()


class TestWhole:
    async def test_a_time_limit_inside_the_chain_is_waited_out(
            self, sidecar: Client, emulator: Emulator) -> None:
        """The portal refuses the chain's commands while the method is blocked: the fetch
        holds the method, asks again and goes on from where it stopped."""
        emulator.seed("crm.deal", 3000)
        emulator.call_delay = 0.05
        task = asyncio.create_task(sidecar.get("/all/rest/crm.deal.list"))
        while batches(emulator) < 1:  # noqa: ASYNC110 - polling the emulator
            await asyncio.sleep(0.005)
        emulator.block_method("crm.deal.list", 1.5)
        response = await task
        assert response.status == 200
        assert ids((await response.json())["result"]) == list(range(1, 3001))
        refused = [c for c in emulator.rest_log if c.method == "batch"]
        assert len(refused) >= 3  # the first, at least one refused, the rest


    async def test_a_refusal_is_the_portals_error(self, sidecar: Client,
                                                  emulator: Emulator) -> None:
        emulator.seed("crm.deal", 10)
        emulator.fail_next_rest(403, "ACCESS_DENIED", "no rights")
        response = await sidecar.get("/all/rest/crm.deal.list")
        assert response.status == 403
        assert await response.json() == {"error": "ACCESS_DENIED",
                                          "error_description": "no rights"}

    async def test_past_the_size_limit_a_clear_error(
            self, list_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any],
            emulator: Emulator) -> None:
        client: Client = await aiohttp_client(create_app(list_settings(list_max="20KiB")))
        emulator.seed("crm.deal", 3000)
        response = await client.get("/all/rest/crm.deal.list")
        assert response.status == 400
        body = await response.json()
        assert body["error"] == "SIDECAR_LIST_TOO_LARGE"
        assert "SIDECAR_LIST_MAX" in body["error_description"]
        assert "application/x-ndjson" in body["error_description"]
        streamed = await client.get("/all/rest/crm.deal.list", headers=NDJSON)
        assert len((await streamed.read()).splitlines()) == 3000

    async def test_an_expired_token_is_renewed_once_and_the_fetch_goes_on(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", COUNT)
        emulator.call_delay = 0.05
        task = asyncio.create_task(sidecar.get("/all/rest/crm.deal.list"))
        while batches(emulator) < 2:  # noqa: ASYNC110 - polling the emulator
            await asyncio.sleep(0.01)
        emulator.expire_access_tokens()
        response = await task
        assert response.status == 200
        assert ids((await response.json())["result"]) == list(range(1, COUNT + 1))

    async def test_a_method_time_limit_is_waited_out(self, sidecar: Client,
                                                     emulator: Emulator) -> None:
        emulator.seed("crm.deal", 300)
        emulator.block_method("crm.deal.list", 1.0)
        started = time.monotonic()
        response = await sidecar.post("/rest/crm.deal.list", json={"order": {"TITLE": "ASC"}},
                                      headers=ALL)
        assert response.status == 200
        assert len((await response.json())["result"]) == 300
        assert emulator.stats.time_limited >= 1
        assert time.monotonic() - started >= 1.0

    async def test_the_rate_bucket_is_shared_fairly(
            self, list_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any],
            emulator: Emulator) -> None:
        """A long fetch takes one slot a request: single calls get through meanwhile."""
        client: Client = await aiohttp_client(create_app(list_settings(rate="10", burst="2")))
        emulator.seed("crm.deal", 40 * 2500)
        fetch = asyncio.create_task(client.get("/all/rest/crm.deal.list"))
        await asyncio.sleep(0.5)
        waits = []
        for _ in range(5):
            started = time.monotonic()
            single = await client.get("/rest/profile")
            waits.append(time.monotonic() - started)
            assert single.status == 200
            assert not fetch.done()
        response = await fetch
        assert response.status == 200
        assert len((await response.json())["result"]) == 40 * 2500
        assert max(waits) < 1.0, waits  # a slot or two at 10/s, not the fetch's 40


    async def test_the_portals_rate_limit_is_outlasted(
            self, list_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any],
            emulator: Emulator) -> None:
        """QUERY_LIMIT_EXCEEDED more times than a single call retries: a fetch under way backs
        off and goes on rather than lose what it has."""
        client: Client = await aiohttp_client(create_app(list_settings(rate="1000",
                                                                       burst="100")))
        emulator.seed("crm.deal", 3000)
        for _ in range(7):
            emulator.fail_next_rest(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        response = await client.get("/all/rest/crm.deal.list")
        assert response.status == 200
        assert ids((await response.json())["result"]) == list(range(1, 3001))

    async def test_whole_answers_gathered_at_once_are_capped(
            self, sidecar: Client, emulator: Emulator) -> None:
        """Each holds its list in memory: past four at once, a 503 says to come back (or to
        stream, which holds none)."""
        emulator.seed("crm.deal", 3000)
        emulator.call_delay = 0.5
        answers = await asyncio.gather(*(sidecar.get("/all/rest/crm.deal.list")
                                         for _ in range(6)))
        refused = [a for a in answers if a.status == 503]
        assert len(refused) == 2
        assert (await refused[0].json())["error"] == "SIDECAR_OVERLOADED"
        assert refused[0].headers["Retry-After"] == "5"
        for answer in answers:
            if answer.status == 200:
                assert len((await answer.json())["result"]) == 3000
        streamed = await asyncio.gather(*(sidecar.get("/all/rest/crm.deal.list",
                                                      headers=NDJSON) for _ in range(6)))
        for answer in streamed:
            assert len((await answer.read()).splitlines()) == 3000

    async def test_the_first_page_goes_as_the_batch_commands_do(
            self, sidecar: Client, emulator: Emulator) -> None:
        """A form, like each command inside the batch: a JSON true is "1" on every page."""
        emulator.seed("crm.deal", 120)
        response = await sidecar.post("/all/rest/crm.deal.list",
                                      json={"order": {"ID": "DESC"}, "filter": {"OPENED": True}})
        assert response.status == 200
        first = next(c for c in emulator.rest_log if c.method == "crm.deal.list")
        assert first.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert first.params["filter"] == {"OPENED": "1"}


class TestRefused:
    @pytest.mark.parametrize("method", ["crm.deal.add", "batch", "crm.deal.update",
                                        "tasks.task.delete"])
    async def test_a_method_that_writes(self, sidecar: Client, emulator: Emulator,
                                        method: str) -> None:
        response = await sidecar.post(f"/all/rest/{method}", json={"fields": {"TITLE": "x"}})
        assert response.status == 400
        assert "not a list method" in (await response.json())["error_description"]
        assert len(emulator.rest_log) == 0

    @pytest.mark.parametrize(("path", "headers", "text"), [
        ("/rest/crm.deal.list", {"X-Bitrix-Pages": "some"}, "X-Bitrix-Pages"),
        ("/all/rest/crm.deal.list.xml", {}, "XML"),
        ("/all/all/rest/crm.deal.list", {}, "/rest/"),
    ])
    async def test_bad_asks(self, sidecar: Client, path: str, headers: dict[str, str],
                            text: str) -> None:
        response = await sidecar.get(path, headers=headers)
        assert response.status in (400, 404)
        body = await response.json()
        assert set(body) == {"error", "error_description"}
        assert text in body["error_description"]

    async def test_a_multipart_body(self, sidecar: Client) -> None:
        form = aiohttp.FormData()
        form.add_field("filter[ID]", "1")
        form.add_field("file", b"x", filename="x.bin")
        response = await sidecar.post("/all/rest/crm.deal.list", data=form)
        assert response.status == 400
        assert "JSON or form" in (await response.json())["error_description"]

    async def test_the_callers_auth_never_reaches_the_portal(
            self, sidecar: Client, emulator: Emulator) -> None:
        emulator.seed("crm.deal", 60)
        response = await sidecar.post("/all/rest/crm.deal.list?auth=stolen",
                                      json={"auth": "stolen2", "access_token": "x"})
        assert response.status == 200
        assert all("stolen" not in (call.query + call.body.decode())
                   for call in emulator.rest_log)
