"""The OAuth server's error text never carries a secret further: not to the status, not to an
error body, not to the store, not to an alert, not to the log.

A real sidecar process, a real OAuth server on loopback in front of the emulator (it passes
requests on until told to refuse a refresh, echoing the secrets it was sent), a real alert
receiver, and the SQLite file read as bytes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.emulator import Emulator
from sidecar.errors import OAuthError
from sidecar.oauth import parse_token_response
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.processes import Env, running
from tests.test_operations import until


class EchoingOAuth:
    """An OAuth server that passes requests on to the emulator's; once ``refuse`` is set, it
    answers a refresh ``invalid_grant`` with the client secret, the refresh token it was sent
    and the access token in its error_description."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.target = emulator.base_url
        self.refuse = False
        self.url = ""
        self.descriptions: list[str] = []
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/oauth/token/", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Close the port."""
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        form |= dict(request.query)
        if self.refuse and form.get("grant_type") == "refresh_token":
            (held,) = self.emulator.current_tokens()
            description = (
                f"refresh_token={form['refresh_token']} is unknown; "
                f"client_secret={form['client_secret']}&access_token={held.access_token}; "
                f"the key {form['client_secret']} was checked, "
                f"Authorization: Bearer {held.access_token}"
            )
            self.descriptions.append(description)
            return web.json_response(
                {"error": "invalid_grant", "error_description": description}, status=400)
        assert self._http is not None
        async with self._http.request(request.method, f"{self.target}/oauth/token/",
                                      data=await request.read(), params=request.query,
                                      headers={"Content-Type": request.content_type}) as answer:
            return web.Response(status=answer.status, body=await answer.read(),
                                content_type="application/json")


class Hook:
    """An alert webhook receiver that keeps each body as the bytes that arrived."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        """Close the port."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.Response()


@pytest.fixture
async def oauth(emulator: Emulator) -> AsyncIterator[EchoingOAuth]:
    """Serve the echoing OAuth server."""
    server = EchoingOAuth(emulator)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    """Serve the alert receiver."""
    receiver = Hook()
    await receiver.start()
    yield receiver
    await receiver.stop()


def store_bytes(env: Env) -> bytes:
    """Read the token store's files (the database, its WAL) as they lie on disk."""
    db = Path(env["SIDECAR_DB"])
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())


class TestOAuthErrorText:
    async def test_an_echoed_secret_reaches_nothing(
        self, env: Env, emulator: Emulator, oauth: EchoingOAuth, hook: Hook,
    ) -> None:
        """invalid_grant whose description holds the client secret, the refresh token sent
        and the access token: /status, the 503 body, the SQLite file, the alert and the log
        hold none of them, and still say what happened."""
        env = env | {"BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID),
                     "BITRIX_OAUTH_URL": oauth.url, "SIDECAR_ALERT_WEBHOOK": hook.url}
        async with running(env) as sidecar, aiohttp.ClientSession() as http:
            async with http.get(f"{sidecar.base}/rest/profile") as response:
                assert response.status == 200
            oauth.refuse = True
            emulator.expire_access_tokens()
            async with http.get(f"{sidecar.base}/rest/profile") as response:
                assert response.status == 503
                body = await response.text()
            assert json.loads(body)["error"] == "SIDECAR_REAUTHORIZATION_REQUIRED"
            async with http.get(f"{sidecar.admin}/status") as response:
                status = await response.text()
            async with http.get(f"{sidecar.admin}/readyz") as response:
                readyz = await response.text()
            await until(lambda: bool(hook.bodies))
            await sidecar.stop()
        (description,) = oauth.descriptions
        secrets = [CLIENT_SECRET, *emulator.issued_secrets()]
        assert CLIENT_SECRET in description  # the server did echo it
        log = "".join(sidecar.lines)
        alert = b"".join(hook.bodies).decode()
        stored = store_bytes(env)
        for name, text in [("503 body", body), ("/status", status), ("/readyz", readyz),
                           ("alert", alert), ("log", log)]:
            for secret in secrets:
                assert secret not in text, f"{name} holds a secret: {text}"
        # The store holds the (now dead) pair by design, so the bytes are searched for the
        # client secret, and the recorded error for every secret.
        assert CLIENT_SECRET.encode() not in stored
        with sqlite3.connect(env["SIDECAR_DB"]) as db:
            (recorded,) = db.execute("SELECT last_error FROM authorizations").fetchone()
        for secret in secrets:
            assert secret not in recorded
        assert "client_secret=[REDACTED]" in recorded
        # What happened is still said, with the secrets cut out.
        last_error = json.loads(status)["last_error"]
        assert "invalid_grant" in last_error
        assert "client_secret=[REDACTED]" in last_error
        assert json.loads(hook.bodies[0])["error"] == "invalid_grant"


class TestParsing:
    @pytest.mark.parametrize("field", ["error", "error_description"])
    def test_secret_parameters_are_hidden_in_either_field(self, field: str) -> None:
        """The error code is server text too: it is redacted (and kept short) like the rest."""
        data = {"error": "invalid_grant", "error_description": "no"}
        data[field] = "auth=abcdef1234 refresh_token=zyxwvu9876 Bearer qwerty5678"
        with pytest.raises(OAuthError) as caught:
            parse_token_response(data)
        for value in ("abcdef1234", "zyxwvu9876", "qwerty5678"):
            assert value not in caught.value.description
            assert value not in caught.value.error

    def test_a_known_secret_is_hidden_whole_before_the_text_is_cut(self) -> None:
        """A secret straddling the length cap is not left half-shown."""
        secret = "s3cret-value-of-the-client"
        data = {"error": "invalid_client", "error_description": "x " * 145 + secret}
        with pytest.raises(OAuthError) as caught:
            parse_token_response(data, redact=lambda t: t.replace(secret, "[REDACTED]"))
        assert "s3cret" not in caught.value.description
