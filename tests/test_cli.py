"""The command line as a real subprocess: run, restart, signals, authorize, status, token, demo."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp

from sidecar.cli import DEMO_DEALS
from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OffsetClock, free_port
from tests.processes import Env, cli, get, running


class TestConfiguration:
    async def test_bad_settings_exit_2_naming_every_variable(self, env: Env) -> None:
        """Start-up with bad settings stops with code 2 and one message naming each."""
        bad = {**env, "SIDECAR_LISTEN": "nowhere", "SIDECAR_REFRESH_INTERVAL": "soon"}
        del bad["BITRIX_PORTAL"]
        code, _, err = await cli("run", env=bad)
        assert code == 2
        for name in ("BITRIX_PORTAL", "SIDECAR_LISTEN", "SIDECAR_REFRESH_INTERVAL"):
            assert name in err

    async def test_a_bad_portal_list_exits_2_naming_bitrix_portal(self, env: Env) -> None:
        """One bad entry in a marketplace list stops start-up like any bad value."""
        bad = {**env, "BITRIX_PORTAL": "https://*.bitrix24.com,https://a.*.bitrix24.de"}
        code, _, err = await cli("run", env=bad)
        assert code == 2
        assert "BITRIX_PORTAL: 'https://a.*.bitrix24.de': only the leftmost label" in err

    async def test_version(self, env: Env) -> None:
        """--version names the program."""
        code, out, _ = await cli("--version", env=env)
        assert code == 0
        assert out.startswith("bitrix-sidecar ")


class TestRun:
    async def test_serves_stops_on_sigterm_and_keeps_its_pair_over_a_restart(
        self, env: Env, emulator: Emulator
    ) -> None:
        """A restarted sidecar is still authorized and holds the rotated refresh token."""
        first_env = {**env, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}
        async with running(first_env) as sidecar:
            status, _ = await get(f"{sidecar.base}/rest/profile")
            assert status == 200
            emulator.expire_access_tokens()  # the next call refreshes: the pair rotates
            status, _ = await get(f"{sidecar.base}/rest/user.current")
            assert status == 200
            assert await sidecar.stop() == 0
        assert emulator.stats.refresh_ok == 1
        async with running(env) as sidecar:  # no code this time
            status, _ = await get(f"{sidecar.base}/rest/profile")
            assert status == 200
            emulator.expire_access_tokens()
            status, _ = await get(f"{sidecar.base}/rest/profile")
            assert status == 200
            assert await sidecar.stop(signal.SIGINT) == 0
        assert emulator.stats.token_requests["authorization_code"] == 1
        assert emulator.stats.refresh_ok == 2
        assert emulator.stats.refresh_rejected == 0

    async def test_pair_authorized_by_the_cli_is_used_without_restart(
        self, env: Env, emulator: Emulator
    ) -> None:
        """A running, unauthorized sidecar serves as soon as `authorize` stores a pair."""
        async with running(env) as sidecar:
            status, body = await get(f"{sidecar.base}/rest/profile")
            assert status == 503
            assert body["error"] == "SIDECAR_NOT_AUTHORIZED"
            redirect = (f"https://app.example/handler?code={emulator.issue_code(CLIENT_ID)}"
                        f"&state=x&domain={emulator.base_url.split('://')[1]}&member_id=m")
            code, out, err = await cli("authorize", redirect, env=env)
            assert code == 0, err
            assert json.loads(out)["state"] == "valid"
            status, _ = await get(f"{sidecar.base}/rest/profile")
            assert status == 200
            assert await sidecar.stop() == 0

    async def test_no_secret_in_logs_at_debug_level(self, env: Env, emulator: Emulator) -> None:
        """Across authorize, calls, a refresh and /token, no token or secret is ever logged."""
        debug_env = {**env, "SIDECAR_LOG_LEVEL": "debug",
                     "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}
        async with running(debug_env) as sidecar:
            await get(f"{sidecar.base}/rest/profile?auth=client-token-123456")
            emulator.expire_access_tokens()
            await get(f"{sidecar.base}/rest/profile")
            await get(f"{sidecar.base}/token")
            emulator.oauth_failure = "garbage"
            emulator.expire_access_tokens()
            await get(f"{sidecar.base}/rest/profile")
            emulator.oauth_failure = None
            await sidecar.stop()
        logged = "".join(sidecar.lines)
        assert '"token_refreshed"' in logged
        secrets = [CLIENT_SECRET, "client-token-123456", *emulator.issued_secrets()]
        assert len(secrets) >= 6
        for secret in secrets:
            assert secret not in logged


class TestAuthorize:
    async def test_expired_code_says_what_to_do(
        self, env: Env, emulator: Emulator, emulator_clock: OffsetClock
    ) -> None:
        """A code older than 30 seconds fails with a clear hint and stores nothing."""
        code = emulator.issue_code(CLIENT_ID)
        emulator_clock.offset += 31
        status, out, err = await cli("authorize", code, env=env)
        assert status == 1
        assert "30 seconds" in err
        assert "/oauth/authorize/" in err
        status, out, _ = await cli("status", env=env)
        assert status == 1
        assert json.loads(out)["state"] == "not_authorized"

    async def test_redirect_from_another_portal_is_refused(self, env: Env,
                                                          emulator: Emulator) -> None:
        """A pasted address whose domain is not the configured portal is refused."""
        code = emulator.issue_code(CLIENT_ID)
        status, _, err = await cli(
            "authorize", f"https://h/?code={code}&domain=evil.bitrix24.com", env=env
        )
        assert status == 1
        assert "evil.bitrix24.com" in err
        assert emulator.stats.token_requests["authorization_code"] == 0

    async def test_authorize_url(self, env: Env, emulator: Emulator) -> None:
        """authorize-url prints the portal's approval address, and needs no secret."""
        no_secret = {k: v for k, v in env.items() if k != "BITRIX_CLIENT_SECRET"}
        code, out, _ = await cli("authorize-url", env=no_secret)
        assert code == 0
        assert out.strip() == f"{emulator.base_url}/oauth/authorize/?client_id={CLIENT_ID}"


class TestStatusAndToken:
    async def test_status_and_token(self, env: Env, emulator: Emulator) -> None:
        """status shows the state without the token; token prints it, renewing an expired one."""
        code, _, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=env)
        assert code == 0, err
        code, out, _ = await cli("status", env=env)
        assert code == 0
        info = json.loads(out)
        assert info["state"] == "valid"
        assert info["member_id"]
        assert info["scope_missing"] == []
        code, token, _ = await cli("token", env=env)
        assert code == 0
        token = token.strip()
        assert token in emulator.issued_secrets()
        assert token not in out
        # Make the stored token expired, as after an hour: `token` must renew it first.
        with sqlite3.connect(env["SIDECAR_DB"]) as db:
            db.execute("UPDATE authorizations SET expires_at = 1")
        code, renewed, _ = await cli("token", env=env)
        assert code == 0
        assert renewed.strip() != token
        assert emulator.stats.refresh_ok == 1
        status, _ = await get(f"{emulator.base_url}/rest/profile?auth={renewed.strip()}")
        assert status == 200


class TestDemo:
    async def test_demo_serves_an_authorized_sidecar(self) -> None:
        """The README's first command serves the emulator behind an authorized sidecar."""
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "demo", "--listen", f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            banner = ""
            while "Ctrl-C" not in banner:
                line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
                assert line, "demo exited early"
                banner += line
            assert f"curl -s http://127.0.0.1:{port}/rest/profile" in banner
            status, body = await get(f"http://127.0.0.1:{port}/rest/profile")
            assert status == 200
            assert body["result"]["ID"] == "1"
            # The banner's REST 3.0 call and whole list work as printed.
            assert f"http://127.0.0.1:{port}/rest/api/tasks.task.get" in banner
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/rest/api/tasks.task.get",
                                        json={"id": 1, "select": ["id", "title"]}) as answer:
                    assert answer.status == 200
                    assert (await answer.json())["result"]["item"]["id"] == 1
                async with session.get(f"http://127.0.0.1:{port}/all/rest/crm.deal.list",
                                       headers={"Accept": "application/x-ndjson"}) as answer:
                    assert len((await answer.read()).splitlines()) == DEMO_DEALS
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


    async def test_demo_with_two_portals_serves_each_by_name(self) -> None:
        """``demo --portals 2``: both emulated portals install the app on one sidecar; calls by
        host prefix and by member_id are served, an unaddressed one is told to name a portal."""
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "demo", "--listen", f"127.0.0.1:{port}",
            "--portals", "2", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            banner = ""
            while "Ctrl-C" not in banner:
                line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
                assert line, "demo exited early"
                banner += line
            paths = [line.split()[2].removeprefix(f"http://127.0.0.1:{port}")
                     for line in banner.splitlines()
                     if line.strip().startswith("curl -s http") and "/portal/" in line]
            assert len(paths) >= 2, banner
            for path in paths:
                for _ in range(50):  # the installs go through the portal's checks first
                    status, body = await get(f"http://127.0.0.1:{port}{path}")
                    if status == 200:
                        break
                    await asyncio.sleep(0.1)
                assert status == 200, (path, body)
            status, body = await get(f"http://127.0.0.1:{port}/rest/profile")
            assert (status, body["error"]) == (400, "SIDECAR_PORTAL_REQUIRED")
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class TestEmulatorCommand:
    async def test_seed_fills_list_tables_at_start(self) -> None:
        """``emulator --seed TABLE=N`` (repeatable) serves N made-up records in that table."""
        from bench.common import access_token, emulator

        async with emulator("--seed", "crm.deal=120", "--seed", "crm.contact=3") as portal:
            token = await access_token(portal)
            status, body = await get(f"{portal}/rest/crm.deal.list?auth={token}&start=100")
            assert (status, body["total"], len(body["result"])) == (200, 120, 20)
            assert body["result"][-1]["ID"] == "120"
            status, body = await get(f"{portal}/rest/crm.contact.list?auth={token}")
            assert (status, body["total"]) == (200, 3)

    async def test_a_bad_seed_exits_2(self, env: Env) -> None:
        """A ``--seed`` that is not TABLE=N stops the command with argparse's exit 2."""
        for bad in ("crm.deal", "crm.deal=many", "=5", "crm.deal=-1"):
            code, _, err = await cli("emulator", "--seed", bad, env=env)
            assert code == 2, bad
            assert "TABLE=N" in err, bad


def test_console_script_is_installed() -> None:
    """The package installs a bitrix-sidecar command beside the interpreter."""
    assert (Path(sys.executable).parent / "bitrix-sidecar").exists()



class TestOperatorGrants:
    """authorize-link and expect-install: what only someone with the store can hand out."""

    async def test_a_link_from_the_cli_starts_the_flow_on_the_published_listener(
        self, env: Env, emulator: Emulator
    ) -> None:
        """The printed one-time link opens the flow on the OAuth listener, once."""
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        run_env = {**env, "SIDECAR_OAUTH_LISTEN": f"127.0.0.1:{port}",
                   "SIDECAR_PUBLIC_URL": public}
        emulator.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user",
                              redirect_uri=f"{public}/oauth/callback")
        async with running(run_env) as sidecar, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as browser:
            for _ in range(100):  # the OAuth listener starts just after the other two
                if any('"oauth_listening"' in line for line in sidecar.lines):
                    break
                await asyncio.sleep(0.05)
            async with browser.get(f"{public}/oauth/start") as refused:
                assert refused.status == 403
            code, out, err = await cli("authorize-link", env=run_env)
            assert code == 0, err
            link = out.strip()
            assert link.startswith(f"{public}/oauth/start?link=")
            assert "10 minutes" in err
            async with browser.get(link) as page:
                assert page.status == 200, await page.text()
                assert "Continue to Bitrix24" in await page.text()
            # The button posts the link from the page's own origin; the rest follows itself.
            async with browser.post(f"{public}/oauth/start",
                                    data={"link": link.split("link=")[1]},
                                    headers={"Origin": public}) as done:
                assert done.status == 200, await done.text()
                assert "bitrix-sidecar is authorized" in await done.text()
            async with browser.get(link) as again:
                assert again.status == 403
            _, info = await get(f"{sidecar.admin}/status")
            assert info["state"] == "valid"
        assert link.split("link=")[1] not in "".join(sidecar.lines)

    async def test_expect_install_opens_one_window_for_the_held_user(
        self, env: Env, emulator: Emulator
    ) -> None:
        """A working pair with no application token: only an install in the window replaces it."""
        run_env = {**env, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}
        async with running(run_env) as sidecar:
            hook = f"{sidecar.base}/oauth/install"
            status, body = await emulator.send_install_event(hook, CLIENT_ID)
            assert status == 403, body
            code, out, err = await cli("expect-install", env=run_env)
            assert code == 0, err
            assert json.loads(out)["for"] == "user 1"
            status, body = await emulator.send_install_event(hook, CLIENT_ID)
            assert status == 200, body
            status, body = await emulator.send_install_event(hook, CLIENT_ID, user_id=7)
            assert status == 403, body  # the window served once; the token renews user 1 only
            status, body = await emulator.send_install_event(
                hook, CLIENT_ID, event="ONAPPUNINSTALL")
            assert status == 200, body
            _, info = await get(f"{sidecar.admin}/status")
            assert info["state"] == "reauthorization_required"

    async def test_a_published_oauth_listener_needs_its_public_address(self, env: Env) -> None:
        """SIDECAR_OAUTH_LISTEN beyond loopback without SIDECAR_PUBLIC_URL stops start-up."""
        code, _, err = await cli("run", env={**env, "SIDECAR_OAUTH_LISTEN": "0.0.0.0:0"})
        assert code == 2
        assert "SIDECAR_PUBLIC_URL" in err


class TestExpectInstallRefusals:
    async def test_nothing_to_replace(self, env: Env) -> None:
        """With no working pair held, no window is opened: the next install is taken anyway."""
        code, _, err = await cli("expect-install", env=env)
        assert code == 1
        assert "nothing to replace" in err

    async def test_an_unknown_user_must_be_named(self, env: Env, emulator: Emulator,
                                                 tmp_path: Path) -> None:
        """A held pair that does not say its user gets no silent any-user window."""
        code, _, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=env)
        assert code == 0, err
        with sqlite3.connect(env["SIDECAR_DB"]) as raw:  # as an older release stored it
            raw.execute("UPDATE authorizations SET user_id = ''")
        code, _, err = await cli("expect-install", env=env)
        assert code == 1
        assert "--any-user" in err
        code, out, err = await cli("expect-install", "--any-user", env=env)
        assert code == 0, err
        assert json.loads(out)["for"] == "any user"
