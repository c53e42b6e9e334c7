"""Faults: everything around the sidecar breaks; it loses nothing and recovers by itself.

Real things only: the emulator over loopback (behind a small switchable HTTP front where a fault
needs one), real SQLite files on real file systems, the CLI as a subprocess killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import gzip
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from sidecar.app import PROXY, create_admin_app, create_app, proxy_runner
from sidecar.authorization import Authorization
from sidecar.config import Settings
from sidecar.emulator import EMULATOR_KEY, Emulator
from sidecar.errors import ReauthorizationRequired, TokenUnavailable
from sidecar.storage import TokenPair
from sidecar.store import TokenStore
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OffsetClock, tokens_of
from tests.processes import Env, Running, cli, running
from tests.test_operations import scrape, until, value

Client = TestClient[web.Request, web.Application]

_HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive"})
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>"
)


class Front:
    """A real HTTP server on loopback in front of the emulator, whose behaviour a test switches.

    ``pass`` forwards each request to the emulator and relays its answer; ``reset`` drops the
    connection as soon as the request is in; ``run_then_reset`` lets the emulator run the call,
    then drops the connection instead of answering; ``html502`` answers a load balancer's HTML
    error page; ``hang`` never answers. ``stop()`` closes the port (connection refused) and
    ``start()`` opens the same port again.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.mode = "pass"
        self.encoding = ""  # "gzip" or "deflate": compress what the server answers
        self.hits: list[str] = []  # "METHOD /path" of every request that arrived
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._release = asyncio.Event()

    @property
    def url(self) -> str:
        """Return the front's base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(auto_decompress=False)
        self._release.clear()
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1,
                               handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Close the port and every connection: the server is down."""
        self._release.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def close(self) -> None:
        """Stop for good."""
        await self.stop()
        if self._http is not None:
            await self._http.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(f"{request.method} {request.path}")
        body = await request.read()
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if self.mode == "html502":
            return web.Response(status=502, text=NGINX_502, content_type="text/html")
        if self.mode == "hang":
            await self._release.wait()
            return web.Response(status=504)
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._http.request(
            request.method, URL(self.target + request.raw_path, encoded=True),
            data=body or None, headers=headers, allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            relayed = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        if self.mode == "run_then_reset":
            assert request.transport is not None
            request.transport.abort()
        if self.encoding and "Content-Encoding" not in relayed:
            payload = gzip.compress(payload) if self.encoding == "gzip" else zlib.compress(payload)
            relayed["Content-Encoding"] = self.encoding
        return web.Response(status=upstream.status, body=payload, headers=relayed)


@pytest.fixture
async def fronts(emulator: Emulator) -> AsyncIterator[tuple[Front, Front]]:
    """Put one front before the emulator's OAuth server and one before its portal (REST).

    The emulator is re-bound to the portal front, so the tokens it issues name the front as
    ``client_endpoint`` and settings made afterwards use it as ``BITRIX_PORTAL``.
    """
    real = emulator.base_url
    oauth, portal = Front(real), Front(real)
    await oauth.start()
    await portal.start()
    emulator.bind(portal.url)
    try:
        yield oauth, portal
    finally:
        await oauth.close()
        await portal.close()
        emulator.bind(real)


async def serve(
    settings: Settings, aiohttp_client: Callable[..., Any], **kwargs: Any
) -> tuple[Client, Client]:
    """Serve a sidecar and its admin listener on loopback."""
    proxy: Client = await aiohttp_client(create_app(settings, watch_interval=0.05, **kwargs))
    admin: Client = await aiohttp_client(create_admin_app(proxy.app))
    return proxy, admin


async def settled(tokens: Authorization) -> None:
    """Wait for a renewal in flight (the schedule's, say) to end, whatever its outcome."""
    task = tokens._refresh_task
    if task is not None and not task.done():
        await asyncio.wait({task}, timeout=10)


async def sidecar_error(response: aiohttp.ClientResponse, status: int, error: str) -> str:
    """Check an error of the sidecar's own: the status, Bitrix's shape and the code."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json"
    body = json.loads(text)
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    assert body["error_description"]
    return text


def assert_no_secret(emulator: Emulator, *texts: str) -> None:
    """No code, token or the client secret issued so far appears in ``texts``."""
    for text in texts:
        for secret in [*emulator.issued_secrets(), CLIENT_SECRET]:
            assert secret not in text


async def stored(settings: Settings) -> TokenPair | None:
    """Read the stored pair as another process would."""
    async with TokenStore(settings.db_path, portal=settings.portal,
                          client_id=settings.client_id) as store:
        return (await store.load()).pair


# -- 1. the OAuth server ---------------------------------------------------------------------


async def break_oauth(fault: str, emulator: Emulator, front: Front) -> None:
    """Make the OAuth server fail as ``fault`` says."""
    if fault == "down":
        await front.stop()
    elif fault == "slow":  # a server (or balancer) that never gets to the request
        front.mode = "hang"
    else:
        emulator.oauth_failure = fault  # type: ignore[assignment]


async def heal_oauth(fault: str, emulator: Emulator, front: Front) -> None:
    """Undo ``break_oauth``."""
    if fault == "down":
        await front.start()
    front.mode = "pass"
    emulator.oauth_failure = None


class TestCompressedAuthErrors:
    @pytest.mark.parametrize("encoding", ["", "gzip", "deflate"])
    async def test_a_compressed_401_is_recognized_and_cured_once(
        self, encoding: str, make_settings: Callable[..., Settings], emulator: Emulator,
        fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """A portal that compresses its expired_token answer still gets one refresh and one
        retry: the call succeeds with the new token."""
        _, portal = fronts
        portal.encoding = encoding
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), rate="0")
        proxy, _ = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None
        emulator.expire_access_tokens()
        response = await proxy.get("/rest/profile")
        assert response.status == 200, await response.text()
        assert emulator.stats.token_requests["refresh_token"] == 1
        assert tokens.pair is not None
        assert tokens.pair.access_token != first.access_token
        assert portal.hits.count("GET /rest/profile") == 2


class TestOAuthServerFaults:
    @pytest.mark.parametrize("fault", ["down", "slow", "html", "garbage", "reset"])
    async def test_transient_fault_is_survived_and_recovered(
        self, fault: str, make_settings: Callable[..., Settings], emulator: Emulator,
        fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """Valid tokens keep working, expired ones get a clear 503, and the first attempt
        after the fault clears renews the pair with no person involved."""
        oauth, _ = fronts
        clock = OffsetClock()
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 oauth_url=oauth.url, upstream_timeout="1s")
        proxy, admin = await serve(settings, aiohttp_client, clock=clock)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None

        await break_oauth(fault, emulator, oauth)
        # A renewal fails (as the schedule's would), within the OAuth timeout...
        started = time.monotonic()
        with pytest.raises(TokenUnavailable):
            await tokens.refresh(first.access_token, trigger="schedule")
        assert time.monotonic() - started < 1.5
        # ...and calls with the still-valid token go on as if nothing happened.
        for _ in range(3):
            assert (await proxy.get("/rest/profile")).status == 200
        assert (await admin.get("/readyz")).status == 200

        # The portal says the token expired: a clear 503, in backoff and after it.
        emulator.expire_access_tokens()
        for _ in range(2):
            text = await sidecar_error(await proxy.get("/rest/profile"), 503,
                                       "SIDECAR_TOKEN_UNAVAILABLE")
            assert_no_secret(emulator, text)
            clock.offset += 400  # past any backoff step (at most 5 minutes, +25 % jitter)
        status = await (await admin.get("/status")).json()
        assert status["refresh"]["failing"] is True
        assert status["state"] == "refresh_failing"
        assert status["last_error"]
        assert "authorize_url" not in status
        assert_no_secret(emulator, json.dumps(status))
        samples = await scrape(admin)
        assert value(samples, "bitrix_sidecar_refresh_failing") == 1
        assert value(samples, "bitrix_sidecar_reauthorization_required") == 0

        await settled(tokens)
        await heal_oauth(fault, emulator, oauth)
        clock.offset += 400
        response = await proxy.get("/rest/profile")
        assert response.status == 200, await response.text()
        renewed = tokens.pair
        assert renewed is not None
        assert renewed.access_token != first.access_token
        assert await stored(settings) == renewed  # durable before use
        assert emulator.stats.token_requests["authorization_code"] == 1  # nobody re-authorized
        status = await (await admin.get("/status")).json()
        assert status["state"] == "valid"
        assert status["refresh"]["failing"] is False
        assert (await admin.get("/readyz")).status == 200
        assert value(await scrape(admin), "bitrix_sidecar_refresh_failing") == 0

    async def test_invalid_client_stops_until_restart(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """A refused application stops renewals (no hammering) and says so; a restart with the
        problem fixed carries on with the same pair, with no new authorization."""
        oauth, _ = fronts
        clock = OffsetClock()
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), oauth_url=oauth.url)
        proxy, admin = await serve(settings, aiohttp_client, clock=clock)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None
        emulator.oauth_failure = "invalid_client"
        with pytest.raises(ReauthorizationRequired):
            await tokens.refresh(first.access_token, trigger="schedule")
        text = await sidecar_error(await proxy.get("/rest/profile"), 503,
                                   "SIDECAR_REAUTHORIZATION_REQUIRED")
        assert_no_secret(emulator, text)
        readyz = await admin.get("/readyz")
        assert readyz.status == 503
        assert (await readyz.json())["reason"].startswith("client_rejected")
        assert value(await scrape(admin), "bitrix_sidecar_reauthorization_required") == 1

        # Fixed at the OAuth server, time passes: this process does not try again by itself.
        emulator.oauth_failure = None
        emulator.expire_access_tokens()
        clock.offset += 3000
        await asyncio.sleep(0.3)
        await sidecar_error(await proxy.get("/rest/profile"), 503,
                            "SIDECAR_REAUTHORIZATION_REQUIRED")
        assert emulator.stats.token_requests["refresh_token"] == 1
        await proxy.close()

        # A restart tries once more, and that works.
        proxy, admin = await serve(make_settings(oauth_url=oauth.url), aiohttp_client)
        response = await proxy.get("/rest/profile")
        assert response.status == 200, await response.text()
        assert emulator.stats.token_requests["authorization_code"] == 1
        assert emulator.stats.refresh_ok == 1
        assert (await admin.get("/readyz")).status == 200

    async def test_invalid_client_tells_calls_to_fix_the_app_not_to_reauthorize(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """Every call after invalid_client points at the credentials, as the first one did:
        re-authorizing would cost a person's time and not help."""
        oauth, _ = fronts
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), oauth_url=oauth.url)
        proxy, _ = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        assert tokens.pair is not None
        emulator.oauth_failure = "invalid_client"
        with pytest.raises(ReauthorizationRequired, match="BITRIX_CLIENT_ID"):
            await tokens.refresh(tokens.pair.access_token, trigger="schedule")
        text = await sidecar_error(await proxy.get("/rest/profile"), 503,
                                   "SIDECAR_REAUTHORIZATION_REQUIRED")
        description = json.loads(text)["error_description"]
        assert "BITRIX_CLIENT_ID" in description
        assert "restart" in description

    async def test_a_renewal_answered_after_the_timeout_asks_for_a_person(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """An OAuth server that renews the pair after the sidecar gave up (the emulator's "slow"
        consumes the refresh token after its delay) kills the pair: the sidecar says so
        clearly, and a new authorization is picked up at once."""
        oauth, _ = fronts
        clock = OffsetClock()
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 oauth_url=oauth.url, upstream_timeout="500ms")
        proxy, admin = await serve(settings, aiohttp_client, clock=clock)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None
        emulator.oauth_slow_seconds = 1.0
        emulator.oauth_failure = "slow"
        with pytest.raises(TokenUnavailable):
            await tokens.refresh(first.access_token, trigger="schedule")
        await until(lambda: emulator.stats.refresh_ok == 1)  # the answer nobody read
        emulator.oauth_failure = None
        clock.offset += 400
        text = await sidecar_error(await proxy.get("/rest/profile"), 503,
                                   "SIDECAR_REAUTHORIZATION_REQUIRED")
        assert "/oauth/authorize/?client_id=" in text
        assert_no_secret(emulator, text)
        status = await (await admin.get("/status")).json()
        assert status["state"] == "reauthorization_required"
        assert "/oauth/authorize/" in status["authorize_url"]
        assert (await admin.get("/readyz")).status == 503
        await tokens.authorize(emulator.issue_code(CLIENT_ID))
        assert (await proxy.get("/rest/profile")).status == 200
        assert (await admin.get("/readyz")).status == 200


# -- 2. the portal ---------------------------------------------------------------------------


class TestPortalFaults:
    @pytest.mark.parametrize(
        "case",
        [("down", 502, "SIDECAR_UPSTREAM_ERROR"), ("reset", 502, "SIDECAR_UPSTREAM_ERROR"),
         ("html502", 502, "SIDECAR_UPSTREAM_ERROR"), ("hang", 504, "SIDECAR_UPSTREAM_TIMEOUT")],
        ids=["down", "reset", "html502", "hang"],
    )
    async def test_clean_error_then_normal_service(
        self, case: tuple[str, int, str], make_settings: Callable[..., Settings],
        emulator: Emulator, fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """A broken portal gives a clean 502/504 in Bitrix's shape, sent once, with no token in
        it and no harm to the pair; once the portal is back the same call works."""
        fault, status, error = case
        _, portal = fronts
        real = str(URL(portal.target))
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), oauth_url=real,
                                 upstream_timeout="500ms")
        proxy, admin = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None
        assert first.client_endpoint == f"{portal.url}/rest/"
        assert (await proxy.get("/rest/profile")).status == 200

        if fault == "down":
            await portal.stop()
        else:
            portal.mode = fault
        portal.hits.clear()
        lead = {"fields[TITLE]": "sent once"}
        response = await proxy.post("/rest/crm.lead.add", data=lead)
        text = await sidecar_error(response, status, error)
        assert_no_secret(emulator, text, json.dumps(dict(response.headers)))
        assert response.headers["X-Request-ID"]
        # Never repeated by the sidecar: the portal may have run it (crm.lead.add twice).
        assert portal.hits == ([] if fault == "down" else ["POST /rest/crm.lead.add"])
        assert emulator.leads == {}
        # The pair is untouched and the sidecar stays ready: the token is not the problem.
        assert tokens.pair == first
        assert emulator.stats.token_requests["refresh_token"] == 0
        assert (await admin.get("/readyz")).status == 200
        kind = {"down": "unreachable", "reset": "unreachable", "html502": "not_rest",
                "hang": "timeout"}[fault]
        assert value(await scrape(admin), "bitrix_sidecar_upstream_errors_total", kind=kind) == 1

        if fault == "down":
            await portal.start()
        portal.mode = "pass"
        response = await proxy.post("/rest/crm.lead.add", data=lead)
        assert response.status == 200, await response.text()
        assert [lead["TITLE"] for lead in emulator.leads.values()] == ["sent once"]
        assert (await proxy.get("/rest/profile")).status == 200
        assert tokens.pair == first

    async def test_a_dropped_get_is_not_run_twice(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        fronts: tuple[Front, Front], aiohttp_client: Callable[..., Any],
    ) -> None:
        """A GET whose connection drops after the portal ran it is not sent again: REST GETs
        change data too (``crm.lead.add?fields[TITLE]=x``)."""
        _, portal = fronts
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 oauth_url=str(URL(portal.target)))
        proxy, _ = await serve(settings, aiohttp_client)
        portal.mode = "run_then_reset"
        response = await proxy.get("/rest/crm.lead.add?fields[TITLE]=once")
        await sidecar_error(response, 502, "SIDECAR_UPSTREAM_ERROR")
        assert [lead["TITLE"] for lead in emulator.leads.values()] == ["once"]
        assert portal.hits == ["GET /rest/crm.lead.add"]


# -- 3. the token store ----------------------------------------------------------------------
#
# The tests run as root here, and root ignores file modes: a chmod'ed file or directory stays
# writable, and an open SQLite connection never re-checks modes anyway. A read-only remount
# (tmpfs or a read-only bind) is refused with EBUSY while SQLite holds the files open. What does
# refuse root's writes through an already-open descriptor: ``chattr +i`` (immutable) on ext4,
# and a full file system (a small tmpfs mounted by the test).


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system where ``chattr +i`` works; made mutable again at the end."""
    directory = tmp_path / "immutable"
    directory.mkdir()
    probe = directory / "probe"
    probe.touch()
    if shutil.which("chattr") is None or _run("chattr", "+i", str(probe)).returncode != 0:
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and ext2/3/4)")
    _run("chattr", "-i", str(probe))
    probe.unlink()
    try:
        yield directory
    finally:
        for path in directory.iterdir():
            _run("chattr", "-i", str(path))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs mounted for the test (root only), unmounted at the end."""
    directory = tmp_path / "small"
    directory.mkdir()
    mounted = _run("mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(directory))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        _run("umount", "-l", str(directory))


def fill(directory: Path) -> Path:
    """Fill the file system holding ``directory`` to the last byte; return the filler."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0")
    return filler


def file_access_token(db: Path) -> str:
    """Read the stored access token through a read-only connection of our own."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT access_token FROM authorizations WHERE key = ''").fetchone()
    return str(row[0])


class TestStoreFaults:
    @pytest.mark.parametrize("fault", ["immutable", "disk_full"])
    async def test_unwritable_store_during_a_refresh(
        self, fault: str, request: pytest.FixtureRequest, make_settings: Callable[..., Settings],
        emulator: Emulator, aiohttp_client: Callable[..., Any],
    ) -> None:
        """The renewed pair lives in memory and serves calls, the failure is loud (log, metric,
        readiness), the write is retried until it succeeds, and a restart is authorized."""
        directory: Path = request.getfixturevalue(
            "immutable_dir" if fault == "immutable" else "small_fs")
        db = directory / "tokens.db"
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), db_path=str(db))
        proxy, admin = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        first = tokens.pair
        assert first is not None
        assert (await proxy.get("/rest/profile")).status == 200
        locked = [str(db), f"{db}-wal"]
        filler: Path | None = None
        if fault == "immutable":
            assert _run("chattr", "+i", *locked).returncode == 0
        else:
            filler = fill(directory)

        with structlog.testing.capture_logs() as logs:
            emulator.expire_access_tokens()
            response = await proxy.get("/rest/profile")  # renews the pair, cannot save it
            assert response.status == 200, await response.text()
            renewed = tokens.pair
            assert renewed is not None
            assert renewed.access_token != first.access_token
            assert file_access_token(db) == first.access_token  # the file holds the old pair
            failed = [e for e in logs if e["event"] == "token_store_write_failed"]
            assert failed
            assert failed[0]["log_level"] == "error"
            readyz = await admin.get("/readyz")
            assert readyz.status == 503
            assert (await readyz.json())["reason"].startswith("store_unwritable")
            status = await (await admin.get("/status")).json()
            assert status["unsaved"] is True
            assert status["store_writable"] is False
            errors = value(await scrape(admin), "bitrix_sidecar_store_errors_total")
            assert errors >= 1
            await asyncio.sleep(0.3)  # the watch retries every 50 ms, and counts each failure
            assert value(await scrape(admin), "bitrix_sidecar_store_errors_total") > errors
            # Calls go on with the pair held in memory.
            assert (await proxy.get("/rest/profile")).status == 200
            assert tokens.pair == renewed

            if fault == "immutable":
                assert _run("chattr", "-i", *locked).returncode == 0
            else:
                assert filler is not None
                filler.unlink()
            await until(lambda: not tokens.unsaved)
            assert any(e["event"] == "token_store_write_recovered" for e in logs)
        assert await stored(settings) == renewed
        assert (await admin.get("/readyz")).status == 200
        await proxy.close()

        proxy, _ = await serve(make_settings(db_path=str(db)), aiohttp_client)
        assert tokens_of(proxy).pair == renewed
        assert (await proxy.get("/rest/profile")).status == 200
        assert emulator.stats.token_requests["authorization_code"] == 1
        assert emulator.stats.refresh_rejected == 0
        await proxy.close()  # before the file system goes

    async def test_store_deleted_during_operation(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """A store deleted under a running sidecar is written again (with the newest pair) when
        the pair changes, so a restart is still authorized."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID))
        proxy, _ = await serve(settings, aiohttp_client)
        tokens = tokens_of(proxy)
        db = settings.db_path
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{db}{suffix}")
        emulator.expire_access_tokens()
        assert (await proxy.get("/rest/profile")).status == 200
        renewed = tokens.pair
        assert renewed is not None
        with contextlib.suppress(AssertionError):
            await until(db.exists, 1)
        await proxy.close()
        proxy, _ = await serve(make_settings(), aiohttp_client)
        assert tokens_of(proxy).pair == renewed
        assert (await proxy.get("/rest/profile")).status == 200


# -- 4. kill -9 ------------------------------------------------------------------------------


async def storm(sidecar: Running, emulator: Emulator, stop: asyncio.Event,
                answers: collections.Counter[str]) -> None:
    """Call through the sidecar from 16 clients while the portal keeps expiring tokens."""

    async def caller(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with http.get(f"{sidecar.base}/rest/profile") as response:
                    body = await response.read()
            except aiohttp.ClientError:
                return  # killed
            if response.status == 200:
                answers["200"] += 1
                continue
            data = json.loads(body)  # any error has Bitrix's shape, never a bare 500 page
            answers[f"{response.status} {data['error']}"] += 1

    async def expirer() -> None:
        while not stop.is_set():
            emulator.expire_access_tokens()
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(expirer(), *(caller(http) for _ in range(16)))


async def call(sidecar: Running) -> tuple[int, dict[str, Any]]:
    """Make one call; return status and JSON body."""
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar.base}/rest/profile") as r:
        return r.status, await r.json(content_type=None)


class TestKillNine:
    async def test_kill_9_during_a_refresh_storm(
        self, env: Env, emulator: Emulator, make_settings: Callable[..., Settings]
    ) -> None:
        """Killed at random moments while renewing, restarted: still authorized, or, when the
        OAuth server spent the refresh token and its answer was never saved, saying clearly
        that a person must authorize again; never serving errors silently."""
        env = {**env, "SIDECAR_REFRESH_INTERVAL": "1s", "SIDECAR_UPSTREAM_TIMEOUT": "5s"}
        settings = make_settings()
        code, _, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=env)
        assert code == 0, err
        answers: collections.Counter[str] = collections.Counter()
        outcomes: collections.Counter[str] = collections.Counter()
        rng = random.Random(7)  # noqa: S311 - kill moments, not cryptography

        def asked_more_than(count: int) -> Callable[[], bool]:
            return lambda: emulator.stats.token_requests["refresh_token"] > count

        def answered_all() -> bool:
            stats = emulator.stats
            return stats.refresh_ok + stats.refresh_rejected == stats.token_requests[
                "refresh_token"]
        deadline = time.monotonic() + 75
        for round_ in range(10):
            assert time.monotonic() < deadline, f"out of time after {round_} rounds: {outcomes}"
            held = await stored(settings)
            assert held is not None
            alive = held.refresh_token in {p.refresh_token for p in emulator.current_tokens()}
            async with running(env) as sidecar:
                status, body = await call(sidecar)
                if alive:
                    assert status == 200, body
                    outcomes["still authorized"] += 1
                else:
                    # The only live refresh token died with the killed process: say so.
                    assert status == 503, body
                    assert body["error"] == "SIDECAR_REAUTHORIZATION_REQUIRED"
                    assert "/oauth/authorize/?client_id=" in body["error_description"]
                    status_code, out, _ = await cli("status", env=env)
                    assert status_code == 1
                    assert json.loads(out)["state"] == "reauthorization_required"
                    async with aiohttp.ClientSession() as http, http.get(
                            f"{sidecar.admin}/readyz") as readyz:
                        assert readyz.status == 503
                    outcomes["re-authorization required"] += 1
                    code, _, err = await cli("authorize", emulator.issue_code(CLIENT_ID),
                                             env=env)
                    assert code == 0, err
                    for _ in range(50):  # the running sidecar picks the new pair up
                        if (await call(sidecar))[0] == 200:
                            break
                        await asyncio.sleep(0.1)
                    assert (await call(sidecar))[0] == 200

                stop = asyncio.Event()
                storming = asyncio.create_task(storm(sidecar, emulator, stop, answers))
                asked = emulator.stats.token_requests["refresh_token"]
                if round_ % 3 == 2:
                    # The OAuth server takes 0.2 s and spends the token at the end of it:
                    # killed in between, the answer is never read.
                    emulator.oauth_slow_seconds = 0.2
                    emulator.oauth_failure = "slow"
                    await until(asked_more_than(asked))
                else:
                    await asyncio.sleep(rng.uniform(0.05, 1.0))
                sidecar.proc.send_signal(signal.SIGKILL)
                assert await sidecar.wait() == -signal.SIGKILL
                stop.set()
                await storming
            await until(answered_all)  # renewals still in flight at the kill are over
            emulator.oauth_failure = None
        print(f"kill -9 rounds: {dict(outcomes)}; refreshes {emulator.stats.refresh_ok}; "
              f"answers during the storms: {dict(answers)}")
        assert outcomes["re-authorization required"] >= 3  # each "answer lost" round
        assert answers["200"] > 0
        assert set(answers) <= {"200", "401 expired_token"}, answers


# -- 5. clients hanging up -------------------------------------------------------------------


def rss_bytes() -> int:
    """Return this process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def quiet_logs() -> Iterator[collections.Counter[str]]:
    """Drop structlog events (one per call) and count aiohttp's server records by message
    instead of letting pytest keep them: neither may count as the sidecar's memory."""
    saved = structlog.get_config()

    def drop(*_: Any) -> Any:
        raise structlog.DropEvent

    records: collections.Counter[str] = collections.Counter()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records[f"{record.levelname} {record.msg}"] += 1

    server = logging.getLogger("aiohttp.server")
    keep = Keep()
    server.addHandler(keep)
    server.propagate = False
    structlog.configure(processors=[drop])
    try:
        yield records
    finally:
        structlog.configure(**saved)
        server.propagate = True
        server.removeHandler(keep)


async def hang_up(port: int, kind: str) -> None:
    """Make one call over a raw socket and hang up part-way, as ``kind`` says."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == "headers":  # mid-request: half the header block
            writer.write(b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
        elif kind == "waiting":  # the whole request, gone before the answer
            writer.write(b"GET /rest/profile HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        elif kind == "upload":  # mid-upload: the headers and half the body
            body = b"fields[TITLE]=" + b"u" * 4000
            writer.write(
                b"POST /rest/crm.lead.add HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:2000]
            )
        else:  # mid-stream: a large answer, of which a little is read
            writer.write(b"GET /rest/crm.lead.list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        if kind == "upload":
            for _ in range(3):  # let the sidecar's handler start reading the body
                await asyncio.sleep(0)
        if kind == "stream":
            await reader.readexactly(16 * 1024)
    finally:
        writer.transport.abort()


def emulator_server() -> web.Server:
    """Find the in-process emulator's HTTP server (served by the ``emulator`` fixture)."""
    servers = [o for o in gc.get_objects() if isinstance(o, web.Server)
               and EMULATOR_KEY in getattr(o.request_handler, "__self__", {})]
    assert len(servers) == 1
    return servers[0]


@contextlib.asynccontextmanager
async def served_like_run(app: web.Application) -> AsyncIterator[web.AppRunner]:
    """Serve ``app`` on loopback as ``bitrix-sidecar run`` does; yield the runner.

    aiohttp's TestServer (behind ``aiohttp_client``) cancels a handler whose client hangs up;
    ``serve()`` does not (aiohttp's default), and that is the behaviour under test here.
    """
    runner = proxy_runner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner
    finally:
        await runner.cleanup()


class TestClientsHangingUp:
    async def test_ten_thousand_hang_ups_leak_nothing(
        self, make_settings: Callable[..., Settings], emulator: Emulator,
        aiohttp_client: Callable[..., Any],
    ) -> None:
        """Hang-ups mid-request, while waiting, mid-upload and mid-stream leave no task behind,
        keep the upstream pool within its bound, and do not grow memory."""
        app = create_app(make_settings(auth_code=emulator.issue_code(CLIENT_ID)))
        async with served_like_run(app) as runner, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{runner.addresses[0][1]}/rest"
            await self.hang_up_ten_thousand_times(runner, emulator)
            # And the sidecar serves normally.
            async with http.get(f"{base}/profile") as response:
                assert response.status == 200
            async with http.get(f"{base}/crm.lead.list") as response:
                assert len(await response.read()) > 256 * 1024

    async def hang_up_ten_thousand_times(self, runner: web.AppRunner, emulator: Emulator) -> None:
        """Make the 10,000 calls and check what they left behind."""
        app, port = runner.app, int(runner.addresses[0][1])
        assert runner.server is not None
        ours_server, theirs = runner.server, emulator_server()
        async with aiohttp.ClientSession() as http:
            for _ in range(45):  # crm.lead.list answers ~280 KiB: past the streaming threshold
                async with http.post(f"http://127.0.0.1:{port}/rest/crm.lead.add",
                                     data={"fields[TITLE]": "t" * 6000}) as response:
                    assert response.status == 200
        pool = app[PROXY].pool

        def pooled() -> tuple[int, int]:
            return pool.counts()

        def ours() -> list[asyncio.Task[Any]]:
            """Tasks but those of the emulator's connections: each keep-alive connection in the
            sidecar's upstream pool has one there, waiting for its next request."""
            emulator_side = {h._task_handler for h in theirs.connections}
            return [t for t in asyncio.all_tasks() if t not in emulator_side]

        kinds = ["headers", "waiting", "upload", "stream"]
        peak = 0

        async def hang_ups(count: int) -> None:
            nonlocal peak
            todo = [kinds[i % len(kinds)] for i in range(count)]
            random.Random(count).shuffle(todo)  # noqa: S311 - a mix, not cryptography

            async def client() -> None:
                nonlocal peak
                while todo:
                    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                        await hang_up(port, todo.pop())
                    peak = max(peak, sum(pooled()))

            await asyncio.gather(*(client() for _ in range(50)))

        async def quiet_down() -> None:
            with contextlib.suppress(AssertionError):  # the assertions below say what is left
                await until(lambda: len(ours()) <= baseline and not pooled()[1]
                            and not ours_server.connections, 10)
            emulator.rest_log.clear()  # the emulator's own record of calls is not the sidecar's
            gc.collect()

        emulator.rest_log.clear()
        gc.collect()
        baseline = len(ours())
        started = time.monotonic()
        before = rss_bytes()
        with quiet_logs() as records:
            await hang_ups(5_000)
            await quiet_down()
            first_half = rss_bytes(), pooled()
            await hang_ups(5_000)
            await quiet_down()
            second_half = rss_bytes(), pooled()
        elapsed = time.monotonic() - started
        growth = second_half[0] - first_half[0]
        print(f"10,000 hang-ups in {elapsed:.1f} s; upstream pool peak {peak}, idle/in use "
              f"{first_half[1]} then {second_half[1]}; RSS {before / 2**20:.1f} at the start, "
              f"{first_half[0] / 2**20:.1f} then {second_half[0] / 2**20:.1f} MiB; "
              f"tasks {len(ours())} (baseline {baseline}); "
              f"upstream requests {emulator.stats.upstream_requests}; aiohttp.server records "
              f"{dict(records)}")
        assert len(ours()) <= baseline, [t.get_coro() for t in ours()]
        assert ours_server.connections == []  # every client connection was let go
        assert second_half[1][1] == 0  # no upstream connection left checked out
        assert peak <= pool.limit
        assert second_half[1][0] <= max(first_half[1][0] + 10, 60)  # the pool is not growing
        assert growth < 4 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB in the second half"
        assert len(emulator.leads) == 45  # no half-uploaded body was ever forwarded

    async def test_a_hang_up_mid_upload_is_an_ordinary_event(
        self, settings: Settings, caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A client that goes away mid-upload is logged as one call, not as a crash."""
        async with served_like_run(create_app(settings)) as runner:
            with structlog.testing.capture_logs() as logs:
                await hang_up(int(runner.addresses[0][1]), "upload")
                await asyncio.sleep(0.2)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        assert [e["method"] for e in logs if e["event"] == "request"] == ["crm.lead.add"]
