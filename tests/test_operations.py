"""Operating the sidecar: metrics, probes, status, alerts, backoff, access log, graceful stop."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import create_admin_app, create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.metrics import MAX_METHOD_LABELS
from tests.conftest import CLIENT_ID, tokens_of
from tests.processes import Env, cli, running

Client = TestClient[web.Request, web.Application]


async def scrape(admin: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read /metrics with prometheus-client's own parser into {(name, labels): value}."""
    response = await admin.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """Return one sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def admin(sidecar: Client, aiohttp_client: Callable[..., Any]) -> Client:
    """Serve the admin listener of the running sidecar."""
    client: Client = await aiohttp_client(create_admin_app(sidecar.app))
    return client


class TestMetrics:
    async def test_calls_and_refreshes_are_counted(
        self, sidecar: Client, admin: Client, emulator: Emulator
    ) -> None:
        """Requests, durations, retries, refreshes and token gauges are exported."""
        for _ in range(3):
            await sidecar.get("/rest/profile")
        emulator.expire_access_tokens()
        await sidecar.get("/rest/user.current")
        samples = await scrape(admin)
        assert value(samples, "bitrix_sidecar_requests_total", method="profile", code="200") == 3
        assert value(samples, "bitrix_sidecar_request_duration_seconds_count",
                     method="user.current") == 1
        assert value(samples, "bitrix_sidecar_upstream_duration_seconds_count") == 5
        assert value(samples, "bitrix_sidecar_upstream_retries_total", reason="auth_error") == 1
        assert value(samples, "bitrix_sidecar_token_refreshes_total",
                     trigger="auth_error", result="ok") == 1
        assert value(samples, "bitrix_sidecar_token_refresh_duration_seconds_count") == 1
        pair = tokens_of(sidecar).pair
        assert pair is not None
        assert value(samples, "bitrix_sidecar_token_expires_at_seconds") == pytest.approx(
            pair.expires_at)
        assert value(samples, "bitrix_sidecar_token_last_refresh_timestamp_seconds") > 0
        assert value(samples, "bitrix_sidecar_refresh_failing") == 0
        assert value(samples, "bitrix_sidecar_reauthorization_required") == 0
        assert value(samples, "bitrix_sidecar_inflight_requests") == 0

    async def test_calls_in_flight_are_counted(
        self, sidecar: Client, admin: Client, emulator: Emulator
    ) -> None:
        emulator.call_delay = 0.5
        calls = [asyncio.ensure_future(sidecar.get("/rest/profile")) for _ in range(3)]
        await until(lambda: len(emulator.rest_log) == 3)
        assert value(await scrape(admin), "bitrix_sidecar_inflight_requests") == 3
        await asyncio.gather(*calls)
        assert value(await scrape(admin), "bitrix_sidecar_inflight_requests") == 0

    async def test_made_up_method_names_do_not_create_series(
        self, sidecar: Client, admin: Client
    ) -> None:
        """A thousand invented names collapse into one label value."""
        await asyncio.gather(*(sidecar.get(f"/rest/made.up.m{i}") for i in range(1000)))
        await sidecar.get("/rest/bad..name")
        samples = await scrape(admin)
        methods = {dict(labels).get("method") for (name, labels) in samples
                   if name == "bitrix_sidecar_requests_total"}
        assert methods == {"unknown", "invalid"}
        assert value(samples, "bitrix_sidecar_requests_total", method="unknown",
                     code="404") == 1000
        assert MAX_METHOD_LABELS <= 1000

    async def test_no_secret_in_metrics_or_status(self, sidecar: Client, admin: Client) -> None:
        """Neither /metrics nor /status shows a token or the secret."""
        pair = tokens_of(sidecar).pair
        assert pair is not None
        for path in ("/metrics", "/status", "/readyz"):
            text = await (await admin.get(path)).text()
            for secret in (pair.access_token, pair.refresh_token, "test-client-secret"):
                assert secret not in text


class TestProbes:
    async def test_ready_and_healthy_when_authorized(self, admin: Client) -> None:
        """A held, valid token and a writable store make the sidecar ready."""
        assert (await admin.get("/healthz")).status == 200
        response = await admin.get("/readyz")
        assert response.status == 200
        assert (await response.json())["ready"] is True

    async def test_not_ready_without_a_token(
        self, make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any]
    ) -> None:
        """With no token, /readyz says 503 and why; /healthz stays 200."""
        proxy: Client = await aiohttp_client(create_app(make_settings()))
        admin: Client = await aiohttp_client(create_admin_app(proxy.app))
        response = await admin.get("/readyz")
        assert response.status == 503
        assert "not_authorized" in (await response.json())["reason"]
        assert (await admin.get("/healthz")).status == 200
        status = await (await admin.get("/status")).json()
        assert status["state"] == "not_authorized"
        assert "/oauth/authorize/" in status["authorize_url"]

    async def test_admin_listener_never_proxies(self, admin: Client, emulator: Emulator) -> None:
        """/rest/ on the admin port is a 404, and nothing reaches the portal."""
        response = await admin.get("/rest/profile")
        assert response.status == 404
        assert (await response.json())["error"] == "SIDECAR_NOT_FOUND"
        assert (await admin.get("/token")).status == 404
        assert list(emulator.rest_log) == []


class Receiver:
    """A real HTTP receiver for alert webhooks."""

    def __init__(self, status: int = 200) -> None:
        self.events: list[dict[str, Any]] = []
        self.status = status
        self.app = web.Application()
        self.app.router.add_post("/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        self.events.append(await request.json())
        return web.Response(status=self.status)


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Any]) -> tuple[Receiver, str]:
    """Serve an alert receiver; return it and its URL."""
    hook = Receiver()
    server: TestServer = await aiohttp_server(hook.app)
    return hook, str(server.make_url("/hook"))


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until ``predicate`` holds."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class TestAlerts:
    async def test_one_alert_per_episode(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any], receiver: tuple[Receiver, str],
    ) -> None:
        """Failing renewals send one alert when the episode opens and one when it closes."""
        hook, url = receiver
        now = [time.time()]
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), alert_webhook=url)
        proxy: Client = await aiohttp_client(create_app(settings, clock=lambda: now[0]))
        tokens = tokens_of(proxy)
        emulator.oauth_failure = "500"
        for _ in range(4):
            pair = tokens.pair
            assert pair is not None
            with pytest.raises(Exception, match="renewing the token failed"):
                await tokens.refresh(pair.access_token, trigger="schedule")
            now[0] += 400  # past any backoff step
        emulator.oauth_failure = None
        assert tokens.pair is not None
        await tokens.refresh(tokens.pair.access_token, trigger="schedule")
        await until(lambda: len(hook.events) == 2)
        failing, recovered = hook.events
        assert failing["event"] == "token_refresh_failing"
        assert failing["attempts"] == 1
        assert failing["portal"] == settings.portal
        assert {"error", "first_failure_at", "token_expires_at"} <= set(failing)
        assert recovered["event"] == "token_refresh_recovered"
        assert recovered["attempts"] == 4
        assert "authorize_url" not in failing

    async def test_reauthorization_alert_carries_the_address(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any], receiver: tuple[Receiver, str],
    ) -> None:
        """invalid_grant alerts once, with the authorize address, and refreshing stops."""
        hook, url = receiver
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), alert_webhook=url)
        proxy: Client = await aiohttp_client(create_app(settings))
        emulator.revoke_refresh_tokens()
        emulator.expire_access_tokens()
        for _ in range(5):
            assert (await proxy.get("/rest/profile")).status == 503
        await until(lambda: len(hook.events) == 1)
        await asyncio.sleep(0.1)
        assert len(hook.events) == 1
        assert hook.events[0]["state"] == "reauthorization_required"
        assert "/oauth/authorize/?client_id=" in hook.events[0]["authorize_url"]
        assert emulator.stats.token_requests["refresh_token"] == 1

    async def test_broken_webhook_is_not_fatal(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any], unused_tcp_port: int,
    ) -> None:
        """An unreachable alert receiver is logged and counted; the sidecar carries on."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 alert_webhook=f"http://127.0.0.1:{unused_tcp_port}/x")
        proxy: Client = await aiohttp_client(create_app(settings))
        admin: Client = await aiohttp_client(create_admin_app(proxy.app))
        emulator.oauth_failure = "garbage"
        emulator.expire_access_tokens()
        with structlog.testing.capture_logs() as logs:
            assert (await proxy.get("/rest/profile")).status == 503
            await until(lambda: any(e["event"] == "alert_delivery_failed" for e in logs))
        samples = await scrape(admin)
        assert value(samples, "bitrix_sidecar_alerts_total", event="token_refresh_failing",
                     result="failed") == 1
        assert value(samples, "bitrix_sidecar_refresh_failing") == 1
        emulator.oauth_failure = None


class TestBackoff:
    async def test_delays_double_with_jitter(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """Attempts are spaced about 1, 2, 4, 8 s apart and never more than 5 minutes."""
        now = [time.time()]
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID))
        proxy: Client = await aiohttp_client(create_app(settings, clock=lambda: now[0]))
        tokens = tokens_of(proxy)
        emulator.oauth_failure = "500"
        delays = []
        for _ in range(12):
            pair = tokens.pair
            assert pair is not None
            with pytest.raises(Exception, match="renewing"):
                await tokens.refresh(pair.access_token, trigger="schedule")
            delays.append(tokens.next_due() - now[0])
            now[0] = tokens.next_due()
        for attempt, delay in enumerate(delays[:5]):
            assert 0.75 * 2**attempt <= delay <= 1.25 * 2**attempt
        assert max(delays) <= 300 * 1.25
        assert delays[-1] >= 300 * 0.75
        assert emulator.stats.token_requests["refresh_token"] == 12
        emulator.oauth_failure = None


class TestAccessLog:
    async def test_one_event_per_call(self, sidecar: Client, emulator: Emulator) -> None:
        """Each call logs request id, method, status, durations and whether it was retried."""
        emulator.expire_access_tokens()
        with structlog.testing.capture_logs() as logs:
            response = await sidecar.get("/rest/profile", headers={"X-Request-ID": "rid-1"})
        events = [e for e in logs if e["event"] == "request"]
        assert len(events) == 1
        event = events[0]
        assert response.headers["X-Request-ID"] == "rid-1"
        assert event["request_id"] == "rid-1"
        assert event["method"] == "profile"
        assert event["status"] == 200
        assert event["retried"] is True
        assert event["duration_ms"] >= event["upstream_ms"] > 0


class TestShutdown:
    async def test_sigterm_lets_a_slow_call_finish(self, env: Env, emulator: Emulator) -> None:
        """SIGTERM stops accepting, lets the call in flight finish, and exits 0."""
        emulator.call_delay = 1.0
        env = {**env, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}
        async with running(env) as sidecar, aiohttp.ClientSession() as http:
            slow = asyncio.create_task(http.get(f"{sidecar.base}/rest/profile"))
            await until(lambda: len(emulator.rest_log) == 1)
            sidecar.proc.send_signal(signal.SIGTERM)
            response = await asyncio.wait_for(slow, 10)
            assert response.status == 200
            assert (await response.json())["result"]["ID"] == "1"
            response.release()
            assert await sidecar.wait() == 0
        events = {e["event"]: e for e in sidecar.events()}
        assert events["shutting_down"]["inflight"] == 1
        assert events["drained"]["cancelled"] == 0
        assert "stopped" in events
        assert json.dumps(events)  # all events were valid JSON lines


class TestHealthcheckCommand:
    async def test_healthcheck_against_a_running_sidecar(self, env: Env,
                                                        emulator: Emulator) -> None:
        """`healthcheck` exits 0 on a live sidecar, `--ready` follows readiness, 1 when down."""
        async with running(env) as sidecar:
            admin = sidecar.admin.removeprefix("http://")
            code, out, _ = await cli("healthcheck", "--admin-listen", admin, env=env)
            assert code == 0
            assert json.loads(out)["status"] == "ok"
            code, _, err = await cli("healthcheck", "--ready", "--admin-listen", admin, env=env)
            assert code == 1
            assert "not_authorized" in err
            assert await sidecar.stop() == 0
        code, _, _ = await cli("healthcheck", "--admin-listen", admin, env=env)
        assert code == 1
