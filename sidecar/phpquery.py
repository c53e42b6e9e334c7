"""PHP-style nested query strings: `parse_str` and `http_build_query` for Python.

Keys like ``fields[TITLE]``, ``fields[PHONE][0][VALUE]`` and ``select[]`` build nested containers
the way PHP's ``parse_str`` does, with one rule for telling lists from dicts:

* Every container is built as a mapping from string keys to values. ``[]`` appends under the next
  free integer key (one more than the largest non-negative integer key present, else ``0``), as
  PHP does.
* When parsing is done, a container whose keys, in insertion order, are exactly ``"0"``, ``"1"``,
  ..., ``"n-1"`` becomes a ``list``; every other container stays a ``dict`` keyed by strings. The
  top level is always a ``dict``.

``encode`` writes lists as ``[0]``, ``[1]``, ..., so ``parse_qs(encode(x)) == x`` holds for any
mapping of strings, lists and dicts whose containers are non-empty (PHP drops empty arrays too),
whose keys hold no ``[`` or ``]`` and are non-empty, and whose dicts are not keyed ``"0"`` ..
``"n-1"`` in order (those come back as lists, exactly as PHP would treat them).

Deliberate departures from PHP: key names are not mangled (PHP turns ``.`` and spaces in the base
name into ``_``), and a key whose first ``[`` is never closed is kept literally.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote_plus

__all__ = ["encode", "flatten", "parse", "parse_qs", "split_key"]

_SEGMENT = re.compile(r"\[([^\]]*)\]")
_INDEX = re.compile(r"0|[1-9][0-9]*")


def split_key(key: str) -> list[str] | None:
    """Split ``a[b][]`` into ``["a", "b", ""]``; return None for keys PHP would drop."""
    bracket = key.find("[")
    if bracket < 0 or key.find("]", bracket) < 0:
        return [key] if key else None
    base = key[:bracket]
    if not base:
        return None
    path = [base]
    pos = bracket
    # PHP stops at the first segment that is not `[...]` and ignores whatever follows.
    while (match := _SEGMENT.match(key, pos)) is not None:
        path.append(match.group(1))
        pos = match.end()
    return path


def _next_index(node: dict[str, Any]) -> str:
    """Return the key PHP's `[]` would use next in this container."""
    indexes = [int(k) for k in node if _INDEX.fullmatch(k)]
    return str(max(indexes) + 1) if indexes else "0"


def _assign(root: dict[str, Any], path: list[str], value: str) -> None:
    """Store value at path, creating (or replacing scalars with) containers on the way."""
    node = root
    last = len(path) - 1
    for depth, segment in enumerate(path):
        key = _next_index(node) if depth > 0 and segment == "" else segment
        if depth == last:
            node[key] = value
            return
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child


def _is_list_keys(keys: Iterable[str]) -> bool:
    """Tell whether keys are "0", "1", ..., "n-1" in this order."""
    return all(key == str(i) for i, key in enumerate(keys))


def _finish(node: dict[str, Any]) -> dict[str, Any] | list[Any]:
    """Turn list-keyed containers into lists, depth first."""
    done = {k: _finish(v) if isinstance(v, dict) else v for k, v in node.items()}
    return list(done.values()) if _is_list_keys(done) else done


def parse(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Build nested params from decoded key/value pairs, later scalars overwriting earlier ones."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        path = split_key(key)
        if path is not None:
            _assign(root, path, value)
    return {k: _finish(v) if isinstance(v, dict) else v for k, v in root.items()}


def parse_qs(query: str) -> dict[str, Any]:
    """Build nested params from a raw urlencoded string, keeping blank values."""
    return parse(parse_qsl(query, keep_blank_values=True))


def _walk(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    """Append the flattened pairs of one value under prefix."""
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _walk(f"{prefix}[{key}]", item, out)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _walk(f"{prefix}[{index}]", item, out)
    elif isinstance(value, bool):
        out.append((prefix, "1" if value else "0"))
    elif isinstance(value, str | int | float):
        out.append((prefix, str(value)))
    elif isinstance(value, bytes):
        out.append((prefix, value.decode()))
    else:
        raise TypeError(f"cannot encode {type(value).__name__} in a query string")


def flatten(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten nested params into PHP-style ``a[b][0]`` key/value pairs, undecoded."""
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        _walk(str(key), value, out)
    return out


def encode(params: Mapping[str, Any]) -> str:
    """Encode nested params the way PHP's http_build_query does."""
    return "&".join(f"{quote_plus(k)}={quote_plus(v)}" for k, v in flatten(params))
