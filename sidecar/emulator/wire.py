"""The REST wire format: parsing /rest/ paths, bodies and tokens; writing JSON and XML answers."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import collapse_rfc2231_value
from typing import Any

from aiohttp import web

from sidecar import phpquery
from sidecar.emulator.model import OutputFormat, TokenSource

__all__ = [
    "Route",
    "body_params",
    "credentials",
    "iso",
    "json_response",
    "parse_route",
    "render",
    "render_xml",
    "time_block",
]

# Bitrix reports the operating-time budget over a 10-minute window.
_OPERATING_WINDOW = 600

_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Route:
    """What a /rest/ path names."""

    method: str
    fmt: OutputFormat
    webhook: tuple[int, str] | None
    known_shape: bool


def iso(ts: float) -> str:
    """Format a unix time the way Bitrix dates look."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def time_block(start: float, finish: float) -> dict[str, Any]:
    """Build the `time` object Bitrix adds to successful answers."""
    duration = max(0.0, finish - start)
    return {
        "start": start,
        "finish": finish,
        "duration": duration,
        "processing": duration,
        "date_start": iso(start),
        "date_finish": iso(finish),
        "operating_reset_at": int(start) + _OPERATING_WINDOW,
        "operating": 0,
    }


def parse_route(tail: str) -> Route:
    """Split the part after /rest/ into method, output format and webhook credentials."""
    parts = tail.split("/")
    webhook: tuple[int, str] | None = None
    if len(parts) == 3 and parts[0].isascii() and parts[0].isdigit():
        webhook = (int(parts[0]), parts[1])
        name = parts[2]
    elif len(parts) == 1:
        name = parts[0]
    else:
        return Route(tail.lower(), "json", None, known_shape=False)
    name = name.lower()
    fmt: OutputFormat = "json"
    if name.endswith(".json"):
        name = name[: -len(".json")]
    elif name.endswith(".xml"):
        name = name[: -len(".xml")]
        fmt = "xml"
    return Route(name, fmt, webhook, known_shape=bool(name))


def _parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """Read multipart/form-data fields; file parts become {filename, size}."""
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        return {}
    pairs: list[tuple[str, str]] = []
    payload = message.get_payload()
    parts = [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
    for part in parts:
        raw_name = part.get_param("name", header="content-disposition")
        if raw_name is None:
            continue
        name = collapse_rfc2231_value(raw_name)
        content = part.get_payload(decode=True)
        data = content if isinstance(content, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            pairs.append((f"{name}[filename]", filename))
            pairs.append((f"{name}[size]", str(len(data))))
        else:
            charset = part.get_content_charset() or "utf-8"
            pairs.append((name, data.decode(charset, "replace")))
    return phpquery.parse(pairs)


def body_params(request: web.Request, body: bytes) -> dict[str, Any]:
    """Parse a request body by its content type; raise ValueError for unreadable JSON."""
    if not body:
        return {}
    content_type = request.content_type
    if content_type == "application/x-www-form-urlencoded":
        return phpquery.parse_qs(body.decode("utf-8", "replace"))
    if content_type == "multipart/form-data":
        return _parse_multipart(request.headers.get("Content-Type", ""), body)
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            data = json.loads(body)
        except ValueError:
            raise ValueError("Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("Request body must be a JSON object")
        return data
    # PHP fills no parameters from bodies of other types.
    return {}


def credentials(
    request: web.Request, params: Mapping[str, Any], route: Route
) -> tuple[str | None, TokenSource | None]:
    """Find the token the server would use, by its priority: header, auth, access_token."""
    if route.webhook is not None:
        return None, "webhook"
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), "header"
    auth = params.get("auth")
    if isinstance(auth, str) and auth:
        return auth, "auth"
    access_token = params.get("access_token")
    if isinstance(access_token, str) and access_token:
        return access_token, "access_token"
    return None, None


def _xml_text(value: Any) -> str:
    """Render a value's content the way PHP would stringify it in XML."""
    if isinstance(value, Mapping):
        return "".join(_xml_element(str(k), v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return "".join(_xml_element("item", v) for v in value)
    if isinstance(value, bool):
        # PHP prints true as 1 and false as an empty string.
        return "1" if value else ""
    if value is None:
        return ""
    return html.escape(str(value), quote=False)


def _xml_element(name: str, value: Any) -> str:
    """Render one element, falling back to <item key="..."> for keys that are not XML names."""
    if _XML_NAME.fullmatch(name) and not name.lower().startswith("xml"):
        return f"<{name}>{_xml_text(value)}</{name}>"
    return f'<item key="{html.escape(name)}">{_xml_text(value)}</item>'


def render_xml(payload: Mapping[str, Any]) -> str:
    """Render a response body as the minimal XML document Bitrix's .xml suffix asks for."""
    return f'<?xml version="1.0" encoding="UTF-8"?><response>{_xml_text(payload)}</response>'


def json_response(status: int, payload: Any) -> web.Response:
    """Answer with a JSON body as Bitrix does (application/json; charset=utf-8)."""
    return web.Response(
        status=status,
        text=json.dumps(payload, ensure_ascii=False),
        content_type="application/json",
    )


def render(fmt: OutputFormat, status: int, payload: Mapping[str, Any]) -> web.Response:
    """Answer in the format the method suffix asked for."""
    if fmt == "xml":
        return web.Response(status=status, text=render_xml(payload), content_type="text/xml")
    return json_response(status, payload)
