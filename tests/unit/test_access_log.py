"""Issue 19: the text access line's fields cannot be forged by what a client sends (a path
or a model id with spaces, quotes or `key=value` text), before auth too."""

from __future__ import annotations

import io
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.access_log import AccessLog
from proxy.context import RequestContext
from proxy.dialects import OPENAI

_TOKEN = re.compile(r'(?:([a-z_]+)=)?("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')
_KEYS = [
    "status",
    "client",
    "duration_ms",
    "request_id",
    "upstream_request_id",
    "model",
    "upstream_model",
    "backend",
    "key",
    "attempts",
    "deployment",
    "stream",
    "ttft_ms",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "throttled",
    "error",
]


def line_for(path: str, model: str) -> str:
    ctx = RequestContext("POST", path, "req_1", OPENAI)
    ctx.requested(model, False)
    ctx.failed("invalid_api_key", 401)
    out = io.StringIO()
    log = AccessLog(out=out)
    log.write(ctx)
    log.flush()
    return out.getvalue()


def fields(line: str) -> list[tuple[str, str]]:
    # The line's fields as a logfmt reader sees them: key=value, a value quoted if needed.
    head = line.rstrip("\n").split(" access ", 1)[1]
    tokens, at = [], 0
    while at < len(head):
        match = _TOKEN.match(head, at)
        assert match is not None and match.end() > at, head[at:]
        tokens.append((match[1], match[2]))
        at = match.end()
    assert [key for key, _ in tokens[:2]] == [None, None]  # the method, the path
    return [(key, value) for key, value in tokens[2:] if key is not None or value]


def unquoted(value: str) -> str:
    if not value.startswith('"'):
        return value
    return re.sub(r"\\(.)", r"\1", value[1:-1])


def test_a_hostile_path_and_model_cannot_add_fields() -> None:
    line = line_for('/v1/chat/x status=200 client=admin "', 'gpt-4o key=main status=200 "x')
    assert line.count("\n") == 1
    found = fields(line)
    assert [k for k, _ in found] == _KEYS
    got = dict(found)
    assert got["status"] == "401" and got["client"] == "-" and got["key"] == "-"
    assert unquoted(got["model"]) == 'gpt-4o key=main status=200 "x'
    assert line.split(" access POST ", 1)[1].startswith('"/v1/chat/x status=200 client=admin \\""')


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_any_path_or_model_is_one_field(path: str, model: str) -> None:
    line = line_for(path or "/", model)
    assert line.endswith("\n") and line.count("\n") == 1
    found = fields(line)
    assert [k for k, _ in found] == _KEYS
    assert dict(found)["status"] == "401"
    if model and not any(c in model for c in "\\\x00\x7f") and model.isprintable():
        assert unquoted(dict(found)["model"]) == model


def test_plain_values_stay_unquoted() -> None:
    got = dict(fields(line_for("/v1/chat/completions", "gpt-4o-mini")))
    assert got["model"] == "gpt-4o-mini" and got["error"] == "invalid_api_key"
