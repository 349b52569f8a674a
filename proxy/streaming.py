"""Relaying an upstream response to the ASGI client.

A stream is passed on chunk by chunk, exactly as received and as soon as received. When the
upstream dies or stalls mid-stream, the client gets one OpenAI-shaped SSE error event and
the end of the response, so SDKs raise instead of mistaking the failure for a clean end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.errors import error_body

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


@dataclass(slots=True)
class RelayResult:
    bytes_sent: int = 0
    error: str | None = None  # "stream_broken" or "timeout" when the upstream failed mid-way


async def relay_stream(
    response: aiohttp.ClientResponse, send: Send, backend: str, expects_done: bool = False
) -> RelayResult:
    """Pass every chunk through untouched; end with an error event if the upstream fails.

    With ``expects_done`` (chat and text completions), a stream that ends cleanly but
    without ``data: [DONE]`` was cut short too: the SDK would otherwise return a truncated
    answer as if it were complete.
    """
    result = RelayResult()
    last = previous = b"\n\n"
    try:
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            result.bytes_sent += len(chunk)
            previous, last = last, chunk
    except (TimeoutError, aiohttp.SocketTimeoutError):
        result.error = "timeout"
        message = f"Backend '{backend}' stopped sending mid-stream (read timeout)."
        await send_stream_error(send, message, "upstream_timeout", last)
        return result
    except aiohttp.ClientError:
        result.error = "stream_broken"
        message = f"Backend '{backend}' closed the stream before it was complete."
        await send_stream_error(send, message, "upstream_stream_broken", last)
        return result
    if expects_done and b"[DONE]" not in previous[-16:] + last:
        result.error = "stream_broken"
        message = f"Backend '{backend}' ended the stream without [DONE]."
        await send_stream_error(send, message, "upstream_stream_broken", last)
        return result
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return result


async def send_stream_error(send: Send, message: str, code: str, last_chunk: bytes) -> None:
    # A half-sent event is closed first so the error is an event of its own.
    separator = b"" if last_chunk.endswith(_EVENT_ENDS) else b"\n\n"
    event = separator + b"data: " + error_body(message, "api_error", code) + b"\n\n"
    await send({"type": "http.response.body", "body": event, "more_body": False})
