"""Several real sidecar processes on one PostgreSQL database: the fleet's renewal schedule and a
refresh holder killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg

from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID
from tests.pg import Server
from tests.processes import Running, get, running
from tests.test_pgaway import until as async_until
from tests.test_pgstore import until

Env = dict[str, str]


@contextlib.asynccontextmanager
async def fleet_of(env: Env, emulator: Emulator, count: int = 3) -> AsyncIterator[list[Running]]:
    """Start ``count`` `run` processes on one database; the first exchanges the first code."""
    async with contextlib.AsyncExitStack() as stack:
        fleet = [await stack.enter_async_context(running(
            {**env, "SIDECAR_REPLICA_ID": "replica-0",
             "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}))]
        fleet += [await stack.enter_async_context(running(
            {**env, "SIDECAR_REPLICA_ID": f"replica-{n}"})) for n in range(1, count)]
        for sidecar in fleet:
            status, body = await get(f"{sidecar.admin}/status")
            assert (status, body["state"]) == (200, "valid"), body
        yield fleet


def refreshed_by(sidecar: Running) -> int:
    """Count the renewals this sidecar made itself (not the pairs it adopted)."""
    return sum(1 for e in sidecar.events() if e["event"] == "token_refreshed")


class TestSchedule:
    async def test_a_2s_interval_over_20s_renews_about_10_times_for_3_sidecars(
        self, env: Env, pg_server: Server, pg_url: str, emulator: Emulator
    ) -> None:
        """SIDECAR_REFRESH_INTERVAL=2s on 3 sidecars for 20 s: about 10 refreshes at the
        OAuth server in total (once per interval for the fleet), not about 30."""
        fleet_env = {**env, "SIDECAR_DB": pg_url, "SIDECAR_REFRESH_INTERVAL": "2s"}
        async with fleet_of(fleet_env, emulator) as fleet:
            before = emulator.stats.token_requests["refresh_token"]
            await asyncio.sleep(20.0)
            made = emulator.stats.token_requests["refresh_token"] - before
            per_replica = [refreshed_by(sidecar) for sidecar in fleet]
            print(f"refreshes in 20 s: {made}, by replica: {per_replica}")
            assert 8 <= made <= 13, (made, per_replica)
            assert emulator.stats.refresh_rejected == 0
            for sidecar in fleet:
                status, body = await get(f"{sidecar.admin}/status")
                assert (status, body["state"]) == (200, "valid"), body

    async def test_a_failing_oauth_server_is_asked_once_per_round_by_the_fleet(
        self, env: Env, pg_server: Server, pg_url: str, emulator: Emulator
    ) -> None:
        """The OAuth server fails while 3 sidecars renew every 2 s: the replica that fails
        writes the fleet's retry time, and the others, queued on the lock, wait for it instead
        of asking in turn, so each round of the backoff costs one request, not three; every
        replica still says it is failing, and once the server answers, all recover."""
        fleet_env = {**env, "SIDECAR_DB": pg_url, "SIDECAR_REFRESH_INTERVAL": "2s"}
        async with fleet_of(fleet_env, emulator) as fleet:
            emulator.oauth_failure = "500"
            try:
                before = emulator.stats.token_requests["refresh_token"]
                await asyncio.sleep(10.0)  # rounds after about 0, 1, 3 and 7 s of backoff
                asked = emulator.stats.token_requests["refresh_token"] - before
                waited = [sum(1 for e in sidecar.events() if e["event"] == "token_refresh_failed"
                              and e.get("error") == "refresh_failing") for sidecar in fleet]
                print(f"OAuth requests in 10 s of failure: {asked}; held back: {waited}")
                assert 3 <= asked <= 6, (asked, waited)
                for sidecar in fleet:
                    status, body = await get(f"{sidecar.admin}/status")
                    assert (status, body["state"]) == (200, "refresh_failing"), body
            finally:
                emulator.oauth_failure = None

            async def recovered() -> bool:
                states = [(await get(f"{sidecar.admin}/status"))[1]["state"]
                          for sidecar in fleet]
                return states == ["valid"] * 3

            await async_until(recovered, 40)
            assert emulator.stats.refresh_ok >= 1


async def call(sidecar: Running) -> tuple[int, dict[str, Any]]:
    """Make one call through ``sidecar``; return status and JSON body."""
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar.base}/rest/profile") as r:
        return r.status, await r.json(content_type=None)


async def lost_call(sidecar: Running) -> None:
    """Make a call that the test kills the sidecar under: no answer ever arrives."""
    with contextlib.suppress(aiohttp.ClientError):
        status, body = await call(sidecar)
        raise AssertionError(f"the killed sidecar answered {status} {body}")


class TestKillNine:
    """SIGKILL of the replica that holds the row lock while its refresh is at the OAuth server
    (the emulator's "slow" failure sleeps first and rotates the pair after the sleep, whether
    or not the caller is still there)."""

    async def start_refresh_and_kill_its_holder(
        self, fleet: list[Running], emulator: Emulator, slow_seconds: float, *,
        answer_at_once_after_kill: bool,
    ) -> tuple[asyncio.Task[None], list[asyncio.Task[tuple[int, dict[str, Any]]]]]:
        """Have replica 0 renew an expired token under the lock, the others queue behind it
        with their own callers, then kill replica 0 while the OAuth server sleeps.

        With ``answer_at_once_after_kill`` the OAuth server stops sleeping in the same step as
        the kill, before this loop yields: the next replica takes the lock as soon as
        PostgreSQL sees the holder gone, and its request must not meet the "slow" failure
        (it would then sleep behind the dead one and find the token spent)."""
        emulator.oauth_slow_seconds = slow_seconds
        emulator.oauth_failure = "slow"
        emulator.expire_access_tokens()
        holder = asyncio.create_task(lost_call(fleet[0]))
        await until(lambda: emulator.stats.token_requests["refresh_token"] == 1)
        waiting = [asyncio.create_task(call(sidecar)) for sidecar in fleet[1:]]
        await asyncio.sleep(1.0)  # they meet the expired token and queue on the row lock
        assert not any(task.done() for task in waiting)
        assert emulator.stats.token_requests["refresh_token"] == 1  # none refreshes meanwhile
        fleet[0].proc.send_signal(signal.SIGKILL)
        if answer_at_once_after_kill:
            emulator.oauth_failure = None
        assert await fleet[0].wait() == -signal.SIGKILL
        await holder
        return holder, waiting

    async def test_another_sidecar_completes_the_renewal(
        self, env: Env, pg_url: str, emulator: Emulator
    ) -> None:
        """The killed holder's request has not been acted on when the lock passes on (the OAuth
        server is still sleeping on it): the next replica renews with the stored refresh token,
        the callers of the others get 200, and the dead request is refused later."""
        fleet_env = {**env, "SIDECAR_DB": pg_url}
        try:
            async with fleet_of(fleet_env, emulator) as fleet:
                _, waiting = await self.start_refresh_and_kill_its_holder(
                    fleet, emulator, 8.0, answer_at_once_after_kill=True)
                answers = await asyncio.wait_for(asyncio.gather(*waiting), 30)
                assert [status for status, _ in answers] == [200, 200], answers
                assert emulator.stats.refresh_ok == 1
                renewers = set()
                for sidecar in fleet[1:]:
                    status, body = await get(f"{sidecar.admin}/status")
                    assert (status, body["state"]) == (200, "valid"), body
                    renewers.add(body["last_refresh_by"])
                assert len(renewers) == 1
                assert renewers <= {"replica-1", "replica-2"}
                # The dead holder's request wakes up to a refresh token already spent.
                await until(lambda: emulator.stats.refresh_rejected == 1)
                assert emulator.stats.refresh_ok == 1
                for sidecar in fleet[1:]:
                    assert (await call(sidecar))[0] == 200
        finally:
            emulator.oauth_failure = None

    async def test_a_token_spent_by_the_dead_holder_means_reauthorization_everywhere(
        self, env: Env, pg_url: str, emulator: Emulator
    ) -> None:
        """The OAuth server rotates the pair for the killed holder, whose answer never arrives:
        the single-use refresh token the database holds is dead. Every surviving replica says
        so: its callers get SIDECAR_REAUTHORIZATION_REQUIRED with the authorize link, /status
        says reauthorization_required, /readyz is 503 and the log names the cause."""
        fleet_env = {**env, "SIDECAR_DB": pg_url}
        try:
            async with fleet_of(fleet_env, emulator) as fleet:
                _, waiting = await self.start_refresh_and_kill_its_holder(
                    fleet, emulator, 3.0, answer_at_once_after_kill=False)
                # The sleep ends and the OAuth server spends the token for nobody.
                await until(lambda: emulator.stats.refresh_ok == 1)
                emulator.oauth_failure = None
                answers = await asyncio.wait_for(asyncio.gather(*waiting), 30)
                for status, body in answers:
                    assert status == 503, body
                    assert body["error"] == "SIDECAR_REAUTHORIZATION_REQUIRED", body
                    assert "/oauth/authorize/?client_id=" in body["error_description"]
                assert emulator.stats.refresh_ok == 1
                for sidecar in fleet[1:]:
                    status, body = await get(f"{sidecar.admin}/status")
                    assert body["state"] == "reauthorization_required", body
                    status, _ = await get(f"{sidecar.admin}/readyz")
                    assert status == 503
                    status, body = await call(sidecar)
                    assert (status, body["error"]) == (503, "SIDECAR_REAUTHORIZATION_REQUIRED")
                said = [e for sidecar in fleet[1:] for e in sidecar.events()
                        if e["event"] == "reauthorization_required"]
                assert said, "no replica logged that a person must authorize again"
                # A final answer sets no retry time for the fleet: nothing is retried, and a
                # replica started after the operator's fix must not wait for one.
                conn = await asyncpg.connect(pg_url)
                try:
                    row = await conn.fetchrow(
                        "SELECT reauth_required, retry_at FROM sidecar_authorization")
                finally:
                    await conn.close()
                assert (row["reauth_required"], row["retry_at"]) == (True, None), dict(row)
        finally:
            emulator.oauth_failure = None
