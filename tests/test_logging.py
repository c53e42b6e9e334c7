"""The log pipeline: every event goes through the redactor, tracebacks included."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import structlog
import structlog.testing

from sidecar.emulator import Emulator
from sidecar.logging import REDACTED, AccessLog, Redactor, configure_logging
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.processes import Env, get, running


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
            "refresh_token": "yyy"}})
        assert event["access_token"] == REDACTED
        assert event["nested"]["refresh_token"] == REDACTED


class TestPipeline:
    def test_tracebacks_are_redacted_in_json_output(self) -> None:
        """An exception whose text holds a secret is logged with the secret hidden."""
        out = io.StringIO()
        root_handlers = logging.getLogger().handlers[:]
        redactor = configure_logging(fmt="json", level="debug", stream=out)
        try:
            redactor.add("s3cr3t-token-value")
            try:
                raise RuntimeError("failed with s3cr3t-token-value inside")
            except RuntimeError:
                structlog.get_logger("test").exception("boom")
            logging.getLogger("aiohttp.server").error("stdlib says auth=another-secret-1")
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers[:] = root_handlers
        lines = out.getvalue().splitlines()
        assert "s3cr3t-token-value" not in out.getvalue()
        assert "another-secret-1" not in out.getvalue()
        assert json.loads(lines[0])["event"] == "boom"
        assert "RuntimeError" in json.loads(lines[0])["exception"]


class TestAccessLog:
    """The per-call event is rendered by hand; it must read exactly as structlog's would."""

    def render_both(self, level: str = "info", **fields: Any) -> tuple[str, str]:
        out = io.StringIO()
        root_handlers = logging.getLogger().handlers[:]
        redactor = configure_logging(fmt="json", level=level, stream=out)
        try:
            redactor.add("tok-0123456789abcdef")
            AccessLog().request(*fields.values())
            fast = out.getvalue()
            out.seek(0)
            out.truncate()
            structlog.get_logger("sidecar.proxy").info("request", **fields)
            slow = out.getvalue()
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers[:] = root_handlers
        return fast, slow

    FIELDS: ClassVar[dict[str, Any]] = {
        "request_id": "abc-1", "method": "crm.lead.get", "http_method": "POST",
        "status": 200, "duration_ms": 1.25, "upstream_ms": 0.0, "retried": False,
        "coalesced": True, "error": None,
    }

    def test_same_line_as_structlog(self) -> None:
        fast, slow = self.render_both(**self.FIELDS)
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

    def test_values_are_escaped_and_redacted(self) -> None:
        fields = self.FIELDS | {"http_method": 'PO"ST\\', "error": "bad tok-0123456789abcdef",
                                "retried": True}
        fast, slow = self.render_both(**fields)
        assert "tok-0123456789abcdef" not in fast + slow
        fast_event, slow_event = json.loads(fast), json.loads(slow)
        fast_event.pop("timestamp")
        slow_event.pop("timestamp")
        assert fast_event == slow_event
        assert fast_event["http_method"] == 'PO"ST\\'

    def test_a_token_as_request_id_or_method_is_redacted(self) -> None:
        """A client may send its token as X-Request-ID, or as a method name."""
        fields = self.FIELDS | {"request_id": "tok-0123456789abcdef",
                                "method": "tok-0123456789abcdef"}
        fast, slow = self.render_both(**fields)
        assert "tok-0123456789abcdef" not in fast + slow
        assert json.loads(fast)["request_id"] == json.loads(slow)["request_id"] == REDACTED

    def test_quiet_above_info(self) -> None:
        fast, slow = self.render_both(level="warning", **self.FIELDS)
        assert fast == slow == ""

    def test_a_structlog_capture_still_sees_the_event(self) -> None:
        out = io.StringIO()
        root_handlers = logging.getLogger().handlers[:]
        configure_logging(fmt="json", level="info", stream=out)
        try:
            with structlog.testing.capture_logs() as logs:
                AccessLog().request(*self.FIELDS.values())
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers[:] = root_handlers
        assert out.getvalue() == ""
        assert logs == [{**self.FIELDS, "event": "request", "log_level": "info"}]

    async def test_lines_of_one_loop_turn_go_out_together(self) -> None:
        writes: list[str] = []

        class Recorder(io.StringIO):
            def write(self, text: str) -> int:
                writes.append(text)
                return len(text)

        root_handlers = logging.getLogger().handlers[:]
        configure_logging(fmt="json", level="info", stream=Recorder())
        try:
            access_log = AccessLog()
            access_log.request(*self.FIELDS.values())
            access_log.request(*(self.FIELDS | {"request_id": "abc-2"}).values())
            assert writes == []  # queued until the loop turns
            await asyncio.sleep(0)
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers[:] = root_handlers
        assert len(writes) == 1
        assert [json.loads(line)["request_id"] for line in writes[0].splitlines()] == [
            "abc-1", "abc-2"]

    def test_lines_queued_when_a_loop_stops_are_not_lost(self, tmp_path: Path) -> None:
        """A loop that stops before its flush ran: the next loop, or the owner at exit, writes."""
        path = tmp_path / "log"
        root_handlers = logging.getLogger().handlers[:]
        with path.open("w") as out:
            configure_logging(fmt="json", level="info", stream=out)
            try:
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

                stopped_loop_logs("abc-1")
                assert path.read_text() == ""
                asyncio.run(log_one_turn("abc-2"))  # the next loop writes both
                assert ids_in(path) == ["abc-1", "abc-2"]
                stopped_loop_logs("abc-3")
                assert ids_in(path) == ["abc-1", "abc-2"]
                access_log.flush()  # the owner, at exit
                assert ids_in(path) == ["abc-1", "abc-2", "abc-3"]
            finally:
                structlog.reset_defaults()
                logging.getLogger().handlers[:] = root_handlers


async def inflight(http: aiohttp.ClientSession, admin: str) -> float:
    """The sidecar's count of calls in flight, from its metrics."""
    async with http.get(f"{admin}/metrics") as response:
        text = await response.text()
    return float(re.search(r"^bitrix_sidecar_inflight_requests (\S+)$", text, re.M)[1])  # type: ignore[index]


def ids_in(path: Path) -> list[str]:
    """The request IDs of the access-log lines written to ``path``."""
    return [json.loads(line)["request_id"] for line in path.read_text().splitlines()]


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
