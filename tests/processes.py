"""Helpers to run the CLI as a real subprocess and talk to it over loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

Env = dict[str, str]


async def cli(*args: str, env: Env, stdin: str | None = None) -> tuple[int, str, str]:
    """Run ``python -m sidecar ARGS`` to the end (``stdin`` on its standard input); return
    exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", *args, env=env,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(None if stdin is None else stdin.encode()), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Running:
    """A sidecar subprocess: its addresses and everything it logged."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.base = ""
        self.admin = ""
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def wait_listening(self) -> None:
        """Read the log until both listeners are up."""
        assert self.proc.stderr is not None
        while not (self.base and self.admin):
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 15)).decode()
            assert line, "the sidecar exited before listening:\n" + "".join(self.lines)
            self.lines.append(line)
            if line.startswith("{"):
                event = json.loads(line)
                if event["event"] == "listening":
                    self.base = event["address"]
                elif event["event"] == "admin_listening":
                    self.admin = event["address"]
        self._reader = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode())

    async def wait(self) -> int:
        """Wait for the process to exit and its log to be read whole."""
        code = await asyncio.wait_for(self.proc.wait(), 15)
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send a signal and wait for the exit code."""
        self.proc.send_signal(signum)
        return await self.wait()

    def events(self) -> list[dict[str, Any]]:
        """Return the JSON log events."""
        return [json.loads(line) for line in self.lines if line.startswith("{")]


@asynccontextmanager
async def running(env: Env, *args: str) -> AsyncIterator[Running]:
    """Start ``bitrix-sidecar run`` and stop it (SIGKILL if it is left running)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", *args, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    sidecar = Running(proc)
    try:
        await sidecar.wait_listening()
        yield sidecar
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def get(url: str) -> tuple[int, dict[str, Any]]:
    """GET a URL and return status and JSON body."""
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json(content_type=None)
