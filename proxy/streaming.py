"""Relaying an upstream response to the ASGI client.

A stream is passed on chunk by chunk, exactly as received and as soon as received. When the
upstream dies or stalls mid-stream, the client gets one OpenAI-shaped SSE error event and
the end of the response, so SDKs raise instead of mistaking the failure for a clean end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import aiohttp
import orjson

from proxy.errors import error_body
from proxy.redact import NO_SECRETS, Redactor

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class StreamKind(Enum):
    """How a stream says it is complete, and how a failure must be told to its SDK."""

    DONE_TERMINATED = "done"  # chat and text completions: must end with data: [DONE]
    RESPONSES = "responses"  # Responses API: typed events; a failure is `event: error`
    PLAIN = "plain"  # anything else: a clean end is an end


@dataclass(slots=True)
class RelayResult:
    error: str | None = None  # "stream_broken" or "timeout" when the upstream failed mid-way
    first_data_at: float | None = None  # perf_counter of the first data: event
    usage: dict[str, Any] | None = None  # the last usage the upstream reported


_USAGE_MARKERS = (b'"usage":{', b'"usage": {')  # not "usage":null, which every chunk may carry


def usage_of(event_json: Any) -> dict[str, Any] | None:
    """The usage an event reports: top-level, else inside a choice (Moonshot's place for it).

    The caller keeps only the last one seen, so a provider that reports it in both places
    is counted once.
    """
    if not isinstance(event_json, dict):
        return None
    usage = event_json.get("usage")
    if isinstance(usage, dict):
        return usage
    response = event_json.get("response")  # Responses API: response.completed
    if isinstance(response, dict):
        inner = response.get("usage")
        if isinstance(inner, dict):
            return inner
    for choice in event_json.get("choices") or ():
        if isinstance(choice, dict):
            inner = choice.get("usage")
            if isinstance(inner, dict):
                return inner
    return None


def tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) from a chat-style or Responses-style usage object."""
    if not usage:
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
    )


class _UsageReader:
    """Reads usage from a copy of the chunks that carry it; never touches the stream."""

    __slots__ = ("pending", "usage")

    def __init__(self) -> None:
        self.pending = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.pending:
            chunk = self.pending + chunk
            self.pending = b""
        elif _USAGE_MARKERS[0] not in chunk and _USAGE_MARKERS[1] not in chunk:
            return
        if not chunk.endswith(_EVENT_ENDS):  # the event goes on in the next chunk
            self.pending = chunk[-65536:]
            return
        for line in chunk.splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    found = usage_of(orjson.loads(line[5:]))
                except orjson.JSONDecodeError:
                    continue
                if found is not None:
                    self.usage = found


async def relay_stream(
    response: aiohttp.ClientResponse,
    send: Send,
    backend: str,
    kind: StreamKind = StreamKind.PLAIN,
    redactor: Redactor = NO_SECRETS,
) -> RelayResult:
    """Pass every chunk through untouched; end with an error event if the upstream fails.

    For chat and text completions a stream that ends cleanly but without ``data: [DONE]``
    was cut short too: the SDK would otherwise return a truncated answer as if complete.
    """
    result = RelayResult()
    usage = _UsageReader()
    last = previous = b"\n\n"
    held = b""  # the start of a secret at the end of a chunk, until the next one shows
    try:
        try:
            async for chunk in response.content.iter_any():
                if redactor:  # an upstream echoing a key: never passed on, whole or split
                    chunk, held = redactor.stream_chunk(held + chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                previous, last = last, chunk
                if result.first_data_at is None and b"data:" in chunk:
                    result.first_data_at = time.perf_counter()
                usage.feed(chunk)
        finally:
            result.usage = usage.usage  # however the stream ended, what it reported counts
    except (TimeoutError, aiohttp.SocketTimeoutError):
        result.error = "timeout"
        message = f"Backend '{backend}' stopped sending mid-stream (read timeout)."
        await send_stream_error(send, message, "upstream_timeout", last, kind, held)
        return result
    except aiohttp.ClientError:
        result.error = "stream_broken"
        message = f"Backend '{backend}' closed the stream before it was complete."
        await send_stream_error(send, message, "upstream_stream_broken", last, kind, held)
        return result
    if held:  # the stream ended: what was held back is not the start of a secret after all
        previous, last = last, held
    if kind is StreamKind.DONE_TERMINATED and b"[DONE]" not in previous[-16:] + last:
        result.error = "stream_broken"
        message = f"Backend '{backend}' ended the stream without [DONE]."
        await send_stream_error(send, message, "upstream_stream_broken", last, kind, held)
        return result
    await send({"type": "http.response.body", "body": held, "more_body": False})
    return result


async def send_stream_error(
    send: Send,
    message: str,
    code: str,
    last_chunk: bytes,
    kind: StreamKind = StreamKind.PLAIN,
    held: bytes = b"",
) -> None:
    """End the stream with one error event (after ``held``, bytes not yet passed on)."""
    # A half-sent event is closed first so the error is an event of its own.
    separator = held + (b"" if (held or last_chunk).endswith(_EVENT_ENDS) else b"\n\n")
    if kind is StreamKind.RESPONSES:
        event = b"event: error\ndata: " + _responses_error(message, code, last_chunk)
    else:
        event = b"data: " + error_body(message, "api_error", code)
    await send(
        {"type": "http.response.body", "body": separator + event + b"\n\n", "more_body": False}
    )


_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d{1,18})')


def _responses_error(message: str, code: str, last_chunk: bytes) -> bytes:
    """A Responses-API ``error`` event (``type: error``, what its SDKs parse), numbered
    after the last event seen; its ``error`` object makes the openai SDK raise."""
    numbers = _SEQUENCE.findall(last_chunk)
    sequence = int(numbers[-1]) + 1 if numbers else 0
    error = {"message": message, "type": "api_error", "param": None, "code": code}
    event = {
        "type": "error",
        "code": code,
        "message": message,
        "param": None,
        "sequence_number": sequence,
        "error": error,
    }
    return orjson.dumps(event)


class ResponseCut(Exception):
    """A relayed body ended early after its head was sent: the connection must be dropped
    so the client sees an incomplete response, not a short one that looks whole."""


async def relay_bytes(
    response: aiohttp.ClientResponse, send: Send, redactor: Redactor = NO_SECRETS
) -> str | None:
    """Pass a non-event body on chunk by chunk (``send`` waits while the client is slow:
    nothing piles up here). Returns why it broke off ("timeout", "body_broken"), or None."""
    held = b""
    try:
        async for chunk in response.content.iter_chunked(_BYTES_CHUNK):
            if redactor:
                chunk, held = redactor.stream_chunk(held + chunk)
                if not chunk:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (TimeoutError, aiohttp.SocketTimeoutError):
        return "timeout"
    except aiohttp.ClientError:
        return "body_broken"
    await send({"type": "http.response.body", "body": held, "more_body": False})
    return None


_BYTES_CHUNK = 256 * 1024
