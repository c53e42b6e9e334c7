"""Keep the portal under its limits: a leaky bucket, a fair FIFO queue, and batch departures.

Every app behind the sidecar shares the portal's bucket (drains ``rate`` per second, holds
``burst``). Under the limit a call leaves at once. Over it, calls wait in arrival order; when
coalescing is on, each departure takes up to 50 waiting single calls as one ``batch`` request,
which the portal counts once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from sidecar.batching import Answer
from sidecar.errors import ClientGone, MethodPaused, QueueFull, SidecarError
from sidecar.metrics import Metrics

MAX_GROUP = 50
BACKOFF_START = 0.5
BACKOFF_FACTOR = 1.5
BACKOFF_MAX = 10.0
log = structlog.get_logger("sidecar.limits")


class LeakyBucket:
    """Our mirror of the portal's bucket: each request adds 1; it drains ``rate`` a second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        # Requests reach the portal a little after they leave here, some later than others;
        # keeping 100 ms of drain in hand means that jitter rarely tips its bucket over (and
        # when it does, the 503 is absorbed by a retry).
        self._margin = min(0.5, rate * 0.1)
        self._clock = clock
        self.level = 0.0
        self._updated = clock()

    def _drain(self) -> float:
        now = self._clock()
        self.level = max(0.0, self.level - (now - self._updated) * self.rate)
        self._updated = now
        return now

    def wait_time(self) -> float:
        """Return the seconds until one more request fits."""
        self._drain()
        # An empty bucket needs no margin: there is nothing ahead to jitter against.
        margin = self._margin if self.level > self._margin else 0.0
        return max(0.0, (self.level + 1 + margin - self.burst) / self.rate)

    def take(self) -> None:
        """Count one request that leaves now."""
        self._drain()
        self.level += 1

    def fill(self) -> None:
        """The portal says the bucket is full: believe it."""
        self._drain()
        self.level = max(self.level, float(self.burst))


class SharedBucket(Protocol):
    """A bucket several sidecars share (sidecar/pgbucket.py): each departure takes its slot
    there, at the cost of a round trip, so the gate awaits it."""

    rate: float
    on_pause: Callable[[str, float], None] | None

    async def take_now(self) -> bool:
        """Take a slot if one is free at once."""
        ...

    async def reserve(self) -> float:
        """Take the next slot; return the seconds until it is due."""
        ...

    def wait_estimate(self) -> float:
        """Return the seconds until a slot is free, as last seen."""
        ...

    def fill(self) -> None:
        """The portal says its bucket is full."""
        ...

    def share_pause(self, method: str, seconds: float) -> None:
        """Tell the others that ``method`` is paused."""
        ...


@dataclass(eq=False)
class Waiter:
    """A call waiting for its turn."""

    method: str
    line: str | None  # its batch command line, if it may be coalesced
    alive: Callable[[], bool]
    enqueued: float
    future: asyncio.Future[Answer | None] = field(default_factory=lambda: (
        asyncio.get_running_loop().create_future()))
    attempts: int = 0
    refreshed: bool = False  # already sent again after an auth error: its one retry is spent

    def answer(self, answer: Answer) -> None:
        """Give the call its answer, unless it has stopped waiting."""
        if not self.future.done():
            self.future.set_result(answer)

    def fail(self, error: BaseException) -> None:
        """Give the call an error, unless it has stopped waiting."""
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class Feedback:
    """What a batch sender tells the gate: the portal's verdict on its bucket, and the calls
    that did not run and wait for another turn."""

    limited: bool = False  # 503 QUERY_LIMIT_EXCEEDED: our bucket was out of step
    passed: bool = False  # the request went through
    requeue: list[Waiter] = field(default_factory=list)


BatchSender = Callable[[list[Waiter]], Awaitable[Feedback]]


def _gone(waiter: Waiter) -> None:
    """Drop a call whose client hung up while it waited: it never reaches the portal."""
    if not waiter.future.done():
        # ClientGone, not the base error: the call is logged and counted as 499, not as a 500.
        waiter.future.set_exception(ClientGone("the client went away while queued"))


class Gate:
    """The FIFO in front of the portal; grants turns and sends coalesced batches."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        queue_timeout: float,
        coalesce: bool,
        metrics: Metrics,
        send_batch: BatchSender | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedBucket | None = None,
    ) -> None:
        self.enabled = rate > 0
        self.coalesce = coalesce and self.enabled and send_batch is not None
        self._bucket = LeakyBucket(rate if rate > 0 else 1.0, burst, clock)
        self._queue_timeout = queue_timeout
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[Waiter] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._backoff = 0.0
        self._backoff_until = 0.0
        self._paused: dict[str, float] = {}  # method -> monotonic time its pause ends
        self._send_batch = send_batch
        self._batches: set[asyncio.Task[None]] = set()  # ours: awaited in aclose()
        # With a fleet, departures take their slots from the shared bucket instead; the local
        # one (in-process, no I/O) serves a single sidecar.
        self._shared = shared if self.enabled else None
        if self._shared is not None:
            self._shared.on_pause = self._pause_here

    # -- entering ----------------------------------------------------------------------------

    async def enter(
        self,
        method: str,
        *,
        line: Callable[[], str | None] = lambda: None,
        alive: Callable[[], bool] = lambda: True,
        retry: bool = False,
        refreshed: bool = False,
    ) -> Answer | None:
        """Wait for this call's turn. ``None``: go now (a slot is taken); else the call's answer,
        already fetched as part of a batch.

        ``retry`` puts a call that must be sent again (the portal refused it unrun) at the head.
        """
        if not self.enabled:
            return None
        await self._wait_for_method(method)
        now = self._clock()
        if self._shared is None:
            if not self._queue and now >= self._backoff_until and self._bucket.wait_time() == 0:
                self._bucket.take()
                self._metrics.batch_size.observe(1)
                self._metrics.queue_wait.observe(0)
                return None
        elif not self._queue and now >= self._backoff_until and await self._shared.take_now():
            self._metrics.batch_size.observe(1)
            self._metrics.queue_wait.observe(0)
            return None
        command = line() if self.coalesce else None
        estimate = self._estimate(command is not None)
        if estimate > self._queue_timeout and not retry:
            self._metrics.queue_rejected.inc()
            raise QueueFull(
                f"the portal's rate limit leaves this call waiting about {estimate:.0f} s, longer "
                f"than SIDECAR_QUEUE_TIMEOUT ({self._queue_timeout:g} s)",
                retry_after=estimate,
            )
        waiter = Waiter(method, command, alive, now, refreshed=refreshed)
        if retry:
            self._queue.appendleft(waiter)
        else:
            self._queue.append(waiter)
        self._metrics.queue_depth.set(len(self._queue))
        self._kick()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), self._queue_timeout)
        except TimeoutError:
            self._metrics.queue_rejected.inc()
            raise QueueFull(
                f"waited SIDECAR_QUEUE_TIMEOUT ({self._queue_timeout:g} s) for the portal's rate "
                "limit without a turn",
                retry_after=self._estimate(command is not None),
            ) from None
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
                self._remove(waiter)

    def _estimate(self, coalescible: bool) -> float:
        """Guess how long a call joining the queue now would wait."""
        ahead = len(self._queue)
        if coalescible:
            lines = sum(1 for w in self._queue if w.line is not None)
            departures = math.ceil((lines + 1) / MAX_GROUP) + (ahead - lines)
        else:
            departures = ahead + 1
        bucket = self._bucket if self._shared is None else self._shared
        wait = self._bucket.wait_time() if self._shared is None else self._shared.wait_estimate()
        start = max(wait, self._backoff_until - self._clock())
        return start + (departures - 1) / bucket.rate

    async def _wait_for_method(self, method: str) -> None:
        until = self._paused.get(method)
        if until is None:
            return
        wait = until - self._clock()
        if wait <= 0:
            del self._paused[method]
            return
        if wait > self._queue_timeout:
            raise MethodPaused(
                f"the portal blocked {method} (OPERATION_TIME_LIMIT) for another {wait:.0f} s",
                retry_after=wait,
            )
        await asyncio.sleep(wait)

    def _remove(self, waiter: Waiter) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            return
        self._metrics.queue_depth.set(len(self._queue))

    # -- the portal's feedback ---------------------------------------------------------------

    def limited(self) -> None:
        """The portal answered 503 QUERY_LIMIT_EXCEEDED: our bucket was out of step."""
        self._bucket.fill()
        if self._shared is not None:
            self._shared.fill()
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_START, self._backoff * BACKOFF_FACTOR))
        self._backoff_until = self._clock() + self._backoff
        self._metrics.upstream_limited.labels(error="QUERY_LIMIT_EXCEEDED").inc()
        log.warning("portal_rate_limited", backoff=round(self._backoff, 2))

    def passed(self) -> None:
        """A request went through: ease the backoff."""
        if self._backoff:
            self._backoff = 0.0

    def pause(self, method: str, seconds: float) -> None:
        """Hold calls to ``method`` for ``seconds`` (its time budget is used up or nearly)."""
        self._pause_here(method, seconds)
        if self._shared is not None:
            self._shared.share_pause(method, seconds)

    def _pause_here(self, method: str, seconds: float) -> None:
        """Hold calls to ``method`` in this sidecar (another may have seen the portal's 429)."""
        until = self._clock() + seconds
        if until > self._paused.get(method, 0.0):
            self._paused[method] = until

    @property
    def queue_timeout(self) -> float:
        """Return the longest a call may wait."""
        return self._queue_timeout

    # -- departures --------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._pump is None or self._pump.done():
            run = self._run() if self._shared is None else self._run_shared(self._shared)
            self._pump = asyncio.create_task(run, name="rate-limit-pump")

    async def _run(self) -> None:
        while self._queue:
            wait = max(self._bucket.wait_time(), self._backoff_until - self._clock())
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            group = self._next_group()
            self._metrics.queue_depth.set(len(self._queue))
            if not group:
                continue
            self._bucket.take()
            self._depart(group)

    async def _run_shared(self, shared: SharedBucket) -> None:
        """Reserve the fleet's next slot, wait for it, then gather what waits by then."""
        while self._queue:
            backoff = self._backoff_until - self._clock()
            if backoff > 0:
                await asyncio.sleep(backoff)
                continue
            wait = await shared.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
            group = self._next_group()  # empty if every caller left: the slot goes unused
            self._metrics.queue_depth.set(len(self._queue))
            if group:
                self._depart(group)

    def _depart(self, group: list[Waiter]) -> None:
        """Send a group that has its slot: one call goes itself, more go as one batch."""
        now = self._clock()
        for waiter in group:
            self._metrics.queue_wait.observe(now - waiter.enqueued)
        self._metrics.batch_size.observe(len(group))
        if len(group) == 1:
            group[0].future.set_result(None)
        else:
            task = asyncio.create_task(self._send(group), name="coalesced-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _next_group(self) -> list[Waiter]:
        """Take the head of the queue, and with it up to 49 more coalescible calls."""
        while self._queue and (self._queue[0].future.done() or not self._queue[0].alive()):
            _gone(self._queue.popleft())
        if not self._queue:
            return []
        head = self._queue.popleft()
        if head.line is None or self._send_batch is None:
            return [head]
        group = [head]
        keep: deque[Waiter] = deque()
        while self._queue and len(group) < MAX_GROUP:
            waiter = self._queue.popleft()
            if waiter.future.done() or not waiter.alive():
                _gone(waiter)
            elif waiter.line is not None:
                group.append(waiter)
            else:
                keep.append(waiter)
        keep.extend(self._queue)
        self._queue = keep
        return group

    async def _send(self, group: list[Waiter]) -> None:
        assert self._send_batch is not None
        again: list[Waiter] = []
        try:
            feedback = await self._send_batch(group)
            again = feedback.requeue
            if feedback.limited:
                self.limited()
            if feedback.passed:
                self.passed()
            if again:
                self.requeue(again)
        except Exception:
            log.exception("coalesced_batch_error")
        finally:
            for waiter in group:
                if not waiter.future.done() and waiter not in again:
                    waiter.future.set_exception(
                        SidecarError("the coalesced batch ended without an answer")
                    )

    def requeue(self, waiters: list[Waiter]) -> None:
        """Put calls the portal refused unrun back at the head, in their order."""
        for waiter in reversed(waiters):
            waiter.attempts += 1
            self._queue.appendleft(waiter)
        self._metrics.queue_depth.set(len(self._queue))
        self._kick()

    async def aclose(self) -> None:
        """Stop the pump and the batches under way; waiting calls get an error."""
        for task in [self._pump, *self._batches]:
            if task is None or task.done():
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        for waiter in self._queue:
            if not waiter.future.done():
                waiter.future.cancel()
        self._queue.clear()
