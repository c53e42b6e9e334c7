"""Several real sidecar processes on one PostgreSQL database: the fleet's renewal schedule and a
refresh holder killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID
from tests.pg import Server
from tests.processes import Running, get, running

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
