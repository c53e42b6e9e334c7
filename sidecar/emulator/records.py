"""Record tables and the list engine every v2 list method shares: filter, order, select, pages.

A `Records` table keeps its IDs sorted as records come and go, so the portal's fast way through a
large list (order by ID, filter `>ID` from the last record seen, `start=-1`) reads one page by
bisecting instead of scanning the table. `run_list` answers one list call the way a portal does:
pages of 50, `next` and `total` for `start>=0`, one uncounted page for `start=-1`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.emulator.model import MethodResult

__all__ = [
    "PAGE_SIZE",
    "ListQuery",
    "ListStyle",
    "Records",
    "names_param",
    "php_int",
    "run_list",
]

PAGE_SIZE = 50

View = Callable[[Mapping[str, Any]], Mapping[str, Any]]

_Ordered = TypeVar("_Ordered", float, str)

# Bitrix's filter prefixes (CSQLWhere::$operations), tried three characters first, then two, one.
_OPERATORS = frozenset({
    "!><", "!=%", "!%=", "!==", "!=", "!%", "><", ">=", "<=", "=%", "%=", "!@", "==", "=", "%",
    ">", "<", "!", "@",
})
_NEGATED = {"!": "=", "!=": "=", "!==": "=", "!%": "%", "!=%": "=%", "!%=": "=%", "!@": "@",
            "!><": "><"}
_LEADING_INT = re.compile(r"\s*([+-]?\d+)")


class Records(MutableMapping[int, dict[str, Any]]):
    """Records by integer ID, in the order added, with the IDs also kept sorted for bisecting."""

    def __init__(self) -> None:
        """Start empty; the first ID handed out is 1."""
        self._rows: dict[int, dict[str, Any]] = {}
        self._ids: list[int] = []
        self._next_id = 1

    def __getitem__(self, key: int) -> dict[str, Any]:
        """Return the record stored under an ID."""
        return self._rows[key]

    def __setitem__(self, key: int, value: dict[str, Any]) -> None:
        """Store a record; a new ID joins the sorted list (appending is the cheap case)."""
        if key not in self._rows:
            if not self._ids or key > self._ids[-1]:
                self._ids.append(key)
            else:
                bisect.insort(self._ids, key)
        self._rows[key] = value

    def __delitem__(self, key: int) -> None:
        """Remove a record."""
        del self._rows[key]
        del self._ids[bisect.bisect_left(self._ids, key)]

    def __iter__(self) -> Iterator[int]:
        """Iterate IDs in the order records were added."""
        return iter(self._rows)

    def __len__(self) -> int:
        """Count the records."""
        return len(self._rows)

    def __repr__(self) -> str:
        """Show the records as a dict would."""
        return repr(self._rows)

    def clear(self) -> None:
        """Remove every record at once (IDs handed out are not handed out again)."""
        self._rows.clear()
        self._ids.clear()

    def allocate(self) -> int:
        """Hand out the next ID: past every ID handed out or stored, as a database sequence."""
        new_id = max(self._next_id, (self._ids[-1] + 1) if self._ids else 1)
        self._next_id = new_id + 1
        return new_id

    @property
    def sorted_ids(self) -> Sequence[int]:
        """The stored IDs in ascending order (do not change it)."""
        return self._ids


@dataclass(frozen=True)
class ListStyle:
    """How one list method answers: where records sit, their ID, its default order and so on."""

    id_key: str
    int_ids: bool = False
    # The page is wrapped as {items_key: page}; None: the result is the page itself.
    items_key: str | None = None
    # (field, descending) pairs applied when the call gives no order.
    default_order: tuple[tuple[str, bool], ...] = (("ID", False),)
    # `total` on a start=-1 answer; None leaves it out.
    minus_one_total: int | None = 0
    # Fields `*` does not select (CRM's multi-fields).
    star_hides: frozenset[str] = frozenset()
    # Output keys turned from UPPER_SNAKE to camelCase (crm.item.list over the classic tables).
    camel_output: bool = False


@dataclass(frozen=True)
class ListQuery:
    """One list call's filter, order, select and start, already read from its parameters."""

    filter: Mapping[str, Any] | None
    order: list[tuple[str, bool]]
    select: list[str]
    start: int


def php_int(value: Any) -> int:
    """Cast a request value to int the way PHP's intval does."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        match = _LEADING_INT.match(value)
        return int(match.group(1)) if match else 0
    if isinstance(value, Mapping | list):
        return 1 if value else 0
    return 0


def names_param(value: Any) -> list[str]:
    """Read a `select`-like parameter given as a list, a PHP map or a single name."""
    if isinstance(value, Mapping):
        return [str(v) for v in value.values()]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str) and value:
        return [value]
    return []


def order_param(value: Any) -> list[tuple[str, bool]]:
    """Read an `order` map: field to ASC/DESC, any case; anything but DESC sorts ascending."""
    if not isinstance(value, Mapping):
        return []
    return [(str(k), str(v).strip().upper() == "DESC") for k, v in value.items()]


def normal(name: str) -> str:
    """Fold a field name so ID, id, RESPONSIBLE_ID and responsibleId find each other."""
    return name.replace("_", "").lower()


def camel(name: str) -> str:
    """Turn UPPER_SNAKE into camelCase (ASSIGNED_BY_ID -> assignedById)."""
    head, *rest = name.lower().split("_")
    return head + "".join(part.capitalize() for part in rest)


def _split_key(key: str) -> tuple[str, str]:
    """Split a filter key into its operator prefix and field name, as CSQLWhere does."""
    for size in (3, 2, 1):
        if key[:size] in _OPERATORS:
            return key[:size], key[size:]
    return "", key


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


def _scalar(value: Any) -> Any:
    """Turn an array a filter got in place of a value into what PHP's intval makes of it."""
    if isinstance(value, Mapping | list):
        return 1 if value else 0
    return value


def _text(value: Any) -> str:
    """Stringify a stored value for text comparisons."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "Y" if value else "N"
    return str(value)


def _equal(actual: Any, expected: Any) -> bool:
    """Compare a stored field with a filter value, numerically when both are numbers."""
    a, b = _number(actual), _number(_scalar(expected))
    if a is not None and b is not None:
        return a == b
    return _text(actual) == _text(_scalar(expected))


def _ordered(op: str, left: _Ordered, right: _Ordered) -> bool:
    """Apply an ordering operator (>, <, >=, <=) to two values of one type."""
    if op == ">":
        return left > right
    if op == "<":
        return left < right
    if op == ">=":
        return left >= right
    return left <= right


def _compare_ordered(op: str, actual: Any, expected: Any) -> bool:
    """Apply >, <, >=, <= to one stored value, numerically when both are numbers."""
    a, b = _number(actual), _number(expected)
    if a is not None and b is not None:
        return _ordered(op, a, b)
    return _ordered(op, _text(actual), _text(expected))


def _like(pattern: str, actual: Any) -> bool:
    """Match SQL LIKE (% and _ wildcards), case-insensitively."""
    parts = ("." if c == "_" else ".*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch("".join(parts), _text(actual), re.IGNORECASE | re.DOTALL) is not None


def _values(expected: Any) -> list[Any]:
    """Read a filter value that may be one value or an array of them."""
    if isinstance(expected, Mapping):
        return list(expected.values())
    if isinstance(expected, list):
        return expected
    return [expected]


def _test(op: str, actual: Any, expected: Any) -> bool:
    """Apply one non-negated operator to one stored value."""
    if op in ("", "=", "=="):
        return any(_equal(actual, e) for e in _values(expected))
    if op == "@":
        values = expected.split(",") if isinstance(expected, str) else _values(expected)
        return any(_equal(actual, e) for e in values)
    if op == "%":
        return any(_text(e).lower() in _text(actual).lower() for e in _values(expected))
    if op == "=%":
        return any(_like(_text(e), actual) for e in _values(expected))
    if op == "><":
        bounds = _values(expected)
        return len(bounds) > 1 and (
            _compare_ordered(">=", actual, bounds[0]) and _compare_ordered("<=", actual, bounds[1])
        )
    # >, <, >=, <= with an array: CSQLWhere compares with its element 0 (intval'd), no element 0
    # matches nothing. So a batch reference that resolved to a whole page means `ID > 1`.
    if isinstance(expected, list):
        if not expected:
            return False
        expected = _scalar(expected[0])
    elif isinstance(expected, Mapping):
        if "0" not in expected:
            return False
        expected = _scalar(expected["0"])
    return _compare_ordered(op, actual, expected)


def _field(view: Mapping[str, Any], name: str, found: dict[str, str]) -> Any:
    """Read a field by any spelling of its name, remembering how the table spells it."""
    key = found.get(name)
    if key is not None and key in view:
        return view[key]
    if name in view:
        found[name] = name
        return view[name]
    folded = normal(name)
    for candidate in view:
        if normal(candidate) == folded:
            found[name] = candidate
            return view[candidate]
    return None


def matches(view: Mapping[str, Any], conditions: Mapping[str, Any], found: dict[str, str]) -> bool:
    """Tell whether a record passes a filter: AND of its conditions, LOGIC=OR sub-arrays too."""
    logic = next((str(v).upper() for k, v in conditions.items() if str(k).upper() == "LOGIC"), "")
    results = (_condition(view, str(k), v, found) for k, v in conditions.items()
               if str(k).upper() != "LOGIC")
    return any(results) if logic == "OR" else all(results)


def _condition(view: Mapping[str, Any], key: str, expected: Any, found: dict[str, str]) -> bool:
    """Check one filter entry: a field condition, or a nested group under a numeric key."""
    if key.isdigit():
        return matches(view, expected, found) if isinstance(expected, Mapping) else True
    op, name = _split_key(key)
    actual = _field(view, name, found)
    # Multi-fields (PHONE, EMAIL) match when any of their values does.
    values = (
        [item.get("VALUE") for item in actual if isinstance(item, Mapping)]
        if isinstance(actual, list) and actual and isinstance(actual[0], Mapping)
        else actual if isinstance(actual, list) else [actual]
    )
    if op in _NEGATED:
        return not any(_test(_NEGATED[op], v, expected) for v in values)
    return any(_test(op, v, expected) for v in values)


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Order None first, then numbers, then strings, without comparing across types."""
    if value is None:
        return (0, 0.0, "")
    number = _number(value)
    if number is not None:
        return (1, number, "")
    return (2, 0.0, _text(value))


def _sorter(
    name: str, found: dict[str, str]
) -> Callable[[Mapping[str, Any]], tuple[int, float, str]]:
    """Return a sort key reading one field of a record view."""

    def key(view: Mapping[str, Any]) -> tuple[int, float, str]:
        """Sort by the named field."""
        return _sort_key(_field(view, name, found))

    return key


def _id_window(
    ids: Sequence[int], conditions: Mapping[str, Any], id_key: str
) -> tuple[int, int, dict[str, Any]]:
    """Narrow the sorted IDs by numeric ID conditions; return the slice and what is left over."""
    low, high = 0, len(ids)
    rest: dict[str, Any] = {}
    folded = normal(id_key)
    for raw_key, given in conditions.items():
        op, name = _split_key(str(raw_key))
        value = given
        if normal(name) == folded and op in (">", ">=", "<", "<=") and isinstance(
                value, list | Mapping):
            # An array in place of a bound compares with its element 0 (see _test): as
            # bisectable as a number, and an empty one matches nothing, without a scan.
            first = (value[0] if value else None) if isinstance(value, list) else value.get("0")
            if first is None:
                return 0, 0, {}
            value = _scalar(first)
        number = _number(value) if isinstance(value, str | int | float) else None
        if normal(name) != folded or number is None or op not in (">", ">=", "<", "<=", "=", ""):
            rest[str(raw_key)] = value
            continue
        if op == ">":
            low = max(low, bisect.bisect_right(ids, number))
        elif op == ">=":
            low = max(low, bisect.bisect_left(ids, number))
        elif op == "<":
            high = min(high, bisect.bisect_left(ids, number))
        elif op == "<=":
            high = min(high, bisect.bisect_right(ids, number))
        else:
            low = max(low, bisect.bisect_left(ids, number))
            high = min(high, bisect.bisect_right(ids, number))
    return low, max(low, high), rest


def _pick(
    view: Mapping[str, Any], select: list[str], style: ListStyle
) -> dict[str, Any]:
    """Keep the selected fields (always the ID); `*` or nothing selects all but star_hides."""
    wanted = {normal(n) for n in select} | {normal(style.id_key)}
    everything = not select or "*" in select
    picked = {
        k: v for k, v in view.items()
        if normal(k) in wanted or (everything and k not in style.star_hides)
    }
    if style.camel_output:
        picked = {camel(k): v for k, v in picked.items()}
    id_key = camel(style.id_key) if style.camel_output else style.id_key
    if id_key in picked and style.int_ids:
        picked[id_key] = php_int(picked[id_key])
    return picked


def run_list(
    records: Records, view: View, style: ListStyle, query: ListQuery
) -> MethodResult:
    """Answer one list call: a page of 50, with `next` and `total` unless start is -1."""
    conditions: Mapping[str, Any] = query.filter or {}
    order = query.order or list(style.default_order)
    found: dict[str, str] = {}
    by_id = len(order) == 1 and normal(order[0][0]) == normal(style.id_key)
    has_logic = any(str(k).upper() == "LOGIC" for k in conditions)
    uncounted = query.start < 0
    start = max(0, query.start)
    if by_id and not has_logic:
        # Ordered by ID alone: bisect the sorted IDs for the ID conditions, test the rest lazily.
        descending = order[0][1]
        ids = records.sorted_ids
        low, high, rest = _id_window(ids, conditions, style.id_key)
        window = range(high - 1, low - 1, -1) if descending else range(low, high)
        if not rest and not uncounted:
            total = len(window)
            page_ids = [ids[i] for i in window[start : start + PAGE_SIZE]]
            page = [view(records[i]) for i in page_ids]
        else:
            page = []
            total = 0
            skip = 0 if uncounted else start
            for index in window:
                candidate = view(records[ids[index]])
                if rest and not matches(candidate, rest, found):
                    continue
                total += 1
                if skip:
                    skip -= 1
                elif len(page) < PAGE_SIZE:
                    page.append(candidate)
                elif uncounted:
                    break
    else:
        views = [view(r) for r in records.values()]
        if conditions:
            views = [v for v in views if matches(v, conditions, found)]
        # Stable sorts applied from the last key to the first give a multi-key order.
        for name, descending in reversed(order):
            views.sort(key=_sorter(name, found), reverse=descending)
        total = len(views)
        page = views[:PAGE_SIZE] if uncounted else views[start : start + PAGE_SIZE]
    rows = [_pick(v, query.select, style) for v in page]
    result: Any = rows if style.items_key is None else {style.items_key: rows}
    if uncounted:
        return MethodResult(result, total=style.minus_one_total)
    more = start + PAGE_SIZE < total
    return MethodResult(result, next=start + PAGE_SIZE if more else None, total=total)
