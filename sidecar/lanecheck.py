"""Whether this aiohttp still has the parts outside its public API that the fast lane, the
request deadlines and ``no_resend`` stand on: checked at start-up, so a change in aiohttp is
said once, loudly."""

from __future__ import annotations

import asyncio
import inspect
import types
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler


def _names_used(function: object) -> set[str]:
    """The attribute and global names a function's code (and code nested in it) refers to."""
    code = getattr(function, "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    names: set[str] = set()
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return names


def _set_by_init(cls: type[object], name: str) -> bool:
    """Whether some ``__init__`` in the class's MRO assigns (or at least names) ``name``."""
    return any(name in _names_used(vars(base).get("__init__")) for base in cls.__mro__)


async def _never_called(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("a probe server serves nothing")  # pragma: no cover


# The switch ``no_resend`` turns off: aiohttp's client sends an idempotent request again when a
# kept-alive connection turns out dead, unless a session's ``_retry_connection`` is false.
RESEND_SWITCH = "_retry_connection"


def missing_client_internals(session: type[object] = aiohttp.ClientSession) -> list[str]:
    """Name what ``no_resend`` needs of aiohttp's client and this aiohttp lacks."""
    reads = _names_used(getattr(session, "_request", None))
    if RESEND_SWITCH in reads and _set_by_init(session, RESEND_SWITCH):
        return []
    return [f"{session.__name__}.{RESEND_SWITCH}"]


def _copy_missing(server: type[web.Server], runner: type[web.AppRunner],
                  more: tuple[tuple[str, Callable[[Any], bool]], ...]) -> list[str]:
    """What a server built from aiohttp's own (by a runner's ``_make_server``) needs of them."""
    missing: list[str] = []
    name = server.__name__
    # Our runners build their server by overriding the runner's _make_server, which setup()
    # must call.
    if not (inspect.iscoroutinefunction(getattr(runner, "_make_server", None))
            and "_make_server" in _names_used(getattr(runner, "setup", None))):
        missing.append(f"{runner.__name__}._make_server (called by setup)")
    try:
        probe: Any = server(_never_called)
    except Exception:  # whatever breaks, this server cannot be copied
        missing.append(f"{name}(handler)")
        return missing
    checks: tuple[tuple[str, Callable[[Any], bool]], ...] = (
        ("_loop", lambda value: value is asyncio.get_running_loop()),
        ("_kwargs", lambda value: isinstance(value, dict)),
        ("request_handler", lambda value: value is _never_called),
        ("request_factory", callable),
        ("handler_cancellation", lambda value: isinstance(value, bool)),
        *more,
    )
    for attribute, fits in checks:
        if not hasattr(probe, attribute) or not fits(getattr(probe, attribute)):
            missing.append(f"{name}.{attribute}")
    return missing


def missing_deadline_internals(
    server: type[web.Server] = web.Server,
    runner: type[web.AppRunner] = web.AppRunner,
    handler: type[asyncio.BaseProtocol] = RequestHandler,
) -> list[str]:
    """Name each part of aiohttp outside its public API that the request deadlines
    (sidecar/deadlines.py) rely on and that this aiohttp lacks; empty when all are there.

    Call it with the event loop running (a ``server`` is built, never served).
    """
    # A DeadlineServer is built from the Server aiohttp made (its loop and handler arguments),
    # and builds its handlers as Server.__call__ does, from the same loop and arguments.
    missing = _copy_missing(server, runner, ())
    # A head is overdue only while the handler waits for one: start() awaits _waiter then,
    # as aiohttp's own keep-alive check reads it.
    hname = handler.__name__
    if not (_set_by_init(handler, "_waiter")
            and "_waiter" in _names_used(getattr(handler, "start", None))
            and "_waiter" in _names_used(getattr(handler, "_process_keepalive", None))):
        missing.append(f"{hname}._waiter (awaited by start() while no request is queued)")
    # The idle timeout is aiohttp's keep-alive timer, set by this argument.
    try:
        parameters = inspect.signature(handler).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    for name in ("keepalive_timeout", "lingering_time"):
        if name not in parameters:
            missing.append(f"{hname}({name}=)")
    return missing


def missing_internals(
    server: type[web.Server] = web.Server,
    runner: type[web.AppRunner] = web.AppRunner,
    handler: type[asyncio.BaseProtocol] = RequestHandler,
    session: type[object] = aiohttp.ClientSession,
) -> list[str]:
    """Name each part of aiohttp outside its public API that the fast lane or ``no_resend``
    relies on and that this aiohttp lacks (or uses differently); empty when all are there.

    Call it with the event loop running: a ``server`` is built (never served) to see what its
    ``__init__`` sets. The classes are parameters so that a test can pass one lacking a part.
    """
    name = server.__name__
    # A FastServer is built from the Server aiohttp made (its loop and handler arguments) and
    # counts its lanes among the Server's connections.
    missing = _copy_missing(server, runner, (
        ("_connections", lambda value: isinstance(value, dict)),))
    # At shutdown the Server calls close() and shutdown(timeout) on each of its _connections,
    # which a FastLane answers as aiohttp's RequestHandler does.
    for method, call in (("pre_shutdown", "close"), ("shutdown", "shutdown")):
        used = _names_used(getattr(server, method, None))
        if "_connections" not in used or call not in used:
            missing.append(f"{name}.{method} (calling {call}() on each of _connections)")
    # A connection handed over is given to a RequestHandler with connection_made(), then the
    # bytes already read with data_received() and an EOF with eof_received().
    for method in ("connection_made", "data_received", "eof_received"):
        asyncio_defaults = [getattr(protocol, method, None) for protocol in
                            (asyncio.BaseProtocol, asyncio.Protocol, asyncio.BufferedProtocol)]
        if getattr(handler, method, None) in (None, *asyncio_defaults):
            missing.append(f"{handler.__name__}.{method}")
    missing.extend(missing_client_internals(session))
    return missing
