"""Shared pieces of the benchmarks: processes on loopback, an authorized sidecar, statistics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

CLIENT_ID = "local.bench000000000.00000001"
CLIENT_SECRET = "bench-secret-0123456789"  # noqa: S105 - the emulator's own test app


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(port: int, seconds: float = 15.0) -> None:
    """Wait until something listens on the port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            await writer.wait_closed()
            return


@asynccontextmanager
async def process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[
        asyncio.subprocess.Process]:
    """Run a child process for the duration of the block."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def emulator(*flags: str) -> AsyncIterator[str]:
    """Run `bitrix-sidecar emulator` in its own process; yield its base URL."""
    port = free_port()
    async with process(sys.executable, "-m", "sidecar", "emulator", "--port", str(port),
                       "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET, *flags):
        await wait_port(port)
        yield f"http://127.0.0.1:{port}"


async def approve(portal: str) -> str:
    """Approve the app on the emulator's authorize page and return the code it shows."""
    async with aiohttp.ClientSession() as http, http.get(
        f"{portal}/oauth/authorize/", params={"client_id": CLIENT_ID}
    ) as response:
        page = await response.text()
    match = re.search(r'<code id="code">([^<]+)</code>', page)
    assert match, page
    return match.group(1)


async def access_token(portal: str) -> str:
    """Get an access token straight from the emulator, for calls made with no sidecar."""
    async with aiohttp.ClientSession() as http, http.post(
        f"{portal}/oauth/token/",
        data={"grant_type": "authorization_code", "client_id": CLIENT_ID,
              "client_secret": CLIENT_SECRET, "code": await approve(portal)},
    ) as response:
        return str((await response.json())["access_token"])


@asynccontextmanager
async def sidecar_process(portal: str, **settings: str) -> AsyncIterator[tuple[int, int]]:
    """Run an authorized `bitrix-sidecar run` in its own process; yield its pid and port.

    Keyword arguments are settings without their ``SIDECAR_`` prefix (``fast_lane="off"``).
    """
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BITRIX_", "SIDECAR_"))},
            "BITRIX_PORTAL": portal, "BITRIX_CLIENT_ID": CLIENT_ID,
            "BITRIX_CLIENT_SECRET": CLIENT_SECRET, "SIDECAR_DB": str(Path(tmp) / "t.db"),
            "SIDECAR_LISTEN": f"127.0.0.1:{port}", "SIDECAR_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "SIDECAR_LOG_LEVEL": "warning", "BITRIX_AUTH_CODE": await approve(portal),
            **{f"SIDECAR_{k.upper()}": v for k, v in settings.items()},
        }
        async with process(sys.executable, "-m", "sidecar", "run", env=env) as proc:
            await wait_port(port)
            yield proc.pid, port


@asynccontextmanager
async def sidecar(portal: str, **settings: str) -> AsyncIterator[str]:
    """Run an authorized `bitrix-sidecar run` in its own process; yield its base URL."""
    async with sidecar_process(portal, **settings) as (_, port):
        yield f"http://127.0.0.1:{port}"


@dataclass
class Result:
    """One run's outcome."""

    latencies: list[float]
    errors: dict[str, int]
    seconds: float

    @property
    def ok(self) -> int:
        """Return the number of successful calls."""
        return len(self.latencies)

    def quantile(self, q: float) -> float:
        """Return a latency quantile in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def p50(self) -> float:
        """Return the median latency in ms."""
        return statistics.median(self.latencies) * 1000 if self.latencies else float("nan")


def error_of(status: int, body: bytes) -> str:
    """Name a failed call by its Bitrix error code."""
    try:
        return f"{status} {json.loads(body).get('error', '?')}"
    except ValueError:
        return f"{status} (not JSON)"


def rss_mib(pid: int) -> float:
    """Return a process's resident memory in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """Return a process's user+system CPU time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
