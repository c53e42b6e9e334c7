"""Benchmark: the sidecar's CPU time for a request head that arrives a byte at a time.

A client may send its head in as many packets as it likes; the proxy listener must not examine
the whole head again for every packet (quadratic in all). This runs the emulator and an
authorized `bitrix-sidecar run` in their own processes on loopback and sends heads of about
8 and 24 KiB (7,900-byte headers: within every limit, so the fast lane serves them), each once
in one write and once a byte per TCP segment (TCP_NODELAY, paced so that the sidecar reads the
bytes one by one: its read() count, from /proc/PID/io, is printed). It prints the CPU time the
sidecar's process spent (utime + stime, from /proc/PID/stat) while each was sent and answered;
"(idle, as long)" is the same process doing nothing for as long as the byte-at-a-time send took.

    python -m bench.slowhead [--runs 3] [--kib 8,24] [--lane on,off] [--pace-us 150]

Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import emulator, sidecar_process

PAD = 7900  # one header line stays under the 8190-byte limit on a line
TICK = os.sysconf("SC_CLK_TCK")


def head(kib: int) -> bytes:
    """A request head of about ``kib`` KiB (at most 24 KiB less 200 bytes: the lane's limit)."""
    start = b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    end = b"Connection: close\r\n\r\n"
    room = min(kib * 1024, 24 * 1024 - 200) - len(start) - len(end)
    lines: list[bytes] = []
    while room > 20:
        name = b"X-Pad-%d: " % len(lines)
        lines.append(name + b"a" * min(PAD, room - len(name) - 2) + b"\r\n")
        room -= len(lines[-1])
    return start + b"".join(lines) + end


def cpu_seconds(pid: int) -> float:
    """Return the CPU time (user + system, all threads) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15


def read_calls(pid: int) -> int:
    """Return how many read system calls a process has made."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    return 0


def send(port: int, pieces: list[bytes], pace: float) -> bytes:
    """Send ``pieces`` one segment each, ``pace`` seconds apart; return the whole answer."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            if pace:
                until = time.perf_counter() + pace
                while time.perf_counter() < until:  # sleep() overshoots by 50+ us
                    pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@dataclass
class Sample:
    """What one send cost the sidecar."""

    cpu: float
    reads: int
    seconds: float


async def measure(pid: int, port: int, pieces: list[bytes], pace: float) -> Sample:
    """Send, wait for the answer, and return the sidecar's CPU time and read calls meanwhile."""
    cpu, reads, started = cpu_seconds(pid), read_calls(pid), time.perf_counter()
    answer = await asyncio.to_thread(send, port, pieces, pace)
    await asyncio.sleep(0.05)  # let the sidecar finish with the connection
    sample = Sample(cpu_seconds(pid) - cpu, read_calls(pid) - reads,
                    time.perf_counter() - started)
    if not answer.startswith(b"HTTP/1.1 200 "):
        sys.exit(f"unexpected answer: {answer[:200]!r}")
    return sample


async def idle(pid: int, seconds: float) -> Sample:
    """Return the sidecar's CPU time over ``seconds`` of doing nothing."""
    cpu, reads = cpu_seconds(pid), read_calls(pid)
    await asyncio.sleep(seconds)
    return Sample(cpu_seconds(pid) - cpu, read_calls(pid) - reads, seconds)


@asynccontextmanager
async def sidecar(portal: str, lane: str) -> AsyncIterator[tuple[int, int]]:
    """Run an authorized `bitrix-sidecar run`, limiter off; yield its pid and port."""
    async with sidecar_process(portal, rate="0", fast_lane=lane) as running:
        yield running


def median(samples: list[Sample], what: str) -> float:
    """Return the median of one field."""
    return float(statistics.median(getattr(sample, what) for sample in samples))


async def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--lane", default="on", help="SIDECAR_FAST_LANE values, comma separated")
    parser.add_argument("--pace-us", type=float, default=150.0,
                        help="microseconds between the bytes of the slow send")
    parser.add_argument("--kib", default="8,24", help="head sizes in KiB, comma separated")
    args = parser.parse_args()
    pace = args.pace_us / 1e6
    print(f"median of {args.runs} runs; CPU = the sidecar's utime + stime (10 ms ticks)")
    print()
    print("| SIDECAR_FAST_LANE | head bytes | sent as | sidecar CPU s | sidecar read() calls "
          "| wall s |")
    print("|---|---|---|---|---|---|")
    async with emulator() as portal:
        for lane in args.lane.split(","):
            async with sidecar(portal, lane) as (pid, port):
                await measure(pid, port, [head(1)], 0)  # warm up: imports, first token use
                for kib in (int(k) for k in args.kib.split(",")):
                    whole = head(kib)
                    drip = [whole[i:i + 1] for i in range(len(whole))]
                    rows: dict[str, list[Sample]] = {"one write": [], "a byte per segment": [],
                                                     "(idle, as long)": []}
                    for _ in range(args.runs):
                        rows["one write"].append(await measure(pid, port, [whole], 0))
                        slow = await measure(pid, port, drip, pace)
                        rows["a byte per segment"].append(slow)
                        rows["(idle, as long)"].append(await idle(pid, slow.seconds))
                    for name, samples in rows.items():
                        print(f"| {lane} | {len(whole)} | {name} | {median(samples, 'cpu'):.2f} "
                              f"| {median(samples, 'reads'):.0f} "
                              f"| {median(samples, 'seconds'):.2f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
