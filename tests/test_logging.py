"""The log pipeline: every event goes through the redactor, tracebacks included."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TextIO

import aiohttp
import pytest
import structlog
import structlog.testing

from sidecar.emulator import Emulator
from sidecar.logging import REDACTED, AccessLog, Redactor, configure_logging
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.processes import Env, get, running

Configure = Callable[..., Redactor]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """configure_logging, with structlog and the root logger put back after the test."""
    root_handlers = logging.getLogger().handlers[:]

    def configure(stream: TextIO, level: str = "info", fmt: str = "json") -> Redactor:
        return configure_logging(fmt=fmt, level=level, stream=stream)

    try:
        yield configure
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers[:] = root_handlers


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[TextIO]:
    """A real file to log to."""
    with (tmp_path / "log").open("w", encoding="utf-8") as stream:
        yield stream


def written(stream: TextIO) -> list[dict[str, Any]]:
    """The events written to a log file so far."""
    stream.flush()
    return [json.loads(line) for line in Path(stream.name).read_text().splitlines()]


class TestRedactor:
    def test_permanent_secret_outlives_rotating_tokens(self) -> None:
        """The client secret is still hidden after many token rotations."""
        redactor = Redactor(keep=4)
        redactor.add("the-client-secret", permanent=True)
        for n in range(40):
            redactor.add(f"token-{n:04d}-abcdef")
        text = redactor.redact(
            "secret=the-client-secret old=token-0000-abcdef new=token-0039-abcdef"
        )
        assert "the-client-secret" not in text
        assert "token-0039-abcdef" not in text

    def test_secret_shaped_parameters_and_bearer_values(self) -> None:
        """auth=, refresh_token=, client_secret= and bearer values are hidden even if unknown."""
        redactor = Redactor()
        text = redactor.redact(
            "GET /x?auth=aaa111&refresh_token=bbb222&client_secret=ccc333&keep=1 "
            "Authorization: Bearer ddd444"
        )
        for value in ("aaa111", "bbb222", "ccc333", "ddd444"):
            assert value not in text
        assert "keep=1" in text

    def test_secret_keys_are_hidden_whatever_their_value(self) -> None:
        """An event field named like a secret never shows its value."""
        redactor = Redactor()
        event = redactor(None, "info", {"event": "x", "access_token": "zzz", "nested": {
            "refresh_token": "yyy"}, "Auth": "short", "code": ""})
        assert event["access_token"] == REDACTED
        assert event["nested"]["refresh_token"] == REDACTED
        assert event["Auth"] == REDACTED  # whatever the case of the key
        assert event["code"] == ""  # nothing to hide

    def test_every_kind_of_value_is_redacted(self) -> None:
        """Known secrets are hidden in strings, lists, nested dicts and exceptions alike."""
        redactor = Redactor()
        redactor.add("tok-0123456789abcdef")
        event = redactor(None, "info", {
            "event": "x", "text": "a tok-0123456789abcdef b", "list": ["tok-0123456789abcdef"],
            "nested": {"deeper": {"text": "tok-0123456789abcdef"}},
            "exc": ValueError("tok-0123456789abcdef"), "short": "GET", "number": 12,
        })
        assert "tok-0123456789abcdef" not in repr(event)
        assert event["text"] == f"a {REDACTED} b"
        assert (event["short"], event["number"]) == ("GET", 12)


class TestPipeline:
    def test_tracebacks_are_redacted_in_json_output(
        self, configure: Configure, log_file: TextIO
    ) -> None:
        """An exception whose text holds a secret is logged with the secret hidden."""
        redactor = configure(log_file, level="debug")
        redactor.add("s3cr3t-token-value")
        try:
            raise RuntimeError("failed with s3cr3t-token-value inside")
        except RuntimeError:
            structlog.get_logger("test").exception("boom")
        logging.getLogger("aiohttp.server").error("stdlib says auth=another-secret-1")
        events = written(log_file)
        text = Path(log_file.name).read_text()
        assert "s3cr3t-token-value" not in text
        assert "another-secret-1" not in text
        assert events[0]["event"] == "boom"
        assert "RuntimeError" in events[0]["exception"]
        assert events[1]["event"] == f"stdlib says auth={REDACTED}"
        assert events[1]["logger"] == "aiohttp.server"

    def test_console_format(self, configure: Configure, log_file: TextIO) -> None:
        """The console format writes text lines, redacted too, the access log's included."""
        redactor = configure(log_file, fmt="console")
        redactor.add("tok-0123456789abcdef")
        structlog.get_logger("test").info("hello", token="tok-0123456789abcdef")
        AccessLog().request(
            *(TestAccessLog.FIELDS | {"request_id": "tok-0123456789abcdef"}).values())
        log_file.flush()
        text = Path(log_file.name).read_text()
        assert "tok-0123456789abcdef" not in text
        hello, request = text.splitlines()
        assert "hello" in hello
        assert REDACTED in hello
        assert "request" in request
        assert "crm.lead.get" in request


class TestAccessLog:
    """The per-call event is rendered by hand; it must read exactly as structlog's would."""

    FIELDS: ClassVar[dict[str, Any]] = {
        "request_id": "abc-1", "method": "crm.lead.get", "http_method": "POST",
        "status": 200, "duration_ms": 1.25, "upstream_ms": 0.0, "retried": False,
        "coalesced": True, "error": None,
    }

    def render_both(self, configure: Configure, tmp_path: Path, level: str = "info",
                    **fields: Any) -> tuple[str, str]:
        """The line the access log writes, and the one structlog's pipeline writes."""
        lines = []
        for name in ("fast", "slow"):
            with (tmp_path / name).open("w") as stream:
                redactor = configure(stream, level=level)
                redactor.add("tok-0123456789abcdef")
                if name == "fast":
                    AccessLog().request(*fields.values())
                else:
                    structlog.get_logger("sidecar.proxy").info("request", **fields)
            lines.append((tmp_path / name).read_text())
        return lines[0], lines[1]

    def test_same_line_as_structlog(self, configure: Configure, tmp_path: Path) -> None:
        fast, slow = self.render_both(configure, tmp_path, **self.FIELDS)
        assert fast.endswith("\n")
        assert fast.count("\n") == 1
        fast_event, slow_event = json.loads(fast), json.loads(slow)
        assert list(fast_event) == list(slow_event)  # same keys, same order
        stamps = fast_event.pop("timestamp"), slow_event.pop("timestamp")
        for stamp in stamps:  # the same format, and the same moment give or take a second
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp
        moments = [datetime.fromisoformat(stamp.replace("Z", "+00:00")) for stamp in stamps]
        assert abs((moments[0] - moments[1]).total_seconds()) < 1
        assert fast_event == slow_event
        assert fast.split('"timestamp"')[0] == slow.split('"timestamp"')[0]  # byte for byte

    def test_timestamps_as_isoformat_writes_them(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """As TimeStamper(fmt="iso", utc=True): isoformat(), no fraction when it is zero, Z."""
        access_log = AccessLog()
        whole = 1_790_000_000
        for now in (whole, whole + 0.5, whole + 0.25, whole + 1, whole + 86_400.75):
            monkeypatch.setattr(time, "time", lambda now=now: now)
            expected = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
            assert access_log._stamp() == expected

    def test_values_are_escaped_and_redacted(self, configure: Configure,
                                             tmp_path: Path) -> None:
        fields = self.FIELDS | {"http_method": 'PO"ST\\', "error": "bad tok-0123456789abcdef",
                                "retried": True}
        fast, slow = self.render_both(configure, tmp_path, **fields)
        assert "tok-0123456789abcdef" not in fast + slow
        fast_event, slow_event = json.loads(fast), json.loads(slow)
        fast_event.pop("timestamp")
        slow_event.pop("timestamp")
        assert fast_event == slow_event
        assert fast_event["http_method"] == 'PO"ST\\'
        assert fast_event["error"] == f"bad {REDACTED}"

    def test_a_token_as_request_id_or_method_is_redacted(
        self, configure: Configure, tmp_path: Path
    ) -> None:
        """A client may send its token as X-Request-ID, or as a method name."""
        fields = self.FIELDS | {"request_id": "tok-0123456789abcdef",
                                "method": "tok-0123456789abcdef"}
        fast, slow = self.render_both(configure, tmp_path, **fields)
        assert "tok-0123456789abcdef" not in fast + slow
        assert json.loads(fast)["request_id"] == json.loads(slow)["request_id"] == REDACTED
        assert json.loads(fast)["method"] == json.loads(slow)["method"] == REDACTED

    def test_quiet_above_info(self, configure: Configure, tmp_path: Path) -> None:
        fast, slow = self.render_both(configure, tmp_path, level="warning", **self.FIELDS)
        assert fast == slow == ""

    def test_a_structlog_capture_still_sees_the_event(
        self, configure: Configure, log_file: TextIO
    ) -> None:
        configure(log_file)
        access_log = AccessLog()
        access_log.request(*self.FIELDS.values())
        with structlog.testing.capture_logs() as logs:
            access_log.request(*self.FIELDS.values())
        assert [event["request_id"] for event in written(log_file)] == ["abc-1"]
        assert logs == [{**self.FIELDS, "event": "request", "log_level": "info"}]

    async def test_lines_of_one_loop_turn_go_out_together(self, configure: Configure) -> None:
        writes: list[str] = []

        class Recorder(io.StringIO):
            def write(self, text: str) -> int:
                writes.append(text)
                return len(text)

        configure(Recorder())
        access_log = AccessLog()
        access_log.request(*self.FIELDS.values())
        access_log.request(*(self.FIELDS | {"request_id": "abc-2"}).values())
        assert writes == []  # queued until the loop turns
        await asyncio.sleep(0)
        assert len(writes) == 1
        assert [json.loads(line)["request_id"] for line in writes[0].splitlines()] == [
            "abc-1", "abc-2"]

    def test_lines_queued_when_a_loop_stops_are_not_lost(
        self, configure: Configure, log_file: TextIO
    ) -> None:
        """A loop that stops before its flush ran: the next loop, or the owner at exit, writes."""
        configure(log_file)
        access_log = AccessLog()

        def stopped_loop_logs(request_id: str) -> None:
            loop = asyncio.new_event_loop()

            def stop_then_log() -> None:
                loop.stop()  # this turn is its last: the flush it schedules never runs
                access_log.request(*(self.FIELDS | {"request_id": request_id}).values())

            loop.call_soon(stop_then_log)
            loop.run_forever()
            loop.close()

        async def log_one_turn(request_id: str) -> None:
            access_log.request(*(self.FIELDS | {"request_id": request_id}).values())
            await asyncio.sleep(0)

        def ids() -> list[str]:
            return [event["request_id"] for event in written(log_file)]

        stopped_loop_logs("abc-1")
        assert ids() == []
        asyncio.run(log_one_turn("abc-2"))  # the next loop writes both
        assert ids() == ["abc-1", "abc-2"]
        stopped_loop_logs("abc-3")
        assert ids() == ["abc-1", "abc-2"]
        access_log.flush()  # the owner, at exit
        assert ids() == ["abc-1", "abc-2", "abc-3"]


async def inflight(http: aiohttp.ClientSession, admin: str) -> float:
    """The sidecar's count of calls in flight, from its metrics."""
    async with http.get(f"{admin}/metrics") as response:
        text = await response.text()
    return float(re.search(r"^bitrix_sidecar_inflight_requests (\S+)$", text, re.M)[1])  # type: ignore[index]


class TestSidecarProcess:
    """``bitrix-sidecar run`` as a real process: what it writes to its standard error."""

    async def test_every_call_is_logged_by_exit_and_no_secret_is(
        self, env: Env, emulator: Emulator
    ) -> None:
        """Calls in flight at SIGTERM are in the log; a token sent back in a call is hidden."""
        run_env = {**env, "BITRIX_AUTH_CODE": emulator.issue_code(CLIENT_ID)}
        async with running(run_env) as sidecar:
            status, body = await get(f"{sidecar.base}/token")
            assert status == 200
            token = body["access_token"]
            ids = [f"call-{n:03d}" for n in range(50)]
            async with aiohttp.ClientSession() as http:

                async def call(request_id: str, path: str = "/rest/profile") -> None:
                    async with http.get(f"{sidecar.base}{path}",
                                        headers={"X-Request-ID": request_id}) as response:
                        await response.read()

                # A client that sends the token where it does not belong: as its request ID,
                # and as a parameter.
                await call(token, f"/rest/profile?auth={token}")
                emulator.call_delay = 0.5
                calls = asyncio.gather(*(call(request_id) for request_id in ids))
                for _ in range(500):
                    if await inflight(http, sidecar.admin) == len(ids):
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError("the calls never were all in flight at once")
                # Stopped with all 50 in flight: they finish in the drain, and are logged.
                assert await sidecar.stop() == 0
                await calls
        logged = "".join(sidecar.lines)
        requests = [event for event in sidecar.events()
                    if event["event"] == "request" and event["method"] != "/token"]
        assert sorted(event["request_id"] for event in requests) == sorted([REDACTED, *ids])
        assert all(event["status"] == 200 and event["method"] == "profile"
                   for event in requests if event["request_id"] in ids)
        for secret in (token, CLIENT_SECRET, *emulator.issued_secrets()):
            assert secret not in logged

    def test_thousands_of_tokens_are_all_hidden(self) -> None:
        """A marketplace sidecar holds two tokens per portal: every one of 20,000 is hidden,
        the first as well as the last, wherever it stands in a line."""
        redactor = Redactor()
        tokens = [f"{n:08x}deadbeef{n:08x}" for n in range(20_000)]
        for token in tokens:
            redactor.add(token)
        text = redactor.redact(f"a {tokens[0]} b/{tokens[9_999]}?x={tokens[-1]}&y")
        assert not any(token in text for token in tokens)
        assert text.count("[REDACTED]") == 3
