"""Structured logs through structlog, with every secret redacted before anything is written."""

from __future__ import annotations

import logging
import re
import sys
from collections import deque
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
    structlog.configure(
        processors=[*shared, renderer],
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
    return redactor


