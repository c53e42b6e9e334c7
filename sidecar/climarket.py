"""The one-shot commands in marketplace mode: each acts on one portal named with ``--portal``
(its host or member_id), and ``status``/``portals`` list them all; never a token but ``token``'s.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from sidecar.app import make_oauth, oauth_session
from sidecar.authinfo import authorize_url, code_hint, describe, iso, shown_state
from sidecar.authorization import Authorization, Consent
from sidecar.config import Settings
from sidecar.errors import OAuthError, Refused, SidecarError
from sidecar.oauth import OAuthClient, origin_text
from sidecar.pgstore import PgStore
from sidecar.registry import host_names, origin_address
from sidecar.states import State
from sidecar.storage import UNINSTALLED
from sidecar.store import Entry, TokenStore
from sidecar.stores import open_store

EXIT_FAILED = 1


def portal_settings(settings: Settings, address: str) -> Settings:
    """The settings of one portal of a marketplace sidecar (links, status name it)."""
    return dataclasses.replace(settings, portal=address, portal_list=None)


def entry_address(entry: Entry) -> str:
    """Where a stored portal is: its pair's endpoint, else the address its row names."""
    pair = entry.state.pair
    return (origin_address(pair.client_endpoint) if pair is not None else "") or entry.portal


def find_entry(entries: Sequence[Entry], name: str) -> Entry | None:
    """The stored portal ``name`` names (its host[:port] or its member_id)."""
    wanted = name.strip().lower()
    for entry in entries:
        if not entry.key:
            continue
        if wanted == entry.key.lower() or wanted in host_names(entry_address(entry)):
            return entry
    return None


def address_of(settings: Settings, name: str) -> str:
    """The address of a portal named by host (held or not), if BITRIX_PORTAL allows it."""
    for scheme in ("https", "http"):
        address = f"{scheme}://{name.strip().lower()}"
        if settings.portals.allows(address):
            return address
    raise Refused(f"the portal {name!r} is not among those BITRIX_PORTAL allows")


def _fail(text: str) -> int:
    print(f"bitrix-sidecar: {text}", file=sys.stderr)
    return EXIT_FAILED


def _row(entry: Entry, now: float) -> dict[str, object]:
    state = State.of_stored(entry.state)
    pair = entry.state.pair
    return {"member_id": entry.key, "portal": entry_address(entry),
            "state": shown_state(state, pair, now),
            "expires_at": iso(pair.expires_at) if pair else None,
            "last_refresh_at": iso(pair.obtained_at) if pair else None,
            "last_error": entry.state.last_error or None}


async def status(settings: Settings, name: str | None, *, table: bool, now: float) -> int:
    """``status`` (every portal, or ``--portal``'s) and ``portals`` (a table)."""
    try:
        async with open_store(settings) as store:
            entries = [e for e in await store.entries() if e.key]
    except SidecarError as exc:
        return _fail(exc.description)
    if name:
        entry = find_entry(entries, name)
        if entry is None:
            return _fail(f"no authorization is held for the portal {name!r}")
        info = describe(portal_settings(settings, entry_address(entry)), entry.state, now=now)
        print(json.dumps(info | {"member_id": entry.key}, indent=2))
        return 0 if info["state"] == "valid" else EXIT_FAILED
    rows = [_row(entry, now) for entry in entries]
    if table:
        print(_table(rows))
        return 0
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row["state"])] = counts.get(str(row["state"]), 0) + 1
    print(json.dumps({"mode": "marketplace", "portals": len(rows),
                      "states": dict(sorted(counts.items())), "each": rows}, indent=2))
    return 0


def _table(rows: list[dict[str, object]]) -> str:
    columns = ("member_id", "portal", "state", "expires_at", "last_error")
    cells = [[str(row[c] if row[c] is not None else "-") for c in columns] for row in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True))
              for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def authorize_url_for(settings: Settings, name: str | None) -> int:
    """``authorize-url --portal HOST``: the approval page on that portal."""
    if not name:
        return _fail("marketplace mode: name the portal to approve the app on (--portal HOST)")
    try:
        address = address_of(settings, name)
    except SidecarError as exc:
        return _fail(exc.description)
    print(authorize_url(portal_settings(settings, address)))
    return 0


async def authorize(settings: Settings, code: str, name: str | None) -> int:
    """``authorize CODE``: exchange a code approved on any allowed portal and store the pair
    as that portal's (the operator's word: it replaces a held pair)."""
    async with open_store(settings) as store, oauth_session() as http:
        oauth = make_oauth(http, settings)
        try:
            pair = await oauth.exchange_code(code)
            address = origin_address(pair.client_endpoint)
            if not pair.member_id or not settings.portals.allows(address):
                raise Refused(f"the code was approved on {origin_text(pair.client_endpoint)}, "
                              "which BITRIX_PORTAL does not allow")
            if name and name.strip().lower() not in host_names(address) | {pair.member_id}:
                raise Refused(f"the code was approved on {origin_text(address)}, not {name}")
            tokens = await _authorization(store, settings, oauth, pair.member_id, address)
            tokens.check_portal(pair, source="exchange")
            await tokens.install(pair, trigger="cli", consent=Consent.OPERATOR)
            await tokens.save_unsaved()
        except OAuthError as exc:
            return _fail(f"{exc.description}{code_hint(exc, settings)}")
        except SidecarError as exc:
            return _fail(exc.description)
        print(json.dumps(tokens.status() | {"member_id": pair.member_id}, indent=2))
    return 0


async def token(settings: Settings, name: str | None) -> int:
    """``token --portal NAME``: that portal's access token, renewed first if it has expired."""
    if not name:
        return _fail("marketplace mode: name the portal whose token to print (--portal NAME)")
    try:
        async with open_store(settings) as store, oauth_session() as http:
            entry = find_entry([e for e in await store.entries() if e.key], name)
            if entry is None:
                return _fail(f"no authorization is held for the portal {name!r}")
            tokens = await _authorization(store, settings, make_oauth(http, settings),
                                          entry.key, entry_address(entry))
            try:
                pair = tokens.current() or await tokens.refresh(
                    tokens.pair.access_token if tokens.pair else "", trigger="cli")
                await tokens.save_unsaved()
            finally:
                await tokens.aclose()
    except SidecarError as exc:
        return _fail(exc.description)
    print(pair.access_token)
    return 0


async def forget(settings: Settings, name: str | None) -> int:
    """``forget --portal NAME``: remove that portal's authorization (its secrets cleared in the
    store); running sidecars stop serving it within a watch interval."""
    if not name:
        return _fail("name the portal whose authorization to remove (--portal NAME)")
    try:
        async with open_store(settings) as store:
            entry = find_entry([e for e in await store.entries() if e.key], name)
            if entry is None:
                return _fail(f"no authorization is held for the portal {name!r}")
            row = store.authorization(entry.key, entry_address(entry))
            async with row.locked():
                await row.remove(f"{UNINSTALLED} removed by the operator "
                                 "('bitrix-sidecar forget')")
    except SidecarError as exc:
        return _fail(exc.description)
    print(json.dumps({"removed": entry.key, "portal": entry_address(entry)}, indent=2))
    return 0


async def _authorization(store: TokenStore | PgStore, settings: Settings, oauth: OAuthClient,
                         key: str, address: str) -> Authorization:
    tokens = Authorization(store.authorization(key, address), oauth,
                           portal_settings(settings, address))
    await tokens.start()
    return tokens
