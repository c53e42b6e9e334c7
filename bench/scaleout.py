"""Benchmark: 1, 2 and 3 sidecars sharing one PostgreSQL database (one authorization, one rate
budget), and what the shared budget adds to each call.

Part 1: the emulator in its own process with its limit on (2/s, burst 50, 10 ms per call);
``--clients`` concurrent clients spread evenly over N sidecars make ``--calls`` independent
``crm.lead.get`` calls, coalesced into batches. Reported: calls/s the fleet delivers, p50/p99
latency, limit errors (there must be none), and PostgreSQL transactions per call: the delta of
``xact_commit + xact_rollback`` of the fleet's database over the run (background work such as
heartbeats included) divided by the calls.

Part 2: the added latency of the shared budget. The minimal upstream (bench/upstream.py, no
limit) behind one sidecar with SIDECAR_RATE=10000 (the bucket takes a slot for every call but
never waits), on SQLite and on PostgreSQL; one client calling in sequence.

A PostgreSQL 15 server is started for the run as in the test suite (tests/pg.py).

    python -m bench.scaleout [--calls 3000] [--clients 240] [--latency-calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg

from bench.common import (
    CLIENT_ID,
    CLIENT_SECRET,
    Result,
    approve,
    emulator,
    error_of,
    free_port,
    process,
    wait_port,
)
from tests.pg import Server, postgresql

LEADS = 100


async def database(server: Server, name: str) -> str:
    """Create a fresh database on ``server``; return its URL."""
    conn = await asyncpg.connect(server.url("postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


async def transactions(url: str) -> int:
    """Return the database's committed plus rolled-back transactions so far."""
    conn = await asyncpg.connect(url)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database "
            "WHERE datname = current_database()")
    finally:
        await conn.close()
    return int(value)


@contextlib.asynccontextmanager
async def fleet(portal: str, db: str, count: int, code: str | None = None,
                **settings: str) -> AsyncIterator[list[str]]:
    """Run ``count`` authorized `run` processes on the store ``db``; yield their base URLs.

    The first exchanges a code (``code``, else one approved on the emulator); the others
    load the pair it stored.
    """
    bases: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        for n in range(count):
            port, admin = free_port(), free_port()
            env = {
                **{k: v for k, v in os.environ.items()
                   if not k.startswith(("BITRIX_", "SIDECAR_"))},
                "BITRIX_PORTAL": portal, "BITRIX_CLIENT_ID": CLIENT_ID,
                "BITRIX_CLIENT_SECRET": CLIENT_SECRET, "SIDECAR_DB": db,
                "SIDECAR_LISTEN": f"127.0.0.1:{port}",
                "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                "SIDECAR_LOG_LEVEL": "warning", "SIDECAR_REPLICA_ID": f"replica-{n}",
                **{f"SIDECAR_{k.upper()}": v for k, v in settings.items()},
            }
            if n == 0:
                env["BITRIX_AUTH_CODE"] = code or await approve(portal)
            await stack.enter_async_context(
                process(sys.executable, "-m", "sidecar", "run", env=env))
            await wait_port(port)
            await wait_port(admin)
            await ready(f"http://127.0.0.1:{admin}")
            bases.append(f"http://127.0.0.1:{port}")
        yield bases


async def ready(admin: str, seconds: float = 15.0) -> None:
    """Wait until the sidecar says it is ready to serve."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{admin}/readyz") as response:
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{admin} is not ready")
            await asyncio.sleep(0.1)


async def load(bases: list[str], method: str, calls: int, clients: int) -> Result:
    """Make ``calls`` calls from ``clients`` concurrent clients spread over ``bases``."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue = iter(range(calls))
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=None)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def client(base: str) -> None:
            for n in queue:
                sent = time.perf_counter()
                params = {"id": str(n % LEADS + 1)}
                async with http.get(f"{base}/rest/{method}", params=params) as response:
                    body = await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    key = error_of(response.status, body)
                    errors[key] = errors.get(key, 0) + 1

        await asyncio.gather(*(client(bases[n % len(bases)]) for n in range(clients)))
    return Result(latencies, errors, time.perf_counter() - started)


async def measured(url: str) -> int:
    """Return the transaction counter once the statistics of the last second are in."""
    await asyncio.sleep(1.2)  # backends flush their statistics about once a second
    return await transactions(url)


async def scale(server: Server, count: int, calls: int, clients: int) -> tuple[Result, float]:
    """Part 1 for ``count`` sidecars: the result and PostgreSQL transactions per call."""
    db = await database(server, f"scale{count}")
    flags = ("--rate", "2", "--burst", "50", "--delay", "0.01", "--leads", str(LEADS))
    async with emulator(*flags) as portal, fleet(
        portal, db, count, rate="2", burst="50", coalesce="on", queue_timeout="120s",
    ) as bases:
        before = await measured(db)
        result = await load(bases, "crm.lead.get", calls, clients)
        after = await measured(db)
    return result, (after - before - 1) / max(result.ok, 1)


async def latency(server: Server, calls: int) -> dict[str, tuple[Result, float]]:
    """Part 2: one client in sequence through one sidecar on SQLite, then on PostgreSQL."""
    results: dict[str, tuple[Result, float]] = {}
    up = free_port()
    portal = f"http://127.0.0.1:{up}"
    settings = {"rate": "10000", "burst": "10000"}
    async with process(sys.executable, "-m", "bench.upstream", "--port", str(up)):
        await wait_port(up)
        with tempfile.TemporaryDirectory() as tmp:
            async with fleet(portal, str(Path(tmp) / "t.db"), 1, code="any",
                             **settings) as bases:
                await load(bases, "bench.small", 200, 1)  # warm up
                results["1 sidecar, SQLite"] = (await load(bases, "bench.small", calls, 1),
                                                float("nan"))
        db = await database(server, "latency")
        async with fleet(portal, db, 1, code="any", **settings) as bases:
            await load(bases, "bench.small", 200, 1)
            before = await measured(db)
            result = await load(bases, "bench.small", calls, 1)
            after = await measured(db)
            results["1 sidecar, PostgreSQL"] = (result, (after - before - 1) / max(result.ok, 1))
    return results


def row(name: str, result: Result, calls: int, per_call: float) -> str:
    """Format one table row."""
    limit_errors = sum(v for k, v in result.errors.items() if "QUERY_LIMIT_EXCEEDED" in k)
    other = sum(result.errors.values()) - limit_errors
    shown = "-" if math.isnan(per_call) else f"{per_call:.2f}"  # NaN: no PostgreSQL
    return (f"| {name} | {result.ok}/{calls} | {result.ok / result.seconds:8.1f} | "
            f"{result.p50:8.2f} | {result.quantile(0.99):8.2f} | {limit_errors} | {other} | "
            f"{shown} |")


async def main() -> None:
    """Run both parts and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=240)
    parser.add_argument("--latency-calls", type=int, default=2000)
    args = parser.parse_args()
    head = ("| configuration | calls done | calls/s | p50 ms | p99 ms | limit errors | "
            "other errors | PostgreSQL xacts per call |\n|---|---|---|---|---|---|---|---|")
    with postgresql() as server:
        fleet_rows = [(count, *await scale(server, count, args.calls, args.clients))
                      for count in (1, 2, 3)]
        latencies = await latency(server, args.latency_calls)
    print(f"\nPart 1: {args.calls} crm.lead.get calls from {args.clients} clients spread over "
          "the sidecars; emulator limit 2/s, burst 50, 10 ms per call; coalescing on\n")
    print(head)
    for count, result, per_call in fleet_rows:
        row_name = f"{count} sidecar{'s' if count > 1 else ''}, PostgreSQL"
        print(row(row_name, result, args.calls, per_call))
    print(f"\nPart 2: {args.latency_calls} calls from 1 client in sequence; minimal upstream, "
          "no limit; SIDECAR_RATE=10000 (a slot per call, never a wait)\n")
    print(head)
    for name, (result, per_call) in latencies.items():
        print(row(name, result, args.latency_calls, per_call))
    sqlite = latencies["1 sidecar, SQLite"][0]
    pg = latencies["1 sidecar, PostgreSQL"][0]
    print(f"\nadded by the shared budget: p50 {pg.p50 - sqlite.p50:+.2f} ms, "
          f"p99 {pg.quantile(0.99) - sqlite.quantile(0.99):+.2f} ms per call")


if __name__ == "__main__":
    asyncio.run(main())
