"""Benchmark: the portal's rate limit, with batch coalescing on and off, and with no sidecar.

The emulator runs in its own process with its limit on (2/s, burst 50) and 10 ms per call;
100 concurrent clients make 3,000 independent `crm.lead.get` calls. With coalescing off the
sidecar can only pass 2 calls a second, so that run is cut after as long as the coalesced run
took, and its rate is what it achieved in that window.

    python bench/limits.py [--calls 3000] [--clients 100]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from bench.common import Result, access_token, emulator, error_of, sidecar

LEADS = 100


async def load(
    base: str, calls: int, clients: int, window: float | None, auth: str | None = None
) -> Result:
    """Make ``calls`` crm.lead.get calls from ``clients`` concurrent clients."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue = iter(range(calls))
    started = time.perf_counter()
    deadline = started + window if window else None
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=None)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def client() -> None:
            for n in queue:
                sent = time.perf_counter()
                params = {"id": str(n % LEADS + 1)} | ({"auth": auth} if auth else {})
                async with http.get(f"{base}/rest/crm.lead.get", params=params) as response:
                    body = await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    key = error_of(response.status, body)
                    errors[key] = errors.get(key, 0) + 1

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        if deadline is None:
            await asyncio.gather(*tasks)
        else:
            _, pending = await asyncio.wait(tasks, timeout=window)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    return Result(latencies, errors, time.perf_counter() - started)


def row(name: str, result: Result, calls: int) -> str:
    """Format one table row."""
    limit_errors = sum(v for k, v in result.errors.items() if "QUERY_LIMIT_EXCEEDED" in k)
    other = sum(result.errors.values()) - limit_errors
    return (f"| {name} | {result.ok}/{calls} | {result.ok / result.seconds:8.1f} | "
            f"{result.p50:9.0f} | {result.quantile(0.99):9.0f} | {limit_errors} | {other} | "
            f"{result.seconds:6.1f} |")


async def main() -> None:
    """Run the three configurations and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    portal_flags = ("--rate", "2", "--burst", "50", "--delay", "0.01", "--leads", str(LEADS))
    results: dict[str, Result] = {}
    async with emulator(*portal_flags) as portal, sidecar(
        portal, rate="2", burst="50", coalesce="on", queue_timeout="120s"
    ) as base:
        results["sidecar, coalescing on"] = await load(base, args.calls, args.clients, None)
    window = results["sidecar, coalescing on"].seconds
    async with emulator(*portal_flags) as portal, sidecar(
        portal, rate="2", burst="50", coalesce="off", queue_timeout="3600s"
    ) as base:
        results["sidecar, coalescing off"] = await load(base, args.calls, args.clients, window)
    async with emulator(*portal_flags) as portal:
        token = await access_token(portal)
        results["no sidecar (plain portal)"] = await load(portal, args.calls, args.clients,
                                                          None, auth=token)
    print(f"\n{args.calls} crm.lead.get calls from {args.clients} clients; portal limit 2/s, "
          "burst 50, 10 ms per call\n")
    print("| configuration | calls done | calls/s | p50 ms | p99 ms | limit errors | other "
          "errors | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(row(name, result, args.calls))
    on = results["sidecar, coalescing on"]
    off = results["sidecar, coalescing off"]
    print(f"\ncoalescing on / off: {(on.ok / on.seconds) / (off.ok / off.seconds):.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
