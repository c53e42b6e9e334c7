"""What the sidecar knows of Bitrix24's list methods, to fetch a whole list at their fastest.

Pure: the table of methods (where the records sit in an answer, the id's name in a record and in
a filter, the names of the order and filter parameters), and the planning of one fetch: which
strategy a call allows and the ``batch`` commands of its next request. ``wholelist`` runs it.

Two strategies, the fastest first:

* **chain** (``>ID`` with ``start=-1``): order by the id ascending, filter ``>ID`` from the last
  record seen, skip the count query. One ``batch`` chains 50 such pages, each command's filter a
  reference to the previous page's last record (``$result[p0][49][ID]``).
* **pages**: plain ``start=N`` pages, 50 to a ``batch``, for an order the chain cannot keep or a
  method the table does not know (its records are found in the first answer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar import phpquery
from sidecar.errors import BadRequest

PAGE = 50  # records in a list method's page
BATCH = 50  # commands in one batch request
API_PAGE = 1000  # the most records a REST 3.0 list page holds (its pagination's limit)
# The most bytes of commands one batch request carries: each command repeats the caller's
# parameters, so a large filter sends fewer pages a request rather than 50 copies of itself.
BATCH_BYTES = 512 * 1024
_AUTH = frozenset({"auth", "access_token"})
# user.get's top-level parameters that are not filter fields (it reads keys upper-cased).
_USER_GET_OWN = frozenset({"SORT", "ORDER", "START", "SELECT", "FILTER", "ADMIN_MODE",
                           "IMAGE_RESIZE", "AUTH", "ACCESS_TOKEN"})


@dataclass(frozen=True, slots=True)
class ListMethod:
    """One list method's conventions.

    ``items``: the key under ``result`` that holds the records ('' : ``result`` is the list).
    ``record_id``: the id's key in a record as the answer has it. ``filter_id``: the id's name in
    a filter (``>ID``) and in an order. ``filter``/``order``: the parameters' names.
    ``sort_field``: the order is given as ``sort=<field>`` and ``order=<ASC|DESC>`` (user.get).
    ``chain``: the method documents ``start=-1`` and a ``>ID`` filter. ``bare_filter``: without
    a filter parameter, the method reads its other top-level parameters as the filter
    (user.get's documented examples pass ``UF_DEPARTMENT`` so).
    """

    name: str
    items: str = ""
    record_id: str = "ID"
    filter_id: str = "ID"
    filter: str = "filter"
    order: str = "order"
    sort_field: str = ""
    chain: bool = True
    bare_filter: bool = False


def _crm(*names: str) -> list[ListMethod]:
    return [ListMethod(name) for name in names]


METHODS: dict[str, ListMethod] = {m.name: m for m in [
    *_crm("crm.deal.list", "crm.lead.list", "crm.contact.list", "crm.company.list",
          "crm.quote.list", "crm.activity.list", "crm.product.list", "crm.requisite.list",
          "crm.productrow.list", "crm.invoice.list"),
    ListMethod("crm.item.list", items="items", record_id="id", filter_id="id"),
    ListMethod("tasks.task.list", items="tasks", record_id="id", filter_id="ID"),
    ListMethod("catalog.product.list", items="products", record_id="id", filter_id="id"),
    ListMethod("sale.order.list", items="orders", record_id="id", filter_id="id"),
    ListMethod("lists.element.get", filter="FILTER", order="ELEMENT_ORDER"),
    ListMethod("user.get", sort_field="sort", bare_filter=True),
    ListMethod("department.get", sort_field="sort", chain=False),
]}


# The last segment of methods that write or act (crm.deal.add, ...): a whole list of one
# would run it and then fail on its answer.
_ACTIONS = frozenset({"add", "update", "delete", "set", "batch", "bind", "unbind", "register",
                      "unregister", "send", "import", "upload", "start", "stop", "complete",
                      "approve", "disapprove", "pause", "renew", "defer", "delegate", "attach",
                      "detach", "move", "copy", "rename", "execute", "call", "notify"})


def not_a_list(method: str) -> bool:
    """Say whether a method plainly is no list (it writes or acts: ``*.add``, ``batch``)."""
    return method.lower().rsplit(".", 1)[-1] in _ACTIONS


def known(method: str) -> ListMethod | None:
    """The table's entry for a method (by lower-case name), or None."""
    return METHODS.get(method.lower())


def client_params(query: str, body: bytes, content_type: str) -> dict[str, Any]:
    """The parameters a list call carries in its query string and body, as the portal reads
    them (the body's win), less the client's own credentials and ``start``.

    Raise BadRequest for a body that is not a JSON object or a form, and for parameters
    nested too deep to be written into a batch's commands.
    """
    try:
        params = _client_params(query, body, content_type)
        phpquery.flatten(params)  # what each command will be written from
    except RecursionError:
        raise BadRequest("the parameters are nested too deep") from None
    return params


def _client_params(query: str, body: bytes, content_type: str) -> dict[str, Any]:
    params: dict[str, Any] = phpquery.parse_qs(query) if query else {}
    if body:
        if content_type == "application/json":
            try:
                data = json.loads(body)
            except ValueError:
                raise BadRequest("the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise BadRequest("a whole-list call's JSON body must be an object of the "
                                 "method's parameters")
        elif content_type in ("", "application/x-www-form-urlencoded"):
            try:
                data = phpquery.parse_qs(body.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest("the form body is not UTF-8") from None
        else:
            raise BadRequest(f"a whole-list call takes a JSON or form body, not {content_type}")
        params.update(data)
    return {k: v for k, v in params.items()
            if k.lower() not in _AUTH and k.lower() != "start"}


def _param(params: Mapping[str, Any], name: str) -> str | None:
    """The key under which ``params`` holds ``name``, case-insensitively (None if absent)."""
    if name in params:
        return name
    lowered = name.lower()
    return next((k for k in params if k.lower() == lowered), None)


@dataclass(frozen=True, slots=True)
class Plan:
    """How one whole list is fetched: the method, its parameters, and the strategy."""

    method: str
    params: dict[str, Any]
    entry: ListMethod | None
    chain: bool
    cursor: Any = 0  # the chain's last id seen
    api: bool = False  # a REST 3.0 list: its own pagination, one page a request

    def commands(self, start: int = 0, count: int = BATCH, step: int = PAGE) -> dict[str, str]:
        """The commands of the next batch request: ``p0`` .. ``p<count-1>``.

        Chain: page ``pN`` filters from the previous page's last record (the first from the
        cursor). Pages: ``start`` is the first page's offset, ``step`` the method's page size.
        """
        out: dict[str, str] = {}
        for index in range(count):
            key = f"p{index}"
            params = dict(self.params)
            if self.chain:
                entry = self.entry
                assert entry is not None
                where = "" if index == 0 else _reference(f"p{index - 1}", entry)
                params[self._filter_key()] = {**self._filter(),
                                              f">{entry.filter_id}": where or self.cursor}
                params["start"] = -1
            else:
                params["start"] = start + index * step
            out[key] = f"{self.method}?{phpquery.encode(params)}"
        return out

    def per_request(self) -> int:
        """How many pages one batch request may carry: 50, fewer when the commands are so
        long that 50 would pass ``BATCH_BYTES``."""
        line = max(len(line) for line in self.commands(count=2).values())
        return max(1, min(BATCH, BATCH_BYTES // line))

    def _filter_key(self) -> str:
        assert self.entry is not None
        return _param(self.params, self.entry.filter) or self.entry.filter

    def _filter(self) -> dict[str, Any]:
        key = _param(self.params, self._filter_key())
        value = self.params.get(key) if key is not None else None
        return dict(value) if isinstance(value, Mapping) else {}


def _reference(key: str, entry: ListMethod) -> str:
    """A batch reference to the id of page ``key``'s last record."""
    where = f"$result[{key}]"
    if entry.items:
        where += f"[{entry.items}]"
    return f"{where}[{PAGE - 1}][{entry.record_id}]"


def plan(method: str, params: dict[str, Any]) -> Plan:
    """Choose the fastest strategy the method and the caller's order allow."""
    entry = known(method)
    if entry is None or not entry.chain:
        return Plan(method, params, entry, chain=False)
    params = dict(params)
    filter_key = _param(params, entry.filter)
    if entry.bare_filter and filter_key is None:
        # The chain's FILTER would make the method ignore the caller's top-level fields:
        # they move into it, as the method itself would read them.
        fields = {k: v for k, v in params.items() if k.upper() not in _USER_GET_OWN}
        if fields:
            params = {k: v for k, v in params.items() if k not in fields}
            params[entry.filter] = fields
            filter_key = entry.filter
    where = params.get(filter_key) if filter_key is not None else None
    if isinstance(where, list):
        # PHP reads an array as keyed 0, 1, ... (nested groups of conditions): so does the
        # chain, beside which its own >ID bound goes.
        assert filter_key is not None
        where = params[filter_key] = {str(i): v for i, v in enumerate(where)}
    elif where not in (None, "") and not isinstance(where, Mapping):
        return Plan(method, params, entry, chain=False)  # not a filter the chain can extend
    if not _ascending_by_id(params, entry) or _filters_id(params, entry):
        return Plan(method, params, entry, chain=False)
    cursor: Any = 0
    if isinstance(where, Mapping):
        bound = next((k for k in where if str(k).lower() == f">{entry.filter_id.lower()}"),
                     None)
        if bound is not None:  # the caller's own >ID: the chain starts there
            assert filter_key is not None
            cursor = where[bound]
            params[filter_key] = {k: v for k, v in where.items() if k != bound}
    order_key = _param(params, entry.order) or entry.order
    if entry.sort_field:  # user.get: sort=<field>&order=<direction>
        params[_param(params, entry.sort_field) or entry.sort_field] = entry.filter_id
        params[order_key] = "ASC"
    else:
        params[order_key] = {entry.filter_id: "ASC"}
    select_key = _param(params, "select")
    if select_key is not None:
        select = params[select_key]
        names = list(select.values()) if isinstance(select, Mapping) else (
            list(select) if isinstance(select, list) else [select])
        if not any(str(n) in ("*", entry.filter_id, entry.record_id) for n in names):
            # The chain reads each page's last id: it must be in the answer.
            params[select_key] = [*names, entry.filter_id]
    return Plan(method, params, entry, chain=True, cursor=cursor)


def plan_api(method: str, params: dict[str, Any]) -> Plan:
    """Plan a REST 3.0 list: by ``id`` ascending with an ``id > last`` filter when the
    caller's order allows (no order, or ``id`` ascending), else by offset."""
    order = params.get("order")
    where = params.get("filter")
    by_id = order in (None, {}, []) or (
        isinstance(order, Mapping) and len(order) == 1
        and str(next(iter(order))).lower() == "id"
        and str(next(iter(order.values()))).upper() == "ASC")
    if where not in (None, [], {}) and not isinstance(where, list | Mapping):
        raise BadRequest("a REST 3.0 filter is an array of conditions")
    if isinstance(where, list) and any(
            isinstance(c, list) and c and str(c[0]).lower() == "id" for c in where):
        by_id = False  # the caller bounds the id itself: the chain's own bound would clash
    params = dict(params)
    params.pop("pagination", None)
    if by_id:
        params["order"] = {"id": "ASC"}
        select = params.get("select")
        if isinstance(select, list) and "id" not in select and "*" not in select:
            params["select"] = [*select, "id"]
    return Plan(method, params, ListMethod(method, items="items", record_id="id",
                                           filter_id="id"), by_id, None, api=True)


def api_page(plan_: Plan, cursor: Any, offset: int) -> dict[str, Any]:
    """The parameters of a REST 3.0 list's next page: after ``cursor`` (chain) or from
    ``offset``."""
    params = dict(plan_.params)
    if plan_.chain:
        where = params.get("filter")
        conditions = list(where) if isinstance(where, list) else (
            [where] if isinstance(where, Mapping) and where else [])
        if cursor is not None:
            conditions.append(["id", ">", cursor])
        if conditions:
            params["filter"] = conditions
        params["pagination"] = {"limit": API_PAGE}
    else:
        params["pagination"] = {"limit": API_PAGE, "offset": offset}
    return params


def _ascending_by_id(params: Mapping[str, Any], entry: ListMethod) -> bool:
    """No order, or the id ascending alone."""
    key = _param(params, entry.order)
    order = params.get(key) if key is not None else None
    if entry.sort_field:
        sort_key = _param(params, entry.sort_field)
        field = params.get(sort_key) if sort_key is not None else None
        return (field in (None, "") or str(field).lower() == entry.filter_id.lower()) and (
            order in (None, "") or str(order).upper() == "ASC")
    if order in (None, "", [], {}):
        return True
    if not isinstance(order, Mapping) or len(order) != 1:
        return False
    (field, direction), = order.items()
    return str(field).lower() == entry.filter_id.lower() and str(direction).upper() == "ASC"


def _filters_id(params: Mapping[str, Any], entry: ListMethod) -> bool:
    """The caller's filter bounds the id in a way the chain cannot take over: ``>=ID``, or a
    ``>ID`` that is not one whole number."""
    key = _param(params, entry.filter)
    where = params.get(key) if key is not None else None
    if not isinstance(where, Mapping):
        return False
    name = entry.filter_id.lower()
    for k, v in where.items():
        lowered = str(k).lower()
        if lowered == f">={name}" or (lowered == f">{name}" and not str(v).isdigit()):
            return True
    return False


def records(result: Any, entry: ListMethod | None) -> list[Any] | None:
    """The records of one page's ``result`` (None: not a list page).

    A method outside the table has them as the result itself, or as the one list in it
    (``{"tasks": [...]}``).
    """
    if entry is not None:
        if not entry.items:
            return result if isinstance(result, list) else None
        inner = result.get(entry.items) if isinstance(result, Mapping) else None
        if isinstance(inner, list):
            return inner
        # PHP's json_encode writes an empty keyed array as [] where an object was expected.
        return [] if result == [] or inner == {} else None
    if isinstance(result, list):
        return result
    if isinstance(result, Mapping):
        lists = [v for v in result.values() if isinstance(v, list)]
        if len(lists) == 1 and len(result) == 1:
            return lists[0]
    return None


def items_key(result: Any, entry: ListMethod | None) -> str:
    """The key the records sit under in a page's ``result`` ('' : the result is the list)."""
    if entry is not None:
        return entry.items
    if isinstance(result, Mapping) and len(result) == 1:
        return str(next(iter(result)))
    return ""
