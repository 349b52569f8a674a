from __future__ import annotations

import orjson

from proxy import errors
from proxy.dialects import OPENAI


def test_error_body_always_has_all_four_keys():
    body = orjson.loads(OPENAI.error_body(errors.bad_request("bad thing"), ""))
    assert body == {
        "error": {
            "message": "bad thing",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_raw_headers_carry_type_length_and_extras():
    err = errors.no_usable_key("moonshot", "key 'a' is missing: set A")
    body = OPENAI.error_body(err, "")
    headers = dict(err.raw_headers(body))
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert headers[b"x-should-retry"] == b"false"
    assert (err.status, err.code, err.type) == (503, "no_usable_key", "server_error")


def test_status_and_codes_of_the_contract():
    assert (errors.model_not_found("m").status, errors.model_not_found("m").param) == (404, "model")
    assert errors.body_too_large(10).status == 413
    assert errors.upstream_unreachable("b", "x").status == 502
    assert errors.upstream_timeout("b", "x").status == 504
    assert errors.internal_error().status == 500
