"""Server-sent events for the translation tests: a chat chunk as an SSE event, and the
typed events (``event:`` line, then ``data:``) a translated stream is read back as."""

from __future__ import annotations

from typing import Any

import orjson


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def events_of(data: bytes) -> list[dict[str, Any]]:
    """Each event's data; its ``event:`` line must name its ``type``."""
    found = []
    for block in data.split(b"\n\n"):
        if not block:
            continue
        kind, payload = block.split(b"\n", 1)
        event = orjson.loads(payload.removeprefix(b"data: "))
        assert kind == b"event: " + event["type"].encode()
        found.append(event)
    return found
