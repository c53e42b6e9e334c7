"""The token's life against the emulator's OAuth server and a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest

from sidecar.app import make_oauth, oauth_session
from sidecar.authorization import Authorization
from sidecar.config import Settings, parse_duration
from sidecar.emulator import Emulator
from sidecar.errors import NotAuthorized, ReauthorizationRequired, SidecarError, TokenUnavailable
from sidecar.renewal import IDLE_RENEWAL
from sidecar.store import TokenStore
from tests.conftest import CLIENT_ID


@asynccontextmanager
async def manager(
    settings: Settings, *, clock: Callable[[], float] = time.time, watch: float = 0.05
) -> AsyncIterator[Authorization]:
    """Run a started token manager with its own store connection and HTTP session."""
    async with (
        TokenStore(settings.db_path, portal=settings.portal, client_id=settings.client_id)
        as store,
        oauth_session() as http,
    ):
        tokens = Authorization(store, make_oauth(http, settings), settings, clock=clock,
                              watch_interval=watch)
        await tokens.start()
        yield tokens


async def stored_pair(settings: Settings) -> Any:
    """Read the pair as another process would see it."""
    async with TokenStore(settings.db_path, portal=settings.portal,
                          client_id=settings.client_id) as store:
        return (await store.load()).pair


class TestSingleFlight:
    async def test_concurrent_refreshes_make_one_request(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """Fifty callers holding the same stale token share one refresh."""
        async with manager(settings) as tokens:
            stale = tokens.pair
            assert stale is not None
            results = await asyncio.gather(
                *(tokens.refresh(stale.access_token, trigger="auth_error") for _ in range(50))
            )
        assert emulator.stats.token_requests["refresh_token"] == 1
        assert len({r.access_token for r in results}) == 1
        assert results[0].access_token != stale.access_token

    async def test_callers_are_released_after_the_commit(self, settings: Settings) -> None:
        """When refresh returns, the new pair is already durable in the file."""
        async with manager(settings) as tokens:
            assert tokens.pair is not None
            new = await tokens.refresh(tokens.pair.access_token, trigger="auth_error")
            assert await stored_pair(settings) == new

    async def test_a_replaced_token_is_not_refreshed_again(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """A caller whose token was already replaced gets the new one without a request."""
        async with manager(settings) as tokens:
            old = tokens.pair
            assert old is not None
            new = await tokens.refresh(old.access_token, trigger="auth_error")
            again = await tokens.refresh(old.access_token, trigger="auth_error")
        assert again == new
        assert emulator.stats.token_requests["refresh_token"] == 1

    async def test_caller_going_away_does_not_cancel_the_refresh(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """A refresh whose caller is cancelled still completes and is stored."""
        async with manager(settings) as tokens:
            old = tokens.pair
            assert old is not None
            emulator.oauth_slow_seconds = 0.3
            emulator.oauth_failure = "slow"
            caller = asyncio.create_task(tokens.refresh(old.access_token, trigger="auth_error"))
            await asyncio.sleep(0.1)
            caller.cancel()
            await asyncio.sleep(0.5)
            stored = await stored_pair(settings)
        assert stored.access_token != old.access_token
        assert emulator.stats.refresh_ok == 1


class TestFailures:
    async def test_transient_failure_backs_off(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """A 5xx from the OAuth server is retried later, not at every call."""
        now = [time.time()]
        async with manager(settings, clock=lambda: now[0]) as tokens:
            old = tokens.pair
            assert old is not None
            emulator.oauth_failure = "500"
            with pytest.raises(TokenUnavailable):
                await tokens.refresh(old.access_token, trigger="auth_error")
            with pytest.raises(TokenUnavailable, match="next attempt"):
                await tokens.refresh(old.access_token, trigger="auth_error")
            assert emulator.stats.token_requests["refresh_token"] == 1
            status = tokens.status()
            assert status["state"] == "refresh_failing"
            assert status["last_error"]
            emulator.oauth_failure = None
            now[0] += 5  # past the first backoff step (1 s, jittered)
            new = await tokens.refresh(old.access_token, trigger="auth_error")
        assert new.access_token != old.access_token
        assert tokens.status()["state"] == "valid"

    @pytest.mark.parametrize("failure", ["html", "garbage", "reset", "500"])
    async def test_bad_answers_are_transient(
        self, settings: Settings, emulator: Emulator, failure: str
    ) -> None:
        """HTML, non-JSON, dropped connections and 5xx do not end the authorization."""
        async with manager(settings) as tokens:
            assert tokens.pair is not None
            emulator.oauth_failure = failure  # type: ignore[assignment]
            with pytest.raises(TokenUnavailable):
                await tokens.refresh(tokens.pair.access_token, trigger="auth_error")
            assert tokens.status()["state"] == "refresh_failing"

    async def test_dead_refresh_token_needs_a_person_even_after_restart(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """invalid_grant stops refreshing, and the stop survives a restart: no hammering."""
        async with manager(settings) as tokens:
            assert tokens.pair is not None
            emulator.revoke_refresh_tokens()
            with pytest.raises(ReauthorizationRequired, match="authorize"):
                await tokens.refresh(tokens.pair.access_token, trigger="schedule")
            with pytest.raises(ReauthorizationRequired):
                await tokens.get()
            assert tokens.next_due() == float("inf")
        async with manager(settings) as restarted:
            assert restarted.status()["state"] == "reauthorization_required"
            assert "authorize_url" in restarted.status()
            with pytest.raises(ReauthorizationRequired):
                await restarted.get()
        assert emulator.stats.token_requests["refresh_token"] == 1

    async def test_rejected_app_stops_until_restart_with_fixed_settings(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """invalid_client stops refreshing in this process, but is not final across restarts."""
        async with manager(settings) as tokens:
            assert tokens.pair is not None
            emulator.oauth_failure = "invalid_client"
            with pytest.raises(ReauthorizationRequired, match="BITRIX_CLIENT_ID"):
                await tokens.refresh(tokens.pair.access_token, trigger="schedule")
            with pytest.raises(ReauthorizationRequired):
                await tokens.get()
            assert tokens.next_due() == float("inf")
        assert emulator.stats.token_requests["refresh_token"] == 1
        emulator.oauth_failure = None  # the operator fixed the secret and restarted
        async with manager(settings) as restarted:
            assert restarted.pair is not None
            assert restarted.status()["last_error"]
            renewed = await restarted.refresh(restarted.pair.access_token, trigger="schedule")
        assert renewed.access_token != tokens.pair.access_token


class TestSchedule:
    async def test_scheduled_refresh_happens(self, make_settings: Callable[..., Settings],
                                             emulator: Emulator) -> None:
        """With a short interval the background task renews the pair by itself."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID),
                                 refresh_interval="1s")
        async with manager(settings) as tokens:
            task = asyncio.create_task(tokens.run_schedule())
            await asyncio.sleep(2.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert emulator.stats.refresh_ok >= 2
        assert emulator.stats.refresh_rejected == 0

    async def test_due_time_follows_interval_or_expiry(self, make_settings: Callable[..., Settings],
                                                       emulator: Emulator) -> None:
        """The schedule takes the interval, or earlier when the token expires first."""
        settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID))
        async with manager(settings) as tokens:
            pair = tokens.pair
            assert pair is not None
            assert tokens.next_due() == pytest.approx(pair.obtained_at + 25 * 60)
        for interval, expected in [("2h", pair.expires_at - 300), ("0", pair.obtained_at
                                                                       + IDLE_RENEWAL)]:
            async with manager(replace(settings, refresh_interval=_seconds(interval))) as tokens:
                assert tokens.next_due() == pytest.approx(expected)


def _seconds(text: str) -> float:
    return parse_duration(text)


class TestProcesses:
    async def test_a_second_holder_adopts_instead_of_burning_the_token(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """Two holders of one file: the second adopts the first's refresh under the lock."""
        async with manager(settings) as first, manager(replace(settings, auth_code="")) as second:
            old = second.pair
            assert old is not None
            new = await first.refresh(old.access_token, trigger="schedule")
            adopted = await second.refresh(old.access_token, trigger="auth_error")
        assert adopted == new
        assert emulator.stats.token_requests["refresh_token"] == 1
        assert emulator.stats.refresh_rejected == 0

    async def test_a_pair_stored_elsewhere_is_picked_up(
        self, make_settings: Callable[..., Settings], emulator: Emulator
    ) -> None:
        """A running holder with no token notices a pair the CLI stored, without a restart."""
        settings = make_settings()
        async with manager(settings) as running:
            watch = asyncio.create_task(running.run_watch())
            with pytest.raises(NotAuthorized):
                await running.get()
            async with manager(settings) as cli:
                await cli.authorize(emulator.issue_code(CLIENT_ID))
            for _ in range(40):
                if running.current() is not None:
                    break
                await asyncio.sleep(0.05)
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            assert running.current() is not None

    async def test_auth_code_is_used_only_on_an_empty_store(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """BITRIX_AUTH_CODE is exchanged once; later starts keep the stored pair."""
        async with manager(settings) as tokens:
            first = tokens.pair
        async with manager(settings) as tokens:
            assert tokens.pair == first
        assert emulator.stats.token_requests["authorization_code"] == 1


class TestStoreTrouble:
    async def test_locked_store_backs_off_instead_of_hammering(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """When the store's lock cannot be had, renewals back off and the OAuth server is
        left alone."""
        async with manager(settings) as tokens:
            pair = tokens.pair
            assert pair is not None
        async with (
            TokenStore(settings.db_path, portal=settings.portal, client_id=settings.client_id,
                       busy_timeout_ms=200) as store,
            oauth_session() as http,
            TokenStore(settings.db_path, portal=settings.portal,
                       client_id=settings.client_id) as holder,
        ):
            tokens = Authorization(store, make_oauth(http, settings), settings)
            await tokens.start()
            async with holder.locked():  # another process holds the write lock
                with pytest.raises(SidecarError):
                    await tokens.refresh(pair.access_token, trigger="schedule")
                with pytest.raises(TokenUnavailable, match="next attempt"):
                    await tokens.refresh(pair.access_token, trigger="schedule")
                assert tokens.next_due() > time.time()
                assert tokens.status()["refresh"]["failing"]
        assert emulator.stats.token_requests["refresh_token"] == 0


class TestDeletedStore:
    async def test_recreated_store_with_a_newer_pair_is_adopted_not_overwritten(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """When the file is deleted and another holder writes a newer pair into the new file,
        the watcher adopts that pair instead of writing its own (spent) one back."""
        async with manager(settings) as first, manager(replace(settings, auth_code="")) as second:
            old = first.pair
            assert old is not None
            for suffix in ("", "-wal", "-shm"):
                os.unlink(f"{settings.db_path}{suffix}")
            new = await first.refresh(old.access_token, trigger="schedule")  # reopens, saves
            watch = asyncio.create_task(second.run_watch())
            for _ in range(40):
                if second.pair == new:
                    break
                await asyncio.sleep(0.05)
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
            assert second.pair == new
            assert await stored_pair(settings) == new
        assert emulator.stats.refresh_rejected == 0

    async def test_deleted_store_gets_the_held_pair_back(
        self, settings: Settings, emulator: Emulator
    ) -> None:
        """A store deleted under a lone holder is recreated with the pair it holds."""
        async with manager(settings) as tokens:
            held = tokens.pair
            for suffix in ("", "-wal", "-shm"):
                os.unlink(f"{settings.db_path}{suffix}")
            watch = asyncio.create_task(tokens.run_watch())
            for _ in range(40):
                if settings.db_path.exists() and await stored_pair(settings) == held:
                    break
                await asyncio.sleep(0.05)
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        assert await stored_pair(settings) == held
        async with manager(replace(settings, auth_code="")) as restarted:
            assert restarted.pair == held
