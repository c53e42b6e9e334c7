"""Structured logs through structlog, with every secret redacted before anything is written."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections import Counter, OrderedDict, deque
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "[REDACTED]"
_SECRET_KEYS = frozenset(
    {"access_token", "refresh_token", "client_secret", "auth", "authorization", "auth_id",
     "refresh_id", "application_token", "code", "password", "secret", "client_key"}
)
# Secrets that travel as URL or form parameters, or as a bearer header, wherever they show up.
_SECRET_PARAM_RE = re.compile(
    r"(?i)(\b(?:access_token|refresh_token|client_secret|auth|auth_id|refresh_id|"
    r"application_token|code)=)[^&\s\"'<>]+"
)
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
# A run of the characters tokens are made of: a known token is one whole run, or part of one
# (next to the digits of a %22, say, or the n of an escaped newline).
_WORD_RE = re.compile(r"[0-9A-Za-z_-]{6,}")
_PREFIX = 6  # the shortest secret remembered; tokens inside a run are found by this prefix


def _drop(counter: Counter[Any], key: object) -> None:
    """Count one ``key`` less, forgetting it at none."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class Redactor:
    """A structlog processor that hides known secret values and secret-looking parameters."""

    def __init__(self, keep: int = 50_000) -> None:
        # Rotating tokens, the latest ``keep`` (a marketplace sidecar holds two per portal):
        # word-shaped ones are found by a set lookup, so thousands cost no more per line than
        # a few; others go into one pattern with the permanent secrets.
        self._keep = keep
        self._words: OrderedDict[str, None] = OrderedDict()
        self._prefixes: Counter[str] = Counter()  # the words' first characters
        self._lengths: Counter[int] = Counter()  # and their lengths
        self._others: deque[str] = deque(maxlen=32)
        self._permanent: set[str] = set()  # the client secret: never forgotten
        self._known: re.Pattern[str] | None = None  # one pattern for the rest

    def add(self, secret: str, *, permanent: bool = False) -> None:
        """Remember a secret value (a token, the client secret) to hide wherever it appears."""
        if len(secret) < 6:
            return
        if not permanent and _WORD_RE.fullmatch(secret):
            if secret in self._words:
                self._words.move_to_end(secret)
                return
            self._words[secret] = None
            self._prefixes[secret[:_PREFIX]] += 1
            self._lengths[len(secret)] += 1
            while len(self._words) > self._keep:
                old, _ = self._words.popitem(last=False)
                _drop(self._prefixes, old[:_PREFIX])
                _drop(self._lengths, len(old))
            return
        if permanent:
            self._permanent.add(secret)
        elif secret not in self._others:
            self._others.append(secret)
        else:
            return
        # Longest first, so a secret that contains another is hidden whole.
        secrets = sorted({*self._permanent, *self._others}, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, secrets)))

    def redact(self, text: str) -> str:
        """Return ``text`` with every known secret and secret parameter hidden."""
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        if self._words:
            text = _WORD_RE.sub(self._hide_words, text)
        if "=" in text:
            text = _SECRET_PARAM_RE.sub(rf"\g<1>{REDACTED}", text)
        if "bearer" in text.lower():
            text = _BEARER_RE.sub(rf"\g<1>{REDACTED}", text)
        return text

    def _hide_words(self, match: re.Match[str]) -> str:
        """Hide the known tokens in a run of word characters: the whole run, or the tokens
        inside it (only a run longer than the shortest token can hold one and more)."""
        run = match.group()
        words = self._words
        if run in words:
            return REDACTED
        lengths = self._lengths
        if len(run) <= min(lengths):
            return run
        sizes = sorted(lengths, reverse=True)  # longest first: a token inside one goes whole
        parts: list[str] = []
        start = i = 0
        end = len(run) - _PREFIX
        while i <= end:
            if run[i:i + _PREFIX] in self._prefixes:
                found = next((n for n in sizes if i + n <= len(run) and run[i:i + n] in words), 0)
                if found:
                    parts += (run[start:i], REDACTED)
                    i = start = i + found
                    continue
            i += 1
        return "".join(parts) + run[start:] if parts else run

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


def scrub(text: str, *secrets: str) -> str:
    """Return ``text`` with ``secrets`` and every secret parameter or bearer value hidden."""
    redactor = Redactor()
    for secret in secrets:
        redactor.add(secret, permanent=True)
    return redactor.redact(text)


class _JSONOutput(structlog.processors.JSONRenderer):
    """The JSON renderer of a pipeline configure_logging built, and what the access log needs.

    The access log renders its line by hand only while structlog runs such a pipeline (not, say,
    a test's capture), writing where that pipeline writes.
    """

    def __init__(self, stream: TextIO, redactor: Redactor, *, enabled: bool) -> None:
        super().__init__()
        self.stream = stream
        self.redactor = redactor
        self.enabled = enabled  # the level lets info events through


class AccessLog:
    """The access log: the ``request`` event of every proxied call, one line each.

    Whoever builds the application owns it and calls :meth:`flush` at shutdown. That event is
    the one line written per proxied call, so it is rendered by hand: the same JSON structlog
    would write (same keys, order and separators), at a fraction of the cost; the lines of one
    turn of the event loop go out in one write. When structlog does not run configure_logging's
    JSON pipeline (the console format, a test's capture), the event takes the ordinary path.

    (structlog's own performance recipe, orjson and a cached bound logger writing bytes, was
    measured against this with bench/ab.py: 10-26 % fewer calls/s at c=64, 20-25 % more CPU
    per call; the README's performance notes give the figures.)
    """

    def __init__(self) -> None:
        self._pending: list[str] = []  # lines of this turn of the event loop
        self._stream: TextIO | None = None  # where they go
        self._flushing_on: asyncio.AbstractEventLoop | None = None  # the loop due to flush
        self._second: tuple[int, str] = (0, "")  # the date part of timestamps, per second

    def request(  # noqa: PLR0917 - the event's fields, positional for speed
        self, request_id: str, method: str, http_method: str, status: int, duration_ms: float,
        upstream_ms: float, retried: bool, coalesced: bool, error: str | None,
    ) -> None:
        """Log the access-log event of one proxied call."""
        processors = structlog.get_config()["processors"]
        output = processors[-1] if processors else None
        if not isinstance(output, _JSONOutput):
            # A fresh logger: one cached under an earlier configuration would write there.
            structlog.get_logger("sidecar.proxy").info(
                "request", request_id=request_id, method=method, http_method=http_method,
                status=status, duration_ms=duration_ms, upstream_ms=upstream_ms,
                retried=retried, coalesced=coalesced, error=error,
            )
            return
        if not output.enabled:
            return
        redactor = output.redactor
        # Redacted as structlog's pipeline would: a client may send a token as its X-Request-ID
        # or as a method name. Under 6 characters nothing can hide (GET, POST).
        stamp = self._stamp()
        rid = redactor.redact(request_id) if len(request_id) >= 6 else request_id
        name = redactor.redact(method) if len(method) >= 6 else method
        verb = http_method if len(http_method) < 6 else redactor.redact(http_method)
        self._write(output.stream,
            f'{{"request_id": {_json_str(rid)}, "method": {_json_str(name)}, '
            f'"http_method": {_json_str(verb)}, "status": {status}, '
            f'"duration_ms": {duration_ms!r}, "upstream_ms": {upstream_ms!r}, '
            f'"retried": {"true" if retried else "false"}, '
            f'"coalesced": {"true" if coalesced else "false"}, '
            f'"error": {"null" if error is None else _json_str(redactor.redact(error))}, '
            f'"event": "request", "level": "info", "timestamp": "{stamp}"}}\n'
        )

    def flush(self) -> None:
        """Write the queued lines (the event loop does after each turn; the owner at exit)."""
        self._flushing_on = None
        stream = self._stream
        lines, self._pending = self._pending, []
        if stream is not None and lines:
            stream.write("".join(lines))
            stream.flush()

    def _write(self, stream: TextIO, line: str) -> None:
        """Queue a line; the lines of one turn of the event loop go out in one write."""
        if stream is not self._stream:  # reconfigured: what was queued goes where it was due
            self.flush()
            self._stream = stream
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: write it now
            self.flush()
            return
        if self._flushing_on is not loop:  # (a loop that stopped before flushing is replaced)
            self._flushing_on = loop
            loop.call_soon(self.flush)

    def _stamp(self) -> str:
        """Now as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
        now = time.time()
        whole = int(now)
        if self._second[0] != whole:
            self._second = (
                whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        micro = int((now - whole) * 1_000_000)
        # isoformat() leaves out a zero fraction; so does this.
        return f"{self._second[1]}.{micro:06d}Z" if micro else f"{self._second[1]}Z"


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
    numeric = logging.getLevelNamesMapping()[level.upper()]
    renderer: Processor = (
        _JSONOutput(stream, redactor, enabled=numeric <= logging.INFO)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
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
    # While PostgreSQL is away asyncpg warns, with a traceback, at every attempt to refill its
    # pool; the token store warns once per outage, naming the database, and says when it is over.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    return redactor
