"""The dialect seam: what differs between OpenAI's wire and Anthropic's, each in one place."""

from __future__ import annotations

import itertools

import aiohttp
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import errors
from proxy.config import parse_config
from proxy.dialects import ANTHROPIC, OPENAI, StreamKind, bearer_token, for_request
from proxy.dialects.anthropic import error_type
from proxy.routing import Router
from proxy.streaming import merged
from proxy.usage import token_counts
from tests.unit.test_stream_usage import relay

CONFIG = parse_config(
    """
backends:
  kimi:
    base_url: https://kimi.example/v1
    anthropic_base_url: https://kimi.example/anthropic
    anthropic_auth: bearer
    keys: [{id: k, key: sk-kimi}]
    request_rewrite: {clamp: {temperature: [0, 1]}}
  claude:
    base_url: https://claude.example/v1
    anthropic_base_url: https://claude.example
    keys: [{id: c, key: sk-claude}]
  plain:
    base_url: https://plain.example/v1
    keys: [{id: p, key: sk-plain}]
routes:
  - {prefix: "kimi-", backend: kimi, fallback: [{backend: plain}, {backend: claude}]}
  - {prefix: "gpt-", backend: plain}
""",
    "t.yaml",
    {},
)


def test_each_request_gets_its_dialect_from_its_path() -> None:
    version = [(b"anthropic-version", b"2023-06-01")]
    assert for_request("/v1/messages", []) is ANTHROPIC
    assert for_request("/v1/messages/count_tokens", []) is ANTHROPIC
    assert for_request("/v1/messagesx", []) is OPENAI
    assert for_request("/v1/chat/completions", version) is OPENAI
    assert for_request("/v1/models", []) is OPENAI
    assert for_request("/v1/models", version) is ANTHROPIC
    assert ANTHROPIC.serves("/messages/count_tokens", CONFIG)
    assert not ANTHROPIC.serves("/messages/batches", CONFIG)  # not passed through (yet)
    assert OPENAI.serves("/files/file-1", CONFIG) and not OPENAI.serves("/messages", CONFIG)


def test_client_keys_x_api_key_first_then_bearer() -> None:
    both = [(b"x-api-key", b"sk-x"), (b"authorization", b"Bearer sk-b")]
    assert ANTHROPIC.client_key(both) == "sk-x"
    assert ANTHROPIC.client_key([(b"x-api-key", b" "), (b"authorization", b"Bearer sk-b")]) == (
        "sk-b"
    )
    assert ANTHROPIC.client_key([]) is None
    assert OPENAI.client_key(both) == "sk-b"  # x-api-key is no key on OpenAI's wire
    assert bearer_token([(b"authorization", b"Basic abc")]) is None
    assert bearer_token([(b"authorization", b"bearer  tok ")]) == "tok"


def test_the_backends_key_goes_out_the_backends_way() -> None:
    kimi, claude = CONFIG.backends["kimi"], CONFIG.backends["claude"]
    assert ANTHROPIC.upstream_auth(kimi, "sk-1") == ("authorization", "Bearer sk-1")
    assert ANTHROPIC.upstream_auth(claude, "sk-2") == ("x-api-key", "sk-2")
    assert OPENAI.upstream_auth(claude, "sk-2") == ("authorization", "Bearer sk-2")
    assert ANTHROPIC.base_url(kimi) == "https://kimi.example/anthropic/v1"
    assert OPENAI.base_url(kimi) == "https://kimi.example/v1"


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "invalid_json", "invalid_request_error"),
        (401, "invalid_api_key", "authentication_error"),
        (403, "model_not_allowed", "permission_error"),
        (404, "model_not_found", "not_found_error"),
        (405, "method_not_allowed", "invalid_request_error"),
        (413, "request_too_large", "request_too_large"),
        (429, "reconnect_throttled", "rate_limit_error"),
        (500, "internal_error", "api_error"),
        (502, "upstream_unreachable", "api_error"),
        (503, "backend_unavailable", "overloaded_error"),
        (503, "server_busy", "overloaded_error"),
        (503, "no_usable_key", "api_error"),
        (504, "upstream_timeout", "timeout_error"),
        (529, None, "overloaded_error"),
    ],
)
def test_anthropic_error_types_by_status(status: int, code: str | None, kind: str) -> None:
    assert error_type(status, code) == kind


def test_proxy_errors_are_written_in_the_requests_dialect() -> None:
    err = errors.circuit_open("kimi", 2.0)
    body = orjson.loads(ANTHROPIC.error_body(err, "req_1"))
    assert body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": err.message},
        "request_id": "req_1",
    }
    assert orjson.loads(OPENAI.error_body(err, "req_1")) == {
        "error": {"message": err.message, "type": err.type, "param": None, "code": err.code}
    }
    headers = dict(err.raw_headers(ANTHROPIC.error_body(err, "req_1")))
    assert int(headers[b"content-length"]) == len(ANTHROPIC.error_body(err, "req_1"))
    assert headers[b"retry-after"] == b"2"  # what the anthropic SDK waits for


def test_routing_in_a_dialect_keeps_only_fallbacks_that_speak_it() -> None:
    router = Router(CONFIG)
    openai_target = router.resolve("kimi-k2")
    anthropic_target = router.resolve("kimi-k2", ANTHROPIC)
    assert openai_target is not None and anthropic_target is not None
    assert [f.backend for f in openai_target.fallbacks] == ["plain", "claude"]
    assert [f.backend for f in anthropic_target.fallbacks] == ["claude"]
    assert anthropic_target.dialect is ANTHROPIC and openai_target.dialect is OPENAI
    assert not anthropic_target.rewrite and openai_target.rewrite  # passed through as sent
    assert router.resolve("kimi-k2", ANTHROPIC) is anthropic_target  # cached
    assert router.speakers(ANTHROPIC) == ["kimi", "claude"]


# ---------------------------------------------------------------- streams

START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":'
    b'{"input_tokens":25,"cache_creation_input_tokens":5,"cache_read_input_tokens":10,'
    b'"output_tokens":1}}}\n\n'
)
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
DELTA = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":15}}\n\n'
)
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
WHOLE = START + PING + DELTA + STOP


@given(st.lists(st.integers(1, len(WHOLE) - 1), max_size=6, unique=True))
def test_a_complete_stream_passes_byte_for_byte_however_it_is_cut(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(WHOLE)]
    chunks = [WHOLE[a:b] for a, b in itertools.pairwise(bounds)]
    out, result, _ = relay(chunks, strip=False, kind=StreamKind.ANTHROPIC)
    assert out == WHOLE
    assert result.error is None
    counts = token_counts(result.usage)
    assert (counts.prompt, counts.completion) == (40, 15)  # input from start, output from delta
    assert (counts.cache_creation, counts.cache_read) == (5, 10)


def test_a_stream_without_message_stop_ends_with_an_anthropic_error_event() -> None:
    out, result, _ = relay([START, PING, DELTA], strip=False, kind=StreamKind.ANTHROPIC)
    assert result.error == "stream_broken"
    assert out.startswith(START + PING + DELTA)
    event = out[len(START + PING + DELTA) :]
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    body = orjson.loads(event[len(b"event: error\ndata: ") :])
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "without message_stop" in body["error"]["message"]


def test_a_cut_stream_closes_the_half_event_then_the_error_event() -> None:
    half = DELTA[:30]
    broken = aiohttp.ClientPayloadError("cut")
    out, result, _ = relay([START, half], strip=False, kind=StreamKind.ANTHROPIC, error=broken)
    assert result.error == "stream_broken"
    assert out.startswith(START + half + b"\n\nevent: error\ndata: ")
    assert token_counts(result.usage).prompt == 40  # what was reported before the cut counts


def test_usage_merges_per_field_with_the_larger_count() -> None:
    first = {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 10}
    later = {"output_tokens": 15, "input_tokens": 0}
    assert merged(first, later) == {
        "input_tokens": 25,
        "output_tokens": 15,
        "cache_read_input_tokens": 10,
    }
    assert merged(None, later) is later


@given(st.integers(1, 60))
def test_an_upstream_error_event_ends_the_stream_without_a_second_one(cut: int) -> None:
    overloaded = (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n'
    )
    whole = START + PING + overloaded
    at = len(START + PING) + cut  # the error event cut anywhere
    out, result, _ = relay([whole[:at], whole[at:]], strip=False, kind=StreamKind.ANTHROPIC)
    assert out == whole  # relayed as is: no error event of the proxy's after it
    assert result.error == "stream_broken"
    first, _ = relay([overloaded], strip=False, kind=StreamKind.ANTHROPIC)[:2]
    assert first == overloaded  # an error event as the very first bytes, too


@pytest.mark.parametrize(
    "forged",
    [
        b'"text":"message_stop"',  # a model's text that is exactly the word
        b'"text":"{\\"type\\":\\"message_stop\\"}"',  # a model quoting the event
        b'"text":"event: message_stop\\n"',  # a model quoting the SSE line
    ],
)
def test_message_stop_inside_a_text_delta_does_not_complete_the_stream(forged: bytes) -> None:
    text = (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta",' + forged + b"}}\n\n"
    )
    out, result, _ = relay([START, text, DELTA], strip=False, kind=StreamKind.ANTHROPIC)
    assert result.error == "stream_broken"  # the upstream ended it early: the SDK must raise
    assert out.startswith(START + text + DELTA + b"event: error\ndata: ")
    assert b"without message_stop" in out


@pytest.mark.parametrize(
    "stop",
    [
        STOP,
        b'event: message_stop\r\ndata: {"type": "message_stop"}\r\n\r\n',
        b'event:message_stop\rdata: {"type":"message_stop"}\r\r',
        b'data: {"type": "message_stop"}\n\n',  # no event line: the data's type still says
    ],
)
def test_message_stop_in_any_spelling_the_wire_allows_completes_the_stream(stop: bytes) -> None:
    for at in range(1, len(stop)):
        chunks = [START, DELTA + stop[:at], stop[at:]]
        out, result, _ = relay(chunks, strip=False, kind=StreamKind.ANTHROPIC)
        assert (out, result.error) == (START + DELTA + stop, None)


@pytest.mark.parametrize(
    "failure", [aiohttp.ClientPayloadError("reset"), TimeoutError()], ids=["cut", "stall"]
)
def test_an_upstream_that_leaves_after_message_stop_leaves_a_complete_stream(
    failure: BaseException,
) -> None:
    out, result, _ = relay(
        [START, DELTA, STOP], strip=False, kind=StreamKind.ANTHROPIC, error=failure
    )
    assert out == START + DELTA + STOP  # no error event: the SDK would raise on a whole answer
    assert result.error is None
    assert token_counts(result.usage).completion == 15
