"""Correctness review of marketplace mode: the Redactor's word lookup, the registry's watch and
the one renewal schedule, over real SQLite stores and the emulator."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.app import PORTALS, create_admin_app, create_app
from sidecar.config import Settings
from sidecar.logging import REDACTED, Redactor
from sidecar.registry import Portals
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
