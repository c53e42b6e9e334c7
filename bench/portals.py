"""Benchmark: marketplace mode with 10,000 authorizations in the store.

The emulator runs in this process: ``--served`` portals are served on loopback (each on its own
port), the rest exist only on its shared OAuth server (their addresses, ``pN.bench.test``, are
never called). The sidecar's SQLite store is seeded with a real pair for every portal, and the
sidecar runs in its own process (``bitrix-sidecar run``).

Reported, side by side in one run:

1. Start-up (process start to listening) and RSS: a single-portal sidecar against the
   marketplace sidecar holding every authorization.
2. Renewals the OAuth server sees per second while the whole store falls due: the interval is
   shortened so every pair is due within the run, and SIDECAR_REFRESH_RATE caps the starts.
3. Calls: ``--clients`` clients make ``--calls`` ``profile`` calls, all to one portal, then spread
   round-robin over the served portals (no rate limit: SIDECAR_RATE=0), after one warm-up call
   to each portal (its connection opened, its gate built); throughput and latency.

    python -m bench.portals [--portals 10000] [--served 1000] [--calls 6000] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from bench.common import (
    CLIENT_ID,
    CLIENT_SECRET,
    Result,
    cpu_seconds,
    error_of,
    free_port,
    rss_mib,
    wait_port,
)
from sidecar.emulator import Emulator, Portal, run_emulator
from sidecar.storage import TokenPair
from sidecar.store import TokenStore


async def measured(pid: int, base: str, paths: list[str], calls: int,
                   clients: int) -> tuple[Result, float]:
    """``load``, and the sidecar's CPU time per call (µs) while it ran."""
    before = cpu_seconds(pid)
    result = await load(base, paths, calls, clients)
    return result, (cpu_seconds(pid) - before) / max(1, calls) * 1e6


def pair_of(answer: dict[str, object]) -> TokenPair:
    """A stored pair from the OAuth server's token answer."""
    return TokenPair(
        access_token=str(answer["access_token"]), refresh_token=str(answer["refresh_token"]),
        expires_at=time.time() + float(str(answer["expires_in"])), scope=str(answer["scope"]),
        member_id=str(answer["member_id"]), client_endpoint=str(answer["client_endpoint"]),
        user_id=str(answer["user_id"]), obtained_at=time.time())


async def seed(path: Path, portals: list[Portal]) -> None:
    """Store a fresh pair for every portal, as installs would have."""
    async with TokenStore(path, portal="", client_id=CLIENT_ID) as store, store.locked():
        for portal in portals:  # in one transaction
            pair = pair_of(portal.issue_tokens(CLIENT_ID))
            await store.authorization(pair.member_id, portal.base_url).save_pair(pair)


@contextlib.asynccontextmanager
async def sidecar(env: dict[str, str]) -> AsyncIterator[tuple[int, str, str, float]]:
    """Run ``bitrix-sidecar run``; yield its pid, proxy and admin URLs, and start-up seconds."""
    port, admin = free_port(), free_port()
    env = env | {"SIDECAR_LISTEN": f"127.0.0.1:{port}",
                 "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}", "SIDECAR_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_port(port, 120)
        yield (proc.pid, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}",
               time.perf_counter() - started)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def load(base: str, paths: list[str], calls: int, clients: int) -> Result:
    """Make ``calls`` GETs over ``paths`` (round-robin) from ``clients`` concurrent clients."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(calls))

    async def client(http: aiohttp.ClientSession) -> None:
        for n in counter:
            sent = time.perf_counter()
            async with http.get(f"{base}{paths[n % len(paths)]}") as response:
                body = await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    key = error_of(response.status, body)
                    errors[key] = errors.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return Result(latencies, errors, time.perf_counter() - started)


async def renewals_per_second(emulator: Emulator, seconds: float) -> list[int]:
    """Sample the OAuth server's refresh count every second; return the per-second deltas."""
    counts = [emulator.stats.token_requests["refresh_token"]]
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        counts.append(emulator.stats.token_requests["refresh_token"])
    return [b - a for a, b in itertools.pairwise(counts)]


async def main(args: argparse.Namespace) -> None:
    emulator = Emulator()
    emulator.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user")
    served = [emulator.add_portal(f"s{i}", host="127.0.0.1") for i in range(args.served)]
    async with run_emulator(emulator):  # serves the portals added so far
        unserved = []
        for i in range(args.portals - args.served):
            portal = emulator.add_portal(f"u{i}")
            portal.bind(f"https://p{i}.bench.test")  # on the OAuth server only: never called
            unserved.append(portal)
        with tempfile.TemporaryDirectory() as tmp:
            base = {k: v for k, v in os.environ.items()
                    if not k.startswith(("BITRIX_", "SIDECAR_"))} | {
                "BITRIX_CLIENT_ID": CLIENT_ID, "BITRIX_CLIENT_SECRET": CLIENT_SECRET,
                "BITRIX_OAUTH_URL": emulator.oauth_url, "SIDECAR_RATE": "0"}
            one_db, many_db = Path(tmp) / "one.db", Path(tmp) / "many.db"
            started = time.perf_counter()
            await seed(many_db, served + unserved)
            seeded = time.perf_counter() - started
            single_env = base | {"BITRIX_PORTAL": served[0].base_url, "SIDECAR_DB": str(one_db),
                                 "BITRIX_AUTH_CODE": served[0].issue_code(CLIENT_ID)}
            listed = ",".join(["https://*.bench.test", *(p.base_url for p in served)])
            many_env = base | {"BITRIX_PORTAL": listed, "SIDECAR_DB": str(many_db)}
            print(f"seeded {args.portals} authorizations in {seeded:.1f} s "
                  f"({args.served} served portals)\n")

            rows = []
            async with sidecar(single_env) as (pid, proxy, _, startup):
                one = await measured(pid, proxy, ["/rest/profile"], args.calls, args.clients)
                rows.append(("single portal", startup, rss_mib(pid)))
            async with sidecar(many_env) as (pid, proxy, _, startup):
                await asyncio.sleep(2.0)  # the watch and the schedule settle
                rows.append((f"marketplace, {args.portals} portals", startup, rss_mib(pid)))
                target = f"/portal/{served[0].member_id}/rest/profile"
                everyone = [f"/portal/{p.member_id}/rest/profile" for p in served]
                # Warm-up: one call to each portal opens its connection and builds its gate,
                # so both runs below measure the steady state.
                await load(proxy, everyone, len(everyone), args.clients)
                first = await measured(pid, proxy, [target], args.calls, args.clients)
                spread = await measured(pid, proxy, everyone, args.calls, args.clients)
                rows[-1] = (*rows[-1][:2], rss_mib(pid))
            print("| sidecar | start-up s | RSS MiB |")
            print("|---|---|---|")
            for name, startup, rss in rows:
                print(f"| {name} | {startup:.2f} | {rss:.0f} |")
            print(f"\nRSS added by {args.portals} authorizations: "
                  f"{rows[1][2] - rows[0][2]:.0f} MiB\n")

            print("| calls | done | calls/s | p50 ms | p99 ms | sidecar CPU µs/call | errors |")
            print("|---|---|---|---|---|---|---|")
            for name, (result, cpu) in (
                    ("single-portal sidecar", one), ("marketplace, all to one portal", first),
                    (f"marketplace, spread over {args.served} portals", spread)):
                print(f"| {name} | {result.ok}/{args.calls} | {result.ok / result.seconds:.0f} | "
                      f"{result.p50:.2f} | {result.quantile(0.99):.2f} | {cpu:.0f} | "
                      f"{sum(result.errors.values()) or 0} {result.errors or ''} |")
            (a, a_cpu), (b, b_cpu) = first, spread
            print(f"\nspread over {args.served} portals / one portal: "
                  f"{(b.ok / b.seconds) / (a.ok / a.seconds):.2f}x throughput, "
                  f"p50 {b.p50 - a.p50:+.2f} ms, sidecar CPU per call {b_cpu / a_cpu:.2f}x\n")

            # Renewals: every pair falls due within the shortened interval.
            renew_env = many_env | {"SIDECAR_REFRESH_INTERVAL": f"{args.interval}s",
                                    "SIDECAR_REFRESH_RATE": str(args.refresh_rate)}
            async with sidecar(renew_env):
                per_second = await renewals_per_second(emulator, args.watch)
            busy = [n for n in per_second if n]
            print(f"| renewals over {args.watch:.0f} s (interval {args.interval:.0f} s, "
                  f"SIDECAR_REFRESH_RATE={args.refresh_rate:g}) | value |")
            print("|---|---|")
            print(f"| total | {sum(per_second)} |")
            print(f"| most in one second | {max(per_second, default=0)} |")
            print(f"| median per second (seconds with any) | "
                  f"{statistics.median(busy) if busy else 0:g} |")


def cli() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--portals", type=int, default=10_000)
    parser.add_argument("--served", type=int, default=1_000)
    parser.add_argument("--calls", type=int, default=6_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--interval", type=float, default=20.0)
    parser.add_argument("--refresh-rate", type=float, default=20.0)
    parser.add_argument("--watch", type=float, default=30.0)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
