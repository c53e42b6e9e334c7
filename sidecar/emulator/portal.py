"""A small Bitrix24 portal and OAuth server in one aiohttp app, faithful to the wire protocol.

Tests (and local experiments) point the sidecar at it instead of a real portal. All state lives on
the `Emulator` instance, so a test can inspect and poke it while the app is serving.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiohttp import web
from yarl import URL

from sidecar import phpquery
from sidecar.emulator.model import (
    Caller,
    EmulatorStats,
    Method,
    MethodResult,
    OAuthFailure,
    RestCall,
    RestError,
)
from sidecar.emulator.oauth import IssuedPair, OAuthServer
from sidecar.emulator.wire import (
    Route,
    body_params,
    credentials,
    iso,
    parse_route,
    render,
    render_xml,
    time_block,
)

__all__ = [
    "BATCH_MAX_LENGTH",
    "EMULATOR_KEY",
    "PAGE_SIZE",
    "Emulator",
    "EmulatorStats",
    "IssuedPair",
    "OAuthFailure",
    "RestCall",
    "render_xml",
    "run_emulator",
]

PAGE_SIZE = 50
BATCH_MAX_LENGTH = 50
_Ordered = TypeVar("_Ordered", float, str)

_FILTER_KEY = re.compile(r"(>=|<=|!=|>|<|!|=|%)?(.*)", re.DOTALL)
_RESULT_REF = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")
_REF_SEGMENT = re.compile(r"\[([^\]]*)\]")

_LEAD_FIELDS = (
    "ID",
    "TITLE",
    "HONORIFIC",
    "NAME",
    "SECOND_NAME",
    "LAST_NAME",
    "COMPANY_TITLE",
    "SOURCE_ID",
    "STATUS_ID",
    "OPENED",
    "CURRENCY_ID",
    "OPPORTUNITY",
    "HAS_PHONE",
    "HAS_EMAIL",
    "ASSIGNED_BY_ID",
    "CREATED_BY_ID",
    "MODIFY_BY_ID",
    "DATE_CREATE",
    "DATE_MODIFY",
    "COMMENTS",
)
_MULTI_FIELDS = ("PHONE", "EMAIL", "WEB", "IM")
_READ_ONLY_FIELDS = frozenset({"ID", "DATE_CREATE", "DATE_MODIFY", "HAS_PHONE", "HAS_EMAIL"})


def _php_map(items: dict[str, Any]) -> Any:
    """Serialize a keyed map as PHP's json_encode would: `[]` when empty, a list when 0..n-1."""
    if all(key == str(i) for i, key in enumerate(items)):
        return list(items.values())
    return items


def _truthy(value: Any) -> bool:
    """Read a flag the way PHP casts a request value to bool."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def _number(value: Any) -> float | None:
    """Read a value as a number if it looks like one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def _equal(actual: Any, expected: Any) -> bool:
    """Compare a stored field with a filter value, numerically when both are numbers."""
    a, b = _number(actual), _number(expected)
    if a is not None and b is not None:
        return a == b
    return ("" if actual is None else str(actual)) == str(expected)


def _compare(op: str, actual: Any, expected: Any) -> bool:
    """Apply one filter operator to one stored value."""
    if op in ("", "="):
        if isinstance(expected, list):
            return any(_equal(actual, e) for e in expected)
        return _equal(actual, expected)
    if op == "%":
        return str(expected).lower() in ("" if actual is None else str(actual)).lower()
    a, b = _number(actual), _number(expected)
    if a is not None and b is not None:
        return _ordered(op, a, b)
    return _ordered(op, "" if actual is None else str(actual), str(expected))


def _ordered(op: str, left: _Ordered, right: _Ordered) -> bool:
    """Apply an ordering operator (>, <, >=, <=) to two values of one type."""
    if op == ">":
        return left > right
    if op == "<":
        return left < right
    if op == ">=":
        return left >= right
    return left <= right


def _matches(view: Mapping[str, Any], conditions: Mapping[str, Any]) -> bool:
    """Tell whether a lead passes every filter condition."""
    for raw_key, expected in conditions.items():
        match = _FILTER_KEY.fullmatch(str(raw_key))
        op, name = (match.group(1) or "", match.group(2)) if match else ("", str(raw_key))
        actual = view.get(name, view.get(name.upper()))
        # Multi-fields (PHONE, EMAIL) match when any of their values does.
        values = (
            [item.get("VALUE") for item in actual if isinstance(item, Mapping)]
            if isinstance(actual, list)
            else [actual]
        )
        if op in ("!", "!="):
            if any(_compare("=", v, expected) for v in values):
                return False
        elif not any(_compare(op, v, expected) for v in values):
            return False
    return True


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Order None first, then numbers, then strings, without comparing across types."""
    if value is None:
        return (0, 0.0, "")
    number = _number(value)
    if number is not None:
        return (1, number, "")
    return (2, 0.0, str(value))


def _field_key(name: str) -> Callable[[Mapping[str, Any]], tuple[int, float, str]]:
    """Return a sort key reading one field of a lead view."""

    def key(view: Mapping[str, Any]) -> tuple[int, float, str]:
        """Sort by the named field."""
        return _sort_key(view.get(name))

    return key


def _names(value: Any) -> list[str]:
    """Read a `select` parameter given as a list, a PHP map or a single name."""
    if isinstance(value, Mapping):
        return [str(v) for v in value.values()]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value:
        return [value]
    return []


def _id_param(params: Mapping[str, Any]) -> int:
    """Read a positive integer `id` (or `ID`) parameter."""
    raw = params.get("id", params.get("ID"))
    if isinstance(raw, str | int) and not isinstance(raw, bool):
        text = str(raw).strip()
        if text.isascii() and text.isdigit() and int(text) > 0:
            return int(text)
    raise RestError(400, "", "ID is not defined or invalid.")


def _fields_param(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Read the `fields` map a crm add/update needs."""
    fields = params.get("fields")
    if isinstance(fields, Mapping):
        return fields
    raise RestError(400, "", "Parameter 'fields' must be array.")


def _stored(value: Any) -> Any:
    """Store a scalar the way Bitrix hands it back: as a string, booleans as Y/N."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, int | float):
        return str(value)
    return value


class Emulator:
    """A Bitrix24 portal and its OAuth server, both served by `create_app()`."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        access_ttl: float = 3600,
        code_ttl: float = 30,
        rate: float | None = None,
        burst: int = 50,
        call_delay: float = 0.0,
    ) -> None:
        """Set up an empty portal; register apps and webhooks before use."""
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.call_delay = call_delay
        self.stats = EmulatorStats()
        self.rest_log: list[RestCall] = []
        self._oauth = OAuthServer(
            clock=clock, stats=self.stats, access_ttl=access_ttl, code_ttl=code_ttl
        )
        self._webhooks: set[tuple[int, str]] = set()
        self._injected: collections.deque[RestError] = collections.deque()
        self._bucket_level = 0.0
        self._bucket_at: float | None = None
        self._blocked: dict[str, float] = {}  # method -> clock() its time budget resets
        self._leads: dict[int, dict[str, Any]] = {}
        self._next_lead_id = 1
        self._next_multi_id = 1
        self._methods: dict[str, Method] = {
            "batch": Method(None, self._batch),
            "profile": Method(None, self._profile),
            "user.current": Method("user", self._user_current),
            "app.info": Method(None, self._app_info),
            "crm.lead.add": Method("crm", self._lead_add),
            "crm.lead.get": Method("crm", self._lead_get),
            "crm.lead.list": Method("crm", self._lead_list),
            "crm.lead.update": Method("crm", self._lead_update),
            "crm.lead.delete": Method("crm", self._lead_delete),
        }

    # -- test controls -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The address the emulator is served at ("" until bound)."""
        return self._oauth.base_url

    @property
    def member_id(self) -> str:
        """The portal's member_id, as token answers and install events carry it."""
        return self._oauth.member_id

    @property
    def access_ttl(self) -> float:
        """Seconds an access token lives."""
        return self._oauth.access_ttl

    @access_ttl.setter
    def access_ttl(self, seconds: float) -> None:
        self._oauth.access_ttl = seconds

    @property
    def code_ttl(self) -> float:
        """Seconds an authorization code can be traded."""
        return self._oauth.code_ttl

    @code_ttl.setter
    def code_ttl(self, seconds: float) -> None:
        self._oauth.code_ttl = seconds

    @property
    def oauth_failure(self) -> OAuthFailure | None:
        """A failure every token request answers with, until set back to None."""
        return self._oauth.failure

    @oauth_failure.setter
    def oauth_failure(self, failure: OAuthFailure | None) -> None:
        self._oauth.failure = failure

    @property
    def oauth_slow_seconds(self) -> float:
        """How long a token request waits under the "slow" failure."""
        return self._oauth.slow_seconds

    @oauth_slow_seconds.setter
    def oauth_slow_seconds(self, seconds: float) -> None:
        self._oauth.slow_seconds = seconds

    def bind(self, base_url: str) -> None:
        """Set the address the emulator is served at, as it appears in tokens and redirects."""
        self._oauth.base_url = base_url.rstrip("/")

    def register_app(
        self,
        client_id: str,
        client_secret: str,
        *,
        scope: str = "crm,user",
        redirect_uri: str | None = None,
    ) -> None:
        """Install an application on the portal."""
        self._oauth.register_app(client_id, client_secret, scope=scope, redirect_uri=redirect_uri)

    def issue_code(self, client_id: str) -> str:
        """Issue an authorization code as if a person approved the app in a browser now."""
        return self._oauth.issue_code(client_id)

    def issue_tokens(self, client_id: str) -> dict[str, Any]:
        """Mint a token pair without a code, as ONAPPINSTALL delivers one; return the token body."""
        return self._oauth.issue_tokens(client_id)

    def application_token(self, client_id: str) -> str:
        """Return the token the portal signs this app's events with."""
        app = self._oauth.app(client_id)
        if app is None:
            raise KeyError(client_id)
        return app.application_token

    async def send_install_event(
        self, url: str, client_id: str, *, ui: bool = False, event: str = "ONAPPINSTALL",
        application_token: str | None = None, member_id: str | None = None,
        client_endpoint: str | None = None,
    ) -> tuple[int, str]:
        """POST an install event to an app's handler, as the portal does; return status and body.

        ``ui=False`` sends the server-side ``ONAPPINSTALL`` event (``auth[...]`` fields);
        ``ui=True`` sends what a UI app's install page receives (``AUTH_ID``, ``REFRESH_ID``, ...).
        The keyword overrides forge a field, for tests of the receiver's checks.
        """
        import aiohttp  # noqa: PLC0415 - only this test control needs a client

        pair = self.issue_tokens(client_id)
        authority = URL(self.base_url).raw_authority
        query: dict[str, str] = {}
        if ui:
            protocol = "1" if self.base_url.startswith("https") else "0"
            query = {"DOMAIN": authority, "PROTOCOL": protocol, "LANG": "en",
                     "APP_SID": secrets.token_hex(8)}
            form = {
                "AUTH_ID": pair["access_token"], "AUTH_EXPIRES": str(pair["expires_in"]),
                "REFRESH_ID": pair["refresh_token"],
                "member_id": member_id or pair["member_id"], "status": "L",
                "PLACEMENT": "DEFAULT", "PLACEMENT_OPTIONS": "{}",
            }
        else:
            signed = application_token or self.application_token(client_id)
            auth = {**pair, "application_token": signed, "domain": authority}
            if member_id is not None:
                auth["member_id"] = member_id
            if client_endpoint is not None:
                auth["client_endpoint"] = client_endpoint
            form = {"event": event, "data[VERSION]": "1", "data[ACTIVE]": "Y",
                    "data[INSTALLED]": "Y", "data[LANGUAGE_ID]": "en",
                    "ts": str(int(self.clock()))}
            form |= {f"auth[{key}]": str(value) for key, value in auth.items()}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, params=query, data=form, allow_redirects=False) as response,
        ):
            return response.status, await response.text()

    def block_method(self, method: str, seconds: float) -> None:
        """Use up a method's time budget: it answers 429 OPERATION_TIME_LIMIT for ``seconds``."""
        self._blocked[method.lower()] = self.clock() + seconds

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer 401 expired_token."""
        self._oauth.expire_access_tokens()

    def revoke_access_token(self, access_token: str) -> None:
        """Forget one access token, so it answers 401 invalid_token as if rotated away elsewhere."""
        self._oauth.revoke_access_token(access_token)

    def fail_next_rest(
        self, status: int, error: str, description: str = "Injected failure"
    ) -> None:
        """Queue an error answer for the next REST request, which is then logged but not run."""
        self._injected.append(RestError(status, error, description))

    def issued_secrets(self) -> list[str]:
        """List every code, access token and refresh token issued so far, oldest first."""
        return self._oauth.issued_secrets()

    def revoke_refresh_tokens(self) -> None:
        """Make every refresh token issued so far answer invalid_grant."""
        self._oauth.revoke_refresh_tokens()

    def register_webhook(self, user_id: int, code: str) -> None:
        """Create an inbound webhook served at /rest/{user_id}/{code}/{method}."""
        self._webhooks.add((user_id, code))

    def current_tokens(self) -> list[IssuedPair]:
        """List the pairs whose refresh token is still usable, oldest first."""
        return self._oauth.current_tokens()

    @property
    def leads(self) -> dict[int, dict[str, Any]]:
        """Expose stored leads by ID, for assertions."""
        return self._leads

    def create_app(self) -> web.Application:
        """Build a fresh aiohttp application serving this emulator's state."""
        app = web.Application()
        app[EMULATOR_KEY] = self
        for path in ("/oauth/token/", "/oauth/token"):
            app.router.add_get(path, self._oauth.handle_token, allow_head=False)
            app.router.add_post(path, self._oauth.handle_token)
        for path in ("/oauth/authorize/", "/oauth/authorize"):
            app.router.add_get(path, self._oauth.handle_authorize, allow_head=False)
        app.router.add_get("/rest/{tail:.*}", self._handle_rest, allow_head=False)
        app.router.add_post("/rest/{tail:.*}", self._handle_rest)
        return app

    # -- REST ----------------------------------------------------------------------------------

    def _authenticate(self, route: Route, token: str | None) -> Caller:
        """Check webhook credentials or the access token; raise the Bitrix 401 on failure."""
        if route.webhook is not None:
            if route.webhook not in self._webhooks:
                raise RestError(401, "INVALID_CREDENTIALS", "Invalid request credentials")
            return Caller(None, None, route.webhook[0])
        if token is None:
            raise RestError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        return self._oauth.caller_for(token)

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

    def _run(self, caller: Caller, method: str, params: dict[str, Any]) -> MethodResult:
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

    async def _handle_rest(self, request: web.Request) -> web.Response:
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
            answer = self._run(caller, route.method, params)
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

    # -- methods -------------------------------------------------------------------------------

    def _profile(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Answer `profile` for the fixed admin user."""
        return MethodResult(
            {
                "ID": str(caller.user_id),
                "ADMIN": True,
                "NAME": "Admin",
                "LAST_NAME": "Emulator",
                "PERSONAL_GENDER": "",
                "TIME_ZONE": "",
                "TIME_ZONE_OFFSET": 0,
            }
        )

    def _user_current(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Answer `user.current` for the fixed admin user."""
        return MethodResult(
            {
                "ID": str(caller.user_id),
                "XML_ID": None,
                "ACTIVE": True,
                "NAME": "Admin",
                "LAST_NAME": "Emulator",
                "SECOND_NAME": "",
                "EMAIL": "admin@example.com",
                "ADMIN": True,
                "IS_ONLINE": "Y",
                "TIME_ZONE": "",
                "TIME_ZONE_OFFSET": "0",
                "UF_DEPARTMENT": [1],
                "USER_TYPE": "employee",
            }
        )

    def _app_info(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Answer `app.info` for the calling application."""
        app = self._oauth.app(caller.client_id) if caller.client_id is not None else None
        return MethodResult(
            {
                "ID": "1",
                "CODE": app.client_id if app is not None else "",
                "VERSION": 1,
                "STATUS": "L",
                "INSTALLED": True,
                "PAYMENT_EXPIRED": "N",
                "DAYS": None,
                "LANGUAGE_ID": "en",
                "LICENSE": "en_project",
                "LICENSE_TYPE": "project",
                "LICENSE_FAMILY": "project",
                "SCOPE": app.scope.split(",") if app is not None else [],
            }
        )

    def _merge_multi(self, current: Any, value: Any, type_id: str) -> list[dict[str, str]]:
        """Apply a PHONE/EMAIL-style update: new items append, items with ID update or delete."""
        items: list[dict[str, str]] = list(current) if isinstance(current, list) else []
        given = list(value.values()) if isinstance(value, Mapping) else value
        if not isinstance(given, list):
            return items
        for raw in given:
            entry = raw if isinstance(raw, Mapping) else {"VALUE": raw}
            text = "" if entry.get("VALUE") is None else str(entry.get("VALUE"))
            kind = str(entry.get("VALUE_TYPE") or "WORK")
            known = next((i for i in items if i["ID"] == str(entry.get("ID", ""))), None)
            if known is not None:
                if text:
                    known.update(VALUE=text, VALUE_TYPE=kind)
                else:
                    items.remove(known)
            elif text:
                item_id = str(self._next_multi_id)
                self._next_multi_id += 1
                items.append({"ID": item_id, "VALUE_TYPE": kind, "VALUE": text, "TYPE_ID": type_id})
        return items

    def _apply_fields(self, lead: dict[str, Any], fields: Mapping[str, Any]) -> None:
        """Store given lead fields, keeping what is given and ignoring read-only ones."""
        for raw_key, value in fields.items():
            key = str(raw_key)
            if key.upper() in _READ_ONLY_FIELDS:
                continue
            if key.upper() in _MULTI_FIELDS:
                key = key.upper()
                lead[key] = self._merge_multi(lead.get(key), value, key)
            else:
                lead[key] = _stored(value)
        lead["DATE_MODIFY"] = iso(self.clock())

    def _lead_view(self, lead: Mapping[str, Any]) -> dict[str, Any]:
        """Return a lead as crm.lead.get shows it: all standard fields, then extras."""
        view: dict[str, Any] = {name: lead.get(name) for name in _LEAD_FIELDS}
        view["HAS_PHONE"] = "Y" if lead.get("PHONE") else "N"
        view["HAS_EMAIL"] = "Y" if lead.get("EMAIL") else "N"
        for key, value in lead.items():
            if key not in view and (key not in _MULTI_FIELDS or value):
                view[key] = value
        return view

    def _find_lead(self, params: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Look up the lead named by `id`, raising Bitrix's errors."""
        lead_id = _id_param(params)
        lead = self._leads.get(lead_id)
        if lead is None:
            raise RestError(400, "", "Not found")
        return lead_id, lead

    def _lead_add(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Create a lead; the result is its new integer ID."""
        fields = _fields_param(params)
        lead_id = self._next_lead_id
        self._next_lead_id += 1
        now = iso(self.clock())
        user = str(caller.user_id)
        lead: dict[str, Any] = {
            "ID": str(lead_id),
            "STATUS_ID": "NEW",
            "OPENED": "Y",
            "ASSIGNED_BY_ID": user,
            "CREATED_BY_ID": user,
            "MODIFY_BY_ID": user,
            "DATE_CREATE": now,
        }
        self._apply_fields(lead, fields)
        self._leads[lead_id] = lead
        return MethodResult(lead_id)

    def _lead_get(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Return one lead by `id`."""
        _, lead = self._find_lead(params)
        return MethodResult(self._lead_view(lead))

    def _lead_update(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Update a lead's fields; the result is true."""
        _, lead = self._find_lead(params)
        fields = _fields_param(params)
        lead["MODIFY_BY_ID"] = str(caller.user_id)
        self._apply_fields(lead, fields)
        return MethodResult(True)

    def _lead_delete(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Delete a lead; the result is true."""
        lead_id, _ = self._find_lead(params)
        del self._leads[lead_id]
        return MethodResult(True)

    def _lead_list(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """List leads in pages of 50 with filter, select, order and `start`."""
        conditions = params.get("filter")
        views = [self._lead_view(lead) for lead in self._leads.values()]
        if isinstance(conditions, Mapping):
            views = [v for v in views if _matches(v, conditions)]
        order = params.get("order")
        if isinstance(order, Mapping) and order:
            # Stable sorts applied from the last key to the first give a multi-key order.
            for name, direction in reversed(list(order.items())):
                views.sort(key=_field_key(str(name)), reverse=str(direction).upper() == "DESC")
        names = _names(params.get("select")) or ["*"]
        wanted = {n.upper() for n in names} | {"ID"}
        everything = "*" in wanted

        def pick(view: dict[str, Any]) -> dict[str, Any]:
            """Keep the selected fields; `*` means every field except multi-fields."""
            return {
                k: v
                for k, v in view.items()
                if k.upper() in wanted or (everything and k not in _MULTI_FIELDS)
            }

        start = int(_number(params.get("start")) or 0)
        if start == -1:
            # start=-1 asks Bitrix to skip counting: one page, no next, no total.
            return MethodResult([pick(v) for v in views[:PAGE_SIZE]])
        start = max(0, start)
        page = [pick(v) for v in views[start : start + PAGE_SIZE]]
        more = start + PAGE_SIZE < len(views)
        return MethodResult(page, next=start + PAGE_SIZE if more else None, total=len(views))

    def _resolve_refs(self, value: Any, results: Mapping[str, Any]) -> Any:
        """Replace `$result[key][field]` references to earlier batch results."""
        if isinstance(value, dict):
            return {k: self._resolve_refs(v, results) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_refs(v, results) for v in value]
        if not isinstance(value, str) or "$result[" not in value:
            return value

        def lookup(match: re.Match[str]) -> Any:
            """Follow one reference; an unresolvable one stays as written."""
            if match.group(1) not in results:
                return match.group(0)
            found: Any = results[match.group(1)]
            for segment in _REF_SEGMENT.findall(match.group(2)):
                if isinstance(found, Mapping) and segment in found:
                    found = found[segment]
                elif isinstance(found, list) and segment.isdigit() and int(segment) < len(found):
                    found = found[int(segment)]
                else:
                    return match.group(0)
            return found

        whole = _RESULT_REF.fullmatch(value)
        if whole is not None:
            return lookup(whole)
        return _RESULT_REF.sub(lambda m: str(lookup(m)), value)

    def _batch(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Run up to 50 commands, each as if called alone; later ones get LENGTH_EXCEEDED."""
        cmd = params.get("cmd")
        halt = _truthy(params.get("halt", 0))
        if isinstance(cmd, Mapping):
            commands = [(str(k), v) for k, v in cmd.items()]
        elif isinstance(cmd, list):
            commands = [(str(i), v) for i, v in enumerate(cmd)]
        else:
            commands = []
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        totals: dict[str, Any] = {}
        nexts: dict[str, Any] = {}
        times: dict[str, Any] = {}
        for index, (key, command) in enumerate(commands):
            start = self.clock()
            try:
                if index >= BATCH_MAX_LENGTH:
                    raise RestError(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded")
                if not isinstance(command, str):
                    raise RestError(400, "ERROR_ARGUMENT", "Batch command must be a string")
                name, _, query = command.partition("?")
                method = parse_route(name.strip().lstrip("/")).method
                if method == "batch":
                    raise RestError(
                        405,
                        "ERROR_BATCH_METHOD_NOT_ALLOWED",
                        "Method is not allowed for batch usage",
                    )
                if method not in self._methods:
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                command_params = self._resolve_refs(phpquery.parse_qs(query), results)
                answer = self._run(caller, method, command_params)
            except RestError as exc:
                errors[key] = exc.body()
                if halt:
                    break
                continue
            results[key] = answer.result
            if answer.total is not None:
                totals[key] = answer.total
            if answer.next is not None:
                nexts[key] = answer.next
            times[key] = time_block(start, self.clock())
        return MethodResult(
            {
                "result": _php_map(results),
                "result_error": _php_map(errors),
                "result_total": _php_map(totals),
                "result_next": _php_map(nexts),
                "result_time": _php_map(times),
            }
        )


EMULATOR_KEY = web.AppKey("emulator", Emulator)


@asynccontextmanager
async def run_emulator(
    emulator: Emulator, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the emulator on a real socket, bind it to its address and yield the base URL."""
    # A short shutdown timeout keeps teardown fast when a "slow" token answer is still sleeping.
    runner = web.AppRunner(emulator.create_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        base_url = f"http://{url_host}:{bound_port}"
        emulator.bind(base_url)
        yield base_url
    finally:
        await runner.cleanup()
