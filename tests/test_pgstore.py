"""The PostgreSQL store, against a real PostgreSQL 15 server: what tests/test_store.py checks
for SQLite, plus several stores (as several sidecars) on one database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from sidecar.app import make_oauth, oauth_session
from sidecar.authorization import Authorization
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.errors import StoreError
from sidecar.grants import (
    install_window,
    issue_link,
    open_install_window,
    take_install_window,
    take_link,
)
from sidecar.pgstore import _MIGRATIONS, SCHEMA_VERSION, PgStore
from sidecar.store import TokenStore
from tests.conftest import CLIENT_ID, AlertSink
from tests.pg import Server
from tests.processes import Running, cli, get, running
from tests.test_store import PORTAL, pair


def store(url: str, portal: str = PORTAL, client_id: str = "local.1") -> PgStore:
    """Open a store on the database at ``url``."""
    return PgStore(url, portal=portal, client_id=client_id)


class TestPair:
    async def test_empty_store_holds_no_pair(self, pg_url: str) -> None:
        """A new database answers with no pair, generation 0 and data version 0."""
        async with store(pg_url) as s:
            state = await s.load()
            assert await s.data_version() == 0
        assert state.pair is None
        assert state.generation == 0
        assert not state.reauth_required

    async def test_saved_pair_survives_reopening(self, pg_url: str) -> None:
        """What is saved is what a new pool loads, field by field."""
        async with store(pg_url) as s:
            generation = await s.save_pair(pair(1))
        async with store(pg_url) as s:
            state = await s.load()
        assert state.pair == pair(1)
        assert state.generation == generation == 1

    async def test_each_save_bumps_the_generation_and_clears_errors(self, pg_url: str) -> None:
        """A new pair moves the generation on and ends a re-authorization state."""
        async with store(pg_url) as s:
            await s.save_pair(pair(1))
            await s.record_error("invalid_grant", reauth_required=True)
            state = await s.load()
            assert state.reauth_required
            assert state.last_error == "invalid_grant"
            assert state.last_error_at is not None
            assert state.generation == 1, "an error note is no new generation"
            assert await s.save_pair(pair(2)) == 2
            state = await s.load()
        assert state.pair == pair(2)
        assert not state.reauth_required
        assert state.last_error == ""
        assert state.last_error_at is None

    async def test_another_portals_row_is_its_own(self, pg_url: str) -> None:
        """Another portal's (or app's) authorization is another row: neither sees the other's."""
        async with store(pg_url) as ours:
            await ours.save_pair(pair(1))
        async with store(pg_url, portal="https://other.bitrix24.com") as other, \
                store(pg_url, client_id="local.2") as other_app:
            await other.record_error("boom", reauth_required=True)
            assert (await other.load()).pair is None
            assert (await other_app.load()).pair is None
            assert await other_app.save_pair(pair(9)) == 1
        async with store(pg_url) as ours:
            state = await ours.load()
        assert state.pair == pair(1), "an error note of another portal must not touch ours"
        assert not state.reauth_required
        assert state.generation == 1
        assert state.foreign == ""


class TestLock:
    async def test_lock_serializes_two_stores(self, pg_url: str) -> None:
        """A second writer waits for the first to commit, then sees its pair under the lock."""
        async with store(pg_url) as first, store(pg_url) as second:
            await first.save_pair(pair(1))
            order: list[str] = []
            entered = asyncio.Event()

            async def hold() -> None:
                async with first.locked():
                    entered.set()
                    await asyncio.sleep(0.3)
                    await first.save_pair(pair(2))
                    order.append("first committed")

            async def wait() -> None:
                await entered.wait()
                async with second.locked() as seen:
                    order.append("second entered")
                    assert seen.pair == pair(2)
                    assert seen.generation == 2

            await asyncio.gather(hold(), wait())
        assert order == ["first committed", "second entered"]

    async def test_the_first_two_writers_queue_too(self, pg_url: str) -> None:
        """With no row yet, the lock still serializes: the second sees the first's pair."""
        async with store(pg_url) as first, store(pg_url) as second:
            seen: list[int] = []

            async def write(s: PgStore, n: int) -> None:
                async with s.locked() as state:
                    seen.append(state.generation)
                    await asyncio.sleep(0.2)
                    await s.save_pair(pair(n))

            await asyncio.gather(write(first, 1), write(second, 2))
            assert sorted(seen) == [0, 1]
            assert (await first.load()).generation == 2

    async def test_the_lock_is_the_databases_not_the_process(self, pg_url: str) -> None:
        """Another connection's FOR UPDATE (as another sidecar's) waits for our commit."""
        async with store(pg_url) as s:
            await s.save_pair(pair(1))
            other = await asyncpg.connect(pg_url)
            try:
                async with s.locked(), other.transaction():
                    await other.execute("SET LOCAL lock_timeout = '200ms'")
                    with pytest.raises(asyncpg.LockNotAvailableError):
                        await other.execute("SELECT 1 FROM sidecar_authorization FOR UPDATE")
            finally:
                await other.close()

    async def test_a_dead_holders_lock_is_released(self, pg_url: str) -> None:
        """A holder whose connection ends (a killed sidecar) leaves no lock behind."""
        async with store(pg_url) as s:
            await s.save_pair(pair(1))
            holder = await asyncpg.connect(pg_url)
            await holder.execute("BEGIN")
            await holder.execute("SELECT 1 FROM sidecar_authorization FOR UPDATE")
            holder.terminate()  # no COMMIT, no ROLLBACK: the socket just closes
            async with asyncio.timeout(10), s.locked() as state:
                assert state.pair == pair(1)

    async def test_error_inside_lock_rolls_back(self, pg_url: str) -> None:
        """A failure inside the locked block leaves the stored pair and grants as they were."""
        async with store(pg_url) as s:
            await s.save_pair(pair(1))
            await open_install_window(s, "7")

            async def fail_inside_lock() -> None:
                async with s.locked():
                    await s.save_pair(pair(2))
                    await s.drop_grants("install")
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError):
                await fail_inside_lock()
            state = await s.load()
            assert (state.pair, state.generation) == (pair(1), 1)
            assert await install_window(s) is not None

    async def test_data_version_moves_on_another_stores_commit(self, pg_url: str) -> None:
        """The watcher's change signal moves when another store writes, not before it commits."""
        async with store(pg_url) as watcher, store(pg_url) as writer:
            before = await watcher.data_version()
            async with writer.locked():
                await writer.save_pair(pair(1))
                assert await watcher.data_version() == before, "uncommitted"
            moved = await watcher.data_version()
            assert moved != before
            await writer.record_error("boom", reauth_required=False)
            assert await watcher.data_version() != moved

    async def test_heal_is_false(self, pg_url: str) -> None:
        """A database is not swapped under us as a file is: nothing to heal."""
        async with store(pg_url) as s:
            assert await s.heal() is False


class TestSchema:
    async def test_three_stores_migrate_one_database_at_once(self, pg_url: str) -> None:
        """Three sidecars starting together: one creates the schema, none fails."""
        stores = [store(pg_url) for _ in range(3)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
            await stores[0].save_pair(pair(1))
            assert [(await s.load()).pair for s in stores] == [pair(1)] * 3
        finally:
            for s in stores:
                await s.close()
        conn = await asyncpg.connect(pg_url)
        try:
            assert await conn.fetchval(
                "SELECT array_agg(version) FROM sidecar_schema_version") == [SCHEMA_VERSION]
        finally:
            await conn.close()

    async def test_a_newer_schema_is_refused(self, pg_url: str) -> None:
        """A database migrated by a newer release is not written by this one."""
        async with store(pg_url):
            pass
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("UPDATE sidecar_schema_version SET version = 99")
        finally:
            await conn.close()
        with pytest.raises(StoreError, match="newer bitrix-sidecar"):
            async with store(pg_url):
                pass


    async def test_a_version_4_database_keeps_its_authorization(self, pg_url: str) -> None:
        """The previous release's row (one per portal and app) is kept under the configured
        portal's key: a single-portal fleet upgrades with no new approval."""
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "CREATE TABLE sidecar_schema_version (version INTEGER NOT NULL)")
            for step in range(1, 5):
                for statement in _MIGRATIONS[step]:
                    await conn.execute(statement)
            await conn.execute("INSERT INTO sidecar_schema_version VALUES (4)")
            old = pair(1)
            await conn.execute(
                "INSERT INTO sidecar_authorization (portal, client_id, access_token, "
                "refresh_token, expires_at, scope, member_id, client_endpoint, application_token, "
                "obtained_at, generation, updated_at, version) "
                "VALUES ($1, 'local.1', $2, $3, $4, $9, $5, $6, $7, $8, 9, 0, 3)",
                PORTAL, old.access_token, old.refresh_token, old.expires_at, old.member_id,
                old.client_endpoint, old.application_token, old.obtained_at, old.scope)
        finally:
            await conn.close()
        async with store(pg_url) as s:
            loaded = await s.load()
            assert (loaded.pair, loaded.generation) == (pair(1), 9)
            assert [(e.key, e.portal) for e in await s.entries()] == [(PORTAL, PORTAL)]
            async with s.locked():
                assert await s.save_pair(pair(2)) == 10


class TestManyAuthorizations:
    """One database holds an authorization per portal, each its own row and row lock."""

    async def test_one_portals_lock_never_waits_for_anothers(self, pg_url: str) -> None:
        """While a renewal of portal a holds its row, portal b's lock is taken at once, and a
        second holder of a's row waits."""
        async with store(pg_url) as s, store(pg_url) as other:
            a = s.authorization("member-a", "https://a.example.com")
            async with a.locked():
                await a.save_pair(pair(1))
                async with asyncio.timeout(2):
                    b = other.authorization("member-b", "https://b.example.com")
                    async with b.locked() as held:
                        assert held.pair is None
                        await b.save_pair(pair(2))
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5), other.authorization(
                            "member-a", "https://a.example.com").locked():
                        pass
            assert (await other.authorization("member-a", "").load()).pair == pair(1)
            assert [(e.key, e.portal, e.state.pair) for e in await s.entries()] == [
                ("member-a", "https://a.example.com", pair(1)),
                ("member-b", "https://b.example.com", pair(2))]
            assert (await s.load()).pair is None  # the single portal's row is another

    async def test_changes_since_and_removal(self, pg_url: str) -> None:
        """Writes are found in order by one query; a removed portal keeps no secret, is not
        listed, is found by the watch, and a new install takes its row again."""
        async with store(pg_url) as s, store(pg_url, client_id="local.other") as other:
            start, changed = await s.changes_since(0)
            assert changed == []
            for n, key in enumerate(["x", "y"], 1):
                row = s.authorization(key, f"https://{key}.example.com")
                async with row.locked():
                    await row.save_pair(pair(n))
            foreign = other.authorization("x", "https://x.example.com")
            async with foreign.locked():
                await foreign.save_pair(pair(9))  # another app's: not ours to see
            seq, changed = await s.changes_since(start)
            assert changed == ["x", "y"]
            x = s.authorization("x", "https://x.example.com")
            async with x.locked():
                await x.remove("uninstalled")
            newest, changed = await s.changes_since(seq)
            assert changed == ["x"]
            assert await s.changes_since(newest) == (newest, [])
            assert [e.key for e in await s.entries()] == ["y"]
            loaded = await x.load()
            assert (loaded.pair, loaded.reauth_required) == (None, True)
            conn = await asyncpg.connect(pg_url)
            try:
                row = await conn.fetchrow(
                    "SELECT access_token, refresh_token, application_token "
                    "FROM sidecar_authorization WHERE key = 'x' AND client_id = 'local.1'")
            finally:
                await conn.close()
            assert tuple(row) == (None, None, "")
            async with x.locked():
                await x.save_pair(pair(3))
            assert [e.key for e in await s.entries()] == ["x", "y"]
            assert (await other.authorization("x", "").load()).pair == pair(9)


class TestGrants:
    async def test_a_link_works_once_within_its_time(self, pg_url: str) -> None:
        """Taken once; unknown, used and expired links are refused."""
        async with store(pg_url) as db:
            secret = await issue_link(db, now=1000.0)
            assert not await take_link(db, "made-up", now=1001.0)
            assert await take_link(db, secret, now=1001.0)
            assert not await take_link(db, secret, now=1002.0)

    async def test_an_install_window_is_seen_by_another_store_and_used_once(
        self, pg_url: str
    ) -> None:
        """The CLI's window (another store) is visible, left open by a look, gone once used;
        another app's grants are its own."""
        async with store(pg_url) as cli, store(pg_url) as server, \
                store(pg_url, client_id="local.2") as other_app:
            await open_install_window(cli, "7")
            window = await install_window(server)
            assert window is not None
            assert window.admits("7")
            assert await install_window(other_app) is None
            assert await install_window(server) == window
            assert await take_install_window(server) == window
            assert await take_install_window(server) is None


class TestPassword:
    @pytest.mark.parametrize("wrong", ["port", "password"])
    async def test_never_in_a_store_error(self, pg_server: Server, pg_url: str,
                                          wrong: str) -> None:
        """A store that cannot connect says which database, never with the password."""
        secret = "pw-never-shown-0123456789"
        url = (pg_server.url("postgres", password=secret, port=1) if wrong == "port"
               else pg_server.url("postgres", password=secret))
        with pytest.raises(StoreError) as caught:
            async with store(url):
                pass
        text = f"{caught.value.description} {caught.value!r} {caught.value.__cause__!r}"
        assert secret not in text
        assert f"{pg_server.role}@{pg_server.host}" in caught.value.description
        assert ("authentication" in text) if wrong == "password" else True


class TestFleet:
    async def test_three_sidecars_refresh_an_expired_token_once(
        self, env: dict[str, str], pg_server: Server, pg_url: str, emulator: Emulator
    ) -> None:
        """Three `run` processes on one database, the token expired, 200 concurrent calls
        spread over them: one refresh at the OAuth server, 200 answers 200."""
        fleet_env = {**env, "SIDECAR_DB": pg_url, "SIDECAR_LOG_LEVEL": "debug"}
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(running(
                {**fleet_env, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}))
            others = [await stack.enter_async_context(running(fleet_env)) for _ in range(2)]
            fleet = [first, *others]
            for sidecar in fleet:
                status, body = await get(f"{sidecar.admin}/status")
                assert (status, body["state"]) == (200, "valid"), body
            assert emulator.stats.token_requests["authorization_code"] == 1
            emulator.expire_access_tokens()

            async with aiohttp.ClientSession() as http:

                async def call(n: int) -> int:
                    base = fleet[n % 3].base
                    async with http.get(f"{base}/rest/profile") as response:
                        await response.read()
                        return response.status

                statuses = await asyncio.gather(*(call(n) for n in range(200)))
            assert statuses == [200] * 200
            assert emulator.stats.refresh_ok == 1
            assert emulator.stats.token_requests["refresh_token"] == 1
            for sidecar in fleet:
                status, body = await get(f"{sidecar.admin}/status")
                assert (status, body["state"]) == (200, "valid"), body
        logs = "".join(line for sidecar in fleet for line in sidecar.lines)
        assert pg_server.password not in logs

    async def test_the_cli_reads_and_writes_the_database(
        self, env: dict[str, str], pg_server: Server, pg_url: str, emulator: Emulator,
        tmp_path: Path,
    ) -> None:
        """`authorize` and `status` on a URL from SIDECAR_DB_FILE; the password is never shown."""
        (tmp_path / "db-url").write_text(pg_url + "\n")
        cli_env = {k: v for k, v in env.items() if k != "SIDECAR_DB"}
        cli_env["SIDECAR_DB_FILE"] = str(tmp_path / "db-url")
        password = pg_server.password
        code, out, err = await cli("status", env=cli_env)
        assert code != 0
        assert json.loads(out)["state"] != "valid"
        code, out, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=cli_env)
        assert code == 0, err
        code, out, err = await cli("status", env=cli_env)
        assert (code, json.loads(out)["state"]) == (0, "valid")
        async with store(pg_url, portal=emulator.base_url, client_id=CLIENT_ID) as s:
            assert (await s.load()).generation == 1
        bad = {**cli_env, "SIDECAR_DB_FILE": "", "SIDECAR_DB": pg_url.replace(password, "x" * 12)}
        code, out, err = await cli("status", env=bad)
        assert code != 0
        assert "authentication failed" in err
        assert "x" * 12 not in err + out


class TestMigrate:
    async def test_a_sqlite_authorization_moves_in_and_serves_without_a_new_approval(
        self, env: dict[str, str], pg_server: Server, pg_url: str, emulator: Emulator,
        tmp_path: Path,
    ) -> None:
        """`migrate --to-file` copies the SQLite store's pair into the database (the password in
        neither argv nor output); a `run` process on the URL then serves calls with it."""
        code, out, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=env)
        assert code == 0, err
        (tmp_path / "db-url").write_text(pg_url + "\n")
        args = ("migrate", "--to-file", str(tmp_path / "db-url"))
        assert not any(pg_server.password in arg for arg in args)
        code, out, err = await cli(*args, env=env)
        assert code == 0, err
        assert pg_server.password not in out + err
        moved = json.loads(out)
        assert moved["moved"] is True
        assert (moved["portal"], moved["generation"], moved["state"]) == (
            emulator.base_url, 1, "valid")
        assert moved["member_id"] == emulator.member_id
        async with (
            store(pg_url, portal=emulator.base_url, client_id=CLIENT_ID) as s,
            TokenStore(Path(env["SIDECAR_DB"]), portal=emulator.base_url,
                       client_id=CLIENT_ID) as sqlite,
        ):
            there, here = await s.load(), await sqlite.load()
        assert there.pair is not None
        assert (there.pair, there.generation) == (here.pair, here.generation)

        async with running({**env, "SIDECAR_DB": pg_url}) as sidecar:
            status, body = await get(f"{sidecar.base}/rest/profile")
            assert status == 200, body
            status, body = await get(f"{sidecar.admin}/status")
            assert (status, body["state"]) == (200, "valid"), body
        assert emulator.stats.token_requests["authorization_code"] == 1
        assert emulator.stats.token_requests["refresh_token"] == 0

    async def test_a_running_sqlite_sidecar_stops_renewing_once_moved(
        self, env: dict[str, str], pg_server: Server, pg_url: str, emulator: Emulator,
    ) -> None:
        """The single replica still runs on the SQLite store while `migrate --to-file -`
        (the URL on standard input, as `kubectl exec -i` passes it) moves its authorization:
        it takes the move in within seconds, stops serving and never renews again, so the
        refresh token the fleet now holds is spent by nobody else; readiness and the calls'
        503 say where the authorization went. A second migrate is refused."""
        code, out, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=env)
        assert code == 0, err
        async with running(env) as old:
            status, body = await get(f"{old.base}/rest/profile")
            assert status == 200, body
            code, out, err = await cli("migrate", "--to-file", "-", env=env,
                                       stdin=pg_url + "\n")
            assert code == 0, err
            assert pg_server.password not in out + err
            shown = json.loads(out)["to"]
            assert shown in pg_url.replace(f":{pg_server.password}", "")

            deadline = time.monotonic() + 10
            while True:
                status, ready = await get(f"{old.admin}/readyz")
                if status == 503:
                    break
                assert time.monotonic() < deadline, ready
                await asyncio.sleep(0.2)
            assert ready["reason"].startswith("moved: the authorization was moved to "), ready
            assert shown in ready["reason"]
            emulator.expire_access_tokens()
            status, body = await get(f"{old.base}/rest/profile")
            assert status == 503, body
            assert "moved to" in body["error_description"], body
            await asyncio.sleep(2.0)  # its schedule would have renewed the expired token
            assert emulator.stats.token_requests["refresh_token"] == 0
            assert pg_server.password not in "".join(old.lines)

            # The fleet renews the pair it was given.
            async with running({**env, "SIDECAR_DB": pg_url}) as new:
                status, body = await get(f"{new.base}/rest/profile")
                assert status == 200, body
            assert emulator.stats.token_requests["refresh_token"] == 1
        code, out, err = await cli("migrate", "--to-file", "-", env=env, stdin=pg_url)
        assert code == 1
        assert "already moved to" in err, err
        assert pg_server.password not in out + err

    async def test_a_newer_authorization_in_the_database_is_kept_unless_forced(
        self, env: dict[str, str], pg_server: Server, pg_url: str, emulator: Emulator,
    ) -> None:
        """The replicas renewed the pair since (a newer generation): migrate refuses and says
        so; --force replaces it with a generation the replicas see as new."""
        code, out, err = await cli("authorize", emulator.issue_code(CLIENT_ID), env=env)
        assert code == 0, err
        async with TokenStore(Path(env["SIDECAR_DB"]), portal=emulator.base_url,
                              client_id=CLIENT_ID) as sqlite:
            here = (await sqlite.load()).pair
        assert here is not None
        async with (
            store(pg_url, portal=emulator.base_url, client_id=CLIENT_ID) as s,
            s.locked(),
        ):
            # What the replicas would hold had they renewed twice (generation 2).
            await s.save_pair(replace(here, access_token="renewed-1"))
            await s.save_pair(replace(here, access_token="renewed-2"))
        code, out, err = await cli("migrate", "--to", pg_url, env=env)
        assert code == 1
        assert out == ""
        assert "already holds" in err
        assert "generation 2" in err
        assert "--force" in err
        assert pg_server.password not in err
        code, out, err = await cli("migrate", "--to", pg_url, "--force", env=env)
        assert code == 0, err
        assert json.loads(out)["generation"] == 3

    async def test_nothing_to_move_and_a_url_source_are_refused(
        self, env: dict[str, str], pg_url: str,
    ) -> None:
        """No SQLite store, or SIDECAR_DB already a URL: a clear refusal, nothing written."""
        code, out, err = await cli("migrate", "--to", pg_url, env=env)
        assert (code, out) == (1, "")
        assert "nothing to move" in err
        code, out, err = await cli("migrate", "--to", pg_url, env={**env, "SIDECAR_DB": pg_url})
        assert code == 2
        assert "SQLite" in err


class TestNotify:
    async def test_a_new_pair_reaches_another_sidecar_at_once(
        self, pg_url: str, emulator: Emulator, make_settings: Callable[..., Settings],
    ) -> None:
        """One sidecar renews; the other, polling only every 10 s, adopts the new pair within
        a second or two: only the commit's NOTIFY can wake it so soon."""
        settings = make_settings(db_path=pg_url)
        async with (
            store(pg_url, portal=emulator.base_url, client_id=CLIENT_ID) as one_store,
            store(pg_url, portal=emulator.base_url, client_id=CLIENT_ID) as two_store,
            oauth_session() as http,
        ):
            one = Authorization(one_store, make_oauth(http, settings), settings,
                                watch_interval=10.0)
            two = Authorization(two_store, make_oauth(http, settings), settings,
                                watch_interval=10.0)
            await one.authorize(emulator.issue_code(CLIENT_ID))
            await two.start()
            assert two.life.stored.generation == 1
            watch = asyncio.create_task(two.run_watch())
            try:
                await asyncio.sleep(0.5)  # the watch reads its first version, the listener connects
                held = one.pair
                assert held is not None
                started = time.monotonic()
                renewed = await one.refresh(held.access_token, trigger="test")
                async with asyncio.timeout(3.0):
                    while two.life.stored.generation != 2:
                        two.renewal.changed.clear()  # set by every adoption
                        await two.renewal.changed.wait()
                took = time.monotonic() - started
                assert two.pair == renewed
                assert took < 2.0
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
                await one.aclose()


async def until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Wait for ``condition`` to hold, looking every 0.2 s; fail after ``seconds``."""
    for _ in range(int(seconds / 0.2)):
        if condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the condition did not come true in time")


class TestFleetAlerts:
    async def test_one_failing_and_one_recovered_alert_for_three_sidecars(
        self, env: dict[str, str], pg_url: str, emulator: Emulator, alert_sink: AlertSink,
    ) -> None:
        """The OAuth server fails while three sidecars renew every 2 s: each of them fails,
        the webhook gets one token_refresh_failing; after the fix, one recovered, and every
        /status names the replica that renewed last."""
        alerts = alert_sink.alerts
        events = alert_sink.events
        fleet_env = {**env, "SIDECAR_DB": pg_url, "SIDECAR_REFRESH_INTERVAL": "2s",
                     "SIDECAR_ALERT_WEBHOOK": alert_sink.url}

        def failed(sidecar: Running) -> bool:
            return any(e["event"] == "token_refresh_failed" for e in sidecar.events())

        try:
            async with contextlib.AsyncExitStack() as stack:
                fleet = [await stack.enter_async_context(running(
                    {**fleet_env, "SIDECAR_REPLICA_ID": "replica-0",
                     "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}))]
                fleet += [await stack.enter_async_context(running(
                    {**fleet_env, "SIDECAR_REPLICA_ID": f"replica-{n}"})) for n in (1, 2)]
                emulator.oauth_failure = "500"
                await until(lambda: all(failed(sidecar) for sidecar in fleet))
                await asyncio.sleep(0.5)  # deliveries in flight
                assert len(events("token_refresh_failing")) == 1, alerts
                emulator.oauth_failure = None
                await until(lambda: bool(events("token_refresh_recovered")))
                await asyncio.sleep(3.0)  # the others adopt the pair; renewals go on
                assert len(events("token_refresh_failing")) == 1, alerts
                assert len(events("token_refresh_recovered")) == 1, alerts
                renewers = set()
                for sidecar in fleet:
                    status, body = await get(f"{sidecar.admin}/status")
                    assert status == 200, body
                    renewers.add(body["last_refresh_by"])
                assert renewers <= {"replica-0", "replica-1", "replica-2"}
                assert None not in renewers
        finally:
            emulator.oauth_failure = None
