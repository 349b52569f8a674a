"""Anthropic's Messages API through a real ``proxy serve``, driven by the real ``anthropic``
SDK against the fake Anthropic upstream (``tests/anthropic_upstream.py``), which checks the
header each backend's key must come in."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from proxy.online import _key_hint
from tests.conftest import KEY_A, KEY_B, KEY_OTHER, ProxyProcess, free_port, start_proxy

ROOT = Path(__file__).resolve().parents[2]
CLIENT_KEY = "sk-anth-client-0000000000000c1"
NARROW_KEY = "sk-anth-narrow-0000000000000n2"
SECOND_KEY = "sk-anth-second-0000000000000s3"
MESSAGES = [{"role": "user", "content": "Hello"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


@dataclass
class FakeAnthropic:
    url: str

    def log(self, path_part: str = "/v1/messages") -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = httpx.get(f"{self.url}/_anth/log").json()
        return [e for e in entries if path_part in e["path"]]

    def reset(self) -> None:
        httpx.delete(f"{self.url}/_anth/log").raise_for_status()

    def configure(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_anth/config", json=settings).raise_for_status()


def error_message(error: anthropic.APIStatusError) -> str:
    """The proxy's (or upstream's) own message, from the body: the SDK's `.message` wording
    is the library's, not ours, and changes between releases."""
    return str(error.body["error"]["message"])  # type: ignore[index]


@pytest.fixture(scope="module")
def fake(fake_anthropic: str) -> FakeAnthropic:
    return FakeAnthropic(fake_anthropic)


def config(fake: FakeAnthropic, admin_port: int) -> str:
    return f"""
server:
  admin_port: {admin_port}
throttle:
  reconnect: {{enabled: false}}
clients:
  - {{id: team, key: "{CLIENT_KEY}"}}
  - {{id: narrow, key: "{NARROW_KEY}", models: ["kimi*"], rate_limit: 2/minute}}
  - {{id: second, key: "{SECOND_KEY}"}}
backends:
  kimi:                       # Moonshot-like: Bearer on its Anthropic endpoint
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/bearer
    anthropic_auth: bearer
    keys:
      - {{id: key-a, key: "{KEY_A}"}}
      - {{id: key-b, key: "{KEY_B}"}}
    models: [kimi-k2-anthropic]
  claude:                     # Anthropic-like: x-api-key (the default)
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/xkey/
    keys: [{{id: claude-main, key: "{KEY_OTHER}"}}]
    timeout: {{idle: 1}}
    breaker: {{failures: 50}}
  limited:                    # one key, rate limited upstream (a cooldown of its own)
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/xkey
    keys: [{{id: limited-main, key: "{KEY_OTHER}"}}]
  retried:
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/xkey
    keys: [{{id: retried-main, key: "{KEY_OTHER}"}}]
  refused:
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/xkey
    keys: [{{id: refused-main, key: "{KEY_OTHER}"}}]
  flaky:                      # its circuit opens after 2 failures
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/xkey
    keys: [{{id: flaky-main, key: "{KEY_OTHER}"}}]
    breaker: {{failures: 2, min_open: 30s}}
  plain:                      # speaks OpenAI's API only
    base_url: {fake.url}/oa/v1
    keys: [{{id: plain-main, key: "{KEY_OTHER}"}}]
    models: [gpt-plain]
aliases:
  kimi: kimi-k2-anthropic
routes:
  - {{prefix: "kimi-", backend: kimi}}
  - {{prefix: "claude-", backend: claude}}
  - {{prefix: "gpt-", backend: plain}}
  - {{prefix: "limited-", backend: limited}}
  - {{prefix: "retried-", backend: retried}}
  - {{prefix: "refused-", backend: refused}}
  - {{prefix: "flaky-", backend: flaky}}
"""


@pytest.fixture(scope="module")
def proxy(fake: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    admin = free_port()
    process = start_proxy(config(fake, admin), tmp_path_factory.mktemp("anth"))
    process.admin_port = admin  # type: ignore[attr-defined]
    yield process
    process.stop()


@pytest.fixture
def upstream(fake: FakeAnthropic) -> FakeAnthropic:
    fake.reset()
    return fake


_OPEN: list[anthropic.Anthropic] = []  # SDK clients a test made, closed after it


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def client(proxy: ProxyProcess, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("api_key", CLIENT_KEY)
    kw.setdefault("max_retries", 0)
    sdk = anthropic.Anthropic(base_url=proxy.url, **kw)
    _OPEN.append(sdk)
    return sdk


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """The sum of the series of ``name`` that carry ``labels`` (0 when none)."""
    port = proxy.admin_port  # type: ignore[attr-defined]
    total = 0.0
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        match = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if match and match[1] == name and all(f'{k}="{v}"' in match[2] for k, v in labels.items()):
            total += float(match[3])
    return total


# ---------------------------------------------------------------- the happy paths


def test_create_with_x_api_key_goes_out_with_the_backends_key(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    raw = client(proxy).messages.with_raw_response.create(
        model="claude-fake-1", max_tokens=50, messages=MESSAGES
    )
    message = raw.parse()
    assert message.content[0].text == "Hello from the fake."  # type: ignore[union-attr]
    assert message.usage.input_tokens == 25 and message.usage.output_tokens == 15
    assert raw.headers["x-proxy-backend"] == "claude"
    assert raw.headers["x-proxy-key"] == "claude-main"
    assert raw.headers["request-id"] == "req_upstream_1"  # what the SDK shows as _request_id
    (seen,) = upstream.log()
    assert seen["path"] == "/xkey/v1/messages"
    assert seen["x-api-key"] == KEY_OTHER  # the backend's key, the backend's way
    assert seen["authorization"] is None  # the client's key never goes upstream
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", seen["anthropic-version"])  # the SDK's, passed on


def test_claude_code_setup_bearer_token_and_bearer_backend(
    proxy: ProxyProcess, upstream: FakeAnthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claude Code's set-up: ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN (the SDK sends
    ``Authorization: Bearer``); an alias; a backend that wants Bearer; anthropic-beta kept."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", proxy.url)
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", CLIENT_KEY)
    sdk = anthropic.Anthropic(max_retries=0)
    _OPEN.append(sdk)
    message = sdk.messages.create(
        model="kimi",
        max_tokens=50,
        messages=MESSAGES,
        extra_headers={"anthropic-beta": "fine-grained-tool-streaming-2025-05-14"},
    )
    assert message.model == "kimi-k2-anthropic"  # the upstream got the alias's target
    (seen,) = upstream.log()
    assert seen["path"] == "/bearer/v1/messages"
    assert seen["authorization"] in (f"Bearer {KEY_A}", f"Bearer {KEY_B}")
    assert seen["x-api-key"] is None
    assert seen["anthropic-beta"] == "fine-grained-tool-streaming-2025-05-14"


def test_stream_with_tool_use_is_assembled_and_byte_identical(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    sdk = client(proxy)
    with sdk.messages.stream(
        model="claude-fake-1", max_tokens=50, messages=MESSAGES, tools=TOOLS
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "Hello from the fake."
    tool = final.content[1]
    assert tool.type == "tool_use" and tool.input == {"city": "Paris", "unit": "celsius"}
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 25 and final.usage.output_tokens == 15

    body = {"model": "claude-fake-1", "max_tokens": 50, "messages": MESSAGES, "tools": TOOLS}
    body["stream"] = True
    version = {"anthropic-version": "2023-06-01"}
    direct = httpx.post(
        f"{upstream.url}/xkey/v1/messages", json=body, headers={"x-api-key": "k", **version}
    )
    through = httpx.post(
        f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": CLIENT_KEY, **version}
    )
    assert through.status_code == 200
    assert through.headers["content-type"] == "text/event-stream"
    assert b"event: ping" in through.content
    assert through.content == direct.content  # byte for byte


def test_count_tokens_and_models(proxy: ProxyProcess, upstream: FakeAnthropic) -> None:
    sdk = client(proxy)
    counted = sdk.messages.count_tokens(model="kimi-k2-anthropic", messages=MESSAGES)
    assert counted.input_tokens == 42
    (seen,) = upstream.log("count_tokens")
    assert seen["path"] == "/bearer/v1/messages/count_tokens"

    page = sdk.models.list()
    ids = [m.id for m in page.data]
    # Aliases, then listed models; not gpt-plain, whose backend does not speak the dialect.
    assert ids == ["kimi", "kimi-k2-anthropic"]
    assert all(m.type == "model" and m.display_name == m.id for m in page.data)
    assert sdk.models.retrieve("kimi").id == "kimi"
    with pytest.raises(anthropic.NotFoundError) as unknown:
        sdk.models.retrieve("claude-unknown")
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "is not listed by this proxy" in error_message(unknown.value)
    # The same path for the openai SDK (no anthropic-version) keeps OpenAI's shape.
    listed = httpx.get(
        f"{proxy.url}/v1/models", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    ).json()
    assert listed["object"] == "list" and listed["data"][0]["object"] == "model"
    assert "gpt-plain" in [m["id"] for m in listed["data"]]
    with pytest.raises(anthropic.NotFoundError):
        sdk.models.retrieve("gpt-plain")


def test_beta_calls_keep_their_query_and_unserved_paths_are_anthropic_404s(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    sdk = client(proxy)
    message = sdk.beta.messages.create(
        model="claude-fake-1", max_tokens=5, messages=MESSAGES, betas=["context-1m-2025-08-07"]
    )
    assert message.content[0].text == "Hello from the fake."  # type: ignore[union-attr]
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "claude-fake-1", "max_tokens": 5, "messages": MESSAGES}
    # Older SDKs mark beta calls with ?beta=true: the query goes on as it came.
    assert httpx.post(f"{proxy.url}/v1/messages?beta=true", json=body, headers=headers).is_success
    first, second = upstream.log()
    assert first["anthropic-beta"] == "context-1m-2025-08-07"
    assert second["query"] == "beta=true"
    batches = httpx.post(f"{proxy.url}/v1/messages/batches", json={}, headers=headers)
    assert batches.status_code == 404
    assert batches.json()["error"]["type"] == "not_found_error"
    assert "Unknown request URL: POST /v1/messages/batches" in batches.json()["error"]["message"]
    wrong_method = httpx.get(f"{proxy.url}/v1/messages", headers=headers)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["type"] == "error"


def test_usage_and_endpoint_label_in_metrics(proxy: ProxyProcess, upstream: FakeAnthropic) -> None:
    before = metric(proxy, "llm_proxy_tokens_total", backend="claude", type="prompt")
    requests = metric(proxy, "llm_proxy_requests_total", backend="claude", endpoint="anthropic")
    with client(proxy).messages.stream(
        model="claude-fake-1", max_tokens=50, messages=MESSAGES
    ) as stream:
        stream.until_done()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if metric(proxy, "llm_proxy_tokens_total", backend="claude", type="prompt") > before:
            break
        time.sleep(0.05)
    tokens = {
        kind: metric(proxy, "llm_proxy_tokens_total", backend="claude", type=kind)
        for kind in ("prompt", "completion", "cache_creation", "cache_read")
    }
    assert tokens["prompt"] - before == 40  # 25 input + 5 cache creation + 10 cache read
    assert tokens["completion"] >= 15 and tokens["cache_read"] >= 10
    after = metric(proxy, "llm_proxy_requests_total", backend="claude", endpoint="anthropic")
    assert after == requests + 1


# ---------------------------------------------------------------- errors


def test_proxy_errors_are_anthropic_shaped_and_raise_the_right_classes(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as auth:
        client(proxy, api_key="sk-wrong").messages.create(
            model="claude-fake-1", max_tokens=5, messages=MESSAGES
        )
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "Incorrect client API key" in error_message(auth.value)

    with pytest.raises(anthropic.NotFoundError) as missing:
        client(proxy).messages.create(model="nothing-routes-me", max_tokens=5, messages=MESSAGES)
    assert missing.value.body["type"] == "error"  # type: ignore[index]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "not routed" in error_message(missing.value)

    with pytest.raises(anthropic.BadRequestError) as unspoken:
        client(proxy).messages.create(model="gpt-4o", max_tokens=5, messages=MESSAGES)
    assert "does not speak the anthropic API" in error_message(unspoken.value)
    assert "kimi, claude, limited, retried, refused, flaky" in error_message(
        unspoken.value
    )  # which backends do
    assert upstream.log() == []  # nothing reached any upstream


def test_upstream_errors_pass_through_and_raise(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    sdk = client(proxy)
    upstream.configure(fail_next=[{"status": 529, "message": "Overloaded"}])
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        sdk.messages.create(model="claude-fake-1", max_tokens=5, messages=MESSAGES)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert overloaded.value.body["request_id"] == "req_upstream_err"  # unchanged  # type: ignore[index]

    upstream.configure(fail_next=[{"status": 429, "retry_after": 7, "message": "slow down"}])
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk.messages.create(model="limited-1", max_tokens=5, messages=MESSAGES)
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["error"]["message"] == "slow down"  # type: ignore[index]
    assert limited.value.body["request_id"] == "req_upstream_err"  # type: ignore[index]


def test_an_open_circuit_is_an_overloaded_error_with_retry_after(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    sdk = client(proxy)
    upstream.configure(fail_next=[{"status": 529}, {"status": 529}])
    # Two clients' failures: one client's streak is its own, it opens no circuit (issue 19).
    for failing in (sdk, client(proxy, api_key=SECOND_KEY)):
        with pytest.raises(anthropic.APIStatusError):
            failing.messages.create(model="flaky-1", max_tokens=5, messages=MESSAGES)
    with pytest.raises(anthropic.InternalServerError) as opened:
        sdk.messages.create(model="flaky-1", max_tokens=5, messages=MESSAGES)
    assert opened.value.status_code == 503
    assert opened.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert "circuit breaker open" in error_message(opened.value)
    assert 1 <= int(opened.value.response.headers["retry-after"]) <= 30
    assert len(upstream.log()) == 2  # the open circuit sent nothing upstream


def test_refused_backend_key_is_503_not_the_upstreams_401(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    upstream.configure(valid_keys=[KEY_A])  # refused-main is refused (and stays out)
    try:
        with pytest.raises(anthropic.InternalServerError) as refused:
            client(proxy).messages.create(model="refused-1", max_tokens=5, messages=MESSAGES)
        assert refused.value.status_code == 503
        assert refused.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        assert "refused the proxy's API key 'refused-main'" in error_message(refused.value)
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert len(upstream.log()) == 1  # not retried by the SDK
    finally:
        upstream.configure(valid_keys=None)


def test_sdk_retries_honour_the_retry_after_it_gets(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    """One key, rate limited upstream for 1 s: the SDK waits what it is told, then gets
    through (the proxy's own 429 while the key cools down carries the remaining wait)."""
    upstream.configure(fail_next=[{"status": 429, "retry_after": 1}])
    started = time.monotonic()
    message = client(proxy, max_retries=3).messages.create(
        model="retried-1", max_tokens=5, messages=MESSAGES
    )
    elapsed = time.monotonic() - started
    assert message.content[0].text == "Hello from the fake."  # type: ignore[union-attr]
    assert 0.9 <= elapsed < 6
    assert len(upstream.log()) == 2  # the 429, then the answer: no storm on a cooling key


def test_client_globs_limits_and_the_access_log_hold_for_messages(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    narrow = client(proxy, api_key=NARROW_KEY)
    with pytest.raises(anthropic.PermissionDeniedError) as outside:
        narrow.messages.create(model="claude-fake-1", max_tokens=5, messages=MESSAGES)
    assert outside.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert "may not use model 'claude-fake-1'" in error_message(outside.value)
    for _ in range(2):  # 2/minute (a refused model did not count)
        narrow.messages.create(model="kimi", max_tokens=5, messages=MESSAGES)
    with pytest.raises(anthropic.RateLimitError) as limited:
        narrow.messages.count_tokens(model="kimi", messages=MESSAGES)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    headers = limited.value.response.headers
    assert 0 < int(headers["retry-after"]) <= 60 and int(headers["retry-after-ms"]) > 0
    assert len(upstream.log()) == 2  # only the allowed requests went upstream
    deadline = time.monotonic() + 2  # the access log is written in batches
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any(
        e["client"] == "narrow" and e["status"] == 429 for e in lines
    ):
        time.sleep(0.05)
        lines = [json.loads(line) for line in proxy.log().splitlines() if '"/v1/messages' in line]
    mine = [(e["path"], e["status"], e["backend"]) for e in lines if e["client"] == "narrow"]
    assert mine == [
        ("/v1/messages", 403, "claude"),
        ("/v1/messages", 200, "kimi"),
        ("/v1/messages", 200, "kimi"),
        ("/v1/messages/count_tokens", 429, "kimi"),
    ]
    served = [e for e in lines if e["client"] == "narrow" and e["status"] == 200]
    assert served[0]["upstream_request_id"] == "req_upstream_1"  # Anthropic's request-id
    assert (served[0]["prompt_tokens"], served[0]["cache_read_tokens"]) == (40, 10)
    assert CLIENT_KEY not in proxy.log() and NARROW_KEY not in proxy.log()


# ---------------------------------------------------------------- broken streams


@pytest.mark.parametrize("failure", ["cut", "no_stop", "stall"])
def test_a_broken_stream_raises_in_the_sdk(
    proxy: ProxyProcess, upstream: FakeAnthropic, failure: str
) -> None:
    sdk = client(proxy)
    seen: list[str] = []
    request = {"model": "claude-fake-1", "max_tokens": 5, "messages": MESSAGES}
    extra = {"test": {failure: True}}
    with (
        pytest.raises(anthropic.APIStatusError) as broken,
        sdk.messages.stream(**request, extra_body=extra) as stream,  # type: ignore[arg-type]
    ):
        for event in stream:
            seen.append(event.type)
    assert "message_start" in seen and "message_stop" not in seen
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    expected = "read timeout" if failure == "stall" else "claude"
    assert expected in error_message(broken.value)


def test_stream_error_event_bytes(proxy: ProxyProcess, upstream: FakeAnthropic) -> None:
    body = {"model": "claude-fake-1", "max_tokens": 5, "messages": MESSAGES, "stream": True}
    body["test"] = {"no_stop": True}
    response = httpx.post(
        f"{proxy.url}/v1/messages",
        json=body,
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
    )
    tail = response.content.rsplit(b"\n\n", 2)[-2]
    assert tail == (
        b'event: error\ndata: {"type":"error","error":{"type":"api_error","message":'
        b"\"Backend 'claude' ended the stream without message_stop.\"}}"
    )


# ---------------------------------------------------------------- proxy check --online


def test_check_online_tries_the_anthropic_endpoint_with_its_key_header(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    fake.reset()
    fake.configure(valid_keys=[KEY_A])
    path = tmp_path / "online.yaml"
    path.write_text(f"""
backends:
  kimi:
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/bearer
    anthropic_auth: bearer
    keys: [{{id: good, key: "{KEY_A}"}}]
  claude:
    base_url: {fake.url}/oa/v1
    anthropic_base_url: {fake.url}/xkey
    keys: [{{id: stale, key: "{KEY_B}"}}]
""")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "check", "--config", str(path), "--online", "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        sent = {(e["path"], e["x-api-key"], e["authorization"]) for e in fake.log("/models")}
    finally:
        fake.reset()
    report = json.loads(result.stdout)
    found = {(f["backend"], f["subject"]): f for f in report["findings"]}
    assert found[("kimi", "key good (anthropic endpoint)")]["message"] == "ok, 2 models"
    stale = found[("claude", "key stale (anthropic endpoint)")]
    assert stale["level"] == "error" and stale["message"] == "401: invalid (invalid x-api-key)"
    assert result.returncode == 1
    assert ("/bearer/v1/models", None, f"Bearer {KEY_A}") in sent
    assert ("/xkey/v1/models", KEY_B, None) in sent
    assert KEY_A not in result.stdout and KEY_B not in result.stdout
    # The key-domain hints hold for a backend's Anthropic URL too.
    assert "api.moonshot.cn" in (_key_hint("https://api.moonshot.ai/anthropic") or "")


def test_a_client_that_leaves_mid_stream_closes_the_upstream(
    proxy: ProxyProcess, upstream: FakeAnthropic
) -> None:
    body = {"model": "claude-fake-1", "max_tokens": 5, "messages": MESSAGES, "stream": True}
    body["test"] = {"trickle": True}
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{proxy.url}/v1/messages", json=body, headers=headers) as r:
        first = next(r.iter_raw())
        assert first.startswith(b"event: message_start")
    deadline = time.monotonic() + 3  # the fake pings every 50 ms for 10 s if nobody leaves
    while time.monotonic() < deadline and not any(e.get("gone") for e in upstream.log()):
        time.sleep(0.05)
    assert any(e.get("gone") for e in upstream.log()), "the upstream kept generating"


def test_hot_reload_gives_a_backend_its_anthropic_endpoint(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    fake.reset()
    text = f"""
server: {{config_poll_interval: 0.2}}
backends:
  kimi:
    base_url: {fake.url}/oa/v1
    keys: [{{id: good, key: "{KEY_A}"}}]
routes:
  - {{prefix: "kimi-", backend: kimi}}
"""
    process = start_proxy(text, tmp_path)
    try:
        sdk = client(process)
        with pytest.raises(anthropic.BadRequestError):  # kimi speaks OpenAI's API only
            sdk.messages.create(model="kimi-k2", max_tokens=5, messages=MESSAGES)
        anthropic_url = f"    anthropic_base_url: {fake.url}/bearer\n    anthropic_auth: bearer\n"
        (tmp_path / "config.yaml").write_text(
            text.replace("    keys:", anthropic_url + "    keys:")
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                message = sdk.messages.create(model="kimi-k2", max_tokens=5, messages=MESSAGES)
                break
            except anthropic.BadRequestError:
                assert time.monotonic() < deadline, "the reload never took effect"
                time.sleep(0.1)
        assert message.model == "kimi-k2"
        assert fake.log()[-1]["authorization"] == f"Bearer {KEY_A}"
    finally:
        process.stop()
        fake.reset()
