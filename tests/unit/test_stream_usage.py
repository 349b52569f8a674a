"""Tokens for every stream: the usage-only event the proxy asked for is taken out of the
client's bytes (and nothing else is), its usage still counted; every token type read from
every usage shape, hostile values refused; the types reach the metrics and the log."""

from __future__ import annotations

import asyncio
import io
import itertools
import tracemalloc
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from proxy import metrics
from proxy.access_log import AccessLog
from proxy.context import RequestContext
from proxy.redact import NO_SECRETS, Redactor
from proxy.streaming import (
    RelayResult,
    StreamKind,
    relay_stream,
    tokens,
    without_usage_events,
)
from proxy.usage import MAX_TOKENS, NO_TOKENS, TokenCounts, asks_for_usage, token_counts

# ---------------------------------------------------------------- a fake upstream response


class _Content:
    def __init__(self, chunks: list[bytes], error: BaseException | None, trace: _Trace) -> None:
        self.chunks = chunks
        self.error = error
        self.trace = trace

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.trace.received += len(chunk)
            yield chunk
            # Back here only once the proxy has done all it will with this chunk.
            self.trace.most_held = max(self.trace.most_held, self.trace.received - self.trace.sent)
        if self.error is not None:
            raise self.error


class _Trace:
    def __init__(self) -> None:
        self.received = 0  # bytes the upstream has sent
        self.sent = 0  # bytes the client has got
        self.most_held = 0
        self.bodies: list[bytes] = []
        self.ended = False


class _Response:
    def __init__(self, content: _Content) -> None:
        self.content = content


def relay(
    chunks: list[bytes],
    strip: bool,
    kind: StreamKind = StreamKind.PLAIN,
    error: BaseException | None = None,
    redactor: Redactor = NO_SECRETS,
    keep_bodies: bool = True,
) -> tuple[bytes, RelayResult, _Trace]:
    """What the client receives when the upstream sends ``chunks`` (then fails, if told)."""
    trace = _Trace()

    async def send(message: dict[str, Any]) -> None:
        assert not trace.ended, "a body message after the last one"
        if keep_bodies:
            trace.bodies.append(message["body"])
        trace.sent += len(message["body"])
        trace.ended = not message["more_body"]

    response = cast(aiohttp.ClientResponse, _Response(_Content(chunks, error, trace)))
    result = asyncio.run(relay_stream(response, send, "b", kind, redactor, strip_usage_event=strip))
    assert trace.ended, "the response was never ended"
    return b"".join(trace.bodies), result, trace


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# ---------------------------------------------------------------- a generated SSE stream

# A CR right before an LF would make them one CRLF: the generator never writes that pair
# across two line ends it means to be separate (nor would a real upstream).
LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])


def _event(lines: list[bytes], ends: list[bytes]) -> bytes:
    """``lines``, each with its line end, and the blank line that ends the event (an LF
    right after a CR would join it as one CRLF: a CR then)."""
    out = b""
    for line, end in zip([*lines, b""], ends, strict=True):
        if not line and end == b"\n" and out.endswith(b"\r"):
            end = b"\r"
        out += line + end
    return out


@st.composite
def events(draw: st.DrawFn, lines: list[bytes]) -> bytes:
    ends = [draw(LINE_ENDS) for _ in range(len(lines) + 1)]
    return _event(lines, ends)


def _usage() -> st.SearchStrategy[dict[str, Any]]:
    count = st.integers(min_value=0, max_value=10**6)
    return st.fixed_dictionaries(
        {"prompt_tokens": count, "completion_tokens": count, "total_tokens": count},
        optional={
            "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": count}),
            "completion_tokens_details": st.fixed_dictionaries({"reasoning_tokens": count}),
        },
    )


_TEXT = st.text(max_size=20)


def _content_line(text: str, usage: Any = None) -> bytes:
    chunk = {"id": "c", "choices": [{"index": 0, "delta": {"content": text}}], "usage": usage}
    return b"data: " + orjson.dumps(chunk)


@st.composite
def other_block(draw: st.DrawFn) -> tuple[bytes, dict[str, Any] | None]:
    """One event that must reach the client whatever the stripping; and its usage, if any."""
    kind = draw(
        st.sampled_from(
            [
                "content",
                "content_spaced",
                "comment",
                "typed",
                "blank",
                "azure_first",
                "usage_in_content",
                "usage_with_id",
                "multiline",
                "tricky_text",
                "not_json",
            ]
        )
    )
    text = draw(_TEXT)
    usage = None
    if kind == "content":
        lines = [_content_line(text)]
    elif kind == "content_spaced":
        lines = [b"data:" + orjson.dumps({"choices": [{"delta": {"content": text}}]})]
    elif kind == "comment":
        lines = [b": keep-alive"]
    elif kind == "typed":
        lines = [b"event: response.output_text.delta", _content_line(text)]
    elif kind == "blank":
        return draw(LINE_ENDS), None  # an empty event: a lone blank line
    elif kind == "azure_first":  # choices [] without usage: Azure's first chunk
        lines = [b'data: {"id":"","choices":[],"prompt_filter_results":[]}']
    elif kind == "usage_in_content":  # some providers put it in the last content chunk
        usage = draw(_usage())
        lines = [_content_line(text, usage)]
    elif kind == "usage_with_id":  # another field than data: changes client state, kept
        usage = draw(_usage())
        lines = [b"id: 7", b"data: " + orjson.dumps({"choices": [], "usage": usage})]
    elif kind == "multiline":
        lines = [b'data: {"choices":', b"data: " + orjson.dumps([{"delta": {"content": text}}])]
        lines[-1] += b"}"
    elif kind == "tricky_text":  # the marker inside a string: no usage-only event
        lines = [_content_line('"choices":[]' + text)]
    else:
        lines = [b"data: [DONE?"]
    return draw(events(lines)), usage


@st.composite
def usage_block(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    usage = draw(_usage())
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
    data = orjson.dumps(body)
    if draw(st.booleans()):  # pretty-printed by some providers
        data = data.replace(b'"choices":[]', b'"choices": [ ]').replace(b'":', b'": ')
    lines = [b"data: " + data]
    if draw(st.booleans()):
        lines.insert(0, b": part of the same event")
    return draw(events(lines)), usage


def _no_cr_before_lf(blocks: list[bytes]) -> list[bytes]:
    """Where one block ends with CR and the next starts with LF, they would merge into a
    CRLF: swap that LF for a CR (still a blank line, still its own event)."""
    fixed = []
    previous = b""
    for block in blocks:
        if previous.endswith(b"\r") and block.startswith(b"\n"):
            block = b"\r" + block[1:]
        fixed.append(block)
        previous = block
    return fixed


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], int | None, dict[str, Any] | None]:
    """(blocks, index of the usage-only event or None, the last usage the stream reports)."""
    others = draw(st.lists(other_block(), max_size=12))
    blocks = [block for block, _ in others]
    usages: list[dict[str, Any] | None] = [usage for _, usage in others]
    where: int | None = None
    if draw(st.booleans()):
        block, usage = draw(usage_block())
        where = draw(st.integers(min_value=0, max_value=len(blocks)))
        blocks.insert(where, block)
        usages.insert(where, usage)
    if draw(st.booleans()):
        blocks.append(draw(events([b"data: [DONE]"])))
        usages.append(None)
    reported = [u for u in usages if u is not None]
    return _no_cr_before_lf(blocks), where, reported[-1] if reported else None


HOLD_LIMIT = 1 << 20  # what the stripper may hold of one unfinished event

CUTS = st.lists(st.integers(min_value=0, max_value=10**6), max_size=12)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(streams(), CUTS)
def test_stripped_stream_is_the_upstream_minus_exactly_the_usage_event(stream, cuts):
    blocks, where, reported = stream
    upstream = b"".join(blocks)
    expected = b"".join(b for i, b in enumerate(blocks) if i != where)
    out, result, _ = relay(split(upstream, cuts), strip=True)
    assert out == expected
    assert result.usage == reported
    assert result.error is None


@PROPERTY
@given(streams(), CUTS)
def test_without_stripping_every_chunk_is_passed_on_as_it_came(stream, cuts):
    blocks, _, reported = stream
    chunks = split(b"".join(blocks), cuts)
    out, result, trace = relay(chunks, strip=False)
    assert result.usage == reported
    assert trace.bodies[:-1] == chunks and trace.bodies[-1] == b""  # no framing, no copies
    assert out == b"".join(blocks)


def test_every_cut_of_a_crlf_and_cr_stream_strips_only_the_usage_event():
    usage = {"prompt_tokens": 9, "completion_tokens": 4}
    usage_event = b'data: {"choices":[],"usage":' + orjson.dumps(usage) + b"}\r\r\n"
    before = b'data: {"choices":[{"delta":{}}]}\r\n\r\n: ping\r\r'
    after = b"\ndata: [DONE]\r\r"  # an empty event, then one ended by CR CR at the very end
    upstream = before + usage_event + after
    for first in range(len(upstream) + 1):
        for second in range(first, len(upstream) + 1, 7):
            out, result, _ = relay(split(upstream, [first, second]), strip=True)
            assert out == before + after, (first, second)
            assert result.usage == usage


# ---------------------------------------------------------------- the stream around it

USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
USAGE_EVENT = b'data: {"id":"x","choices":[],"usage":' + orjson.dumps(USAGE) + b"}\n\n"
CONTENT = _content_line("hello") + b"\n\n"
DONE = b"data: [DONE]\n\n"


def test_a_done_stream_with_the_usage_event_taken_out_still_ends_cleanly():
    out, result, _ = relay([CONTENT, USAGE_EVENT, DONE], True, StreamKind.DONE_TERMINATED)
    assert out == CONTENT + DONE and result.error is None and result.usage == USAGE
    # [DONE] in the same chunk as the usage event, and a [DONE] without its blank line.
    out, result, _ = relay(
        [CONTENT + USAGE_EVENT + b"data: [DONE]"], True, StreamKind.DONE_TERMINATED
    )
    assert out == CONTENT + b"data: [DONE]" and result.error is None


def test_a_stream_cut_before_done_gets_its_error_event_after_every_real_byte():
    half = CONTENT[:20]
    out, result, _ = relay(
        [CONTENT, USAGE_EVENT, half], True, StreamKind.DONE_TERMINATED, aiohttp.ClientPayloadError()
    )
    assert result.error == "stream_broken" and result.usage == USAGE
    assert out.startswith(CONTENT + half + b"\n\n" + b"data: ")
    error = orjson.loads(out[len(CONTENT + half) + 8 : -2])
    assert error["error"]["code"] == "upstream_stream_broken"
    # Ended cleanly without [DONE]: the same error event, after the held bytes.
    out, result, _ = relay([CONTENT, USAGE_EVENT, half], True, StreamKind.DONE_TERMINATED)
    assert result.error == "stream_broken" and out.startswith(CONTENT + half + b"\n\n")


def test_a_read_timeout_mid_event_in_a_responses_stream_ends_with_its_error_event():
    event = b'event: response.output_text.delta\ndata: {"sequence_number":4}\n\n'
    out, result, _ = relay([event, event[:30]], True, StreamKind.RESPONSES, TimeoutError())
    assert result.error == "timeout"
    assert out.startswith(event + event[:30] + b"\n\nevent: error\ndata: ")
    assert orjson.loads(out.split(b"event: error\ndata: ")[1])["sequence_number"] == 5


def test_a_secret_split_across_chunks_is_scrubbed_when_stripping_too():
    secret = "sk-test-0123456789abcdef"
    line = _content_line(f"key {secret} echoed") + b"\n\n"
    cut = line.index(secret.encode()) + 7
    out, result, _ = relay(
        [line[:cut], line[cut:], USAGE_EVENT, DONE], True, redactor=Redactor([secret])
    )
    assert secret.encode() not in out and b"sk-\xe2\x80\xa6cdef" in out
    assert out.endswith(b"\n\n" + DONE) and USAGE_EVENT not in out and result.usage == USAGE


def test_a_usage_event_with_a_usage_that_is_not_an_object_is_no_usage_event():
    for usage in (b"5", b"null", b'"7"', b"[1]"):
        odd = b'data: {"choices":[],"usage":' + usage + b"}\n\n"
        out, result, _ = relay([CONTENT, odd, DONE], True)
        assert out == CONTENT + odd + DONE and result.usage is None
    broken = b'data: {"choices":[],"usage":{"prompt_tokens":1}\n\n'  # not JSON: kept
    out, result, _ = relay([broken, DONE], True)
    assert out == broken + DONE


def test_an_event_that_never_ends_is_passed_on_with_bounded_holding():
    piece = b"x" * 65536
    chunks = [b"data: "] + [piece] * 48  # 3 MiB, no line end ever
    out, result, trace = relay(chunks, True)
    assert out == b"".join(chunks)
    assert trace.most_held <= HOLD_LIMIT + len(piece)
    assert result.error is None


def test_an_endless_usage_looking_line_costs_bounded_memory_either_way():
    piece = b'"usage":{' + b"u" * 65527  # 64 KiB, never a line end
    chunks = [b"data: {"] + [piece] * 384  # 24 MiB
    for strip in (False, True):
        tracemalloc.start()
        try:
            _, result, trace = relay(chunks, strip, keep_bodies=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert trace.sent == 7 + 384 * 65536 and result.usage is None
        assert peak < 8 * 2**20, (strip, peak)  # the usage reader gives up at 4 MiB


def test_after_an_over_long_event_framing_resumes_and_strips_the_usage_event():
    big = b"data: " + b"y" * (3 * HOLD_LIMIT) + b"\n\n"
    upstream = CONTENT + big + USAGE_EVENT + DONE
    for size in (65536, 65537, 1000003):
        chunks = [upstream[i : i + size] for i in range(0, len(upstream), size)]
        out, result, trace = relay(chunks, True)
        assert out == CONTENT + big + DONE, size
        assert result.usage == USAGE and trace.most_held <= HOLD_LIMIT + size


def test_a_ten_megabyte_event_in_one_chunk_or_many():
    big = _content_line("z" * 10_000_000) + b"\n\n"
    upstream = big + USAGE_EVENT + DONE
    for chunks in ([upstream], split(upstream, list(range(0, len(upstream), 262144)))):
        out, result, trace = relay(chunks, True, StreamKind.DONE_TERMINATED)
        assert out == big + DONE and result.usage == USAGE and result.error is None
        assert trace.most_held <= HOLD_LIMIT + max(map(len, chunks))


def test_without_usage_events_defines_what_is_taken():
    assert without_usage_events(CONTENT + USAGE_EVENT + DONE) == CONTENT + DONE
    assert without_usage_events(USAGE_EVENT + USAGE_EVENT) == b""  # each one
    assert without_usage_events(b": c\n" + USAGE_EVENT) == b""  # a comment inside it goes too
    typed = b"event: usage\n" + USAGE_EVENT
    assert without_usage_events(typed) == typed


# ---------------------------------------------------------------- token types


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (  # chat completions, streamed or not
            {
                "prompt_tokens": 120,
                "completion_tokens": 80,
                "total_tokens": 200,
                "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 50},
            },
            TokenCounts(prompt=120, completion=80, cached=64, reasoning=50),
        ),
        (  # Responses (response.completed) and its details
            {
                "input_tokens": 30,
                "output_tokens": 12,
                "input_tokens_details": {"cached_tokens": 8},
                "output_tokens_details": {"reasoning_tokens": 4},
            },
            TokenCounts(prompt=30, completion=12, cached=8, reasoning=4),
        ),
        (  # embeddings
            {"prompt_tokens": 7, "total_tokens": 7},
            TokenCounts(prompt=7),
        ),
        (  # Realtime response.done
            {"input_tokens": 5, "output_tokens": 6, "input_token_details": {"cached_tokens": 2}},
            TokenCounts(prompt=5, completion=6, cached=2),
        ),
        (  # Anthropic: input_tokens leaves the cache out; prompt is all of the input
            {
                "input_tokens": 10,
                "output_tokens": 20,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
            },
            TokenCounts(
                prompt=1110, completion=20, cached=1000, cache_creation=100, cache_read=1000
            ),
        ),
        (  # Anthropic without caching
            {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 0},
            TokenCounts(prompt=10, completion=20),
        ),
        (  # Moonshot: cached_tokens at the top
            {"prompt_tokens": 40, "completion_tokens": 2, "cached_tokens": 32},
            TokenCounts(prompt=40, completion=2, cached=32),
        ),
        ({}, NO_TOKENS),
        (None, NO_TOKENS),
    ],
)
def test_token_counts_of_every_usage_shape(usage, expected):
    assert token_counts(usage) == expected


@pytest.mark.parametrize("bad", [-5, 1e308, 7.0, "7", True, None, [3], {"n": 1}, MAX_TOKENS, 2**80])
def test_hostile_counts_are_zero_and_never_reach_a_counter(bad):
    usage = {
        "prompt_tokens": bad,
        "completion_tokens": bad,
        "prompt_tokens_details": {"cached_tokens": bad},
        "completion_tokens_details": {"reasoning_tokens": bad},
        "cache_creation_input_tokens": bad,
        "cache_read_input_tokens": bad,
    }
    assert token_counts(usage) == NO_TOKENS
    assert tokens(usage) == (0, 0)
    assert token_counts({"prompt_tokens": 3, "prompt_tokens_details": bad}) == TokenCounts(prompt=3)
    assert token_counts(cast(Any, bad)) == NO_TOKENS


def test_anthropic_cache_counts_summing_past_the_cap_are_refused():
    big = MAX_TOKENS - 1
    usage = {"input_tokens": big, "cache_read_input_tokens": big}
    assert token_counts(usage).prompt == 0 and token_counts(usage).cache_read == big


def test_asks_for_usage_only_when_the_client_itself_said_true():
    assert asks_for_usage({"stream": True, "stream_options": {"include_usage": True}})
    for payload in (
        {"stream": True},
        {"stream_options": {"include_usage": False}},
        {"stream_options": {"include_usage": "true"}},
        {"stream_options": None},
        {"stream_options": [["include_usage", True]]},
    ):
        assert not asks_for_usage(payload), payload


# ---------------------------------------------------------------- metrics and log


def _token_sample(model: str, kind: str) -> float:
    labels = {"client": "anonymous", "backend": "usage-test", "model": model, "type": kind}
    return REGISTRY.get_sample_value("llm_proxy_tokens_total", labels) or 0.0


def _finished_record(model: str, counts: TokenCounts) -> RequestContext:
    record = RequestContext("POST", "/v1/chat/completions", "rid")
    record.routed(
        cast(
            Any,
            SimpleNamespace(
                backend="usage-test", upstream_model="m", label=model, translation=None
            ),
        )
    )
    record.attempt_started()
    record.responded(200)
    record.counted(counts)
    return record


def test_observe_request_counts_every_token_type():
    model = "tokens-every-type"
    counts = TokenCounts(
        prompt=9, completion=5, cached=4, reasoning=3, cache_creation=2, cache_read=1
    )
    for _ in range(2):
        metrics.observe_request(_finished_record(model, counts))
    for kind, value in counts.nonzero():
        assert _token_sample(model, kind) == 2 * value, kind


def test_zero_types_make_no_series_and_added_counts_count():
    model = "tokens-old-setters"
    record = _finished_record(model, NO_TOKENS)
    record.added_tokens(*tokens(USAGE))
    metrics.observe_request(record)
    assert (_token_sample(model, "prompt"), _token_sample(model, "completion")) == (11, 5)
    labels = {"client": "anonymous", "backend": "usage-test", "model": model, "type": "cached"}
    assert REGISTRY.get_sample_value("llm_proxy_tokens_total", labels) is None


def _log_line(fmt: str, counts: TokenCounts) -> str:
    out = io.StringIO()
    log = AccessLog(out, fmt)
    log.write(_finished_record("m", counts))  # no running loop: written at once
    return out.getvalue()


def test_the_access_log_prints_the_token_types():
    chat = TokenCounts(prompt=120, completion=80, cached=64, reasoning=50)
    text = _log_line("text", chat)
    assert "prompt_tokens=120 completion_tokens=80 cached_tokens=64 reasoning_tokens=50 " in text
    assert "cache_read" not in text
    line = orjson.loads(_log_line("json", chat))
    assert (line["prompt_tokens"], line["completion_tokens"]) == (120, 80)
    assert (line["cached_tokens"], line["reasoning_tokens"]) == (64, 50)
    assert "cache_read_tokens" not in line
    anthropic = token_counts(
        {"input_tokens": 1, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3}
    )
    assert "cache_creation_tokens=2 cache_read_tokens=3 cost_usd=" in _log_line("text", anthropic)
    line = orjson.loads(_log_line("json", anthropic))
    assert (line["prompt_tokens"], line["cache_creation_tokens"], line["cache_read_tokens"]) == (
        6,
        2,
        3,
    )


def test_a_long_response_completed_line_cut_anywhere_still_gives_its_usage():
    usage = {
        "input_tokens": 30,
        "output_tokens": 20000,
        "output_tokens_details": {"reasoning_tokens": 7},
    }
    completed = {
        "type": "response.completed",
        "response": {"output_text": "w" * 300_000, "usage": usage},
    }
    event = b"event: response.completed\ndata: " + orjson.dumps(completed) + b"\n\n"
    for size in (4096, 65536, 100_001):
        chunks = [event[i : i + size] for i in range(0, len(event), size)]
        for strip in (False, True):
            out, result, _ = relay(chunks, strip, StreamKind.RESPONSES)
            assert out == event and result.usage == usage, (size, strip)
    assert token_counts(result.usage) == TokenCounts(prompt=30, completion=20000, reasoning=7)


def test_a_usage_marker_cut_in_two_is_still_read_without_stripping():
    upstream = CONTENT + USAGE_EVENT + DONE
    marker = upstream.index(b'"usage":{')
    for cut in range(marker - 2, marker + 12):
        out, result, _ = relay([upstream[:cut], upstream[cut:]], False, StreamKind.DONE_TERMINATED)
        assert out == upstream and result.usage == USAGE, cut
