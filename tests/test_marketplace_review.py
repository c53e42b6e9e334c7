"""Correctness review of marketplace mode: the Redactor's word lookup, the registry's watch and
the one renewal schedule, over real SQLite stores and the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.app import PORTALS, create_admin_app, create_app
from sidecar.config import Settings
from sidecar.logging import REDACTED, Redactor
from sidecar.registry import Portals
from sidecar.scheduler import Scheduler
from tests.conftest import CLIENT_ID
from tests.test_marketplace import Market, Sidecar, host, market, market_settings

__all__ = ["market", "market_settings"]  # fixtures, shared with tests/test_marketplace.py


class TestRedactorShapes:
    """Every shape the old alternation of known tokens hid is hidden by the word lookup too."""

    @pytest.mark.parametrize("shape", [
        "%22{t}%22",  # inside URL-encoded JSON quotes: the hex digits of %22 touch the token
        "redirect=x%3Fauth%3D{t}%26y",  # a URL-encoded query inside another URL
        "'line\\n{t}'",  # a repr'd string with an escaped newline before the token
        "{t}_{t}",  # two tokens joined by a word character
        "x{t}",  # any word character before it
        "{t}0",  # or after it
    ])
    def test_a_token_touching_word_characters_is_hidden(self, shape: str) -> None:
        """A known token is hidden wherever it stands, not only as a whole run of word
        characters; the text around it is kept."""
        redactor = Redactor()
        token = secrets.token_hex(34)  # the emulator's (and Bitrix24's) token shape
        redactor.add(secrets.token_hex(34))
        redactor.add(token)
        text = redactor.redact(shape.format(t=token))
        assert token not in text
        assert text == shape.format(t=REDACTED)

    def test_text_without_tokens_is_kept(self) -> None:
        """Words that merely share a token's first characters stay as they are."""
        redactor = Redactor()
        token = "abcdef0123456789abcdef"
        redactor.add(token)
        text = "abcdef0123 abcdef0123456789abcdeX xabcdef0123456789abcde"
        assert redactor.redact(text) == text


@pytest.fixture
def start_quiet(aiohttp_client: Callable[..., Any],
                market_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """Start a marketplace sidecar whose own watch waits an hour (the test runs it by hand)."""

    async def started(**env: str) -> tuple[Sidecar, Portals]:
        app = create_app(market_settings(**env), watch_interval=3600)
        proxy = await aiohttp_client(app)
        admin = await aiohttp_client(create_admin_app(app))
        return Sidecar(proxy, admin), app[PORTALS]

    return started


class TestWatchRaces:
    async def test_a_portal_another_process_added_is_built_once_beside_an_install(
        self, market: Market, start_quiet: Callable[..., Any]
    ) -> None:
        """Another replica stores portal B while this one adopts B (the same install reaching
        both): the watch finds B new at the same moment; one bundle serves B, the install's,
        and the schedule renews that one (a second bundle would replace it, unclosed)."""
        first, portals = await start_quiet()
        second, _ = await start_quiet()
        assert (await second.install(market.b))[0] == 200
        stored = await portals.store.authorization(market.b.member_id, "").load()
        assert stored.pair is not None
        _, (adopted, built) = await asyncio.gather(portals._watch_once(),
                                                   portals.adopt(stored.pair))
        assert built
        assert portals.find(market.b.member_id.lower()) is adopted
        assert [portal.key for portal in portals] == [market.b.member_id]
        assert portals.scheduler._held[market.b.member_id] is adopted.tokens
        assert (await first.call(f"/portal/{host(market.b)}/rest/profile"))[0] == 200


class Due:
    """A portal's schedule as the scheduler sees it: due at ``due``; counts its renewals."""

    def __init__(self, due: float) -> None:
        self.due = due
        self.renewed = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def next_due(self) -> float:
        """When it is due."""
        return self.due

    async def renew(self, trigger: str) -> object:
        """Renew: held until the test releases it."""
        self.renewed += 1
        self.started.set()
        await self.release.wait()
        self.due = float("inf")
        return None


class TestScheduler:
    @pytest.mark.parametrize("later", [float("inf"), 3600.0])
    async def test_a_renewal_waiting_for_a_slot_is_not_started_once_no_longer_due(
        self, later: float
    ) -> None:
        """A portal due now waits for a free slot; meanwhile a call renews it (due later) or
        its pair goes (an uninstall seen by the watch: never due). When the slot frees, it is
        not renewed again: a wasted refresh, or with no pair a crash that holds the slot."""
        clock = time.time
        scheduler = Scheduler(rate=0, clock=clock, parallel=1)
        first, second = Due(clock() - 2), Due(clock() - 1)
        scheduler.add("first", first)
        scheduler.add("second", second)
        running = asyncio.create_task(scheduler.run())
        try:
            await asyncio.wait_for(first.started.wait(), 5)
            await asyncio.sleep(0.05)  # the second is taken from the heap, waiting for the slot
            second.due = clock() + later if later != float("inf") else later
            first.release.set()
            for _ in range(100):
                if not scheduler._busy and first.renewed and not scheduler._running:
                    break
                await asyncio.sleep(0.01)
            assert (first.renewed, second.renewed) == (1, 0)
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running


class TestBounded:
    async def test_on_demand_renewals_leave_one_entry_in_the_schedule(
        self, market: Market, start_quiet: Callable[..., Any]
    ) -> None:
        """On-demand mode (SIDECAR_REFRESH_INTERVAL=0), the one for thousands of portals: a
        called portal renews about hourly, and each renewal moves its keep-alive 20 days on.
        The schedule keeps one entry per portal, not one per renewal for 20 days (1,000 per
        active portal, hundreds of MiB with a few thousand)."""
        sidecar, portals = await start_quiet(SIDECAR_REFRESH_INTERVAL="0")
        assert (await sidecar.install(market.a))[0] == 200
        held = portals.find(market.a.member_id.lower())
        assert held is not None
        tokens = held.tokens
        for _ in range(30):
            pair = tokens.pair
            assert pair is not None
            await tokens.refresh(pair.access_token, trigger="on_demand")
        await portals._watch_once()  # the watch reads its own writes back, too
        assert len(portals.scheduler._heap) <= 2
        assert (await sidecar.call(f"/portal/{host(market.a)}/rest/profile"))[0] == 200


class TestUninstall:
    async def test_an_uninstalled_portals_pair_held_only_in_memory_is_not_written_back(
        self, market: Market, start_quiet: Callable[..., Any], tmp_path: Path
    ) -> None:
        """A's newest pair is held only in memory (the store refused its write during an
        outage, and the watch has not written it yet) when A's uninstall arrives: the removal
        clears A's secrets, and closing A's authorization must not write the pair back (the
        row would be served again by every replica and after a restart)."""
        sidecar, portals = await start_quiet()
        assert (await sidecar.install(market.a))[0] == 200
        held = portals.find(market.a.member_id.lower())
        assert held is not None
        tokens = held.tokens
        # The state a failed write leaves (sidecar.authorization: keep_unsaved after a
        # StoreError on save_pair), with the store answering again.
        tokens.sync_state.keep_unsaved(tokens.life.stored.generation)
        status, body = await market.a.send_uninstall_event(sidecar.url("/oauth/install"),
                                                           CLIENT_ID)
        assert status == 200, body
        with sqlite3.connect(tmp_path / "tokens.db") as raw:
            row = raw.execute("SELECT access_token, refresh_token, removed_at FROM "
                              "authorizations WHERE key = ?", (market.a.member_id,)).fetchone()
        assert row[:2] == (None, None)
        assert row[2] is not None
        again, _ = await start_quiet()
        assert (await again.call(f"/portal/{host(market.a)}/rest/profile"))[0] == 404

    async def test_a_pair_held_only_in_memory_does_not_undo_another_replicas_uninstall(
        self, market: Market, start_quiet: Callable[..., Any], tmp_path: Path
    ) -> None:
        """The same, with the uninstall handled by another replica on the same store: this
        one's watch (which writes unsaved pairs first) drops A and writes nothing back."""
        first, portals = await start_quiet()
        assert (await first.install(market.a))[0] == 200
        second, _ = await start_quiet()
        held = portals.find(market.a.member_id.lower())
        assert held is not None
        held.tokens.sync_state.keep_unsaved(held.tokens.life.stored.generation)
        status, body = await market.a.send_uninstall_event(second.url("/oauth/install"),
                                                           CLIENT_ID)
        assert status == 200, body
        await portals._watch_once()
        with sqlite3.connect(tmp_path / "tokens.db") as raw:
            row = raw.execute("SELECT access_token, refresh_token, removed_at FROM "
                              "authorizations WHERE key = ?", (market.a.member_id,)).fetchone()
        assert row[:2] == (None, None)
        assert row[2] is not None
        assert portals.find(market.a.member_id.lower()) is None
