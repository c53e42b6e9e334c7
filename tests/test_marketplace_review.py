"""Correctness review of marketplace mode: the Redactor's word lookup, the registry's watch and
the one renewal schedule, over real SQLite stores and the emulator."""

from __future__ import annotations

import secrets

import pytest

from sidecar.logging import REDACTED, Redactor


class TestRedactorShapes:
    """Every shape the old alternation of known tokens hid is hidden by the word lookup too."""

    @pytest.mark.parametrize("shape", [
        "%22{t}%22",  # inside URL-encoded JSON quotes: the hex digits of %22 touch the token
        "redirect=x%3Fauth%3D{t}%26y",  # a URL-encoded query inside another URL
        "'line\\n{t}'",  # a repr'd string with an escaped newline before the token
        "{t}_{t}",  # two tokens joined by a word character
        "x{t}",  # any word character before it
        "{t}0",  # or after it
    ])
    def test_a_token_touching_word_characters_is_hidden(self, shape: str) -> None:
        """A known token is hidden wherever it stands, not only as a whole run of word
        characters; the text around it is kept."""
        redactor = Redactor()
        token = secrets.token_hex(34)  # the emulator's (and Bitrix24's) token shape
        redactor.add(secrets.token_hex(34))
        redactor.add(token)
        text = redactor.redact(shape.format(t=token))
        assert token not in text
        assert text == shape.format(t=REDACTED)

    def test_text_without_tokens_is_kept(self) -> None:
        """Words that merely share a token's first characters stay as they are."""
        redactor = Redactor()
        token = "abcdef0123456789abcdef"
        redactor.add(token)
        text = "abcdef0123 abcdef0123456789abcdeX xabcdef0123456789abcde"
        assert redactor.redact(text) == text
