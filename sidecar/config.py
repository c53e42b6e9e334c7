"""Settings: parsed once from the environment and flags, every problem named at once."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from sidecar.errors import ConfigError
from sidecar.portals import PortalList, parse_portals

# Every part but the last carries a unit, so the match is linear (no ambiguous splits).
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))*\d+(?:\.\d+)?(?:ms|s|m|h|d)?$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
_SIZE_RE = re.compile(r"^(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
}
_BARE_PORTAL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$", re.IGNORECASE)
_HOST_RE = re.compile(r"^[a-z0-9.-]+(?::\d{1,5})?$", re.IGNORECASE)
_SCOPE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# A client key travels where an inbound webhook carries its code (/rest/<user>/<code>/...), so it
# is made of the characters that segment allows; 16 or more of them, to be worth guessing at.
_CLIENT_KEY_RE = re.compile(r"[A-Za-z0-9_]{16,64}")
_RU_ZONES = (".ru", ".by", ".kz")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "console")
OAUTH_WEST = "https://oauth.bitrix.info"
OAUTH_RU = "https://oauth.bitrix24.tech"


@dataclass(frozen=True)
class Listen:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Option:
    """One setting: its environment variable, its flag, how to parse it and its default.

    ``default`` is the one place a setting's default is written, as a person would write it;
    the help text and ``Settings``' field defaults are derived from it.
    """

    env: str
    flag: str
    dest: str
    about: str
    parse: Callable[[str], Any] | None = None
    default: str = ""
    required: bool = False

    @property
    def help(self) -> str:
        """What the setting does, with its default."""
        return f"{self.about} (default {self.default})" if self.default else self.about


def parse_duration(text: str) -> float:
    """Parse ``90``, ``90s``, ``25m``, ``1h``, ``1h30m`` or ``500ms`` into seconds."""
    value = text.strip().lower()
    if not value or not _DURATION_RE.fullmatch(value):
        raise ValueError(f"{text!r} is not a duration (examples: 90, 90s, 25m, 1h)")
    return sum(
        float(number) * _DURATION_UNITS[unit]
        for number, unit in _DURATION_PART_RE.findall(value)
    )


def parse_size(text: str) -> int:
    """Parse ``16MiB``, ``512k`` or ``1048576`` into bytes."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 512KiB, 16MiB)")
    unit = match.group(2).lower() if match.group(2) else None
    size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ValueError("must be larger than zero")
    return size


def parse_listen(text: str) -> Listen:
    """Parse ``host:port`` or ``[v6]:port``."""
    value = text.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not host:port (example: 127.0.0.1:8080)")
    return Listen(host, int(port))


def is_loopback(host: str) -> bool:
    """Say whether a listener's host is loopback (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _normalize_url(text: str, what: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) address")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"{what} must be a plain address with no user, query or fragment")
    try:
        parts.port  # noqa: B018 - reading the property validates it
    except ValueError as exc:
        raise ValueError(f"{text!r} has a bad port") from exc
    return f"{parts.scheme}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def parse_portal(text: str) -> str:
    """Turn ``corezoid``, ``corp.bitrix24.com`` or a full URL into a base URL with no slash."""
    value = text.strip()
    if "://" in value:
        return _normalize_url(value, "BITRIX_PORTAL")
    if _BARE_PORTAL_RE.fullmatch(value):
        return f"https://{value.lower()}.bitrix24.ru"
    if _HOST_RE.fullmatch(value):
        return f"https://{value.lower()}"
    raise ValueError(f"{text!r} is not a portal name, host or URL")


def parse_portal_setting(text: str) -> str | PortalList:
    """Parse ``BITRIX_PORTAL``: one portal's base URL as always, or a list (marketplace mode).

    Text with no comma and no ``*`` is one portal, parsed exactly as before the list form
    existed (a path, an IPv6 literal and all); a list folds duplicates, so a list of one
    address is that one portal too.
    """
    if "," not in text and "*" not in text:
        return parse_portal(text)
    portals = parse_portals(text)
    return str(portals) if portals.single else portals


def parse_oauth_url(text: str) -> str:
    """Accept the OAuth server's base, tolerating a pasted ``/oauth/token/`` tail."""
    url = _normalize_url(text.strip(), "BITRIX_OAUTH_URL")
    for tail in ("/oauth/token", "/rest"):
        url = url.removesuffix(tail)
    return url


def parse_webhook_url(text: str) -> str:
    """Accept an http(s) URL for alerts (a query string may carry the receiver's own key)."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) address")
    return value


def parse_public_url(text: str) -> str:
    """Accept the http(s) origin the OAuth listener is published at (no path, query or user)."""
    value = text.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http(s) address")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{text!r} must be an origin only, like https://sidecar.example.com")
    return f"{parts.scheme}://{parts.netloc.lower()}"


PG_SCHEMES = ("postgresql", "postgres")


def parse_db(text: str) -> Path | str:
    """Take a SQLite file path, or a ``postgresql://`` (``postgres://``) URL kept as text.

    A URL's problems are named without repeating it: it may carry a password.
    """
    value = text.strip()
    scheme, sep, _ = value.partition("://")
    if not sep or scheme.lower() not in PG_SCHEMES:
        if sep:
            raise ValueError(f"a URL must be postgresql:// or postgres://, not {scheme[:20]}://")
        return Path(value)
    parts = urlsplit(value)
    if not parts.hostname:
        raise ValueError("the postgresql:// URL names no host")
    try:
        parts.port  # noqa: B018 - reading the property validates it
    except ValueError:
        raise ValueError("the postgresql:// URL has a bad port") from None
    if not parts.path.strip("/"):
        raise ValueError("the postgresql:// URL names no database (postgresql://HOST/DBNAME)")
    return value


def shown_db(url: str) -> str:
    """Return a PostgreSQL URL fit to show: no password, no query (it may hold one too)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def parse_rate(text: str) -> float:
    """Parse ``2``, ``2/s`` or ``0.5``: requests per second, 0 meaning no limit."""
    value = text.strip().lower().removesuffix("/s")
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate (examples: 2, 5/s, 0 = no limit)") from None
    if rate < 0 or not math.isfinite(rate):
        raise ValueError("must be 0 or a positive number of requests per second")
    return rate


def parse_count(text: str) -> int:
    """Parse a positive whole number."""
    value = text.strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return int(value)


def parse_switch(text: str) -> bool:
    """Parse on/off (also true/false, yes/no, 1/0)."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r} is not on or off")


def parse_on_off(text: str) -> bool:
    """Parse exactly ``on`` or ``off``."""
    value = text.strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{text!r} is not on or off")
    return value == "on"


def parse_hosts(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of host names (no ports), or ``*``."""
    names = tuple(name.strip().lower().strip("[]") for name in text.split(",") if name.strip())
    bad = [n for n in names if n != "*" and not re.fullmatch(r"[a-z0-9.:-]+", n)]
    if bad:
        raise ValueError(f"bad host name(s): {', '.join(bad)}")
    return names


def default_oauth_url_of(portals: PortalList) -> str | None:
    """Pick the OAuth server of a list of portals by their zone; None when they disagree.

    Portals on loopback (the emulator) or in both zones name no one OAuth server, so the
    operator names it (``BITRIX_OAUTH_URL``) rather than have one guessed for them.
    """
    servers = {default_oauth_url(f"{rule.scheme}://{rule.host}") for rule in portals.rules}
    if len(servers) == 1 and servers <= {OAUTH_WEST, OAUTH_RU}:
        return servers.pop()
    return None


def default_oauth_url(portal: str) -> str:
    """Pick the OAuth server by the portal's zone; an emulator on loopback serves its own."""
    host = urlsplit(portal).hostname or ""
    if is_loopback(host):
        return portal
    if host.endswith(_RU_ZONES):
        return OAUTH_RU
    return OAUTH_WEST


def parse_scope(text: str) -> tuple[str, ...]:
    """Split a comma-separated scope list."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    bad = [name for name in names if not _SCOPE_RE.fullmatch(name)]
    if bad:
        raise ValueError(f"bad scope name(s): {', '.join(bad)}")
    return names


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return value

    return parse


def _non_negative(parse: Callable[[str], float]) -> Callable[[str], float]:
    def checked(text: str) -> float:
        value = parse(text)
        if value < 0:
            raise ValueError("must not be negative")
        return value

    return checked


def _interval(text: str) -> float:
    value = parse_duration(text)
    if 0 < value < 1:
        raise ValueError("must be 0 (refresh only when needed) or at least 1s")
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive(parse: Callable[[str], float]) -> Callable[[str], float]:
    def checked(text: str) -> float:
        value = parse(text)
        if value <= 0:
            raise ValueError("must be larger than zero")
        return value

    return checked


OPTIONS: tuple[Option, ...] = (
    Option("BITRIX_PORTAL", "--portal", "portal",
           "portal: bare name (= NAME.bitrix24.ru), host, or full URL; or, for a marketplace "
           "app, a comma-separated list of addresses and https://*.DOMAIN patterns",
           parse_portal_setting, required=True),
    Option("BITRIX_CLIENT_ID", "--client-id", "client_id", "application code (client_id)",
           required=True),
    Option("BITRIX_CLIENT_SECRET", "--client-secret", "client_secret",
           "application key (prefer the _FILE form)"),
    Option("BITRIX_CLIENT_SECRET_FILE", "--client-secret-file", "client_secret_file",
           "file holding the application key"),
    Option("BITRIX_SCOPE", "--scope", "scope", "requested permissions, comma separated",
           parse_scope),
    Option("BITRIX_AUTH_CODE", "--auth-code", "auth_code",
           "first authorization code, used only when no token is stored"),
    Option("BITRIX_OAUTH_URL", "--oauth-url", "oauth_url",
           "OAuth server base (default by portal zone)", parse_oauth_url),
    Option("SIDECAR_LISTEN", "--listen", "listen", "proxy listener host:port", parse_listen,
           "127.0.0.1:8080"),
    Option("SIDECAR_ADMIN_LISTEN", "--admin-listen", "admin_listen",
           "metrics, probes and status listener host:port", parse_listen, "127.0.0.1:9090"),
    Option("SIDECAR_OAUTH_LISTEN", "--oauth-listen", "oauth_listen",
           "optional listener serving only /oauth/... (safe to publish for install events)",
           parse_listen),
    Option("SIDECAR_PUBLIC_URL", "--public-url", "public_url",
           "the https origin the OAuth listener is published at (its Host is served there, "
           "and 'authorize-link' prints links on it)", parse_public_url),
    Option("SIDECAR_ALERT_WEBHOOK", "--alert-webhook", "alert_webhook",
           "URL that gets a JSON POST when token renewal starts or stops failing",
           parse_webhook_url),
    Option("SIDECAR_SHUTDOWN_GRACE", "--shutdown-grace", "shutdown_grace",
           "time in-flight calls get to finish after SIGTERM", _non_negative(parse_duration),
           "20s"),
    Option("SIDECAR_CLIENT_KEY", "--client-key", "client_key",
           "key every /rest/ call and /token must carry, as the webhook code or in the "
           "X-Sidecar-Key header (prefer the _FILE form)"),
    Option("SIDECAR_CLIENT_KEY_FILE", "--client-key-file", "client_key_file",
           "file holding the client key"),
    Option("SIDECAR_INSECURE_NO_CLIENT_KEY", "--insecure-no-client-key", "insecure_no_client_key",
           "on: serve a listener beyond loopback without a client key (your own authentication "
           "stands in front)", parse_on_off, "off"),
    Option("SIDECAR_ALLOWED_HOSTS", "--allowed-hosts", "allowed_hosts",
           "extra Host names the proxy answers to, comma separated (loopback always; * = any)",
           parse_hosts),
    Option("SIDECAR_RATE", "--rate", "rate",
           "portal requests per second the bucket drains (Enterprise: 5); 0 = no limiter",
           parse_rate, "2"),
    Option("SIDECAR_BURST", "--burst", "burst", "requests the bucket holds (Enterprise: 250)",
           parse_count, "50"),
    Option("SIDECAR_QUEUE_TIMEOUT", "--queue-timeout", "queue_timeout",
           "longest a call waits for the rate limit before 503 QUERY_LIMIT_EXCEEDED",
           _positive(parse_duration), "30s"),
    Option("SIDECAR_COALESCE", "--coalesce", "coalesce",
           "pack queued single calls into batch requests: on or off", parse_switch, "on"),
    Option("SIDECAR_FAST_LANE", "--fast-lane", "fast_lane",
           "serve ordinary REST calls in the fast lane: on, or off to serve every request "
           "through aiohttp", parse_on_off, "on"),
    Option("SIDECAR_REFRESH_RATE", "--refresh-rate", "refresh_rate",
           "marketplace mode: the most scheduled renewals started per second, all portals "
           "together (the OAuth server sees them spread, never in a burst)",
           parse_rate, "10"),
    Option("SIDECAR_METRICS_PER_PORTAL", "--metrics-per-portal", "metrics_per_portal",
           "marketplace mode: export each portal's token expiry with a portal label (one "
           "series per portal; off: counts per state, and labels only for portals that need "
           "attention)", parse_on_off, "off"),
    Option("SIDECAR_DB", "--db", "db_path",
           "SQLite token store file, or a postgresql:// URL of a store shared by several "
           "sidecars (a URL with a password: prefer the _FILE form)", parse_db,
           "./bitrix-sidecar.db"),
    Option("SIDECAR_DB_FILE", "--db-file", "db_file",
           "file holding the postgresql:// URL (a Kubernetes Secret, say)"),
    Option("SIDECAR_DB_TIMEOUT", "--db-timeout", "db_timeout",
           "longest a PostgreSQL store's command may take before the database counts as "
           "unreachable (a lock holder silent for longer than a renewal plus this loses its "
           "lock)", _positive(parse_duration), "10s"),
    Option("SIDECAR_REPLICA_ID", "--replica-id", "replica_id",
           "this sidecar's name among replicas sharing a PostgreSQL store (default: "
           "hostname:pid); /status shows which replica renewed last"),
    Option("SIDECAR_REFRESH_INTERVAL", "--refresh-interval", "refresh_interval",
           "background refresh period; 0 = only when needed", _interval, "25m"),
    Option("SIDECAR_UPSTREAM_TIMEOUT", "--upstream-timeout", "upstream_timeout",
           "total time for one upstream call", _positive(parse_duration), "60s"),
    Option("SIDECAR_REQUEST_TIMEOUT", "--request-timeout", "request_timeout",
           "time a request (head and body) has to arrive whole after its first byte, on every "
           "listener, before a 408", _positive(parse_duration), "60s"),
    Option("SIDECAR_IDLE_TIMEOUT", "--idle-timeout", "idle_timeout",
           "time a kept-alive connection may sit idle before it is closed, on every listener",
           _positive(parse_duration), "75s"),
    Option("SIDECAR_MAX_CONNECTIONS", "--max-connections", "max_connections",
           "open connections each listener accepts; more are closed at once", parse_count,
           "1024"),
    Option("SIDECAR_MAX_BODY", "--max-body", "max_body", "largest request body accepted",
           parse_size, "16MiB"),
    Option("SIDECAR_LIST_MAX", "--list-max", "list_max",
           "largest whole list (X-Bitrix-Pages: all) answered in one JSON body; larger ones "
           "are refused unless asked for streamed (Accept: application/x-ndjson)",
           parse_size, "64MiB"),
    Option("SIDECAR_LOG_FORMAT", "--log-format", "log_format", "json or console",
           _choice(LOG_FORMATS), "json"),
    Option("SIDECAR_LOG_LEVEL", "--log-level", "log_level", "debug, info, warning, error",
           _choice(LOG_LEVELS), "info"),
)


def url_passwords(url: str) -> tuple[str, ...]:
    """Return a URL's password as written (percent-encoded) and as the driver sends it."""
    try:
        written = urlsplit(url).password or ""
    except ValueError:
        return ()
    return tuple(sorted({written, unquote(written)} - {""}))


def oauth_timeout(settings: Settings) -> float:
    """Return the longest one call to the OAuth server may take."""
    return min(settings.upstream_timeout, 30.0)


def _default(dest: str) -> Any:
    """The parsed default of the option ``dest`` (for ``Settings``' field defaults)."""
    [option] = [option for option in OPTIONS if option.dest == dest]
    assert option.default, f"{dest} has no default"
    return option.default if option.parse is None else option.parse(option.default)


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar needs to know, validated.

    A default is written once, in ``OPTIONS``; the fields below take it parsed.
    """

    # The one portal's base URL; "" in marketplace mode, where ``portal_list`` names them.
    portal: str
    client_id: str
    client_secret: str = field(repr=False)
    oauth_url: str
    # Marketplace mode's portals (BITRIX_PORTAL as a list or a pattern); None: the one ``portal``.
    portal_list: PortalList | None = None
    scope: tuple[str, ...] = ()
    auth_code: str = field(default="", repr=False)
    listen: Listen = _default("listen")  # noqa: RUF009 - immutable
    admin_listen: Listen = _default("admin_listen")  # noqa: RUF009 - immutable
    oauth_listen: Listen | None = None
    public_url: str = ""
    alert_webhook: str = field(default="", repr=False)
    shutdown_grace: float = _default("shutdown_grace")
    allowed_hosts: tuple[str, ...] = ()
    client_key: str = field(default="", repr=False)
    insecure_no_client_key: bool = _default("insecure_no_client_key")
    rate: float = _default("rate")
    burst: int = _default("burst")
    queue_timeout: float = _default("queue_timeout")
    coalesce: bool = _default("coalesce")
    db_path: Path = _default("db_path")  # noqa: RUF009 - immutable
    # A PostgreSQL store's URL, password and all; when set, db_path is not used.
    db_url: str = field(default="", repr=False)
    db_timeout: float = _default("db_timeout")
    replica_id: str = ""
    refresh_interval: float = _default("refresh_interval")
    upstream_timeout: float = _default("upstream_timeout")
    max_body: int = _default("max_body")
    list_max: int = _default("list_max")
    request_timeout: float = _default("request_timeout")
    idle_timeout: float = _default("idle_timeout")
    max_connections: int = _default("max_connections")
    log_format: str = _default("log_format")
    log_level: str = _default("log_level")
    fast_lane: bool = _default("fast_lane")
    metrics_per_portal: bool = _default("metrics_per_portal")
    refresh_rate: float = _default("refresh_rate")

    @cached_property
    def portals(self) -> PortalList:
        """Return the portals authorizations may be held for (one rule for one portal)."""
        return self.portal_list if self.portal_list is not None else PortalList.of(self.portal)

    @property
    def marketplace(self) -> bool:
        """Say whether ``BITRIX_PORTAL`` lists portals (or patterns) rather than one address."""
        return not self.portals.single

    @property
    def db_shown(self) -> str:
        """Name the store for people: the SQLite path, or the URL without its password."""
        return shown_db(self.db_url) if self.db_url else str(self.db_path)

    @property
    def replica(self) -> str:
        """Name this sidecar among replicas: SIDECAR_REPLICA_ID, else hostname:pid."""
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def db_passwords(self) -> tuple[str, ...]:
        """Return the PostgreSQL URL's password as written and decoded, for the redactor."""
        return url_passwords(self.db_url)

    @property
    def rest_base(self) -> str:
        """Return the portal's REST base used until a token names its own ``client_endpoint``.

        '' in marketplace mode: there is no one portal to call then.
        """
        return f"{self.portal}/rest/" if self.portal else ""

    @property
    def token_url(self) -> str:
        """Return the OAuth server's token endpoint."""
        return f"{self.oauth_url}/oauth/token/"


def _read_secret(
    values: dict[str, Any], problems: list[str], dest: str, env: str, what: str, *,
    required: bool,
) -> str:
    """Take a secret given as ``env`` or as the file ``env``_FILE out of ``values``."""
    secret = values.pop(dest, "")
    secret_file = values.pop(f"{dest}_file", "")
    if secret and secret_file:
        problems.append(f"{env} and {env}_FILE: set only one of them")
    elif secret_file:
        try:
            secret = Path(secret_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{env}_FILE: cannot read {secret_file}: "
                            f"{exc.strerror if isinstance(exc, OSError) else 'not UTF-8'}")
        else:
            if not secret:
                problems.append(f"{env}_FILE: {secret_file} is empty")
    elif not secret and required:
        problems.append(f"{env} or {env}_FILE: one is required ({what})")
    return str(secret)


def _take_db(values: dict[str, Any], problems: list[str]) -> None:
    """Turn SIDECAR_DB or SIDECAR_DB_FILE into ``db_path`` (SQLite) or ``db_url`` (PostgreSQL)."""
    db_file = values.pop("db_file", "")
    if db_file and "db_path" in values:
        problems.append("SIDECAR_DB and SIDECAR_DB_FILE: set only one of them")
        return
    if db_file:
        try:
            text = Path(db_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"SIDECAR_DB_FILE: cannot read {db_file}: "
                            f"{exc.strerror if isinstance(exc, OSError) else 'not UTF-8'}")
            return
        try:
            db = parse_db(text)
        except ValueError as exc:
            problems.append(f"SIDECAR_DB_FILE: {exc}")
            return
        if not isinstance(db, str):
            problems.append(f"SIDECAR_DB_FILE: {db_file} must hold a postgresql:// URL")
            return
        values["db_url"] = db
    elif isinstance(values.get("db_path"), str):
        values["db_url"] = values.pop("db_path")


def load_settings(
    env: Mapping[str, str],
    flags: Mapping[str, str | None] | None = None,
    *,
    need_secret: bool = True,
    serving: bool = True,
) -> Settings:
    """Build settings from ``env`` and ``flags`` (flags win), or raise one ConfigError naming all.

    ``flags`` is keyed by ``Option.dest``; a ``None`` value means the flag was not given.
    ``serving`` (``run``) also refuses a proxy listener beyond loopback that has no client key.
    """
    flags = flags or {}
    raw: dict[str, tuple[str, str]] = {}  # dest -> (source name, text)
    for option in OPTIONS:
        given = flags.get(option.dest)
        if given is not None:
            raw[option.dest] = (option.flag, given)
        elif env.get(option.env, "").strip():
            raw[option.dest] = (option.env, env[option.env])
        # Otherwise the Settings field's default applies (parsed from option.default).
    # A secret given by flag overrides both environment forms, not just its twin.
    for pair in (("client_secret", "client_secret_file"), ("client_key", "client_key_file"),
                 ("db_path", "db_file")):
        if any(flags.get(dest) is not None for dest in pair):
            for dest in pair:
                if flags.get(dest) is None:
                    raw.pop(dest, None)

    problems: list[str] = []
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.dest not in raw:
            continue
        source, text = raw[option.dest]
        if option.parse is None:
            values[option.dest] = text.strip()
            continue
        try:
            values[option.dest] = option.parse(text)
        except ValueError as exc:
            problems.append(f"{source}: {exc}")

    for option in OPTIONS:
        if option.required and option.dest not in raw:
            problems.append(f"{option.env}: required ({option.help})")

    secret = _read_secret(values, problems, "client_secret", "BITRIX_CLIENT_SECRET",
                          "application key", required=need_secret)
    key = _read_secret(values, problems, "client_key", "SIDECAR_CLIENT_KEY", "client key",
                       required=False)
    _take_db(values, problems)
    if key and not _CLIENT_KEY_RE.fullmatch(key):
        # The value itself is never repeated: it is a secret, and this message is printed.
        problems.append(
            "SIDECAR_CLIENT_KEY: must be 16 to 64 letters, digits or underscores (it travels "
            "as a webhook address's code; make one with: openssl rand -hex 24)"
        )
    listen = values.get("listen", _default("listen"))
    if serving and not key and not values.get("insecure_no_client_key") \
            and not is_loopback(listen.host):
        source = raw["listen"][0] if "listen" in raw else "SIDECAR_LISTEN"
        problems.append(
            f"{source}: {listen} is reachable beyond loopback, and whoever reaches it acts as "
            "the app: set SIDECAR_CLIENT_KEY or SIDECAR_CLIENT_KEY_FILE (every /rest/ call and "
            "/token must then carry the key), or SIDECAR_INSECURE_NO_CLIENT_KEY=on if "
            "authentication of your own stands in front"
        )
    if serving and not key and not values.get("insecure_no_client_key") \
            and "*" in values.get("allowed_hosts", ()):
        # Any Host name is what DNS rebinding needs: a page whose name now points here reads
        # /token with no Origin to refuse it by. Only the key stands in its way.
        problems.append(
            "SIDECAR_ALLOWED_HOSTS: '*' serves any Host name, so a web page can reach the "
            "sidecar through DNS rebinding: set SIDECAR_CLIENT_KEY or SIDECAR_CLIENT_KEY_FILE "
            "with it (or SIDECAR_INSECURE_NO_CLIENT_KEY=on), or list the names instead"
        )

    oauth_listen = values.get("oauth_listen")
    if oauth_listen is not None and not is_loopback(oauth_listen.host) and not values.get(
        "public_url"
    ):
        problems.append(
            "SIDECAR_PUBLIC_URL: required when SIDECAR_OAUTH_LISTEN is not on loopback (the "
            "address the portal and browsers reach it at; only that Host is served there)"
        )

    portals = values.get("portal")
    if isinstance(portals, PortalList):
        values["portal"], values["portal_list"] = "", portals
        if "oauth_url" not in values:
            oauth_url = default_oauth_url_of(portals)
            if oauth_url is None:
                problems.append(
                    "BITRIX_OAUTH_URL: required when BITRIX_PORTAL lists portals on loopback or "
                    "in both OAuth zones (oauth.bitrix.info and oauth.bitrix24.tech)")
            else:
                values["oauth_url"] = oauth_url

    if problems:
        raise ConfigError(problems)
    if "oauth_url" not in values:
        values["oauth_url"] = default_oauth_url(values["portal"])
    return Settings(client_secret=secret, client_key=key, **values)


class PortalSettings(Settings):
    """One portal's settings in marketplace mode: the sidecar's own, naming that portal.

    A view, not a copy (a copy of every setting per portal cost 1.5 KiB each, 15 MiB for
    10,000 portals): ``portal`` is its own, everything else is read from the sidecar's.
    """

    def __init__(self, base: Settings, portal: str) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "portal", portal)
        object.__setattr__(self, "portal_list", None)

    def __getattribute__(self, name: str) -> Any:
        """Read every setting but the portal from the sidecar's settings (the class's own
        defaults would answer first for a plain attribute lookup)."""
        if name in _SHARED_FIELDS:
            return getattr(object.__getattribute__(self, "_base"), name)
        return object.__getattribute__(self, name)


# The settings a portal's view reads from the sidecar's.
_SHARED_FIELDS = frozenset(
    field.name for field in dataclasses.fields(Settings)) - {"portal", "portal_list"}
