"""The Realtime relay in-process: ``handle_websocket`` driven through ASGI messages, against
the fake Realtime upstream (and its hostile turns) on a local port."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from proxy import metrics, realtime
from proxy.access_log import AccessLog
from proxy.config import parse_config
from proxy.runtime import Runtime, build_runtime
from tests.realtime_upstream import CONFIG, LOG, make_app

UPSTREAM_KEY = "sk-rt-unit-00000000000000001"


class FakeClient:
    """The ASGI side of one client socket: what it sends in, what the proxy sends out."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[MutableMapping[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "websocket.connect"})

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.outbox.put_nowait(message)

    def say(self, event: dict[str, Any]) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(event)})

    async def next(self, timeout: float = 5.0) -> MutableMapping[str, Any]:
        return await asyncio.wait_for(self.outbox.get(), timeout)


def scope(
    query: bytes = b"model=rt", headers: list[tuple[bytes, bytes]] | None = None
) -> dict[str, Any]:
    return {
        "type": "websocket",
        "path": "/v1/realtime",
        "raw_path": b"/v1/realtime",
        "query_string": query,
        "headers": headers or [],
        "subprotocols": [],
        "client": ("127.0.0.1", 40000),
        "extensions": {"websocket.http.response": {}},
    }


@asynccontextmanager
async def upstream_and_runtime(
    keys: str = f'[{{id: main, key: "{UPSTREAM_KEY}"}}]',
) -> AsyncIterator[tuple[web.Application, Runtime]]:
    app = make_app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = f"""
backends:
  rt:
    base_url: http://127.0.0.1:{port}/v1
    keys: {keys}
    models: [rt]
"""
    runtime = build_runtime(parse_config(config, "t.yaml", {}))
    for upstream in runtime.upstreams.values():
        await upstream.start()
    try:
        yield app, runtime
    finally:
        for upstream in runtime.upstreams.values():
            await upstream.close()
        await runner.cleanup()


Session = Callable[[FakeClient, web.Application], Awaitable[None]]


def run_session(body: Session) -> str:
    """Run one session with ``body`` playing the client; returns the access log text."""

    async def run() -> str:
        out = io.StringIO()
        async with upstream_and_runtime() as (app, runtime):
            client = FakeClient()
            access_log = AccessLog(out=out)
            handler = asyncio.ensure_future(
                realtime.handle_websocket(runtime, access_log, scope(), client.receive, client.send)
            )
            try:
                accept = await client.next()
                assert accept["type"] == "websocket.accept"
                created = await client.next()
                assert json.loads(created["text"])["type"] == "session.created"
                await body(client, app)
                await asyncio.wait_for(handler, 5)
            finally:
                handler.cancel()
                access_log.flush()
        return out.getvalue()

    return asyncio.run(run())


def test_a_message_over_the_cap_from_the_upstream_closes_the_client_with_1009(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(realtime, "MAX_FRAME_SIZE", 64 * 1024)

    async def body(client: FakeClient, app: web.Application) -> None:
        client.say({"type": "test.big", "size": 1000})
        assert len((await client.next())["text"]) == 1000  # under the cap: relayed whole
        client.say({"type": "test.big", "size": 64 * 1024 + 1})
        close = await client.next()
        assert close["type"] == "websocket.close"
        assert close["code"] == 1009
        assert "larger than 65536 bytes" in close["reason"]

    log = run_session(body)
    assert "status=101" in log
    assert "error=upstream_message_too_big" in log


def test_an_upstream_that_vanishes_closes_the_client_with_1011_at_once() -> None:
    async def body(client: FakeClient, app: web.Application) -> None:
        client.say({"type": "test.vanish"})
        started = time.monotonic()
        close = await client.next()
        elapsed = time.monotonic() - started
        assert close["type"] == "websocket.close"
        assert close["code"] == 1011
        assert close["reason"] == "upstream connection lost"
        assert elapsed < 1.0

    log = run_session(body)
    assert "error=upstream_closed" in log


def test_an_upstream_that_stops_answering_pings_is_taken_for_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(realtime, "UPSTREAM_HEARTBEAT", 0.2)

    async def body(client: FakeClient, app: web.Application) -> None:
        client.say({"type": "test.silent"})
        started = time.monotonic()
        close = await client.next()
        assert close["type"] == "websocket.close"
        assert close["code"] == 1011
        assert time.monotonic() - started < 2.0  # heartbeat 0.2 s + half of it for the pong

    run_session(body)


def test_the_clients_close_code_and_reason_reach_the_upstream_and_frames_go_unchanged() -> None:
    async def body(client: FakeClient, app: web.Application) -> None:
        text = '{"type":"conversation.item.create", "x": "é ✓",  "spaces":  1}'
        client.inbox.put_nowait({"type": "websocket.receive", "text": text})
        assert (await client.next()) == {"type": "websocket.send", "text": text}
        blob = bytes(range(256)) * 3
        client.inbox.put_nowait({"type": "websocket.receive", "bytes": blob})
        assert (await client.next()) == {"type": "websocket.send", "bytes": blob}
        client.inbox.put_nowait({"type": "websocket.disconnect", "code": 4005, "reason": "done"})
        for _ in range(100):
            if app[LOG][0]["close_code"] is not None:
                break
            await asyncio.sleep(0.01)
        assert app[LOG][0]["close_code"] == 4005
        assert app[LOG][0]["close_reason"] == "done"

    run_session(body)


def test_the_upstreams_close_code_and_reason_reach_the_client() -> None:
    async def body(client: FakeClient, app: web.Application) -> None:
        client.say({"type": "test.close", "code": 4001, "reason": "session expired"})
        close = await client.next()
        assert close == {"type": "websocket.close", "code": 4001, "reason": "session expired"}

    run_session(body)


def test_a_refused_handshake_is_an_http_answer_in_openais_error_shape() -> None:
    async def run() -> list[MutableMapping[str, Any]]:
        async with upstream_and_runtime() as (_, runtime):
            client = FakeClient()
            await realtime.handle_websocket(
                runtime,
                AccessLog(out=io.StringIO()),
                scope(b"model=nope"),
                client.receive,
                client.send,
            )
            return [client.outbox.get_nowait() for _ in range(client.outbox.qsize())]

    start, body = asyncio.run(run())
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 404
    assert (b"content-type", b"application/json") in start["headers"]
    error = json.loads(body["body"])["error"]
    assert error["code"] == "model_not_found"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("query", "upstream_model", "expected"),
    [
        (b"model=fast", "gpt-realtime", "model=gpt-realtime"),
        (b"call_id=c1&model=a%2Fb&x=1", "m/1", "model=m%2F1&call_id=c1"),
        (b"model=a&model=b", "up", "model=up"),  # a second model never reaches the upstream
        (b"mod%65l=a&k=v+w", "up", "model=up"),
        # Issue 19: only the API's parameters go on, each once; never `deployment=`.
        (b"model=a&deployment=other&api-version=1", "up", "model=up"),
        (
            b"model=a&intent=transcription&call_id=c&call_id=d",
            "up",
            "model=up&intent=transcription&call_id=c",
        ),
    ],
)
def test_the_upstream_query_carries_the_upstream_model_and_the_apis_parameters_only(
    query: bytes, upstream_model: str, expected: str
) -> None:
    assert realtime.upstream_query(query, upstream_model) == expected


def test_subprotocols_the_key_never_goes_upstream_and_a_dialect_is_echoed() -> None:
    offered = ["realtime", "openai-insecure-api-key.sk-secret", "openai-project.p1"]
    assert realtime.upstream_protocols(offered) == ("realtime",)
    assert realtime.accepted_protocol(offered, "realtime") == "realtime"
    assert realtime.accepted_protocol(offered, None) == "realtime"  # upstream named none
    assert realtime.accepted_protocol(["openai-insecure-api-key.k"], None) is None
    beta = ["openai-beta.realtime-v1", "openai-insecure-api-key.k"]
    assert realtime.accepted_protocol(beta, None) == "openai-beta.realtime-v1"


KEY_1, KEY_2 = "sk-rt-unit-1111111111111111", "sk-rt-unit-2222222222222222"
TWO_KEYS = f'[{{id: k1, key: "{KEY_1}"}}, {{id: k2, key: "{KEY_2}"}}]'


def test_a_429_at_the_handshake_cools_the_key_down_and_the_other_key_serves() -> None:
    async def run() -> tuple[list[dict[str, Any]], list[tuple[Any, Any]], str]:
        async with upstream_and_runtime(TWO_KEYS) as (app, runtime):
            app[CONFIG]["limited_keys"] = {KEY_1: 30}
            outcomes = []
            for _ in range(2):  # whichever key round-robin picks first
                client = FakeClient()
                handler = asyncio.ensure_future(
                    realtime.handle_websocket(
                        runtime, AccessLog(out=io.StringIO()), scope(), client.receive, client.send
                    )
                )
                outcomes.append((await client.next())["type"])
                client.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
                await asyncio.wait_for(handler, 5)
            pool = runtime.pools["rt"]
            states: list[tuple[Any, Any]] = [
                (pool.state_of("k1").value, round(pool.cooldown_left("k1")))
            ]
            app[CONFIG]["limited_keys"] = {KEY_1: 30, KEY_2: 7}
            client = FakeClient()
            await realtime.handle_websocket(
                runtime, AccessLog(out=io.StringIO()), scope(), client.receive, client.send
            )
            start = await client.next()
            states.append((start["status"], dict(start["headers"]).get(b"retry-after")))
            entries: list[dict[str, Any]] = app[LOG]
            return list(entries), states, ",".join(outcomes)

    log, states, outcomes = asyncio.run(run())
    assert outcomes == "websocket.accept,websocket.accept"
    assert [(e["key"], e["status"]) for e in log if e["status"] == 101] == [(KEY_2, 101)] * 2
    assert (KEY_1, 429) in [(e["key"], e["status"]) for e in log]
    assert states[0] == ("cooldown", 30)  # the upstream's retry-after
    assert states[1] == (429, b"7")  # every key limited: the client is told when to retry


def test_a_client_that_leaves_during_the_upstream_handshake_cancels_it() -> None:
    async def run() -> tuple[float, str, list[MutableMapping[str, Any]]]:
        out = io.StringIO()
        async with upstream_and_runtime() as (app, runtime):
            app[CONFIG]["handshake_delay"] = 3
            client = FakeClient()
            access_log = AccessLog(out=out)
            handler = asyncio.ensure_future(
                realtime.handle_websocket(runtime, access_log, scope(), client.receive, client.send)
            )
            while not app[LOG]:  # the upstream has the handshake
                await asyncio.sleep(0.01)
            started = time.monotonic()
            client.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})
            await asyncio.wait_for(handler, 2)
            elapsed = time.monotonic() - started
            access_log.flush()
            sent = [client.outbox.get_nowait() for _ in range(client.outbox.qsize())]
            return elapsed, out.getvalue(), sent

    elapsed, log, sent = asyncio.run(run())
    assert elapsed < 0.5  # not the 3 s the upstream takes
    assert sent == []  # nothing accepted, nothing answered: nobody is listening
    assert "status=499" in log and "error=client_disconnected" in log


def counter(metric: Any, *labels: str) -> float:
    value: float = metric.labels(*labels)._value.get()
    return value


def test_frame_and_byte_counters_catch_up_while_the_session_idles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(realtime, "TALLY_INTERVAL", 0.1)
    up = ("rt", "rt", "client_to_upstream")
    frames_before = counter(metrics.REALTIME_FRAMES, *up)
    bytes_before = counter(metrics.REALTIME_BYTES, *up)
    texts = ['{"type":"a"}', '{"type":"é"}', '{"type":"ccc"}']

    async def body(client: FakeClient, app: web.Application) -> None:
        for text in texts:
            client.inbox.put_nowait({"type": "websocket.receive", "text": text})
            await client.next()  # its echo
        await asyncio.sleep(0.3)  # idle, the session still open
        assert counter(metrics.REALTIME_FRAMES, *up) == frames_before + 3
        assert counter(metrics.REALTIME_BYTES, *up) == bytes_before + sum(
            len(t.encode()) for t in texts
        )
        client.inbox.put_nowait({"type": "websocket.receive", "bytes": b"12345"})
        await client.next()
        client.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})

    run_session(body)
    assert counter(metrics.REALTIME_FRAMES, *up) == frames_before + 4  # flushed at the end
    assert counter(metrics.REALTIME_BYTES, *up) == bytes_before + 5 + sum(
        len(t.encode()) for t in texts
    )


def test_without_the_http_response_extension_a_refusal_is_a_close_naming_the_reason() -> None:
    async def run() -> list[MutableMapping[str, Any]]:
        async with upstream_and_runtime() as (_, runtime):
            client = FakeClient()
            bare = {**scope(b"model=nope"), "extensions": {}}
            await realtime.handle_websocket(
                runtime, AccessLog(out=io.StringIO()), bare, client.receive, client.send
            )
            return [client.outbox.get_nowait() for _ in range(client.outbox.qsize())]

    [close] = asyncio.run(run())
    assert close["type"] == "websocket.close"
    assert close["code"] == 1008  # policy: the client's request, not our failure
    assert close["reason"].startswith("The model 'nope' is not routed by this proxy.")
    assert len(close["reason"].encode()) <= 123
