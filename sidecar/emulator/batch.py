"""The batch method: up to 50 commands, each run as if called alone, `$result[...]` resolved.

References to earlier commands' answers (`$result`, `$next`, `$total`, `$time`, `$error`) follow
CRestUtil::processBatchElement in the portal's rest module, quirks included.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from sidecar import phpquery
from sidecar.emulator.model import Caller, Method, MethodResult, RestError
from sidecar.emulator.rest import RestServer
from sidecar.emulator.wire import parse_route, time_block

__all__ = ["BATCH_MAX_LENGTH", "Batch"]

BATCH_MAX_LENGTH = 50

# CRestUtil::processBatchElement: `$` + one of the batch's answer maps (any case), then every
# non-space character; the path is each non-empty `[...]` in that tail.
_REFERENCE = re.compile(r"\$(result|next|total|time|error)(\S*)", re.IGNORECASE)
_REF_SEGMENT = re.compile(r"\[([^\]]+)\]")
_PHP_INT_KEY = re.compile(r"-?(?:0|[1-9][0-9]*)")


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


def _step(found: Any, key: str) -> tuple[bool, Any]:
    """Follow one `[key]` the way PHP's isset($r[$key]) then $r[$key] would."""
    if isinstance(found, Mapping):
        value = found.get(key)
        return value is not None, value
    if isinstance(found, list) and _PHP_INT_KEY.fullmatch(key):
        index = int(key)
        if 0 <= index < len(found) and found[index] is not None:
            return True, found[index]
        return False, None
    if isinstance(found, str) and _PHP_INT_KEY.fullmatch(key):
        index = int(key)
        if -len(found) <= index < len(found):
            return True, found[index]
    return False, None


def _follow(answers: Mapping[str, Any], name: str, tail: str) -> Any:
    """Walk a reference's path; a level that is not there stops the walk where it is."""
    found = answers.get(name)
    for key in _REF_SEGMENT.findall(tail):
        present, value = _step(found, key)
        if not present:
            break
        found = value
    return found


def _php_string(value: Any) -> str | None:
    """Return what PHP's (string) cast gives for a numeric value or a string, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    if isinstance(value, str):
        return value
    return None


def _resolve_element(value: str, answers: Mapping[str, Any]) -> Any:
    """Fill in `$result[..]`-style references in one parameter value, as the portal does.

    A value that is one whole reference becomes what it points to, of whatever type (an array
    too); a reference inside a longer text is replaced only by a string or number and otherwise
    stays as written. A missing path level is not an error: the walk stops at the last level
    found, so `$result[c3][49][ID]` after a page of 12 is the whole page.
    """
    resolved: Any = value
    for match in _REFERENCE.finditer(value):
        if not _REF_SEGMENT.search(match.group(2)):
            continue
        found = _follow(answers, match.group(1), match.group(2))
        if match.group(0) == resolved:
            resolved = found
            continue
        text = _php_string(found)
        if text is None or not isinstance(resolved, str):
            continue
        resolved = resolved.replace(match.group(0), text)
    return resolved


def _resolve_refs(value: Any, answers: Mapping[str, Any]) -> Any:
    """Resolve references in every value of a command's parameters (keys are left alone)."""
    if isinstance(value, dict):
        return {k: _resolve_refs(v, answers) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, answers) for v in value]
    if isinstance(value, str) and "$" in value:
        return _resolve_element(value, answers)
    return value


class Batch:
    """Runs the commands of a `batch` call through REST dispatch's method table."""

    def __init__(self, rest: RestServer, *, clock: Callable[[], float]) -> None:
        """Run commands on `rest`; `clock` times each one."""
        self._rest = rest
        self.clock = clock

    def methods(self) -> dict[str, Method]:
        """Name the REST method this part serves."""
        return {"batch": Method(None, self._batch)}

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
                if self.clock() < self._rest.blocked_until(method):
                    # A method whose time budget is used up is refused inside a batch too.
                    raise RestError(429, "OPERATION_TIME_LIMIT",
                                    "Method is blocked due to operation time limit.")
                if not self._rest.knows(method):
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                answers = {"result": results, "next": nexts, "total": totals, "time": times,
                           "error": errors}
                command_params = _resolve_refs(phpquery.parse_qs(query), answers)
                answer = self._rest.run(caller, method, command_params)
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
