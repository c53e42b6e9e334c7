"""The fast lane's HTTP/1.1 wire: which request heads it serves, parsing them with httptools
into a ``FastCall``, and writing response heads (with a Date cached per second)."""

from __future__ import annotations

import asyncio
import http
import time
from email.utils import formatdate

import httptools
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict

from sidecar.replies import Call

# Bodies up to this size are read by the fast lane; larger ones stream in through aiohttp.
FAST_BODY = 1 << 20
# A head longer than this goes to aiohttp, which answers it as it sees fit (431 or 400);
# so does a long request line, many headers or a long one (aiohttp's limits decide).
MAX_HEAD = 24 * 1024
MAX_LINE = 8190
MAX_HEADERS = 100
# /rest/... and /portal/<portal>/rest/... (a call naming its portal, issue 14).
PREFIXES = (b"GET /rest/", b"POST /rest/", b"GET /portal/", b"POST /portal/")
METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
HANDED_OFF_HEADERS = frozenset({b"transfer-encoding", b"expect", b"content-encoding",
                                 b"upgrade"})
REASONS = {status.value: status.phrase for status in http.HTTPStatus}
NO_BODY = frozenset({204, 304})


class HeadFields:
    """httptools callbacks for one request head."""

    __slots__ = ("complete", "headers", "keep_alive", "method", "parser", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)
        self.complete = False
        self.keep_alive = False
        self.method = b""
        self.version = ""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # Read now: llhttp resets these once the message is complete.
        parser = self.parser
        self.complete = True
        self.keep_alive = parser.should_keep_alive()
        self.method = parser.get_method()
        self.version = parser.get_http_version()


class Parsed:
    """An ordinary request head, ready to serve once its body is in."""

    __slots__ = ("call", "head_length", "keep_alive", "length", "version11")

    def __init__(self, call: FastCall, head_length: int, length: int, keep_alive: bool,
                 version11: bool) -> None:
        self.call = call
        self.head_length = head_length
        self.length = length
        self.keep_alive = keep_alive
        self.version11 = version11


class FastCall(Call):
    """A call read by the fast lane: its body is already in hand."""

    __slots__ = ("payload",)

    payload: bytes

    async def body(self, limit: int) -> bytes:
        return self.payload  # no larger than FAST_BODY, itself within the limit


def parse_head(collected: HeadFields, head: bytes, max_body: int,
               transport: asyncio.BaseTransport, peer: str = "") -> Parsed | None:
    """Parse an ordinary request head; None when aiohttp should have it."""
    collected.url = b""
    collected.headers = []
    collected.complete = False
    try:
        collected.parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None  # aiohttp answers what it makes of it
    version = collected.version
    if not collected.complete or version not in ("1.1", "1.0"):
        return None
    length = -1
    host: str | None = None
    headers: CIMultiDict[str] = CIMultiDict()
    if len(collected.headers) > MAX_HEADERS:
        return None
    for name, value in collected.headers:
        if len(name) + len(value) > MAX_LINE:
            return None
        lowered = name.lower()
        if lowered in HANDED_OFF_HEADERS:
            return None
        text = value.decode("utf-8", "surrogateescape")
        if lowered == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif lowered == b"host":
            if host is not None:
                return None
            host = text
        headers.add(name.decode("utf-8", "surrogateescape"), text)
    if host is None or length > min(FAST_BODY, max_body):
        return None
    ctype = headers.get("Content-Type", "").partition(";")[0].strip().lower()
    call = FastCall(collected.method.decode("ascii"),
                    collected.url.decode("utf-8", "surrogateescape"),
                    HttpVersion11 if version == "1.1" else HttpVersion10, headers, host,
                    ctype or "application/octet-stream", transport, peer)
    return Parsed(call, len(head), max(length, 0), collected.keep_alive, version == "1.1")


class HttpDate:
    """The ``Date`` header's value, formatted once a second (each server owns one)."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second, self._text = now, formatdate(now, usegmt=True)
        return self._text


def head_bytes(status: int, reason: str, headers: list[tuple[str, str]], framing: str,
                version11: bool, *, date: HttpDate) -> bytes:
    """The status line and headers; ``framing`` is the length or connection lines."""
    lines = [f"HTTP/1.{1 if version11 else 0} {status} "
             f"{reason or REASONS.get(status, 'Unknown')}\r\n"]
    has_date = has_type = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == "date":
            has_date = True
        elif lowered == "content-type":
            has_type = True
        lines.append(f"{name}: {value}\r\n")
    if not has_date:
        lines.append(f"Date: {date()}\r\n")
    if not has_type:
        lines.append("Content-Type: application/octet-stream\r\n")  # what aiohttp would say
    lines.append(framing)
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def bare_line_feed(buffer: bytearray, start: int) -> bool:
    """Whether a line feed at or after ``start`` has no carriage return before it."""
    at = buffer.find(b"\n", start)
    while at >= 0:
        if at == 0 or buffer[at - 1] != 0x0D:
            return True
        at = buffer.find(b"\n", at + 1)
    return False


def connection_line(keep: bool, version11: bool) -> str:
    if not keep:
        return "Connection: close\r\n"
    return "" if version11 else "Connection: keep-alive\r\n"
