"""The batch method: up to 50 commands, each run as if called alone, `$result[...]` resolved."""

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

_RESULT_REF = re.compile(r"\$result\[([^\]]+)\]((?:\[[^\]]*\])*)")
_REF_SEGMENT = re.compile(r"\[([^\]]*)\]")


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


def _resolve_refs(value: Any, results: Mapping[str, Any]) -> Any:
    """Replace `$result[key][field]` references to earlier batch results."""
    if isinstance(value, dict):
        return {k: _resolve_refs(v, results) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_refs(v, results) for v in value]
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
                if not self._rest.knows(method):
                    raise RestError(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
                command_params = _resolve_refs(phpquery.parse_qs(query), results)
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
