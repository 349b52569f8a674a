"""CPU per relayed event, usage-event stripping off and on: ``python bench/relay_strip.py``.

In-process (a fake upstream response, a send that does nothing), a 1,000-event chat stream,
event-aligned chunks and the same bytes cut at 1,000 random points; time.process_time over
a loop bounded to 2 s per figure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import orjson

from proxy.streaming import StreamKind, relay_stream


def chat_stream(events: int = 1000) -> list[bytes]:
    out = []
    for i in range(events - 2):
        body = {
            "id": "chatcmpl-abc123",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "system_fingerprint": "fp_0",
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
            "usage": None,
        }
        out.append(b"data: " + orjson.dumps(body) + b"\n\n")
    usage = {"prompt_tokens": 10, "completion_tokens": events, "total_tokens": events + 10}
    out.append(b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class _Response:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)


async def _send(message: Any) -> None:
    pass


def micros_per_event(chunks: list[bytes], events: int, strip: bool, seconds: float = 2.0) -> float:
    async def loop() -> float:
        runs = 0
        started, deadline = time.process_time(), time.monotonic() + seconds
        while time.monotonic() < deadline and runs < 5000:
            response = cast(aiohttp.ClientResponse, _Response(chunks))
            await relay_stream(
                response, _send, "b", StreamKind.DONE_TERMINATED, strip_usage_event=strip
            )
            runs += 1
        return (time.process_time() - started) / runs / events * 1e6

    return asyncio.run(loop())


def main() -> None:
    aligned = chat_stream()
    data = b"".join(aligned)
    points = sorted(random.Random(1).sample(range(1, len(data)), 1000))
    cut = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    for label, chunks in (("one event per chunk", aligned), ("1000 random cuts", cut)):
        off = micros_per_event(chunks, len(aligned), strip=False)
        on = micros_per_event(chunks, len(aligned), strip=True)
        print(f"{label:20s}  strip off {off:.2f} µs/event   strip on {on:.2f} µs/event")


if __name__ == "__main__":
    main()
