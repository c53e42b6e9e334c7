"""The codec for batch coalescing: single REST calls in, one `batch` call out, single answers back.

Pure functions, no I/O. The proxy queues single calls, turns each into a batch command line with
`command_line` (None means "send this one alone"), posts `batch_body(lines)` to the portal's
`batch` method, and hands each caller its share of the answer from `split_answers`.

The rule throughout: coalescing must not change what a call does or what its caller sees. When a
call's parameters cannot be written as a form-encoded command line that the portal reads exactly as
it read the original request, the call is not coalesced.

* Parameters are merged like the portal merges them: the query string, then the body on top (a
  top-level key from the body replaces the query's). Form bodies and query strings are read the way
  PHP's ``parse_str`` reads them (``sidecar.phpquery``); JSON bodies the way ``json_decode`` does.
* Inside a batch the portal parses each command's query with ``parse_str``, so every value a method
  sees is a string. Strings and numbers survive that: JSON integers are written with ``str()``,
  floats with ``repr()`` (the shortest text that reads back as the same double), and Bitrix methods
  already take numbers as strings from every form-posting client. JSON ``true``, ``false`` and
  ``null`` do not: a PHP method sees a real boolean or null from a JSON body, and no form string
  behaves the same in every method (``true == 'Y'`` holds in PHP 8, ``'1' == 'Y'`` does not; CRM
  fields want ``Y``/``N``, user-field filters ``1``/``0``). The official SDKs disagree too: the PHP
  SDK's ``http_build_query`` writes ``1``/``0`` and drops null, the JS SDK's ``qs.stringify`` writes
  ``true``/``false`` (a truthy string in PHP, so ``false`` turns true) and ``key=`` for null, the
  Python SDK writes ``True``/``False`` and an empty string. fast_bitrix24 issue #265 is the failure
  in the wild: a filter with JSON booleans worked, the same filter packed into batch URLs silently
  matched nothing. Empty JSON arrays and objects have no form spelling at all (``a[]=`` is a
  one-element array). So a call carrying any of these is sent alone.
* The portal substitutes ``$result[key][field]`` references in a batch command's parameters with
  the results of other commands. A caller's value that happens to contain such a reference would be
  filled in with another caller's data, so a call with ``$name[`` anywhere in its keys or values is
  sent alone.
* Key names must survive too: PHP turns spaces and dots in a top-level name into ``_`` when it
  parses a form but not when it decodes JSON, and ``[``/``]`` inside a JSON key would be read as
  nesting. Such calls, and calls nested deeper than `MAX_DEPTH` or with more than `MAX_PAIRS`
  values (PHP's ``max_input_nesting_level`` and ``max_input_vars`` apply to ``parse_str``, not to
  JSON), are sent alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from sidecar import phpquery

__all__ = [
    "BATCH_ONLY_ERRORS",
    "LOST_ERROR",
    "LOST_STATUS",
    "MAX_COMMANDS",
    "MAX_COMMAND_LENGTH",
    "MAX_DEPTH",
    "MAX_PAIRS",
    "Answer",
    "SingleCall",
    "batch_body",
    "command_line",
    "error_status",
    "params_of",
    "split_answers",
]

MAX_COMMANDS = 50
MAX_COMMAND_LENGTH = 8192  # a command line longer than this is not coalesced
MAX_DEPTH = 32  # bracket levels below a top-level name; PHP's max_input_nesting_level is 64
MAX_PAIRS = 1000  # values in one command; PHP's max_input_vars is 1000

# Errors a command gets only because it ran inside a batch: the call did not run, and it would not
# have failed this way alone. The caller of `split_answers` should send such a call again, alone.
BATCH_ONLY_ERRORS = frozenset({"ERROR_BATCH_LENGTH_EXCEEDED", "ERROR_BATCH_METHOD_NOT_ALLOWED"})

# A command the portal's batch answer says nothing about. 502, like the sidecar's other "the
# portal's answer is unusable" errors; a 5xx so that no caller takes it for a method error, and the
# call must not be repeated blindly because it may have run.
LOST_STATUS = 502
LOST_ERROR = "SIDECAR_BATCH_LOST"
_LOST_DESCRIPTION = (
    "The portal's batch answer has neither a result nor an error for this call; "
    "it may or may not have run."
)

_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
_METHOD = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
# `$result[c0]` and its kin: what the batch method substitutes between commands.
_REFERENCE = re.compile(r"\$[A-Za-z_][A-Za-z0-9_]*\[")
_INT64 = 2**63

# HTTP status a method's error code comes with when the method is called alone
# (Bitrix24's REST docs, bitrix24/b24restdocs: error-codes.md and its table of system errors).
# ACCESS_DENIED is 401 only as the plan-level system error ("REST is available only on commercial
# plans"), which the portal raises before running anything, so it fails the whole batch request and
# never appears per command; inside result_error it can only come from a method, and methods answer
# ACCESS_DENIED with 403 ("System authorization and access errors arrive with status 401, method
# errors with 400 or 403"). ERROR_CORE, listed under 400 and 500, is a method error: 400.
_STATUS_BY_ERROR: dict[str, int] = {
    "EXPIRED_TOKEN": 401,
    "INVALID_TOKEN": 401,
    "NO_AUTH_FOUND": 401,
    "INSUFFICIENT_SCOPE": 401,
    "INVALID_CREDENTIALS": 401,
    "OVERLOAD_LIMIT": 401,
    "USER_ACCESS_ERROR": 401,
    "ACCESS_DENIED": 403,
    "WRONG_AUTH_TYPE": 403,
    "PORTAL_DELETED": 403,
    "ERROR_METHOD_NOT_FOUND": 404,
    "OPERATION_TIME_LIMIT": 429,
    "INTERNAL_SERVER_ERROR": 500,
    "ERROR_UNEXPECTED_ANSWER": 500,
    "QUERY_LIMIT_EXCEEDED": 503,
}


@dataclass(frozen=True)
class SingleCall:
    """One REST call as a client made it, with its credentials already removed."""

    method: str  # REST method as the client wrote it (any case, no .json suffix)
    query: str  # the client's raw query string, auth already stripped
    body: bytes  # the client's body (auth already stripped)
    content_type: str  # "application/x-www-form-urlencoded", "application/json", "" (no body) ...


@dataclass(frozen=True)
class Answer:
    """What one call would have been answered alone."""

    status: int
    body: bytes  # JSON, UTF-8


class _Unrepresentable(Exception):
    """A parameter with no exact form-encoded equivalent."""


def _media_type(content_type: str) -> str:
    """Return the bare, lower-case media type of a Content-Type value."""
    return content_type.split(";", 1)[0].strip().lower()


def _form_params(text: str) -> dict[str, Any] | None:
    """Parse a urlencoded string as PHP would; None if an escape is not UTF-8 (we'd alter it)."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        return None
    return phpquery.parse(pairs)


def _reject_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which PHP's json_decode does not accept."""
    raise ValueError(f"{name} is not JSON")


def _json_params(body: bytes) -> dict[str, Any] | None:
    """Decode a JSON object body as PHP's json_decode would accept it, else None."""
    try:
        # Strict UTF-8 and no BOM (json.loads refuses a str that starts with one), as PHP.
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        # A lone surrogate escape ("\ud800") is a json_decode error in PHP.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except ValueError:  # includes UnicodeError and JSONDecodeError
        return None
    return data if isinstance(data, dict) else None


def params_of(call: SingleCall) -> dict[str, Any] | None:
    """Merge query and body params the way the portal does (body wins at the top level).

    None if the call cannot be represented: a multipart or other non-form, non-JSON body, JSON that
    does not parse (or that PHP would not parse), a JSON body that is not an object, or
    percent-escapes that do not decode as UTF-8.
    """
    merged = _form_params(call.query)
    if merged is None:
        return None
    if not call.body:
        return merged
    media = _media_type(call.content_type)
    body: dict[str, Any] | None
    if media == _FORM:
        try:
            text = call.body.decode("utf-8")
        except UnicodeDecodeError:
            return None
        body = _form_params(text)
    elif media == _JSON or media.endswith("+json"):
        body = _json_params(call.body)
    else:
        return None
    if body is None:
        return None
    merged.update(body)
    return merged


def _check_text(text: str) -> None:
    """Refuse strings the portal would not read back unchanged from a batch command."""
    if _REFERENCE.search(text):
        raise _Unrepresentable("batch reference")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Unrepresentable("not UTF-8") from None


def _check_key(key: Any, *, top: bool) -> str:
    """Return a key that means the same as a form name segment, or refuse it."""
    if not isinstance(key, str) or not key:
        raise _Unrepresentable("empty or non-string key")
    if "[" in key or "]" in key or "\0" in key:
        raise _Unrepresentable("key with brackets or NUL")
    if top and (" " in key or "." in key):
        raise _Unrepresentable("top-level key PHP would rename")
    _check_text(key)
    return key


def _as_form(value: Any, depth: int, budget: list[int]) -> Any:
    """Return value with every scalar as the string the portal should see; refuse the rest."""
    if isinstance(value, str):
        _check_text(value)
        budget[0] -= 1
        if budget[0] < 0:
            raise _Unrepresentable("too many values")
        return value
    if isinstance(value, bool) or value is None:
        raise _Unrepresentable("boolean or null")
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise _Unrepresentable("integer PHP would read as a float")
        return _as_form(str(value), depth, budget)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Unrepresentable("non-finite number")
        return _as_form(repr(value), depth, budget)
    if depth >= MAX_DEPTH:
        raise _Unrepresentable("nested too deep")
    if isinstance(value, Mapping):
        if not value:
            raise _Unrepresentable("empty object")
        return {
            _check_key(k, top=False): _as_form(v, depth + 1, budget) for k, v in value.items()
        }
    if isinstance(value, list):
        if not value:
            raise _Unrepresentable("empty array")
        return [_as_form(v, depth + 1, budget) for v in value]
    raise _Unrepresentable(type(value).__name__)


def command_line(call: SingleCall) -> str | None:
    """Return the batch `cmd` value ``method?encoded_params`` (or just ``method``), or None.

    None means the call must not be coalesced: method ``batch`` (any case), a method name that is
    not plain dotted words or that carries a ``.json``/``.xml`` suffix, parameters `params_of`
    cannot read, parameters with no exact form spelling (see the module notes: booleans, null,
    empty arrays, batch references, renamed or bracketed keys, too deep or too many), or a line
    longer than MAX_COMMAND_LENGTH. The method is written in lower case, as the portal matches it.
    """
    method = call.method.lower()
    if (
        not _METHOD.fullmatch(method)
        or method == "batch"
        or method.endswith((".json", ".xml"))
    ):
        return None
    params = params_of(call)
    if params is None:
        return None
    budget = [MAX_PAIRS]
    try:
        form = {_check_key(k, top=True): _as_form(v, 0, budget) for k, v in params.items()}
    except _Unrepresentable:
        return None
    encoded = phpquery.encode(form)
    line = f"{method}?{encoded}" if encoded else method
    return line if len(line) <= MAX_COMMAND_LENGTH else None


def batch_body(lines: Sequence[str]) -> bytes:
    """Return the form body of the batch request: ``halt=0``, then ``cmd[c0]``..``cmd[cN]``.

    Each command line is itself one urlencoded value. Raise ValueError for no lines or more than
    MAX_COMMANDS.
    """
    if not lines or len(lines) > MAX_COMMANDS:
        raise ValueError(f"a batch takes 1 to {MAX_COMMANDS} commands, not {len(lines)}")
    pairs = [("halt", "0")] + [(f"cmd[c{i}]", line) for i, line in enumerate(lines)]
    return urlencode(pairs).encode("ascii")


def error_status(code: Any) -> int:
    """Return the HTTP status a method answers alone with this error code (400 when unknown)."""
    return _STATUS_BY_ERROR.get(str(code or "").upper(), 400)


def _keyed(value: Any) -> dict[str, Any]:
    """Read one of the batch's per-command maps; PHP sends an empty map as `[]`."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        # json_encode writes a map keyed 0..n-1 as a list.
        return {str(i): item for i, item in enumerate(value)}
    return {}


def _json(payload: Mapping[str, Any]) -> bytes:
    """Encode an answer body as UTF-8 JSON."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate the portal escaped: keep it escaped.
        return json.dumps(payload).encode("ascii")


def _error_answer(entry: Any) -> Answer:
    """Turn one result_error entry into the error answer the method gives alone."""
    if isinstance(entry, Mapping):
        body: dict[str, Any] = {
            "error": entry.get("error", ""),
            "error_description": entry.get("error_description", ""),
        }
        body.update((k, v) for k, v in entry.items() if k not in body)
    elif isinstance(entry, str):
        body = {"error": entry, "error_description": ""}
    else:
        body = {"error": "", "error_description": ""}
    return Answer(error_status(body["error"]), _json(body))


def split_answers(payload: bytes, count: int) -> list[Answer]:
    """Turn the batch's 200 answer into `count` answers, one per command c0..c{count-1}.

    * In ``result_error``: the error body (``error``, ``error_description``, then any other fields
      of the entry), with the status the method would have answered alone (`error_status`). A
      string entry is taken as the error code. An error wins over a result under the same key.
    * In ``result``: 200 with ``result``, then ``next`` and ``total`` when the batch has them for
      this key, then ``time`` (the command's ``result_time``, else the batch's ``time``), the order
      of a single answer. Results that are ``[]``, ``false``, ``null`` or ``0`` are results.
    * In neither: LOST_STATUS with LOST_ERROR.

    Raise ValueError when payload is not a batch answer (not JSON, no ``result.result``), e.g. an
    error answer to the whole batch, which the caller must handle for every command.
    """
    if count < 0:
        raise ValueError("count must not be negative")
    try:
        data = json.loads(payload)
    except ValueError:
        raise ValueError("the batch answer is not JSON") from None
    batch = data.get("result") if isinstance(data, dict) else None
    if not isinstance(batch, dict) or "result" not in batch:
        raise ValueError("the batch answer has no result.result")
    results = _keyed(batch.get("result"))
    errors = _keyed(batch.get("result_error"))
    totals = _keyed(batch.get("result_total"))
    nexts = _keyed(batch.get("result_next"))
    times = _keyed(batch.get("result_time"))
    outer_time = data.get("time")
    answers: list[Answer] = []
    for index in range(count):
        key = f"c{index}"
        if key in errors:
            answers.append(_error_answer(errors[key]))
        elif key in results:
            body: dict[str, Any] = {"result": results[key]}
            if key in nexts:
                body["next"] = nexts[key]
            if key in totals:
                body["total"] = totals[key]
            spent = times.get(key, outer_time)
            if spent is not None:
                body["time"] = spent
            answers.append(Answer(200, _json(body)))
        else:
            lost = {"error": LOST_ERROR, "error_description": _LOST_DESCRIPTION}
            answers.append(Answer(LOST_STATUS, _json(lost)))
    return answers
