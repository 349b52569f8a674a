"""The forwarding pipeline in-process: ``ProxyApp`` driven as an ASGI app (httpx's
ASGITransport) in front of a fake upstream served by aiohttp in the same event loop.

No process is started, so these run in milliseconds and cover the hot path (forward,
failover, streaming, key health) under ``pytest -m "not e2e"``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import orjson
from aiohttp import web

from proxy.app import ProxyApp
from proxy.config import parse_config

KEY_1 = "sk-pipe-1111111111111111"
KEY_2 = "sk-pipe-2222222222222222"
KEY_BACKUP = "sk-pipe-bbbbbbbbbbbbbbbb"
ADMIN = "admin-pipe-secret-0000"

CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "m-1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
# Deliberately split mid-event and mid-line: the relay must not re-chunk or re-frame.
STREAM_CHUNKS = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"He',
    b'llo"}}]}\n\ndata: {"id":"c1","choices":[{"index":0,"delta":{"content":" world"}}]}\n',
    b'\n: a comment line\n\ndata: {"id":"c1","choices":[],"usage":{"prompt_tokens":2,',
    b'"completion_tokens":2}}\n\ndata: [DONE]\n\n',
)


@dataclass
class Seen:
    """One request the fake upstream received."""

    path: str
    authorization: str
    body: dict[str, object]


Answer = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


@dataclass
class FakeUpstream:
    """An upstream on 127.0.0.1 whose answer to each POST is ``answer`` (set per test)."""

    url: str = ""
    answer: Answer | None = None
    seen: list[Seen] = field(default_factory=list)
    refused_keys: set[str] = field(default_factory=set)  # GET /models with them: 401
    probes: list[str] = field(default_factory=list)  # the authorization of each GET

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":  # the runtime's start-up check and probes
            auth = request.headers.get("authorization", "")
            self.probes.append(auth)
            if auth.removeprefix("Bearer ") in self.refused_keys:
                error = {"message": "Incorrect API key", "code": "invalid_api_key"}
                return web.json_response({"error": error}, status=401)
            return web.json_response({"object": "list", "data": [{"id": "m-1"}]})
        seen = Seen(request.path, request.headers.get("authorization", ""), await request.json())
        self.seen.append(seen)
        assert self.answer is not None
        return await self.answer(request, seen)

    def posts(self, path_prefix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(path_prefix)]


@asynccontextmanager
async def fake_upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


def config_text(upstream: str) -> str:
    """``m-*`` on ``main`` (two keys) falling back to ``backup``; ``lone-*`` on a backend
    with one key and no fallback."""
    return f"""
server: {{routing_headers: true, config_poll_interval: 0, admin_key: {ADMIN}}}
throttle: {{reconnect: {{enabled: false}}}}
backends:
  main:
    base_url: {upstream}/v1
    keys: [{{id: k1, key: {KEY_1}}}, {{id: k2, key: {KEY_2}}}]
    timeout: {{connect: 2, read: 5}}
  backup:
    base_url: {upstream}/backup/v1
    keys: [{{id: kb, key: {KEY_BACKUP}}}]
  lone:
    base_url: {upstream}/lone/v1
    keys: [{{id: kl, key: {KEY_1}}}]
routes:
  - {{prefix: "m-", backend: main, fallback: [{{backend: backup}}]}}
  - {{prefix: "lone-", backend: lone}}
"""


@asynccontextmanager
async def proxy_in_front_of(
    fake: FakeUpstream, text: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A ``ProxyApp`` with its runtime started (what the lifespan does), and a client; its
    config ``text``, or ``config_text``'s."""
    text = text if text is not None else config_text(fake.url)
    app = ProxyApp(parse_config(text, "pipeline.yaml", {}))
    app.access_log.enabled = False
    await app.runtime.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            yield client
    finally:
        await app.runtime.close()


def chat(model: str, stream: bool = False) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:  # the client asks for usage: it gets the stream exactly as sent
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def key_states(client: httpx.AsyncClient, backend: str) -> dict[str, dict[str, object]]:
    page = await client.get("/admin/status", headers={"authorization": f"Bearer {ADMIN}"})
    assert page.status_code == 200
    return {k["id"]: k for k in page.json()["backends"][backend]["keys"]}


def run(scenario: Callable[[FakeUpstream], Awaitable[None]]) -> None:
    async def main() -> None:
        async with fake_upstream() as fake:
            await asyncio.wait_for(scenario(fake), timeout=10)

    asyncio.run(main())


# ---------------------------------------------------------------- the tests


def test_a_json_answer_is_relayed_as_is_with_the_routing_headers() -> None:
    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.json_response(CHAT_ANSWER, headers={"x-request-id": "up-123"})

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            response = await client.post(
                "/v1/chat/completions",
                json=chat("m-1"),
                headers={"authorization": "Bearer client-key-not-forwarded"},
            )
        assert response.status_code == 200
        assert response.json() == CHAT_ANSWER
        assert response.headers["x-proxy-backend"] == "main"
        assert response.headers["x-proxy-model"] == "m-1"
        assert response.headers["x-proxy-key"] == "k1"
        assert response.headers["x-request-id"] == "up-123"  # the provider's id is kept
        [seen] = fake.posts()
        assert seen.path == "/v1/chat/completions"
        assert seen.authorization == f"Bearer {KEY_1}"  # the backend's key, not the client's
        assert seen.body == chat("m-1")

    run(scenario)


def test_a_stream_is_relayed_byte_for_byte() -> None:
    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in STREAM_CHUNKS:
            await response.write(chunk)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            response = await client.post("/v1/chat/completions", json=chat("m-1", stream=True))
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-proxy-backend"] == "main"
        assert response.content == b"".join(STREAM_CHUNKS)

    run(scenario)


def test_a_refused_key_is_taken_out_and_the_client_gets_503_no_usable_key() -> None:
    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        error = {"message": "Incorrect API key", "type": "invalid_request_error"}
        body = {"error": error | {"code": "invalid_api_key"}}
        return web.json_response(body, status=401)

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        fake.refused_keys = {KEY_1}  # really revoked: the confirming probe is refused too
        async with proxy_in_front_of(fake) as client:
            first = await client.post("/v1/chat/completions", json=chat("lone-1"))
            states = await key_states(client, "lone")
            for _ in range(100):  # the confirming probe runs in the background
                if states["kl"]["state"] == "invalid":
                    break
                await asyncio.sleep(0.02)
                states = await key_states(client, "lone")
            second = await client.post("/v1/chat/completions", json=chat("lone-1"))
        for response in (first, second):
            assert response.status_code == 503  # never the upstream's 401: the client's key is fine
            assert response.json()["error"]["code"] == "no_usable_key"
            assert response.headers["x-should-retry"] == "false"
        assert "'kl'" in first.json()["error"]["message"]
        assert KEY_1 not in first.text + second.text
        assert states["kl"]["state"] == "invalid"
        assert str(states["kl"]["last_error"]).startswith("401 from upstream: Incorrect API key")
        assert "confirmed by GET /models (401)" in str(states["kl"]["last_error"])
        assert len(fake.posts()) == 1  # the second request never reached the upstream

    run(scenario)


MISSING_SCOPE = {
    "error": {
        "message": "You have insufficient permissions for this operation. Missing scopes: "
        "api.batch.write.",
        "type": "invalid_request_error",
        "param": None,
        "code": "missing_scope",
    }
}


def test_a_missing_scope_401_is_relayed_and_changes_no_key() -> None:
    """The issue's attack: one client's request outside a restricted key's scopes. Before,
    both keys were marked invalid (the retry burnt the second) and everyone got 503."""

    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.body.get("scoped"):
            return web.json_response(MISSING_SCOPE, status=401)
        return web.json_response(CHAT_ANSWER)

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            refused = await client.post("/v1/chat/completions", json=chat("m-1") | {"scoped": 1})
            await asyncio.sleep(0.1)  # a probe, if one were started, would be done
            states = await key_states(client, "main")
            others = [await client.post("/v1/chat/completions", json=chat("m-1")) for _ in "ab"]
        assert refused.status_code == 401
        assert refused.json() == MISSING_SCOPE  # the upstream's answer, unchanged
        assert [r.status_code for r in others] == [200, 200]
        assert {r.headers["x-proxy-key"] for r in others} == {"k1", "k2"}  # both still serve
        assert [states[k]["state"] for k in ("k1", "k2")] == ["ok", "ok"]
        assert [states[k]["last_error"] for k in ("k1", "k2")] == [None, None]
        assert len(fake.posts()) == 3  # no retry on the second key, no fallback
        assert f"Bearer {KEY_2}" not in fake.probes  # and no confirming probe either

    run(scenario)


def test_a_401_the_probe_does_not_confirm_changes_no_key() -> None:
    """A 401 that says "invalid key" while the key itself answers GET /models: the request
    is retried once on the other key; the first key stays in rotation; a second such 401
    within the interval starts no second probe."""

    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.authorization == f"Bearer {KEY_1}" and seen.body.get("poison"):
            error = {"message": "Incorrect API key", "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=401)
        return web.json_response(CHAT_ANSWER)

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            await asyncio.sleep(0.05)  # the start-up check's GET is done
            before = len(fake.probes)
            answers = []
            for _ in range(4):
                answers.append(
                    await client.post("/v1/chat/completions", json=chat("m-1") | {"poison": 1})
                )
                await asyncio.sleep(0.05)
            states = await key_states(client, "main")
        assert [r.status_code for r in answers] == [200] * 4
        assert [states[k]["state"] for k in ("k1", "k2")] == ["ok", "ok"]
        assert fake.probes[before:] == [f"Bearer {KEY_1}"]  # one probe, that key alone

    run(scenario)


def test_a_500_falls_back_to_the_second_backend() -> None:
    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.path.startswith("/backup/"):
            return web.json_response(CHAT_ANSWER)
        return web.json_response({"error": {"message": "boom", "type": "server_error"}}, status=500)

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            response = await client.post("/v1/chat/completions", json=chat("m-1"))
        assert response.status_code == 200
        assert response.json() == CHAT_ANSWER
        assert response.headers["x-proxy-backend"] == "backup"
        assert response.headers["x-proxy-key"] == "kb"
        paths = [(s.path, s.authorization) for s in fake.posts()]
        assert paths == [
            ("/v1/chat/completions", f"Bearer {KEY_1}"),  # a 5xx: no second key, a fallback
            ("/backup/v1/chat/completions", f"Bearer {KEY_BACKUP}"),
        ]

    run(scenario)


def test_a_model_answering_5xx_opens_its_own_circuit_and_its_backend_serves_the_others() -> None:
    """A broken (or retired) model: its 5xx open that model's circuit only (issue 19)."""

    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.body["model"] == "lone-broken":
            error = {"message": "model crashed", "type": "server_error"}
            return web.json_response({"error": error}, status=500)
        return web.json_response(CHAT_ANSWER)

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            statuses = [
                (await client.post("/v1/chat/completions", json=chat("lone-broken"))).status_code
                for _ in range(5)  # the default breaker: 5 failures in a row
            ]
            assert statuses == [500] * 5  # the upstream's own answers, relayed
            sent = len(fake.posts())
            refused = await client.post("/v1/chat/completions", json=chat("lone-broken"))
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "backend_unavailable"
            assert "Model 'lone-broken' on backend 'lone'" in refused.json()["error"]["message"]
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            assert len(fake.posts()) == sent  # nothing sent while it is open
            for _ in range(3):  # the backend's other models: served all along
                fine = await client.post("/v1/chat/completions", json=chat("lone-fine"))
                assert fine.status_code == 200
            page = await client.get("/admin/status", headers={"authorization": f"Bearer {ADMIN}"})
            breaker = page.json()["backends"]["lone"]["breaker"]
            assert breaker["state"] == "closed"
            assert list(breaker["models_open"]) == ["lone-broken"]

    run(scenario)


def test_a_stream_cut_mid_way_ends_with_an_error_event() -> None:
    first_event = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'

    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first_event)
        await asyncio.sleep(0.05)  # the chunk leaves before the connection is dropped
        assert request.transport is not None
        request.transport.close()  # no terminating chunk: the upstream died mid-stream
        return response

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            response = await client.post("/v1/chat/completions", json=chat("m-1", stream=True))
        assert response.status_code == 200  # the head had gone out already
        assert response.content.startswith(first_event)
        tail = response.content[len(first_event) :]
        assert tail.startswith(b"data: ") and tail.endswith(b"\n\n")
        error = orjson.loads(tail[len(b"data: ") :])["error"]
        assert error["type"] == "api_error"
        assert error["code"] == "upstream_stream_broken"
        assert "main" in error["message"] and "before it was complete" in error["message"]
        assert b"[DONE]" not in response.content  # the SDK must not see a clean end
        assert len(fake.posts()) == 1  # no retry once bytes reached the client

    run(scenario)


def test_a_429_with_retry_after_cools_the_key_down_and_the_other_key_serves() -> None:
    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.authorization == f"Bearer {KEY_1}":
            body = {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}
            return web.json_response(body, status=429, headers={"retry-after": "30"})
        return web.json_response(CHAT_ANSWER)

    async def scenario(fake: FakeUpstream) -> None:
        fake.answer = answer
        async with proxy_in_front_of(fake) as client:
            first = await client.post("/v1/chat/completions", json=chat("m-1"))
            second = await client.post("/v1/chat/completions", json=chat("m-1"))
            states = await key_states(client, "main")
        assert first.status_code == second.status_code == 200
        assert first.headers["x-proxy-key"] == second.headers["x-proxy-key"] == "k2"
        used = [s.authorization for s in fake.posts()]
        # k1 once (its 429), then k2 for that request and the next: k1 is cooling down.
        assert used == [f"Bearer {KEY_1}", f"Bearer {KEY_2}", f"Bearer {KEY_2}"]
        assert states["k1"]["state"] == "cooldown"
        assert 29.0 <= float(states["k1"]["cooldown_seconds"]) <= 30.0  # type: ignore[arg-type]
        assert states["k2"]["state"] == "ok"

    run(scenario)
