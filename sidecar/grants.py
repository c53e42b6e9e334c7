"""What only the operator can hand out: one-time start links and install windows.

Both live in the store, so only someone who can write the store (the CLI beside the sidecar, in
its pod) can make them, and any running sidecar sharing the store honours them. A link's secret
is shown once and stored only as a digest.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sidecar.storage import PairStore

LINK_TTL = 600.0  # a start link is good for 10 minutes, once
INSTALL_WINDOW = 600.0  # an install window stays open 10 minutes, for one install
START_LINK = "start-link"
INSTALL = "install-window"
ANY_USER = "*"


def digest(secret: str) -> str:
    """The stored form of a link's secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


async def issue_link(store: PairStore, *, now: float | None = None) -> str:
    """Make a one-time start link's secret (valid LINK_TTL); only its digest is stored."""
    secret = secrets.token_urlsafe(32)
    now = time.time() if now is None else now
    await store.add_grant(START_LINK, digest(secret), now + LINK_TTL)
    return secret


async def take_link(store: PairStore, secret: str, *, now: float | None = None) -> bool:
    """Use up a start link; say whether it was valid."""
    if not secret or len(secret) > 128:
        return False
    now = time.time() if now is None else now
    return await store.take_grant(START_LINK, digest(secret), now) is not None


async def link_valid(store: PairStore, secret: str, *, now: float | None = None) -> bool:
    """Say whether a start link is valid, leaving it unused."""
    if not secret or len(secret) > 128:
        return False
    now = time.time() if now is None else now
    return await store.peek_grant(START_LINK, digest(secret), now) is not None


@dataclass(frozen=True)
class InstallWindow:
    """The operator's consent to the next install replacing the held authorization."""

    user_id: str  # the portal user the install must be for, or ANY_USER

    def admits(self, user_id: str) -> bool:
        """Say whether an install for ``user_id`` may use the window."""
        return self.user_id == ANY_USER or (bool(user_id) and user_id == self.user_id)


async def open_install_window(store: PairStore, user_id: str, *,
                              now: float | None = None) -> float:
    """Let the next install (for ``user_id``, or any user) replace the pair; return its end."""
    now = time.time() if now is None else now
    until = now + INSTALL_WINDOW
    await store.add_grant(INSTALL, "", until, detail=user_id or ANY_USER)
    return until


async def install_window(store: PairStore, *, now: float | None = None
                         ) -> InstallWindow | None:
    """The open install window, if there is one (left open)."""
    now = time.time() if now is None else now
    detail = await store.peek_grant(INSTALL, "", now)
    return None if detail is None else InstallWindow(detail)


async def take_install_window(store: PairStore, *, now: float | None = None
                              ) -> InstallWindow | None:
    """Use up the open install window, if there is one."""
    now = time.time() if now is None else now
    detail = await store.take_grant(INSTALL, "", now)
    return None if detail is None else InstallWindow(detail)
