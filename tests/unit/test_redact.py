"""Secrets never leave the process: every configured key is replaced by its fingerprint."""

from __future__ import annotations

from urllib.parse import quote

from proxy.redact import Redactor, redact_url

KEY = "sk-live-0123456789abcdefXYZ/+="
OTHER = "sk-other-aaaaaaaaaaaa9999"


def test_a_key_and_its_percent_encoded_form_are_replaced_by_the_fingerprint() -> None:
    redactor = Redactor([KEY, OTHER])
    text = f"Incorrect API key provided: {KEY}; in a URL: ?key={quote(KEY, safe='')}"
    cleaned = redactor.text(text)
    assert KEY not in cleaned and quote(KEY, safe="") not in cleaned
    assert cleaned.count("sk-…Z/+=") == 2
    assert redactor.bytes(text.encode()) == cleaned.encode()


def test_a_key_that_contains_another_is_replaced_whole() -> None:
    short = "sk-abcdefghijkl"
    long = short + "-and-more-secret"
    cleaned = Redactor([short, long]).text(f"{long} {short}")
    assert "and-more-secret" not in cleaned and short not in cleaned


def test_short_placeholders_are_not_secrets_and_text_is_left_alone() -> None:
    redactor = Redactor(["ollama"])
    assert redactor.text("served by ollama") == "served by ollama"
    assert Redactor([KEY]).bytes(b"nothing secret here") == b"nothing secret here"


def test_urls_lose_their_passwords() -> None:
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host") == "redis://:***@host"
    assert (
        redact_url("redis://host:6379?password=s3cret&db=1")
        == "redis://host:6379?password=***&db=1"
    )
    assert redact_url("memory://") == "memory://"


def test_a_stream_chunk_ending_with_the_start_of_a_key_holds_only_that_back() -> None:
    redactor = Redactor([KEY])
    first, held = redactor.stream_chunk(b'data: {"echo": "' + KEY[:10].encode())
    assert first == b'data: {"echo": "' and held == KEY[:10].encode()
    second, held = redactor.stream_chunk(held + KEY[10:].encode() + b'"}\n\n')
    assert second == b'sk-\xe2\x80\xa6Z/+="}\n\n' and held == b""
    assert KEY.encode() not in first + second


def test_ordinary_stream_chunks_pass_unchanged_and_unheld() -> None:
    redactor = Redactor([KEY])
    for chunk in (b'data: {"a": 1}\n\n', b"data: [DONE]\n\n", b'data: {"text": "ok'):
        assert redactor.stream_chunk(chunk) == (chunk, b"")
