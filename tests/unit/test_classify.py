"""classify(): the one place that says what an upstream status means."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.classify import MAX_UPSTREAM_WAIT, Verdict, classify, parse_seconds


def error(type_: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": "m", "type": type_, "param": None, "code": code}})


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, b"", Verdict.OK),
        (201, b"", Verdict.OK),
        (301, b"", Verdict.REDIRECT),
        (307, b"", Verdict.REDIRECT),
        (400, error("invalid_request_error"), Verdict.CLIENT_ERROR),
        (401, b"", Verdict.KEY_REFUSED),  # 401 is always about the credentials
        (401, b"not json", Verdict.KEY_REFUSED),
        # A 403 about a model, a path or a permission is the client's, not the key's...
        (403, error("invalid_request_error", "model_not_found"), Verdict.KEY_LACKS_SCOPE),
        (403, error("permission_error"), Verdict.KEY_LACKS_SCOPE),
        (403, b"<html>Forbidden</html>", Verdict.CLIENT_ERROR),
        # A 401 about a scope or a permission: the key is fine, the request is outside it.
        (401, error("invalid_request_error", "missing_scope"), Verdict.KEY_LACKS_SCOPE),
        (
            401,
            b'{"error": {"message": "You have insufficient permissions for this operation. '
            b'Missing scopes: api.batch.write.", "type": "invalid_request_error"}}',
            Verdict.KEY_LACKS_SCOPE,
        ),
        (
            403,
            b'{"type": "error", "error": {"type": "permission_error", '
            b'"message": "Your API key does not have permission to use the specified resource."}}',
            Verdict.KEY_LACKS_SCOPE,
        ),
        (401, error("invalid_request_error", "invalid_api_key"), Verdict.KEY_REFUSED),
        (
            401,
            b'{"type": "error", "error": {"type": "authentication_error", '
            b'"message": "invalid x-api-key"}}',
            Verdict.KEY_REFUSED,
        ),
        # A revoked key's answer wins over words about permissions.
        (401, error("api_key_revoked", "missing_scope"), Verdict.KEY_REFUSED),
        # ...unless it says the key is bad.
        (403, error("invalid_request_error", "api_key_revoked"), Verdict.KEY_REFUSED),
        (403, error("authentication_error"), Verdict.KEY_REFUSED),
        (403, error("INVALID_AUTHENTICATION_ERROR"), Verdict.KEY_REFUSED),
        (404, error("invalid_request_error", "model_not_found"), Verdict.CLIENT_ERROR),
        (429, b"", Verdict.KEY_LIMITED),
        (500, b"", Verdict.BACKEND_FAILED),
        (503, b"", Verdict.BACKEND_FAILED),
    ],
)
def test_verdicts(status: int, body: bytes, verdict: Verdict) -> None:
    assert classify(status, body) is verdict


@given(st.integers(min_value=100, max_value=999), st.binary(max_size=200))
def test_any_status_and_body_gets_a_verdict_without_raising(status: int, body: bytes) -> None:
    assert classify(status, body) in Verdict


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"2", 2.0),
        (b"0.5", 0.5),
        ("30", 30.0),
        (b"nan", None),
        (b"inf", None),
        (b"-inf", None),
        (b"-1", None),
        (b"Wed, 21 Oct 2015 07:28:00 GMT", None),
        (b"", None),
        (None, None),
        (b"1e308", MAX_UPSTREAM_WAIT),
        (b"99999999", MAX_UPSTREAM_WAIT),
    ],
)
def test_waits_from_upstream_headers_are_sane_or_ignored(
    value: bytes | str | None, seconds: float | None
) -> None:
    assert parse_seconds(value) == seconds


@given(st.one_of(st.binary(max_size=40), st.text(max_size=40)))
def test_any_header_value_parses_to_a_finite_bounded_wait_or_none(value: bytes | str) -> None:
    seconds = parse_seconds(value)
    assert seconds is None or (math.isfinite(seconds) and 0 <= seconds <= MAX_UPSTREAM_WAIT)


def test_a_wait_in_milliseconds_is_capped_in_seconds_not_before_the_division() -> None:
    # an hour in retry-after-ms is an hour, not the cap (86,400) divided by 1,000
    assert parse_seconds("3600000", unit=0.001) == 3600.0
    assert parse_seconds(b"250", unit=0.001) == 0.25
    assert parse_seconds("1e30", unit=0.001) == parse_seconds("1e30")
    assert parse_seconds("-5", unit=0.001) is None
