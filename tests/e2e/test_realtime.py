"""Realtime through a real ``proxy serve``: the openai SDK's ``client.realtime.connect`` and
a plain WebSocket client (the browser's subprotocol path) against the fake Realtime
upstream, which tells which key, model and subprotocols each handshake came with."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    KEY_A,
    KEY_B,
    KEY_OTHER,
    ProxyProcess,
    free_port,
    keep,
    read_listening_port,
    start_proxy,
)

ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY = "sk-rt-client-000000000000000c1"
BROWSER_KEY = "sk-rt-browser-00000000000000b2"


@dataclass
class RealtimeUpstream:
    port: int
    process: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = httpx.get(f"{self.url}/_rt/log").json()
        return entries

    def reset(self) -> None:
        httpx.delete(f"{self.url}/_rt/log").raise_for_status()

    def configure(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_rt/config", json=settings).raise_for_status()


@pytest.fixture(scope="module")
def rt_upstream() -> Iterator[RealtimeUpstream]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "realtime_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    keep(process)
    upstream = RealtimeUpstream(read_listening_port(process, "realtime upstream"), process)
    yield upstream
    process.terminate()
    process.wait(timeout=5)


def config(upstream: RealtimeUpstream, admin_port: int) -> str:
    return f"""
server:
  routing_headers: true
  admin_port: {admin_port}
  body_timeout: 1   # a Realtime session must outlive the HTTP body timer
throttle:
  reconnect: {{enabled: false}}
clients:
  - {{id: team, key: "{CLIENT_KEY}"}}
  - {{id: browser, key: "{BROWSER_KEY}", models: ["gpt-realtime*"]}}
backends:
  rt:
    base_url: {upstream.url}/v1
    keys:
      - {{id: key-a, key: "{KEY_A}"}}
      - {{id: key-b, key: "{KEY_B}"}}
    headers: {{X-Backend-Extra: "yes"}}
    models: [gpt-realtime-2025]
  solo:
    base_url: {upstream.url}/solo/v1
    keys: [{{id: solo-main, key: "{KEY_OTHER}"}}]
aliases:
  fast-rt: gpt-realtime-2025
routes:
  - {{prefix: "gpt-realtime", backend: rt}}
  - {{prefix: "solo-", backend: solo, strip_prefix: true}}
  - {{prefix: "other-", backend: rt}}
"""


@pytest.fixture(scope="module")
def rt_proxy(
    rt_upstream: RealtimeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(config(rt_upstream, free_port()), tmp_path_factory.mktemp("rt"))
    yield process
    process.stop()


@pytest.fixture
def upstream(rt_upstream: RealtimeUpstream) -> RealtimeUpstream:
    rt_upstream.reset()
    return rt_upstream


def ws_url(proxy: ProxyProcess, model: str) -> str:
    return f"ws://127.0.0.1:{proxy.port}/v1/realtime?model={model}"


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """The value of one series on /metrics (0 when absent)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in httpx.get(f"http://127.0.0.1:{admin_port(proxy)}/metrics").text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name and wanted <= set((match[2] or "").split(",")):
            return float(match[3])
    return 0.0


def admin_port(proxy: ProxyProcess) -> int:
    match = re.search(r"admin_port: (\d+)", (proxy.log_path.parent / "config.yaml").read_text())
    assert match is not None
    return int(match[1])


def wait_for(condition: Any, timeout: float = 3.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    asyncio.run(asyncio.wait_for(poll(), timeout))


def access_records(proxy: ProxyProcess) -> list[dict[str, Any]]:
    """The access-log records of Realtime sessions (the log is JSON when not a terminal)."""
    records = []
    for line in proxy.log().splitlines():
        if line.startswith("{") and '"path":"/v1/realtime"' in line:
            records.append(json.loads(line))
    return records


def test_the_sdk_session_sends_receives_and_closes_through_the_proxy(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    labels = {"backend": "rt", "model": "gpt-realtime-2025"}
    prompt_before = metric(rt_proxy, "llm_proxy_tokens_total", type="prompt", **labels)
    sessions_before = metric(
        rt_proxy, "llm_proxy_realtime_session_duration_seconds_count", **labels
    )
    frames_up_before = metric(
        rt_proxy, "llm_proxy_realtime_frames_total", direction="client_to_upstream", **labels
    )

    async def session() -> tuple[dict[str, Any], dict[str, Any], Any, float]:
        client = AsyncOpenAI(base_url=rt_proxy.base_url, api_key=CLIENT_KEY, max_retries=0)
        # Issue 19: a parameter the API does not define (`deployment=`) never goes upstream.
        extra = {"deployment": "other", "call_id": "c1"}
        async with client.realtime.connect(model="fast-rt", extra_query=extra) as conn:
            created = json.loads(await conn.recv_bytes())
            event = {"type": "conversation.item.create", "item": {"type": "message", "x": "é"}}
            await conn.send_raw(json.dumps(event))
            echoed = json.loads(await conn.recv_bytes())
            await asyncio.sleep(1.3)  # longer than server.body_timeout: still open
            await conn.response.create()
            done = await conn.recv()
            active = metric(rt_proxy, "llm_proxy_realtime_sessions_active", backend="rt")
        return created, echoed, done, active

    created, echoed, done, active = asyncio.run(session())
    assert created == {"type": "session.created", "session": {"model": "gpt-realtime-2025"}}
    assert echoed == {"type": "conversation.item.create", "item": {"type": "message", "x": "é"}}
    assert done.type == "response.done"
    assert done.response.usage.input_tokens == 11
    assert active == 1

    wait_for(lambda: upstream.log()[-1]["close_code"] is not None)
    [seen] = upstream.log()
    assert seen["key"] in (KEY_A, KEY_B)  # the backend's key, never the client's
    assert seen["query"] == "model=gpt-realtime-2025&call_id=c1"  # the alias applied
    assert seen["path"] == "/v1/realtime"
    assert seen["extra"] == "yes"
    assert seen["openai_beta"] is None  # the GA SDK sends none
    assert seen["close_code"] == 1000
    assert seen["received"] == 2

    assert metric(rt_proxy, "llm_proxy_tokens_total", type="prompt", **labels) == (
        prompt_before + 11
    )
    assert metric(rt_proxy, "llm_proxy_tokens_total", type="completion", **labels) >= 7
    assert metric(rt_proxy, "llm_proxy_realtime_sessions_active", backend="rt") == 0
    assert metric(rt_proxy, "llm_proxy_realtime_session_duration_seconds_count", **labels) == (
        sessions_before + 1
    )
    assert metric(
        rt_proxy, "llm_proxy_realtime_frames_total", direction="client_to_upstream", **labels
    ) == (frames_up_before + 2)
    assert (
        metric(rt_proxy, "llm_proxy_realtime_bytes_total", direction="upstream_to_client", **labels)
        > 0
    )
    assert metric(rt_proxy, "llm_proxy_requests_total", status="101", client="team") >= 1

    wait_for(lambda: any(r["prompt_tokens"] == 11 for r in access_records(rt_proxy)))
    record = next(r for r in access_records(rt_proxy) if r["prompt_tokens"] == 11)
    assert record["status"] == 101 and record["method"] == "GET"
    assert record["client"] == "team" and record["completion_tokens"] == 7
    assert record["backend"] == "rt" and record["key"] in ("key-a", "key-b")
    assert record["model"] == "fast-rt" and record["upstream_model"] == "gpt-realtime-2025"
    assert record["duration_ms"] >= 1300 and record["error"] is None
    for secret in (KEY_A, KEY_B, CLIENT_KEY):
        assert secret not in rt_proxy.log()


def test_close_codes_and_reasons_cross_both_ways(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def upstream_closes() -> tuple[int, str]:
        async with connect(ws_url(rt_proxy, "gpt-realtime-2025"), additional_headers=auth) as ws:
            await ws.recv()  # session.created
            await ws.send(json.dumps({"type": "test.close", "code": 4001, "reason": "bye now"}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        return closed.value.rcvd.code, closed.value.rcvd.reason

    assert asyncio.run(upstream_closes()) == (4001, "bye now")

    async def client_closes() -> None:
        beta = {**auth, "OpenAI-Beta": "realtime=v1"}
        async with connect(ws_url(rt_proxy, "gpt-realtime-2025"), additional_headers=beta) as ws:
            await ws.recv()
            await ws.send(b"\x00\x01binary\xff")
            assert await ws.recv() == b"\x00\x01binary\xff"  # binary stays binary, unchanged
            await ws.close(code=4002, reason="client is done")

    asyncio.run(client_closes())
    wait_for(lambda: upstream.log()[-1]["close_code"] is not None)
    assert upstream.log()[-1]["close_code"] == 4002
    assert upstream.log()[-1]["close_reason"] == "client is done"
    assert upstream.log()[-1]["openai_beta"] == "realtime=v1"  # the beta dialect passed on


def test_a_key_the_upstream_echoes_in_a_message_or_close_reason_is_scrubbed(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    """The fake upstream echoes what it gets: standing in for one that echoes the key it
    was opened with (an error event quoting it), in text, binary and a close reason."""
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def session() -> tuple[str, bytes, str]:
        async with connect(ws_url(rt_proxy, "gpt-realtime-2025"), additional_headers=auth) as ws:
            await ws.recv()  # session.created
            await ws.send(json.dumps({"type": "error", "message": f"bad key {KEY_A}"}))
            text = await ws.recv()
            await ws.send(b"\x00" + KEY_B.encode())
            data = await ws.recv()
            await ws.send(json.dumps({"type": "test.close", "code": 4001, "reason": KEY_A}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        return str(text), bytes(data), closed.value.rcvd.reason

    text, data, reason = asyncio.run(session())
    for secret in (KEY_A, KEY_B):
        assert secret not in text and secret.encode() not in data and secret not in reason
    assert text.startswith('{"type": "error", "message": "bad key sk-')
    assert data.startswith(b"\x00sk-") and reason.startswith("sk-")


def test_the_browser_subprotocol_key_authenticates_and_never_goes_upstream(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    protocols = ["realtime", f"openai-insecure-api-key.{BROWSER_KEY}"]

    async def session() -> tuple[str | None, str]:
        async with connect(
            ws_url(rt_proxy, "gpt-realtime-2025"),
            subprotocols=protocols,  # type: ignore[arg-type]
        ) as ws:
            await ws.recv()
            await ws.send('{"type":"ping-me"}')
            return ws.subprotocol, str(await ws.recv())

    subprotocol, echoed = asyncio.run(session())
    assert subprotocol == "realtime"  # echoed, or a browser drops the socket
    assert echoed == '{"type":"ping-me"}'
    [seen] = upstream.log()
    assert seen["protocols"] == ["realtime"]  # the key stayed in the proxy
    assert seen["key"] in (KEY_A, KEY_B)
    assert BROWSER_KEY not in rt_proxy.log()

    async def refused(protocols: list[str], model: str) -> tuple[int, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(rt_proxy, model), subprotocols=protocols):  # type: ignore[arg-type]
                pass
        response = info.value.response
        return response.status_code, json.loads(response.body or b"{}")

    status, body = asyncio.run(refused(["realtime", "openai-insecure-api-key.sk-wrong"], "x"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # The browser's client may use gpt-realtime* only: another routable model is refused.
    status, body = asyncio.run(refused(protocols, "other-model"))
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    assert len(upstream.log()) == 1  # refusals never reached the upstream


def test_handshake_refusals_are_openai_errors(rt_proxy: ProxyProcess) -> None:
    async def refused(url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=headers):
                pass
        response = info.value.response
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"]
        return response.status_code, json.loads(response.body or b"{}")

    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    base = f"ws://127.0.0.1:{rt_proxy.port}/v1/realtime"
    cases = [
        (f"{base}?model=gpt-realtime-2025", {}, 401, "invalid_api_key"),
        (f"{base}?model=unknown-model", auth, 404, "model_not_found"),
        (base, auth, 400, "missing_model"),
        (f"ws://127.0.0.1:{rt_proxy.port}/v1/realtime/x?model=fast-rt", auth, 404, "unknown_url"),
    ]
    for url, headers, status, code in cases:
        got_status, body = asyncio.run(refused(url, headers))
        assert (got_status, body["error"]["code"]) == (status, code), url
        assert set(body["error"]) == {"message", "type", "param", "code"}


def test_a_key_the_upstream_refuses_at_the_handshake_is_taken_out_and_the_client_told(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    upstream.configure(invalid_keys=[KEY_OTHER])
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def refused() -> tuple[int, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(rt_proxy, "solo-rt"), additional_headers=auth):
                pass
        return info.value.response.status_code, json.loads(info.value.response.body or b"{}")

    status, body = asyncio.run(refused())
    assert status == 503
    assert body["error"]["code"] == "no_usable_key"
    assert "'solo-main'" in body["error"]["message"]
    assert "your own key is fine" in body["error"]["message"]
    assert [e["key"] for e in upstream.log()] == [KEY_OTHER]
    assert upstream.log()[0]["query"] == "model=rt"  # the route's prefix stripped
    assert metric(rt_proxy, "llm_proxy_key_usable", backend="solo", key="solo-main") == 0

    status, body = asyncio.run(refused())  # out of rotation: the upstream is not asked again
    assert status == 503 and body["error"]["code"] == "no_usable_key"
    assert len(upstream.log()) == 1
    assert KEY_OTHER not in rt_proxy.log()


def test_the_other_key_serves_when_one_is_refused(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    """Runs last in this module: key-a stays out of rotation afterwards."""
    upstream.configure(invalid_keys=[KEY_A])
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def session() -> str:
        async with connect(ws_url(rt_proxy, "gpt-realtime-2025"), additional_headers=auth) as ws:
            return str(await ws.recv())

    for _ in range(2):  # whichever key round-robin picks first, the session opens
        assert "session.created" in asyncio.run(session())
        if any(e["status"] == 401 for e in upstream.log()):
            # key-a is out once its confirming probe agrees (in the background): wait for
            # it, or the next session may try it again meanwhile.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and metric(
                rt_proxy, "llm_proxy_key_usable", backend="rt", key="key-a"
            ):
                time.sleep(0.05)
    opened = [e["key"] for e in upstream.log() if e["status"] == 101]
    assert opened == [KEY_B, KEY_B]
    assert [e["key"] for e in upstream.log() if e["status"] == 401] == [KEY_A]
    assert metric(rt_proxy, "llm_proxy_key_usable", backend="rt", key="key-a") == 0


def test_the_admin_listener_and_the_main_ports_http_side_refuse_realtime(
    rt_proxy: ProxyProcess, upstream: RealtimeUpstream
) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    url = f"ws://127.0.0.1:{admin_port(rt_proxy)}/v1/realtime?model=gpt-realtime-2025"

    async def refused() -> tuple[int, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, additional_headers=auth):
                pass
        return info.value.response.status_code, json.loads(info.value.response.body or b"{}")

    status, body = asyncio.run(refused())
    assert status == 404 and body["error"]["code"] == "unknown_url"
    # A plain GET (no upgrade) on the main port is no Realtime session either.
    plain = httpx.get(f"{rt_proxy.url}/v1/realtime?model=gpt-realtime-2025", headers=auth)
    assert plain.status_code == 404
    assert upstream.log() == []


def test_a_realtime_session_fails_over_within_the_routes_pool(
    upstream: RealtimeUpstream, tmp_path: Path
) -> None:
    """A pool route: a session is opened on the next deployment when the one its order
    puts first is down, within max_attempts, as a POST would be."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    text = f"""
throttle: {{reconnect: {{enabled: false}}}}
clients: [{{id: team, key: "{CLIENT_KEY}"}}]
backends:
  down: {{base_url: {dead}, keys: [{{id: d, key: "{KEY_OTHER}"}}], timeout: {{connect: 1}}}}
  rt: {{base_url: {upstream.url}/v1, keys: [{{id: key-b, key: "{KEY_B}"}}]}}
routes:
  - prefix: pooled-rt
    affinity: none
    max_attempts: 2
    deployments:
      - {{backend: down, model: gpt-realtime-down, weight: 50}}
      - {{backend: rt, model: gpt-realtime-2025}}
"""
    proxy = start_proxy(text, tmp_path)
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def session() -> str:
        async with connect(ws_url(proxy, "pooled-rt"), additional_headers=auth) as ws:
            return str(await ws.recv())

    try:
        for _ in range(6):
            assert "session.created" in asyncio.run(session())
    finally:
        proxy.stop()
    opened = [e for e in upstream.log() if e["status"] == 101]
    assert len(opened) == 6
    assert {e["query"] for e in opened} == {"model=gpt-realtime-2025"}  # the deployment's id
