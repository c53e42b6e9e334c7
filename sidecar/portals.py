"""Which portals an app may hold authorizations of: addresses and one-label host patterns.

``BITRIX_PORTAL`` names one portal today; in marketplace mode it is a comma-separated list of
portal addresses and patterns whose leftmost label is ``*`` (``https://*.bitrix24.com``). A
pattern matches exactly one label: ``a.bitrix24.com``, never ``a.b.bitrix24.com`` nor
``bitrix24.com``. A portal that matches nothing is refused everywhere (install, authorization,
a token answer's ``client_endpoint``), so the check is one function over parsed addresses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# One DNS label: letters, digits and inner hyphens (punycode included), at most 63 characters.
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class PortalRule:
    """One entry of the list: an exact portal, or a pattern whose first label is any one."""

    scheme: str
    host: str  # for a pattern: the part after "*."
    port: int
    pattern: bool

    def matches(self, scheme: str, host: str, port: int) -> bool:
        """Say whether a portal at ``scheme://host:port`` (host lowercased) is this entry's."""
        if (scheme, port) != (self.scheme, self.port):
            return False
        if not self.pattern:
            return host == self.host
        first, dot, rest = host.partition(".")
        return bool(dot) and rest == self.host and bool(_LABEL.fullmatch(first))

    def __str__(self) -> str:
        shown = f"*.{self.host}" if self.pattern else (
            f"[{self.host}]" if ":" in self.host else self.host)
        port = "" if _DEFAULT_PORTS.get(self.scheme) == self.port else f":{self.port}"
        return f"{self.scheme}://{shown}{port}"


@dataclass(frozen=True)
class PortalList:
    """The portals an app's authorizations may be held for."""

    rules: tuple[PortalRule, ...]

    @classmethod
    def of(cls, address: str) -> PortalList:
        """Return the list of the one portal at ``address`` (``BITRIX_PORTAL`` as parsed today).

        Built from the address as it is (an IPv6 literal, a path and all): one portal keeps
        whatever today's ``BITRIX_PORTAL`` accepts.
        """
        parts = urlsplit(address)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:
            port = None
        host = (parts.hostname or "").lower()
        return cls((PortalRule(scheme, host, port or _DEFAULT_PORTS.get(scheme, 0),
                               pattern=False),))

    @property
    def single(self) -> bool:
        """Say whether the list names exactly one portal (today's one-portal sidecar)."""
        return len(self.rules) == 1 and not self.rules[0].pattern

    def allows(self, url: str) -> bool:
        """Say whether the portal at ``url`` (an address or a ``client_endpoint``) is listed.

        Only the origin counts; an address with a user, a query or a fragment, a host with a
        trailing dot or an empty label, or anything but http(s) is never a listed portal.
        """
        origin = _origin(url)
        return origin is not None and any(rule.matches(*origin) for rule in self.rules)

    def __str__(self) -> str:
        return ",".join(str(rule) for rule in self.rules)


def parse_portals(text: str) -> PortalList:
    """Parse ``BITRIX_PORTAL``: one portal as today, or a comma-separated list with patterns."""
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ValueError("no portal given")
    rules: list[PortalRule] = []
    for entry in entries:
        if not entry:
            raise ValueError(f"{text!r} has an empty entry")
        rule = _rule(entry)
        if rule not in rules:
            rules.append(rule)
    return PortalList(tuple(rules))


def _rule(entry: str) -> PortalRule:
    scheme, star, rest = "https", False, entry
    if "://" in entry:
        scheme, _, rest = entry.partition("://")
        scheme = scheme.lower()
    if rest.startswith("*."):
        star, rest = True, rest[2:]
    elif "*" in entry:
        raise ValueError(f"{entry!r}: only the leftmost label may be '*' (like "
                         "https://*.bitrix24.com)")
    if star and rest.count(".") < 1:
        # '*.com' would let every portal on a top-level domain in.
        raise ValueError(f"{entry!r}: a pattern needs at least two labels after '*.'")
    # config imports this module for Settings.portals, so its parser is fetched at call time.
    from sidecar.config import parse_portal  # noqa: PLC0415

    # A bare name or host without a pattern keeps today's meaning (corezoid: a bitrix24.ru one).
    address = parse_portal(entry if "://" not in entry and not star else f"{scheme}://{rest}")
    parts = urlsplit(address)
    if parts.path:
        raise ValueError(f"{entry!r}: a portal is an origin only, with no path")
    origin = _origin(address)
    if origin is None:
        raise ValueError(f"{entry!r} is not a portal address")
    return PortalRule(*origin, pattern=star)


def _origin(url: str) -> tuple[str, str, int] | None:
    """Return (scheme, host, port) of an http(s) URL, or None if it is not a plain one."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.query or parts.fragment:
        return None
    if ":" in host:  # an IPv6 literal (urlsplit took the brackets off)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    labels = host.split(".")
    if ":" not in host and not all(_LABEL.fullmatch(label) for label in labels):
        return None  # a trailing dot, an empty label, or characters no host has
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]
