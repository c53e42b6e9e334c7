"""PHP-style nested query strings: parse_str semantics and http_build_query round trips."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import phpquery


def test_nested_keys_build_dicts_and_lists() -> None:
    """Bracketed keys nest, `[]` appends and 0..n-1 keys make lists."""
    pairs = [
        ("fields[TITLE]", "x"),
        ("fields[PHONE][0][VALUE]", "1"),
        ("fields[PHONE][0][VALUE_TYPE]", "WORK"),
        ("select[]", "ID"),
        ("select[]", "TITLE"),
        ("a[b][]", "1"),
        ("plain", "v"),
    ]
    assert phpquery.parse(pairs) == {
        "fields": {"TITLE": "x", "PHONE": [{"VALUE": "1", "VALUE_TYPE": "WORK"}]},
        "select": ["ID", "TITLE"],
        "a": {"b": ["1"]},
        "plain": "v",
    }


def test_non_sequential_numeric_keys_stay_a_dict() -> None:
    """Numeric keys that are not 0..n-1 in order give a dict keyed by strings."""
    assert phpquery.parse([("a[1]", "x"), ("a[0]", "y")]) == {"a": {"1": "x", "0": "y"}}
    assert phpquery.parse([("a[5]", "x")]) == {"a": {"5": "x"}}


def test_append_uses_next_free_integer_key() -> None:
    """`[]` after explicit keys appends at one past the largest integer key, as PHP does."""
    assert phpquery.parse([("a[5]", "x"), ("a[]", "y"), ("a[k]", "z"), ("a[]", "w")]) == {
        "a": {"5": "x", "6": "y", "k": "z", "7": "w"}
    }


def test_later_keys_overwrite_earlier_ones() -> None:
    """A repeated scalar key keeps the last value, and containers replace scalars either way."""
    assert phpquery.parse([("a", "1"), ("a", "2")]) == {"a": "2"}
    assert phpquery.parse([("a", "1"), ("a[b]", "2")]) == {"a": {"b": "2"}}
    assert phpquery.parse([("a[b]", "2"), ("a", "1")]) == {"a": "1"}
    assert phpquery.parse([("a[b]", "1"), ("a[b][c]", "2")]) == {"a": {"b": {"c": "2"}}}


def test_odd_keys_follow_php() -> None:
    """Unclosed brackets stay literal, trailing junk is ignored and nameless keys are dropped."""
    assert phpquery.parse([("a[b", "1")]) == {"a[b": "1"}
    assert phpquery.parse([("a[b]junk[c]", "1")]) == {"a": {"b": "1"}}
    assert phpquery.parse([("[x]", "1"), ("", "2")]) == {}
    assert phpquery.split_key("a[b][]") == ["a", "b", ""]


def test_parse_qs_decodes_plus_percent_and_keeps_blanks() -> None:
    """`+` is a space, percent escapes decode (in keys too) and blank values are kept."""
    query = "fields%5BTITLE%5D=Big+deal%21&empty=&bare&name=%D0%AF"
    assert phpquery.parse_qs(query) == {
        "fields": {"TITLE": "Big deal!"},
        "empty": "",
        "bare": "",
        "name": "Я",
    }


def test_encode_writes_http_build_query_style() -> None:
    """Lists get [0], [1]; bools become 1/0; None is left out; keys and values are escaped."""
    encoded = phpquery.encode(
        {
            "fields": {"TITLE": "a b&c", "OPENED": True, "CLOSED": False, "SKIP": None, "N": 5},
            "select": ["ID", "TITLE"],
        }
    )
    assert encoded == (
        "fields%5BTITLE%5D=a+b%26c&fields%5BOPENED%5D=1&fields%5BCLOSED%5D=0&fields%5BN%5D=5"
        "&select%5B0%5D=ID&select%5B1%5D=TITLE"
    )


def test_encode_leaves_out_empty_containers() -> None:
    """Empty lists and dicts produce no pairs at all, as in PHP."""
    assert phpquery.encode({"a": [], "b": {}, "c": "x"}) == "c=x"


def test_flatten_returns_undecoded_pairs() -> None:
    """Flattening gives the bracketed keys a batch command string is built from."""
    assert phpquery.flatten({"filter": {">ID": 5}, "order": {"ID": "DESC"}}) == [
        ("filter[>ID]", "5"),
        ("order[ID]", "DESC"),
    ]


def test_encode_rejects_unencodable_values() -> None:
    """Values with no query-string form raise TypeError instead of being stringified."""
    with pytest.raises(TypeError):
        phpquery.encode({"a": object()})


_KEYS = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="[]"),
    min_size=1,
    max_size=8,
)
_LEAVES = st.text(alphabet=st.characters(codec="utf-8"), max_size=8)


def _not_list_keyed(value: dict[str, Any]) -> bool:
    """Tell whether a dict would survive parsing as a dict rather than turn into a list."""
    return list(value) != [str(i) for i in range(len(value))]


_VALUES = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, min_size=1, max_size=4)
    | st.dictionaries(_KEYS, children, min_size=1, max_size=4).filter(_not_list_keyed),
    max_leaves=12,
)


@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_parse_qs_inverts_encode(params: dict[str, Any]) -> None:
    """Decoding an encoded mapping of strings, lists and dicts gives the same mapping back."""
    assert phpquery.parse_qs(phpquery.encode(params)) == params
