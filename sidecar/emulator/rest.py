"""REST dispatch: each /rest/ request is logged, authenticated, rate-limited, run and rendered."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from sidecar import phpquery
from sidecar.emulator.model import Caller, EmulatorStats, Method, MethodResult, RestCall, RestError
from sidecar.emulator.oauth import Identity, OAuthServer
from sidecar.emulator.wire import Route, body_params, credentials, parse_route, render, time_block

__all__ = ["REST_LOG_LIMIT", "RestServer"]

# How many requests the log keeps by default; older ones drop off as new ones arrive.
REST_LOG_LIMIT = 10_000


class RestServer:
    """One portal's /rest/ endpoint: methods, webhooks, the leaky bucket and the request log."""

    def __init__(
        self,
        *,
        oauth: OAuthServer,
        portal: Identity,
        clock: Callable[[], float],
        stats: EmulatorStats,
        rate: float | None,
        burst: int,
        call_delay: float,
        rest_log_limit: int = REST_LOG_LIMIT,
    ) -> None:
        """Start with no methods; `oauth` checks access tokens, accepting `portal`'s only."""
        self.clock = clock
        self.stats = stats
        # The leaky bucket: `rate` requests a second drain it, `burst` fill it; None turns it off.
        self.rate = rate
        self.burst = burst
        self.call_delay = call_delay
        # The last `rest_log_limit` requests; stats.upstream_requests counts them all.
        self.rest_log: collections.deque[RestCall] = collections.deque(maxlen=rest_log_limit)
        self._oauth = oauth
        self._portal = portal
        self._methods: dict[str, Method] = {}
        self._webhooks: set[tuple[int, str]] = set()
        self._injected: collections.deque[RestError] = collections.deque()
        self._bucket_level = 0.0
        self._bucket_at: float | None = None
        self._blocked: dict[str, float] = {}  # method -> clock() its time budget resets

    def add_methods(self, methods: Mapping[str, Method]) -> None:
        """Serve these methods, by lower-case name."""
        self._methods.update(methods)

    def knows(self, method: str) -> bool:
        """Tell whether a method exists."""
        return method in self._methods

    def register_webhook(self, user_id: int, code: str) -> None:
        """Create an inbound webhook served at /rest/{user_id}/{code}/{method}."""
        self._webhooks.add((user_id, code))

    def block_method(self, method: str, seconds: float) -> None:
        """Use up a method's time budget: it answers 429 OPERATION_TIME_LIMIT for ``seconds``."""
        self._blocked[method.lower()] = self.clock() + seconds

    def fail_next(self, status: int, error: str, description: str) -> None:
        """Queue an error answer for the next REST request, which is then logged but not run."""
        self._injected.append(RestError(status, error, description))

    # -- shared with the REST 3.0 endpoint (v3.py) ---------------------------------------------

    def authenticate(self, route: Route, token: str | None) -> Caller:
        """Check webhook credentials or the access token; raise the Bitrix 401 on failure."""
        return self._authenticate(route, token)

    def admit(self) -> bool:
        """Pass one request through the leaky bucket, or refuse it when the bucket is full."""
        return self._admit()

    def blocked_until(self, method: str) -> float:
        """Return the clock() time a method's used-up time budget comes back (0: not blocked)."""
        return self._blocked.get(method, 0.0)

    def take_injected(self) -> RestError | None:
        """Take the next queued injected failure, if any."""
        return self._injected.popleft() if self._injected else None

    def run(self, caller: Caller, method: str, params: dict[str, Any]) -> MethodResult:
        """Run a known method for a caller, checking its scope."""
        spec = self._methods[method]
        if spec.scope is not None and caller.scope is not None and spec.scope not in caller.scope:
            raise RestError(
                401,
                "insufficient_scope",
                "The request requires higher privileges than provided by the access token",
            )
        self.stats.rest_calls[method] += 1
        return spec.handler(caller, params)

    def _authenticate(self, route: Route, token: str | None) -> Caller:
        """Check webhook credentials or the access token; raise the Bitrix 401 on failure."""
        if route.webhook is not None:
            if route.webhook not in self._webhooks:
                raise RestError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
            return Caller(None, None, route.webhook[0])
        if token is None:
            raise RestError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        return self._oauth.caller_for(token, self._portal)

    def _admit(self) -> bool:
        """Pass one request through the leaky bucket, or refuse it when the bucket is full."""
        if self.rate is None:
            return True
        now = self.clock()
        last = now if self._bucket_at is None else self._bucket_at
        # A clock that steps backwards drains nothing rather than overfilling the bucket.
        elapsed = max(0.0, now - last)
        self._bucket_at = max(last, now)
        self._bucket_level = max(0.0, self._bucket_level - elapsed * self.rate)
        if self._bucket_level + 1 > self.burst:
            return False
        self._bucket_level += 1
        return True

    async def handle(self, request: web.Request) -> web.Response:
        """Serve /rest/...: log, check method, auth and rate limit, run, render."""
        start = self.clock()
        body = await request.read()
        route = parse_route(request.match_info["tail"])
        params: dict[str, Any] = phpquery.parse_qs(request.rel_url.raw_query_string)
        body_error: str | None = None
        try:
            params |= body_params(request, body)
        except ValueError as exc:
            body_error = str(exc)
        token, source = credentials(request, params, route)
        self.stats.upstream_requests += 1
        self.rest_log.append(
            RestCall(
                method=route.method,
                http_method=request.method,
                path=request.rel_url.raw_path,
                query=request.rel_url.raw_query_string,
                params=params,
                token=token,
                token_source=source,
                headers=dict(request.headers),
                body=body,
                fmt=route.fmt,
            )
        )
        try:
            if self._injected:
                raise self._injected.popleft()
            if not route.known_shape or route.method not in self._methods:
                raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
            if body_error is not None:
                raise RestError(400, "ERROR_ARGUMENT", body_error)
            caller = self._authenticate(route, token)
            if not self._admit():
                self.stats.limited += 1
                raise RestError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            blocked_until = self._blocked.get(route.method, 0.0)
            if self.clock() < blocked_until:
                self.stats.time_limited += 1
                spent = time_block(start, self.clock())
                spent |= {"operating": 480, "operating_reset_at": int(blocked_until)}
                return render(route.fmt, 429, {
                    "error": "OPERATION_TIME_LIMIT",
                    "error_description": "Method is blocked due to operation time limit.",
                    "time": spent,
                })
            if self.call_delay > 0:
                await asyncio.sleep(self.call_delay)
            answer = self.run(caller, route.method, params)
        except RestError as exc:
            return render(route.fmt, exc.status, exc.body())
        finish = self.clock()
        payload: dict[str, Any] = {"result": answer.result}
        if answer.next is not None:
            payload["next"] = answer.next
        if answer.total is not None:
            payload["total"] = answer.total
        payload["time"] = time_block(start, finish)
        response = render(route.fmt, 200, payload)
        response.headers["X-Bitrix-Rest-Application"] = caller.client_id or "webhook"
        response.headers["X-Bitrix-Rest-Time"] = f"{max(0.0, finish - start):.6f}"
        return response
