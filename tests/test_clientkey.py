"""The client key: asked of every /rest/ call and /token when set, never forwarded, never logged;
and a listener beyond loopback that has none refuses to start.

The proxy runs on real loopback sockets in front of the emulator, through the fast lane and
through plain aiohttp (conftest); start-up is the CLI as a real subprocess.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import create_app
from sidecar.config import Settings, load_settings
from sidecar.emulator import Emulator
from sidecar.errors import ConfigError
from tests.conftest import CLIENT_ID, CLIENT_SECRET, settings_env
from tests.processes import cli, running

Client = TestClient[web.Request, web.Application]

KEY = "k3y_0123456789abcdef0123456789abcdef"  # 36 of the characters a webhook code allows
OTHER = "k3y_0123456789abcdef0123456789abcdeX"  # one character off


@pytest.fixture
async def keyed(
    make_settings: Callable[..., Settings], emulator: Emulator,
    aiohttp_client: Callable[..., Any],
) -> Client:
    """An authorized sidecar whose calls must carry KEY."""
    settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), client_key=KEY)
    client: Client = await aiohttp_client(create_app(settings, watch_interval=0.05))
    return client


async def refused(response: aiohttp.ClientResponse) -> str:
    """Assert a 401 in Bitrix24's shape; return its error code."""
    assert response.status == 401, await response.text()
    body = await response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error_description"]
    assert KEY not in body["error_description"]
    return str(body["error"])


class TestKeyAsked:
    async def test_without_the_key_nothing_is_served(
        self, keyed: Client, emulator: Emulator
    ) -> None:
        """No key, on any shape of address and on /token: 401 REQUIRED; nothing forwarded."""
        for path in ("/rest/profile", "/rest/crm.lead.list.json", "/token"):
            assert await refused(await keyed.get(path)) == "SIDECAR_CLIENT_KEY_REQUIRED", path
        assert await refused(await keyed.post(
            "/rest/crm.lead.add", data={"fields[TITLE]": "x"})) == "SIDECAR_CLIENT_KEY_REQUIRED"
        # An empty header is no key at all.
        response = await keyed.get("/rest/profile", headers={"X-Sidecar-Key": ""})
        assert await refused(response) == "SIDECAR_CLIENT_KEY_REQUIRED"
        assert list(emulator.rest_log) == []
        assert emulator.leads == {}

    async def test_a_wrong_key_is_refused(self, keyed: Client, emulator: Emulator) -> None:
        """A wrong code or header: 401 INVALID; a wrong header is not rescued by the path."""
        for path, headers in [
            (f"/rest/1/{OTHER}/profile", {}),
            ("/rest/1/anycode/profile", {}),
            (f"/rest/1/{KEY[:-1]}/profile", {}),
            ("/rest/profile", {"X-Sidecar-Key": OTHER}),
            ("/rest/profile", {"X-Sidecar-Key": "ключ"}),  # not ASCII: still compared, refused
            (f"/rest/1/{KEY}/profile", {"X-Sidecar-Key": OTHER}),
            ("/token", {"X-Sidecar-Key": OTHER}),
        ]:
            response = await keyed.get(path, headers=headers)
            assert await refused(response) == "SIDECAR_CLIENT_KEY_INVALID", (path, headers)
        assert list(emulator.rest_log) == []

    async def test_the_key_as_webhook_code_with_any_user_id(
        self, keyed: Client, emulator: Emulator
    ) -> None:
        """The key in the code segment of /rest/<user_id>/<key>/<method>: served, any user id."""
        for user in ("1", "7", "4242"):
            response = await keyed.get(f"/rest/{user}/{KEY}/profile.json")
            assert response.status == 200, await response.text()
            assert (await response.json())["result"]["ID"] == "1"
        response = await keyed.post(f"/rest/1/{KEY}/crm.lead.add",
                                    data={"fields[TITLE]": "keyed"})
        assert response.status == 200, await response.text()
        assert emulator.leads[1]["TITLE"] == "keyed"

    async def test_the_key_in_the_header(self, keyed: Client, emulator: Emulator) -> None:
        """X-Sidecar-Key serves /rest/<method> (and the webhook shape) and /token."""
        headers = {"X-Sidecar-Key": KEY}
        response = await keyed.get("/rest/profile", headers=headers)
        assert response.status == 200
        response = await keyed.get("/rest/1/anycode/profile", headers=headers)
        assert response.status == 200
        response = await keyed.get("/token", headers=headers)
        assert response.status == 200
        assert (await response.json())["access_token"] == emulator.issued_secrets()[1]

    async def test_the_key_never_reaches_the_portal(
        self, keyed: Client, emulator: Emulator
    ) -> None:
        """Neither the code segment nor the header is forwarded: path, query, headers, body."""
        await keyed.get(f"/rest/1/{KEY}/profile?x=1")
        await keyed.post(f"/rest/1/{KEY}/crm.lead.add.json",
                         json={"fields": {"TITLE": "json"}})
        await keyed.post("/rest/crm.lead.add", data={"fields[TITLE]": "form"},
                         headers={"X-Sidecar-Key": KEY})
        await keyed.get("/rest/batch", params={"cmd[a]": "profile"},
                        headers={"x-sidecar-KEY": KEY})
        calls = list(emulator.rest_log)
        assert [c.method for c in calls] == ["profile", "crm.lead.add", "crm.lead.add", "batch"]
        for call in calls:
            seen = repr((call.path, call.query, call.params, call.headers, call.body))
            assert KEY not in seen, seen
            assert not any(name.lower() == "x-sidecar-key" for name in call.headers)
            assert call.path.startswith(f"/rest/{call.method}")

    async def test_a_bad_address_does_not_echo_the_key(
        self, keyed: Client, emulator: Emulator
    ) -> None:
        """A malformed address holding the key is refused without quoting the key back."""
        for path in (f"/rest/1/{KEY}/bad..method", f"/rest/1/{KEY}/x/y/z",
                     f"/REST/1/{KEY}/profile"):
            response = await keyed.get(path, headers={"X-Sidecar-Key": KEY})
            assert response.status in (400, 404), path
            assert KEY not in await response.text()
        assert list(emulator.rest_log) == []

    async def test_without_a_key_set_the_code_is_ignored(self, sidecar: Client) -> None:
        """With no SIDECAR_CLIENT_KEY, any code and any header are as before: ignored."""
        for path in ("/rest/profile", "/rest/1/anycode/profile", f"/rest/1/{KEY}/profile"):
            response = await sidecar.get(path, headers={"X-Sidecar-Key": "whatever"})
            assert response.status == 200, path
        assert (await sidecar.get("/token")).status == 200


class TestKeyNeverLogged:
    async def test_no_log_event_holds_the_key(
        self, keyed: Client, emulator: Emulator, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Calls right, wrong and malformed, by code and by header: the key is in no log line."""
        caplog.set_level(logging.DEBUG)
        with structlog.testing.capture_logs() as events:
            await keyed.get(f"/rest/1/{KEY}/profile")
            await keyed.get("/rest/profile", headers={"X-Sidecar-Key": KEY})
            await keyed.get(f"/rest/1/{KEY}/bad..method")
            await keyed.get(f"/rest/1/{KEY}/no.such.method")
            await keyed.get("/token", headers={"X-Sidecar-Key": KEY})
            await keyed.get(f"/rest/1/{KEY}/profile", headers={"Host": "evil.example"})
        assert events
        # aiohttp's access log is the test server's: `run` turns it off (serve(access_log=None)).
        records = [r for r in caplog.records if r.name != "aiohttp.access"]
        lines = [repr(event) for event in events] + [r.getMessage() for r in records]
        assert not [line for line in lines if KEY in line]

    def test_the_key_is_not_in_the_settings_repr(self, tmp_path: Path) -> None:
        """Like the client secret, the key never shows in a repr (a traceback's locals)."""
        env = {"BITRIX_PORTAL": "corp", "BITRIX_CLIENT_ID": "c", "BITRIX_CLIENT_SECRET": "s" * 8}
        assert KEY not in repr(load_settings({**env, "SIDECAR_CLIENT_KEY": KEY}))
        key_file = tmp_path / "key"
        key_file.write_text(KEY + "\n")
        settings = load_settings({**env, "SIDECAR_CLIENT_KEY_FILE": str(key_file)})
        assert settings.client_key == KEY
        assert KEY not in repr(settings)


class TestKeySetting:
    BASE: ClassVar[dict[str, str]] = {
        "BITRIX_PORTAL": "corp", "BITRIX_CLIENT_ID": "c", "BITRIX_CLIENT_SECRET": "secret"}

    @pytest.mark.parametrize("key", ["short", "has-a-dash-0123456789", "with space 0123456789",
                                     "a" * 65, "ключ" * 5])
    def test_a_key_that_cannot_be_a_webhook_code_is_refused_unquoted(self, key: str) -> None:
        """A key must fit the code segment; the message names the variable, never the value."""
        with pytest.raises(ConfigError) as caught:
            load_settings({**self.BASE, "SIDECAR_CLIENT_KEY": key})
        assert "SIDECAR_CLIENT_KEY" in caught.value.description
        assert key not in caught.value.description

    def test_both_forms_are_refused(self, tmp_path: Path) -> None:
        """The key and the key file together are ambiguous."""
        key_file = tmp_path / "key"
        key_file.write_text(KEY)
        with pytest.raises(ConfigError, match="SIDECAR_CLIENT_KEY and SIDECAR_CLIENT_KEY_FILE"):
            load_settings({**self.BASE, "SIDECAR_CLIENT_KEY": KEY,
                           "SIDECAR_CLIENT_KEY_FILE": str(key_file)})

    @pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080",
                                        "sidecar:8080"])
    def test_beyond_loopback_needs_a_key_or_the_opt_out(self, listen: str) -> None:
        """A listener beyond loopback: refused without a key; with one, or opted out, accepted."""
        env = {**self.BASE, "SIDECAR_LISTEN": listen}
        with pytest.raises(ConfigError) as caught:
            load_settings(env)
        [problem] = caught.value.problems
        for name in ("SIDECAR_LISTEN", "SIDECAR_CLIENT_KEY", "SIDECAR_CLIENT_KEY_FILE",
                     "SIDECAR_INSECURE_NO_CLIENT_KEY=on"):
            assert name in problem
        assert load_settings({**env, "SIDECAR_CLIENT_KEY": KEY}).client_key == KEY
        assert load_settings({**env, "SIDECAR_INSECURE_NO_CLIENT_KEY": "on"}).client_key == ""
        # The one-shot commands (status, token, authorize) listen on nothing.
        assert load_settings(env, serving=False).client_key == ""

    @pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.8.9.10:1", "[::1]:8080",
                                        "localhost:8080"])
    def test_loopback_needs_no_key(self, listen: str) -> None:
        assert load_settings({**self.BASE, "SIDECAR_LISTEN": listen}).client_key == ""


# -- the CLI as a real subprocess ---------------------------------------------------------------


@pytest.fixture
def run_env(emulator: Emulator, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment, with a first code to exchange."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BITRIX_", "SIDECAR_"))}
    return base | settings_env(emulator, tmp_path) | {
        "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID), "SIDECAR_LOG_LEVEL": "debug"}


def local(address: str) -> str:
    """A wildcard listener's address as reached over loopback."""
    return address.replace("://0.0.0.0:", "://127.0.0.1:")


class TestStartUp:
    async def test_beyond_loopback_without_a_key_exits_2(self, run_env: dict[str, str]) -> None:
        """`run` on 0.0.0.0 with no key: exit 2, one message naming what to set."""
        code, out, err = await cli("run", env={**run_env, "SIDECAR_LISTEN": "0.0.0.0:0"})
        assert code == 2, err
        assert out == ""
        for name in ("SIDECAR_LISTEN", "SIDECAR_CLIENT_KEY or SIDECAR_CLIENT_KEY_FILE",
                     "SIDECAR_INSECURE_NO_CLIENT_KEY=on"):
            assert name in err, err
        code, _, err = await cli("run", "--listen", "0.0.0.0:0", env=run_env)
        assert code == 2
        assert "--listen" in err

    async def test_one_shot_commands_are_not_refused(self, run_env: dict[str, str]) -> None:
        """`status` with SIDECAR_LISTEN=0.0.0.0 still answers: it listens on nothing."""
        code, out, err = await cli("status", env={**run_env, "SIDECAR_LISTEN": "0.0.0.0:0"})
        assert "SIDECAR_CLIENT_KEY" not in err
        assert code in (0, 1)
        json.loads(out)

    async def test_the_opt_out_starts_with_a_warning(self, run_env: dict[str, str]) -> None:
        """SIDECAR_INSECURE_NO_CLIENT_KEY=on starts, and says at start-up what it gives up."""
        env = {**run_env, "SIDECAR_LISTEN": "0.0.0.0:0", "SIDECAR_INSECURE_NO_CLIENT_KEY": "on"}
        async with running(env) as sidecar:
            async with aiohttp.ClientSession() as http, \
                    http.get(local(sidecar.base) + "/rest/profile") as response:
                assert response.status == 200
            assert await sidecar.stop() == 0
        warnings = [e for e in sidecar.events() if e["event"] == "no_client_key"]
        assert len(warnings) == 1
        assert warnings[0]["level"] == "warning"
        assert warnings[0]["listen"].startswith("0.0.0.0:")

    async def test_with_a_key_file_it_serves_keyed_calls_and_never_logs_the_key(
        self, run_env: dict[str, str], tmp_path: Path
    ) -> None:
        """A keyed sidecar on 0.0.0.0: keyless 401, keyed 200; the key in no line of its log."""
        key_file = tmp_path / "client-key"
        key_file.write_text(KEY + "\n")
        env = {**run_env, "SIDECAR_LISTEN": "0.0.0.0:0", "SIDECAR_CLIENT_KEY_FILE": str(key_file)}
        async with running(env) as sidecar:
            base = local(sidecar.base)
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/rest/profile") as response:
                    assert response.status == 401
                async with http.get(f"{base}/rest/1/{OTHER}/profile") as response:
                    assert response.status == 401
                async with http.get(f"{base}/rest/1/{KEY}/profile") as response:
                    assert response.status == 200
                async with http.get(f"{base}/rest/1/{KEY}/bad..x") as response:
                    assert response.status == 400
                async with http.get(base + "/token", headers={"X-Sidecar-Key": KEY}) as response:
                    assert response.status == 200
                # A client that sends the key where it does not belong: the redactor hides it.
                echoed = {"X-Sidecar-Key": KEY, "X-Request-ID": KEY}
                async with http.get(base + "/rest/profile", headers=echoed) as response:
                    assert response.status == 200
            assert await sidecar.stop() == 0
        text = "".join(sidecar.lines)
        assert '"event": "request"' in text  # the access log was written, at debug level
        assert KEY not in text
        assert CLIENT_SECRET not in text
        assert not [e for e in sidecar.events() if e["event"] == "no_client_key"]

