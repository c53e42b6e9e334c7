"""Pick the store the settings name: a SQLite file, or a PostgreSQL database shared by many."""

from __future__ import annotations

from sidecar.config import Settings, oauth_timeout
from sidecar.pgstore import PgStore
from sidecar.store import TokenStore


def open_store(settings: Settings) -> TokenStore | PgStore:
    """Return the (unopened) store of ``settings``: enter it with ``async with``."""
    if settings.db_url:
        return PgStore(settings.db_url, portal=settings.portal, client_id=settings.client_id,
                       replica=settings.replica, timeout=settings.db_timeout,
                       hold=oauth_timeout(settings) + settings.db_timeout)
    return TokenStore(settings.db_path, portal=settings.portal, client_id=settings.client_id)
