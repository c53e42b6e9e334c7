"""The token store: a real SQLite file, permissions, persistence, generations, the lock."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest

from sidecar.errors import StoreError
from sidecar.grants import (
    LINK_TTL,
    install_window,
    issue_link,
    open_install_window,
    take_install_window,
    take_link,
)
from sidecar.storage import TokenPair
from sidecar.store import _GRANTS, _SCHEMA, SCHEMA_VERSION, TokenStore

PORTAL = "https://corp.bitrix24.com"


def pair(n: int) -> TokenPair:
    """Return a distinct pair."""
    return TokenPair(
        access_token=f"access-{n}", refresh_token=f"refresh-{n}", expires_at=1000.0 + n,
        scope="crm,user", member_id="m1", client_endpoint=f"{PORTAL}/rest/",
        application_token=f"app-{n}", obtained_at=float(n),
    )


def store(path: Path, portal: str = PORTAL, client_id: str = "local.1") -> TokenStore:
    """Open a store on ``path``."""
    return TokenStore(path, portal=portal, client_id=client_id)


class TestFile:
    async def test_created_with_mode_0600(self, tmp_path: Path) -> None:
        """A new store file is readable by its owner only."""
        path = tmp_path / "sub" / "tokens.db"
        async with store(path):
            pass
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    async def test_unopenable_path_is_a_store_error(self, tmp_path: Path) -> None:
        """A path that cannot hold a database fails with a StoreError that names it."""
        (tmp_path / "dir.db").mkdir()
        with pytest.raises(StoreError, match=r"dir\.db"):
            async with store(tmp_path / "dir.db"):
                pass


class TestPair:
    async def test_empty_store_holds_no_pair(self, tmp_path: Path) -> None:
        """A new store answers with no pair and generation 0."""
        async with store(tmp_path / "t.db") as s:
            state = await s.load()
        assert state.pair is None
        assert state.generation == 0

    async def test_saved_pair_survives_reopening(self, tmp_path: Path) -> None:
        """What is saved is what a new connection loads, field by field."""
        async with store(tmp_path / "t.db") as s:
            generation = await s.save_pair(pair(1))
        async with store(tmp_path / "t.db") as s:
            state = await s.load()
        assert state.pair == pair(1)
        assert state.generation == generation == 1

    async def test_each_save_bumps_the_generation_and_clears_errors(self, tmp_path: Path) -> None:
        """A new pair moves the generation on and ends a re-authorization state."""
        async with store(tmp_path / "t.db") as s:
            await s.save_pair(pair(1))
            await s.record_error("invalid_grant", reauth_required=True)
            assert (await s.load()).reauth_required
            assert await s.save_pair(pair(2)) == 2
            state = await s.load()
        assert state.pair == pair(2)
        assert not state.reauth_required
        assert state.last_error == ""

    async def test_pair_of_another_portal_is_ignored(self, tmp_path: Path) -> None:
        """A store written for another portal or app is not used as ours."""
        async with store(tmp_path / "t.db") as s:
            await s.save_pair(pair(1))
        async with store(tmp_path / "t.db", portal="https://other.bitrix24.com") as s:
            await s.record_error("boom", reauth_required=True)
            state = await s.load()
        assert state.pair is None
        assert PORTAL in state.foreign
        async with store(tmp_path / "t.db") as s:
            state = await s.load()
        assert state.pair == pair(1), "an error note of another portal must not touch ours"
        assert not state.reauth_required


class TestLock:
    async def test_lock_serializes_two_connections(self, tmp_path: Path) -> None:
        """A second writer waits for the first to commit, then sees its pair under the lock."""
        path = tmp_path / "t.db"
        async with store(path) as first, store(path) as second:
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

            await asyncio.gather(hold(), wait())
        assert order == ["first committed", "second entered"]

    async def test_error_inside_lock_rolls_back(self, tmp_path: Path) -> None:
        """A failure inside the locked block leaves the stored pair as it was."""
        async with store(tmp_path / "t.db") as s:
            await s.save_pair(pair(1))

            async def fail_inside_lock() -> None:
                async with s.locked():
                    await s.save_pair(pair(2))
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError):
                await fail_inside_lock()
            assert (await s.load()).pair == pair(1)

    async def test_data_version_moves_on_another_connections_commit(self, tmp_path: Path) -> None:
        """The watcher's change signal moves when another connection writes."""
        path = tmp_path / "t.db"
        async with store(path) as watcher, store(path) as writer:
            before = await watcher.data_version()
            await writer.save_pair(pair(1))
            assert await watcher.data_version() != before


class TestGrants:
    @pytest.mark.parametrize("version", [1, 2])
    async def test_an_older_store_migrates_in_place_and_keeps_its_pair(
        self, tmp_path: Path, version: int
    ) -> None:
        """A file a previous release left (version 1: one row, no grants; version 2: grants)
        migrates in place: its pair, generation and error stay, under the single portal's key,
        so a single-portal sidecar goes on with no new approval."""
        path = tmp_path / "old.db"
        old = pair(1)
        with sqlite3.connect(path) as raw:  # as the previous release left it
            raw.execute(_SCHEMA)
            if version == 2:
                raw.execute(_GRANTS)
            raw.execute(
                "INSERT INTO token (id, portal, client_id, access_token, refresh_token, "
                "expires_at, scope, member_id, client_endpoint, application_token, obtained_at, "
                "generation, last_error, updated_at) VALUES (1, ?, 'local.1', ?, ?, ?, ?, ?, ?, "
                "?, ?, 7, 'an old error', 5.0)",
                (PORTAL, old.access_token, old.refresh_token, old.expires_at, old.scope,
                 old.member_id, old.client_endpoint, old.application_token, old.obtained_at))
            raw.execute(f"PRAGMA user_version = {version}")
        async with store(path) as db:
            loaded = await db.load()
            assert (loaded.pair, loaded.generation, loaded.last_error) == (
                old, 7, "an old error")
            secret = await issue_link(db)
            assert await take_link(db, secret)
            assert [(e.key, e.portal, e.state.pair) for e in await db.entries()] == [
                ("", PORTAL, old)]
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master")}
            assert "token" not in tables

    async def test_a_link_works_once_within_its_time_and_is_stored_only_as_a_digest(
        self, tmp_path: Path
    ) -> None:
        """Taken once; unknown, used and expired links are refused; the file never holds it."""
        async with store(tmp_path / "t.db") as db:
            secret = await issue_link(db, now=1000.0)
            assert not await take_link(db, "made-up", now=1001.0)
            assert await take_link(db, secret, now=1001.0)
            assert not await take_link(db, secret, now=1002.0)
            late = await issue_link(db, now=1000.0)
            assert not await take_link(db, late, now=1000.0 + LINK_TTL + 1)
        assert secret.encode() not in (tmp_path / "t.db").read_bytes()

    async def test_an_install_window_is_seen_by_another_process_and_used_once(
        self, tmp_path: Path
    ) -> None:
        """The CLI's window (another connection) is visible, left open by a look, gone once used."""
        async with store(tmp_path / "t.db") as cli, store(tmp_path / "t.db") as server:
            assert await install_window(server) is None
            await open_install_window(cli, "7")
            window = await install_window(server)
            assert window is not None
            assert window.admits("7")
            assert not window.admits("1")
            assert not window.admits("")
            assert await install_window(server) == window
            assert await take_install_window(server) == window
            assert await take_install_window(server) is None


class TestManyAuthorizations:
    """One file holds an authorization per portal (marketplace mode), each under its key."""

    async def test_each_key_has_its_own_pair_generation_and_error(self, tmp_path: Path) -> None:
        """Saving or failing one portal's authorization leaves the others' untouched."""
        async with store(tmp_path / "t.db") as db:
            a = db.authorization("member-a", "https://a.example.com")
            b = db.authorization("member-b", "https://b.example.com")
            async with a.locked() as held:
                assert held.pair is None
                assert await a.save_pair(pair(1)) == 1
            async with b.locked():
                assert await b.save_pair(pair(2)) == 1
            async with a.locked():
                assert await a.save_pair(pair(3)) == 2
                await b.record_error("b failed", reauth_required=True)
            assert (await a.load()).pair == pair(3)
            loaded = await b.load()
            assert (loaded.pair, loaded.generation, loaded.reauth_required,
                    loaded.last_error) == (pair(2), 1, True, "b failed")
            # The single portal's row is another key again.
            assert (await db.load()).pair is None
            assert [(e.key, e.portal, e.state.generation) for e in await db.entries()] == [
                ("member-a", "https://a.example.com", 2),
                ("member-b", "https://b.example.com", 1)]

    async def test_changes_since_names_what_was_written_in_order(self, tmp_path: Path) -> None:
        """One watch finds the few rows that changed among many: by the store-wide order."""
        async with store(tmp_path / "t.db") as db:
            start, changed = await db.changes_since(0)
            assert (start, changed) == (0, [])
            for n, key in enumerate(["x", "y", "z"], 1):
                async with db.authorization(key, f"https://{key}.example.com").locked():
                    await db.authorization(key, f"https://{key}.example.com").save_pair(pair(n))
            seq, changed = await db.changes_since(start)
            assert changed == ["x", "y", "z"]
            async with db.authorization("y", "https://y.example.com").locked():
                await db.authorization("y", "https://y.example.com").record_error(
                    "failed", reauth_required=False)
            newest, changed = await db.changes_since(seq)
            assert changed == ["y"]
            assert newest > seq
            assert await db.changes_since(newest) == (newest, [])

    async def test_a_removed_authorization_keeps_no_secret_and_is_not_listed(
        self, tmp_path: Path
    ) -> None:
        """An uninstall clears the pair and the application token from the file; a later
        install of the same portal takes the row again."""
        path = tmp_path / "t.db"
        async with store(path) as db:
            a = db.authorization("member-a", "https://a.example.com")
            async with a.locked():
                await a.save_pair(pair(1))
            seq, _ = await db.changes_since(0)
            async with a.locked():
                await a.remove("uninstalled")
            assert await db.changes_since(seq) == (seq + 1, ["member-a"])
            loaded = await a.load()
            assert (loaded.pair, loaded.reauth_required, loaded.last_error) == (
                None, True, "uninstalled")
            assert await db.entries() == []
            with sqlite3.connect(path) as raw:
                row = raw.execute("SELECT access_token, refresh_token, application_token "
                                  "FROM authorizations WHERE key = 'member-a'").fetchone()
            assert row == (None, None, "")
            async with a.locked():
                assert await a.save_pair(pair(2)) == 2
            assert [e.key for e in await db.entries()] == ["member-a"]

    async def test_another_apps_row_is_foreign_under_any_key(self, tmp_path: Path) -> None:
        """A row written for another client id is not taken as ours, whatever its key."""
        path = tmp_path / "t.db"
        async with store(path, client_id="local.other") as db:
            other = db.authorization("member-a", "https://a.example.com")
            async with other.locked():
                await other.save_pair(pair(1))
        async with store(path) as db:
            loaded = await db.authorization("member-a", "https://a.example.com").load()
            assert loaded.pair is None
            assert "local.other" in loaded.foreign

    async def test_grants_are_the_apps_whichever_authorization_is_asked(
        self, tmp_path: Path
    ) -> None:
        """A start link issued through one portal's view is the app's: any view uses it once."""
        async with store(tmp_path / "t.db") as db:
            secret = await issue_link(db.authorization("member-a", "https://a.example.com"))
            assert await take_link(db.authorization("member-b", "https://b.example.com"), secret)
            assert not await take_link(db, secret)
