"""Benchmark: 200 concurrent calls right after the portal invalidated the token.

The emulator (in this process, its own limit on: 2/s, burst 50) expires every access token; then
200 clients call ``profile`` at once through a sidecar with the default limiter (2/s, burst 50,
coalescing on). The first 50 calls leave as single calls and all get ``expired_token``; after
the one refresh their retries queue like any call, so they leave coalesced in one ``batch``.
Each round runs every sidecar given, side by side; the table shows medians.

    python -m bench.refresh_storm [--rounds 3] [--calls 200] [--before PATH]

``--before PATH`` also runs the sidecar from another checkout (say, an earlier commit's
``git worktree``), by putting PATH first on its ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.common import CLIENT_ID, CLIENT_SECRET, sidecar
from sidecar.emulator import Emulator, run_emulator

HERE = str(Path(__file__).resolve().parent.parent)  # this checkout


async def storm(base: str, calls: int) -> tuple[float, Counter[int]]:
    """Make ``calls`` concurrent calls; return the seconds until the last answer and statuses."""
    connector = aiohttp.TCPConnector(limit=calls)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as http:

        async def one() -> int:
            async with http.get(f"{base}/rest/profile") as response:
                await response.read()
                return response.status

        started = time.perf_counter()
        statuses = await asyncio.gather(*(one() for _ in range(calls)))
        return time.perf_counter() - started, Counter(statuses)


async def round_of(pythonpath: str, calls: int) -> tuple[float, int, Counter[int]]:
    """One storm against a fresh portal and sidecar; return seconds, refreshes and statuses."""
    emu = Emulator(rate=2, burst=50)
    emu.register_app(CLIENT_ID, CLIENT_SECRET)
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    try:
        async with run_emulator(emu) as portal, sidecar(
            portal, rate="2", burst="50", coalesce="on", queue_timeout="60s"
        ) as base:
            await asyncio.sleep(1.0)  # start-up settled; the portal's bucket is full again
            emu.expire_access_tokens()
            before = emu.stats.token_requests["refresh_token"]
            seconds, statuses = await storm(base, calls)
            return seconds, emu.stats.token_requests["refresh_token"] - before, statuses
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


async def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--before", default="", help="a checkout of the sidecar to compare")
    args = parser.parse_args()
    # The sidecar runs as `python -m sidecar`, which puts its working directory first on its
    # path: work from a neutral one, and name each checkout on PYTHONPATH.
    here = HERE
    os.chdir(tempfile.gettempdir())
    variants = {"this checkout": here}
    if args.before:
        variants = {f"before ({args.before})": args.before, **variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    refreshes: dict[str, list[int]] = {name: [] for name in variants}
    statuses: dict[str, Counter[int]] = {name: Counter() for name in variants}
    for _ in range(args.rounds):
        for name, path in variants.items():
            took, refreshed, answered = await round_of(path, args.calls)
            seconds[name].append(took)
            refreshes[name].append(refreshed)
            statuses[name] += answered
    print(f"\n{args.calls} concurrent calls after the token was invalidated; limiter 2/s, "
          f"burst 50, coalescing on; {args.rounds} rounds\n")
    print("| sidecar | median s | min s | max s | refreshes per storm | answers |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        runs = seconds[name]
        answers = ", ".join(f"{code}: {n}" for code, n in sorted(statuses[name].items()))
        print(f"| {name} | {statistics.median(runs):.2f} | {min(runs):.2f} | {max(runs):.2f} "
              f"| {sorted(set(refreshes[name]))} | {answers} |")


if __name__ == "__main__":
    asyncio.run(main())
