"""A streamed answer's object ids are recorded before the client hears of them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from proxy import forward
from proxy.failover import RequestParts
from proxy.objects import MAX_IDS


class _Store:
    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def remember(
        self, ids: Sequence[str], backend: str, key_id: str, owner: str | None = None
    ) -> None:
        self.events.append(f"remember {','.join(ids)} {backend}/{key_id}")


def test_a_responses_stream_records_its_id_before_the_event_reaches_the_client() -> None:
    events: list[str] = []
    runtime: Any = SimpleNamespace(objects=_Store(events), breakers={"b": None})
    exchange: Any = SimpleNamespace(record=None)
    delivery: Any = SimpleNamespace(target=SimpleNamespace(backend="b"), key_id="k2")
    parts = RequestParts("POST", "/responses", "", [], {"model": "m"}, b"", "m")

    async def send(message: dict[str, Any]) -> None:
        events.append("send")

    relay = forward._Relay(runtime, send, exchange, delivery, parts)
    created = (
        b'event: response.created\ndata: {"type":"response.created","response":'
        b'{"id":"resp_abc","object":"response"}}\n\n'
    )
    asyncio.run(relay._recording_ids(send)({"type": "http.response.body", "body": created}))
    assert events == ["remember resp_abc b/k2", "send"]


def test_a_stream_records_at_most_max_ids_however_many_objects_it_claims() -> None:
    events: list[str] = []
    runtime: Any = SimpleNamespace(objects=_Store(events), breakers={"b": None})
    exchange: Any = SimpleNamespace(record=None)
    delivery: Any = SimpleNamespace(target=SimpleNamespace(backend="b"), key_id="k2")
    parts = RequestParts("POST", "/responses", "", [], {"model": "m"}, b"", "m")
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["body"])

    relay = forward._Relay(runtime, send, exchange, delivery, parts)
    recording = relay._recording_ids(send)

    async def flood() -> None:
        for i in range(3 * MAX_IDS):
            event = (
                b'data: {"type":"response.created","response":'
                b'{"id":"resp_%d","object":"response"}}\n\n' % i
            )
            await recording({"type": "http.response.body", "body": event})

    asyncio.run(flood())
    remembered = [e for e in events if e.startswith("remember")]
    assert len(remembered) == MAX_IDS
    assert remembered[-1] == f"remember resp_{MAX_IDS - 1} b/k2"
    assert len(sent) == 3 * MAX_IDS  # every event still reaches the client
