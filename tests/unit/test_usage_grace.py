"""What a stream's observer counts at any cut (issue 19, item 6): random cut points never
over-count and never crash; a stream whose client left is read on silently, at most the
grace's bytes; a Responses stream is whole only at its final event."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import aiohttp
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.streaming import RelayResult, StreamKind, relay_stream
from proxy.usage import token_counts
from tests.unit.test_stream_usage import _Content, _Response, _Trace, split
from tests.usage_upstream import COMPLETION, PROMPT, TEXT, _chat, _messages, _responses

STREAMS = {
    StreamKind.DONE_TERMINATED: _chat,
    StreamKind.RESPONSES: _responses,
    StreamKind.ANTHROPIC: _messages,
}


def _whole(kind: StreamKind) -> bytes:
    text, final = STREAMS[kind]()
    return b"".join(text + final)


def _relay(
    chunks: list[bytes],
    kind: StreamKind,
    error: BaseException | None = None,
    gone_after: int | None = None,
    grace_bytes: int = 0,
    messages: list[int] | None = None,
) -> tuple[bytes, RelayResult]:
    """What the client gets and what is counted; the client leaves after ``gone_after``
    chunks when told."""
    trace = _Trace()
    bodies: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        bodies.append(message["body"])

    def gone() -> bool:
        return gone_after is not None and len(bodies) >= gone_after

    response = cast(aiohttp.ClientResponse, _Response(_Content(chunks, error, trace)))
    result = RelayResult()
    asyncio.run(
        relay_stream(response, send, "b", kind, result=result, gone=gone, grace_bytes=grace_bytes)
    )
    if messages is not None:
        messages.append(len(bodies))
    return b"".join(bodies), result


KINDS = st.sampled_from(list(STREAMS))


@settings(max_examples=300, deadline=None)
@given(kind=KINDS, cuts=st.lists(st.integers(0, 5000), max_size=6), end=st.integers(0, 5000))
def test_a_stream_cut_anywhere_never_counts_more_than_the_truth(
    kind: StreamKind, cuts: list[int], end: int
) -> None:
    whole = _whole(kind)
    cut = whole[: end % (len(whole) + 1)]
    _, result = _relay(split(cut, cuts), kind, aiohttp.ClientPayloadError("cut"))
    counts = token_counts(result.usage)
    assert counts.prompt <= PROMPT and counts.completion <= COMPLETION
    assert result.estimated_completion() <= len(TEXT) // 4 <= COMPLETION
    if kind is StreamKind.ANTHROPIC and b"message_start" in cut and b"}}\n\n" in cut:
        assert counts.prompt == PROMPT  # message_start's input is never dropped


@settings(max_examples=200, deadline=None)
@given(kind=KINDS, cuts=st.lists(st.integers(0, 5000), max_size=6), left=st.integers(0, 8))
def test_a_client_that_leaves_anywhere_still_gets_the_usage_counted_in_the_grace(
    kind: StreamKind, cuts: list[int], left: int
) -> None:
    chunks = split(_whole(kind), cuts)
    messages: list[int] = []
    sent, result = _relay(chunks, kind, gone_after=left, grace_bytes=1 << 20, messages=messages)
    assert (token_counts(result.usage).prompt, token_counts(result.usage).completion) == (
        PROMPT,
        COMPLETION,
    )
    assert result.complete and result.error is None
    assert messages[0] <= left  # nothing sent after the client left
    assert sent == b"".join(chunks[: messages[0]])


def test_the_grace_reads_no_more_than_its_bytes() -> None:
    chunks = [b"data: " + b"x" * 1000 + b"\n\n"] * 100
    _, result = _relay(chunks, StreamKind.DONE_TERMINATED, gone_after=1, grace_bytes=5000)
    assert result.grace_cut and not result.complete


def test_a_responses_stream_without_its_final_event_ends_with_the_error_event() -> None:
    text, _ = _responses()
    sent, result = _relay(text, StreamKind.RESPONSES)
    assert result.error == "stream_broken" and not result.complete
    assert b"event: error" in sent and b'"upstream_stream_broken"' in sent
    assert result.estimated_completion() == len(TEXT) // 4


def test_a_responses_stream_that_failed_or_stopped_incomplete_is_whole() -> None:
    for final in (b"response.failed", b"response.incomplete"):
        text, _ = _responses()
        end = b'event: x\ndata: {"type": "' + final + b'", "sequence_number": 2}\n\n'
        sent, result = _relay([*text, end], StreamKind.RESPONSES)
        assert result.error is None and b"event: error" not in sent


def test_a_delta_that_names_the_final_event_does_not_complete_a_responses_stream() -> None:
    text, _ = _responses()
    forged = text[1].replace(TEXT.encode(), b'\\"type\\": \\"response.completed\\"')
    sent, result = _relay([text[0], forged], StreamKind.RESPONSES)
    assert result.error == "stream_broken" and b"event: error" in sent


def test_the_grace_is_validated_and_capped() -> None:
    from proxy.config import parse_config
    from tests.unit.test_config_errors import GOOD, problems

    env = {"OPENAI_API_KEY": "sk-test-000000000000"}
    good = parse_config(GOOD + "server: {usage_grace: 500ms, usage_grace_bytes: 64KiB}\n", "c", env)
    assert (good.server.usage_grace, good.server.usage_grace_bytes) == (0.5, 64 << 10)
    assert problems(GOOD + "server: {usage_grace: 31}\n", **env) == [
        "c.yaml:8: server.usage_grace: must be at most 30"
    ]
    assert problems(GOOD + "server: {usage_grace_bytes: 17MiB}\n", **env) == [
        "c.yaml:8: server.usage_grace_bytes: must be at most 16777216"
    ]
