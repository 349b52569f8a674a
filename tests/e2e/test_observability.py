"""Metrics, logs, admin and readiness, read the way Prometheus and operators read them."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MockUpstream, ProxyProcess, free_port, start_proxy

KEY_A = "sk-obs-aaaaaaaaaaaaaaaa0001"
KEY_B = "sk-obs-bbbbbbbbbbbbbbbb0002"
CLIENT = "sk-obs-client-000000000042"
ADMIN = "adm-obs-000000000000000777"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}


def config(mock: MockUpstream) -> str:
    return f"""
server: {{admin_key: "{ADMIN}"}}
throttle: {{reconnect: {{base: 5s, max: 10s, after: 1, min_failure_ratio: 0}}}}
clients:
  - {{id: team-obs, key: "{CLIENT}"}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys:
      - {{id: obs-a, key: "{KEY_A}"}}
      - {{id: obs-b, key: "{KEY_B}"}}
    models: [obs-model]
  missing:
    base_url: http://127.0.0.1:{free_port()}/v1
    keys: [{{id: missing-main, key: "${{OBS_UNSET_KEY}}"}}]
pricing:
  obs-model: {{input: 1.0, output: 4.0}}
aliases:
  obs: obs-model
routes:
  - {{prefix: "obs", backend: mock}}
  - {{prefix: "", backend: mock}}
"""


def scrape(proxy: ProxyProcess) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{proxy.url}/metrics", headers=ADMIN_HEADERS).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample's value; a missing series fails the test (a 0 must be a real 0)."""
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"no series {name}{labels}"
    return samples[key]


def post(proxy: ProxyProcess, body: dict, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {CLIENT}", **kw.pop("headers", {})}
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers, **kw)


@pytest.fixture
def proxy(upstream, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream), tmp_path)
    yield process
    process.stop()


def test_metric_values_after_known_traffic(proxy, upstream):
    for _ in range(3):
        assert post(proxy, {"model": "obs", "messages": []}).status_code == 200
    stream = {
        "model": "obs",
        "stream": True,
        "stream_options": {"include_usage": True},
        "mock": {"chunks": 4},
    }
    assert b"[DONE]" in post(proxy, stream).content
    assert post(proxy, {"model": "obs", "mock": {"status": 500}}).status_code == 500
    assert post(proxy, {"model": "obs"}).status_code == 429  # reconnect throttle
    assert post(proxy, {"model": "client-sent-anything"}).status_code == 200
    m = scrape(proxy)

    labels = {"client": "team-obs", "backend": "mock", "model": "obs-model", "endpoint": "openai"}
    labels["upstream_wire"] = "native"
    assert value(m, "llm_proxy_requests_total", **labels, status="200", stream="false") == 3
    assert value(m, "llm_proxy_requests_total", **labels, status="200", stream="true") == 1
    assert value(m, "llm_proxy_requests_total", **labels, status="500", stream="false") == 1
    assert value(m, "llm_proxy_requests_total", **labels, status="429", stream="false") == 1
    # A model id no config names is labelled by its route's pattern, never by the raw string.
    assert (
        value(
            m,
            "llm_proxy_requests_total",
            client="team-obs",
            backend="mock",
            model="*",
            endpoint="openai",
            status="200",
            stream="false",
            upstream_wire="native",
        )
        == 1
    )
    assert not any("client-sent-anything" in str(k) for k in m)

    assert (
        value(
            m,
            "llm_proxy_request_duration_seconds_count",
            backend="mock",
            model="obs-model",
            stream="false",
        )
        == 4
    )  # 3 ok + the 500
    assert (
        value(m, "llm_proxy_time_to_first_token_seconds_count", backend="mock", model="obs-model")
        == 1
    )
    # usage: 3 x (5 prompt, 7 completion) in JSON, the stream's 5 + 4 in its last chunk.
    tokens = {"client": "team-obs", "backend": "mock", "model": "obs-model"}
    assert value(m, "llm_proxy_tokens_total", **tokens, type="prompt") == 20
    assert value(m, "llm_proxy_tokens_total", **tokens, type="completion") == 25
    # obs-model is priced at $1 and $4 per million: 20 x 1 + 25 x 4.
    assert value(m, "llm_proxy_cost_usd_total", **tokens) == pytest.approx(120 / 1e6)
    assert value(m, "llm_proxy_overhead_seconds_count") == 6
    assert value(m, "llm_proxy_streams_active", backend="mock") == 0
    assert value(m, "llm_proxy_throttled_total", reason="reconnect") == 1
    assert sum(v for (n, labels_), v in m.items() if n == "llm_proxy_upstream_errors_total") == 1
    assert value(m, "llm_proxy_key_usable", backend="mock", key="obs-a") == 1
    assert value(m, "llm_proxy_key_usable", backend="missing", key="missing-main") == 0
    assert value(m, "llm_proxy_circuit_open", backend="mock") == 0
    assert value(m, "llm_proxy_build_info", version="0.1.0") == 1
    assert value(m, "llm_proxy_config_reloads_total", result="failure") == 0


def test_active_streams_gauge_counts_streams_in_flight(proxy, upstream):
    body = {"model": "obs", "stream": True, "mock": {"chunks": 10, "chunk_delay": 0.1}}
    with httpx.stream(
        "POST",
        f"{proxy.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {CLIENT}"},
    ) as response:
        chunks = response.iter_raw()  # kept: a dropped iterator closes the connection
        next(chunks)
        assert value(scrape(proxy), "llm_proxy_streams_active", backend="mock") == 1
    # The client left: the stream is read on for its usage for server.usage_grace (2 s)
    # at most, then it is over.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if value(scrape(proxy), "llm_proxy_streams_active", backend="mock") == 0:
            break
        time.sleep(0.1)
    assert value(scrape(proxy), "llm_proxy_streams_active", backend="mock") == 0


def test_one_json_log_line_per_request_with_every_field_and_no_secret(proxy, upstream):
    post(proxy, {"model": "obs", "stream": True}, headers={"x-request-id": "trace-1"})
    post(proxy, {"model": "obs", "mock": {"status": 503}}, headers={"x-request-id": "trace-2"})
    time.sleep(0.2)
    log = proxy.log()
    lines = {}
    for line in log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "request_id" in entry:  # an access line; the others are log records
                lines[entry["request_id"]] = entry
    ok, failed = lines["trace-1"], lines["trace-2"]
    for field in (
        "time",
        "request_id",
        "client",
        "method",
        "path",
        "model",
        "upstream_model",
        "backend",
        "key",
        "status",
        "duration_ms",
        "ttft_ms",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "error",
    ):
        assert field in ok, field
    assert (ok["client"], ok["backend"], ok["model"], ok["upstream_model"]) == (
        "team-obs",
        "mock",
        "obs",
        "obs-model",
    )
    assert ok["key"] in ("obs-a", "obs-b") and ok["stream"] is True and ok["ttft_ms"] > 0
    # The client did not ask for usage: the proxy asked for it, and counted it.
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (5, 3)
    assert failed["status"] == 503 and failed["error"] == "status_5xx"
    for secret in (KEY_A, KEY_B, CLIENT, ADMIN):
        assert secret not in log
    assert "uvicorn.access" not in log


def test_admin_status_shows_state_without_secrets(proxy, upstream):
    post(proxy, {"model": "obs"})
    assert httpx.get(f"{proxy.url}/admin/status").status_code == 401
    wrong = httpx.get(f"{proxy.url}/admin/status", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    response = httpx.get(f"{proxy.url}/admin/status", headers={"authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 200
    status = response.json()
    keys = {k["id"]: k for k in status["backends"]["mock"]["keys"]}
    assert keys["obs-a"]["fingerprint"] == "sk-…0001"
    assert keys["obs-a"]["state"] == "ok"
    assert status["backends"]["missing"]["keys"][0]["state"] == "missing"
    assert status["backends"]["mock"]["breaker"]["state"] == "closed"
    assert status["aliases"] == {"obs": "obs-model"}
    assert status["routes"][0] == {
        "prefix": "obs",
        "backend": "mock",
        "strip_prefix": False,
        "key": None,
        "fallback": [],
        "max_attempts": 3,
        "affinity": "session",
    }
    assert len(status["config"]["sha256"]) == 64 and status["config"]["loaded_at"]
    for secret in (KEY_A, KEY_B, CLIENT, ADMIN):
        assert secret not in response.text


def test_admin_status_does_not_exist_without_an_admin_key(upstream, tmp_path):
    proxy = start_proxy(config(upstream).replace(f'server: {{admin_key: "{ADMIN}"}}', ""), tmp_path)
    try:
        response = httpx.get(f"{proxy.url}/admin/status", headers={"authorization": "Bearer x"})
        assert response.status_code == 404
    finally:
        proxy.stop()


def test_health_and_readiness(proxy, upstream, tmp_path):
    assert httpx.get(f"{proxy.url}/health").status_code == 200
    ready = httpx.get(f"{proxy.url}/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "backends": ["mock"]}
    no_keys = config(upstream).replace(f'"{KEY_A}"', '""').replace(f'"{KEY_B}"', '""')
    (tmp_path / "unready").mkdir()
    unready = start_proxy(no_keys, tmp_path / "unready")
    try:
        assert httpx.get(f"{unready.url}/health").status_code == 200
        assert httpx.get(f"{unready.url}/ready").status_code == 503
    finally:
        unready.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_counts_are_summed_over_workers(upstream, tmp_path, workers):
    proxy = start_proxy(config(upstream), tmp_path, extra_args=("--workers", str(workers)))
    try:
        for _ in range(20):
            with httpx.Client() as c:  # a new connection each time: spread over the workers
                c.post(
                    f"{proxy.base_url}/chat/completions",
                    json={"model": "obs"},
                    headers={"authorization": f"Bearer {CLIENT}"},
                )
        totals = set()
        for _ in range(6):  # whichever worker answers the scrape, the sum is the same
            with httpx.Client() as c:
                text = c.get(f"{proxy.url}/metrics", headers=ADMIN_HEADERS).text
            m = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            totals.add(
                value(
                    m,
                    "llm_proxy_requests_total",
                    client="team-obs",
                    backend="mock",
                    model="obs-model",
                    status="200",
                    stream="false",
                    endpoint="openai",
                    upstream_wire="native",
                )
            )
        assert totals == {20.0}
    finally:
        proxy.stop()
