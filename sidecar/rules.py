"""Pure request rules: which targets are REST calls, what of the client's is stripped before
forwarding (its own credentials, hop-by-hop headers), and which Host and Origin are served."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.errors import BadRequest, NotFound, Refused

# /rest/<method>[.json|.xml] and the inbound-webhook shape /rest/<user>/<code>/<method>[.json|.xml].
# Matched on the raw request target: no percent-escape, dot segment or second slash gets through.
# REST 3.0 lives under /rest/api/ in the same two shapes; its methods take no suffix.
_PATH_RE = re.compile(
    r"/rest/(?P<api>api/)?(?:\d{1,10}/(?P<code>[A-Za-z0-9_]{1,64})/)?"
    r"(?P<method>[A-Za-z][A-Za-z0-9_]{0,63}(?:\.[A-Za-z0-9_]{1,64}){0,15}?)"
    r"(?P<suffix>\.json|\.xml)?",
    re.IGNORECASE,
)
# A portal as a call names it (/portal/<portal>/rest/..., X-Bitrix-Portal): its host with an
# optional port, as an install event's `domain` carries it, or its member_id. Nothing else: no
# percent-escape, empty or dot segment, slash or user part can be one.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PORTAL_NAME_RE = re.compile(
    rf"(?:{_LABEL}(?:\.{_LABEL})*(?::(?P<port>\d{{1,5}}))?|[a-z0-9_-]{{1,64}})", re.IGNORECASE)
_PORTAL_NAME_MAX = 253 + 6  # a DNS name and ":65535"
PORTAL_PREFIX = "/portal/"
# /all/rest/<method> asks for a list method's whole list, as the X-Bitrix-Pages header does.
ALL_PREFIX = "/all"
PAGES_HEADER = "X-Bitrix-Pages"
PORTAL_HEADER = "X-Bitrix-Portal"
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CLIENT_AUTH_PARAMS = frozenset({"auth", "access_token"})
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade"}
)
# Not forwarded upstream: hop-by-hop headers, the client's own credentials, and what the
# client library computes for its own connection.
# aiohttp's server has already decoded a compressed request body, so its Content-Encoding goes.
DROP_REQUEST = HOP_BY_HOP | {
    "host", "authorization", "content-length", "content-encoding", "expect", "cookie",
    "x-request-id",  # ours replaces it
    "x-sidecar-key",  # the client key (sidecar.clientkey) is ours alone
    "x-bitrix-portal",  # which portal a call is for: the sidecar's business, not the portal's
    "x-bitrix-pages",  # a whole list is fetched by the sidecar, page by page
}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "x-request-id"}


@dataclass(frozen=True)
class Target:
    """What a client asked for: a REST method, its output format, and the raw query string.

    ``code`` is the webhook shape's code segment ('' without one): never forwarded, it may
    carry the client key. ``portal`` is the portal the path names
    (``/portal/<portal>/rest/...``), lower-cased; '' without the prefix. ``api``: a REST 3.0
    call (``/rest/api/...``). ``pages``: the path asks for the whole list (``/all/rest/...``).
    """

    method: str
    suffix: str
    query: str
    code: str = ""
    portal: str = ""
    api: bool = False
    pages: bool = False


def parse_target(raw: str) -> Target:
    """Split and check the raw request target; raise NotFound or BadRequest.

    ``/rest/...`` (REST 3.0: ``/rest/api/...``) as always, or the same behind
    ``/portal/<portal>``, which names the portal the call is for (a host[:port] or a
    member_id), and behind ``/all``, which asks for a list method's whole list (``/all`` may
    come before or after the portal's prefix).
    """
    path, _, query = raw.partition("?")
    portal = ""
    pages = False
    rest = path
    if rest.startswith(ALL_PREFIX + "/"):
        pages, rest = True, rest[len(ALL_PREFIX):]
    if rest.startswith(PORTAL_PREFIX):
        segment, slash, tail = rest[len(PORTAL_PREFIX):].partition("/")
        portal = portal_name(segment, f"the portal in {PORTAL_PREFIX}<portal>/rest/")
        rest = slash + tail
        if not pages and rest.startswith(ALL_PREFIX + "/"):
            pages, rest = True, rest[len(ALL_PREFIX):]
        if not rest.startswith("/rest/"):
            raise BadRequest(
                f"{show(rest)} after {PORTAL_PREFIX}<portal> is not a REST method address: use "
                f"{PORTAL_PREFIX}<portal>/rest/<method> or "
                f"{PORTAL_PREFIX}<portal>/rest/<user_id>/<code>/<method>"
            )
    elif not rest.startswith("/rest/"):
        raise NotFound(f"bitrix-sidecar serves /rest/<method> only, not {show(path)}")
    match = _PATH_RE.fullmatch(rest)
    api = match is not None and match["api"] is not None
    if match is None or (api and match["suffix"]):
        # Only the part from /rest/ on is quoted: a long portal name before it must not push
        # a client key in the code segment past show()'s cut, where no scrubbing finds it whole.
        raise BadRequest(
            f"{show(rest)} is not a REST method address: use /rest/<method>, "
            "/rest/<method>.json, /rest/<user_id>/<code>/<method>, or for REST 3.0 "
            "/rest/api/<method> or /rest/api/<user_id>/<code>/<method>"
        )
    if any(c in query for c in "\r\n\0#"):
        raise BadRequest("the query string holds control characters")
    return Target(match["method"], (match["suffix"] or "").lower(), query, match["code"] or "",
                  portal, api, pages)


def api_path(raw: str) -> bool:
    """Say whether a raw target is on a REST 3.0 path (``/rest/api/`` behind any prefixes),
    even one the rules refuse: its errors take REST 3.0's shape."""
    path = raw.partition("?")[0]
    if path.startswith(ALL_PREFIX + "/"):
        path = path[len(ALL_PREFIX):]
    if path.startswith(PORTAL_PREFIX):
        path = "/" + path[len(PORTAL_PREFIX):].partition("/")[2]
        if path.startswith(ALL_PREFIX + "/"):
            path = path[len(ALL_PREFIX):]
    # The address is matched without regard to case (/rest/API/... is served as REST 3.0).
    return path.startswith("/rest/") and path[6:10].lower() == "api/"


def portal_name(text: str, what: str) -> str:
    """Check a portal's name as a call gives it (host[:port] or member_id); return it lower-cased.

    Raise BadRequest naming ``what`` (where the name came from) if it is not one.
    """
    match = _PORTAL_NAME_RE.fullmatch(text) if len(text) <= _PORTAL_NAME_MAX else None
    port = match["port"] if match is not None else None
    if match is None or (port is not None and not 0 < int(port) < 65536):
        raise BadRequest(
            f"{what} is {shown_whole(text)}, not a portal: give its host (with its port, if it "
            "has one), like corp.bitrix24.com, or its member_id"
        )
    return text.lower()


def portal_header(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str:
    """Return the portal the X-Bitrix-Portal header names, lower-cased ('' without one).

    Raise BadRequest when it is repeated or is not a portal's name.
    """
    values = headers.getall(PORTAL_HEADER, ())
    if not values:
        return ""
    if len(values) > 1:
        raise BadRequest(f"the request carries more than one {PORTAL_HEADER} header")
    return portal_name(values[0].strip(" \t"), f"the {PORTAL_HEADER} header")


def show(text: str) -> str:
    """Quote a piece of client input safely for an error description."""
    return json.dumps(text[:120])


def shown_whole(text: str) -> str:
    """Quote client input whole, or only its length when it is too long to quote whole.

    A secret cut in half by ``show`` could not be found and scrubbed; a whole one can.
    """
    return show(text) if len(text) <= 120 else f"a text of {len(text)} characters"


def _param_name(segment: bytes | str) -> str:
    """Return the base name of a urlencoded ``key=value`` segment (``auth[x]`` -> ``auth``)."""
    text = segment.decode("latin-1") if isinstance(segment, bytes) else segment
    name = unquote_plus(text.partition("=")[0])
    return name.partition("[")[0].strip().lower()


def strip_query_auth(query: str) -> str:
    """Drop ``auth`` and ``access_token`` parameters from a raw query string, keep the rest raw."""
    lowered = query.lower()
    if "auth" not in lowered and "access_token" not in lowered and "%" not in query:
        return query
    return "&".join(
        seg for seg in query.split("&") if seg and _param_name(seg) not in _CLIENT_AUTH_PARAMS
    )


def strip_body_auth(body: bytes, content_type: str) -> bytes:
    """Drop the client's ``auth``/``access_token`` from a form, JSON or multipart body."""
    lowered = body.lower()
    # JSON may spell a key with \u escapes, forms with %-escapes: those are parsed too.
    if not body or (b"auth" not in lowered and b"\\u" not in body and b"%" not in body):
        return body
    if content_type == "application/x-www-form-urlencoded":
        return b"&".join(
            seg for seg in body.split(b"&")
            if seg and _param_name(seg) not in _CLIENT_AUTH_PARAMS
        )
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise BadRequest("the body is not valid JSON") from None
        if isinstance(data, dict) and any(k.lower() in _CLIENT_AUTH_PARAMS for k in data):
            data = {k: v for k, v in data.items() if k.lower() not in _CLIENT_AUTH_PARAMS}
            # ASCII escapes carry any string, lone surrogates included, unchanged in meaning.
            return json.dumps(data).encode()
    return body


_PART_NAME_RE = re.compile(rb'\bname\s*=\s*(?:"([^"]*)"|([^\s;]+))')
_PART_HEAD_MAX = 8192  # a part's header block longer than this is not a form field
_BOUNDARY_RE = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def multipart_boundary(content_type: str) -> str:
    """Return the boundary parameter of a multipart content type ('' if none)."""
    match = _BOUNDARY_RE.search(content_type)
    return (match.group(1) or match.group(2)) if match else ""


def strip_multipart_auth(body: bytes, boundary: str) -> bytes:
    """Drop ``auth``/``access_token`` parts of a multipart body, keeping the others byte-exact."""
    if not boundary.isascii():
        raise BadRequest("the multipart boundary is not ASCII")
    delimiter = b"--" + boundary.encode("ascii")
    pieces = body.split(delimiter)
    kept = [pieces[0]]
    for piece in pieces[1:]:
        head = piece[:_PART_HEAD_MAX].split(b"\r\n\r\n", 1)[0].lower()
        # Line by line, so a hostile header block costs linear time, not quadratic.
        disposition = next((line for line in head.split(b"\r\n")
                            if line.lstrip().startswith(b"content-disposition:")), b"")
        name = _PART_NAME_RE.search(disposition)
        value = (name.group(1) or name.group(2) or b"") if name else b""
        if value.partition(b"[")[0].strip().decode("latin-1") in _CLIENT_AUTH_PARAMS:
            continue
        kept.append(piece)
    return delimiter.join(kept)


# Headers a request may carry once: two Hosts or two Origins are a smuggling attempt, not a
# request to guess about.
_SINGLE_HEADERS = ("Host", "Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode")
_FOREIGN_SITES = frozenset({"cross-site", "same-site"})


def origin_of(url: str) -> str:
    """The ``scheme://host[:port]`` of an address, lowercased ('' if it has none)."""
    try:
        parsed = URL(url.strip())
        host = parsed.host
    except ValueError:
        return ""
    if not parsed.scheme or not host:
        return ""
    return str(parsed.origin()).lower()


class HostPolicy:
    """Refuse browsers on other sites (CSRF) and foreign Host names (DNS rebinding).

    Whoever reaches the port acts as the app, so a web page must not make a browser do it.
    Header values compare case-insensitively, and a repeated Host, Origin or Sec-Fetch header
    is refused.
    """

    def __init__(self, listen_host: str, allowed_hosts: tuple[str, ...]) -> None:
        self._hosts = frozenset({"localhost", "::1", listen_host.lower(),
                                 *allowed_hosts}) - {"0.0.0.0", "::", "", "*"}  # noqa: S104
        # "*" serves any Host; an Origin must still be a served name (a page elsewhere must not
        # make a browser call us whatever Host it reached us by).
        self._any_host = "*" in allowed_hosts
        # Host headers already found served: nearly every call names the same one or two.
        self._served: set[str] = set()

    def check(self, headers: CIMultiDictProxy[str] | CIMultiDict[str], host_header: str, *,
              navigation: bool = False, trusted_origins: frozenset[str] = frozenset()) -> None:
        """Raise unless the request comes from a served Host and no foreign page.

        ``navigation``: a browser's top-level GET navigation from another site is accepted
        (the portal's redirect to the OAuth callback is one). ``trusted_origins``: pages of
        these origins may send the request (the portal's own install page).
        """
        for name in _SINGLE_HEADERS:
            if name in headers and len(headers.getall(name)) > 1:
                raise BadRequest(f"the request carries more than one {name} header")
        origin = headers.get("Origin")
        trusted = False
        if origin is not None:
            trusted = bool(trusted_origins) and origin_of(origin) in trusted_origins
            if not trusted and not self._same_origin(origin, host_header):
                raise Refused("a request from a foreign Origin is refused")
        site = headers.get("Sec-Fetch-Site", "").strip().lower()
        if site in _FOREIGN_SITES and not trusted and not (
            navigation and headers.get("Sec-Fetch-Mode", "").strip().lower() == "navigate"
        ):
            raise Refused("a browser request from another site is refused")
        if host_header in self._served:
            return
        host = host_header.rsplit(":", 1)[0] if not host_header.startswith("[") else (
            host_header[1:].split("]", 1)[0]
        )
        if not self.allowed(host):
            raise Refused(
                f"Host {show(host_header)} is not served: call 127.0.0.1 or localhost, or add "
                "the name to SIDECAR_ALLOWED_HOSTS"
            )
        if len(self._served) >= 64:  # '*' serves any name: keep the memory bounded
            self._served.clear()
        self._served.add(host_header)

    def _same_origin(self, origin: str, host_header: str) -> bool:
        """Say whether a page's Origin is this very listener (served host, same port)."""
        try:
            page = URL(origin.strip())
            page_host, page_port = (page.host or "").lower(), page.port
            here = URL(f"{page.scheme}://{host_header.strip()}")
            here_host, here_port = (here.host or "").lower(), here.port
        except (ValueError, TypeError):
            return False  # unparsable: as foreign as it gets
        if not page_host or page_host != here_host or page_port != here_port:
            return False
        return self.named(page_host)  # "*" serves any Host, never any page

    def allowed(self, host: str) -> bool:
        """Say whether a Host name or address literal is served."""
        return self._any_host or self.named(host)

    def named(self, host: str) -> bool:
        """Say whether a host is loopback, the listener's or a listed name ("*" aside)."""
        host = host.lower().strip("[]")
        if host in self._hosts:
            return True
        try:
            # Only an address literal can be loopback: "127.0.0.1.evil.example" is a name.
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def filter_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str],
                   drop: frozenset[str]) -> list[tuple[str, str]]:
    """Copy headers less ``drop`` and whatever the Connection header names as hop-by-hop."""
    connection = headers.getall("Connection", ())
    if connection:
        drop = drop | {name.strip().lower() for value in connection
                       for name in value.split(",")}
    return [(name, value) for name, value in headers.items() if name.lower() not in drop]


def response_headers(headers: CIMultiDict[str], request_id: str) -> list[tuple[str, str]]:
    """The portal's answer headers as relayed to the client."""
    out = filter_headers(headers, DROP_RESPONSE)
    out.append(("X-Request-ID", request_id))
    return out
