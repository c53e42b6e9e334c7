"""PostgreSQL cut off without a word: a partition drops every byte and passes on no reset.

A clean stop (tests/test_pgaway.py) closes sockets, so clients notice at once. Behind a silent
relay (tests/blackhole.py) only deadlines notice: a command's own, and on the server's side the
end of a silent lock holder's session, so that the other sidecars can renew.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from sidecar.config import shown_db
from sidecar.emulator import Emulator
from sidecar.errors import StoreError
from sidecar.pgstore import PgStore
from tests.blackhole import Blackhole
from tests.conftest import CLIENT_ID, AlertSink
from tests.pg import Server
from tests.processes import get, running
from tests.test_pgaway import renew_as_the_database_goes, status_of, until
from tests.test_store import PORTAL

TIMEOUT = 1.0  # each command's deadline in these tests (SIDECAR_DB_TIMEOUT)
HOLD = 3.0  # how long a lock holder may sit silent in its transaction


def through(server: Server, url: str, hole: Blackhole) -> str:
    """The URL of the same database, reached through the relay."""
    return server.url(urlsplit(url).path.lstrip("/"), port=hole.port)


class TestSilentDatabase:
    async def test_a_silent_lock_holder_loses_its_lock_to_the_others(
        self, pg_server: Server, pg_url: str
    ) -> None:
        """A sidecar holding the row lock is cut off: PostgreSQL ends its session after the
        holding time, so another sidecar takes the lock within seconds (without it, it waits
        until its own lock timeout and fails); the cut-off one gets a StoreError from every
        command within its deadline, never a hang."""
        async with Blackhole(pg_server.port) as hole:
            near = PgStore(pg_url, portal=PORTAL, client_id="local.1", timeout=TIMEOUT,
                           hold=HOLD)
            far = PgStore(through(pg_server, pg_url, hole), portal=PORTAL,
                          client_id="local.1", timeout=TIMEOUT, hold=HOLD)
            async with near, far:
                holding = asyncio.Event()
                outcome: list[BaseException] = []

                async def hold() -> None:
                    try:
                        async with far.locked():
                            holding.set()
                            await asyncio.sleep(3600)
                    except BaseException as exc:
                        outcome.append(exc)
                        raise

                holder = asyncio.create_task(hold())
                await asyncio.wait_for(holding.wait(), 10)
                # A second connection, made and back in the pool: a command on it must not
                # wait for an answer that never comes.
                await far.data_version()
                hole.silence()
                began = time.monotonic()
                async with near.locked():
                    took = time.monotonic() - began
                assert took < HOLD + TIMEOUT + 1.5, took

                began = time.monotonic()
                with pytest.raises(StoreError) as caught:
                    await asyncio.wait_for(far.data_version(), 10)
                assert time.monotonic() - began < TIMEOUT * 3 + 1
                assert pg_server.password not in caught.value.description

                holder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await holder
                hole.restore()
                # New connections flow again: the cut-off store works without being reopened.
                await until(lambda: _answers(far), 15)

    async def test_a_sidecar_notices_serves_and_recovers(
        self, env: dict[str, str], emulator: Emulator, pg_server: Server, pg_url: str
    ) -> None:
        """A `run` process whose database goes silent says so within seconds, naming the
        database (the token store and the shared rate budget), serves every call with the held
        token meanwhile, and recovers by itself once new connections get through; renewals
        work again."""
        async with Blackhole(pg_server.port) as hole:
            url = through(pg_server, pg_url, hole)
            shown = shown_db(url)
            async with running({**env, "SIDECAR_DB": url, "SIDECAR_DB_TIMEOUT": "1s",
                                "SIDECAR_RATE": "2",
                                "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}) as sidecar:
                assert (await status_of(sidecar))["state"] == "valid"
                answers: list[int] = []
                async with aiohttp.ClientSession() as http:

                    async def call() -> None:
                        async with http.get(f"{sidecar.base}/rest/profile") as reply:
                            answers.append(reply.status)

                    await call()
                    hole.silence()
                    began = time.monotonic()

                    async def noticed() -> bool:
                        await call()
                        status = await status_of(sidecar)
                        return (status["store"]["available"] is False
                                and status["rate_budget"]["available"] is False)

                    await until(noticed, 20)
                    assert time.monotonic() - began < 12
                    code, ready = await get(f"{sidecar.admin}/readyz")
                    assert (code, ready["ready"]) == (200, True), ready
                    assert shown in ready["reason"], ready
                    assert "shared rate budget" in ready["reason"], ready
                    status = await status_of(sidecar)
                    assert status["rate_budget"]["local_rate"] == 2.0, status
                    for _ in range(5):
                        await call()

                    hole.restore()

                    async def recovered() -> bool:
                        await call()
                        status = await status_of(sidecar)
                        return (status["store"]["available"] is True
                                and status["rate_budget"]["available"] is True)

                    await until(recovered, 30)
                    code, ready = await get(f"{sidecar.admin}/readyz")
                    assert (code, ready["reason"]) == (200, "ok"), ready
                    emulator.expire_access_tokens()
                    await call()
                assert set(answers) == {200}, answers
                assert emulator.stats.token_requests["refresh_token"] == 1
                assert pg_server.password not in "".join(sidecar.lines)

    async def test_a_pair_written_late_closes_the_fleets_failure_episode(
        self, env: dict[str, str], emulator: Emulator, pg_server: Server, pg_url: str,
        alert_sink: AlertSink,
    ) -> None:
        """A renewal's commit is cut off, so its rotated pair waits in memory; meanwhile the
        fleet's episode is opened in the database (as by another replica that failed and
        alerted). Once the pair is written it closes that episode: one recovered alert."""
        async with Blackhole(pg_server.port) as hole:
            url = through(pg_server, pg_url, hole)
            async with running({**env, "SIDECAR_DB": url, "SIDECAR_DB_TIMEOUT": "1s",
                                "SIDECAR_UPSTREAM_TIMEOUT": "5s",
                                "SIDECAR_ALERT_WEBHOOK": alert_sink.url,
                                "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}) as sidecar:

                async def cut() -> None:
                    hole.silence()  # the commit will never arrive

                await renew_as_the_database_goes(sidecar, emulator, cut, slow=2.0)
                assert (await status_of(sidecar))["unsaved"] is True
                conn = await asyncpg.connect(pg_url)
                try:
                    # Waits until the server ends the silent holder's session.
                    await conn.execute("UPDATE sidecar_authorization SET failing_since = $1",
                                       time.time() - 60)
                finally:
                    await conn.close()
                hole.restore()

                async def written() -> bool:
                    return (await status_of(sidecar))["unsaved"] is False

                await until(written, 30)
                await asyncio.sleep(0.5)  # the alert's delivery
                assert [a["event"] for a in alert_sink.alerts] == ["token_refresh_recovered"]
                conn = await asyncpg.connect(pg_url)
                try:
                    assert await conn.fetchval(
                        "SELECT failing_since FROM sidecar_authorization") is None
                finally:
                    await conn.close()
                assert emulator.stats.token_requests["refresh_token"] == 1


async def _answers(store: PgStore) -> bool:
    try:
        await store.data_version()
    except StoreError:
        return False
    return True
