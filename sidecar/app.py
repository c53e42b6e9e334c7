"""Wire the sidecar together: every resource is owned by a cleanup context of the application."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import structlog
from aiohttp import web

from sidecar.config import Settings
from sidecar.logging import Redactor
from sidecar.oauth import OAuthClient
from sidecar.proxy import Proxy
from sidecar.store import TokenStore
from sidecar.tokens import TokenManager

log = structlog.get_logger("sidecar.app")

TOKENS = web.AppKey("tokens", TokenManager)
SETTINGS = web.AppKey("settings", Settings)


def oauth_session() -> aiohttp.ClientSession:
    """Open the HTTP session used for the OAuth server."""
    return aiohttp.ClientSession(trust_env=False)


def make_oauth(session: aiohttp.ClientSession, settings: Settings) -> OAuthClient:
    """Build the OAuth client for ``settings``."""
    return OAuthClient(
        session,
        token_url=settings.token_url,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        timeout=min(settings.upstream_timeout, 30.0),
    )


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel a background task and wait for it to end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(
    settings: Settings,
    *,
    redactor: Redactor | None = None,
    clock: Callable[[], float] = time.time,
    watch_interval: float = 1.0,
) -> web.Application:
    """Build the proxy application for ``settings``; resources open on startup, close on cleanup."""
    redactor = redactor or Redactor()
    redactor.add(settings.client_secret)
    app = web.Application(client_max_size=settings.max_body, handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with (
            TokenStore(settings.db_path, portal=settings.portal,
                       client_id=settings.client_id) as store,
            oauth_session() as oauth_http,
            # The portal's answer is relayed byte for byte, compressed or not, so nothing is
            # decompressed and no Accept-Encoding is added that the client did not send.
            aiohttp.ClientSession(
                auto_decompress=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                trust_env=False,
            ) as upstream_http,
        ):
            tokens = TokenManager(
                store, make_oauth(oauth_http, settings), settings,
                clock=clock, on_secret=redactor.add, watch_interval=watch_interval,
            )
            await tokens.start()
            app[TOKENS] = tokens
            proxy = Proxy(settings, tokens, upstream_http)
            app.router.add_route("*", "/{tail:.*}", proxy.handle)
            tasks = [
                asyncio.create_task(tokens.run_schedule(), name="token-schedule"),
                asyncio.create_task(tokens.run_watch(), name="token-watch"),
            ]
            state = tokens.status()
            log.info("sidecar_started", state=state["state"], portal=settings.portal,
                     expires_at=state["expires_at"], refresh_interval=settings.refresh_interval)
            if state.get("authorize_url"):
                log.warning("not_authorized", state=state["state"],
                            authorize_url=state["authorize_url"])
            try:
                yield
            finally:
                for task in tasks:
                    await cancel_and_wait(task)

    app.cleanup_ctx.append(resources)
    return app


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_grace: float = 20.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop accepting and drain within the grace."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=shutdown_grace)
        await site.start()
        bound = _bound_port(runner, port)
        log.info("listening", address=f"http://{host}:{bound}", pid=os.getpid())
        if ready is not None:
            ready(bound)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("shutting_down", grace_seconds=shutdown_grace)
    finally:
        await runner.cleanup()
        log.info("stopped")


def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback
