"""Serve one REST call: check it, attach the token, forward it through the gate, relay the answer.

The rules a request must pass live in ``rules``, the neutral call and reply shapes in
``replies``, what the portal's refusals mean in ``portal``, and coalesced batches in
``coalescer``; here are serve, forward (with its three retry policies) and relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import structlog
from aiohttp import web
from aiohttp.http import HttpVersion10
from yarl import URL

from sidecar import phpquery
from sidecar.adapter import AiohttpCall, AiohttpSink, web_response
from sidecar.authorization import Authorization
from sidecar.batching import Answer, SingleCall, command_line
from sidecar.clientkey import ClientKey, check_peer
from sidecar.coalescer import LIMIT_RETRIES
from sidecar.config import Settings
from sidecar.errors import (
    BadRequest,
    ClientGone,
    InternalError,
    MethodNotAllowed,
    MethodPaused,
    Overloaded,
    QueueFull,
    SidecarError,
    UpstreamError,
)
from sidecar.limits import Gate
from sidecar.listmethods import client_params, not_a_list, plan, plan_api
from sidecar.logging import AccessLog
from sidecar.metrics import Metrics
from sidecar.portal import Refusal, network_failure, reset_in
from sidecar.portalwire import PortalConnectionError, Response
from sidecar.registry import Portal, Portals
from sidecar.replies import JSON_TYPE, Call, Reply, Sink, error_reply
from sidecar.rules import (
    DROP_REQUEST,
    PAGES_HEADER,
    REQUEST_ID_RE,
    HostPolicy,
    Target,
    api_path,
    filter_headers,
    multipart_boundary,
    parse_target,
    portal_header,
    portal_name,
    response_headers,
    strip_body_auth,
    strip_multipart_auth,
    strip_query_auth,
)
from sidecar.storage import TokenPair
from sidecar.upstream import BadHeader, Origin, Pool
from sidecar.wholelist import NDJSON_TYPE, Fetch, answer_streamed, answer_whole

log = structlog.get_logger("sidecar.proxy")
# Whole lists gathered into one answer at once, each up to SIDECAR_LIST_MAX about twice over;
# more wait their turn with a 503 (a streamed list holds one request's records at most).
WHOLE_ANSWERS = 4
_T = TypeVar("_T")

_COALESCIBLE_TYPES = frozenset({"", "application/x-www-form-urlencoded", "application/json"})
# Answers up to this size are read whole (one write to the client); larger ones stream.
STREAM_THRESHOLD = 256 * 1024


class RequestIds:
    """Our request IDs: 32 hex digits, a random prefix per proxy and a counter (uuid4 per call
    cost a system call on the hot path)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count(1)

    def take(self, given: str) -> str:
        """Keep a well-formed client ID; otherwise make one."""
        if REQUEST_ID_RE.fullmatch(given):
            return given
        return f"{self._prefix}{next(self._counter):012x}"


class Outcome:
    """What happened to one call, for its access-log event and the retry policies."""

    __slots__ = ("coalesced", "error", "limited", "method", "paused", "paused_for", "reached",
                 "retried", "retry_after", "upstream")

    def __init__(self) -> None:
        self.method = ""
        self.coalesced = False
        self.reached = False
        self.retried = False  # sent again after an auth error (at most once)
        self.limited = 0  # sent again after QUERY_LIMIT_EXCEEDED
        self.paused = False  # waited out an OPERATION_TIME_LIMIT once
        self.paused_for = 0.0  # how long that pause was
        self.retry_after: float | None = None  # what to tell a client the portal paused
        self.upstream = 0.0
        self.error: str | None = None


class Proxy:
    """Forward REST calls to the portal with the current token attached."""

    def __init__(
        self,
        settings: Settings,
        portals: Portals,
        pool: Pool,
        metrics: Metrics,
        *,
        access_log: AccessLog,
    ) -> None:
        self._access_log = access_log
        self._metrics = metrics
        self._settings = settings
        self._portals = portals
        self._pool = pool
        self.policy = HostPolicy(settings.listen.host, settings.allowed_hosts)
        self._key = ClientKey(settings.client_key)
        self._ids = RequestIds()
        self._whole_answers = 0  # whole lists being gathered into one answer each

    @property
    def pool(self) -> Pool:
        """The connections to the portal."""
        return self._pool

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one request aiohttp's server read (the fast lane hands it the unusual ones)."""
        sink = AiohttpSink(request)
        reply = await self.serve(AiohttpCall(request), sink)
        if reply.body is None:
            assert sink.response is not None
            return sink.response
        return web_response(reply)

    async def serve(self, call: Call, sink: Sink) -> Reply:
        """Serve one client request to ``/rest/``, ``/token`` or anything else (404)."""
        started = time.perf_counter()
        request_id = self._ids.take(call.headers.get("X-Request-ID", ""))
        outcome = Outcome()
        try:
            response = await self._dispatch(call, sink, request_id, outcome)
        except SidecarError as exc:
            outcome.error = exc.code
            response = error_reply(exc, request_id=request_id, api=api_path(call.raw_path))
        except Exception as exc:  # a bug of ours: still an answer in Bitrix's shape
            # Only the type and where: an exception's text may hold an address with the token.
            log.error("unexpected_error", request_id=request_id, error=type(exc).__name__,
                      where=_where(exc))
            outcome.error = InternalError.code
            response = error_reply(InternalError(
                "the sidecar failed unexpectedly; its log has the details (request "
                f"{request_id})"), request_id=request_id, api=api_path(call.raw_path))
        duration = time.perf_counter() - started
        if outcome.method != "/token":
            label = self._metrics.method_label(
                outcome.method, known=outcome.reached and response.status != 404
            )
            self._metrics.observe_request(label, response.status, duration)
        self._access_log.request(
            request_id, outcome.method, call.method, response.status,
            round(duration * 1000, 2), round(outcome.upstream * 1000, 2), outcome.retried,
            outcome.coalesced, outcome.error,
        )
        return response

    def precheck(self, call: Call) -> Target | None:
        """Check what the head alone decides (version, Host and Origin, peer, path, client key);
        return the REST target, or None for ``/token``; raise the refusal.

        The fast lane asks this before it waits for a body, so a caller without the key (or
        from a foreign page) holds no body in memory.
        """
        if call.version < HttpVersion10:
            raise BadRequest("HTTP/0.9 requests are not served")
        self.policy.check(call.headers, call.host)
        check_peer(call.host, call.peer)
        raw = call.raw_path
        if raw == "/token" or raw.startswith("/token?"):
            self._key.check(call.headers, "")
            return None
        if self._key.required:
            try:
                target = parse_target(raw)
            except SidecarError as exc:
                # Its description quotes the path, whose code segment may be the key.
                exc.description = self._key.scrub(exc.description)
                raise
        else:
            target = parse_target(raw)
        self._key.check(call.headers, target.code)
        return target

    async def _dispatch(self, call: Call, sink: Sink, request_id: str, outcome: Outcome) -> Reply:
        target = self.precheck(call)
        outcome.method = "/token" if target is None else target.method.lower()
        try:
            portal = self._portal_for(target, call)
        except SidecarError as exc:
            # Its description quotes the portal's name, which a caller may have made the key.
            exc.description = self._key.scrub(exc.description)
            raise
        if target is None:
            return await self._token(call, request_id, portal)
        if call.method not in ("GET", "POST"):
            raise MethodNotAllowed(f"{call.method} is not accepted: use GET or POST")
        whole = target.pages or _pages_asked(call)
        body = await (self._read_api_body(call) if target.api else self._read_body(call))
        if whole:
            return await self._whole_list(call, sink, request_id, target, body, outcome, portal)
        return await self._forward(call, sink, request_id, target, body, outcome, portal)

    def _portal_for(self, target: Target | None, call: Call) -> Portal:
        """The portal a call names (path prefix or X-Bitrix-Portal), or the only one held;
        raise BadRequest, PortalMismatch, PortalUnknown or PortalRequired."""
        in_path = target.portal if target is not None else token_portal(call.raw_path)
        in_header = portal_header(call.headers)
        return self._portals.pick(in_path, in_header)

    async def _token(self, call: Call, request_id: str, portal: Portal) -> Reply:
        if call.method != "GET":
            raise MethodNotAllowed(f"{call.method} is not accepted: use GET")
        pair = await portal.tokens.get()
        return Reply(200, [JSON_TYPE, ("X-Request-ID", request_id), ("Cache-Control", "no-store")],
                     json.dumps({
                "access_token": pair.access_token,
                "expires_at": int(pair.expires_at),
                "expires_in": max(0, int(pair.expires_in())),
                "client_endpoint": pair.client_endpoint or portal.tokens.settings.rest_base,
                "member_id": pair.member_id,
                "scope": pair.scope,
            }).encode())

    async def _read_api_body(self, call: Call) -> bytes:
        """A REST 3.0 body: JSON only (its ``auth`` is replaced in ``ApiBody``)."""
        body = await call.body(self._settings.max_body)
        if call.content_type.startswith("multipart/") or (
                call.content_type == "application/x-www-form-urlencoded" and body):
            raise BadRequest("REST 3.0 takes a JSON body (Content-Type: application/json), "
                             f"not {call.content_type}")
        return body

    async def _read_body(self, call: Call) -> bytes:
        body = await call.body(self._settings.max_body)
        ctype = call.content_type
        if ctype.startswith("multipart/"):
            boundary = multipart_boundary(call.headers.get("Content-Type", ""))
            if boundary and (b"auth" in body.lower()):
                body = strip_multipart_auth(body, boundary)
            return body
        return strip_body_auth(body, ctype)

    # -- forwarding ------------------------------------------------------------------------

    async def _forward(  # noqa: PLR0917 - one call's parts
        self, call: Call, sink: Sink, request_id: str, target: Target, body: bytes,
        outcome: Outcome, portal: Portal,
    ) -> Reply:
        """Send the call through the portal's gate until it has an answer to relay.

        A call goes round again (through the gate, so a retry is coalesced like any call) after
        an auth error, a rate-limit refusal or a time-limit pause: each has its own policy below.
        """
        tokens, gate = portal.tokens, portal.gate
        query = strip_query_auth(target.query)
        headers = filter_headers(call.headers, DROP_REQUEST)
        headers.append(("X-Request-ID", request_id))
        api = ApiBody(body) if target.api else None
        if api is not None:
            # REST 3.0: a JSON POST with the token in the body, never in a header.
            headers = [h for h in headers if h[0].lower() != "content-type"]
            headers.append(("Content-Type", "application/json"))
        else:
            headers.append(("Authorization", ""))
        method = f"api/{target.method.lower()}" if api is not None else target.method.lower()
        ctype = call.content_type if body else ""
        coalescible = (
            gate.coalesce
            and api is None  # a REST 3.0 batch fails whole: one client's error fails them all
            and target.suffix != ".xml"
            and ctype in _COALESCIBLE_TYPES
            and call.headers.get("X-Sidecar-Coalesce", "").strip().lower() != "off"
        )

        def line() -> str | None:
            return command_line(SingleCall(target.method, query, body, ctype)) if coalescible \
                else None

        pair = await tokens.get()
        again = False  # a call the portal refused unrun goes first when it is sent again
        while True:
            answer = await gate.enter(method, line=line, alive=call.alive, retry=again,
                                            refreshed=outcome.retried)
            if answer is not None:
                outcome.reached = True
                outcome.coalesced = True
                return _json_answer(answer, request_id)
            pair = tokens.current() or pair
            again = False
            origin, path = portal.addresses.target(pair, target.method, target.suffix, query,
                                                   api=api is not None)
            if api is None:
                # The header outranks any auth the body may still hide; the parameter serves
                # servers that read only parameters.
                headers[-1] = ("Authorization", f"Bearer {pair.access_token}")
            sent = time.perf_counter()
            try:
                upstream = await self._pool.request(
                    "POST" if api is not None else call.method, origin, path, headers,
                    body=api.with_token(pair.access_token) if api is not None else (
                        body if body or call.method == "POST" else None),
                    time_limit=self._settings.upstream_timeout,
                )
            except BadHeader:
                raise BadRequest("a header name or value holds a line break") from None
            except (TimeoutError, PortalConnectionError) as exc:
                raise self._lost(exc, outcome, sent) from None
            try:
                if upstream.status not in (401, 429, 503):
                    gate.passed()
                    return await self._relay(sink, upstream, request_id, target, sent, outcome)
                payload = await upstream.read()
                self._upstream_done(outcome, sent)
                refusal = Refusal.read(upstream.status, payload,
                                       upstream.headers.get("Content-Encoding", ""))
                outcome.reached = refusal.error is not None  # a REST answer, not a proxy's page
                fresh = await self._after_auth_error(refusal, pair, outcome, tokens)
                if fresh is not None:
                    pair, again = fresh, True
                    continue
                if self._after_rate_limit(refusal, outcome, gate):
                    again = True
                    continue
                if self._after_time_limit(refusal, method, outcome, gate):
                    if not gate.enabled:  # no gate to hold the method: wait here
                        await _sleep_while(call, outcome.paused_for,
                                           "the client hung up while its method was paused")
                    continue  # enter() waits out the pause, then it goes again
                reply = self._answer(upstream, payload, request_id)
                if outcome.retry_after is not None:
                    reply.headers = [h for h in reply.headers if h[0].lower() != "retry-after"]
                    reply.headers.append(("Retry-After", str(math.ceil(outcome.retry_after))))
                return reply
            except (TimeoutError, PortalConnectionError) as exc:  # the body broke off
                raise self._lost(exc, outcome, sent) from None
            finally:
                upstream.release()

    # -- whole lists -----------------------------------------------------------------------

    async def _whole_list(  # noqa: PLR0917 - one call's parts
        self, call: Call, sink: Sink, request_id: str, target: Target, body: bytes,
        outcome: Outcome, portal: Portal,
    ) -> Reply:
        """Fetch every page of a list method for one call (``sidecar.wholelist``)."""
        if target.suffix == ".xml":
            raise BadRequest("a whole list is answered in JSON (or NDJSON), not XML")
        if not_a_list(target.method):
            raise BadRequest(f"{target.method} is not a list method: a whole list is for "
                             "methods that read (crm.deal.list, user.get, ...)")
        streamed = NDJSON_TYPE in call.headers.get("Accept", "").lower()
        if not streamed and self._whole_answers >= WHOLE_ANSWERS:
            raise Overloaded(
                f"{WHOLE_ANSWERS} whole lists are being gathered into one answer each: ask "
                "again shortly, or ask for the list streamed (Accept: application/x-ndjson), "
                "which holds no list in memory", retry_after=5)
        if target.api:
            params = ApiBody.params(body)
            planned = plan_api(target.method, params)
        else:
            params = client_params(strip_query_auth(target.query), body,
                                   call.content_type if body else "")
            planned = plan(target.method, params)
        gate_method = f"api/{target.method.lower()}" if target.api else target.method.lower()

        async def send(method: str, params: dict[str, Any]) -> tuple[int, Any]:
            status, answer = await self._exchange(call, portal, method, params, gate_method,
                                                  request_id, outcome, api=target.api)
            try:
                return status, json.loads(answer)
            except (ValueError, RecursionError):
                return status, None

        async def pause(method: str, seconds: float) -> None:
            portal.gate.pause(method, seconds)
            if not portal.gate.enabled:  # no gate to hold the method: wait here
                await _sleep_while(call, seconds)

        outcome.reached = True
        fetch = Fetch(planned, send, pause)
        try:
            if streamed:
                return await answer_streamed(fetch, sink, request_id, api=target.api,
                                             write_timeout=self._settings.idle_timeout)
            self._whole_answers += 1
            try:
                return await answer_whole(fetch, request_id, self._settings.list_max)
            finally:
                self._whole_answers -= 1
        finally:
            log.info("whole_list", request_id=request_id, method=target.method.lower(),
                     strategy="api" if planned.api else "chain" if planned.chain else "pages",
                     streamed=streamed, records=fetch.count, requests=fetch.requests)

    async def _exchange(  # noqa: PLR0917 - one request's parts
        self, call: Call, portal: Portal, method: str, params: dict[str, Any],
        gate_method: str, request_id: str, outcome: Outcome, *, api: bool = False,
    ) -> tuple[int, bytes]:
        """Send one request of a long fetch (a JSON POST to ``method``) through the portal's
        gate, its own slot, with the retry policies of any call; return its status and body.

        Unlike a single call, it waits out a long queue or pause rather than fail (the fetch
        is under way), and stops as soon as the client hangs up.
        """
        tokens, gate = portal.tokens, portal.gate
        pair = await tokens.get()
        refreshed, limited, again = False, 0, False
        # As a form, the way the batch's own commands carry the parameters: a JSON true,
        # false or null would reach the first page and the later ones differently.
        payload = phpquery.encode(params).encode()
        while True:
            if not call.alive():
                raise ClientGone("the client hung up: the list is fetched no further")
            try:
                await self._watched(call, gate.enter(gate_method, alive=call.alive, retry=again,
                                                     refreshed=refreshed))
            except (QueueFull, MethodPaused) as exc:
                await _sleep_while(call, min(exc.retry_after, 1.0))
                continue
            again = False
            pair = tokens.current() or pair
            origin, path = portal.addresses.target(pair, method, "", "", api=api)
            if api:
                headers = [("Content-Type", "application/json"), ("X-Request-ID", request_id)]
                body = json.dumps({**params, "auth": pair.access_token}).encode()
            else:
                headers = [("Content-Type", "application/x-www-form-urlencoded"),
                           ("X-Request-ID", request_id),
                           ("Authorization", f"Bearer {pair.access_token}")]
                body = payload
            sent = time.perf_counter()
            try:
                status, answer = await self._watched(
                    call, self._request(origin, path, headers, body))
            except (TimeoutError, PortalConnectionError) as exc:
                raise self._lost(exc, outcome, sent) from None
            self._upstream_done(outcome, sent)
            if status not in (401, 429, 503):
                gate.passed()
                return status, answer
            refusal = Refusal.read(status, answer, "")
            if refusal.auth_error and not refreshed:
                refreshed = again = outcome.retried = True
                self._metrics.upstream_retries.labels(reason="auth_error").inc()
                pair = await tokens.refresh(pair.access_token, trigger="auth_error")
                continue
            if refusal.rate_limited:
                # The portal's bucket was fuller than ours: the fetch is under way, so it waits
                # (backing off once the usual retries are spent) rather than lose its progress.
                gate.limited()
                limited += 1
                again = True
                self._metrics.upstream_retries.labels(reason="rate_limit").inc()
                if limited > LIMIT_RETRIES or not gate.enabled:
                    await _sleep_while(call, min(2.0 ** max(limited - LIMIT_RETRIES, 0), 30.0))
                continue
            if refusal.time_limited:
                wait = reset_in(answer, "")
                gate.pause(gate_method, wait)
                self._metrics.upstream_limited.labels(error="OPERATION_TIME_LIMIT").inc()
                if not gate.enabled:  # no gate to hold the method: wait here
                    await _sleep_while(call, wait)
                continue
            return status, answer

    async def _request(self, origin: Origin, path: str, headers: list[tuple[str, str]],
                       body: bytes) -> tuple[int, bytes]:
        upstream = await self._pool.request("POST", origin, path, headers, body=body,
                                            time_limit=self._settings.upstream_timeout)
        try:
            return upstream.status, await upstream.read()
        finally:
            upstream.release()

    @staticmethod
    async def _watched(call: Call, work: Awaitable[_T]) -> _T:
        """Await ``work``, abandoning it as soon as the client hangs up (ClientGone)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.2)
                if done:
                    return task.result()
                if not call.alive():
                    raise ClientGone("the client hung up: the list is fetched no further")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _lost(self, exc: TimeoutError | PortalConnectionError, outcome: Outcome,
              sent: float) -> SidecarError:
        """Count a portal that failed this attempt; return the error the client gets."""
        kind, error = network_failure(exc, self._settings.upstream_timeout)
        self._upstream_done(outcome, sent, error=kind)
        return error

    async def _after_auth_error(self, refusal: Refusal, pair: TokenPair,
                                outcome: Outcome, tokens: Authorization) -> TokenPair | None:
        """401 expired/invalid token: renew once (one refresh for every caller) and go again.

        Return the fresh pair, or None when the policy does not apply.
        """
        if not refusal.auth_error or outcome.retried:
            return None
        outcome.retried = True
        self._metrics.upstream_retries.labels(reason="auth_error").inc()
        return await tokens.refresh(pair.access_token, trigger="auth_error")

    def _after_rate_limit(self, refusal: Refusal, outcome: Outcome, gate: Gate) -> bool:
        """503 QUERY_LIMIT_EXCEEDED: the call did not run and our bucket was out of step. Fill
        it, back off, and say whether to send the call again (up to a bound)."""
        if not refusal.rate_limited:
            return False
        gate.limited()
        if outcome.limited >= LIMIT_RETRIES:
            return False
        outcome.limited += 1
        self._metrics.upstream_retries.labels(reason="rate_limit").inc()
        return True

    def _after_time_limit(self, refusal: Refusal, method: str, outcome: Outcome,
                          gate: Gate) -> bool:
        """429 OPERATION_TIME_LIMIT: pause the method; say whether to wait the pause out (once,
        if it fits in the queue timeout) and go again. Otherwise the client is told how long
        (``outcome.retry_after``)."""
        if not refusal.time_limited:
            return False
        wait = reset_in(refusal.payload, refusal.encoding)
        gate.pause(method, wait)
        self._metrics.upstream_limited.labels(error="OPERATION_TIME_LIMIT").inc()
        if not outcome.paused and wait <= gate.queue_timeout:
            outcome.paused = True
            outcome.paused_for = wait
            self._metrics.upstream_retries.labels(reason="time_limit").inc()
            return True
        outcome.retry_after = wait
        return False

    def _upstream_done(self, outcome: Outcome, sent: float, *, error: str = "") -> None:
        elapsed = time.perf_counter() - sent
        outcome.upstream += elapsed
        self._metrics.upstream_duration.observe(elapsed)
        if error:
            self._metrics.upstream_errors.labels(kind=error).inc()

    # -- relaying --------------------------------------------------------------------------

    async def _relay(  # noqa: PLR0917 - one answer's parts
        self, sink: Sink, upstream: Response, request_id: str, target: Target, sent: float,
        outcome: Outcome,
    ) -> Reply:
        if 300 <= upstream.status < 400 and upstream.status != 304:
            location = URL(upstream.headers.get("Location", ""))
            self._upstream_done(outcome, sent, error="redirect")
            raise UpstreamError(
                f"the portal answered {upstream.status} redirecting to "
                f"{location.host or 'an unknown place'}: it may have been renamed; set "
                "BITRIX_PORTAL to its new address and authorize the app again"
            )
        ctype = upstream.content_type
        if upstream.status >= 500 and ctype not in ("application/json", "text/xml"):
            self._upstream_done(outcome, sent, error="not_rest")
            raise UpstreamError(
                f"the portal answered HTTP {upstream.status} with {ctype or 'no content type'} "
                "instead of a REST answer"
            )
        outcome.reached = True
        length = upstream.content_length
        if length is not None and length <= STREAM_THRESHOLD:
            payload = await upstream.read()
            self._upstream_done(outcome, sent)
            return self._answer(upstream, payload, request_id)
        streamed = Reply(upstream.status, [], None)
        try:
            await sink.start(upstream.status, upstream.reason,
                             response_headers(upstream.headers, request_id), length)
            while chunk := await upstream.next_chunk():
                await sink.write(chunk)
            await sink.finish()
        except ConnectionResetError:
            # The client hung up: nothing to tell it; the upstream connection is released
            # (closed) by the caller.
            outcome.error = "SIDECAR_CLIENT_GONE"
            self._upstream_done(outcome, sent)
            return streamed
        except (PortalConnectionError, TimeoutError) as exc:
            # Too late for an error answer: cut the connection so the client sees it broke.
            outcome.error = "SIDECAR_UPSTREAM_BROKE_MID_STREAM"
            self._upstream_done(outcome, sent, error="broke_mid_stream")
            log.warning("upstream_broke_mid_stream", request_id=request_id,
                        method=target.method, error=_describe(exc))
            sink.cut()
            return streamed
        except Exception as exc:  # a bug of ours, with the answer under way: no second answer
            log.error("unexpected_error", request_id=request_id, error=type(exc).__name__,
                      where=_where(exc))
            outcome.error = InternalError.code
            self._upstream_done(outcome, sent)
            sink.cut()
            return streamed
        self._upstream_done(outcome, sent)
        return streamed

    def _answer(self, upstream: Response, payload: bytes, request_id: str) -> Reply:
        return Reply(upstream.status, response_headers(upstream.headers, request_id), payload,
                     upstream.reason)


def token_portal(raw: str) -> str:
    """The portal ``/token?portal=NAME`` names ('' if none), checked as a path's name is."""
    query = raw.partition("?")[2]
    if "portal=" not in query:
        return ""
    names = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "portal"]
    if len(names) != 1:
        raise BadRequest("name one portal: /token?portal=<host or member_id>")
    return portal_name(names[0], "the portal parameter")


class ApiBody:
    """A REST 3.0 call's JSON body, written again with the current token in ``auth`` for
    each attempt (the client's own ``auth`` gone).

    A JSON array (REST 3.0's ``batch``) is sent as b24jssdk sends it, an object keyed by the
    commands' positions beside ``auth``: the portal reads both alike.
    """

    __slots__ = ("_head",)

    def __init__(self, body: bytes) -> None:
        kept = self.params(body, batch=True)
        head = json.dumps(kept)[:-1]
        self._head = head + (", " if kept else "")

    @staticmethod
    def params(body: bytes, *, batch: bool = False) -> dict[str, Any]:
        """The body's parameters less the client's ``auth`` (``batch``: an array is a
        batch's commands, keyed by position); raise BadRequest for anything else."""
        data: Any = {}
        if body.strip():
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                raise BadRequest("the body is not valid JSON: REST 3.0 takes a JSON "
                                 "object") from None
        if batch and isinstance(data, list):
            data = {str(index): item for index, item in enumerate(data)}
        elif not isinstance(data, dict):
            raise BadRequest("a REST 3.0 body is a JSON object"
                             + (" (or a batch's array)" if batch else ""))
        return {k: v for k, v in data.items() if k.lower() not in ("auth", "access_token")}

    def with_token(self, token: str) -> bytes:
        """The body with ``auth`` set to ``token``."""
        return f'{self._head}"auth": {json.dumps(token)}}}'.encode()


def _pages_asked(call: Call) -> bool:
    """Say whether the X-Bitrix-Pages header asks for the whole list; raise BadRequest for a
    value it does not know."""
    values = call.headers.getall(PAGES_HEADER, ())
    if not values:
        return False
    if len(values) > 1 or values[0].strip().lower() != "all":
        raise BadRequest(f"{PAGES_HEADER} takes one value, all (the whole list)")
    return True


async def _sleep_while(call: Call, seconds: float,
                       gone: str = "the client hung up: the list is fetched no further") -> None:
    """Sleep up to ``seconds``, a fifth of a second at a time, while the client is there
    (ClientGone, saying ``gone``, once it is not)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not call.alive():
            raise ClientGone(gone)
        await asyncio.sleep(min(left, 0.2))


def _json_answer(answer: Answer, request_id: str) -> Reply:
    return Reply(answer.status, [JSON_TYPE, ("X-Request-ID", request_id)], answer.body)


def _where(exc: BaseException) -> str:
    """Name the innermost frame of a traceback: file, line and function, never values."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return ""
    code = frame.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.tb_lineno} in {code.co_name}"


def _describe(exc: BaseException) -> str:
    """Name a network error without echoing an address (ours carry the token)."""
    if isinstance(exc, PortalConnectionError):
        return str(exc)  # written to name no address
    return type(exc).__name__
