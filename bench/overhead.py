"""Benchmark: what the sidecar costs per call, against calling the portal directly and nginx.

Everything runs on loopback, each part in its own process: a minimal fast upstream that answers
like the portal (bench/upstream.py), a bare aiohttp forwarder (bench/bare.py: the floor for any
aiohttp proxy), the sidecar (`bitrix-sidecar run`, limiter off, default logging), nginx
configured to add a fixed `auth` parameter (skipped with a note when nginx is not installed:
`apt-get install nginx`), and the load from wrk and hey (`apt-get install wrk hey`). The
500 calls/s load comes once from one hey (10 workers ticking in lockstep) and once from 10 hey
processes started evenly apart. Each measurement is repeated and the median printed, with
ratios to direct and nginx.

    python -m bench.overhead [--runs 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import cpu_seconds, rss_mib

NGINX_CONF = """
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream portal {{ server 127.0.0.1:{upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location /rest/ {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_pass http://portal$uri?$args&auth=fixed-token;
        }}
    }}
}}
"""


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, seconds: float = 15.0) -> None:
    """Wait until something listens on the port."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def child(args: list[str], env: dict[str, str] | None = None,
          log: Path | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process for the duration of the block."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=out, cwd=cwd)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    assert match, text
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "us" else value * 1000 if match.group(2) == "s" \
        else value


def wrk(url: str, connections: int, seconds: float, threads: int = 2) -> tuple[float, float,
                                                                               float, int]:
    """Run wrk; return requests/s, p50 ms, p99 ms and the request count."""
    out = subprocess.run(
        ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{int(seconds)}s",
         "--latency", url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} failed calls")
    return rate, p50, p99, count


def hey(url: str, clients: int, per_client_rate: int, seconds: float) -> tuple[float, float]:
    """Run hey at a fixed rate; return p50 and p99 in ms."""
    out = subprocess.run(
        ["hey", "-z", f"{int(seconds)}s", "-c", str(clients), "-q", str(per_client_rate), url],
        capture_output=True, text=True, check=True).stdout
    p50 = float(re.search(r"50%+ in ([\d.]+) secs", out).group(1)) * 1000  # type: ignore[union-attr]
    p99 = float(re.search(r"99%+ in ([\d.]+) secs", out).group(1)) * 1000  # type: ignore[union-attr]
    if re.search(r"\[(?!200)\d{3}\]", out.split("Status code distribution:")[-1]):
        raise RuntimeError(f"{url}: failed calls\n{out}")
    return p50, p99


def hey_spread(url: str, clients: int, per_client_rate: int, seconds: float) -> tuple[float,
                                                                                   float]:
    """The same load from ``clients`` hey processes started 1/(rate*clients) s apart.

    One hey's workers tick in lockstep: its 10 clients send together, in bursts of 10 every
    20 ms. Real clients are not synchronised; this spreads their calls evenly over time.
    Returns p50 and p99 in ms over every call.
    """
    gap = 1 / (per_client_rate * clients)
    procs = []
    for _ in range(clients):
        procs.append(subprocess.Popen(
            ["hey", "-z", f"{int(seconds)}s", "-c", "1", "-q", str(per_client_rate), "-o", "csv",
             url], stdout=subprocess.PIPE, text=True))
        time.sleep(gap)
    times: list[float] = []
    for proc in procs:
        out, _ = proc.communicate()
        for line in out.splitlines()[1:]:
            fields = line.split(",")
            if fields[6] != "200":
                raise RuntimeError(f"{url}: a call failed with {fields[6]}")
            times.append(float(fields[0]) * 1000)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]


async def hold_connections(port: int, count: int) -> list[tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]]:
    """Open ``count`` keep-alive connections, each having made one call."""
    held = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /rest/bench.small HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        held.append((reader, writer))
    return held


def median(values: list[float]) -> float:
    """Return the median."""
    return statistics.median(values)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    for tool in ("wrk", "hey"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install wrk hey")
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    up, side, admin, ngx, bare = (free_port() for _ in range(5))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BITRIX_", "SIDECAR_"))},
           "BITRIX_PORTAL": f"http://127.0.0.1:{up}", "BITRIX_CLIENT_ID": "local.bench.1",
           "BITRIX_CLIENT_SECRET": "bench-secret", "BITRIX_AUTH_CODE": "any",
           "SIDECAR_DB": str(tmp / "t.db"), "SIDECAR_LISTEN": f"127.0.0.1:{side}",
           "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}", "SIDECAR_RATE": "0"}
    have_nginx = shutil.which("nginx") is not None
    if have_nginx:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, upstream=up, port=ngx))
    targets = {"direct": f"http://127.0.0.1:{up}/rest/",
               "bare aiohttp": f"http://127.0.0.1:{bare}/rest/",
               "sidecar": f"http://127.0.0.1:{side}/rest/"}
    if have_nginx:
        targets["nginx"] = f"http://127.0.0.1:{ngx}/rest/"
    rows: dict[tuple[str, str], list[float]] = {}

    def record(name: str, target: str, value: float) -> None:
        rows.setdefault((name, target), []).append(value)

    with child([sys.executable, "-m", "bench.upstream", "--port", str(up)]), \
            child([sys.executable, "-m", "bench.bare", "--port", str(bare), "--upstream",
                   str(up)]), \
            child([sys.executable, "-m", "sidecar", "run"], env=env,
                  log=tmp / "sidecar.log") as sidecar, \
            (child(["nginx", "-c", str(tmp / "nginx.conf")]) if have_nginx
             else _nothing()):
        for port in (up, side, bare, *((ngx,) if have_nginx else ())):
            wait_port(port)
        idle_rss = rss_mib(sidecar.pid)
        for _ in range(args.runs):
            for size in ("small", "large"):
                method = f"bench.{size}"
                for target, base in targets.items():
                    url = base + method + ("?auth=x" if target == "direct" else "")
                    before = cpu_seconds(sidecar.pid)
                    rate, _, _, count = wrk(url, 64, args.seconds)
                    if target == "sidecar":
                        record(f"{size}: CPU ms per call", target,
                               (cpu_seconds(sidecar.pid) - before) * 1000 / count)
                    record(f"{size}: calls/s at c=64", target, rate)
                    _, p50, p99, _ = wrk(url, 1, args.seconds, threads=1)
                    record(f"{size}: p50 ms at c=1", target, p50)
                    record(f"{size}: p99 ms at c=1", target, p99)
                    if size == "small":
                        p50, p99 = hey(url, 10, 50, args.seconds)
                        record("small: p50 ms at 500/s, 10 clients in lockstep", target, p50)
                        record("small: p99 ms at 500/s, 10 clients in lockstep", target, p99)
                        p50, p99 = hey_spread(url, 10, 50, args.seconds)
                        record("small: p50 ms at 500/s, 10 clients spread", target, p50)
                        record("small: p99 ms at 500/s, 10 clients spread", target, p99)
        held = asyncio.run(_hold_and_measure(side, sidecar.pid))
    print(f"\nmedians of {args.runs} runs of {args.seconds:g} s; 2 cores; load from wrk/hey in "
          "their own processes\n")
    names = list(targets)
    head = "| measurement | " + " | ".join(names) + " | sidecar - direct | sidecar / direct |"
    if have_nginx:
        head += " sidecar / nginx |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in dict.fromkeys(n for n, _ in rows):
        values = {t: median(rows[(name, t)]) for t in names if (name, t) in rows}
        cells = [f"{values[t]:.2f}" if t in values else "" for t in names]
        line = f"| {name} | " + " | ".join(cells)
        if "direct" in values and "sidecar" in values:
            line += (f" | {values['sidecar'] - values['direct']:+.2f}"
                     f" | {values['sidecar'] / values['direct']:.2f}")
        else:
            line += " | | "
        if have_nginx:
            line += (f" | {values['sidecar'] / values['nginx']:.2f}"
                     if "nginx" in values and "sidecar" in values else " | ")
        print(line + " |")
    print(f"\nsidecar RSS: idle {idle_rss:.1f} MiB; with 1,000 open client connections "
          f"{held:.1f} MiB")
    if not have_nginx:
        print("nginx not installed: its column is skipped (apt-get install nginx)")


async def _hold_and_measure(port: int, pid: int) -> float:
    held = await hold_connections(port, 1000)
    await asyncio.sleep(0.5)
    rss = rss_mib(pid)
    for _, writer in held:
        writer.close()
    return rss


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
