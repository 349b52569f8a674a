"""The drain on SIGTERM (``proxy.drain``), end to end: a real ``proxy serve`` process, a
slow stream from the mock upstreams, the real SDKs.

A stream in flight across SIGTERM completes whole and the process then exits at once; one
that outlasts ``server.drain_timeout`` ends with its dialect's error event; ``/ready`` is
503 from the signal on while ``/health`` stays 200; a new request is refused with 503 and
Retry-After.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import KEYS_ENV, MockUpstream, ProxyProcess, read_listening_port, start_proxy

ROOT = Path(__file__).resolve().parent.parent.parent
EXIT_BOUND = 10.0  # generous for a loaded machine; the measured exit is printed by the test


def drain_config(mock: MockUpstream, drain_timeout: float, anthropic_url: str = "") -> str:
    anthropic = f"\n    anthropic_base_url: {anthropic_url}/xkey" if anthropic_url else ""
    return f"""
server:
  drain_timeout: {drain_timeout}
throttle:
  reconnect: {{enabled: false}}
backends:
  mock:
    base_url: {mock.url}/v1{anthropic}
    keys: [{{id: key-a, key: "${{TEST_KEY_A}}"}}]
    timeout: {{connect: 2, read: 30}}
routes:
  - {{prefix: "", backend: mock}}
"""


def client(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0, timeout=30)


def slow_stream(proxy: ProxyProcess, chunks: int, delay: float) -> Iterator[object]:
    return iter(
        client(proxy).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"mock": {"chunks": chunks, "chunk_delay": delay}},
        )
    )


def access_lines(proxy: ProxyProcess) -> list[dict[str, object]]:
    """The proxy's access log records (JSON lines with a request id)."""
    lines = (json.loads(line) for line in proxy.log().splitlines() if line.startswith("{"))
    return [line for line in lines if "request_id" in line]


def wait_exit(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    code = process.wait(timeout=EXIT_BOUND)
    return code, time.monotonic() - started


def test_stream_across_sigterm_completes_then_exits(upstream: MockUpstream, tmp_path: Path) -> None:
    proxy = start_proxy(drain_config(upstream, 10), tmp_path, KEYS_ENV)
    try:
        stream = slow_stream(proxy, chunks=6, delay=0.25)
        got = [next(stream)]
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # At once: out of the endpoints, still alive, new requests refused (retryable).
        ready = httpx.get(f"{proxy.url}/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["draining"] is True
        assert httpx.get(f"{proxy.url}/health", timeout=5).status_code == 200
        refused = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
            timeout=5,
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        got += list(stream)  # the SDK stops at [DONE]: every chunk, no error
        text = "".join(c.choices[0].delta.content or "" for c in got if c.choices)  # type: ignore[attr-defined]
        assert len([c for c in got if c.choices]) >= 6  # type: ignore[attr-defined]
        assert text
        ended = time.monotonic()
        code, _ = wait_exit(proxy.process)
        exit_after = time.monotonic() - ended
        assert code == 0, proxy.log()
        assert exit_after < 3.0, f"exited {exit_after:.2f} s after the last stream, not at once"
        print(f"exit {exit_after:.2f} s after the stream ended (drain_timeout 10 s)")
        refused_error, stream_error = [r["error"] for r in access_lines(proxy)]
        assert refused_error == "server_shutting_down"
        # The SDK may close at [DONE] before the upstream's body ends: still a whole stream.
        assert stream_error in (None, "client_left_after_end")
    finally:
        proxy.stop()


def test_stream_past_the_drain_ends_with_the_error_event(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(drain_config(upstream, 1), tmp_path, KEYS_ENV)
    try:
        stream = slow_stream(proxy, chunks=40, delay=0.25)  # 10 s: far past the drain
        next(stream)
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError) as raised:
            list(stream)
        assert isinstance(raised.value.body, dict)
        assert raised.value.body["code"] == "server_shutting_down"
        assert raised.value.body["type"] == "api_error"
        ended_after = time.monotonic() - signalled
        assert 0.8 < ended_after < 4.0, ended_after
        code, _ = wait_exit(proxy.process)
        total = time.monotonic() - signalled
        assert code == 0, proxy.log()
        print(f"stream ended {ended_after:.2f} s, process exited {total:.2f} s after SIGTERM")
        (record,) = access_lines(proxy)
        assert record["error"] == "drained"
        assert record["status"] == 200  # the stream had started: its status was 200
        assert "1 request(s) and 0 Realtime session(s)" in proxy.log()
    finally:
        proxy.stop()


def test_anthropic_stream_past_the_drain_gets_event_error(
    upstream: MockUpstream, fake_anthropic: str, tmp_path: Path
) -> None:
    proxy = start_proxy(drain_config(upstream, 1, fake_anthropic), tmp_path, KEYS_ENV)
    try:
        body = {
            "model": "claude-x",
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "test": {"stall": True},  # a few events, then silence
        }
        headers = {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
        with httpx.stream(
            "POST", f"{proxy.base_url}/messages", json=body, headers=headers, timeout=30
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes()
            received = next(chunks)
            proxy.process.send_signal(signal.SIGTERM)
            received += b"".join(chunks)
        assert b"event: message_start" in received
        tail = received.rsplit(b"\n\n", 2)[-2] if received.endswith(b"\n\n") else received
        assert tail.startswith(b"event: error\ndata: "), received[-300:]
        assert b'"type":"api_error"' in tail.replace(b" ", b"")
        code, _ = wait_exit(proxy.process)
        assert code == 0, proxy.log()
        assert [r["error"] for r in access_lines(proxy)] == ["drained"]
    finally:
        proxy.stop()


def test_answer_not_started_at_the_deadline_gets_503(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(drain_config(upstream, 1), tmp_path, KEYS_ENV)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post,
                f"{proxy.base_url}/chat/completions",
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "mock": {"delay": 10},  # the head would come in 10 s: far past the drain
                },
                timeout=30,
            )
            wait_until(lambda: any("chat/completions" in str(r) for r in upstream.requests()))
            proxy.process.send_signal(signal.SIGTERM)
            answer = pending.result(timeout=10)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "server_shutting_down"
        assert answer.headers["retry-after"] == "1"
        code, _ = wait_exit(proxy.process)
        assert code == 0, proxy.log()
        assert [r["error"] for r in access_lines(proxy)] == ["drained"]
    finally:
        proxy.stop()


def test_realtime_session_past_the_drain_gets_close_1012(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "realtime_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = read_listening_port(process, "realtime upstream")
        config = f"""
server: {{drain_timeout: 1}}
backends:
  rt:
    base_url: http://127.0.0.1:{port}/v1
    keys: [{{id: key-a, key: "${{TEST_KEY_A}}"}}]
routes:
  - {{prefix: "", backend: rt}}
"""
        proxy = start_proxy(config, tmp_path, KEYS_ENV)
        try:
            closed = asyncio.run(_realtime_until_closed(proxy))
            assert closed == 1012  # service restart: the client reconnects elsewhere
            code, _ = wait_exit(proxy.process)
            assert code == 0, proxy.log()
            assert "0 request(s) and 1 Realtime session(s)" in proxy.log()
        finally:
            proxy.stop()
    finally:
        process.terminate()
        process.wait(timeout=5)


async def _realtime_until_closed(proxy: ProxyProcess) -> int | None:
    url = f"ws://127.0.0.1:{proxy.port}/v1/realtime?model=gpt-realtime"
    async with connect(url, additional_headers={"Authorization": "Bearer x"}) as ws:
        await asyncio.wait_for(ws.recv(), 5)  # session.created: the session is up
        proxy.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        return ws.close_code


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
