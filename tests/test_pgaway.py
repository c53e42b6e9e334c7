"""PostgreSQL unavailable: a real `run` process keeps serving with the token it holds, never
renews without the row lock, says so naming the database, and recovers by itself.

Each test stops and starts a PostgreSQL server of its own (the session's is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg

from sidecar.config import shown_db
from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID, AlertSink
from tests.pg import Server, postgresql
from tests.processes import Running, get, running

# How long the database stays away under load.
OUTAGE = 30.0
# Steady load: this many clients, each calling one after another with this pause.
CLIENTS = 4
PAUSE = 0.05


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 30.0) -> None:
    """Wait for ``check`` to hold, looking every 0.2 s; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


async def metric(sidecar: Running, name: str) -> float:
    """Read one unlabelled metric from the admin listener."""
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar.admin}/metrics") as reply:
        text = await reply.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, name
    return float(found.group(1))


async def status_of(sidecar: Running) -> dict[str, Any]:
    """Return /status's body."""
    code, body = await get(f"{sidecar.admin}/status")
    assert code == 200, body
    return body


def level(event: dict[str, Any]) -> str:
    """Return a log event's level, whichever key the renderer used."""
    return str(event.get("level") or event.get("log_level") or "")


def stopped(server: Server) -> Awaitable[None]:
    """Stop the server in a thread, so the emulator in this loop keeps answering."""
    return asyncio.to_thread(server.stop)


def started(server: Server) -> Awaitable[None]:
    """Start the server again in a thread."""
    return asyncio.to_thread(server.start)


async def start_sidecar(stack: contextlib.AsyncExitStack, env: dict[str, str],
                        emulator: Emulator, url: str) -> Running:
    """Run one sidecar on ``url`` that exchanges a code at start-up, and wait until valid."""
    sidecar = await stack.enter_async_context(running(
        {**env, "SIDECAR_DB": url, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}))
    assert (await status_of(sidecar))["state"] == "valid"
    return sidecar


async def renew_as_the_database_goes(sidecar: Running, emulator: Emulator,
                                     cut: Callable[[], Awaitable[None]],
                                     slow: float = 3.0) -> None:
    """Make ``sidecar`` renew (its token expired) against a slow OAuth server and ``cut`` the
    database while the answer is on its way: the call is answered 200 with the rotated pair,
    whose commit cannot arrive. The OAuth server answers normally again afterwards."""
    emulator.oauth_slow_seconds = slow
    emulator.oauth_failure = "slow"
    emulator.expire_access_tokens()
    try:
        async with aiohttp.ClientSession() as http:
            pending = asyncio.create_task(http.get(f"{sidecar.base}/rest/profile"))

            async def asked() -> bool:
                return emulator.stats.token_requests["refresh_token"] == 1

            await until(asked, 10)
            await cut()
            async with await pending as reply:
                assert reply.status == 200, await reply.text()
    finally:
        emulator.oauth_failure = None


class TestDatabaseAway:
    async def test_serves_through_an_outage_and_recovers(
        self, env: dict[str, str], emulator: Emulator, alert_sink: AlertSink
    ) -> None:
        """PostgreSQL stopped for 30 s under a steady load on two sidecars: every call answers
        200 with the held token, and none is refused by the portal's limit; /readyz stays ready
        with a reason naming the database (no password) and the budget's local share,
        /status is degraded, the metrics read 0, one warning each for the store and the
        budget is logged; once the server is back the sidecars recover by themselves
        (metrics 1, status back, renewals work again); no alert."""
        with postgresql() as server:
            url = server.url("postgres")
            shown = shown_db(url)
            async with contextlib.AsyncExitStack() as stack:
                # Two replicas sharing the portal's budget (the emulator's 2/s, burst 50).
                emulator.rate = 2.0
                limited = {**env, "SIDECAR_RATE": "2", "SIDECAR_ALERT_WEBHOOK": alert_sink.url}
                sidecar = await start_sidecar(stack, limited, emulator, url)
                other = await stack.enter_async_context(running(
                    {**limited, "SIDECAR_DB": url}))
                assert (await status_of(other))["state"] == "valid"
                assert await metric(sidecar, "bitrix_sidecar_store_available") == 1
                done = asyncio.Event()
                answers: list[tuple[int, str]] = []

                async def client(http: aiohttp.ClientSession, target: Running) -> None:
                    while not done.is_set():
                        async with http.get(f"{target.base}/rest/profile") as reply:
                            answers.append((reply.status, await reply.text()))
                        await asyncio.sleep(PAUSE)

                async with aiohttp.ClientSession() as http:
                    load = [asyncio.create_task(client(http, target))
                            for target in (sidecar, other) for _ in range(CLIENTS)]
                    try:
                        await asyncio.sleep(1.0)
                        before = len(answers)
                        began = time.monotonic()
                        await stopped(server)

                        async def noticed() -> bool:
                            status = await status_of(sidecar)
                            return (status["store"]["available"] is False
                                    and status["rate_budget"]["available"] is False)

                        await until(noticed, 15)
                        code, ready = await get(f"{sidecar.admin}/readyz")
                        assert (code, ready["ready"]) == (200, True), ready
                        assert shown in ready["reason"], ready
                        assert "unreachable" in ready["reason"]
                        assert "serving with the held token until" in ready["reason"]
                        # The budget: this replica's share of the two.
                        assert "shared rate budget" in ready["reason"], ready
                        assert "at most 1 requests/s" in ready["reason"], ready
                        status = await status_of(sidecar)
                        assert status["rate_budget"]["available"] is False, status
                        assert status["rate_budget"]["replicas"] == 2, status
                        assert status["rate_budget"]["local_rate"] == 1.0, status
                        assert await metric(sidecar,
                                            "bitrix_sidecar_shared_budget_available") == 0
                        assert status["state"] == "valid"
                        assert status["store"]["name"] == shown
                        assert status["store"]["available"] is False
                        assert status["store"]["unavailable_since"]
                        assert status["store"]["serving_until"]
                        assert await metric(sidecar, "bitrix_sidecar_store_available") == 0
                        texts = str(ready) + str(status)
                        assert server.password not in texts

                        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - began)))
                        during = len(answers) - before
                        await started(server)

                        async def recovered() -> bool:
                            status = await status_of(sidecar)
                            return (status["store"]["available"] is True
                                    and status["rate_budget"]["available"] is True)

                        await until(recovered, 30)
                        await asyncio.sleep(1.0)
                    finally:
                        done.set()
                        await asyncio.gather(*load)
                assert during > 100, "the load went on during the outage"
                failures = [answer for answer in answers if answer[0] != 200]
                assert not failures, failures[:3]
                assert emulator.stats.limited == 0

                status = await status_of(sidecar)
                assert status["degraded"] is False
                assert status["store"]["unavailable_since"] is None
                code, ready = await get(f"{sidecar.admin}/readyz")
                assert (code, ready["reason"]) == (200, "ok"), ready
                assert await metric(sidecar, "bitrix_sidecar_store_available") == 1

                # Renewals work again, through the lock, without a restart.
                emulator.expire_access_tokens()
                async with aiohttp.ClientSession() as http, http.get(
                        f"{sidecar.base}/rest/profile") as reply:
                    assert reply.status == 200, await reply.text()
                assert emulator.stats.token_requests["refresh_token"] == 1

                events = sidecar.events()
                warnings = [e for e in events if level(e) == "warning"]
                assert sorted(e["event"] for e in warnings) == [
                    "shared_budget_unavailable", "token_store_unavailable"], warnings
                assert not alert_sink.alerts  # the authorization never failed
                assert shown in warnings[0]["store"]
                assert any(e["event"] == "token_store_recovered" for e in events)

                def told(name: str) -> list[dict[str, Any]]:
                    return [e for e in sidecar.events() if e["event"] == name]

                async def listening() -> bool:
                    return bool(told("token_store_listen_restored"))

                # The listening connection comes back too (it retries every 5 s).
                await until(listening, 15)
                assert len(told("token_store_listen_lost")) == 1
                assert server.password not in "".join(sidecar.lines)

    async def test_no_renewal_without_the_lock(
        self, env: dict[str, str], emulator: Emulator, alert_sink: AlertSink
    ) -> None:
        """The token expires while PostgreSQL is away: the sidecar does not refresh (the
        OAuth server sees no request), answers 503 in the Bitrix shape naming the database,
        is not ready; when the database returns it renews once by itself."""
        with postgresql() as server:
            url = server.url("postgres")
            shown = shown_db(url)
            async with contextlib.AsyncExitStack() as stack:
                sidecar = await start_sidecar(
                    stack, {**env, "SIDECAR_ALERT_WEBHOOK": alert_sink.url}, emulator, url)
                await stopped(server)

                async def noticed() -> bool:
                    return (await status_of(sidecar))["degraded"] is True

                await until(noticed, 15)
                emulator.expire_access_tokens()
                async with aiohttp.ClientSession() as http:
                    for _ in range(5):
                        async with http.get(f"{sidecar.base}/rest/profile") as reply:
                            body = await reply.json(content_type=None)
                            assert reply.status == 503, body
                        assert body["error"] == "SIDECAR_TOKEN_UNAVAILABLE", body
                        assert shown in body["error_description"], body
                        assert "lock" in body["error_description"], body
                        assert server.password not in str(body)
                        await asyncio.sleep(0.5)
                assert emulator.stats.token_requests["refresh_token"] == 0
                code, ready = await get(f"{sidecar.admin}/readyz")
                assert (code, ready["ready"]) == (503, False), ready
                assert shown in ready["reason"], ready
                assert "refused" in ready["reason"], ready
                assert emulator.stats.token_requests["refresh_token"] == 0

                await started(server)

                async def renewed() -> bool:
                    return emulator.stats.token_requests["refresh_token"] >= 1

                await until(renewed, 30)
                async with aiohttp.ClientSession() as http, http.get(
                        f"{sidecar.base}/rest/profile") as reply:
                    assert reply.status == 200, await reply.text()
                await asyncio.sleep(2.0)
                assert emulator.stats.token_requests["refresh_token"] == 1
                status = await status_of(sidecar)
                assert (status["state"], status["degraded"]) == ("valid", False), status
                code, ready = await get(f"{sidecar.admin}/readyz")
                assert (code, ready["reason"]) == (200, "ok"), ready
                assert server.password not in "".join(sidecar.lines)
                # The database's absence is told by readiness, a metric and a warning; the
                # authorization itself never failed: no failing alert, so no recovered one.
                await asyncio.sleep(0.5)
                assert not alert_sink.alerts, alert_sink.alerts

    async def test_a_pair_renewed_as_the_database_goes_is_kept_and_written(
        self, env: dict[str, str], emulator: Emulator
    ) -> None:
        """The database stops while a renewal holds the lock and waits on a slow OAuth server:
        the rotated pair (the old refresh token is spent) serves from memory, readiness says
        it waits to be written, and it is written as soon as the database is back; no second
        renewal."""
        with postgresql() as server:
            url = server.url("postgres")
            async with contextlib.AsyncExitStack() as stack:
                sidecar = await start_sidecar(stack, env, emulator, url)
                before = await stored_access(url)
                await renew_as_the_database_goes(sidecar, emulator, lambda: stopped(server))
                async with aiohttp.ClientSession() as http:

                    async def call() -> tuple[int, str]:
                        async with http.get(f"{sidecar.base}/rest/profile") as reply:
                            return reply.status, await reply.text()

                    assert (await call())[0] == 200
                    status = await status_of(sidecar)
                    assert (status["unsaved"], status["degraded"]) == (True, True), status
                    code, ready = await get(f"{sidecar.admin}/readyz")
                    assert (code, ready["ready"]) == (200, True), ready
                    assert "waits in memory" in ready["reason"], ready

                    await started(server)

                    async def written() -> bool:
                        return (await status_of(sidecar))["unsaved"] is False

                    await until(written, 30)
                    assert (await call())[0] == 200
                after = await stored_access(url)
                assert after != before
                assert emulator.stats.token_requests["refresh_token"] == 1
                events = [e["event"] for e in sidecar.events()]
                assert "token_store_write_failed" in events
                assert "token_store_write_recovered" in events

    async def test_a_pair_held_only_in_memory_is_written_at_exit_once_it_can_be(
        self, env: dict[str, str], emulator: Emulator
    ) -> None:
        """SIGTERM while the renewed pair waits in memory and the database is away: the
        sidecar keeps offering it to the database until it returns (within its grace), writes
        it and exits 0; the pair is not lost."""
        with postgresql() as server:
            url = server.url("postgres")
            async with contextlib.AsyncExitStack() as stack:
                sidecar = await start_sidecar(stack, env, emulator, url)
                before = await stored_access(url)
                await renew_as_the_database_goes(sidecar, emulator, lambda: stopped(server),
                                                 slow=2.0)
                assert (await status_of(sidecar))["unsaved"] is True
                stopping = asyncio.create_task(sidecar.stop())
                await asyncio.sleep(3.0)
                assert not stopping.done(), "it waits for the database"
                await started(server)
                assert await asyncio.wait_for(stopping, 30) == 0
                events = [e["event"] for e in sidecar.events()]
                assert "token_save_retrying_at_exit" in events
                assert "token_store_write_recovered" in events
                assert "token_lost_at_exit" not in events
            assert await stored_access(url) != before
            assert emulator.stats.token_requests["refresh_token"] == 1

    async def test_the_replica_holding_an_unwritten_pair_goes_first(
        self, env: dict[str, str], emulator: Emulator, alert_sink: AlertSink
    ) -> None:
        """Two replicas; one renews as the database stops, so its rotated pair waits in
        memory, while the other's token expires and it cannot renew (no lock). When the
        database returns, the other does not spend the refresh token the unwritten pair
        replaced: it waits for that pair, takes it in and serves; one renewal in all, no
        re-authorization, no alert."""
        with postgresql() as server:
            url = server.url("postgres")
            async with contextlib.AsyncExitStack() as stack:
                fleet = {**env, "SIDECAR_ALERT_WEBHOOK": alert_sink.url}
                first = await start_sidecar(stack, fleet, emulator, url)
                second = await stack.enter_async_context(running({**fleet, "SIDECAR_DB": url}))
                assert (await status_of(second))["state"] == "valid"
                await renew_as_the_database_goes(first, emulator, lambda: stopped(server))
                async with aiohttp.ClientSession() as http:

                    async def call(sidecar: Running) -> tuple[int, str]:
                        async with http.get(f"{sidecar.base}/rest/profile") as reply:
                            return reply.status, await reply.text()

                    assert (await status_of(first))["unsaved"] is True
                    # The second's token was refused: it may not renew without the lock.
                    code, text = await call(second)
                    assert code == 503, text
                    assert "lock" in text

                    await started(server)

                    async def served() -> bool:
                        return (await call(second))[0] == 200

                    await until(served, 30)
                    status = await status_of(first)
                    assert status["unsaved"] is False, status
                await asyncio.sleep(1.0)
                assert emulator.stats.token_requests["refresh_token"] == 1
                assert emulator.stats.refresh_rejected == 0
                for sidecar in (first, second):
                    status = await status_of(sidecar)
                    assert status["state"] == "valid", status
                    events = [e["event"] for e in sidecar.events()]
                    assert "reauthorization_required" not in events
                assert not alert_sink.alerts, alert_sink.alerts


class TestDatabaseGoesBack:
    async def test_a_restored_or_emptied_database_gets_the_live_pair_back(
        self, env: dict[str, str], emulator: Emulator, pg_url: str
    ) -> None:
        """The database goes back to an older pair (restored from a backup taken before the
        last renewal): the sidecar does not take that pair in (its refresh token is spent)
        but writes the live one back, and serves on; the same when the row is gone (a
        database made anew). No renewal with a spent token, no re-authorization."""
        async with contextlib.AsyncExitStack() as stack:
            sidecar = await start_sidecar(stack, env, emulator, pg_url)
            conn = await asyncpg.connect(pg_url)
            stack.push_async_callback(conn.close)
            backup = await conn.fetchrow("SELECT * FROM sidecar_authorization")
            emulator.expire_access_tokens()
            async with aiohttp.ClientSession() as http:

                async def call() -> int:
                    async with http.get(f"{sidecar.base}/rest/profile") as reply:
                        return reply.status

                assert await call() == 200  # renewed: generation 2
                live = await stored_access(pg_url)
                assert live != backup["access_token"]
                await conn.execute(
                    "UPDATE sidecar_authorization SET access_token = $1, refresh_token = $2, "
                    "expires_at = $3, obtained_at = $4, generation = $5, version = version + 1",
                    backup["access_token"], backup["refresh_token"], backup["expires_at"],
                    backup["obtained_at"], backup["generation"])

                async def written_back() -> bool:
                    return await stored_access(pg_url) == live

                await until(written_back, 10)
                assert await call() == 200
                await conn.execute("DELETE FROM sidecar_authorization")
                await until(written_back, 10)
                assert await call() == 200
            assert emulator.stats.token_requests["refresh_token"] == 1
            assert emulator.stats.refresh_rejected == 0
            status = await status_of(sidecar)
            assert (status["state"], status["unsaved"]) == ("valid", False), status
            events = [e["event"] for e in sidecar.events()]
            assert events.count("token_store_went_back") == 2, events


async def stored_access(url: str) -> str:
    """Return the access token the database holds."""
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SELECT access_token FROM sidecar_authorization"))
    finally:
        await conn.close()
