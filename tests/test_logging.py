"""The log pipeline: every event goes through the redactor, tracebacks included."""

from __future__ import annotations

import io
import json
import logging

import structlog

from sidecar.logging import REDACTED, Redactor, configure_logging


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
