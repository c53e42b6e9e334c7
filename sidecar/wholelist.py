"""Fetch a list method's whole list for one call and answer it whole or streamed as NDJSON.

The plan (strategy and commands) comes from ``listmethods``; the requests go out through a
``Send`` the proxy gives, which takes a gate slot per request and applies the retry policies
(auth error, rate limit, time limit) of any call. Here are the two loops and the answer:

* the chain reads 50 ``>ID`` pages a request and stops at the first short or empty page: what
  the batch returned after it came from references the portal resolved to a whole page, and is
  thrown away;
* plain pages read ``start=N`` pages 50 a request until a page has no ``next``
  (the offsets step by the method's own page size, which its first ``next`` gives).

A page the portal refused ends the fetch: a whole answer becomes the portal's error, a streamed
one ends with an error line, never silently short.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from sidecar.errors import BadPage, ListTooLarge, SidecarError
from sidecar.listmethods import BATCH, PAGE, ListMethod, Plan, api_page, items_key, records
from sidecar.portal import DEFAULT_PAUSE
from sidecar.replies import JSON_TYPE, Reply, Sink

log = structlog.get_logger("sidecar.wholelist")

# (method, parameters) -> (HTTP status, the portal's JSON answer, or None if it was not JSON)
Send = Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]
NDJSON_TYPE = "application/x-ndjson"
# The status a refused command inside a batch stands for (its own answer would have had it).
_STATUS_OF_ERROR = {
    "QUERY_LIMIT_EXCEEDED": 503, "OPERATION_TIME_LIMIT": 429, "expired_token": 401,
    "invalid_token": 401, "ERROR_METHOD_NOT_FOUND": 404, "NOT_FOUND": 404,
    "ACCESS_DENIED": 403, "insufficient_scope": 403, "INTERNAL_SERVER_ERROR": 500,
}


class PortalRefused(Exception):
    """The portal refused a page: its status and error body, relayed as they are."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        super().__init__(str(body.get("error", "")))
        self.status = status
        self.body = dict(body)


def _entry(container: Any, key: str) -> Any:
    """One command's entry in a batch answer's ``result`` or ``result_error`` (None: none)."""
    return container.get(key) if isinstance(container, Mapping) else None


def _as_id(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


@dataclass
class Fetch:
    """One whole-list fetch: the pages as they arrive, and what the answer needs to say."""

    plan: Plan
    send: Send
    pause: Callable[[str, float], Awaitable[None]]  # hold the method (OPERATION_TIME_LIMIT)
    items: str = ""
    requests: int = 0
    count: int = 0
    time: Any = None
    _key_known: bool = field(default=False, init=False)
    _held: int = field(default=0, init=False)  # time-limit refusals in a row

    async def pages(self) -> AsyncGenerator[list[Any], None]:
        """Yield each non-empty page of records, in order, until the list ends."""
        if self.plan.entry is not None:
            self.items = self.plan.entry.items
            self._key_known = True
        source = (self._api() if self.plan.api else
                  self._chain() if self.plan.chain else self._pages())
        async for page in source:
            self.count += len(page)
            self._held = 0
            yield page

    async def _batch(self, commands: dict[str, str]) -> tuple[Any, Any, Any]:
        """Send one batch; return its results, errors and nexts (refusal raised)."""
        status, data = await self._send("batch", {"halt": 1, "cmd": commands})
        inner = data.get("result") if isinstance(data, Mapping) else None
        if status != 200 or not isinstance(inner, Mapping):
            raise _refusal(status, data)
        return inner.get("result"), inner.get("result_error"), inner.get("result_next")

    async def _send(self, method: str, params: dict[str, Any]) -> tuple[int, Any]:
        self.requests += 1
        status, data = await self.send(method, params)
        if isinstance(data, Mapping) and "time" in data:
            self.time = data["time"]
        return status, data

    async def _failed(self, error: Any) -> bool:
        """Hold the method on a time limit (say so: the page is asked again); raise otherwise."""
        body = error if isinstance(error, Mapping) else {"error": "ERROR", "error_description":
                                                         str(error)}
        if body.get("error") == "OPERATION_TIME_LIMIT":
            # A command's refusal inside a batch does not say when the method comes back:
            # ask again after 1, 2, 4 ... 60 s (the batch's own time block is the batch's).
            self._held += 1
            await self.pause(self.plan.method.lower(),
                             min(2.0 ** (self._held - 1), DEFAULT_PAUSE))
            return True
        raise PortalRefused(_STATUS_OF_ERROR.get(str(body.get("error")), 400), body)

    async def _chain(self) -> AsyncGenerator[list[Any], None]:
        entry = self.plan.entry
        assert entry is not None
        cursor = self.plan.cursor
        count = self.plan.per_request()
        while True:
            results, errors, _ = await self._batch(
                Plan(self.plan.method, self.plan.params, entry, True, cursor).commands(
                    count=count))
            for index in range(count):
                key = f"p{index}"
                error = _entry(errors, key)
                if error is not None:
                    await self._failed(error)
                    break  # held: the gate waits the pause out, then from the cursor on
                page = self._page(_entry(results, key), entry)
                self._check_order(page, entry, cursor)
                if page:
                    yield page
                    cursor = page[-1][entry.record_id]
                if len(page) < PAGE:
                    return  # whatever followed a short page is not data

    async def _pages(self) -> AsyncGenerator[list[Any], None]:
        entry = self.plan.entry
        status, data = await self._send(self.plan.method, {**self.plan.params, "start": 0})
        if status != 200 or not isinstance(data, Mapping) or "result" not in data:
            raise _refusal(status, data)
        result = data["result"]
        if not self._key_known:
            self.items = items_key(result, entry)
            self._key_known = True
        page = self._page(result, entry)
        if page:
            yield page
        total = data.get("total")
        start = data.get("next")
        # The method's page size is what its first next says (50 for nearly all). A page may
        # come short and still say more follow: next alone ends the list.
        step = start if isinstance(start, int) and start > 0 else PAGE
        most = self.plan.per_request()
        while isinstance(start, int) and start > 0:
            left = (total - start) if isinstance(total, int) else step * BATCH
            count = min(most, max(1, math.ceil(left / step)))
            results, errors, nexts = await self._batch(
                Plan(self.plan.method, self.plan.params, entry, False).commands(
                    start, count, step))
            first = start
            for index in range(count):
                key = f"p{index}"
                error = _entry(errors, key)
                if error is not None:
                    await self._failed(error)
                    break  # held: this page is asked again after the pause
                page = self._page(_entry(results, key), entry)
                if page:
                    yield page
                following = _entry(nexts, key)
                if not isinstance(following, int) or following <= 0:
                    return
                asked = first + index * step
                if following <= asked:
                    raise BadPage(
                        f"the portal's pages of {self.plan.method} do not move on (next "
                        f"{following} after start {asked}): the list cannot be paged")
                start = following
                if following != asked + step:
                    break  # the pages after it started elsewhere: go on from this next

    async def _api(self) -> AsyncGenerator[list[Any], None]:
        """REST 3.0: one page a request (its batch fails whole), up to 1,000 records. The
        answer says nothing of more pages, and a method may give fewer than asked for: the
        list ends at an empty page or one shorter than the longest seen."""
        entry = self.plan.entry
        assert entry is not None
        cursor: Any = None
        offset = longest = 0
        while True:
            status, data = await self._send(self.plan.method,
                                            api_page(self.plan, cursor, offset))
            if status != 200 or not isinstance(data, Mapping) or "result" not in data:
                raise _refusal(status, data)
            page = self._page(data["result"], entry)
            if self.plan.chain:
                self._check_order(page, entry, cursor)
            if page:
                yield page
            longest = max(longest, len(page))
            if not page or len(page) < longest:
                return
            offset += len(page)
            cursor = page[-1][entry.record_id] if self.plan.chain else None

    def _page(self, result: Any, entry: ListMethod | None) -> list[Any]:
        page = records(result, entry)
        if page is None:
            raise BadPage(
                f"the portal's answer to {self.plan.method} is not a page of a list: whole "
                "lists are for list methods (their result a list, or one list in an object)")
        return page

    @staticmethod
    def _check_order(page: list[Any], entry: ListMethod, cursor: Any) -> None:
        """A chain's page must carry ids above the cursor, ascending: the proof the portal
        applied the ``>ID`` filter (a page that does not would repeat records)."""
        last = _as_id(cursor)
        for record in page:
            value = _as_id(record.get(entry.record_id)) if isinstance(record, Mapping) else None
            if value is None or (last is not None and value <= last):
                raise BadPage(
                    f"the portal's pages of {entry.name} are not ordered by "
                    f"{entry.record_id} above the last one seen: the whole list cannot be "
                    "fetched by id; ask with an order by another field to page by offset")
            last = value


def _refusal(status: int, data: Any) -> PortalRefused | BadPage:
    if isinstance(data, Mapping) and isinstance(data.get("error"), str | Mapping):
        return PortalRefused(status if status >= 400 else 400, data)
    return BadPage(f"the portal answered HTTP {status} without a REST answer")


async def answer_whole(fetch: Fetch, request_id: str, limit: int) -> Reply:
    """Fetch every page; answer the method's own shape with all records, ``total`` their
    number, no ``next``. Past ``limit`` bytes: ListTooLarge."""
    # One growing buffer, not a list of pieces joined at the end: the answer is held about
    # twice over at its peak (the buffer, then the body), not four times.
    records = bytearray()
    count = 0
    try:
        async for page in fetch.pages():
            for record in page:
                if count:
                    records += b","
                records += json.dumps(record, ensure_ascii=False).encode()
                count += 1
                if len(records) > limit:
                    raise ListTooLarge(
                        f"the whole list is larger than SIDECAR_LIST_MAX ({limit} bytes) after "
                        f"{count} records: ask for it streamed (Accept: {NDJSON_TYPE}), narrow "
                        "the filter, or raise the limit")
    except PortalRefused as exc:
        return Reply(exc.status, [JSON_TYPE, ("X-Request-ID", request_id)],
                     json.dumps(exc.body).encode())
    head = (b'{"result":{' + json.dumps(fetch.items).encode() + b":["
            if fetch.items else b'{"result":[')
    tail: dict[str, Any] = {"total": count}
    if fetch.time is not None:
        tail["time"] = fetch.time
    end = (b"]}," if fetch.items else b"],") + json.dumps(tail)[1:].encode()
    body = b"".join((head, records, end))
    del records
    return Reply(200, [JSON_TYPE, ("X-Request-ID", request_id),
                       ("X-Bitrix-Requests", str(fetch.requests))], body)


async def answer_streamed(fetch: Fetch, sink: Sink, request_id: str, *,
                          api: bool = False, write_timeout: float = 75.0) -> Reply:
    """Stream one record per line as pages arrive; a failure after the first line ends the
    answer with an error line. Before it, the failure is the answer.

    A client that reads nothing for ``write_timeout`` seconds is cut off, and the fetch stops:
    it holds one request's records at most, and not for ever.
    """
    pages = fetch.pages()
    try:
        first = await anext(pages, None)
    except PortalRefused as exc:
        return Reply(exc.status, [JSON_TYPE, ("X-Request-ID", request_id)],
                     json.dumps(exc.body).encode())
    await sink.start(200, "OK", [("Content-Type", f"{NDJSON_TYPE}; charset=utf-8"),
                                 ("X-Request-ID", request_id), ("Cache-Control", "no-store")],
                     None)
    page = first
    try:
        while page is not None:
            chunk = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in page)
            await asyncio.wait_for(sink.write(chunk), write_timeout)
            page = await anext(pages, None)
        await sink.finish()
    except ConnectionResetError:
        pass  # the client left: fetching stops here
    except TimeoutError:
        log.info("whole_list_reader_stalled", request_id=request_id, records=fetch.count,
                 seconds=write_timeout)
        sink.cut()
    except PortalRefused as exc:
        await _last_line(sink, exc.body)
    except SidecarError as exc:
        log.warning("whole_list_cut_short", request_id=request_id, records=fetch.count,
                    error=exc.code)
        await _last_line(sink, {"error": {"code": exc.code, "message": exc.description},
                                "error_description": exc.description} if api else
                         {"error": exc.code, "error_description": exc.description})
    finally:
        await pages.aclose()
    return Reply(200, [], None)


async def _last_line(sink: Sink, error: Mapping[str, Any]) -> None:
    """End a streamed list with the error that cut it short."""
    try:
        await sink.write(json.dumps(dict(error)).encode() + b"\n")
        await sink.finish()
    except ConnectionResetError:
        pass  # the client left meanwhile: nobody to tell
