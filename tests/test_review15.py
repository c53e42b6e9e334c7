"""Review of issue 15 (REST 3.0 and whole lists): each finding as a test over real sockets, the
emulator a real server and the sidecar served by create_app. Every test here failed before its
fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidecar.emulator import Emulator
from sidecar.emulator.model import Caller, MethodResult
from sidecar.emulator.records import php_int
from tests import wide
from tests.wide import Client, ids

# The wider-scope emulator and its sidecar (tests/wide.py).
emulator = wide.emulator
list_settings = wide.list_settings
sidecar = wide.sidecar


async def whole(sidecar: Client, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Ask for a whole list with a JSON body; return its records."""
    response = await sidecar.post(path, json=params)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["total"] == len(body["result"])
    records: list[dict[str, Any]] = body["result"]
    return records


async def single_pages(sidecar: Client, method: str, params: dict[str, Any]) -> list[int]:
    """Read a list page by page with plain calls, as a naive client does: the reference."""
    out: list[int] = []
    start = 0
    while True:
        response = await sidecar.post(f"/rest/{method}", json={**params, "start": start})
        assert response.status == 200, await response.text()
        body = await response.json()
        out += ids(body["result"])
        if "next" not in body:
            return out
        start = body["next"]


class TestFilters:
    async def test_user_get_filter_given_as_top_level_fields(
            self, sidecar: Client, emulator: Emulator) -> None:
        """user.get reads its filter from top-level fields when there is no FILTER (its
        documented examples do so): the chain must not replace them with a FILTER of its own
        and return every user."""
        emulator.seed("user", 120)
        params = {"<ID": 10, "SORT": "ID", "ORDER": "asc"}
        expected = await single_pages(sidecar, "user.get", params)
        assert expected == list(range(1, 10))
        assert ids(await whole(sidecar, "/all/rest/user.get", params)) == expected
        assert ids(await whole(sidecar, "/all/rest/user.get", {"NAME": "User 77"})) == [77]
        # A top-level lower bound of the caller's own starts the chain there.
        assert ids(await whole(sidecar, "/all/rest/user.get", {">ID": 110})) == list(
            range(111, 121))

    async def test_a_filter_given_as_a_list(self, sidecar: Client,
                                            emulator: Emulator) -> None:
        """A JSON filter given as an array (PHP reads it as an array keyed 0, 1, ...: nested
        conditions) is kept, not dropped for the chain's own."""
        emulator.seed("crm.deal", 120)
        params = {"filter": [{"LOGIC": "OR", "<ID": 5, ">ID": 115}]}
        expected = await single_pages(sidecar, "crm.deal.list", params)
        assert expected == [1, 2, 3, 4, 116, 117, 118, 119, 120]
        assert ids(await whole(sidecar, "/all/rest/crm.deal.list", params)) == expected


def paged_by(size: int, count: int, hidden: Callable[[int], bool] = lambda _: False) -> Callable[
        [Caller, dict[str, Any]], MethodResult]:
    """A list method over records 1..count that pages by ``size`` (``next``, ``total``) and
    leaves out the ``hidden`` ones from their page (as a method that checks each record's
    access after the query does), so a page may be short while more follow."""

    def handler(caller: Caller, params: dict[str, Any]) -> MethodResult:
        start = max(0, php_int(params.get("start")))
        window = range(start + 1, min(start + size, count) + 1)
        page = [{"ID": str(n)} for n in window if not hidden(n)]
        following = start + size if start + size < count else None
        return MethodResult(page, next=following, total=count)

    return handler


class TestPaging:
    @pytest.mark.parametrize("size", [20, 50, 100])
    async def test_a_method_whose_page_is_not_50(self, sidecar: Client, emulator: Emulator,
                                                 size: int) -> None:
        """A method outside the table that pages by another size: every record once, in
        order (the offsets are the portal's next, not multiples of 50)."""
        emulator.add_method("test.odd.list", paged_by(size, 1234))
        expected = await single_pages(sidecar, "test.odd.list", {})
        assert expected == list(range(1, 1235))
        assert ids(await whole(sidecar, "/all/rest/test.odd.list", {})) == expected

    async def test_a_short_page_that_says_more_follow(self, sidecar: Client,
                                                      emulator: Emulator) -> None:
        """A page shorter than 50 that still carries next is not the end of the list."""
        emulator.add_method("test.gappy.list", paged_by(50, 3000, lambda n: 60 < n <= 100))
        expected = await single_pages(sidecar, "test.gappy.list", {})
        assert len(expected) == 2960
        assert ids(await whole(sidecar, "/all/rest/test.gappy.list", {})) == expected


class TestBounds:
    @pytest.mark.parametrize("order", [{}, {"ID": "DESC"}])
    async def test_a_large_parameter_is_not_copied_fifty_times(
            self, sidecar: Client, emulator: Emulator, order: dict[str, str]) -> None:
        """Every command of a batch repeats the caller's parameters: 200 KB of them make
        batches of a few pages (each request under 1 MiB), not 10 MB requests (50 copies held
        in the sidecar's memory, and refused by the portal)."""
        emulator.seed("crm.deal", 500)
        params = {"order": order, "filter": {"%TITLE": "Deal"}, "comment": "x" * 200_000}
        expected = list(range(1, 501))
        assert ids(await whole(sidecar, "/all/rest/crm.deal.list", params)) == (
            expected[::-1] if order else expected)
        sizes = [len(call.body) for call in emulator.rest_log if call.method == "batch"]
        assert sizes
        assert max(sizes) < 1 << 20

    @pytest.mark.parametrize("where", ["query", "form", "json"])
    async def test_deeply_nested_parameters_are_a_400(self, sidecar: Client,
                                                      emulator: Emulator, where: str) -> None:
        """Parameters nested deeper than Python's recursion allows are a bad request in the
        Bitrix shape, not the sidecar's unexpected failure; nothing reaches the portal."""
        form = "filter" + "[a]" * 2000 + "=1"
        body = "{\"filter\": " + "{\"a\": " * 990 + "1" + "}" * 990 + "}"
        if where == "query":
            response = await sidecar.get(f"/all/rest/crm.deal.list?{form}")
        elif where == "form":
            response = await sidecar.post("/all/rest/crm.deal.list", data=form, headers={
                "Content-Type": "application/x-www-form-urlencoded"})
        else:
            response = await sidecar.post("/all/rest/crm.deal.list", data=body, headers={
                "Content-Type": "application/json"})
        assert response.status == 400, await response.text()
        body = await response.json()
        assert body["error"] == "SIDECAR_BAD_REQUEST", body
        assert list(emulator.rest_log) == []
