"""The ``bitrix-sidecar`` command: run, authorize, authorize-link, expect-install, status, token,
migrate, emulator, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog
from yarl import URL

from sidecar import __version__, climarket
from sidecar.app import create_app, make_oauth, oauth_session, serve
from sidecar.authinfo import authorize_url, code_hint, describe, iso
from sidecar.authorization import Authorization
from sidecar.config import OPTIONS, Listen, Settings, load_settings, parse_db, parse_listen
from sidecar.errors import ConfigError, OAuthError, SidecarError, StoreError
from sidecar.grants import ANY_USER, LINK_TTL, issue_link, open_install_window
from sidecar.logging import AccessLog, Redactor, configure_logging
from sidecar.pgstore import PgStore
from sidecar.storage import MOVED, StoredState
from sidecar.stores import open_store

if TYPE_CHECKING:
    from sidecar.emulator import Emulator, Portal

EXIT_CONFIG = 2
EXIT_FAILED = 1
DEMO_CLIENT_ID = "local.demo0000000000.00000001"
DEMO_CLIENT_SECRET = "demo-secret-not-for-production"  # noqa: S105 - the emulator's own app
DEMO_SCOPE = ("crm", "user", "task")
DEMO_DEALS = 5000
DEMO_TASKS = 120

log = structlog.get_logger("sidecar.cli")


def _settings_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (each overrides its environment variable)")
    for option in OPTIONS:
        group.add_argument(option.flag, dest=option.dest, default=None, metavar="VALUE",
                           help=f"{option.help} [{option.env}]")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="bitrix-sidecar",
        description="A token-keeping reverse proxy for the Bitrix24 REST API.",
    )
    parser.add_argument("--version", action="version", version=f"bitrix-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    settings = _settings_parent()
    sub.add_parser("run", parents=[settings], help="serve the proxy")
    sub.add_parser("authorize-url", parents=[settings],
                   help="print the address to open in a browser to approve the app")
    auth = sub.add_parser(
        "authorize", parents=[settings],
        help="exchange a code (or the pasted redirect address) and store the pair",
    )
    auth.add_argument("code", metavar="CODE_OR_URL",
                      help="the code, or the whole address the browser was redirected to")
    sub.add_parser(
        "authorize-link", parents=[settings],
        help="print a one-time address (10 minutes) that starts the browser flow anywhere",
    )
    expect = sub.add_parser(
        "expect-install", parents=[settings],
        help="let the next install (within 10 minutes) replace the held authorization",
    )
    who = expect.add_mutually_exclusive_group()
    who.add_argument("--user-id", default=None, metavar="ID",
                     help="the portal user the install must be for (default: the held pair's)")
    who.add_argument("--any-user", action="store_true",
                     help="accept an install for any user of the portal")
    sub.add_parser("status", parents=[settings],
                   help="print the token's state as JSON (never a token); exit 1 unless usable")
    sub.add_parser("forget", parents=[settings],
                   help="marketplace mode: remove one portal's authorization (--portal NAME)")
    sub.add_parser("portals", parents=[settings],
                   help="marketplace mode: print a table of every portal held and its state")
    sub.add_parser("token", parents=[settings],
                   help="print the current access token, refreshing it first if it has expired")
    move = sub.add_parser(
        "migrate", parents=[settings],
        help="copy the authorization from the SQLite store (SIDECAR_DB) into a PostgreSQL "
        "database, so replicas share it without a new approval",
    )
    target = move.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", default=None, metavar="URL",
                        help="the postgresql:// URL (the process list shows it: prefer --to-file)")
    target.add_argument("--to-file", default=None, metavar="PATH",
                        help="a file holding the postgresql:// URL ('-': read it from "
                        "standard input)")
    move.add_argument("--force", action="store_true",
                      help="replace a newer authorization the database already holds")
    health = sub.add_parser(
        "healthcheck",
        help="exit 0 if the running sidecar's admin listener answers /healthz (or /readyz)",
    )
    health.add_argument("--ready", action="store_true", help="check /readyz instead of /healthz")
    health.add_argument("--admin-listen", default=None, metavar="HOST:PORT",
                        help="admin listener to ask [SIDECAR_ADMIN_LISTEN, default 127.0.0.1:9090]")
    health.add_argument("--timeout", type=float, default=3.0)
    emu = sub.add_parser("emulator", help="run the built-in Bitrix24 portal and OAuth emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=9000)
    emu.add_argument("--client-id", default=DEMO_CLIENT_ID)
    emu.add_argument("--client-secret", default=DEMO_CLIENT_SECRET)
    emu.add_argument("--redirect-uri", default=None,
                     help="the app's handler address the authorize page redirects to")
    emu.add_argument("--rate", type=float, default=None,
                     help="enable the leaky-bucket limit at this many requests per second")
    emu.add_argument("--burst", type=int, default=50)
    emu.add_argument("--delay", type=float, default=0.0,
                     help="seconds each REST call takes (to mimic a real portal)")
    emu.add_argument("--leads", type=int, default=0, help="create this many leads at start")
    emu.add_argument("--seed", type=_seeding, action="append", default=[],
                     metavar="TABLE=N",
                     help="fill a list table with N made-up records at start, e.g. "
                     "crm.deal=100000 (repeatable; tables as Emulator.seed names them)")
    demo = sub.add_parser("demo", help="the emulator and the sidecar together, authorized")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="the proxy's host:port")
    demo.add_argument("--log-level", default="warning")
    demo.add_argument("--portals", type=int, default=1, metavar="N",
                      help="marketplace mode: N emulated portals (2 to 9), each installing the "
                      "app, one sidecar holding them all")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "emulator":
            return _run(_emulator(args))
        if args.command == "demo":
            return _run(_demo(args))
        if args.command == "healthcheck":
            return _healthcheck(args)
        flags = {option.dest: getattr(args, option.dest) for option in OPTIONS}
        chosen = _chosen_portal(args.command, flags)
        settings = load_settings(
            os.environ, flags, need_secret=args.command in ("run", "authorize", "token"),
            serving=args.command == "run",
        )
    except ConfigError as exc:
        print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "run":
        redactor = configure_logging(fmt=settings.log_format, level=settings.log_level)
        access_log = AccessLog()
        try:
            return _run(_serve(settings, redactor, access_log))
        finally:
            access_log.flush()  # lines of a loop that ended before its flush ran
    # One-shot commands keep stdout for their answer and log only what matters.
    configure_logging(fmt=settings.log_format, level="warning")
    if settings.marketplace:
        return _marketplace(settings, args, chosen)
    if args.command in ("portals", "forget"):
        print(f"bitrix-sidecar: '{args.command}' acts on the portals of a marketplace sidecar; "
              "BITRIX_PORTAL names one portal", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "authorize-url":
        print(authorize_url(settings))
        return 0
    if args.command == "authorize":
        return _run(_authorize(settings, args.code))
    if args.command == "authorize-link":
        return _run(_authorize_link(settings))
    if args.command == "expect-install":
        return _run(_expect_install(settings, ANY_USER if args.any_user else args.user_id))
    if args.command == "status":
        return _run(_status(settings))
    if args.command == "migrate":
        return _migrate(settings, args)
    return _run(_token(settings))


# The commands that act on one portal: in marketplace mode --portal names which.
_PER_PORTAL = frozenset({"authorize", "authorize-url", "token", "status", "forget"})


def _chosen_portal(command: str, flags: dict[str, Any]) -> str | None:
    """In marketplace mode (BITRIX_PORTAL a list), ``--portal NAME`` on a per-portal command
    names one portal of it rather than replacing the list; take it out of the settings."""
    named = flags.get("portal")
    listed = os.environ.get("BITRIX_PORTAL", "")
    if command not in _PER_PORTAL or not named or not ("," in listed or "*" in listed):
        return None
    if "," in str(named) or "*" in str(named):
        return None  # a list given by flag: the settings' own
    flags["portal"] = None
    return str(named)


def _marketplace(settings: Settings, args: argparse.Namespace, chosen: str | None) -> int:
    """Run a one-shot command of a marketplace sidecar (see sidecar/climarket.py)."""
    now = time.time()
    if args.command in ("status", "portals"):
        return _run(climarket.status(settings, chosen, table=args.command == "portals",
                                     now=now))
    if args.command == "authorize-url":
        return climarket.authorize_url_for(settings, chosen)
    if args.command == "authorize":
        code, _ = parse_code(args.code)
        return _run(climarket.authorize(settings, code, chosen))
    if args.command == "token":
        return _run(climarket.token(settings, chosen))
    if args.command == "forget":
        return _run(climarket.forget(settings, chosen))
    print(f"bitrix-sidecar: '{args.command}' is not available in marketplace mode yet",
          file=sys.stderr)
    return EXIT_FAILED


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine on uvloop (where available) and return its exit code."""
    try:
        import uvloop  # noqa: PLC0415 - optional on platforms without it
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(coro)
        except KeyboardInterrupt:
            return 130


async def _serve(settings: Settings, redactor: Redactor, access_log: AccessLog) -> int:
    try:
        await serve(create_app(settings, redactor=redactor, access_log=access_log),
                    settings.listen,
                    admin_listen=settings.admin_listen, oauth_listen=settings.oauth_listen,
                    shutdown_grace=settings.shutdown_grace)
    except SidecarError as exc:
        log.error("startup_failed", error=exc.description)
        return EXIT_FAILED
    except OSError as exc:
        log.error("startup_failed", error=f"cannot listen on {settings.listen}: {exc.strerror}")
        return EXIT_FAILED
    return 0


def parse_code(text: str) -> tuple[str, dict[str, str]]:
    """Take a bare code or a pasted redirect address; return the code and the address's fields."""
    value = text.strip()
    if "code=" not in value:
        return value, {}
    query = urlsplit(value).query if "?" in value else value
    fields = {k: v[0] for k, v in parse_qs(query).items() if v}
    return fields.get("code", ""), fields


async def _authorize(settings: Settings, text: str) -> int:
    code, fields = parse_code(text)
    if not code:
        print("bitrix-sidecar: no code found in the argument", file=sys.stderr)
        return EXIT_FAILED
    portal_host = urlsplit(settings.portal).netloc
    domain = fields.get("domain", "")
    if domain and domain.lower() != portal_host:
        print(f"bitrix-sidecar: the address is from {domain}, but BITRIX_PORTAL is "
              f"{portal_host}: authorize on the configured portal", file=sys.stderr)
        return EXIT_FAILED
    async with (
        open_store(settings) as store,
        oauth_session() as http,
    ):
        tokens = Authorization(store, make_oauth(http, settings), settings)
        try:
            await tokens.authorize(code, trigger="cli")
            await _ensure_saved(tokens)
        except OAuthError as exc:
            print(f"bitrix-sidecar: {exc.description}{code_hint(exc, settings)}",
                  file=sys.stderr)
            return EXIT_FAILED
        except SidecarError as exc:
            print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(tokens.status(), indent=2))
    return 0


def link_base(settings: Settings) -> str:
    """Where a browser reaches /oauth/start: the published OAuth listener, else the proxy's."""
    if settings.public_url:
        return settings.public_url
    listen = settings.listen
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host  # noqa: S104
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{listen.port}"


async def _authorize_link(settings: Settings) -> int:
    try:
        async with open_store(settings) as store:
            secret = await issue_link(store)
    except SidecarError as exc:
        print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{link_base(settings)}/oauth/start?link={secret}")
    print(f"Open it once, within {int(LINK_TTL // 60)} minutes, in a browser logged in to "
          f"{settings.portal}; approve the app there.", file=sys.stderr)
    return 0


async def _expect_install(settings: Settings, user_id: str | None) -> int:
    try:
        async with open_store(settings) as store:
            stored = await store.load()
            if stored.pair is None or stored.reauth_required:
                print("bitrix-sidecar: no working authorization is held, so there is nothing "
                      "to replace: the next install is taken without a window", file=sys.stderr)
                return EXIT_FAILED
            if user_id is None:
                if not stored.pair.user_id:
                    print("bitrix-sidecar: the held pair does not say which user it acts as: "
                          "name the user the install is for (--user-id ID), or --any-user",
                          file=sys.stderr)
                    return EXIT_FAILED
                user_id = stored.pair.user_id
            until = await open_install_window(store, user_id)
    except SidecarError as exc:
        print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
        return EXIT_FAILED
    who = "any user" if user_id == ANY_USER else f"user {user_id}"
    print(json.dumps({"install_window_until": iso(until), "for": who}, indent=2))
    print(f"Install (or reinstall) the app on {settings.portal} as {who} now: the first "
          "install that the portal confirms replaces the held authorization.", file=sys.stderr)
    return 0


async def _ensure_saved(tokens: Authorization, attempts: int = 20) -> None:
    """A one-shot command must not exit holding the only copy of a pair: retry, then fail."""
    for attempt in range(attempts):
        try:
            if await tokens.save_unsaved():
                return
        except SidecarError:
            if attempt == attempts - 1:
                break
        await asyncio.sleep(0.5)
    raise StoreError(
        "the new token pair could not be written to the store; it is lost when this command "
        "exits, and a person may have to authorize the app again"
    )


async def _status(settings: Settings) -> int:
    try:
        if not settings.db_url and not settings.db_path.exists():
            # Looking must not create the store (a database's schema is made on connecting).
            info = describe(settings, StoredState(pair=None))
            info["note"] = f"no token store at {settings.db_path} yet"
        else:
            async with open_store(settings) as store:
                info = describe(settings, await store.load())
    except SidecarError as exc:
        print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(info, indent=2))
    return 0 if info["state"] == "valid" else EXIT_FAILED


async def _token(settings: Settings) -> int:
    try:
        async with (
            open_store(settings) as store,
            oauth_session() as http,
        ):
            tokens = Authorization(store, make_oauth(http, settings), settings)
            try:
                await tokens.start()
                pair = tokens.current() or await tokens.refresh(
                    tokens.pair.access_token if tokens.pair else "", trigger="cli"
                )
                await _ensure_saved(tokens)
            finally:
                # Even on Ctrl-C: a renewal's answer holds the only live refresh token.
                await tokens.aclose()
    except SidecarError as exc:
        print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
        return EXIT_FAILED
    print(pair.access_token)
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    """Take the target URL from --to or --to-file (never repeating it) and move the pair."""
    if settings.db_url:
        print("bitrix-sidecar: migrate reads a SQLite store: set SIDECAR_DB to its file, "
              "not to a URL", file=sys.stderr)
        return EXIT_CONFIG
    where = "--to"
    text = args.to
    if args.to_file is not None:
        where = "--to-file"
        try:
            text = (sys.stdin.readline() if args.to_file == "-"
                    else Path(args.to_file).read_text(encoding="utf-8")).strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            print(f"bitrix-sidecar: --to-file: cannot read {args.to_file}: {reason}",
                  file=sys.stderr)
            return EXIT_CONFIG
    try:
        url = parse_db(text)
    except ValueError as exc:
        print(f"bitrix-sidecar: {where}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(url, str):
        print(f"bitrix-sidecar: {where}: a postgresql:// URL is needed", file=sys.stderr)
        return EXIT_CONFIG
    return _run(_move(settings, url, force=args.force))


async def _move(settings: Settings, url: str, *, force: bool) -> int:
    """Copy the SQLite store's authorization into the database, both stores locked."""
    if not settings.db_path.exists():
        print(f"bitrix-sidecar: no token store at {settings.db_path}: nothing to move",
              file=sys.stderr)
        return EXIT_FAILED
    target = PgStore(url, portal=settings.portal, client_id=settings.client_id)
    copied = False  # the database has committed the pair
    try:
        # The source's lock keeps a running sidecar from renewing while the pair is copied.
        async with open_store(settings) as source, target, source.locked() as stored:
            async with target.locked() as there:
                refusal = _move_refusal(stored, there, force=force)
                if refusal:
                    print(f"bitrix-sidecar: {refusal}", file=sys.stderr)
                    return EXIT_FAILED
                generation = stored.generation
                if there.pair is not None and there.generation >= generation and force:
                    generation = there.generation + 1  # the replicas must see it as new
                await target.put_state(stored, generation)
                # The SQLite store no longer renews: a sidecar still running on it (the single
                # replica being moved) takes this in within a second and stops, rather than
                # spending the refresh token the fleet now holds. It commits after the
                # database (this block closes first), so a failed copy marks nothing.
                await source.record_error(
                    f"{MOVED} {target.shown} by 'bitrix-sidecar migrate' at "
                    f"{iso(time.time())}: run the sidecar on the database", reauth_required=True)
            copied = True
    except SidecarError as exc:
        print(f"bitrix-sidecar: {exc.description}", file=sys.stderr)
        if copied:
            print(f"bitrix-sidecar: the database {target.shown} holds the authorization now, "
                  f"but {settings.db_path} could not be marked as moved: stop any sidecar "
                  "running on it at once (it would spend the refresh token the database's "
                  "sidecars hold) and do not use it again", file=sys.stderr)
        return EXIT_FAILED
    assert stored.pair is not None
    print(json.dumps({
        "moved": True, "from": str(settings.db_path), "to": target.shown,
        "portal": settings.portal, "client_id": settings.client_id,
        "member_id": stored.pair.member_id, "generation": generation,
        "state": describe(settings, stored)["state"],
    }, indent=2))
    return 0


def _move_refusal(stored: StoredState, there: StoredState, *, force: bool) -> str:
    """Say why the SQLite store's entry may not go into the database ('' when it may)."""
    if stored.foreign:
        return f"{stored.foreign}, not of the configured app and portal: nothing to move"
    if stored.pair is None:
        return "the SQLite store holds no token pair: nothing to move"
    if stored.reauth_required and stored.last_error.startswith(MOVED):
        return f"the SQLite store's authorization was already {stored.last_error}"
    if there.pair is None or force or there.pair == stored.pair:
        return ""
    # Two chains' generations say nothing of which is newer: any other pair is kept.
    return (f"the database already holds another authorization of this app and portal "
            f"(generation {there.generation}, the SQLite store's is {stored.generation}): "
            "the replicas may have renewed it since; --force replaces it")


def _healthcheck(args: argparse.Namespace) -> int:
    """Ask the admin listener; for container health checks, so no curl is needed."""
    text = args.admin_listen or os.environ.get("SIDECAR_ADMIN_LISTEN") or "127.0.0.1:9090"
    try:
        listen = parse_listen(text)
    except ValueError as exc:
        print(f"bitrix-sidecar: SIDECAR_ADMIN_LISTEN: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # A wildcard listener is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{listen.port}/{'readyz' if args.ready else 'healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read(4096).decode("utf-8", "replace")
            print(body)
            return 0 if response.status == 200 else EXIT_FAILED
    except urllib.error.HTTPError as exc:
        print(exc.read(4096).decode("utf-8", "replace"), file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"bitrix-sidecar: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    return EXIT_FAILED


def _seeding(value: str) -> tuple[str, int]:
    """Read the emulator's ``--seed TABLE=N``."""
    table, _, count = value.rpartition("=")
    if not table or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not TABLE=N (e.g. crm.deal=100000)")
    return table, int(count)


async def _emulator(args: argparse.Namespace) -> int:
    from sidecar.emulator import Emulator, run_emulator  # noqa: PLC0415 - only this command

    configure_logging(fmt="console", level="info")
    emulator = Emulator(rate=args.rate, burst=args.burst, call_delay=args.delay)
    for n in range(1, args.leads + 1):
        emulator.leads[n] = {"ID": str(n), "TITLE": f"Lead {n}", "STATUS_ID": "NEW"}
    for table, count in args.seed:
        emulator.seed(table, count)
    emulator.register_app(args.client_id, args.client_secret, redirect_uri=args.redirect_uri)
    async with run_emulator(emulator, host=args.host, port=args.port) as base_url:
        print(f"Bitrix24 emulator at {base_url}\n"
              f"  client id:      {args.client_id}\n"
              f"  client secret:  {args.client_secret}\n"
              f"  authorize at:   {base_url}/oauth/authorize/?client_id={args.client_id}\n"
              f"  sidecar env:    BITRIX_PORTAL={base_url} BITRIX_CLIENT_ID={args.client_id} "
              "BITRIX_CLIENT_SECRET=...\n"
              "Ctrl-C stops it.", flush=True)
        await _wait_for_signal()
    return 0


async def _demo(args: argparse.Namespace) -> int:
    from sidecar.emulator import Emulator, run_emulator  # noqa: PLC0415 - only this command

    try:
        listen = parse_listen(args.listen)
    except ValueError as exc:
        print(f"bitrix-sidecar: --listen: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not 1 <= args.portals <= 9:
        print("bitrix-sidecar: --portals: from 1 to 9", file=sys.stderr)
        return EXIT_CONFIG
    redactor = configure_logging(fmt="console", level=args.log_level)
    emulator = Emulator()
    emulator.register_app(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, scope=",".join(DEMO_SCOPE))
    if args.portals > 1:
        return await _demo_portals(args, listen, redactor, emulator)
    with tempfile.TemporaryDirectory(prefix="bitrix-sidecar-demo-") as workdir:
        async with run_emulator(emulator) as base_url:
            # Something to list: deals for a whole list, tasks for REST 3.0.
            emulator.seed("crm.deal", DEMO_DEALS)
            emulator.add_tasks(DEMO_TASKS)
            settings = Settings(
                portal=base_url,
                client_id=DEMO_CLIENT_ID,
                client_secret=DEMO_CLIENT_SECRET,
                oauth_url=base_url,
                scope=DEMO_SCOPE,
                auth_code=emulator.issue_code(DEMO_CLIENT_ID),
                listen=listen,
                db_path=Path(workdir) / "tokens.db",
                log_format="console",
                log_level=args.log_level,
            )

            def ready(port: int) -> None:
                base = f"http://{listen.host}:{port}"
                print(_demo_banner(base, base_url), flush=True)

            return await _demo_serve(settings, redactor, ready)


async def _demo_portals(args: argparse.Namespace, listen: Listen, redactor: Redactor,
                        emulator: Emulator) -> int:
    """The demo in marketplace mode: N portals install the app on one sidecar."""
    from sidecar.emulator import run_emulator  # noqa: PLC0415 - only this command
    from sidecar.portals import parse_portals  # noqa: PLC0415

    portals = [emulator.add_portal(f"portal{n}") for n in range(1, args.portals + 1)]
    installs: set[asyncio.Task[tuple[int, str]]] = set()
    with tempfile.TemporaryDirectory(prefix="bitrix-sidecar-demo-") as workdir:
        async with run_emulator(emulator) as base_url:
            settings = Settings(
                portal="", portal_list=parse_portals(",".join(p.base_url for p in portals)),
                client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET,
                oauth_url=base_url, scope=("crm", "user"), listen=listen,
                db_path=Path(workdir) / "tokens.db", log_format="console",
                log_level=args.log_level,
            )

            def ready(port: int) -> None:
                base = f"http://{listen.host}:{port}"
                for portal in portals:  # each portal installs the app, as a real one would
                    task = asyncio.create_task(portal.send_install_event(
                        f"{base}/oauth/install", DEMO_CLIENT_ID))
                    installs.add(task)
                    task.add_done_callback(installs.discard)
                print(_demo_portals_banner(base, portals), flush=True)

            return await _demo_serve(settings, redactor, ready)


async def _demo_serve(settings: Settings, redactor: Redactor,
                      ready: Callable[[int], None]) -> int:
    """Serve the demo's sidecar until Ctrl-C."""
    try:
        await serve(create_app(settings, redactor=redactor), settings.listen,
                    shutdown_grace=2.0, ready=ready)
    except OSError as exc:
        print(f"bitrix-sidecar: cannot listen on {settings.listen}: {exc.strerror}; "
              "try --listen 127.0.0.1:8081", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _demo_portals_banner(base: str, portals: Sequence[Portal]) -> str:
    first, second = portals[0], portals[1]
    one, two = URL(first.base_url).raw_authority, URL(second.base_url).raw_authority
    return f"""
bitrix-sidecar demo, marketplace mode: one sidecar at {base} holding the authorizations of
{len(portals)} emulated portals ({', '.join(URL(p.base_url).raw_authority for p in portals)}),
each of which has just installed the app. Try, from another terminal:

  curl -s {base}/portal/{one}/rest/profile               # by host
  curl -s {base}/portal/{second.member_id}/rest/profile   # by member_id
  curl -s {base}/rest/crm.lead.add.json -H 'X-Bitrix-Portal: {two}' -d 'fields[TITLE]=Lead'
  curl -s {base}/portal/{one}/rest/1/anycode/user.current.json   # a webhook address per portal
  curl -s {base}/rest/profile                  # no portal named: 400 SIDECAR_PORTAL_REQUIRED
  curl -s '{base}/token?portal={two}'

Ctrl-C stops it.
"""


def _demo_banner(base: str, portal: str) -> str:
    return f"""
bitrix-sidecar demo: the sidecar at {base} in front of a Bitrix24 emulator at {portal},
authorized automatically. Try, from another terminal (no credentials needed):

  curl -s {base}/rest/profile
  curl -s {base}/rest/crm.lead.add.json -d 'fields[TITLE]=First lead' -d 'fields[NAME]=Ann'
  curl -s {base}/rest/crm.lead.list -H 'Content-Type: application/json' \\
       -d '{{"select": ["ID", "TITLE"]}}'
  curl -s '{base}/rest/crm.lead.get?id=1'
  curl -s {base}/rest/1/anycode/user.current.json      # the inbound-webhook address shape
  curl -s {base}/token                                 # the token itself, for direct calls

REST 3.0 (token in the JSON body, added by the sidecar):

  curl -s {base}/rest/api/tasks.task.get -H 'Content-Type: application/json' \
       -d '{{"id": 1, "select": ["id", "title"]}}'

A whole list, every page in one call ({DEMO_DEALS} deals; one record per line with NDJSON):

  curl -s '{base}/all/rest/crm.deal.list?select[]=ID&select[]=TITLE' | head -c 300; echo
  curl -s {base}/all/rest/crm.deal.list -H 'Accept: application/x-ndjson' | wc -l

Ctrl-C stops it.
"""


async def _wait_for_signal() -> None:
    import signal  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
