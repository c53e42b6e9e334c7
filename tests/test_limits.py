"""The portal's limits: the shared leaky bucket, the FIFO queue, and batch coalescing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import METRICS, create_admin_app, create_app, proxy_runner
from sidecar.config import Settings
from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID
from tests.test_operations import scrape, until, value

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def limited(
    make_settings: Callable[..., Settings], emulator: Emulator,
    aiohttp_client: Callable[..., Any],
) -> Callable[..., Any]:
    """Start a sidecar with its limiter on, in front of the emulator with its limit on."""

    async def start(*, rate: float = 10, burst: int = 5, portal_rate: float | None = None,
                    portal_burst: int | None = None, **flags: Any) -> Client:
        emulator.rate = portal_rate if portal_rate is not None else rate
        emulator.burst = portal_burst if portal_burst is not None else burst
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), rate=rate,
                                 burst=burst, **flags)
        client: Client = await aiohttp_client(create_app(settings))
        return client

    return start


async def add_leads(emulator: Emulator, count: int) -> None:
    """Create leads directly on the emulator (not through the sidecar, not rate limited)."""
    for n in range(count):
        emulator.leads[n + 1] = {"ID": str(n + 1), "TITLE": f"Lead {n + 1}", "STATUS_ID": "NEW"}


class TestBucket:
    async def test_under_the_limit_calls_go_straight_out(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """Calls within the burst are not queued, delayed or batched."""
        sidecar = await limited(rate=2, burst=50)
        started = time.monotonic()
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(20)))
        assert [r.status for r in responses] == [200] * 20
        assert time.monotonic() - started < 2
        assert [c.method for c in emulator.rest_log] == ["profile"] * 20

    async def test_over_the_limit_calls_wait_instead_of_failing(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """With coalescing off, a burst over the bucket waits its turn: no 503 reaches anyone."""
        sidecar = await limited(rate=10, burst=5, coalesce="off")
        await add_leads(emulator, 3)
        responses = await asyncio.gather(
            *(sidecar.get(f"/rest/crm.lead.get?id={1 + n % 3}") for n in range(20))
        )
        assert [r.status for r in responses] == [200] * 20
        bodies = [await r.json() for r in responses]
        assert [b["result"]["ID"] for b in bodies] == [str(1 + n % 3) for n in range(20)]
        # Loopback jitter on a busy machine may still tip the portal's bucket now and then;
        # such a 503 is absorbed by a retry and never reaches a client.
        assert emulator.stats.limited <= 2
        assert emulator.stats.upstream_requests == 20 + emulator.stats.limited

    async def test_queue_timeout_answers_503_with_retry_after(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """A call that would wait past SIDECAR_QUEUE_TIMEOUT gets the portal's own 503 shape."""
        sidecar = await limited(rate=1, burst=1, coalesce="off", queue_timeout="2s")
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(6)))
        statuses = sorted(r.status for r in responses)
        assert statuses.count(200) >= 2
        assert 503 in statuses
        refused = next(r for r in responses if r.status == 503)
        body = await refused.json()
        assert body["error"] == "QUERY_LIMIT_EXCEEDED"
        assert "SIDECAR_QUEUE_TIMEOUT" in body["error_description"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert emulator.stats.limited <= 2  # jitter may tip the portal; a retry absorbs it

    async def test_portal_limit_out_of_step_is_absorbed(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """When the portal's bucket is smaller than ours, its 503s are retried, not passed on."""
        sidecar = await limited(rate=100, burst=100, portal_rate=5, portal_burst=3,
                                coalesce="off")
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(8)))
        assert [r.status for r in responses] == [200] * 8
        assert emulator.stats.limited >= 1

    async def test_operation_time_limit_waits_for_the_reset(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """429 OPERATION_TIME_LIMIT pauses the method until its reset, then the call goes."""
        sidecar = await limited(rate=100, burst=100)
        emulator.block_method("crm.lead.list", 1.5)
        started = time.monotonic()
        response = await sidecar.get("/rest/crm.lead.list")
        assert response.status == 200
        assert time.monotonic() - started >= 0.5
        assert emulator.stats.time_limited == 1
        other = await sidecar.get("/rest/profile")  # other methods are not paused
        assert other.status == 200

    async def test_operation_time_limit_past_the_queue_timeout_is_passed_on(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """A block longer than the queue timeout reaches the client, with Retry-After."""
        sidecar = await limited(rate=100, burst=100, queue_timeout="2s")
        emulator.block_method("crm.lead.list", 120)
        response = await sidecar.get("/rest/crm.lead.list")
        assert response.status == 429
        assert (await response.json())["error"] == "OPERATION_TIME_LIMIT"
        assert int(response.headers["Retry-After"]) > 60
        again = await sidecar.get("/rest/crm.lead.list")  # refused locally, not sent
        assert again.status == 429
        assert emulator.stats.time_limited == 1


class TestCoalescing:
    async def test_queued_calls_travel_as_batches_and_get_their_own_answers(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """Over the limit, queued calls are packed 50 to a batch; each caller gets its answer."""
        sidecar = await limited(rate=2, burst=5)
        await add_leads(emulator, 120)
        responses = await asyncio.gather(
            *(sidecar.get(f"/rest/crm.lead.get?id={n + 1}") for n in range(120))
        )
        assert [r.status for r in responses] == [200] * 120
        for n, response in enumerate(responses):
            body = await response.json()
            assert body["result"]["ID"] == str(n + 1)
            assert "time" in body
        batches = [c for c in emulator.rest_log if c.method == "batch"]
        refused = emulator.stats.limited
        assert refused <= 2  # jitter may tip the portal's bucket; a retry absorbs it
        assert 3 <= len(batches) <= 5 + refused
        assert emulator.stats.upstream_requests <= 5 + len(batches)

    async def test_mixed_methods_and_errors_inside_a_batch(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """Errors inside a coalesced batch come back with the status the method gives alone."""
        sidecar = await limited(rate=2, burst=1)
        await add_leads(emulator, 2)
        await sidecar.get("/rest/profile")  # fill the bucket so the next calls queue
        paths = ["/rest/crm.lead.get?id=1", "/rest/crm.lead.get?id=999",
                 "/rest/no.such.method", "/rest/profile", "/rest/crm.lead.list"]
        responses = await asyncio.gather(*(sidecar.get(p) for p in paths))
        assert [r.status for r in responses] == [200, 400, 404, 200, 200]
        assert (await responses[2].json())["error"] == "ERROR_METHOD_NOT_FOUND"
        listing = await responses[4].json()
        assert listing["total"] == 2
        assert [c.method for c in emulator.rest_log][-1] == "batch"

    async def test_post_bodies_are_coalesced_faithfully(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """Form and JSON bodies with nested fields survive the trip inside a batch."""
        sidecar = await limited(rate=2, burst=1)
        await sidecar.get("/rest/profile")
        responses = await asyncio.gather(
            sidecar.post("/rest/crm.lead.add", data={"fields[TITLE]": "A&B=C+D",
                                                     "fields[PHONE][0][VALUE]": "+1 555"}),
            sidecar.post("/rest/crm.lead.add",
                         json={"fields": {"TITLE": "Юникод", "EMAIL": [{"VALUE": "a@b.c"}]}}),
        )
        ids = [(await r.json())["result"] for r in responses]
        assert emulator.leads[ids[0]]["TITLE"] == "A&B=C+D"
        assert emulator.leads[ids[0]]["PHONE"][0]["VALUE"] == "+1 555"
        assert emulator.leads[ids[1]]["TITLE"] == "Юникод"
        assert emulator.rest_log[-1].method == "batch"

    async def test_a_batch_refused_by_the_rate_limit_is_sent_again(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """A coalesced batch the portal refuses with QUERY_LIMIT_EXCEEDED (it ran nothing) is
        queued again whole, and every call in it still gets its own answer."""
        sidecar = await limited(rate=2, burst=1)
        await add_leads(emulator, 5)
        await sidecar.get("/rest/profile")  # the bucket's one slot: the rest must queue
        emulator.fail_next_rest(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        responses = await asyncio.gather(
            *(sidecar.get(f"/rest/crm.lead.get?id={n + 1}") for n in range(5))
        )
        assert [r.status for r in responses] == [200] * 5
        assert [(await r.json())["result"]["ID"] for r in responses] == ["1", "2", "3", "4", "5"]
        batches = [c for c in emulator.rest_log if c.method == "batch"]
        assert 2 <= len(batches) <= 2 + emulator.stats.limited

    async def test_a_call_retried_into_a_batch_is_not_refreshed_twice(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """Calls sent again after an auth error may travel in a batch; if the portal refuses
        that batch too, they get its answer, as alone, and no second refresh is made."""
        sidecar = await limited(rate=2, burst=3)
        emulator.expire_access_tokens()
        emulator.call_delay = 0.3  # both are in flight before the first refusal is back
        calls = asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(2)))
        for _ in range(400):
            if emulator.stats.token_requests["refresh_token"]:
                break
            await asyncio.sleep(0.005)
        emulator.expire_access_tokens()  # the retries' batch meets a refused token again
        responses = await calls
        assert [r.status for r in responses] == [401] * 2
        assert {(await r.json())["error"] for r in responses} == {"expired_token"}
        assert emulator.stats.token_requests["refresh_token"] == 1
        assert [c.method for c in emulator.rest_log].count("batch") == 1

    async def test_expired_token_during_a_coalesced_batch(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """A batch answered 401 expired_token is refreshed once and sent again."""
        sidecar = await limited(rate=2, burst=1)
        await sidecar.get("/rest/profile")
        emulator.expire_access_tokens()
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(10)))
        assert [r.status for r in responses] == [200] * 10
        assert emulator.stats.refresh_ok == 1

    @pytest.mark.parametrize(
        ("path", "kwargs"),
        [
            ("/rest/batch", {"data": {"cmd[a]": "profile"}}),
            ("/rest/profile", {"headers": {"X-Sidecar-Coalesce": "off"}}),
            ("/rest/profile.xml", {}),
            ("/rest/crm.lead.add", {"data": aiohttp.FormData({"fields[TITLE]": "m"})}),
        ],
    )
    async def test_what_is_never_coalesced(
        self, limited: Callable[..., Any], emulator: Emulator, path: str, kwargs: dict[str, Any]
    ) -> None:
        """batch itself, opted-out calls, XML and multipart calls always travel alone."""
        sidecar = await limited(rate=5, burst=1)
        await sidecar.get("/rest/profile")
        method = path.removeprefix("/rest/").removesuffix(".xml")

        async def one() -> int:
            data = kwargs.get("data")
            if isinstance(data, aiohttp.FormData):
                form = aiohttp.FormData()
                form.add_field("fields[TITLE]", "m", filename=None)
                form.add_field("file", b"x", filename="f.bin")
                return int((await sidecar.post(path, data=form)).status)
            return int((await sidecar.post(path, **kwargs)).status)

        statuses = await asyncio.gather(*(one() for _ in range(3)))
        assert statuses == [200, 200, 200]
        methods = [c.method for c in list(emulator.rest_log)[1:]]
        assert methods == [method] * 3

    async def test_client_hanging_up_while_queued_is_never_sent(
        self, limited: Callable[..., Any], emulator: Emulator
    ) -> None:
        """A queued call whose client goes away does not reach the portal."""
        sidecar = await limited(rate=1, burst=1, coalesce="off")
        await sidecar.get("/rest/profile")
        async with aiohttp.ClientSession() as http:
            doomed = [asyncio.create_task(http.get(sidecar.make_url("/rest/crm.lead.list")))
                      for _ in range(3)]
            await asyncio.sleep(0.2)
            for task in doomed:
                task.cancel()
            await asyncio.gather(*doomed, return_exceptions=True)
        await asyncio.sleep(0.1)
        survivor = await sidecar.get("/rest/user.current")
        assert survivor.status == 200
        assert [c.method for c in emulator.rest_log] == ["profile", "user.current"]


class TestMetrics:
    async def test_queue_and_batch_metrics(
        self, limited: Callable[..., Any], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """Queue depth, queue wait, calls per upstream request and rejections are exported."""
        sidecar = await limited(rate=2, burst=2, queue_timeout="1s")
        admin: Client = await aiohttp_client(create_admin_app(sidecar.app))
        await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(40)))
        samples = await scrape(admin)
        assert value(samples, "bitrix_sidecar_calls_per_upstream_request_count") >= 2
        assert value(samples, "bitrix_sidecar_calls_per_upstream_request_bucket", le="1.0") < 40
        assert value(samples, "bitrix_sidecar_calls_per_upstream_request_sum") == 40
        assert value(samples, "bitrix_sidecar_queue_wait_seconds_count") == 40
        assert value(samples, "bitrix_sidecar_queue_depth") == 0
        assert value(samples, "bitrix_sidecar_queue_rejected_total") == 0

    async def test_rejections_are_counted(
        self, limited: Callable[..., Any], aiohttp_client: Callable[..., Any]
    ) -> None:
        """Calls refused at the queue timeout are counted."""
        sidecar = await limited(rate=1, burst=1, coalesce="off", queue_timeout="1s")
        admin: Client = await aiohttp_client(create_admin_app(sidecar.app))
        responses = await asyncio.gather(*(sidecar.get("/rest/profile") for _ in range(6)))
        refused = sum(1 for r in responses if r.status == 503)
        samples = await scrape(admin)
        assert refused >= 1
        assert value(samples, "bitrix_sidecar_queue_rejected_total") == refused


class TestClientsLeavingTheQueue:
    @pytest.mark.parametrize("coalesce", ["on", "off"])
    async def test_a_client_gone_while_queued_is_a_499(
        self, coalesce: str, fast_lane: bool, make_settings: Callable[..., Settings],
        emulator: Emulator,
    ) -> None:
        """A queued call whose client hangs up never reaches the portal, and is counted and
        logged as 499 (client closed request), not as a 500 of the sidecar's.

        Served as ``bitrix-sidecar run`` serves (aiohttp's TestServer would cancel the handler
        instead of letting it see the client go).
        """
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), rate=1, burst=1,
                                 coalesce=coalesce)
        app = create_app(settings)
        runner = proxy_runner(app, fast_lane=fast_lane, handle_signals=False, access_log=None,
                              shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = int(runner.addresses[0][1])
            metrics = app[METRICS]
            async with (aiohttp.ClientSession() as http,  # takes the bucket's only place
                        http.get(f"http://127.0.0.1:{port}/rest/profile") as response):
                assert response.status == 200
            with structlog.testing.capture_logs() as logs:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                await writer.drain()
                await until(lambda: metrics.registry.get_sample_value(
                    "bitrix_sidecar_queue_depth") == 1)
                writer.transport.abort()  # gone while queued
                await until(lambda: any(e["event"] == "request" for e in logs), 10)
        finally:
            await runner.cleanup()

        def requests(code: str) -> float | None:
            return metrics.registry.get_sample_value(
                "bitrix_sidecar_requests_total", {"method": "profile", "code": code})

        assert requests("499") == 1
        assert requests("500") is None
        (event,) = [e for e in logs if e["event"] == "request"]
        assert (event["status"], event["error"]) == (499, "SIDECAR_CLIENT_GONE")
        assert [c.method for c in emulator.rest_log] == ["profile"]  # the first call only
