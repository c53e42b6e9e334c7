"""Structured logs through structlog, with every secret redacted before anything is written."""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import sys
import time
from collections import deque
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
_SECRET_KEYS = frozenset(
    {"access_token", "refresh_token", "client_secret", "auth", "authorization", "auth_id",
     "refresh_id", "application_token", "code", "password", "secret"}
)
# Secrets that travel as URL or form parameters, or as a bearer header, wherever they show up.
_SECRET_PARAM_RE = re.compile(
    r"(?i)(\b(?:access_token|refresh_token|client_secret|auth|auth_id|refresh_id|"
    r"application_token|code)=)[^&\s\"'<>]+"
)
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


class Redactor:
    """A structlog processor that hides known secret values and secret-looking parameters."""

    def __init__(self, keep: int = 32) -> None:
        self._secrets: deque[str] = deque(maxlen=keep)  # rotating tokens: the latest few
        self._permanent: set[str] = set()  # the client secret: never forgotten
        self._known: re.Pattern[str] | None = None  # one pattern for all of them

    def add(self, secret: str, *, permanent: bool = False) -> None:
        """Remember a secret value (a token, the client secret) to hide wherever it appears."""
        if len(secret) < 6:
            return
        if permanent:
            self._permanent.add(secret)
        elif secret not in self._secrets:
            self._secrets.append(secret)
        else:
            return
        # Longest first, so a secret that contains another is hidden whole.
        secrets = sorted({*self._permanent, *self._secrets}, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, secrets)))

    def redact(self, text: str) -> str:
        """Return ``text`` with every known secret and secret parameter hidden."""
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        if "=" in text:
            text = _SECRET_PARAM_RE.sub(rf"\g<1>{REDACTED}", text)
        if "bearer" in text.lower():
            text = _BEARER_RE.sub(rf"\g<1>{REDACTED}", text)
        return text

    def _value(self, key: str, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value  # the common case on the hot path: nothing to hide in a number
        if key.lower() in _SECRET_KEYS and value != "":
            return REDACTED
        if isinstance(value, str):
            return self.redact(value) if len(value) >= 6 else value
        if isinstance(value, dict):
            return {k: self._value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value("", v) for v in value]
        if isinstance(value, BaseException):
            return self.redact(repr(value))
        return value

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
        """Redact every value of the event (in place: this runs once per proxied call)."""
        for key, value in event_dict.items():
            kind = type(value)
            if value is None or kind is int or kind is float or kind is bool:
                continue  # the common case on the hot path: nothing to hide in a number
            if kind is str and len(value) < 6 and key.lower() not in _SECRET_KEYS:
                continue  # too short to hold a secret or a secret parameter
            event_dict[key] = self._value(key, value)
        return event_dict


class _AccessLog:
    """Where the per-call ``request`` event goes when it may skip structlog's pipeline.

    That event is the one line written per proxied call, so it is rendered by hand: the same
    JSON structlog would write (same keys, order and separators), at a fraction of the cost.
    Only when the JSON format is configured and structlog still runs our pipeline (not, say,
    a test's capture); otherwise the event takes the ordinary path.
    """

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self.enabled = True
        self.processors: list[Processor] = []
        self.renderer: object = None
        self.redactor: Redactor | None = None
        self.pending: list[str] = []  # lines of this turn of the event loop
        self._flushing_on: asyncio.AbstractEventLoop | None = None  # the loop due to flush

    def write(self, line: str) -> None:
        """Queue a line; the lines of one turn of the event loop go out in one write."""
        self.pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: write it now
            self.flush()
            return
        if self._flushing_on is not loop:  # (a loop that stopped before flushing is replaced)
            self._flushing_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the queued lines."""
        self._flushing_on = None
        stream = self.stream
        lines, self.pending = self.pending, []
        if stream is not None and lines:
            stream.write("".join(lines))
            stream.flush()

    def bypass(self) -> bool:
        """Say whether structlog still runs our pipeline (a test's capture edits it in place)."""
        processors = self.processors
        return (bool(processors) and processors[-1] is self.renderer
                and structlog.get_config()["processors"] is processors)


_ACCESS = _AccessLog()
atexit.register(_ACCESS.flush)  # lines of a loop that ended before its flush ran
_second: tuple[int, str] = (0, "")


def _stamp() -> str:
    """Now as structlog's TimeStamper(fmt="iso", utc=True) writes it; the date part cached."""
    global _second  # noqa: PLW0603 - a per-second cache
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    micro = int((now - whole) * 1_000_000)
    # isoformat() leaves out a zero fraction; so does this.
    return f"{_second[1]}.{micro:06d}Z" if micro else f"{_second[1]}Z"


def flush_access_log() -> None:
    """Write access-log lines still queued (at shutdown, before the last words)."""
    _ACCESS.flush()


def log_request(  # noqa: PLR0917 - the event's fields, positional for speed
    request_id: str, method: str, http_method: str, status: int, duration_ms: float,
    upstream_ms: float, retried: bool, coalesced: bool, error: str | None,
) -> None:
    """Write the access-log event of one proxied call."""
    stream = _ACCESS.stream
    if stream is None or not _ACCESS.bypass():
        # A fresh logger: one cached under an earlier configuration would write there.
        structlog.get_logger("sidecar.proxy").info(
            "request", request_id=request_id, method=method, http_method=http_method,
            status=status, duration_ms=duration_ms, upstream_ms=upstream_ms, retried=retried,
            coalesced=coalesced, error=error,
        )
        return
    if not _ACCESS.enabled:
        return
    redactor = _ACCESS.redactor
    assert redactor is not None
    # Redacted as structlog's pipeline would: a client may send a token as its X-Request-ID
    # or as a method name. Under 6 characters nothing can hide (GET, POST).
    stamp = _stamp()
    rid = redactor.redact(request_id) if len(request_id) >= 6 else request_id
    name = redactor.redact(method) if len(method) >= 6 else method
    verb = http_method if len(http_method) < 6 else redactor.redact(http_method)
    _ACCESS.write(
        f'{{"request_id": {_json_str(rid)}, "method": {_json_str(name)}, '
        f'"http_method": {_json_str(verb)}, "status": {status}, '
        f'"duration_ms": {duration_ms!r}, "upstream_ms": {upstream_ms!r}, '
        f'"retried": {"true" if retried else "false"}, '
        f'"coalesced": {"true" if coalesced else "false"}, '
        f'"error": {"null" if error is None else _json_str(redactor.redact(error))}, '
        f'"event": "request", "level": "info", "timestamp": "{stamp}"}}\n'
    )


def configure_logging(
    *, fmt: str = "json", level: str = "info", redactor: Redactor | None = None,
    stream: TextIO | None = None,
) -> Redactor:
    """Send structlog's and the standard library's records through one redacting pipeline."""
    redactor = redactor or Redactor()
    stream = stream or sys.stderr
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Render tracebacks to text first, so the redactor sees them too.
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    processors = [*shared, renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # Each module's logger is built once, not at every call (a hot-path cost).
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))  # aiohttp's debug chatter is not ours to show
    # Our own access-log event replaces aiohttp's.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _ACCESS.flush()
    _ACCESS.stream = stream if fmt == "json" else None
    _ACCESS.enabled = numeric <= logging.INFO
    _ACCESS.processors = processors
    _ACCESS.renderer = renderer
    _ACCESS.redactor = redactor
    return redactor


