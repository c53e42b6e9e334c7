"""The portal's list methods over many record tables, and the test controls that fill them.

Each method reads its parameters the way that method does on a real portal (crm.*.list: order /
filter / select; crm.item.list: entityTypeId and camelCase; tasks.task.list: `tasks`; user.get:
sort / order / FILTER; lists.element.get: IBLOCK_* / ELEMENT_ORDER / FILTER; catalog.product.list:
`products`) and hands the rest to the shared engine in `records`. Tables are named like the
methods' entities: "crm.deal", "tasks.task", "user", "crm.item:1032", "lists.element:47",
"catalog.product:23" (the part after the colon is the entity type or information block).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sidecar.emulator.model import Caller, Method, MethodResult, RestError
from sidecar.emulator.records import (
    ListQuery,
    ListStyle,
    Records,
    View,
    names_param,
    order_param,
    php_int,
    run_list,
)
from sidecar.emulator.wire import iso

__all__ = ["CLASSIC_TABLES", "Lists"]

# crm.*.list methods and the table each reads; crm.timeline.comment.list is one the sidecar does
# not know, for testing its fallback paging.
CLASSIC_TABLES = {
    "crm.lead.list": "crm.lead",
    "crm.deal.list": "crm.deal",
    "crm.contact.list": "crm.contact",
    "crm.company.list": "crm.company",
    "crm.activity.list": "crm.activity",
    "crm.product.list": "crm.product",
    "crm.timeline.comment.list": "crm.timeline.comment",
}
# crm.item.list's system entity types read the classic tables.
_ITEM_TYPES = {1: "crm.lead", 2: "crm.deal", 3: "crm.contact", 4: "crm.company"}
_CRM_MULTI = frozenset({"PHONE", "EMAIL", "WEB", "IM"})

_CRM = ListStyle("ID", star_hides=_CRM_MULTI)
# crm.activity.list sorts by START_TIME ascending when no order is given.
_ACTIVITY = ListStyle("ID", default_order=(("START_TIME", False),))
_ITEM = ListStyle("id", int_ids=True, items_key="items", default_order=(("id", False),))
_ITEM_CLASSIC = ListStyle("ID", int_ids=True, items_key="items", camel_output=True,
                          star_hides=_CRM_MULTI)
# tasks.task.list sorts by ID descending when no order is given.
_TASK = ListStyle("id", items_key="tasks", default_order=(("id", True),))
_USER = ListStyle("ID")
_ELEMENT = ListStyle("ID")
# Catalog methods leave `total` out of a start=-1 answer.
_PRODUCT = ListStyle("id", int_ids=True, items_key="products", default_order=(("id", False),),
                     minus_one_total=None)


def _param(params: Mapping[str, Any], *names: str) -> Any:
    """Return the first of these parameters present (None if none is)."""
    for name in names:
        if name in params:
            return params[name]
    return None


def _filter(value: Any) -> Mapping[str, Any] | None:
    """Read a filter parameter: a map, or nothing. A list is PHP's array keyed 0, 1, ...:
    each entry a nested group of conditions."""
    if isinstance(value, list):
        return {str(index): item for index, item in enumerate(value)}
    return value if isinstance(value, Mapping) else None


def _maker(table: str, clock: Callable[[], float]) -> Callable[[int], dict[str, Any]]:
    """Return what a seeded record of this table holds, by ID."""
    family, _, scope = table.partition(":")
    now = clock()

    def make(n: int) -> dict[str, Any]:
        """Build record n."""
        created = iso(now + n)
        if family == "crm.lead":
            return {"ID": str(n), "TITLE": f"Lead {n}", "STATUS_ID": "NEW", "OPENED": "Y",
                    "ASSIGNED_BY_ID": "1", "DATE_CREATE": created}
        if family == "crm.deal":
            return {"ID": str(n), "TITLE": f"Deal {n}", "STAGE_ID": "NEW", "CURRENCY_ID": "USD",
                    "OPPORTUNITY": str(n % 1000 * 10), "ASSIGNED_BY_ID": "1",
                    "DATE_CREATE": created}
        if family == "crm.contact":
            return {"ID": str(n), "NAME": f"Name {n}", "LAST_NAME": f"Last {n}",
                    "ASSIGNED_BY_ID": "1", "DATE_CREATE": created}
        if family == "crm.company":
            return {"ID": str(n), "TITLE": f"Company {n}", "COMPANY_TYPE": "CUSTOMER",
                    "ASSIGNED_BY_ID": "1", "DATE_CREATE": created}
        if family == "crm.activity":
            return {"ID": str(n), "SUBJECT": f"Call {n}", "TYPE_ID": "2", "OWNER_TYPE_ID": "2",
                    "OWNER_ID": "1", "START_TIME": created, "COMPLETED": "N"}
        if family == "crm.product":
            return {"ID": str(n), "NAME": f"Product {n}", "PRICE": str(n % 100),
                    "CURRENCY_ID": "USD", "CATALOG_ID": "1"}
        if family == "crm.timeline.comment":
            return {"ID": str(n), "ENTITY_ID": "1", "ENTITY_TYPE": "deal", "CREATED": created,
                    "COMMENT": f"Comment {n}", "AUTHOR_ID": "1"}
        if family == "crm.item":
            return {"id": n, "title": f"Item {n}", "entityTypeId": php_int(scope),
                    "stageId": "NEW", "assignedById": 1, "createdTime": created}
        if family == "tasks.task":
            return {"id": str(n), "title": f"Task {n}", "status": "2", "priority": "1",
                    "responsibleId": "1", "createdBy": "1", "createdDate": created}
        if family == "user":
            return {"ID": str(n), "ACTIVE": True, "NAME": f"User {n}", "LAST_NAME": "Emulator",
                    "EMAIL": f"user{n}@example.com", "USER_TYPE": "employee",
                    "UF_DEPARTMENT": [1]}
        if family == "lists.element":
            return {"ID": str(n), "IBLOCK_ID": scope, "NAME": f"Element {n}",
                    "CODE": f"element_{n}", "IBLOCK_SECTION_ID": None, "CREATED_BY": "1",
                    "DATE_CREATE": created, "SORT": "500"}
        if family == "catalog.product":
            return {"id": n, "iblockId": php_int(scope), "name": f"Product {n}",
                    "active": "Y", "code": f"product_{n}", "createdBy": 1}
        return {"ID": str(n)}

    return make


def _id_key(table: str) -> str:
    """Name the field a table's records keep their ID in."""
    family = table.partition(":")[0]
    return "id" if family in ("crm.item", "tasks.task", "catalog.product") else "ID"


def _stored_id(table: str, record_id: int) -> Any:
    """Store an ID the way that table's records hold it."""
    family = table.partition(":")[0]
    return record_id if family in ("crm.item", "catalog.product") else str(record_id)


def _plain(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """Show a stored record as it is."""
    return record


class Lists:
    """Record tables of every listed entity, their list methods and the controls that fill them."""

    def __init__(
        self, *, clock: Callable[[], float], leads: Records, lead_view: View
    ) -> None:
        """Serve lists over fresh tables; crm.lead is the CRM part's own lead table."""
        self.clock = clock
        self.tables: dict[str, Records] = {"crm.lead": leads}
        self._views: dict[str, View] = {"crm.lead": lead_view}

    def methods(self) -> dict[str, Method]:
        """Name the REST methods this part serves, with the scope each needs."""
        served = {name: Method("crm", self._classic(table)) for name, table in
                  CLASSIC_TABLES.items()}
        return served | {
            "crm.item.list": Method("crm", self._item_list),
            "tasks.task.list": Method("task", self._task_list),
            "user.get": Method("user", self._user_get),
            "lists.element.get": Method("lists", self._element_get),
            "catalog.product.list": Method("catalog", self._product_list),
        }

    # -- the tables ---------------------------------------------------------------------------

    def table(self, name: str) -> Records:
        """Return a table by name, creating it empty on first use."""
        table = self.tables.get(name)
        if table is None:
            table = self.tables[name] = Records()
        return table

    def _view(self, name: str) -> View:
        """Return how a table's records are shown to list methods."""
        return self._views.get(name, _plain)

    def seed(
        self,
        name: str,
        count: int,
        fields: Callable[[int], Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Add `count` records with made-up fields (plus `fields(id)`); return their IDs."""
        table = self.table(name)
        make = _maker(name, self.clock)
        added: list[int] = []
        for _ in range(count):
            record_id = table.allocate()
            record = make(record_id)
            if fields is not None:
                record.update(fields(record_id))
            record[_id_key(name)] = _stored_id(name, record_id)
            table[record_id] = record
            added.append(record_id)
        return added

    def add(self, name: str, fields: Mapping[str, Any]) -> int:
        """Add one record holding exactly `fields` (and its new ID); return the ID."""
        table = self.table(name)
        record_id = table.allocate()
        table[record_id] = {**fields, _id_key(name): _stored_id(name, record_id)}
        return record_id

    def clear(self, name: str | None = None) -> None:
        """Remove every record of one table, or of all tables."""
        for table_name, table in self.tables.items():
            if name is None or table_name == name:
                table.clear()

    # -- the methods --------------------------------------------------------------------------

    def _classic(self, name: str) -> Callable[[Caller, dict[str, Any]], MethodResult]:
        """Build a crm.*.list handler: order/filter/select in either case, the page as result."""
        style = _ACTIVITY if name == "crm.activity" else _CRM

        def handler(caller: Caller, params: dict[str, Any]) -> MethodResult:
            """List one CRM entity."""
            query = ListQuery(
                filter=_filter(_param(params, "filter", "FILTER")),
                order=order_param(_param(params, "order", "ORDER")),
                select=names_param(_param(params, "select", "SELECT")),
                start=php_int(params.get("start")),
            )
            return run_list(self.table(name), self._view(name), style, query)

        return handler

    def _item_list(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """List crm.item.list's items of one entityTypeId, camelCase, under `items`."""
        type_id = php_int(params.get("entityTypeId"))
        query = ListQuery(
            filter=_filter(params.get("filter")),
            order=order_param(params.get("order")),
            select=names_param(params.get("select")),
            start=php_int(params.get("start")),
        )
        classic = _ITEM_TYPES.get(type_id)
        if classic is not None:
            return run_list(self.table(classic), self._view(classic), _ITEM_CLASSIC, query)
        name = f"crm.item:{type_id}"
        if name not in self.tables:
            raise RestError(400, "NOT_FOUND", "Smart process not found")
        return run_list(self.tables[name], _plain, _ITEM, query)

    def _task_list(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """List tasks under `tasks`, newest first unless ordered."""
        query = ListQuery(
            filter=_filter(params.get("filter")),
            order=order_param(params.get("order")),
            select=names_param(params.get("select")),
            start=php_int(params.get("start")),
        )
        return run_list(self.table("tasks.task"), _plain, _TASK, query)

    def _user_get(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """List users: `sort` names the field, `order` the direction; FILTER or bare fields."""
        sort = params.get("sort", params.get("SORT"))
        direction = params.get("order", params.get("ORDER"))
        order: list[tuple[str, bool]]
        if isinstance(sort, Mapping):
            order = order_param(sort)
        elif isinstance(sort, str) and sort:
            order = [(sort, str(direction).strip().upper() == "DESC")]
        else:
            order = [("ID", str(direction).strip().upper() == "DESC")]
        conditions = _filter(_param(params, "FILTER", "filter"))
        if conditions is None:
            # Without FILTER, user.get reads upper-case top-level parameters as the filter.
            reserved = {"SORT", "ORDER", "START", "SELECT", "ADMIN_MODE", "IMAGE_RESIZE", "FILTER"}
            conditions = {k: v for k, v in params.items()
                          if k == k.upper() and k.upper() not in reserved}
        query = ListQuery(
            filter=conditions,
            order=order,
            select=names_param(_param(params, "select", "SELECT")),
            start=php_int(params.get("start")),
        )
        return run_list(self.table("user"), _plain, _USER, query)

    def _element_get(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """List one list's elements (IBLOCK_TYPE_ID, IBLOCK_ID; ELEMENT_ORDER, FILTER)."""
        iblock = params.get("IBLOCK_ID", params.get("IBLOCK_CODE"))
        if not params.get("IBLOCK_TYPE_ID") or not iblock:
            raise RestError(400, "ERROR_REQUIRED_PARAMETERS_MISSING",
                            "Required parameter is missing")
        name = f"lists.element:{iblock}"
        if name not in self.tables:
            raise RestError(400, "ERROR_IBLOCK_NOT_FOUND", "Iblock not found")
        conditions = dict(_filter(params.get("FILTER")) or {})
        element = params.get("ELEMENT_ID")
        if element:
            conditions["=ID"] = element
        query = ListQuery(
            filter=conditions,
            order=order_param(params.get("ELEMENT_ORDER")),
            select=names_param(params.get("SELECT")),
            start=php_int(params.get("start")),
        )
        return run_list(self.tables[name], _plain, _ELEMENT, query)

    def _product_list(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """List catalog products under `products`; select needs id and iblockId, filter iblockId."""
        select = names_param(params.get("select"))
        conditions = _filter(params.get("filter"))
        if not {"id", "iblockId"} <= set(select):
            raise RestError(400, "0", "Required select fields: id, iblockId")
        iblock = conditions.get("iblockId") if conditions is not None else None
        if iblock is None:
            raise RestError(400, "0", "Required filter fields: iblockId")
        query = ListQuery(
            filter=conditions,
            order=order_param(params.get("order")),
            select=select,
            start=php_int(params.get("start")),
        )
        return run_list(self.table(f"catalog.product:{php_int(iblock)}"), _plain, _PRODUCT,
                        query)

