"""REST 3.0 (/rest/api/): tasks.task.get/list/add and batch, in the v3 wire shapes.

docs/rest-v3.md is the protocol this follows, and says where it rests on assumptions. The
endpoint shares v2's request log, counters, OAuth checks, leaky bucket, method time blocks and
injected failures (via `RestServer`), but has its own method table and answer shapes.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from sidecar.emulator.model import Caller, RestCall, RestError, TokenSource
from sidecar.emulator.rest import RestServer
from sidecar.emulator.wire import Route, iso, json_response, time_block

__all__ = ["PAGE_LIMIT_DEFAULT", "PAGE_LIMIT_MAX", "V3_BATCH_MAX_LENGTH", "Tasks", "V3Error",
           "V3Server"]

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 1000
V3_BATCH_MAX_LENGTH = 50

_PREFIX = "BITRIX_REST_V3_EXCEPTION_"
VALIDATION = _PREFIX + "VALIDATION_REQUESTVALIDATIONEXCEPTION"
INVALID_JSON = _PREFIX + "INVALIDJSONEXCEPTION"
UNKNOWN_PROPERTY = _PREFIX + "UNKNOWNDTOPROPERTYEXCEPTION"
UNKNOWN_OPERATOR = _PREFIX + "UNKNOWNFILTEROPERATOREXCEPTION"
INVALID_FILTER = _PREFIX + "INVALIDFILTEREXCEPTION"
INVALID_ORDER = _PREFIX + "INVALIDORDEREXCEPTION"
INVALID_PAGINATION = _PREFIX + "INVALIDPAGINATIONEXCEPTION"
INVALID_SELECT = _PREFIX + "INVALIDSELECTEXCEPTION"
NOT_FOUND = _PREFIX + "ENTITYNOTFOUNDEXCEPTION"
INSUFFICIENT_SCOPE = _PREFIX + "INSUFFICIENTSCOPEEXCEPTION"

# The TaskDto fields the emulator keeps, with the related objects a dotted `select` reaches.
_OWN_FIELDS = (
    "id", "title", "description", "creatorId", "created", "responsibleId", "deadline",
    "needsControl", "startPlan", "endPlan", "groupId", "priority", "status", "statusChanged",
    "parentId", "started", "estimatedTime", "changed", "closed", "activity", "guid", "mark",
    "allowsChangeDeadline", "allowsTimeTracking", "siteId", "link",
)
_RELATIONS = {"creator": "UserDto", "responsible": "UserDto", "group": "GroupDto"}
_RELATED_FIELDS = {
    "UserDto": ("id", "name", "lastName", "email", "active"),
    "GroupDto": ("id", "name"),
}
_SORTABLE = frozenset((
    "id", "title", "creatorId", "created", "responsibleId", "deadline", "startPlan", "endPlan",
    "groupId", "priority", "status", "started", "estimatedTime", "changed", "closed", "activity",
    "mark", "allowsChangeDeadline", "allowsTimeTracking",
))
_FILTERABLE = frozenset(("id",))
_OPERATORS = frozenset(("=", "!=", ">", ">=", "<", "<=", "in", "between"))
_PRIORITIES = ("low", "average", "high")


class V3Error(Exception):
    """A REST 3.0 error answer: HTTP status plus the `error` object."""

    def __init__(
        self, status: int, code: str, message: str,
        validation: list[dict[str, str]] | None = None,
    ) -> None:
        """Keep the status and the error object's fields."""
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.validation = validation

    def body(self) -> dict[str, Any]:
        """Return the v3 error body: an object with code, message and (maybe) validation."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.validation is not None:
            error["validation"] = self.validation
        return {"error": error}


class _TimeLimited(RestError):
    """429 OPERATION_TIME_LIMIT for a blocked method, knowing when its budget comes back."""

    def __init__(self, until: float) -> None:
        """Keep the time the block ends."""
        super().__init__(429, "OPERATION_TIME_LIMIT",
                         "Method is blocked due to operation time limit.")
        self.until = until


def _invalid(field: str, message: str) -> V3Error:
    """Build the request-validation error naming one field."""
    return V3Error(400, VALIDATION, "Error validating request object",
                   [{"message": message, "field": field}])


def _is_int(value: Any) -> bool:
    """Tell whether a JSON value is an integer (true/false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class _Task:
    """One stored task: the fields kept; the rest of TaskDto is derived or fixed."""

    id: int
    title: str
    description: str
    creator_id: int
    responsible_id: int
    created: float
    changed: float
    deadline: str | None
    priority: str
    status: str
    group_id: int | None


def _user(user_id: int) -> dict[str, Any]:
    """Describe a portal user as UserDto (the emulator keeps no user records)."""
    return {"id": user_id, "name": f"User{user_id}", "lastName": "Emulator",
            "email": f"user{user_id}@example.invalid", "active": True}


@dataclass(frozen=True)
class _Select:
    """A parsed `select`: own fields in order, and the related fields asked for by relation."""

    own: tuple[str, ...]
    related: tuple[tuple[str, tuple[str, ...]], ...]


def _parse_select(value: Any, default: tuple[str, ...]) -> _Select:
    """Read `select`; unknown own fields are dropped, unknown related fields are errors."""
    if value is None:
        return _Select(default, ())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid("select", "Field `select` requires data type `array` for this request")
    own: list[str] = []
    related: dict[str, list[str]] = {}
    for name in value:
        head, dot, tail = name.partition(".")
        if not dot:
            if name in _RELATIONS:
                related.setdefault(name, list(_RELATED_FIELDS[_RELATIONS[name]]))
            elif name in _OWN_FIELDS and name not in own:
                own.append(name)
            # An unknown field of the task itself is left out, not refused (docs/rest-v3.md).
            continue
        entity = _RELATIONS.get(head)
        if entity is None:
            raise V3Error(400, UNKNOWN_PROPERTY, f"Unknown field `{head}` for entity `TaskDto`")
        if tail not in _RELATED_FIELDS[entity]:
            raise V3Error(400, UNKNOWN_PROPERTY, f"Unknown field `{tail}` for entity `{entity}`")
        fields = related.setdefault(head, [])
        if tail not in fields:
            fields.append(tail)
    return _Select(tuple(own), tuple((k, tuple(v)) for k, v in related.items()))


Predicate = Callable[[int], bool]


def _condition(item: Any) -> tuple[Predicate, tuple[int, int] | None]:
    """Compile one filter element; return its test on a task id and the id range it allows."""
    if isinstance(item, Mapping):
        logic = str(item.get("logic", "and")).lower()
        conditions = item.get("conditions")
        if logic not in ("and", "or") or not isinstance(conditions, list) or not conditions:
            raise V3Error(400, INVALID_FILTER, "Unable to recognize the filter group")
        parts = [_condition(c)[0] for c in conditions]
        if logic == "or":
            return (lambda i: any(p(i) for p in parts)), None
        return (lambda i: all(p(i) for p in parts)), None
    if not isinstance(item, list) or len(item) not in (2, 3) or not isinstance(item[0], str):
        raise V3Error(400, INVALID_FILTER, f"Unable to recognize the filter condition "
                      f"`{json.dumps(item)}`")
    field = item[0]
    if len(item) == 2:
        op, value = ("in" if isinstance(item[1], list) else "="), item[1]
    else:
        op, value = item[1], item[2]
    if field not in _OWN_FIELDS and field not in _RELATIONS:
        raise V3Error(400, UNKNOWN_PROPERTY, f"Unknown field `{field}` for entity `TaskDto`")
    if field not in _FILTERABLE:
        raise _invalid(field, f"In DTO `TaskDto`, the `{field}` field requires the "
                       "`Filterable` attribute for such a request")
    if not isinstance(op, str) or op.lower() not in _OPERATORS:
        raise V3Error(400, UNKNOWN_OPERATOR, f"Unknown filter operator `{op}`")
    op = op.lower()
    if op in ("in", "between"):
        wanted = 2 if op == "between" else None
        if (not isinstance(value, list) or not all(_is_int(v) for v in value)
                or (wanted is not None and len(value) != wanted) or not value):
            raise _invalid(field, f"Field `{field}` requires data type `int[]` for this request")
        if op == "between":
            low, high = value
            return (lambda i: low <= i <= high), (low, high)
        members = frozenset(value)
        return (lambda i: i in members), (min(value), max(value))
    if not _is_int(value):
        raise _invalid(field, f"Field `{field}` requires data type `int` for this request")
    n: int = value
    tests: dict[str, tuple[Predicate, tuple[int, int] | None]] = {
        "=": ((lambda i: i == n), (n, n)),
        "!=": ((lambda i: i != n), None),
        ">": ((lambda i: i > n), (n + 1, _MAX_ID)),
        ">=": ((lambda i: i >= n), (n, _MAX_ID)),
        "<": ((lambda i: i < n), (_MIN_ID, n - 1)),
        "<=": ((lambda i: i <= n), (_MIN_ID, n)),
    }
    return tests[op]


_MIN_ID = -(2**63)
_MAX_ID = 2**63


def _parse_filter(value: Any) -> tuple[Predicate, int, int]:
    """Read `filter` (ANDed elements); return its test and the id range it cannot leave."""
    if value is None:
        return (lambda _i: True), _MIN_ID, _MAX_ID
    if not isinstance(value, list):
        raise V3Error(400, INVALID_FILTER, "Unable to recognize the filter parameter")
    parts: list[Predicate] = []
    low, high = _MIN_ID, _MAX_ID
    for item in value:
        test, bounds = _condition(item)
        parts.append(test)
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
    return (lambda i: all(p(i) for p in parts)), low, high


def _parse_order(value: Any) -> list[tuple[str, bool]]:
    """Read `order` as (field, descending) pairs; default id ascending."""
    if value is None:
        return [("id", False)]
    if not isinstance(value, Mapping) or not value:
        raise V3Error(400, INVALID_ORDER,
                      f"Unable to recognize the sorting parameter `{json.dumps(value)}`")
    order: list[tuple[str, bool]] = []
    for field, direction in value.items():
        if (field not in _SORTABLE or not isinstance(direction, str)
                or direction.upper() not in ("ASC", "DESC")):
            raise V3Error(400, INVALID_ORDER,
                          f"Unable to recognize the sorting parameter `{json.dumps(value)}`")
        order.append((field, direction.upper() == "DESC"))
    return order


def _page_number(value: Any, key: str, raw: Any) -> int:
    """Read one pagination number: an integer, or a string of digits as PHP would take it."""
    if _is_int(value):
        number: int = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    else:
        raise V3Error(400, INVALID_PAGINATION, "Unable to recognize the pagination parameter "
                      f"`{json.dumps(raw)}`")
    if number < 0 or (key == "limit" and number == 0):
        raise V3Error(400, INVALID_PAGINATION, "Unable to recognize the pagination parameter "
                      f"`{json.dumps(raw)}`")
    return number


def _parse_pagination(value: Any, cap: int) -> tuple[int, int]:
    """Read `pagination` into (offset, limit); page is 1-based, limit at most `cap`."""
    if value is None:
        return 0, min(PAGE_LIMIT_DEFAULT, cap)
    if not isinstance(value, Mapping):
        raise V3Error(400, INVALID_PAGINATION, "Unable to recognize the pagination parameter "
                      f"`{json.dumps(value)}`")
    numbers = {key: _page_number(value[key], key, value)
               for key in ("page", "limit", "offset") if value.get(key) is not None}
    limit = min(numbers.get("limit", PAGE_LIMIT_DEFAULT), cap)
    # A page number wins over an offset; page 0 reads as the first page (b24jssdk sends it).
    page = numbers.get("page")
    return (numbers.get("offset", 0) if page is None else max(0, page - 1) * limit), limit


def _sort_key(value: Any) -> tuple[int, Any]:
    """Order None first, then by value."""
    return (0, 0) if value is None else (1, value)


class Tasks:
    """The portal's tasks and the REST 3.0 tasks.task.* methods over them."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        """Start with no tasks; `clock` stamps created and changed."""
        self._clock = clock
        self._tasks: dict[int, _Task] = {}
        self._ids: list[int] = []  # ascending: ids are handed out in increasing order
        self._next_id = 1
        # Pages of tasks.task.list never exceed this (b24jssdk reports 50 on real portals).
        self.page_cap = PAGE_LIMIT_MAX

    def __len__(self) -> int:
        """Count the stored tasks."""
        return len(self._tasks)

    def methods(self) -> dict[str, Callable[[Caller, dict[str, Any]], Any]]:
        """Name the REST 3.0 methods this part serves."""
        return {
            "tasks.task.get": self._get,
            "tasks.task.list": self._list,
            "tasks.task.add": self._add,
        }

    def add(
        self, *, title: str, creator_id: int, responsible_id: int, description: str = "",
        deadline: str | None = None, priority: str = "average", status: str = "pending",
        group_id: int | None = None,
    ) -> int:
        """Store one task; return its id."""
        task_id = self._next_id
        self._next_id += 1
        now = self._clock()
        self._tasks[task_id] = _Task(task_id, title, description, creator_id, responsible_id,
                                     now, now, deadline, priority, status, group_id)
        self._ids.append(task_id)
        return task_id

    def add_many(self, count: int, *, title: str = "Task {id}", responsible_id: int = 1,
                 creator_id: int = 1) -> range:
        """Store ``count`` tasks at once (titles formatted with their id); return their ids."""
        first = self._next_id
        now = self._clock()
        for task_id in range(first, first + count):
            self._tasks[task_id] = _Task(task_id, title.format(id=task_id), "", creator_id,
                                         responsible_id, now, now, None, "average", "pending",
                                         None)
        self._ids.extend(range(first, first + count))
        self._next_id = first + count
        return range(first, first + count)

    def view(self, task_id: int) -> dict[str, Any]:
        """Return a task's own fields as tasks.task.get answers them without `select`."""
        return self._render(self._tasks[task_id], _Select(_OWN_FIELDS, ()))

    # -- rendering -----------------------------------------------------------------------------

    def _own(self, task: _Task, field: str) -> Any:
        """Return one own field of a task, as REST 3.0 writes it."""
        stored = {
            "id": task.id, "title": task.title, "description": task.description,
            "creatorId": task.creator_id, "responsibleId": task.responsible_id,
            "created": iso(task.created), "changed": iso(task.changed),
            "activity": iso(task.changed), "deadline": task.deadline,
            "priority": task.priority, "status": task.status, "groupId": task.group_id or 0,
            "guid": "{" + str(uuid.UUID(int=task.id)) + "}",
            "link": f"/company/personal/user/{task.responsible_id}/tasks/task/view/{task.id}/",
        }
        if field in stored:
            return stored[field]
        fixed: dict[str, Any] = {
            "needsControl": False, "estimatedTime": 0, "mark": "none", "siteId": "s1",
            "allowsChangeDeadline": False, "allowsTimeTracking": False,
        }
        return fixed.get(field)

    def _key(self, field: str) -> Callable[[_Task], tuple[int, Any]]:
        """Return a sort key on one own field, None first."""
        return lambda task: _sort_key(self._own(task, field))

    def _render(self, task: _Task, select: _Select) -> dict[str, Any]:
        """Build a task object holding the selected fields."""
        item = {field: self._own(task, field) for field in select.own}
        for relation, fields in select.related:
            if relation == "group":
                target: dict[str, Any] | None = (
                    {"id": task.group_id, "name": f"Group{task.group_id}"}
                    if task.group_id else None
                )
            else:
                target = _user(task.creator_id if relation == "creator" else task.responsible_id)
            item[relation] = None if target is None else {f: target[f] for f in fields}
        return item

    # -- methods -------------------------------------------------------------------------------

    def _get(self, caller: Caller, params: dict[str, Any]) -> Any:
        """Answer tasks.task.get: {"item": {...}}."""
        if "id" not in params:
            raise _invalid("id", "Required field `id` is not specified")
        task_id = params["id"]
        if not _is_int(task_id):
            raise _invalid("id", "Field `id` requires data type `int` for this request")
        select = _parse_select(params.get("select"), _OWN_FIELDS)
        task = self._tasks.get(task_id)
        if task is None:
            raise V3Error(400, NOT_FOUND, f"Record with ID = `{task_id}` not found")
        return {"item": self._render(task, select)}

    def _list(self, caller: Caller, params: dict[str, Any]) -> Any:
        """Answer tasks.task.list: one page, {"items": [...]}, with no total and no next."""
        select = _parse_select(params.get("select"), ("id",))
        test, low, high = _parse_filter(params.get("filter"))
        order = _parse_order(params.get("order"))
        offset, limit = _parse_pagination(params.get("pagination"), self.page_cap)
        # The id range the filter allows narrows the scan, so deep pages of 100,000 stay cheap.
        lo_index = bisect.bisect_left(self._ids, low)
        hi_index = bisect.bisect_right(self._ids, high)
        span = self._ids[lo_index:hi_index]
        if [field for field, _ in order] == ["id"]:
            ids = reversed(span) if order[0][1] else iter(span)
            page = _take(filter(test, ids), offset, limit)
        else:
            found = [self._tasks[i] for i in span if test(i)]
            # Stable sorts, least significant key first, give the multi-field order.
            for field, descending in reversed(order):
                found.sort(key=self._key(field), reverse=descending)
            page = [t.id for t in found[offset:offset + limit]]
        return {"items": [self._render(self._tasks[i], select) for i in page]}

    def _add(self, caller: Caller, params: dict[str, Any]) -> Any:
        """Answer tasks.task.add: the created task as {"item": {...}}."""
        fields = params.get("fields")
        if not isinstance(fields, Mapping):
            raise _invalid("fields", "Required field `fields` is missing")
        for name in ("title", "creatorId", "responsibleId"):
            if fields.get(name) in (None, ""):
                raise _invalid(name, f"Required field `{name}` is missing")
        if not isinstance(fields["title"], str):
            raise _invalid("title", "Field `title` requires data type `string` for this request")
        for name in ("creatorId", "responsibleId", "groupId"):
            if name in fields and fields[name] is not None and not _is_int(fields[name]):
                raise _invalid(name, f"Field `{name}` requires data type `int` for this request")
        deadline = fields.get("deadline")
        if deadline is not None:
            try:
                datetime.fromisoformat(str(deadline))
            except ValueError:
                raise _invalid("deadline", "Field `deadline` requires data type `DateTime` "
                               "for this request") from None
        priority = fields.get("priority", "average")
        if priority not in _PRIORITIES:
            raise _invalid("priority", "Field `priority` requires one of "
                           f"{', '.join(_PRIORITIES)}")
        task_id = self.add(
            title=fields["title"], creator_id=fields["creatorId"],
            responsible_id=fields["responsibleId"],
            description=str(fields.get("description") or ""),
            deadline=None if deadline is None else str(deadline),
            priority=priority, group_id=fields.get("groupId"),
        )
        return {"item": self.view(task_id)}


def _take(ids: Iterator[int], offset: int, limit: int) -> list[int]:
    """Skip `offset` ids, then take up to `limit`."""
    page: list[int] = []
    for index, task_id in enumerate(ids):
        if index < offset:
            continue
        page.append(task_id)
        if len(page) >= limit:
            break
    return page


def _parse_route(tail: str) -> Route:
    """Split the part after /rest/api/ into the method and webhook credentials."""
    parts = tail.split("/")
    if len(parts) == 3 and parts[0].isascii() and parts[0].isdigit():
        return Route(parts[2].lower(), "json", (int(parts[0]), parts[1]), bool(parts[2]))
    if len(parts) == 1:
        return Route(parts[0].lower(), "json", None, bool(parts[0]))
    return Route(tail.lower(), "json", None, known_shape=False)


def _read_body(request: web.Request, body: bytes) -> tuple[Any, V3Error | None]:
    """Decode a JSON body (object or, for batch, array); anything else is INVALIDJSON."""
    if not body:
        return {}, None
    content_type = request.content_type
    if content_type != "application/json" and not content_type.endswith("+json"):
        return {}, V3Error(400, INVALID_JSON, "Request body must be JSON "
                           "(Content-Type: application/json)")
    try:
        data = json.loads(body)
    except ValueError:
        return {}, V3Error(400, INVALID_JSON, "Request body is not valid JSON")
    if not isinstance(data, dict | list):
        return {}, V3Error(400, INVALID_JSON, "Request body must be a JSON object or array")
    return data, None


_Handler = Callable[[Caller, dict[str, Any]], Any]


class V3Server:
    """One portal's /rest/api/ endpoint, on top of its v2 `RestServer`'s shared machinery."""

    def __init__(self, rest: RestServer, tasks: Tasks) -> None:
        """Serve `tasks`' methods and batch; log, limit and authenticate through `rest`."""
        self._rest = rest
        self._methods: dict[str, tuple[str | None, _Handler]] = {
            name: ("task", handler) for name, handler in tasks.methods().items()
        }
        # Answer auth, limit and method-not-found errors in v2's flat shape instead of v3's.
        self.flat_errors = False

    def _render_error(
        self, exc: RestError | V3Error, spent: dict[str, Any] | None = None
    ) -> web.Response:
        """Answer an error in the v3 shape (flat for pre-dispatch errors, if asked)."""
        payload: dict[str, Any]
        if isinstance(exc, V3Error):
            payload = exc.body()
        elif self.flat_errors:
            payload = dict(exc.body())
        else:
            payload = V3Error(exc.status, exc.error, exc.description).body()
        if spent is not None:
            payload["time"] = spent
        return json_response(exc.status, payload)

    def _check_budget(self, method: str) -> None:
        """Refuse a method whose time budget block_method() used up."""
        until = self._rest.blocked_until(method)
        if self._rest.clock() < until:
            self._rest.stats.time_limited += 1
            raise _TimeLimited(until)

    def _run(self, caller: Caller, method: str, params: Any) -> Any:
        """Run one method for a caller, checking its scope."""
        scope, handler = self._methods[method]
        if scope is not None and caller.scope is not None and scope not in caller.scope:
            raise V3Error(403, INSUFFICIENT_SCOPE,
                          f"The method `{method}` requires the `{scope}` scope")
        if not isinstance(params, dict):
            raise _invalid("", "The request body must be a JSON object")
        self._rest.stats.rest_calls[method] += 1
        return handler(caller, params)

    def _batch(self, caller: Caller, body: Any) -> list[Any]:
        """Run batch commands in order; the first failure fails the whole batch."""
        if isinstance(body, dict):
            if "cmd" in body:
                raise V3Error(400, INVALID_SELECT, "The `cmd` batch form is not supported "
                              "in REST 3.0: send an array of {method, query}")
            # What a JSON client makes of an array plus `auth`: keys "0", "1", ... (b24jssdk).
            commands = [body[key] for key in sorted(
                (k for k in body if k.isdigit()), key=int)]
        else:
            commands = list(body)
        if not commands:
            raise _invalid("", "The batch holds no commands")
        if len(commands) > V3_BATCH_MAX_LENGTH:
            raise V3Error(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
        self._rest.stats.rest_calls["batch"] += 1
        results: list[Any] = []
        for index, command in enumerate(commands):
            if not isinstance(command, Mapping) or not isinstance(command.get("method"), str):
                raise _invalid(f"{index}.method", "Each batch command needs a `method`")
            method = command["method"].lower()
            query = command.get("query", {})
            if method == "batch":
                raise V3Error(405, "ERROR_BATCH_METHOD_NOT_ALLOWED",
                              "Method is not allowed for batch usage")
            if method not in self._methods:
                raise V3Error(404, "ERROR_METHOD_NOT_FOUND", f"Method `{method}` not found")
            self._check_budget(method)
            results.append(self._run(caller, method, query if query is not None else {}))
        return results

    async def handle(self, request: web.Request) -> web.Response:
        """Serve /rest/api/...: log, check method, auth and rate limit, run, render."""
        start = self._rest.clock()
        raw = await request.read()
        route = _parse_route(request.match_info["tail"])
        body, body_error = _read_body(request, raw)
        auth = body.get("auth") if isinstance(body, dict) else None
        token = auth if isinstance(auth, str) and auth else None
        source: TokenSource | None = "auth" if token else None
        if route.webhook is not None:
            source = "webhook"
            token = None
        params = {k: v for k, v in body.items() if k != "auth"} if isinstance(body, dict) else {
            str(i): v for i, v in enumerate(body)}
        self._rest.stats.upstream_requests += 1
        self._rest.rest_log.append(RestCall(
            method=route.method, http_method=request.method, path=request.rel_url.raw_path,
            query=request.rel_url.raw_query_string, params=params, token=token,
            token_source=source,
            headers=dict(request.headers), body=raw, fmt="json", api="v3",
        ))
        try:
            injected = self._rest.take_injected()
            if injected is not None:
                raise injected
            if not route.known_shape or (
                    route.method != "batch" and route.method not in self._methods):
                raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
            if body_error is not None:
                raise body_error
            caller = self._rest.authenticate(route, token)
            if not self._rest.admit():
                self._rest.stats.limited += 1
                raise RestError(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            self._check_budget(route.method)
            if self._rest.call_delay > 0:
                await asyncio.sleep(self._rest.call_delay)
            if route.method == "batch":
                result: Any = self._batch(caller, body)
            else:
                result = self._run(caller, route.method, params)
        except _TimeLimited as exc:
            # As v2 does, the answer's time block says when the budget comes back.
            spent = time_block(start, self._rest.clock())
            spent |= {"operating": 480, "operating_reset_at": int(exc.until)}
            return self._render_error(exc, spent)
        except (RestError, V3Error) as exc:
            return self._render_error(exc)
        finish = self._rest.clock()
        response = json_response(200, {"result": result, "time": time_block(start, finish)})
        response.headers["X-Bitrix-Rest-Application"] = caller.client_id or "webhook"
        response.headers["X-Bitrix-Rest-Time"] = f"{max(0.0, finish - start):.6f}"
        return response
