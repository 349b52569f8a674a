"""Every token counted at a stream's edges (issue 19, item 6): clients that leave at the
final event (Codex at ``response.completed``, the openai SDK at ``[DONE]``) while the
upstream's body still has a 20 ms tail; clients that leave after the last text; streams cut
mid-way (counted as known, marked partial); ``stream`` that is not a boolean; Responses
streams that end without their final event."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.conftest import ProxyProcess, keep, read_listening_port, start_proxy
from tests.e2e.test_observability import scrape

pytestmark = pytest.mark.e2e

FAKE = Path(__file__).resolve().parents[1] / "usage_upstream.py"
CHAT = {"model": "m-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
RESPONSES = {"model": "m-resp", "input": "hi", "stream": True}
MESSAGES = {
    "model": "m-anth",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}
TAIL = "tail=0.02"


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    keep(process)
    port = read_listening_port(process, "usage upstream")
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=5)


@pytest.fixture(scope="module")
def proxy(fake: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    config = f"""
server: {{usage_grace: 2, usage_grace_bytes: 1048576}}
throttle: {{reconnect: {{enabled: false}}}}
backends:
  fake:
    base_url: {fake}/v1
    anthropic_base_url: {fake}
    keys: [{{id: k1, key: "sk-usage-test-000000000000"}}]
routes:
  - {{prefix: "m-", backend: fake}}
"""
    process = start_proxy(config, tmp_path_factory.mktemp("usage"))
    yield process
    process.stop()


def _counted(
    proxy: ProxyProcess, model: str, name: str = "llm_proxy_tokens_total"
) -> tuple[float, float]:
    """(prompt, completion) counted for the fake backend (one route: one model label)."""
    samples = scrape(proxy)

    def get(kind: str) -> float:
        return sum(
            count
            for (metric, labels), count in samples.items()
            if metric == name and ("type", kind) in labels and ("backend", "fake") in labels
        )

    return get("prompt"), get("completion")


def _access(proxy: ProxyProcess, request_id: str) -> dict[str, object]:
    """The request's access line, once written (the log is flushed in batches; a request
    in its grace ends up to ``usage_grace`` later)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in proxy.log().splitlines():
            if f'"request_id":"{request_id}"' in line and '"prompt_tokens"' in line:
                entry: dict[str, object] = orjson.loads(line)
                return entry
        time.sleep(0.1)
    raise AssertionError(f"no access line for {request_id}")


def _leave_at(url: str, body: dict[str, object], marker: bytes, headers: dict[str, str]) -> None:
    """A raw client that closes its connection right after reading ``marker``."""
    with (
        httpx.Client(timeout=5) as client,
        client.stream("POST", url, json=body, headers=headers) as answer,
    ):
        assert answer.status_code == 200
        seen = b""
        for chunk in answer.iter_raw():
            seen += chunk
            if marker in seen:
                return
    raise AssertionError(f"{marker!r} never came")


@pytest.mark.parametrize(
    ("path", "body", "marker", "model"),
    [
        ("/v1/responses", RESPONSES, b"response.completed", "m-resp"),  # Codex CLI
        ("/v1/chat/completions", CHAT, b"data: [DONE]", "m-chat"),  # the openai SDK
    ],
)
def test_a_client_that_leaves_at_the_final_event_is_counted_exactly_100_of_100(
    proxy: ProxyProcess, path: str, body: dict[str, object], marker: bytes, model: str
) -> None:
    before = _counted(proxy, model)
    headers = {"x-request-id": "leave-final-0"}
    for turn in range(100):
        headers["x-request-id"] = f"leave-final-{model}-{turn}"
        _leave_at(f"{proxy.url}{path}?{TAIL}", body, marker, headers)
    deadline_check = _wait_counted(proxy, model, before, 100)
    assert deadline_check == (before[0] + 100 * 1000, before[1] + 100 * 500)
    entry = _access(proxy, f"leave-final-{model}-99")
    assert entry["status"] == 200
    assert entry["error"] in ("client_left_after_end", None)  # None: the body ended first
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (1000, 500)
    assert "tokens_partial" not in entry


def _wait_counted(
    proxy: ProxyProcess, model: str, before: tuple[float, float], turns: int
) -> tuple[float, float]:
    """The counters once the last turn's grace is over (at most a few seconds)."""
    want = (before[0] + turns * 1000, before[1] + turns * 500)
    deadline = time.monotonic() + 10
    now = _counted(proxy, model)
    while now != want and time.monotonic() < deadline:
        time.sleep(0.1)
        now = _counted(proxy, model)
    return now


@pytest.mark.parametrize(
    ("path", "body", "marker", "model"),
    [
        ("/v1/chat/completions", CHAT, b'"finish_reason": "stop"', "m-chat"),
        ("/v1/messages", MESSAGES, b"content_block_stop", "m-anth"),
        ("/v1/responses", RESPONSES, b"output_text.delta", "m-resp"),
    ],
)
def test_a_client_that_leaves_after_the_last_text_gets_the_real_usage_counted(
    proxy: ProxyProcess, path: str, body: dict[str, object], marker: bytes, model: str
) -> None:
    before = _counted(proxy, model)
    request_id = f"leave-text-{model}"
    headers = {"x-request-id": request_id, "x-api-key": "x", "anthropic-version": "2023-06-01"}
    _leave_at(f"{proxy.url}{path}?{TAIL}", body, marker, headers)
    assert _wait_counted(proxy, model, before, 1) == (before[0] + 1000, before[1] + 500)
    entry = _access(proxy, request_id)
    assert entry["error"] == "client_left_after_end" and entry["status"] == 200


def test_an_anthropic_stream_cut_after_its_text_counts_message_start_and_an_estimate(
    proxy: ProxyProcess,
) -> None:
    request_id = "cut-anth"
    headers = {"x-request-id": request_id, "x-api-key": "x", "anthropic-version": "2023-06-01"}
    answer = httpx.post(f"{proxy.url}/v1/messages?cut=after_text", json=MESSAGES, headers=headers)
    assert b"event: error" in answer.content  # the SDK raises on it
    entry = _access(proxy, request_id)
    assert entry["prompt_tokens"] == 1000  # message_start's input, not dropped
    # No message_delta: the completion estimated as text bytes / 4 (120 bytes of text);
    # message_start's output_tokens (1) is a count, and the larger is never over the truth.
    assert entry["completion_tokens"] in (1, 30)
    assert entry["tokens_partial"] is True


def test_a_chat_stream_cut_after_its_text_is_counted_partial_with_an_estimate(
    proxy: ProxyProcess,
) -> None:
    request_id = "cut-chat"
    partial_before = _counted(proxy, "", "llm_proxy_partial_tokens_total")
    answer = httpx.post(
        f"{proxy.url}/v1/chat/completions?cut=after_text",
        json=CHAT,
        headers={"x-request-id": request_id},
    )
    assert b'"upstream_stream_broken"' in answer.content
    entry = _access(proxy, request_id)
    assert entry["completion_tokens"] == len("hello " * 20) // 4
    assert entry["prompt_tokens"] == 0 and entry["tokens_partial"] is True
    partial = _counted(proxy, "", "llm_proxy_partial_tokens_total")
    assert partial[1] == partial_before[1] + len("hello " * 20) // 4  # billing can tell


def test_the_openai_sdk_raises_on_a_responses_stream_without_its_final_event(
    proxy: ProxyProcess,
) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.APIError) as raised:
        for _ in client.responses.create(
            model="m-resp",
            input="hi",
            stream=True,
            extra_query={"cut": "no_end"},
            extra_headers={"x-request-id": "resp-no-end"},
        ):
            pass
    assert isinstance(raised.value.body, dict)
    assert raised.value.body.get("code") == "upstream_stream_broken"
    entry = _access(proxy, "resp-no-end")
    assert entry["error"] == "stream_broken" and entry["tokens_partial"] is True


def test_a_whole_responses_stream_still_passes_through_the_sdk(proxy: ProxyProcess) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    events = list(client.responses.create(model="m-resp", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.input_tokens == 1000


def test_the_anthropic_sdk_gets_a_whole_stream_and_its_usage(proxy: ProxyProcess) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0)
    with client.messages.stream(
        model="m-anth", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message = stream.get_final_message()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1000, 500)


@pytest.mark.parametrize("value", ["true", 1, 0, "false", {}])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/completions"])
def test_stream_that_is_not_a_json_boolean_is_400_and_nothing_goes_upstream(
    proxy: ProxyProcess, path: str, value: object
) -> None:
    body = orjson.dumps({"model": "m-chat", "input": "hi", "stream": value})
    answer = httpx.post(
        f"{proxy.url}{path}", content=body, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "stream")


def test_stream_that_is_not_a_json_boolean_is_400_in_anthropic_shape(proxy: ProxyProcess) -> None:
    answer = httpx.post(
        f"{proxy.url}/v1/messages",
        json={**MESSAGES, "stream": "true"},
        headers={"x-api-key": "x", "anthropic-version": "2023-06-01"},
    )
    assert answer.status_code == 400
    assert answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "invalid_request_error"
