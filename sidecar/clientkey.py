"""Who may use a listener: the client key, the peer behind a loopback Host, the admin's Host.

Whoever reaches the proxy listener acts as the app. On loopback that is the pod (or the
machine); a listener beyond loopback needs more:

- ``ClientKey``: with ``SIDECAR_CLIENT_KEY`` set, every ``/rest/`` call and ``/token`` carries
  the key, in the ``X-Sidecar-Key`` header or where an inbound webhook carries its secret, the
  code segment of ``/rest/<user_id>/<key>/<method>``. Neither is ever forwarded to the portal.
- ``check_peer``: a loopback ``Host`` (``127.0.0.1``, ``localhost``, ``::1``) is believed only
  from a loopback peer; from anywhere else it is someone getting round the Host check.
- ``AdminHosts``: the admin listener's Host check against DNS rebinding, which still answers
  the kubelet and Prometheus (they name the pod's address, the one the connection arrived on).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Mapping

from sidecar.errors import ClientKeyRequired, Refused
from sidecar.rules import show

KEY_HEADER = "X-Sidecar-Key"
INVALID = "SIDECAR_CLIENT_KEY_INVALID"


class ClientKey:
    """The client key every call must carry, or none (then nothing is asked of a call)."""

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        self._key = key.encode("ascii")  # the settings allow letters, digits and "_" only

    @property
    def required(self) -> bool:
        """Say whether calls must carry a key."""
        return bool(self._key)

    def check(self, headers: Mapping[str, str], code: str) -> None:
        """Raise ClientKeyRequired unless the header, or else the webhook code, is the key.

        The header, when sent, is the one checked: a wrong header is not rescued by the path.
        """
        if not self._key:
            return
        given = headers.get(KEY_HEADER)
        where = f"the {KEY_HEADER} header"
        if given is None:
            given, where = code, "the webhook address's code"
        if not given:
            raise ClientKeyRequired(
                "this sidecar asks every call for its client key: call "
                f"/rest/<user_id>/<client key>/<method>, or send the {KEY_HEADER} header"
            )
        # Bytes, so that any header text compares in constant time (str must be ASCII).
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._key):
            raise ClientKeyRequired(f"the client key in {where} is wrong", code=INVALID)

    def scrub(self, text: str) -> str:
        """Return ``text`` with the key hidden (an error echoing a path may hold it).

        In any case: a portal's name is echoed lower-cased, and a caller may have put the key
        there.
        """
        if not self._key:
            return text
        return re.sub(re.escape(self._key.decode("ascii")), "[REDACTED]", text,
                      flags=re.IGNORECASE)


def hosts_of(host_header: str) -> tuple[str, ...]:
    """The host a ``Host`` header may name, lower-cased, without port or brackets.

    Unbracketed, it is read both with its last ``:...`` taken as a port (as ``HostPolicy``
    reads it) and whole (a bare IPv6 literal), so no reading of it escapes a check.
    """
    header = host_header.lower()
    if header.startswith("["):
        return (header[1:].split("]", 1)[0],)
    return (header.rsplit(":", 1)[0].rstrip("."), header.rstrip("."))


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address literal (an IPv4-mapped IPv6 one as IPv4, a zone dropped), or None."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def loopback_host(host: str) -> bool:
    """Say whether a host (as ``hosts_of`` gives it) names this machine's loopback."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def loopback_peer(peer: str) -> bool:
    """Say whether a peer address is loopback ("" = unknown, which is not)."""
    if peer.startswith("127.") or peer == "::1":
        return True  # the common case, without parsing
    address = _address(peer)
    return address is not None and address.is_loopback


def check_peer(host_header: str, peer: str) -> None:
    """Refuse a loopback Host from a peer that is not on loopback."""
    if loopback_peer(peer):
        return
    if any(loopback_host(host) for host in hosts_of(host_header)):
        raise Refused(
            f"Host {show(host_header)} names loopback, but the call comes from another "
            "machine: call the sidecar by a name in SIDECAR_ALLOWED_HOSTS"
        )


class AdminHosts:
    """The Host names the admin listener answers to.

    Loopback, the admin listener's host, the names in ``SIDECAR_ALLOWED_HOSTS`` (``*`` is
    not one: /status and /metrics take no key, so any Host would let a rebound page read
    them), and the address the connection arrived on (the kubelet's probes and Prometheus name
    the pod's IP).
    """

    def __init__(self, listen_host: str, allowed_hosts: tuple[str, ...]) -> None:
        self._names = frozenset({listen_host.lower(), *allowed_hosts}) - {
            "0.0.0.0", "::", "", "*"}  # noqa: S104

    def check(self, host_header: str | None, sockname: object) -> None:
        """Raise Refused unless ``host_header`` is served on a connection to ``sockname``."""
        if host_header is None:
            return  # no browser leaves Host out, and DNS rebinding needs a browser
        local = _address(str(sockname[0])) if isinstance(sockname, tuple) and sockname else None
        for host in hosts_of(host_header):
            if host in self._names or loopback_host(host):
                return
            if local is not None and _address(host) == local:
                return
        raise Refused(
            f"Host {show(host_header)} is not served by the admin listener: call it by "
            "loopback, the address it was reached on, or a name in SIDECAR_ALLOWED_HOSTS"
        )
