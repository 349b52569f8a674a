"""What crosses the wire: exact stream bytes, timing, disconnects, bad input, secrets."""

from __future__ import annotations

import itertools
import json
import socket
import time

import httpx
import pytest

from tests.conftest import (
    KEY_A,
    KEY_B,
    KEY_OTHER,
    KEYS_ENV,
    MockUpstream,
    ProxyProcess,
    mock_config,
    start_proxy,
)


def raw_stream(url: str, body: dict) -> tuple[bytes, list[float]]:
    """All bytes of a streamed answer and the arrival time of each chunk."""
    start = time.perf_counter()
    data, times = b"", []
    headers = {"authorization": "Bearer direct-test-key"}  # the proxy replaces it
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            data += chunk
            times.append(time.perf_counter() - start)
    return data, times


@pytest.mark.parametrize(
    "mock",
    [
        {},
        {"crlf": True},
        {"comments": True},
        {"chunks": 50, "comments": True, "crlf": True},
    ],
    ids=["plain", "crlf", "comments", "long-crlf-comments"],
)
def test_chat_stream_bytes_equal_the_upstream_bytes(proxy, upstream, mock):
    body = {"model": "kimi-k2", "stream": True, "messages": [], "mock": mock}
    through_proxy, _ = raw_stream(f"{proxy.base_url}/chat/completions", body)
    direct, _ = raw_stream(
        f"{upstream.url}/v1/chat/completions", {**body, "model": "kimi-k2-0711-preview"}
    )
    assert through_proxy == direct
    assert through_proxy.endswith(b"data: [DONE]\r\n\r\n" if mock.get("crlf") else b"[DONE]\n\n")


def test_responses_stream_event_lines_pass_untouched(proxy, upstream):
    body = {"model": "kimi-k2-0711-preview", "stream": True, "input": "hi"}
    through_proxy, _ = raw_stream(f"{proxy.base_url}/responses", body)
    direct, _ = raw_stream(f"{upstream.url}/v1/responses", body)
    assert through_proxy == direct
    assert through_proxy.startswith(b"event: response.created\ndata: ")


@pytest.mark.serial  # chunk arrival within 30 ms
def test_chunks_are_flushed_as_they_arrive(proxy, upstream):
    mock = {"first_chunk_delay": 0.3, "chunk_delay": 0.15, "chunks": 3}
    body = {"model": "kimi-k2", "stream": True, "messages": [], "mock": mock}
    _, via_proxy = raw_stream(f"{proxy.base_url}/chat/completions", body)
    _, direct = raw_stream(
        f"{upstream.url}/v1/chat/completions", {**body, "model": "kimi-k2-0711-preview"}
    )
    # Every upstream event arrives as its own chunk, on the upstream's schedule.
    assert len(via_proxy) == len(direct) >= 5
    assert via_proxy[0] - direct[0] < 0.03  # first chunk: within a few ms of being sent
    gaps = [b - a for a, b in itertools.pairwise(via_proxy)]
    assert all(gap > 0.1 for gap in gaps[:3])  # not held back and sent together


def test_client_leaving_mid_stream_closes_the_upstream_stream(proxy, upstream):
    mock = {"chunks": 100, "chunk_delay": 0.1}
    body = {"model": "kimi-k2", "stream": True, "messages": [], "mock": mock}
    with httpx.stream("POST", f"{proxy.base_url}/chat/completions", json=body) as response:
        next(response.iter_raw())
    deadline = time.monotonic() + 2
    while upstream.aborted() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.aborted() == 1


def test_client_giving_up_on_a_slow_answer_cancels_the_upstream_request(proxy, upstream):
    body = {"model": "kimi-k2", "messages": [], "mock": {"delay": 5}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 2
    while upstream.aborted() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.aborted() == 1


def test_headers_forwarded_upstream_and_kept_on_the_way_back(proxy, upstream):
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={
            "model": "kimi-k2",
            "messages": [],
            "mock": {
                "headers": {
                    "x-ratelimit-remaining-requests": "42",
                    "openai-processing-ms": "3",
                    "set-cookie": "tracking=1",
                    "server": "upstream",
                }
            },
        },
        headers={
            "authorization": "Bearer client",
            "openai-beta": "assistants=v2",
            "x-request-id": "client-id-1",
            "cookie": "session=1",
        },
    )
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-requests"] == "42"
    assert response.headers["openai-processing-ms"] == "3"
    assert "set-cookie" not in response.headers
    assert response.headers.get("server") is None
    [seen] = upstream.requests()
    assert seen["headers"]["openai-beta"] == "assistants=v2"
    assert seen["headers"]["x-request-id"] == "client-id-1"
    assert "cookie" not in seen["headers"]
    assert seen["headers"]["authorization"] in (f"Bearer {KEY_A}", f"Bearer {KEY_B}")


def test_body_is_forwarded_byte_for_byte_when_the_model_is_unchanged(proxy, upstream):
    body = b'{"model":  "kimi-k2-0711-preview", "temperature": 0.70, "messages": []}'
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    assert upstream.requests()[0]["body"].encode() == body


def test_other_v1_post_with_a_model_is_forwarded_to_the_same_path(proxy, upstream):
    response = httpx.post(
        f"{proxy.base_url}/moderations?x=1", json={"model": "kimi-k2", "input": "a"}
    )
    assert response.json() == {
        "ok": True,
        "path": "/v1/moderations",
        "model": "kimi-k2-0711-preview",
    }


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("content", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b"", 400, "missing_model", "model"),  # a POST without a body names no model
        (b'{"messages": []}', 400, "missing_model", "model"),
        (b'{"model": 42}', 400, "invalid_model", "model"),
        (b'{"model": ""}', 400, "invalid_model", "model"),
        (b'{"model": "nope"}', 404, "model_not_found", "model"),
        (b"\xff\xfe", 400, "invalid_json", None),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_proxy_keeps_serving(
    proxy, upstream, content, status, code, param
):
    response = httpx.post(f"{proxy.base_url}/chat/completions", content=content)
    assert response.status_code == status
    error = error_of(response)
    assert (error["code"], error["param"]) == (code, param)
    assert response.headers["x-request-id"]
    ok = httpx.post(f"{proxy.base_url}/chat/completions", json={"model": "kimi-k2"})
    assert ok.status_code == 200


def test_oversized_body_is_413_without_reading_it_all(proxy, upstream):
    big = b'{"model": "kimi-k2", "x": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    response = httpx.post(f"{proxy.base_url}/chat/completions", content=big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert upstream.requests() == []


def test_unknown_path_is_an_openai_shaped_404(proxy):
    response = httpx.get(f"{proxy.url}/v2/whatever")
    assert response.status_code == 404
    assert error_of(response)["code"] == "unknown_url"
    assert response.headers["x-request-id"]


def test_client_request_id_is_returned_on_proxy_errors(proxy):
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={"model": "nope"},
        headers={"x-request-id": "trace-me"},
    )
    assert response.headers["x-request-id"] == "trace-me"


def test_access_log_line_names_backend_key_and_upstream_model(proxy, upstream):
    httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={"model": "fast", "stream": True},
        headers={"x-request-id": "log-me"},
    )
    time.sleep(0.2)  # lines are flushed in batches every 50 ms
    [line] = [json.loads(x) for x in proxy.log().splitlines() if '"log-me"' in x]
    assert line["request_id"] == "log-me"
    assert line["upstream_request_id"] == "req_mock_upstream"
    assert line["model"] == "fast"
    assert line["upstream_model"] == "kimi-k2-0711-preview"
    assert line["backend"] == "mock"
    assert line["key"] in ("key-a", "key-b")
    assert (line["status"], line["stream"], line["error"]) == (200, True, None)
    assert line["duration_ms"] > 0


def test_health(proxy):
    assert httpx.get(f"{proxy.url}/health").json() == {"status": "ok"}


def test_a_half_sent_request_does_not_hang_or_kill_the_proxy(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"
        )
    assert (
        httpx.post(f"{proxy.base_url}/chat/completions", json={"model": "kimi-k2"}).status_code
        == 200
    )


def test_secrets_never_appear_in_logs_headers_or_errors(proxy, upstream):
    responses = [
        httpx.post(f"{proxy.base_url}/chat/completions", json={"model": m, "messages": []})
        for m in ("kimi-k2", "pinned-x", "other/x", "dead-x", "unkeyed-x", "nope")
    ]
    time.sleep(0.2)  # let the access log lines reach the file
    log = proxy.log()
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [entry for entry in entries if "request_id" in entry]
    assert {"key-a", "key-b", "other-main"} <= {line["key"] for line in access}  # ids are logged
    for secret in (KEY_A, KEY_B, KEY_OTHER, "sk-dead-0000000000000000"):
        assert secret not in log
        for response in responses:
            assert secret not in response.text
            assert secret not in json.dumps(dict(response.headers))


@pytest.fixture(scope="module")
def impatient_proxy(mock_upstream: MockUpstream, tmp_path_factory) -> ProxyProcess:
    tmp = tmp_path_factory.mktemp("impatient")
    proxy = start_proxy(mock_config(mock_upstream, read_timeout="0.5"), tmp, KEYS_ENV)
    yield proxy
    proxy.stop()


def test_upstream_that_never_answers_is_a_504(impatient_proxy, upstream):
    body = {"model": "kimi-k2", "messages": [], "mock": {"delay": 3}}
    started = time.monotonic()
    response = httpx.post(f"{impatient_proxy.base_url}/chat/completions", json=body, timeout=5)
    assert response.status_code == 504
    assert error_of(response)["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2


def test_stream_that_stalls_ends_with_an_sse_error_event(impatient_proxy, upstream):
    body = {"model": "kimi-k2", "stream": True, "messages": [], "mock": {"stall_after": 2}}
    data, _ = raw_stream(f"{impatient_proxy.base_url}/chat/completions", body)
    events = data.split(b"\n\n")
    assert events[-1] == b""
    last = json.loads(events[-2].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_timeout"
    assert len(events) == 4  # two upstream events, the error event, and the final empty split
