"""When an authorization is renewed, and what a failed renewal costs: backoff, episodes, alerts.

``Renewal`` does no I/O of its own but alerts: it records outcomes in the authorization's
``Life`` and says when the next renewal is due; ``run_schedule`` is the loop that acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sidecar.alerts import Alerter
from sidecar.authinfo import authorize_url, how_to_authorize, iso
from sidecar.config import Settings
from sidecar.errors import OAuthError, SidecarError
from sidecar.metrics import Metrics
from sidecar.oauth import client_error
from sidecar.states import Life, State

# With SIDECAR_REFRESH_INTERVAL=0 the pair is still renewed this often, so an idle sidecar's
# refresh token (180 days, 28 in older docs) never dies unused.
IDLE_RENEWAL = 20 * 86400.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0
# Whatever the server says of lifetimes, never renew more than once a second.
MIN_GAP = 1.0

log = structlog.get_logger("sidecar.renewal")


@dataclass
class Episode:
    """A run of failed renewals, from the first failure to the next success."""

    first_failure_at: float
    attempts: int = 0
    reauth_alerted: bool = False


class Renewal:
    """One authorization's renewal schedule, backoff and failure episode."""

    def __init__(self, life: Life, settings: Settings, metrics: Metrics, alerts: Alerter,
                 clock: Callable[[], float]) -> None:
        self._life = life
        self._settings = settings
        self._metrics = metrics
        self._alerts = alerts
        self._clock = clock
        self.episode: Episode | None = None
        self.last_attempt_at = 0.0
        self.refreshes = 0  # successful renewals by this process
        self._changed: asyncio.Event | None = None
        # Marketplace mode: the one scheduler of every portal is told instead of a loop each.
        self.on_change: Callable[[], None] | None = None
        # Where in the interval this authorization renews, 0..1 (0: at its end, as one portal
        # always has): many portals' renewals spread over the interval instead of bunching.
        self.spread = 0.0

    @property
    def changed(self) -> asyncio.Event:
        """Set whenever the schedule may have moved (made when a loop first waits on it: the
        one scheduler of many portals is told through ``on_change`` instead)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def touch(self) -> None:
        """The schedule may have moved: wake whoever waits on it."""
        if self._changed is not None:
            self._changed.set()
        if self.on_change is not None:
            self.on_change()

    def attempted(self, at: float) -> None:
        """A renewal starts at ``at`` (none starts within MIN_GAP of it)."""
        self.last_attempt_at = at

    def succeeded(self) -> None:
        """A renewal of this process brought a new pair."""
        self.refreshes += 1

    def next_due(self) -> float:
        """Return when the pair should next be renewed (``inf``: never)."""
        life = self._life
        pair = life.pair
        if pair is None or life.state.dead or life.state is State.NOT_AUTHORIZED:
            return float("inf")
        if life.failures:
            return life.next_attempt_at
        interval = self._settings.refresh_interval
        if interval <= 0:
            due = pair.obtained_at + IDLE_RENEWAL
        else:
            lifetime = max(pair.expires_at - pair.obtained_at, 0.0)
            early = min(BACKOFF_MAX, lifetime * 0.1)
            due = min(pair.obtained_at + interval * (1.0 - 0.5 * self.spread),
                      pair.expires_at - early)
        return max(due, self.last_attempt_at + MIN_GAP)

    def backoff(self) -> float:
        """Return how long to wait after the next failure (doubling, jittered)."""
        delay: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** self._life.failures)
        return delay * random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not cryptography

    def failed(self, error: OAuthError, trigger: str, *, alert: bool | None = None,
               delay: float | None = None) -> None:
        """Record a failed renewal: back off, open or extend the episode, alert once.

        ``alert``: whether this failure opens the replicas' shared episode (None: decide alone).
        ``delay``: the backoff already chosen (the fleet's retry time), else one is drawn.
        """
        life = self._life
        if delay is None:
            delay = self.backoff()
        now = self._clock()
        client_rejected = client_error(error)
        if not life.refresh_failed(error.description, now=now, permanent=error.permanent,
                                   client_rejected=client_rejected, retry_at=now + delay):
            log.info("token_refresh_outcome_ignored", trigger=trigger, error=error.error,
                     detail="the pair changed while the renewal ran")
            return
        self.note_failure(error, trigger, retry_in=delay, alert=alert)

    def note_failure(self, error: OAuthError, trigger: str, *, retry_in: float = 0.0,
                     alert: bool | None = None) -> None:
        """Tell metrics, the episode, alerts and the log of a failure ``Life`` has recorded."""
        life = self._life
        self._metrics.refresh_failing.set(1)
        self._metrics.refresh_failures.set(life.failures)
        opened = self.episode is None
        if self.episode is None:
            self.episode = Episode(first_failure_at=self._clock())
        self.episode.attempts += 1
        due = opened or (life.state.dead and not self.episode.reauth_alerted)
        if due if alert is None else alert:
            self._alert("token_refresh_failing" if opened or not life.state.dead
                        else "token_reauthorization_required", error=error)
        self.touch()
        if life.state.dead:
            self.episode.reauth_alerted = True
            self._metrics.reauthorization_required.set(1)
            log.error("reauthorization_required", trigger=trigger, error=error.error,
                      description=error.description, hint=how_to_authorize(self._settings))
            return
        log.warning("token_refresh_failed", trigger=trigger, error=error.error,
                    description=error.description, attempt=life.failures,
                    retry_in=round(retry_in, 1))

    def recovered(self, *, alert: bool | None = None, since: float | None = None) -> None:
        """Close an open failure episode after a success.

        ``alert``: whether this success closed the replicas' shared episode (begun at
        ``since``); None: alert if this process had one open.
        """
        self._metrics.refresh_failing.set(0)
        self._metrics.refresh_failures.set(0)
        self._metrics.reauthorization_required.set(0)
        if self.episode is not None if alert is None else alert:
            if self.episode is None:
                self.episode = Episode(first_failure_at=since or self._clock())
            self._alert("token_refresh_recovered")
        self.episode = None

    def status(self) -> dict[str, Any]:
        """Describe the renewal for ``status``."""
        due = self.next_due()
        return {
            "failing": self.episode is not None,
            "consecutive_failures": self._life.failures,
            "failing_since": iso(self.episode.first_failure_at) if self.episode else None,
            "next_attempt_at": iso(due) if due < float("inf") else None,
            "refreshes_by_this_process": self.refreshes,
        }

    def _alert(self, event: str, *, error: OAuthError | None = None) -> None:
        episode = self.episode
        assert episode is not None
        life = self._life
        pair = life.pair
        payload: dict[str, Any] = {
            "event": event,
            "portal": self._settings.portal,
            "client_id": self._settings.client_id,
            "state": "reauthorization_required" if life.state.dead else "refresh_failing",
            "first_failure_at": iso(episode.first_failure_at),
            "attempts": episode.attempts,
            "token_expires_at": iso(pair.expires_at) if pair else None,
        }
        if error is not None:
            payload["error"] = error.error
            payload["error_description"] = error.description
        if life.state.dead:
            payload["authorize_url"] = authorize_url(self._settings)
        if event == "token_refresh_recovered":
            payload["recovered_at"] = iso(self._clock())
            payload["duration_seconds"] = round(self._clock() - episode.first_failure_at, 3)
        self._alerts.send(payload)


async def run_schedule(renewal: Renewal, renew: Callable[[str], Awaitable[object]],
                       clock: Callable[[], float]) -> None:
    """Renew when due, forever; wake early whenever the schedule may have moved."""
    trigger = "startup"
    while True:
        renewal.changed.clear()
        delay = renewal.next_due() - clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(renewal.changed.wait(),
                                       None if delay == float("inf") else delay)
            trigger = "schedule"
            continue
        try:
            await renew(trigger)
        except SidecarError:
            pass  # logged and backed off inside; the loop just goes round again
        except Exception:
            # A bug must not end renewals for good: say so loudly and go on, slowly.
            log.exception("token_schedule_error")
            await asyncio.sleep(BACKOFF_MAX / 10)
        trigger = "schedule"
