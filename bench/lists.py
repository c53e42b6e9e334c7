"""Benchmark: whole lists (``/all/rest/<method>``) against page-by-page fetching, at 2 req/s.

The emulator runs in its own process with the real portal's limit on (2 requests/s, burst 50)
and ``crm.deal`` seeded (``--seed crm.deal=N``); the sidecar runs in its own process
(``bitrix-sidecar run``) with its default limiter (SIDECAR_RATE 2, burst 50). Every measurement
gets a fresh emulator and sidecar, so it starts with both buckets empty, unless it says so.
Portal requests are counted by the sidecar (its upstream request metric, retries included);
``portal s`` is the time those requests took at the emulator, as the sidecar saw it.

1. 10,000 and 100,000 deals fetched (a) page by page as a naive client does (``start=N``, one
   request a page, until no ``next``), (b) as plain pages 50 to a ``batch`` (the whole list with
   ``order[ID]=DESC``) and (c) as the ``>ID`` chain in ``batch`` (the whole list, no order).
   Page by page at 100,000 is about 2,000 requests, 16 minutes at 2/s: measured with ``--full``,
   otherwise computed from the bucket. Each fetch must return exactly N records, ids unique.
2. The sidecar's RSS (sampled every 50 ms) while it answers 100,000 records as NDJSON, and as one
   JSON answer: idle before, peak during.
3. The latency of ``/rest/profile`` from another client (one call every 0.5 s, the next one when
   the previous is answered if that is later) with no fetch, and while a 100,000 fetch runs:
   with the buckets empty at its start, and with them full (50 client ``batch`` calls just sent).

    python -m bench.lists [--full] [--sizes 10000,100000] [--probe-every 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

import aiohttp

from bench.common import (
    Result,
    cpu_seconds,
    emulator,
    free_port,
    rss_mib,
    sidecar_process,
    wait_port,
)

RATE, BURST, PAGE = 2.0, 50, 50
METHOD = "crm.deal.list"
DESC = "order[ID]=DESC"
NDJSON = "application/x-ndjson"


@dataclass
class Stack:
    """A seeded emulator and a sidecar in front of it, each in its own process."""

    pid: int
    base: str
    admin: str
    http: aiohttp.ClientSession

    async def counters(self) -> tuple[float, float, float, float]:
        """Return the portal requests sent so far, their total seconds, rate-limit retries, and
        how many of the requests took over a second."""
        async with self.http.get(f"{self.admin}/metrics") as response:
            text = await response.text()
        values = {"count": 0.0, "sum": 0.0, "limited": 0.0, "fast": 0.0}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == "bitrix_sidecar_upstream_duration_seconds_count":
                values["count"] = float(value)
            elif name == "bitrix_sidecar_upstream_duration_seconds_sum":
                values["sum"] = float(value)
            elif name == 'bitrix_sidecar_upstream_retries_total{reason="rate_limit"}':
                values["limited"] = float(value)
            elif name == 'bitrix_sidecar_upstream_duration_seconds_bucket{le="1.0"}':
                values["fast"] = float(value)
        return (values["count"], values["sum"], values["limited"],
                values["count"] - values["fast"])


@asynccontextmanager
async def stack(records: int) -> AsyncIterator[Stack]:
    """Run an emulator with ``records`` deals and its 2/s burst-50 limit, and a sidecar."""
    admin = free_port()
    timeout = aiohttp.ClientTimeout(total=None)
    async with emulator("--rate", str(RATE), "--burst", str(BURST),
                        "--seed", f"crm.deal={records}") as portal, sidecar_process(
            portal, admin_listen=f"127.0.0.1:{admin}") as (pid, port), aiohttp.ClientSession(
            timeout=timeout) as http:
        await wait_port(admin)
        yield Stack(pid, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", http)


@dataclass
class Fetch:
    """One fetch of a whole list, as the client and the sidecar saw it."""

    ids: list[int]
    seconds: float
    requests: int  # portal requests, by the sidecar's metric
    portal_seconds: float
    limited: int  # portal refusals (QUERY_LIMIT_EXCEEDED) the sidecar retried
    slow: int  # portal requests that took over a second
    cpu: float  # the sidecar's CPU seconds
    said: str = ""  # X-Bitrix-Requests, where the answer has it
    size: int = 0  # bytes of the answer's body

    def verdict(self, expected: int) -> str:
        """Say whether exactly ``expected`` records came, each once."""
        unique = len(set(self.ids))
        if len(self.ids) == expected and unique == expected:
            return "ok"
        return f"WRONG: {len(self.ids)} records, {unique} unique"


async def naive(s: Stack) -> tuple[list[int], str, int]:
    """Fetch page by page, one request a page, following ``next`` as a plain client does."""
    ids: list[int] = []
    size = 0
    start: int | None = 0
    while start is not None:
        async with s.http.get(f"{s.base}/rest/{METHOD}?start={start}") as response:
            raw = await response.read()
        body = json.loads(raw)
        size += len(raw)
        if response.status != 200:
            raise RuntimeError(f"page at {start}: {response.status} {body}")
        ids.extend(int(record["ID"]) for record in body["result"])
        start = body.get("next")
    return ids, "", size


Fetched = tuple[list[int], str, int]  # ids, X-Bitrix-Requests, bytes of the answer


async def whole(s: Stack, query: str = "", method: str = METHOD) -> Fetched:
    """Fetch the whole list in one JSON answer."""
    async with s.http.get(f"{s.base}/all/rest/{method}?{query}") as response:
        raw = await response.read()
    body = json.loads(raw)
    if response.status != 200:
        raise RuntimeError(f"whole list: {response.status} {body}")
    if body["total"] != len(body["result"]):
        raise RuntimeError(f"total {body['total']} for {len(body['result'])} records")
    return ([int(record["ID"]) for record in body["result"]],
            response.headers.get("X-Bitrix-Requests", "?"), len(raw))


async def streamed(s: Stack, query: str = "", method: str = METHOD) -> Fetched:
    """Fetch the whole list as NDJSON, a line at a time; an error line fails the fetch."""
    ids: list[int] = []
    size = 0
    async with s.http.get(f"{s.base}/all/rest/{method}?{query}",
                          headers={"Accept": NDJSON}) as response:
        if response.status != 200:
            raise RuntimeError(f"streamed list: {response.status} {await response.text()}")
        async for line in response.content:
            size += len(line)
            record = json.loads(line)
            if "error" in record:
                raise RuntimeError(f"streamed list cut short: {record}")
            ids.append(int(record["ID"]))
    return ids, "", size


async def measure(s: Stack, work: Awaitable[Fetched]) -> Fetch:
    """Run one fetch; read what it cost from the sidecar's metrics and /proc."""
    before = await s.counters()
    cpu = cpu_seconds(s.pid)
    started = time.perf_counter()
    ids, said, size = await work
    seconds = time.perf_counter() - started
    count, spent, limited, slow = (b - a for a, b in zip(before, await s.counters(),
                                                         strict=True))
    return Fetch(ids, seconds, int(count), spent, int(limited), int(slow),
                 cpu_seconds(s.pid) - cpu, said, size)


STRATEGIES: dict[str, Callable[[Stack], Awaitable[Fetched]]] = {
    "(a) page by page": naive,
    "(b) plain pages in batch": lambda s: whole(s, DESC),
    "(c) >ID chain in batch": lambda s: whole(s, ""),
}
CHAIN = "(c) >ID chain in batch"


def bucket_seconds(requests: int) -> float:
    """Return how long ``requests`` take at 2/s from an empty burst-50 bucket."""
    return max(0, requests - BURST) / RATE


async def throughput(sizes: list[int], full: bool) -> dict[tuple[str, int], Fetch | None]:
    """Section 1: each strategy at each size, in a fresh stack (None: computed, not run); then
    the chain at one record more than the largest size, whose last page is short."""
    runs: dict[tuple[str, int], Fetch | None] = {}
    print("| records | strategy | records/s | portal requests | wall s | portal s | "
          "portal requests > 1 s | sidecar CPU s | limit retries | check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    plan = [(n, name, run) for n in sizes for name, run in STRATEGIES.items()]
    plan.append((sizes[-1] + 1, CHAIN, STRATEGIES[CHAIN]))
    for n, name, run in plan:
        if run is naive and n > 10_000 and not full:
            runs[name, n] = None
            requests = math.ceil(n / PAGE)
            seconds = bucket_seconds(requests)
            print(f"| {n:,} | {name} | {n / seconds:,.0f} | {requests:,} | {seconds:,.0f} | "
                  "| | | | computed (run with --full to measure) |", flush=True)
            continue
        async with stack(n) as s:
            fetch = runs[name, n] = await measure(s, run(s))
        said = f" (X-Bitrix-Requests {fetch.said})" if fetch.said else ""
        print(f"| {n:,} | {name} | {n / fetch.seconds:,.0f} | {fetch.requests:,}{said} | "
              f"{fetch.seconds:,.1f} | {fetch.portal_seconds:,.1f} | {fetch.slow} | "
              f"{fetch.cpu:.1f} | "
              f"{fetch.limited} | {fetch.verdict(n)} |", flush=True)
    return runs


async def peak_rss(pid: int, done: asyncio.Event) -> float:
    """Sample a process's RSS every 50 ms until ``done``; return the highest."""
    peak = rss_mib(pid)
    while not done.is_set():
        peak = max(peak, rss_mib(pid))
        await asyncio.sleep(0.05)
    return peak


async def memory(n: int) -> None:
    """Section 2: the sidecar's RSS while it answers ``n`` records streamed, then whole."""
    print("| answer | records | body MiB | idle RSS MiB | peak RSS MiB | peak - idle MiB | "
          "portal requests | wall s | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in (("NDJSON, streamed", streamed), ("one JSON answer", whole)):
        async with stack(n) as s:
            # Warm up: a single call and an (empty) whole list of each kind load every module.
            async with s.http.get(f"{s.base}/rest/profile") as response:
                await response.read()
            await whole(s, method="crm.lead.list")
            await streamed(s, method="crm.lead.list")
            await asyncio.sleep(1.0)
            idle = rss_mib(s.pid)
            done = asyncio.Event()
            sampler = asyncio.create_task(peak_rss(s.pid, done))
            try:
                fetch = await measure(s, run(s))
            finally:
                done.set()
            peak = max(await sampler, rss_mib(s.pid))
        target = " (target <= 20)" if run is streamed else ""
        print(f"| {name} | {n:,} | {fetch.size / 2**20:.1f} | {idle:.0f} | {peak:.0f} | "
              f"{peak - idle:.1f}{target} | {fetch.requests} | {fetch.seconds:.1f} | "
              f"{fetch.verdict(n)} |", flush=True)


async def probe(s: Stack, every: float, stop: asyncio.Event, seconds: float | None = None
                ) -> Result:
    """Call /rest/profile every ``every`` s (or when the previous call is answered, if later)
    until ``stop`` is set or ``seconds`` pass."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set() and (seconds is None or time.perf_counter() - started < seconds):
        sent = time.perf_counter()
        async with s.http.get(f"{s.base}/rest/profile") as response:
            await response.read()
        if response.status == 200:
            latencies.append(time.perf_counter() - sent)
        else:
            errors[str(response.status)] = errors.get(str(response.status), 0) + 1
        due += every
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
    return Result(latencies, errors, time.perf_counter() - started)


async def fill(s: Stack) -> None:
    """Use up the burst: 50 client ``batch`` calls at once (never coalesced: a slot each)."""

    async def one() -> None:
        async with s.http.get(f"{s.base}/rest/batch?cmd[a]=profile") as response:
            await response.read()
            assert response.status == 200, response.status

    await asyncio.gather(*(one() for _ in range(BURST)))


async def latency(n: int, every: float) -> Fetch | None:
    """Section 3: single calls with no fetch and during each kind of fetch; return the chain
    fetch that started with full buckets."""
    print(f"| /rest/profile every {every:g} s | calls | p50 ms | p99 ms | max ms | errors | "
          "fetch wall s | fetch requests (X-Bitrix-Requests) | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    busy_chain = None
    odd = n + 1  # the chain's last page is short: no emulator table scans (see the summary)
    cases: list[tuple[str, int, str | None, bool]] = [
        ("no fetch running", n, None, False),
        (f"during the {n:,} >ID chain fetch", n, "", False),
        (f"during the {odd:,} >ID chain fetch", odd, "", False),
        (f"during the {n:,} plain-pages fetch", n, DESC, False),
        ("no fetch running, buckets full", n, None, True),
        (f"during the {n:,} >ID chain fetch, buckets full at its start", n, "", True),
        (f"during the {odd:,} >ID chain fetch, buckets full at its start", odd, "", True),
        (f"during the {n:,} plain-pages fetch, buckets full at its start", n, DESC, True),
    ]
    for name, records, query, busy in cases:
        async with stack(records) as s:
            async with s.http.get(f"{s.base}/rest/profile") as response:  # warm up
                await response.read()
            await asyncio.sleep(1.0)  # that slot leaks away
            if busy:
                await fill(s)
            stop = asyncio.Event()
            if query is None:
                result = await probe(s, every, stop, seconds=10.0)
                print(f"| {name} | {result.ok} | {result.p50:.1f} | {result.quantile(0.99):.1f} | "
                      f"{max(result.latencies) * 1000:.1f} | {sum(result.errors.values())} | "
                      "| | |", flush=True)
                continue
            prober = asyncio.create_task(probe(s, every, stop))
            try:
                fetch = await measure(s, whole(s, query))
            finally:
                stop.set()
                result = await prober
            if busy and not query and records == n:
                busy_chain = fetch
        print(f"| {name} | {result.ok} | {result.p50:.1f} | {result.quantile(0.99):.1f} | "
              f"{max(result.latencies, default=math.nan) * 1000:.1f} | "
              f"{sum(result.errors.values())} | {fetch.seconds:.1f} | {fetch.said} | "
              f"{fetch.verdict(records)} |", flush=True)
    return busy_chain


def summary(runs: dict[tuple[str, int], Fetch | None], n: int, busy_chain: Fetch | None
            ) -> None:
    """Section 4: the ratios and the two-minute target."""
    naive_run = runs.get(("(a) page by page", n))
    naive_requests = naive_run.requests if naive_run else math.ceil(n / PAGE)
    how = "measured" if naive_run else "computed"
    for name in ("(c) >ID chain in batch", "(b) plain pages in batch"):
        fetch = runs.get((name, n))
        if fetch is None:
            continue
        ratio = naive_requests / fetch.requests
        print(f"- {n:,} records, page by page ({naive_requests:,} requests, {how}) / {name} "
              f"({fetch.requests} requests): {ratio:.1f}x fewer requests "
              f"({'meets' if ratio >= 40 else 'MISSES'} the 40x target)")
    for name in ("(c) >ID chain in batch", "(b) plain pages in batch"):
        fetch = runs.get((name, n))
        if fetch is None:
            continue
        verdict = "under" if fetch.seconds < 120 else "NOT under"
        print(f"- {name}: {n:,} records in {fetch.seconds:.1f} s from empty buckets, {verdict} "
              f"2 minutes; its {fetch.requests} requests alone would take "
              f"{fetch.requests / RATE:.1f} s at a steady 2/s")
    if busy_chain is not None:
        verdict = "under" if busy_chain.seconds < 120 else "NOT under"
        print(f"- (c) from full buckets, sharing them with another client's calls: "
              f"{busy_chain.seconds:.1f} s, {verdict} 2 minutes")
    chain, odd = runs.get((CHAIN, n)), runs.get((CHAIN, n + 1))
    if chain is not None and chain.portal_seconds > max(5.0, chain.seconds / 2):
        print(f"- the emulator is the bottleneck of the chain at {n:,}: {chain.portal_seconds:.1f} "
              f"s of its {chain.seconds:.1f} s were portal time, {chain.slow} request(s) over a "
              "second. After the last full page the next page is empty, the batch's later "
              "commands' `>ID` filters (`$result[pK][49][ID]`) resolve to that empty page `[]` "
              f"as the portal resolves them, and the emulator answers each by scanning all "
              f"{n:,} records, in one process: meanwhile it answers nobody (the single calls "
              "of section 3 too).")
        if odd is not None:
            print(f"  With {n + 1:,} records the last page is short (no scans): "
                  f"{odd.seconds:.1f} s, {odd.portal_seconds:.1f} s of it portal time.")


async def main(args: argparse.Namespace) -> None:
    """Run the sections and print their tables."""
    sizes = sorted(args.sizes)
    largest = sizes[-1]
    started = time.perf_counter()
    print(f"\n## 1. Whole lists of crm.deal: portal limit {RATE:g}/s, burst {BURST}; sidecar "
          "defaults (SIDECAR_RATE 2, burst 50); fresh processes per row\n")
    runs = await throughput(sizes, args.full)
    print(f"\n## 2. Sidecar RSS while answering {largest:,} records (sampled every 50 ms)\n")
    await memory(largest)
    print(f"\n## 3. Latency of single calls from another client while a whole list of "
          f"{largest:,} is fetched\n")
    busy_chain = await latency(largest, args.probe_every)
    print("\n## 4. Summary\n")
    summary(runs, largest, busy_chain)
    print(f"\n(bench run took {time.perf_counter() - started:.0f} s)")


def cli() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="measure page by page at every size (100,000: about 16 minutes)")
    parser.add_argument("--sizes", type=lambda v: [int(n) for n in v.split(",")],
                        default=[10_000, 100_000], help="comma-separated record counts")
    parser.add_argument("--probe-every", type=float, default=0.5,
                        help="seconds between single calls in section 3")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
