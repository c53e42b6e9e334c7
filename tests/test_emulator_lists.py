"""The emulator's list methods and batch references, driven over real sockets as a portal would be.

Every list method pages by `start` (50 a page, `next`, `total`), answers `start=-1` with one
uncounted page, honours order/filter/select, and serves the fast whole-list walk: order by ID,
filter `>ID` from the last record seen, `start=-1`, chained 50 pages to a batch by `$result[...]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from sidecar import phpquery
from sidecar.emulator import Emulator, Records, run_emulator

HOOK_USER = 1
HOOK_CODE = "lists0123456789a"


@dataclass
class Rest:
    """A served emulator and a webhook client for it."""

    emulator: Emulator
    base: str
    http: aiohttp.ClientSession

    async def call(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST one method with a JSON body; return the status and the decoded answer."""
        async with self.http.post(f"{self.base}/{method}", json=params) as response:
            return response.status, await response.json()

    async def batch(self, cmd: dict[str, str], *, form: bool = False) -> dict[str, Any]:
        """Run one batch, `cmd` sent as JSON or as PHP form keys; return the inner result."""
        if form:
            data = phpquery.encode({"halt": 0, "cmd": cmd})
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            async with self.http.post(f"{self.base}/batch", data=data, headers=headers) as resp:
                body = await resp.json()
        else:
            async with self.http.post(f"{self.base}/batch", json={"halt": 0, "cmd": cmd}) as resp:
                body = await resp.json()
        assert resp.status == 200
        result: dict[str, Any] = body["result"]
        return result


@pytest.fixture
async def rest() -> AsyncIterator[Rest]:
    """Serve an emulator with a webhook on loopback."""
    emulator = Emulator()
    emulator.register_webhook(HOOK_USER, HOOK_CODE)
    async with run_emulator(emulator) as base_url, aiohttp.ClientSession() as http:
        yield Rest(emulator, f"{base_url}/rest/{HOOK_USER}/{HOOK_CODE}", http)


@dataclass(frozen=True)
class Spec:
    """How one list method is called and answers, as the portal's documentation has it."""

    method: str
    table: str
    id_key: str = "ID"
    items_key: str | None = None
    int_ids: bool = False
    minus_one_total: int | None = 0
    base: dict[str, Any] = field(default_factory=dict)
    filter_key: str = "filter"
    base_filter: dict[str, Any] = field(default_factory=dict)

    def params(self, start: int, after: Any = None, **extra: Any) -> dict[str, Any]:
        """Build the parameters of one page: ID ascending, `>ID` after `after` if given."""
        conditions = dict(self.base_filter)
        if after is not None:
            conditions[f">{self.id_key}"] = after
        params = dict(self.base) | {"start": start}
        if self.method == "user.get":
            params |= {"sort": "ID", "order": "ASC"}
        elif self.method == "lists.element.get":
            params["ELEMENT_ORDER"] = {"ID": "ASC"}
        else:
            params["order"] = {self.id_key: "ASC"}
        if conditions:
            params[self.filter_key] = conditions
        return params | extra

    def page(self, result: Any) -> list[dict[str, Any]]:
        """Return the records of one answer's result."""
        records = result if self.items_key is None else result[self.items_key]
        assert isinstance(records, list)
        return records

    def ids(self, result: Any) -> list[int]:
        """Return the IDs of one answer's records, checking their JSON type."""
        values = [r[self.id_key] for r in self.page(result)]
        assert all(isinstance(v, int if self.int_ids else str) for v in values)
        return [int(v) for v in values]

    def last_ref(self, command: str) -> str:
        """Reference the ID of record 49 of an earlier command's page."""
        items = f"[{self.items_key}]" if self.items_key else ""
        return f"$result[{command}]{items}[49][{self.id_key}]"


SPECS = [
    Spec("crm.lead.list", "crm.lead"),
    Spec("crm.deal.list", "crm.deal"),
    Spec("crm.contact.list", "crm.contact"),
    Spec("crm.company.list", "crm.company"),
    Spec("crm.activity.list", "crm.activity"),
    Spec("crm.product.list", "crm.product"),
    Spec("crm.timeline.comment.list", "crm.timeline.comment"),
    Spec("crm.item.list", "crm.item:1032", id_key="id", items_key="items", int_ids=True,
         base={"entityTypeId": 1032}),
    Spec("crm.item.list", "crm.deal", id_key="id", items_key="items", int_ids=True,
         base={"entityTypeId": 2}),
    Spec("tasks.task.list", "tasks.task", id_key="id", items_key="tasks"),
    Spec("user.get", "user", filter_key="FILTER"),
    Spec("lists.element.get", "lists.element:47", filter_key="FILTER",
         base={"IBLOCK_TYPE_ID": "lists", "IBLOCK_ID": 47}),
    Spec("catalog.product.list", "catalog.product:23", id_key="id", items_key="products",
         int_ids=True, minus_one_total=None, base={"select": ["id", "iblockId", "name"]},
         base_filter={"iblockId": 23}),
]
SPEC_IDS = [f"{s.method}:{s.table}" for s in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
async def test_each_method_pages_to_the_end_with_start(rest: Rest, spec: Spec) -> None:
    """start=0, 50, 100 give 50, 50, 23 records with next on all but the last and total 123."""
    rest.emulator.seed(spec.table, 123)
    seen: list[int] = []
    start: int | None = 0
    answers = []
    while start is not None:
        status, body = await rest.call(spec.method, spec.params(start))
        assert status == 200, body
        answers.append(body)
        seen += spec.ids(body["result"])
        start = body.get("next")
    assert seen == list(range(1, 124))
    assert [b.get("next") for b in answers] == [50, 100, None]
    assert [b["total"] for b in answers] == [123, 123, 123]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
async def test_start_minus_one_is_one_uncounted_page(rest: Rest, spec: Spec) -> None:
    """start=-1: the first 50 matching records, no next, total 0 (catalog: no total)."""
    rest.emulator.seed(spec.table, 120)
    status, body = await rest.call(spec.method, spec.params(-1, 30))
    assert status == 200, body
    assert spec.ids(body["result"]) == list(range(31, 81))
    assert "next" not in body
    if spec.minus_one_total is None:
        assert "total" not in body
    else:
        assert body["total"] == spec.minus_one_total
    status, body = await rest.call(spec.method, spec.params(-1, 100))
    assert spec.ids(body["result"]) == list(range(101, 121))


async def walk(rest: Rest, spec: Spec, *, form: bool = False) -> tuple[list[int], int]:
    """Fetch a whole list the fast way, 50 chained `>ID` pages a batch; return IDs and batches."""
    seen: list[int] = []
    last = 0
    batches = 0
    while True:
        cmd = {}
        for i in range(50):
            after = str(last) if i == 0 else spec.last_ref(f"c{i - 1}")
            cmd[f"c{i}"] = f"{spec.method}?{phpquery.encode(spec.params(-1, after))}"
        answer = await rest.batch(cmd, form=form)
        batches += 1
        assert answer["result_error"] == []
        for i in range(50):
            page = spec.ids(answer["result"][f"c{i}"])
            seen += page
            if len(page) < 50:
                # What the chain returns after its first short page is not data.
                return seen, batches
        last = seen[-1]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
async def test_a_batch_chain_returns_every_record_once_in_order(rest: Rest, spec: Spec) -> None:
    """12,345 records come back whole through `>ID` + start=-1 chains of 50 a batch."""
    rest.emulator.seed(spec.table, 12_345)
    seen, batches = await walk(rest, spec)
    assert seen == list(range(1, 12_346))
    assert batches == 5
    assert rest.emulator.stats.rest_calls["batch"] == 5


async def test_a_chain_sent_as_form_keys_works_the_same(rest: Rest) -> None:
    """`cmd[c0]=...` PHP form keys carry the same references as a JSON cmd object."""
    spec = SPECS[1]
    rest.emulator.seed(spec.table, 2_600)
    seen, batches = await walk(rest, spec, form=True)
    assert (seen, batches) == (list(range(1, 2_601)), 2)


async def test_a_reference_past_a_short_page_is_the_whole_page(rest: Rest) -> None:
    """After a short page `$result[c1][49][ID]` is the page itself: `>ID` = array means ID > 1."""
    rest.emulator.seed("crm.deal", 60)
    spec = SPECS[1]
    cmd = {
        "c0": f"crm.deal.list?{phpquery.encode(spec.params(-1, 0))}",
        "c1": f"crm.deal.list?{phpquery.encode(spec.params(-1, spec.last_ref('c0')))}",
        "c2": f"crm.deal.list?{phpquery.encode(spec.params(-1, spec.last_ref('c1')))}",
        "far": f"crm.deal.list?{phpquery.encode(spec.params(-1, 10**9))}",
        "empty": f"crm.deal.list?{phpquery.encode(spec.params(-1, spec.last_ref('far')))}",
        "text": "crm.lead.add?fields[TITLE]=after+$result[c1][49][ID]+end",
        "missing": "crm.lead.add?fields[TITLE]=$result[nothing][0][ID]",
    }
    answer = await rest.batch(cmd)
    results = answer["result"]
    assert spec.ids(results["c0"]) == list(range(1, 51))
    assert spec.ids(results["c1"]) == list(range(51, 61))
    # CSQLWhere compares `>` with element 0 of an array, intval'd: a record is 1.
    assert spec.ids(results["c2"]) == list(range(2, 52))
    assert results["far"] == []
    # An empty array has no element 0: the condition matches nothing.
    assert results["empty"] == []
    leads = rest.emulator.leads
    # A reference inside a longer text is filled in only by a string or number.
    assert leads[results["text"]]["TITLE"] == "after $result[c1][49][ID] end"
    # An unknown command stops the walk at `result` itself: every result so far, not a string.
    assert isinstance(leads[results["missing"]]["TITLE"], dict)


async def test_next_total_time_and_error_references(rest: Rest) -> None:
    """`$next`, `$total`, `$time` and `$error` read the other answer maps of the batch."""
    rest.emulator.seed("crm.deal", 60)
    cmd = {
        "first": "crm.deal.list?order[ID]=ASC",
        "second": "crm.deal.list?order[ID]=ASC&start=$next[first]",
        # `>=` inside a key must be encoded, or the query string splits at its `=`.
        "above": "crm.deal.list?order[ID]=ASC&start=-1&filter%5B%3E%3DID%5D=$total[first]",
        "bad": "crm.lead.get?id=999",
        "why": "crm.lead.add?fields[TITLE]=$error[bad][error_description]",
        "when": "crm.lead.add?fields[TITLE]=at+$time[first][date_start]",
    }
    answer = await rest.batch(cmd)
    results = answer["result"]
    assert [int(r["ID"]) for r in results["second"]] == list(range(51, 61))
    assert [int(r["ID"]) for r in results["above"]] == [60]
    assert answer["result_next"] == {"first": 50}
    assert answer["result_total"] == {"first": 60, "second": 60, "above": 0}
    leads = rest.emulator.leads
    assert leads[results["why"]]["TITLE"] == "Not found"
    assert leads[results["when"]]["TITLE"] == "at " + answer["result_time"]["first"]["date_start"]


async def test_order_filter_and_select(rest: Rest) -> None:
    """Multi-key order in any case, the filter operators and select, on crm.deal.list."""
    emulator = rest.emulator
    emulator.seed("crm.deal", 20, lambda n: {"STAGE_ID": "WON" if n % 2 else "NEW",
                                              "TITLE": f"Deal {n:02d}"})

    async def ids(params: dict[str, Any]) -> list[int]:
        status, body = await rest.call("crm.deal.list", params)
        assert status == 200, body
        return [int(r["ID"]) for r in body["result"]]

    by_stage = await ids({"order": {"STAGE_ID": "asc", "ID": "desc"}, "filter": {"<=ID": 6}})
    assert by_stage == [6, 4, 2, 5, 3, 1]
    assert await ids({"filter": {">=ID": 18}}) == [18, 19, 20]
    assert await ids({"filter": {">ID": 2, "<ID": 5}}) == [3, 4]
    assert await ids({"filter": {"!ID": 1, "<ID": 4}}) == [2, 3]
    assert await ids({"filter": {"=ID": 7}}) == [7]
    assert await ids({"filter": {"@ID": [3, 9]}}) == [3, 9]
    assert await ids({"filter": {"%TITLE": "deal 1"}}) == list(range(10, 20))
    assert await ids({"filter": {"STAGE_ID": "WON", "<ID": 6}}) == [1, 3, 5]
    assert await ids({"order": {"ID": "DESC"}, "filter": {"<ID": 4}}) == [3, 2, 1]
    _, body = await rest.call("crm.deal.list", {"select": ["TITLE"], "filter": {"ID": 2}})
    assert body["result"] == [{"ID": "2", "TITLE": "Deal 02"}]
    _, body = await rest.call(
        "crm.item.list",
        {"entityTypeId": 2, "select": ["id", "stageId"],
         "filter": {"0": {"logic": "OR", "0": {"=id": 1}, "1": {">id": 19}}}},
    )
    assert body["result"] == {"items": [{"id": 1, "stageId": "WON"}, {"id": 20, "stageId": "NEW"}]}


async def test_default_orders_follow_the_docs(rest: Rest) -> None:
    """tasks.task.list sorts by ID descending, crm.activity.list by START_TIME, unless told."""
    rest.emulator.seed("tasks.task", 3)
    _, body = await rest.call("tasks.task.list", {})
    assert [t["id"] for t in body["result"]["tasks"]] == ["3", "2", "1"]
    starts = {1: "2030-01-03", 2: "2030-01-01", 3: "2030-01-02"}
    rest.emulator.seed("crm.activity", 3, lambda n: {"START_TIME": starts[n]})
    _, body = await rest.call("crm.activity.list", {})
    assert [a["ID"] for a in body["result"]] == ["2", "3", "1"]


async def test_methods_refuse_what_the_portal_refuses(rest: Rest) -> None:
    """lists.element.get needs its IBLOCK_*, catalog.product.list its select and iblockId."""
    rest.emulator.seed("lists.element:47", 1)
    status, body = await rest.call("lists.element.get", {"IBLOCK_ID": 47})
    assert (status, body["error"]) == (400, "ERROR_REQUIRED_PARAMETERS_MISSING")
    status, body = await rest.call("lists.element.get", {"IBLOCK_TYPE_ID": "lists",
                                                         "IBLOCK_ID": 48})
    assert (status, body["error"]) == (400, "ERROR_IBLOCK_NOT_FOUND")
    status, body = await rest.call("catalog.product.list", {"filter": {"iblockId": 23}})
    assert status == 400
    status, body = await rest.call("crm.item.list", {"entityTypeId": 999})
    assert status == 400


async def test_a_hundred_thousand_records(rest: Rest) -> None:
    """100,000 seeded deals: the fast walk returns each once, and the last start page counts all."""
    spec = SPECS[1]
    assert rest.emulator.seed(spec.table, 100_000)[-1] == 100_000
    seen, batches = await walk(rest, spec)
    assert batches == 41
    assert len(seen) == 100_000
    assert seen == sorted(set(seen))
    _, body = await rest.call("crm.deal.list", spec.params(99_950))
    assert (len(body["result"]), body["total"], "next" in body) == (50, 100_000, False)


async def test_records_added_and_deleted_while_walking(rest: Rest) -> None:
    """A record added mid-walk shows up at the end; a lead deleted over REST is skipped."""
    spec = SPECS[0]
    rest.emulator.seed("crm.lead", 100)
    status, body = await rest.call("crm.lead.delete", {"id": 70})
    assert status == 200
    _, first = await rest.call(spec.method, spec.params(-1, 0))
    new_id = rest.emulator.add_record("crm.lead", {"TITLE": "late"})
    assert new_id == 101
    ids = spec.ids(first["result"])
    _, second = await rest.call(spec.method, spec.params(-1, ids[-1]))
    ids += spec.ids(second["result"])
    _, third = await rest.call(spec.method, spec.params(-1, ids[-1]))
    assert third["result"] == []
    assert ids == [n for n in range(1, 102) if n != 70]
    rest.emulator.clear_records("crm.lead")
    _, body = await rest.call(spec.method, spec.params(0))
    assert (body["result"], body["total"]) == ([], 0)


def test_records_keep_their_ids_sorted() -> None:
    """IDs stored out of order, deleted and cleared keep the sorted view and the sequence right."""
    records = Records()
    for key in (5, 2, 9, 7):
        records[key] = {"ID": str(key)}
    del records[9]
    assert list(records.sorted_ids) == [2, 5, 7]
    assert list(records) == [5, 2, 7]
    assert records.allocate() == 8
    records.clear()
    assert records == {}
    assert records.allocate() == 9
