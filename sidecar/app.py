"""Wire the sidecar together: every resource is owned by a cleanup context of the application."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from sidecar.adapter import error_response, expect_continue
from sidecar.admission import Admission
from sidecar.alerts import Alerter
from sidecar.authflow import INSTALL_MAX_BODY, AuthFlow, Handler, Where
from sidecar.authorization import Authorization
from sidecar.clientkey import AdminHosts
from sidecar.config import Listen, Settings, is_loopback, oauth_timeout
from sidecar.deadlines import DeadlineRunner, Deadlines
from sidecar.errors import NotFound, PortalUnknown, Refused, SidecarError
from sidecar.fastlane import ProxyRunner
from sidecar.lanecheck import RESEND_SWITCH, missing_client_internals
from sidecar.logging import AccessLog, Redactor
from sidecar.metrics import CONTENT_TYPE, Metrics
from sidecar.oauth import OAuthClient
from sidecar.pgbucket import PgBucket
from sidecar.proxy import Proxy
from sidecar.registry import Portals
from sidecar.rules import HostPolicy, shown_whole
from sidecar.stores import open_store
from sidecar.upstream import Pool

log = structlog.get_logger("sidecar.app")

TOKENS = web.AppKey("tokens", Authorization)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", Proxy)


class Lifecycle:
    """The proxy listener's life: whether it is stopping, and what is in flight."""

    def __init__(self) -> None:
        self.stopping = False
        self.inflight = 0
        self.idle = asyncio.Event()  # set whenever no request is in flight
        self.idle.set()

    def tracked(self, handler: Handler) -> Handler:
        """Wrap a handler so the drain counts its requests (REST calls and /oauth/ alike).

        A wrapper rather than a middleware: aiohttp's middleware chain costs more per request.
        """

        async def wrapper(request: web.Request) -> web.StreamResponse:
            self.begin()
            try:
                return await handler(request)
            finally:
                self.end()

        return wrapper

    def begin(self) -> None:
        """A request starts."""
        self.inflight += 1
        self.idle.clear()

    def end(self) -> None:
        """A request ends."""
        self.inflight -= 1
        if not self.inflight:
            self.idle.set()


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
AUTHFLOW = web.AppKey("authflow", AuthFlow)
PORTALS = web.AppKey("portals", Portals)
BUDGET = web.AppKey("budget", PgBucket)  # the fleet's shared rate budget, with PostgreSQL
# Install payloads are a few KiB; the admin listener reads no body at all.
OAUTH_MAX_BODY = INSTALL_MAX_BODY
ADMIN_MAX_BODY = 1024


def settle_garbage_collector() -> None:
    """Freeze what start-up built, so the cycle collector's full passes skip it.

    Under load a full collection paused the loop for 20-40 ms (a p99 matter); the modules,
    apps and routers live as long as the process, and frozen they are never walked again.
    """
    gc.collect()
    gc.freeze()


def _lane(app: web.Application) -> tuple[Proxy, Lifecycle, int]:
    return app[PROXY], app[LIFECYCLE], app[SETTINGS].max_body


def proxy_runner(app: web.Application, *, fast_lane: bool | None = None,
                 **kwargs: Any) -> ProxyRunner:
    """The runner of the proxy listener: connections start in the fast lane, unless
    ``fast_lane`` (by default the settings' ``SIDECAR_FAST_LANE``) is off."""
    settings = app[SETTINGS]
    enabled = settings.fast_lane if fast_lane is None else fast_lane
    return ProxyRunner(app, _lane, fast_lane=enabled, deadlines=Deadlines.of(settings),
                       metrics=app[METRICS], **kwargs)


def listener_runner(app: web.Application, proxy_app: web.Application, listener: str,
                    **kwargs: Any) -> DeadlineRunner:
    """The runner of the admin or OAuth listener: the proxy listener's deadlines and cap."""
    return DeadlineRunner(app, deadlines=Deadlines.of(proxy_app[SETTINGS]), listener=listener,
                          metrics=proxy_app[METRICS], **kwargs)


def pool_limit(settings: Settings) -> int:
    """How many connections to portals may be open at once: a marketplace sidecar keeps one
    alive to each of many portals, where one portal needs a few."""
    return 1024 if settings.marketplace else 256


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; return (soft, hard) as they are now.

    Each listener may hold SIDECAR_MAX_CONNECTIONS connections, plus the portal pool and the
    store: distributions' default soft limit (1024) would refuse them first (accept() failing).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def require_no_resend(session_class: type[object] = aiohttp.ClientSession) -> None:
    """Raise, naming what is missing, unless ``no_resend`` can do its job on this aiohttp."""
    missing = missing_client_internals(session_class)
    if missing:
        raise SidecarError(
            f"aiohttp {aiohttp.__version__} cannot be told not to send a request again when a "
            f"kept-alive connection drops (missing: {', '.join(missing)}), and a token request "
            "sent twice spends a refresh token twice; install the aiohttp bitrix-sidecar "
            f"declares ({_declared('aiohttp')})",
            code="SIDECAR_UNSUPPORTED_AIOHTTP",
        )


def _declared(package: str) -> str:
    """The version range of ``package`` that bitrix-sidecar's metadata declares."""
    try:
        requirements = importlib.metadata.requires("bitrix-sidecar") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        if requirement.startswith(package) and "extra ==" not in requirement:
            return requirement
    return f"see pyproject.toml for {package}"


def no_resend(session: aiohttp.ClientSession) -> aiohttp.ClientSession:
    """Stop aiohttp from silently sending a GET again when a kept-alive connection drops.

    A dropped call may have run: a REST GET like ``crm.lead.add?...`` would run twice, and a
    token request would spend a refresh token twice. aiohttp 3.14 has no public switch, so this
    sets a private one; where it is missing, it raises (see ``require_no_resend``).
    """
    require_no_resend(type(session))
    setattr(session, RESEND_SWITCH, False)
    return session


def oauth_session() -> aiohttp.ClientSession:
    """Open the HTTP session used for the OAuth server (or raise if no_resend cannot work)."""
    require_no_resend()  # before there is a session to close
    return no_resend(aiohttp.ClientSession(trust_env=False))


def make_oauth(session: aiohttp.ClientSession, settings: Settings,
               redactor: Redactor | None = None) -> OAuthClient:
    """Build the OAuth client for ``settings`` (``redactor`` hides secrets in its errors)."""
    return OAuthClient(
        session,
        token_url=settings.token_url,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        timeout=oauth_timeout(settings),
        redactor=redactor,
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
    access_log: AccessLog | None = None,
    clock: Callable[[], float] = time.time,
    watch_interval: float = 1.0,
) -> web.Application:
    """Build the proxy application for ``settings``; resources open on startup, close on cleanup."""
    redactor = redactor or Redactor()
    access_log = access_log or AccessLog()
    redactor.add(settings.client_secret, permanent=True)
    redactor.add(settings.client_key, permanent=True)
    redactor.add(settings.alert_webhook, permanent=True)
    for password in settings.db_passwords:
        redactor.add(password, permanent=True)
    app = web.Application(client_max_size=settings.max_body, handler_args={"max_field_size": 16384})
    app[SETTINGS] = settings
    metrics = app[METRICS] = Metrics()
    lifecycle = app[LIFECYCLE] = Lifecycle()
    # Read at scrape time: a gauge's lock twice per call would cost more on the hot path.
    metrics.inflight.set_function(lambda: lifecycle.inflight)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with (
            open_store(settings) as store,
            oauth_session() as oauth_http,
        ):
            # REST calls go through our own lean client: the portal's answer is relayed byte
            # for byte, nothing is decompressed, no header is added, and nothing is resent.
            pool = Pool(limit=pool_limit(settings))
            alerts = Alerter(oauth_http, settings.alert_webhook, metrics)
            portals = app[PORTALS] = Portals(
                settings, store, make_oauth(oauth_http, settings, redactor), pool,
                metrics=metrics, alerts=alerts, on_secret=redactor.add, clock=clock,
                watch_interval=watch_interval)
            await portals.start()
            single = portals.single
            tokens = single.tokens if single is not None else None
            if single is not None:
                app[TOKENS] = single.tokens
                if single.budget is not None:
                    app[BUDGET] = single.budget
            proxy = app[PROXY] = Proxy(settings, portals, pool, metrics, access_log=access_log)
            checks = Admission(on_refused=metrics.install_checks_refused.inc)
            authflow = app[AUTHFLOW] = AuthFlow(settings, tokens, store, oauth_http, checks=checks,
                                                portals=portals)
            authflow.add_routes(app, Where(proxy.policy, public=False), lifecycle.tracked)
            # After the exact routes.
            # Any path at all, newlines included, gets our own answers; so does any Expect.
            app.router.add_route("*", r"/{tail:[\s\S]*}", lifecycle.tracked(proxy.handle),
                                 expect_handler=expect_continue)
            if tokens is None:
                log.info("sidecar_started", mode="marketplace", portals=len(portals),
                         allowed=str(settings.portals),
                         refresh_interval=settings.refresh_interval)
            else:
                state = tokens.status()
                log.info("sidecar_started", state=state["state"], portal=settings.portal,
                         expires_at=state["expires_at"],
                         refresh_interval=settings.refresh_interval)
                if state.get("authorize_url"):
                    log.warning("not_authorized", state=state["state"],
                                authorize_url=state["authorize_url"])
            if not settings.client_key and not is_loopback(settings.listen.host):
                # Only SIDECAR_INSECURE_NO_CLIENT_KEY=on lets `run` get this far.
                log.warning("no_client_key", listen=str(settings.listen),
                            hint="whoever reaches this listener acts as the app; only "
                            "authentication in front of it keeps others out "
                            "(SIDECAR_INSECURE_NO_CLIENT_KEY=on)")
            try:
                yield
            finally:
                await portals.aclose()
                await pool.close()
                await alerts.drain()
                access_log.flush()

    app.cleanup_ctx.append(resources)
    return app


def create_oauth_app(proxy_app: web.Application) -> web.Application:
    """Build the OAuth listener: /oauth/start, /oauth/callback and /oauth/install only.

    Safe to publish for the portal's install events: it never proxies and never shows a token.
    """
    oauth = web.Application(client_max_size=OAUTH_MAX_BODY)
    tracked = proxy_app[LIFECYCLE].tracked
    settings = proxy_app[SETTINGS]
    # Served: the published name (SIDECAR_PUBLIC_URL) and loopback, nothing else.
    public_host = urlsplit(settings.public_url).hostname or ""
    listen_host = settings.oauth_listen.host if settings.oauth_listen else "127.0.0.1"
    where = Where(HostPolicy(listen_host, (public_host,) if public_host else ()), public=True)

    @tracked
    async def start_page(request: web.Request) -> web.StreamResponse:
        return await proxy_app[AUTHFLOW].start_page(request, where)

    @tracked
    async def start(request: web.Request) -> web.StreamResponse:
        return await proxy_app[AUTHFLOW].start(request, where)

    @tracked
    async def callback(request: web.Request) -> web.StreamResponse:
        return await proxy_app[AUTHFLOW].callback(request, where)

    @tracked
    async def install(request: web.Request) -> web.StreamResponse:
        return await proxy_app[AUTHFLOW].install(request, where)

    async def not_found(request: web.Request) -> web.Response:
        return error_response(NotFound(
            "the OAuth listener serves /oauth/start, /oauth/callback and /oauth/install only"
        ))

    oauth.router.add_get("/oauth/start", start_page, allow_head=False)
    oauth.router.add_post("/oauth/start", start)
    oauth.router.add_get("/oauth/callback", callback, allow_head=False)
    oauth.router.add_post("/oauth/install", install)
    oauth.router.add_route("*", "/{tail:.*}", not_found)
    return oauth


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """Build the admin listener: metrics, liveness, readiness and status; never a token.

    Its Host is checked (DNS rebinding must not let a web page read /status or /metrics), yet
    the kubelet's probes and Prometheus, which name the pod's address, are answered.
    """
    settings = proxy_app.get(SETTINGS)
    # Without settings (an app built only to list its routes), loopback and the address reached.
    hosts = (AdminHosts(settings.admin_listen.host, settings.allowed_hosts)
             if settings is not None else AdminHosts("", ()))

    @web.middleware
    async def host_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        try:
            hosts.check(request.headers.get("Host"), sockname)
        except Refused as exc:
            return error_response(exc)
        return await handler(request)

    admin = web.Application(middlewares=[host_check], client_max_size=ADMIN_MAX_BODY)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=proxy_app[METRICS].render(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if proxy_app[LIFECYCLE].stopping:
            ready, reason = False, "shutting down"
        elif PORTALS in proxy_app and TOKENS not in proxy_app:
            ready, reason = proxy_app[PORTALS].readiness()
        elif TOKENS not in proxy_app:
            ready, reason = False, "starting"
        else:
            ready, reason = proxy_app[TOKENS].readiness()
            budget = proxy_app.get(BUDGET)
            away = budget.degraded() if budget is not None else ""
            if away:
                # Served on a local share: ready (every replica is in the same plight), but
                # the reason says so.
                reason = (f"{reason}; {away}" if reason.startswith("degraded")
                          else f"degraded: {away}" if ready else f"{reason}; {away}")
        return web.json_response({"ready": ready, "reason": reason},
                                 status=200 if ready else 503)

    async def status(request: web.Request) -> web.Response:
        portals = proxy_app.get(PORTALS)
        if portals is not None and TOKENS not in proxy_app:
            named = request.query.get("portal", "")
            if not named:
                return web.json_response(portals.summary())
            portal = portals.find(named.lower())
            if portal is None:
                return error_response(PortalUnknown(
                    f"this sidecar holds no portal {shown_whole(named)}"))
            return web.json_response(portal.tokens.status() | {"member_id": portal.member_id})
        if TOKENS not in proxy_app:
            return web.json_response({"state": "starting"}, status=503)
        status = proxy_app[TOKENS].status()
        budget = proxy_app.get(BUDGET)
        if budget is not None:
            status["rate_budget"] = budget.status()
            status["degraded"] = status["degraded"] or not budget.available
        return web.json_response(status)

    async def not_found(request: web.Request) -> web.Response:
        return error_response(NotFound(
            "the admin listener serves GET /metrics, /healthz, /readyz and /status only"
        ))

    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", healthz)
    admin.router.add_get("/readyz", readyz)
    admin.router.add_get("/status", status)
    admin.router.add_route("*", "/{tail:.*}", not_found)
    return admin


async def serve(
    app: web.Application,
    listen: Listen,
    *,
    admin_listen: Listen | None = None,
    oauth_listen: Listen | None = None,
    shutdown_grace: float = 20.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, drain within the grace, close all.

    The admin listener (if any) stays up while the proxy drains, answering /readyz with 503.
    The OAuth listener (if any) serves only /oauth/..., so it can be published for the portal.
    """
    # The drain below waits for calls in flight itself (to count what is left); aiohttp's own
    # shutdown wait then only closes idle keep-alive connections.
    settings = app[SETTINGS]
    soft, hard = raise_open_files_limit()
    # Three listeners, the pool, the store, logs.
    needed = 3 * settings.max_connections + pool_limit(settings) + 256
    log.info("open_files_limit", soft=soft, hard=hard)
    if soft < needed:
        log.warning("open_files_limit_low", soft=soft, needed=needed,
                    hint="raise the hard limit (ulimit -Hn) or lower SIDECAR_MAX_CONNECTIONS")
    runner = proxy_runner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    admin_runner: web.AppRunner | None = None
    oauth_runner: web.AppRunner | None = None
    oauth_site: web.TCPSite | None = None
    try:
        site = web.TCPSite(runner, listen.host, listen.port)
        await site.start()
        bound = _bound_port(runner, listen.port)
        log.info("listening", address=f"http://{listen.host}:{bound}", pid=os.getpid(),
                 fast_lane=runner.fast_lane)
        if admin_listen is not None:
            admin_runner = listener_runner(create_admin_app(app), app, "admin",
                                           handle_signals=False, access_log=None)
            await admin_runner.setup()
            await web.TCPSite(admin_runner, admin_listen.host, admin_listen.port).start()
            log.info("admin_listening",
                     address=f"http://{admin_listen.host}:"
                     f"{_bound_port(admin_runner, admin_listen.port)}")
        if oauth_listen is not None:
            oauth_runner = listener_runner(create_oauth_app(app), app, "oauth",
                                           handle_signals=False, access_log=None,
                                           shutdown_timeout=0.5)
            await oauth_runner.setup()
            oauth_site = web.TCPSite(oauth_runner, oauth_listen.host, oauth_listen.port)
            await oauth_site.start()
            log.info("oauth_listening",
                     address=f"http://{oauth_listen.host}:"
                     f"{_bound_port(oauth_runner, oauth_listen.port)}")
        if ready is not None:
            ready(bound)
        settle_garbage_collector()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        app[LIFECYCLE].stopping = True
        lifecycle = app[LIFECYCLE]
        log.info("shutting_down", grace_seconds=shutdown_grace, inflight=lifecycle.inflight)
        started = time.monotonic()
        for stopping_runner, stopping_site in ((runner, site), (oauth_runner, oauth_site)):
            if stopping_runner is None or stopping_site is None:
                continue
            await stopping_site.stop()  # stop accepting new connections
            if stopping_runner.server is not None:
                stopping_runner.server.pre_shutdown()  # and new requests on kept-alive ones
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lifecycle.idle.wait(), shutdown_grace)
        left = lifecycle.inflight
        log.info("drained", seconds=round(time.monotonic() - started, 3), cancelled=left)
    finally:
        if oauth_runner is not None:
            await oauth_runner.cleanup()
        await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        log.info("stopped")
def _bound_port(runner: web.AppRunner, fallback: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return fallback
