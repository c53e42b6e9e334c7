"""CRM leads: the lead table and crm.lead.add/get/update/delete (crm.lead.list is in lists)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sidecar.emulator.model import Caller, Method, MethodResult, RestError
from sidecar.emulator.records import PAGE_SIZE, Records
from sidecar.emulator.wire import iso

__all__ = ["PAGE_SIZE", "Crm"]

_LEAD_FIELDS = (
    "ID",
    "TITLE",
    "HONORIFIC",
    "NAME",
    "SECOND_NAME",
    "LAST_NAME",
    "COMPANY_TITLE",
    "SOURCE_ID",
    "STATUS_ID",
    "OPENED",
    "CURRENCY_ID",
    "OPPORTUNITY",
    "HAS_PHONE",
    "HAS_EMAIL",
    "ASSIGNED_BY_ID",
    "CREATED_BY_ID",
    "MODIFY_BY_ID",
    "DATE_CREATE",
    "DATE_MODIFY",
    "COMMENTS",
)
_MULTI_FIELDS = ("PHONE", "EMAIL", "WEB", "IM")
_READ_ONLY_FIELDS = frozenset({"ID", "DATE_CREATE", "DATE_MODIFY", "HAS_PHONE", "HAS_EMAIL"})


def _id_param(params: Mapping[str, Any]) -> int:
    """Read a positive integer `id` (or `ID`) parameter."""
    raw = params.get("id", params.get("ID"))
    if isinstance(raw, str | int) and not isinstance(raw, bool):
        text = str(raw).strip()
        if text.isascii() and text.isdigit() and int(text) > 0:
            return int(text)
    raise RestError(400, "", "ID is not defined or invalid.")


def _fields_param(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Read the `fields` map a crm add/update needs."""
    fields = params.get("fields")
    if isinstance(fields, Mapping):
        return fields
    raise RestError(400, "", "Parameter 'fields' must be array.")


def _stored(value: Any) -> Any:
    """Store a scalar the way Bitrix hands it back: as a string, booleans as Y/N."""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, int | float):
        return str(value)
    return value


class Crm:
    """The portal's leads, and the methods that read and change them."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        """Start with no leads; `clock` stamps DATE_CREATE and DATE_MODIFY."""
        self.clock = clock
        self.leads = Records()
        self._next_multi_id = 1

    def methods(self) -> dict[str, Method]:
        """Name the REST methods this part serves, with the scope each needs."""
        return {
            "crm.lead.add": Method("crm", self._lead_add),
            "crm.lead.get": Method("crm", self._lead_get),
            "crm.lead.update": Method("crm", self._lead_update),
            "crm.lead.delete": Method("crm", self._lead_delete),
        }

    def _merge_multi(self, current: Any, value: Any, type_id: str) -> list[dict[str, str]]:
        """Apply a PHONE/EMAIL-style update: new items append, items with ID update or delete."""
        items: list[dict[str, str]] = list(current) if isinstance(current, list) else []
        given = list(value.values()) if isinstance(value, Mapping) else value
        if not isinstance(given, list):
            return items
        for raw in given:
            entry = raw if isinstance(raw, Mapping) else {"VALUE": raw}
            text = "" if entry.get("VALUE") is None else str(entry.get("VALUE"))
            kind = str(entry.get("VALUE_TYPE") or "WORK")
            known = next((i for i in items if i["ID"] == str(entry.get("ID", ""))), None)
            if known is not None:
                if text:
                    known.update(VALUE=text, VALUE_TYPE=kind)
                else:
                    items.remove(known)
            elif text:
                item_id = str(self._next_multi_id)
                self._next_multi_id += 1
                items.append({"ID": item_id, "VALUE_TYPE": kind, "VALUE": text, "TYPE_ID": type_id})
        return items

    def _apply_fields(self, lead: dict[str, Any], fields: Mapping[str, Any]) -> None:
        """Store given lead fields, keeping what is given and ignoring read-only ones."""
        for raw_key, value in fields.items():
            key = str(raw_key)
            if key.upper() in _READ_ONLY_FIELDS:
                continue
            if key.upper() in _MULTI_FIELDS:
                key = key.upper()
                lead[key] = self._merge_multi(lead.get(key), value, key)
            else:
                lead[key] = _stored(value)
        lead["DATE_MODIFY"] = iso(self.clock())

    def lead_view(self, lead: Mapping[str, Any]) -> dict[str, Any]:
        """Return a lead as crm.lead.get shows it: all standard fields, then extras."""
        view: dict[str, Any] = {name: lead.get(name) for name in _LEAD_FIELDS}
        view["HAS_PHONE"] = "Y" if lead.get("PHONE") else "N"
        view["HAS_EMAIL"] = "Y" if lead.get("EMAIL") else "N"
        for key, value in lead.items():
            if key not in view and (key not in _MULTI_FIELDS or value):
                view[key] = value
        return view

    def _find_lead(self, params: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Look up the lead named by `id`, raising Bitrix's errors."""
        lead_id = _id_param(params)
        lead = self.leads.get(lead_id)
        if lead is None:
            raise RestError(400, "", "Not found")
        return lead_id, lead

    def _lead_add(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Create a lead; the result is its new integer ID."""
        fields = _fields_param(params)
        # Past any lead stored directly (the emulator's --leads, a test's fixture) too.
        lead_id = self.leads.allocate()
        now = iso(self.clock())
        user = str(caller.user_id)
        lead: dict[str, Any] = {
            "ID": str(lead_id),
            "STATUS_ID": "NEW",
            "OPENED": "Y",
            "ASSIGNED_BY_ID": user,
            "CREATED_BY_ID": user,
            "MODIFY_BY_ID": user,
            "DATE_CREATE": now,
        }
        self._apply_fields(lead, fields)
        self.leads[lead_id] = lead
        return MethodResult(lead_id)

    def _lead_get(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Return one lead by `id`."""
        _, lead = self._find_lead(params)
        return MethodResult(self.lead_view(lead))

    def _lead_update(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Update a lead's fields; the result is true."""
        _, lead = self._find_lead(params)
        fields = _fields_param(params)
        lead["MODIFY_BY_ID"] = str(caller.user_id)
        self._apply_fields(lead, fields)
        return MethodResult(True)

    def _lead_delete(self, caller: Caller, params: dict[str, Any]) -> MethodResult:
        """Delete a lead; the result is true."""
        lead_id, _ = self._find_lead(params)
        del self.leads[lead_id]
        return MethodResult(True)
