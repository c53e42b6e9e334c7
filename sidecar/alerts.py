"""One alarm per failure episode: a JSON POST to ``SIDECAR_ALERT_WEBHOOK`` and a log event."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import structlog

from sidecar.metrics import Metrics

ALERT_TIMEOUT = 10.0
log = structlog.get_logger("sidecar.alerts")


class Alerter:
    """Deliver alert events to a webhook in the background; a failed delivery is only logged."""

    def __init__(
        self, session: aiohttp.ClientSession | None, url: str, metrics: Metrics,
        *, timeout: float = ALERT_TIMEOUT,
    ) -> None:
        self._session = session
        self._url = url
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._pending: set[asyncio.Task[None]] = set()

    def send(self, event: dict[str, Any]) -> None:
        """Log the event and post it to the webhook without making the caller wait."""
        name = str(event["event"])
        if name == "token_refresh_recovered":
            log.info(name, **{k: v for k, v in event.items() if k != "event"})
        else:
            log.error(name, **{k: v for k, v in event.items() if k != "event"})
        if not self._url or self._session is None:
            return
        task = asyncio.create_task(self._post(name, event), name=f"alert-{name}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post(self, name: str, event: dict[str, Any]) -> None:
        assert self._session is not None
        try:
            async with self._session.post(self._url, json=event, timeout=self._timeout,
                                          allow_redirects=False) as response:
                if response.status >= 300:
                    raise aiohttp.ClientResponseError(
                        response.request_info, (), status=response.status
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._metrics.alerts.labels(event=name, result="failed").inc()
            status = getattr(exc, "status", None)
            log.warning("alert_delivery_failed", alert=name, error=type(exc).__name__,
                        status=status)
            return
        self._metrics.alerts.labels(event=name, result="sent").inc()

    async def drain(self, wait_seconds: float = ALERT_TIMEOUT) -> None:
        """Wait (bounded) for deliveries in flight, e.g. before shutdown."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=wait_seconds)
