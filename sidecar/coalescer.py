"""Send a group of queued single calls as one ``batch`` and give each call its own answer.

The rate gate hands a group over and acts on the ``Feedback``; this module never calls back
into the gate.
"""

from __future__ import annotations

import time

from sidecar.authorization import Authorization
from sidecar.batching import BATCH_ONLY_ERRORS, Answer, batch_body, split_answers
from sidecar.errors import SidecarError, UpstreamError
from sidecar.limits import Feedback, Waiter
from sidecar.metrics import Metrics
from sidecar.portal import Addresses, Refusal, error_code, network_failure, plain
from sidecar.portalwire import PortalConnectionError
from sidecar.storage import TokenPair
from sidecar.upstream import Pool

# A call the portal refused unrun (503 QUERY_LIMIT_EXCEEDED) is sent again at most this often.
LIMIT_RETRIES = 5


class Coalescer:
    """The batch sender of one authorization's gate."""

    def __init__(self, tokens: Authorization, pool: Pool, addresses: Addresses,
                 metrics: Metrics, *, time_limit: float) -> None:
        self._tokens = tokens
        self._pool = pool
        self._addresses = addresses
        self._metrics = metrics
        self._time_limit = time_limit

    async def send(self, group: list[Waiter]) -> Feedback:
        """Send the group's command lines as one batch; settle every waiter or hand it back."""
        try:
            refusal, again = await self._post(group)
        except SidecarError as exc:
            for waiter in group:
                waiter.fail(exc)
            return Feedback()
        if again:
            return Feedback(requeue=again)
        if refusal.rate_limited:
            again = [w for w in group if w.attempts < LIMIT_RETRIES]
            self._metrics.upstream_retries.labels(reason="rate_limit").inc(len(again))
            for waiter in group:
                if waiter not in again:
                    waiter.answer(Answer(refusal.status, refusal.payload))
            return Feedback(limited=True, requeue=again)
        if refusal.status != 200:
            # The batch itself was refused: each call would have been refused alike.
            body = plain(refusal.payload, refusal.encoding)
            for waiter in group:
                waiter.answer(Answer(refusal.status, body))
            return Feedback()
        try:
            answers = split_answers(plain(refusal.payload, refusal.encoding), len(group))
        except ValueError:
            self._metrics.upstream_errors.labels(kind="not_rest").inc()
            error = UpstreamError("the portal answered the batch with garbage")
            for waiter in group:
                waiter.fail(error)
            return Feedback(passed=True)
        alone: list[Waiter] = []
        for waiter, answer in zip(group, answers, strict=True):
            if error_code(answer.body, "") in BATCH_ONLY_ERRORS:
                # Refused by the batch itself, not by the method: it never ran, so it is
                # sent again, alone.
                waiter.line = None
                alone.append(waiter)
            else:
                waiter.answer(answer)
        return Feedback(passed=True, requeue=alone)

    async def _post(self, group: list[Waiter]) -> tuple[Refusal, list[Waiter]]:
        """POST the batch; after an auth error renew the token (once for everyone) and send it
        again. Return the answer, or the calls to queue again.

        A call gets one retry after an auth error, as it would alone: a call already sent again
        after one gets the portal's refusal, and the others go back to the queue.
        """
        body = batch_body([waiter.line or "" for waiter in group])
        started = time.perf_counter()
        pair = await self._tokens.get()
        refusal = await self._post_once(pair, body, started)
        if not refusal.auth_error:
            return refusal, []
        spent = [w for w in group if w.refreshed]
        again = [w for w in group if not w.refreshed]
        if again:
            self._metrics.upstream_retries.labels(reason="auth_error").inc()
            pair = await self._tokens.refresh(pair.access_token, trigger="auth_error")
        if not spent:
            return await self._post_once(pair, body, started), []
        refused = Answer(refusal.status, plain(refusal.payload, refusal.encoding))
        for waiter in spent:
            waiter.answer(refused)
        for waiter in again:
            waiter.refreshed = True
        return refusal, again

    async def _post_once(self, pair: TokenPair, body: bytes, started: float) -> Refusal:
        origin, path = self._addresses.target(pair, "batch", "", "")
        headers = [("Authorization", f"Bearer {pair.access_token}"),
                   ("Content-Type", "application/x-www-form-urlencoded")]
        try:
            upstream = await self._pool.request("POST", origin, path, headers, body=body,
                                                time_limit=self._time_limit)
            try:
                status = upstream.status
                payload = await upstream.read()
                encoding = upstream.headers.get("Content-Encoding", "")
            finally:
                upstream.release()
        except (TimeoutError, PortalConnectionError) as exc:
            kind, error = network_failure(exc, self._time_limit, "a coalesced batch ")
            self._metrics.upstream_errors.labels(kind=kind).inc()
            raise error from None
        finally:
            self._metrics.upstream_duration.observe(time.perf_counter() - started)
        return Refusal(status, payload, encoding,
                       error_code(payload, encoding) if status != 200 else None)
