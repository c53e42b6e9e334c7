"""The batch-coalescing codec, proved against the real emulator over loopback.

Every round-trip test runs the same calls twice on two emulators that start identical and share a
frozen clock: packed into one `batch` on one, made one by one on the other. Each split answer must
equal the lone answer (status, body, key order; the `time` block's values aside), and the portals
must end in the same state.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar import phpquery
from sidecar.batching import (
    BATCH_ONLY_ERRORS,
    LOST_ERROR,
    LOST_STATUS,
    MAX_COMMAND_LENGTH,
    MAX_COMMANDS,
    MAX_DEPTH,
    MAX_PAIRS,
    Answer,
    SingleCall,
    batch_body,
    command_line,
    error_status,
    params_of,
    split_answers,
)
from sidecar.emulator import Emulator, run_emulator
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OffsetClock

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
NARROW_ID = "local.narrow000000001.00000001"  # an app granted crm only
SPECIAL = "a&b=c+d%e#f g\nh\r\ni/?;:@$,'\"<>~`!*()\\\t\x00ÄΩ日本🙂"


class FrozenClock(OffsetClock):
    """A clock that stands still (moved only through `offset`), so both portals agree on dates."""

    def __call__(self) -> float:
        """Return a fixed time."""
        return 1_700_000_000.0 + self.offset


@pytest.fixture
def emulator_clock() -> OffsetClock:
    """Freeze the conftest emulator's clock."""
    return FrozenClock()


def form(method: str, params: dict[str, Any], *, query: str = "") -> SingleCall:
    """Build a call with a PHP-style form body."""
    return SingleCall(method, query, phpquery.encode(params).encode(), FORM)


def jsoned(method: str, params: Any, *, query: str = "") -> SingleCall:
    """Build a call with a JSON body."""
    return SingleCall(method, query, json.dumps(params).encode(), JSON)


def bare(method: str, query: str = "") -> SingleCall:
    """Build a call with no body."""
    return SingleCall(method, query, b"", "")


def line_of(call: SingleCall) -> str:
    """Return a call's command line, which must exist."""
    line = command_line(call)
    assert line is not None, call
    return line


def parsed(answer: Answer) -> Any:
    """Decode an answer body."""
    return json.loads(answer.body)


@dataclass
class Portals:
    """Two identical portals: one gets batches, the other the same calls alone."""

    batched: Emulator
    alone: Emulator
    http: aiohttp.ClientSession
    tokens: dict[tuple[str, str], str]

    def token(self, portal: Emulator, client_id: str) -> str:
        """Return (and remember) an access token of an app on a portal."""
        key = (portal.base_url, client_id)
        if key not in self.tokens:
            self.tokens[key] = portal.issue_tokens(client_id)["access_token"]
        return self.tokens[key]

    async def batch(self, calls: list[SingleCall], *, client_id: str = CLIENT_ID) -> list[Answer]:
        """Coalesce the calls into one batch on the batched portal and split its answer."""
        lines = [line_of(call) for call in calls]
        token = self.token(self.batched, client_id)
        async with self.http.post(
            f"{self.batched.base_url}/rest/batch",
            params={"auth": token},
            data=batch_body(lines),
            headers={"Content-Type": FORM},
        ) as response:
            assert response.status == 200
            payload = await response.read()
        return split_answers(payload, len(calls))

    async def single(
        self, portal: Emulator, call: SingleCall, *, client_id: str = CLIENT_ID
    ) -> Answer:
        """Make one call on its own, the token in the header so the params stay the client's."""
        url = f"{portal.base_url}/rest/{call.method}" + (f"?{call.query}" if call.query else "")
        headers = {"Authorization": f"Bearer {self.token(portal, client_id)}"}
        if call.body:
            headers["Content-Type"] = call.content_type
        verb = "POST" if call.body else "GET"
        async with self.http.request(
            verb, URL(url, encoded=True), data=call.body or None, headers=headers
        ) as response:
            return Answer(response.status, await response.read())

    async def compare(
        self, calls: list[SingleCall], *, client_id: str = CLIENT_ID
    ) -> list[tuple[Answer, Answer]]:
        """Run calls batched on one portal and alone on the other; assert equal answers."""
        batched = await self.batch(calls, client_id=client_id)
        pairs = []
        for call, split in zip(calls, batched, strict=True):
            lone = await self.single(self.alone, call, client_id=client_id)
            assert_same(split, lone, call)
            pairs.append((split, lone))
        assert self.batched.leads == self.alone.leads
        return pairs

    async def seed(self, count: int) -> None:
        """Add `count` leads to both portals, identically."""
        for first in range(1, count + 1, MAX_COMMANDS):
            last = min(first + MAX_COMMANDS, count + 1)
            calls = [
                form("crm.lead.add", {"fields": {"TITLE": f"Lead {n}", "NAME": f"N{n % 7}"}})
                for n in range(first, last)
            ]
            for portal in (self.batched, self.alone):
                lines = [line_of(call) for call in calls]
                async with self.http.post(
                    f"{portal.base_url}/rest/batch",
                    params={"auth": self.token(portal, CLIENT_ID)},
                    data=batch_body(lines),
                    headers={"Content-Type": FORM},
                ) as response:
                    assert response.status == 200
        assert self.batched.leads == self.alone.leads


def assert_same(split: Answer, lone: Answer, call: SingleCall) -> None:
    """Assert a split answer equals the lone one: status, keys in order, values but `time`'s."""
    assert split.status == lone.status, call
    ours, theirs = parsed(split), parsed(lone)
    assert list(ours) == list(theirs), call
    assert {k: v for k, v in ours.items() if k != "time"} == {
        k: v for k, v in theirs.items() if k != "time"
    }, call
    if "time" in theirs:
        assert isinstance(ours["time"], dict)
        assert {"start", "finish", "duration"} <= set(ours["time"])


@pytest.fixture
async def portals(emulator: Emulator, emulator_clock: OffsetClock) -> AsyncIterator[Portals]:
    """Serve a twin of the conftest emulator and a client session for both."""
    twin = Emulator(clock=emulator_clock)
    for portal in (emulator, twin):
        if portal is twin:
            portal.register_app(CLIENT_ID, CLIENT_SECRET, scope="crm,user")
        portal.register_app(NARROW_ID, CLIENT_SECRET, scope="crm")
    async with run_emulator(twin), aiohttp.ClientSession() as http:
        yield Portals(emulator, twin, http, {})


# -- round trips through the real emulator --------------------------------------------------------


async def test_lead_add_with_nested_fields_and_phone_list(portals: Portals) -> None:
    """Nested fields, a PHONE list and awkward characters survive, from JSON and from a form."""
    fields = {
        "TITLE": SPECIAL,
        "NAME": "Ünïcødé & «quotes»",
        "COMMENTS": "line 1\nline 2\r\n  indented 100% #hash +plus =eq",
        "OPPORTUNITY": 1500.5,
        "ASSIGNED_BY_ID": 1,
        "PHONE": [
            {"VALUE": "+7 (999) 123-45-67", "VALUE_TYPE": "WORK"},
            {"VALUE": "8 800 & 555=35+35", "VALUE_TYPE": "MOBILE"},
        ],
        "EMAIL": [{"VALUE": "a+b@example.com", "VALUE_TYPE": "HOME"}],
        "UF_NESTED": {
            "a b": "x y",
            "c.d": "1.5",
            "e&f=g": SPECIAL,
            "p+q%r#s\nt ü/?;日本": "k",
            "list": ["1", "2", SPECIAL],
        },
    }
    stringy = {**fields, "OPPORTUNITY": "1500.5", "ASSIGNED_BY_ID": "1"}
    calls = [
        jsoned("crm.lead.add", {"fields": fields}),
        form("crm.lead.add", {"fields": stringy}),
        bare("crm.lead.get", "id=1"),
        jsoned("crm.lead.get", {"id": 2}),
    ]
    pairs = await portals.compare(calls)
    assert [parsed(split)["result"] for split, _ in pairs[:2]] == [1, 2]
    got = parsed(pairs[2][0])["result"]
    assert got["TITLE"] == SPECIAL
    assert got["UF_NESTED"]["e&f=g"] == SPECIAL
    assert [p["VALUE"] for p in got["PHONE"]] == ["+7 (999) 123-45-67", "8 800 & 555=35+35"]


async def test_errors_inside_the_batch_match_the_lone_errors(portals: Portals) -> None:
    """A missing lead (400), a bad id (400) and an unknown method (404), next to successes."""
    await portals.seed(2)
    calls = [
        bare("crm.lead.get", "id=99999"),
        bare("crm.lead.get", "id=1"),
        bare("crm.lead.get", "id=abc"),
        bare("no.such.method"),
        bare("Made.Up.Method", "x=1"),
        jsoned("crm.lead.add", {"fields": "not a map"}),
        bare("profile"),
    ]
    pairs = await portals.compare(calls)
    statuses = [split.status for split, _ in pairs]
    assert statuses == [400, 200, 400, 404, 404, 400, 200]
    assert parsed(pairs[0][0]) == {"error": "", "error_description": "Not found"}
    assert parsed(pairs[3][0])["error"] == "ERROR_METHOD_NOT_FOUND"


async def test_insufficient_scope_inside_the_batch_is_401(portals: Portals) -> None:
    """A command outside the app's scope fails alone with 401, and so does its split answer."""
    calls = [bare("user.current"), bare("profile"), bare("crm.lead.list", "start=-1")]
    pairs = await portals.compare(calls, client_id=NARROW_ID)
    assert [split.status for split, _ in pairs] == [401, 200, 200]
    assert parsed(pairs[0][0])["error"] == "insufficient_scope"


async def test_list_paging_next_and_total(portals: Portals) -> None:
    """Pages carry next and total (in that order, before time); the last page total only."""
    await portals.seed(120)
    calls = [
        bare("crm.lead.list"),
        bare("crm.lead.list", "start=50"),
        form("crm.lead.list", {"start": "100", "select": ["ID", "TITLE"]}),
        jsoned("crm.lead.list", {"start": 50, "order": {"ID": "DESC"}, "select": ["ID"]}),
        jsoned("crm.lead.list", {"filter": {">ID": 10, "NAME": "N3"}, "select": ["ID", "NAME"]}),
        jsoned("crm.lead.list", {"filter": {"TITLE": "nothing like it"}}),
        bare("crm.lead.list", "start=-1"),
    ]
    pairs = await portals.compare(calls)
    keys = [list(parsed(split)) for split, _ in pairs]
    assert keys[0] == keys[1] == keys[3] == ["result", "next", "total", "time"]
    assert keys[2] == keys[4] == keys[5] == ["result", "total", "time"]
    # start=-1 skips the count: total 0, no next (settings/performance/huge-data.md).
    assert keys[6] == ["result", "total", "time"]
    assert parsed(pairs[6][0])["total"] == 0
    assert parsed(pairs[0][0])["next"] == 50
    assert parsed(pairs[0][0])["total"] == 120
    assert parsed(pairs[5][0])["result"] == []
    assert parsed(pairs[5][0])["total"] == 0


async def test_profile_mixed_case_and_query_body_merge(portals: Portals) -> None:
    """Method names in any case; query-only calls; the body beats the query at the top level."""
    await portals.seed(3)
    calls = [
        bare("profile"),
        bare("PROFILE"),
        bare("User.Current"),
        bare("CRM.Lead.Get", "ID=2"),
        bare("crm.lead.get", "id=1&select%5B%5D=ID&unused=%26%3D%2B"),
        form("crm.lead.get", {"id": "3"}, query="id=1"),
        jsoned("crm.lead.get", {"id": 2}, query="id=1&other=x"),
        form("crm.lead.update", {"id": "1", "fields": {"TITLE": "Renamed & done"}}),
        jsoned("crm.lead.update", {"id": 2, "fields": {"PHONE": [{"VALUE": "555"}]}}),
        bare("crm.lead.get", "id=1"),
        jsoned("Crm.Lead.Delete", {"id": 3}),
        bare("crm.lead.get", "id=3"),
    ]
    pairs = await portals.compare(calls)
    assert [split.status for split, _ in pairs] == [200] * 11 + [400]
    assert parsed(pairs[5][0])["result"]["ID"] == "3"
    assert parsed(pairs[6][0])["result"]["ID"] == "2"
    assert parsed(pairs[9][0])["result"]["TITLE"] == "Renamed & done"


async def test_fifty_commands_in_one_batch(portals: Portals) -> None:
    """A full batch of mixed commands comes apart in order."""
    await portals.seed(5)
    calls = [
        bare("crm.lead.get", f"id={n % 7 + 1}") if n % 3 else bare("profile") for n in range(50)
    ]
    pairs = await portals.compare(calls)
    assert len(pairs) == MAX_COMMANDS
    # One seed batch and one test batch upstream, against 1 + 50 requests made alone.
    assert portals.batched.stats.upstream_requests == 2
    assert portals.alone.stats.upstream_requests == 51


# Nested keys: no brackets or NUL (refused, see the key tests) and never "0".."n-1" (PHP lists).
_KEYS = st.text(max_size=6).filter(lambda s: not {"[", "]", "\0"} & set(s)).map(lambda s: "k" + s)
_TEXT = st.text(max_size=12)
_NESTED = st.recursive(
    _TEXT,
    lambda children: st.lists(children, min_size=1, max_size=3)
    | st.dictionaries(_KEYS, children, min_size=1, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    title=_TEXT,
    extra=st.dictionaries(_KEYS, _NESTED, min_size=1, max_size=3),
    shape=st.sampled_from(["json", "form", "query"]),
)
async def test_random_nested_strings_survive_a_real_batch(
    portals: Portals, title: str, extra: dict[str, Any], shape: str
) -> None:
    """Random nested string params go through command_line and a real batch unchanged."""
    params = {"fields": {"TITLE": title, **extra}}
    if shape == "json":
        add = jsoned("crm.lead.add", params)
    elif shape == "form":
        add = form("crm.lead.add", params)
    else:
        add = bare("crm.lead.add", phpquery.encode(params))
    line = command_line(add)
    assume(line is not None)  # only a `$name[` batch reference is refused here
    [(split, _)] = await portals.compare([add])
    lead_id = parsed(split)["result"]
    await portals.compare([bare("crm.lead.get", f"id={lead_id}")])
    stored = portals.batched.leads[lead_id]
    assert stored["TITLE"] == title
    for key, value in extra.items():
        assert stored[key] == value


# -- command_line and params_of -------------------------------------------------------------------


def test_command_line_shapes() -> None:
    """Lower-case method, then PHP-style encoded params; no params, no `?`."""
    assert command_line(bare("Profile")) == "profile"
    assert command_line(bare("CRM.Lead.Get", "ID=5")) == "crm.lead.get?ID=5"
    line = line_of(jsoned("crm.lead.add", {"fields": {"TITLE": "a&b", "PHONE": [{"VALUE": "1"}]}}))
    assert line == (
        "crm.lead.add?fields%5BTITLE%5D=a%26b&fields%5BPHONE%5D%5B0%5D%5BVALUE%5D=1"
    )
    assert phpquery.parse_qs(line.partition("?")[2]) == {
        "fields": {"TITLE": "a&b", "PHONE": [{"VALUE": "1"}]}
    }


def test_numbers_are_written_as_php_reads_them() -> None:
    """Integers via str() (no `1.0`), floats as the shortest text of the same double."""
    line = line_of(jsoned("m.x", {"i": 1, "n": -7, "f": 1500.5, "g": 2.0, "big": 2**62, "e": 1e-7}))
    assert phpquery.parse_qs(line.partition("?")[2]) == {
        "i": "1", "n": "-7", "f": "1500.5", "g": "2.0", "big": str(2**62), "e": "1e-07",
    }
    assert command_line(jsoned("m.x", {"huge": 2**64})) is None


@pytest.mark.parametrize(
    "params",
    [
        {"flag": True},
        {"flag": False},
        {"value": None},
        {"fields": {"OPENED": True}},
        {"filter": {"UF_CRM_1": False}},
        {"select": ["ID", None]},
        {"select": []},
        {"filter": {}},
        {"fields": {"TITLE": "x", "UF": {}}},
    ],
)
def test_json_booleans_nulls_and_empty_containers_are_not_coalesced(params: Any) -> None:
    """No form string means what JSON true/false/null or an empty array means to a PHP method."""
    assert params_of(jsoned("crm.lead.add", params)) == params
    assert command_line(jsoned("crm.lead.add", params)) is None


async def test_why_booleans_stay_alone(portals: Portals) -> None:
    """The emulator itself reads JSON true as "Y" but any form spelling as that very string."""
    await portals.single(portals.alone, jsoned("crm.lead.add", {"fields": {"OPENED": False}}))
    await portals.single(portals.alone, form("crm.lead.add", {"fields": {"OPENED": "0"}}))
    await portals.single(portals.alone, form("crm.lead.add", {"fields": {"OPENED": ""}}))
    assert [lead["OPENED"] for lead in portals.alone.leads.values()] == ["N", "0", ""]


@pytest.mark.parametrize(
    "params",
    [
        {"fields": {"TITLE": "$result[c0]"}},
        {"fields": {"TITLE": "see $result[c1][ID] here"}},
        {"id": "$result[c0][ID]"},
        {"fields": {"$result[c0]": "x"}},
        {"x": "$error[c0]"},
    ],
)
def test_batch_references_are_not_coalesced(params: dict[str, Any]) -> None:
    """A value that batch would fill in from another command's result stays alone."""
    assert command_line(jsoned("crm.lead.add", params)) is None
    assert command_line(form("crm.lead.add", params)) is None


async def test_a_reference_would_leak_another_callers_result(portals: Portals) -> None:
    """Why: in a batch the emulator substitutes `$result[...]` in a plain title."""
    await portals.seed(1)
    lines = ["crm.lead.get?id=1", "crm.lead.add?fields%5BTITLE%5D=%24result%5Bc0%5D%5BTITLE%5D"]
    async with portals.http.post(
        f"{portals.batched.base_url}/rest/batch",
        params={"auth": portals.token(portals.batched, CLIENT_ID)},
        data=batch_body(lines),
        headers={"Content-Type": FORM},
    ) as response:
        answers = split_answers(await response.read(), 2)
    new_id = parsed(answers[1])["result"]
    assert portals.batched.leads[new_id]["TITLE"] == "Lead 1"


@pytest.mark.parametrize(
    "call",
    [
        bare("batch", "halt=0&cmd%5Ba%5D=profile"),
        bare("BATCH"),
        jsoned("Batch", {"cmd": {"a": "profile"}}),
        bare("crm.lead.get.json", "id=1"),
        bare("crm.lead.get.XML", "id=1"),
        bare("crm lead get"),
        bare("crm.lead.get?id=1"),
        bare("crm/lead"),
        bare(""),
        bare("crm..lead"),
        SingleCall("crm.lead.add", "", b"--x\r\n", "multipart/form-data; boundary=x"),
        SingleCall("crm.lead.add", "", b"{not json", JSON),
        SingleCall("crm.lead.add", "", b"[1, 2]", JSON),
        SingleCall("crm.lead.add", "", b'"text"', JSON),
        SingleCall("crm.lead.add", "", b'{"x": NaN}', JSON),
        SingleCall("crm.lead.add", "", b'{"x": Infinity}', JSON),
        SingleCall("crm.lead.add", "", b'{"x": "\\ud800"}', JSON),
        SingleCall("crm.lead.add", "", b'\xef\xbb\xbf{"x": "1"}', JSON),
        SingleCall("crm.lead.add", "", b'{"x": "\xff"}', JSON),
        SingleCall("crm.lead.add", "", b"x=1", "text/plain"),
        SingleCall("crm.lead.add", "", b"x=1", ""),
        SingleCall("crm.lead.add", "", b"x=%FF", FORM),
        SingleCall("crm.lead.add", "", b"x=\xff", FORM),
        bare("crm.lead.add", "x=%C3"),
    ],
)
def test_calls_that_are_never_coalesced(call: SingleCall) -> None:
    """batch itself, odd method names, multipart, unreadable bodies, bytes we would alter."""
    assert command_line(call) is None


@pytest.mark.parametrize(
    "params",
    [
        {"a.b": "1"},
        {"a b": "1"},
        {"": "1"},
        {"fields": {"": "1"}},
        {"fields": {"a[b]": "1"}},
        {"fields": {"a]": "1"}},
        {"fields": {"nul\x00": "1"}},
    ],
)
def test_keys_php_would_read_differently_are_not_coalesced(params: dict[str, Any]) -> None:
    """JSON keys PHP's parse_str would rename or nest stay alone."""
    assert command_line(jsoned("crm.lead.add", params)) is None


def test_nested_keys_with_dots_and_spaces_are_fine() -> None:
    """Inside brackets PHP renames nothing."""
    params = {"fields": {"a.b c": "1", "x=y&z": "2"}}
    line = line_of(jsoned("crm.lead.add", params))
    assert phpquery.parse_qs(line.partition("?")[2]) == params


def test_form_and_query_params_merge_like_the_portal() -> None:
    """Query first, body over it at the top level; PHP's [] and overwrite rules apply."""
    query = "id=1&fields%5BB%5D=q&s[]=a&s[]=b"
    call = form("m.x", {"id": "2", "fields": {"A": "body"}}, query=query)
    assert params_of(call) == {"id": "2", "fields": {"A": "body"}, "s": ["a", "b"]}
    assert params_of(SingleCall("m.x", "", b'{"id": 2}', "application/json; charset=utf-8")) == {
        "id": 2
    }
    assert params_of(SingleCall("m.x", "q=1", b"", "multipart/form-data")) == {"q": "1"}
    assert params_of(SingleCall("m.x", "", b"a=1", "Application/X-WWW-Form-Urlencoded")) == {
        "a": "1"
    }
    assert params_of(SingleCall("m.x", "", b'{"a": 1}', "application/vnd.api+json")) == {"a": 1}


def test_length_limit() -> None:
    """A line of exactly MAX_COMMAND_LENGTH is coalesced, one character more is not."""
    prefix = len("m.x?v=")
    assert len(line_of(bare("m.x", "v=" + "a" * (MAX_COMMAND_LENGTH - prefix)))) == (
        MAX_COMMAND_LENGTH
    )
    assert command_line(bare("m.x", "v=" + "a" * (MAX_COMMAND_LENGTH - prefix + 1))) is None
    # Escaping counts: each & becomes %26.
    assert command_line(bare("m.x", "v=" + "%26" * (MAX_COMMAND_LENGTH // 3))) is None


def test_depth_and_count_limits() -> None:
    """Deeper than MAX_DEPTH or more than MAX_PAIRS values: alone."""
    deep: Any = "x"
    for _ in range(MAX_DEPTH):
        deep = {"k": deep}
    assert command_line(jsoned("m.x", {"a": deep})) is not None
    assert command_line(jsoned("m.x", {"a": {"k": deep}})) is None
    many = {f"{i:x}": i % 10 for i in range(MAX_PAIRS)}  # short keys: well under the length
    assert command_line(jsoned("m.x", many)) is not None
    assert command_line(jsoned("m.x", {**many, "one": "more"})) is None


# -- batch_body -----------------------------------------------------------------------------------


def test_batch_body_is_halt_then_commands_in_order() -> None:
    """Each line is one value under cmd[cN], in order, after halt=0."""
    lines = ["profile", "crm.lead.get?id=1&x=%26%3D", "crm.lead.add?fields%5BTITLE%5D=a+b"]
    body = batch_body(lines)
    assert body.startswith(b"halt=0&cmd%5Bc0%5D=profile&cmd%5Bc1%5D=")
    decoded = phpquery.parse_qs(body.decode("ascii"))
    assert decoded == {"halt": "0", "cmd": {"c0": lines[0], "c1": lines[1], "c2": lines[2]}}
    assert list(decoded["cmd"]) == ["c0", "c1", "c2"]
    assert len(batch_body(["profile"] * MAX_COMMANDS)) > 0
    with pytest.raises(ValueError, match="1 to 50"):
        batch_body(["profile"] * (MAX_COMMANDS + 1))
    with pytest.raises(ValueError, match="1 to 50"):
        batch_body([])


# -- split_answers --------------------------------------------------------------------------------

OUTER_TIME = {"start": 1.0, "finish": 2.0, "duration": 1.0}


def batch_payload(**maps: Any) -> bytes:
    """Build a batch answer with PHP's `[]` for every map not given."""
    inner = {
        name: maps.get(name, [])
        for name in ("result", "result_error", "result_total", "result_next", "result_time")
    }
    return json.dumps({"result": inner, "time": OUTER_TIME}).encode()


def test_falsy_results_are_results() -> None:
    """[], false, null, 0 and "" are answers, not missing commands."""
    values = [[], False, None, 0, "", {}]
    payload = batch_payload(result={f"c{i}": v for i, v in enumerate(values)})
    answers = split_answers(payload, len(values))
    assert [a.status for a in answers] == [200] * len(values)
    assert [parsed(a)["result"] for a in answers] == values
    assert all(list(parsed(a)) == ["result", "time"] for a in answers)
    assert parsed(answers[0])["time"] == OUTER_TIME


def test_next_total_and_time_belong_to_their_own_key() -> None:
    """Key order result, next, total, time; each command's own result_time."""
    own_time = {"start": 1.5, "finish": 1.6, "duration": 0.1}
    payload = batch_payload(
        result={"c0": [1], "c1": [2], "c2": 5},
        result_next={"c0": 50},
        result_total={"c0": 120, "c1": 3},
        result_time={"c0": own_time},
    )
    c0, c1, c2 = (parsed(a) for a in split_answers(payload, 3))
    assert list(c0.items()) == [("result", [1]), ("next", 50), ("total", 120), ("time", own_time)]
    assert list(c1) == ["result", "total", "time"]
    assert c1["time"] == OUTER_TIME
    assert c2 == {"result": 5, "time": OUTER_TIME}


def test_error_statuses() -> None:
    """Each documented code gets its lone status; unknown and empty codes 400."""
    codes = {
        "expired_token": 401, "invalid_token": 401, "NO_AUTH_FOUND": 401,
        "insufficient_scope": 401, "INVALID_CREDENTIALS": 401, "OVERLOAD_LIMIT": 401,
        "user_access_error": 401, "ACCESS_DENIED": 403, "WRONG_AUTH_TYPE": 403,
        "PORTAL_DELETED": 403, "ERROR_METHOD_NOT_FOUND": 404, "OPERATION_TIME_LIMIT": 429,
        "QUERY_LIMIT_EXCEEDED": 503, "INTERNAL_SERVER_ERROR": 500,
        "ERROR_UNEXPECTED_ANSWER": 500, "": 400, "ERROR_CORE": 400, "ERROR_ARGUMENT": 400,
        "SOMETHING_ELSE": 400, "ERROR_BATCH_LENGTH_EXCEEDED": 400,
    }
    errors = {f"c{i}": {"error": c, "error_description": "d"} for i, c in enumerate(codes)}
    answers = split_answers(batch_payload(result_error=errors), len(codes))
    assert [a.status for a in answers] == list(codes.values())
    assert [parsed(a) for a in answers] == [
        {"error": c, "error_description": "d"} for c in codes
    ]
    assert error_status(None) == 400
    assert "ERROR_BATCH_METHOD_NOT_ALLOWED" in BATCH_ONLY_ERRORS


def test_odd_error_entries_are_tolerated() -> None:
    """Extra fields are kept after the two usual ones; a bare string is the code; an error wins."""
    payload = batch_payload(
        result={"c2": "also a result"},
        result_error={
            "c0": {"extra": 1, "error_description": "Not found", "error": "", "more": [1]},
            "c1": "ERROR_METHOD_NOT_FOUND",
            "c2": {"error": "ACCESS_DENIED", "error_description": "Access denied!"},
            "c3": {"error_description": "no code"},
            "c4": None,
        },
    )
    c0, c1, c2, c3, c4 = split_answers(payload, 5)
    assert (c0.status, list(parsed(c0).items())) == (
        400,
        [("error", ""), ("error_description", "Not found"), ("extra", 1), ("more", [1])],
    )
    assert (c1.status, parsed(c1)) == (
        404,
        {"error": "ERROR_METHOD_NOT_FOUND", "error_description": ""},
    )
    assert c2.status == 403
    assert (c3.status, parsed(c3)) == (400, {"error": "", "error_description": "no code"})
    assert (c4.status, parsed(c4)) == (400, {"error": "", "error_description": ""})


def test_missing_commands_are_lost() -> None:
    """A key in neither map (halt=1 style, or a truncated answer): 502, not to be retried."""
    error = {"error": "", "error_description": "x"}
    payload = batch_payload(result={"c0": 1}, result_error={"c2": error})
    answers = split_answers(payload, 4)
    assert [a.status for a in answers] == [200, LOST_STATUS, 400, LOST_STATUS]
    assert parsed(answers[1])["error"] == LOST_ERROR
    assert split_answers(payload, 0) == []


def test_list_shaped_maps_and_unicode() -> None:
    """A map PHP wrote as a list is read by position; answers are UTF-8 JSON."""
    payload = json.dumps(
        {"result": {"result": {"c0": "日本 🙂"}, "result_error": [], "result_time": []}}
    ).encode()
    [answer] = split_answers(payload, 1)
    assert answer.body == '{"result": "日本 🙂"}'.encode()
    weird = json.dumps({"result": {"result": ["positional"]}}).encode()
    assert split_answers(weird, 1)[0].status == LOST_STATUS


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff",
        b"[]",
        b'{"error": "expired_token", "error_description": "The access token has expired."}',
        b'{"result": []}',
        b'{"result": {"result_error": []}}',
        b'{"result": 5}',
    ],
)
def test_not_a_batch_answer(payload: bytes) -> None:
    """Anything without result.result is refused."""
    with pytest.raises(ValueError, match="batch answer"):
        split_answers(payload, 1)


def test_negative_count() -> None:
    """A negative count is a programming error."""
    with pytest.raises(ValueError, match="negative"):
        split_answers(batch_payload(), -1)
