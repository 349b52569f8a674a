"""Fault injection against a real proxy process and mock upstream (issue: resilience)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import MockUpstream, ProxyProcess, free_port, start_proxy

KEY_BAD = "sk-res-bad-000000000000aaaa"
KEY_GOOD = "sk-res-good-00000000000bbbb"
CLIENT_A = "sk-client-a-0000000000000001"
CLIENT_B = "sk-client-b-0000000000000002"
CLIENT_C = "sk-client-c-resilience-00003"
CLIENT_D = "sk-client-d-resilience-00004"


def config(mock: MockUpstream, storage: str = "memory://", probe: str = "0.5") -> str:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    return f"""
storage: {storage}
throttle:  # waits from the first failure: these tests look at one failure at a time
  reconnect: {{base: 1s, max: 60s, after: 1, min_failure_ratio: 0}}
clients:
  - {{id: team-a, key: "{CLIENT_A}"}}
  - id: team-b
    key: "{CLIENT_B}"
    rate_limit: 3/minute
    models: ["kimi-*", "storm-*", "breaker-*"]
  - {{id: team-c, key: "{CLIENT_C}", models: ["breaker-*"]}}
  - {{id: team-d, key: "{CLIENT_D}", models: ["breaker-*"]}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys:
      - {{id: key-bad, key: "{KEY_BAD}"}}
      - {{id: key-good, key: "{KEY_GOOD}"}}
    key_probe_interval: {probe}
  breaky:
    base_url: {mock.url}/v1
    keys: [{{id: breaky-main, key: "{KEY_GOOD}"}}]
    breaker: {{failures: 3, min_open: 1s, max_open: 4s}}
  limited:
    base_url: {mock.url}/v1
    keys: [{{id: limited-main, key: "{KEY_GOOD}"}}]
    rate_limit: 3/minute
  down:
    base_url: {dead}
    keys: [{{id: down-main, key: "{KEY_GOOD}"}}]
  slow:
    base_url: {mock.url}/v1
    keys: [{{id: slow-main, key: "{KEY_GOOD}"}}]
    timeout: {{connect: 1, first_byte: 1.5, idle: 0.4}}
routes:
  - {{prefix: "kimi-", backend: mock}}
  - {{prefix: "storm-", backend: mock}}
  - {{prefix: "breaker-", backend: breaky}}
  - {{prefix: "limited-", backend: limited}}
  - {{prefix: "fb-", backend: down, fallback: [{{backend: mock, model: fallback-model}}]}}
  - {{prefix: "slow-", backend: slow}}
"""


@pytest.fixture
def proxy(upstream: MockUpstream, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream), tmp_path)
    yield process
    process.stop()


def post(proxy: ProxyProcess, body: dict, key: str = CLIENT_A, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{proxy.base_url}/chat/completions", json=body, headers=headers, timeout=10, **kw
    )


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


# ------------------------------------------------------------------ reconnect storms


@pytest.mark.serial  # a storm on a 250 ms clock
def test_a_250ms_reconnect_loop_reaches_a_failing_upstream_only_a_handful_of_times(proxy, upstream):
    failing = {"model": "storm-1", "messages": [], "mock": {"status": 500}}
    statuses = []
    for _ in range(20):  # 20 reconnects, 250 ms apart: 5 s of storm
        response = post(proxy, failing)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert error_code(response) == "reconnect_throttled"
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
            assert int(response.headers["retry-after-ms"]) > 0
        time.sleep(0.25)
    reached = len(upstream.requests())
    assert statuses.count(500) == reached  # every request that got through saw the 500
    # Waits of 1 s, 2 s, 4 s (less up to 20% jitter): reached at about 0, 1 and 3 s.
    assert 3 <= reached <= 4  # a handful, not 20
    assert statuses.count(429) == 20 - reached
    # Another client, and another model, are not throttled by this storm.
    assert post(proxy, {"model": "storm-1", "messages": []}, key=CLIENT_B).status_code == 200
    assert post(proxy, {"model": "storm-2", "messages": []}).status_code == 200


def test_the_openai_sdk_backs_off_on_the_throttle_instead_of_storming(proxy, upstream):
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_A, max_retries=2)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError):
        sdk.chat.completions.create(
            model="storm-sdk", messages=[], extra_body={"mock": {"status": 503}}
        )
    # The first retry got 429 reconnect_throttled and waited out retry-after-ms, so the
    # upstream saw 2 of the SDK's 3 attempts, the second only after the backoff (>= 0.8 s).
    assert time.monotonic() - started >= 0.75
    assert len(upstream.requests()) == 2


def test_a_success_resets_the_failure_streak(proxy, upstream):
    assert post(proxy, {"model": "storm-3", "mock": {"status": 502}}).status_code == 502
    assert post(proxy, {"model": "storm-3", "mock": {"status": 502}}).status_code == 429
    time.sleep(1.05)
    assert post(proxy, {"model": "storm-3"}).status_code == 200
    assert post(proxy, {"model": "storm-3", "mock": {"status": 502}}).status_code == 502
    throttled = post(proxy, {"model": "storm-3"})
    assert throttled.status_code == 429
    assert float(throttled.headers["retry-after-ms"]) <= 1000  # back to the base wait


def test_client_errors_are_not_failures(proxy, upstream):
    for _ in range(5):
        assert post(proxy, {"model": "storm-4", "mock": {"status": 400}}).status_code == 400
    assert len(upstream.requests()) == 5


def test_a_broken_stream_counts_as_a_failure(proxy, upstream):
    body = {"model": "storm-5", "stream": True, "mock": {"drop_after": 2}}
    data = post(proxy, body).content  # the whole stream, as the client received it
    assert b'"code":"upstream_stream_broken"' in data
    assert post(proxy, {"model": "storm-5"}).status_code == 429


def test_a_stream_that_ends_without_done_raises_in_the_sdk(proxy, upstream):
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_A, max_retries=0)
    stream = sdk.chat.completions.create(
        model="kimi-nodone", messages=[], stream=True, extra_body={"mock": {"no_done": True}}
    )
    with pytest.raises(openai.APIError, match="without \\[DONE\\]"):
        list(stream)


# ------------------------------------------------------------------ key health


def test_a_401_key_is_taken_out_and_the_request_retried_on_the_next_key(proxy, upstream):
    upstream.configure(invalid_keys=[KEY_BAD])
    for _ in range(6):
        response = post(proxy, {"model": "kimi-a", "messages": []})
        assert response.status_code == 200
        assert response.headers["x-proxy-key"] == "key-good"
    keys = [r["key"] for r in upstream.requests() if r["method"] == "POST"]  # not the probes
    assert keys == [KEY_BAD] + [KEY_GOOD] * 6  # the bad key was tried once, never again
    time.sleep(0.2)
    log = proxy.log()
    assert log.count("key key-bad taken out of rotation") == 1
    assert "401 from upstream: Invalid Authentication" in log
    assert KEY_BAD not in log and KEY_GOOD not in log


def test_an_invalid_key_comes_back_when_its_probe_succeeds(proxy, upstream):
    upstream.configure(invalid_keys=[KEY_BAD])
    post(proxy, {"model": "kimi-a"})
    upstream.configure(invalid_keys=[])  # the operator fixed the key upstream
    time.sleep(1.5)  # key_probe_interval is 0.5 s here
    upstream.reset()
    for _ in range(4):
        assert post(proxy, {"model": "kimi-a"}).status_code == 200
    assert {r["key"] for r in upstream.requests() if r["method"] == "POST"} == {KEY_BAD, KEY_GOOD}
    assert "key key-bad is valid again" in proxy.log()


def test_a_429_cools_the_key_down_and_retries_on_another(proxy, upstream):
    upstream.configure(limited_keys={KEY_BAD: "30"})
    for _ in range(4):
        response = post(proxy, {"model": "kimi-b"})
        assert response.status_code == 200
        assert response.headers["x-proxy-key"] == "key-good"
    assert [r["key"] for r in upstream.requests()] == [KEY_BAD] + [KEY_GOOD] * 4


def test_when_every_key_is_refused_the_backend_answers_503_naming_why(proxy, upstream):
    upstream.configure(invalid_keys=[KEY_BAD, KEY_GOOD])
    first = post(proxy, {"model": "kimi-c"})
    # Not the upstream's 401: the client would read it as "your API key is wrong".
    assert first.status_code == 503
    assert first.headers["x-should-retry"] == "false"
    assert first.json()["error"]["code"] == "no_usable_key"
    assert "refused the proxy's API key 'key-bad', 'key-good'" in first.json()["error"]["message"]
    second = post(proxy, {"model": "kimi-c"})
    assert second.status_code == 503
    message = second.json()["error"]["message"]
    assert "key 'key-bad' is invalid (401 from upstream" in message
    assert "key 'key-good' is invalid" in message
    assert len(upstream.requests()) == 2


# ------------------------------------------------------------------ backend protection


def test_a_models_5xx_open_its_circuit_which_half_opens_after_the_cooldown(proxy, upstream):
    # Three clients (one client's streak is its own, and the reconnect throttle is per
    # client and model); a 5xx is the model's: the backend's other models stay served.
    for key in (CLIENT_A, CLIENT_B, CLIENT_C):
        body = {"model": "breaker-broken", "mock": {"status": 500}}
        assert post(proxy, body, key=key).status_code == 500
    refused = post(proxy, {"model": "breaker-broken"}, key=CLIENT_D)  # (a-c: throttled)
    assert refused.status_code == 503
    assert error_code(refused) == "backend_unavailable"
    assert "Model 'breaker-broken' on backend 'breaky'" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert len(upstream.requests()) == 3  # the open circuit did not call the upstream
    assert post(proxy, {"model": "breaker-other"}).status_code == 200  # its backend serves
    time.sleep(1.1)
    # Half-open: the probe is a client's whose failures are not the streak (team-a and
    # team-b are, for 10 s), and it closes the model's circuit.
    assert post(proxy, {"model": "breaker-broken"}, key=CLIENT_D).status_code == 200
    assert post(proxy, {"model": "breaker-broken"}).status_code == 200  # closed again
    assert "model 'breaker-broken': circuit open for 1 s after 3 failures" in proxy.log()
    assert "backend breaky: circuit open" not in proxy.log()


def test_one_clients_failing_requests_do_not_open_the_circuit_for_another(proxy, upstream):
    assert post(proxy, {"model": "storm-ok"}, key=CLIENT_B).status_code == 200
    # team-a's requests make the upstream fail (a poisoned body, say), again and again:
    # more than the 5 failures in a row that open the mock backend's circuit.
    for i in range(8):
        failed = post(proxy, {"model": f"kimi-{i}", "mock": {"status": 500}})
        assert failed.status_code == 500
    for i in range(2):  # team-b (3/minute) is still served: the circuit stayed closed
        assert post(proxy, {"model": f"storm-{i}"}, key=CLIENT_B).status_code == 200
    assert "backend mock: circuit open" not in proxy.log()


def test_backend_outbound_rate_limit_is_answered_by_the_proxy(proxy, upstream):
    statuses = [post(proxy, {"model": f"limited-{i}"}).status_code for i in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    response = post(proxy, {"model": "limited-9"})
    assert error_code(response) == "backend_rate_limited"
    assert int(response.headers["retry-after"]) > 0
    assert len(upstream.requests()) == 3


def test_fallback_serves_when_the_primary_cannot_be_reached(proxy, upstream):
    response = post(proxy, {"model": "fb-model", "messages": []})
    assert response.status_code == 200
    assert response.headers["x-proxy-backend"] == "mock"
    assert response.headers["x-proxy-model"] == "fallback-model"
    assert [r["model"] for r in upstream.requests()] == ["fallback-model"]


def test_first_byte_and_idle_timeouts_are_separate(proxy, upstream):
    slow_head = post(proxy, {"model": "slow-1", "mock": {"delay": 0.8}})
    assert slow_head.status_code == 200  # within first_byte (1.5 s), beyond idle (0.4 s)
    never = post(proxy, {"model": "slow-2", "mock": {"delay": 3}})
    assert never.status_code == 504
    body = {"model": "slow-3", "stream": True, "mock": {"chunk_delay": 0.8, "chunks": 3}}
    data = post(proxy, body).content  # the whole stream, as the client received it
    last = json.loads(data.strip().split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_timeout"


# ------------------------------------------------------------------ client keys and limits


def test_client_keys_are_required_and_checked(proxy, upstream):
    missing = post(proxy, {"model": "kimi-a"}, key="")
    assert missing.status_code == 401 and error_code(missing) == "invalid_api_key"
    wrong = post(proxy, {"model": "kimi-a"}, key=CLIENT_A[:-1] + "9")
    assert wrong.status_code == 401 and error_code(wrong) == "invalid_api_key"
    assert upstream.requests() == []
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model="kimi-a", messages=[])


def test_a_model_outside_the_clients_globs_is_403(proxy, upstream):
    response = post(proxy, {"model": "limited-1"}, key=CLIENT_B)
    assert response.status_code == 403
    assert error_code(response) == "model_not_allowed"
    assert upstream.requests() == []


def test_client_rate_limit_answers_429_with_openai_style_headers(proxy, upstream):
    statuses = [post(proxy, {"model": "kimi-rl"}, key=CLIENT_B).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = post(proxy, {"model": "kimi-rl"}, key=CLIENT_B)
    assert limited.status_code == 429
    assert error_code(limited) == "rate_limit_exceeded"
    assert limited.headers["x-ratelimit-limit-requests"] == "3"
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert post(proxy, {"model": "kimi-rl"}, key=CLIENT_A).status_code == 200  # others unaffected
    assert len(upstream.requests()) == 4


# ------------------------------------------------------------------ Redis storage


def test_limits_and_backoff_hold_on_redis_storage(upstream, redis_server, tmp_path):
    proxy = start_proxy(config(upstream, storage=redis_server.url), tmp_path)
    try:
        statuses = [post(proxy, {"model": "kimi-r"}, key=CLIENT_B).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        assert post(proxy, {"model": "storm-r", "mock": {"status": 500}}).status_code == 500
        assert error_code(post(proxy, {"model": "storm-r"})) == "reconnect_throttled"
    finally:
        proxy.stop()
    # The state lives in Redis, where another replica would read it.
    import redis

    keys = redis.Redis(port=redis_server.port).keys("*")
    assert any(b"team-b" in k for k in keys)
    assert any(b"reconnect" in k for k in keys)
