"""An open circuit recovers by itself: the background probe, with no client traffic."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import MockUpstream, ProxyProcess, free_port, start_proxy

KEY = "sk-breaker-probe-0000000001"


def config(mock: MockUpstream) -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: main, key: "{KEY}"}}]
    breaker: {{failures: 2, min_open: 0.5s, max_open: 2s}}
    timeout: {{first_byte: 0.3}}
  dead:
    base_url: http://127.0.0.1:{free_port()}/v1
    keys: [{{id: dead-main, key: "{KEY}"}}]
    breaker: {{failures: 1, min_open: 0.5s, max_open: 1s}}
routes:
  - {{prefix: "dead-", backend: dead}}
  - {{prefix: "", backend: mock}}
"""


@pytest.fixture
def proxy(upstream: MockUpstream, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream), tmp_path)
    yield process
    process.stop()


def post(proxy: ProxyProcess, model: str, **mock) -> httpx.Response:
    body = {"model": model, **({"mock": mock} if mock else {})}
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, timeout=10)


def circuit_gauge(proxy: ProxyProcess, backend: str) -> float:
    for line in httpx.get(f"{proxy.url}/metrics").text.splitlines():
        if line.startswith("llm_proxy_circuit_open") and f'backend="{backend}"' in line:
            return float(line.split()[-1])
    raise AssertionError(f"no llm_proxy_circuit_open series for {backend}")


def test_ready_recovers_with_no_client_traffic(proxy, upstream):
    post(proxy, "dead-x")  # the dead backend's circuit is open for good: not what /ready needs
    # Timeouts: the backend's (a 5xx would be only the model's).
    assert post(proxy, "m", delay=1).status_code == 504
    assert post(proxy, "m", delay=1).status_code == 504
    assert post(proxy, "m").json()["error"]["code"] == "backend_unavailable"
    assert httpx.get(f"{proxy.url}/ready").status_code == 503
    upstream.reset()
    # Nothing more from clients: the probe's GET /models after 0.5 s closes the circuit.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and httpx.get(f"{proxy.url}/ready").status_code != 200:
        time.sleep(0.1)
    assert httpx.get(f"{proxy.url}/ready").json() == {"ready": True, "backends": ["mock"]}
    probes = [r for r in upstream.requests(probes=True) if r["method"] == "GET"]
    assert [r["path"] for r in probes] == ["/v1/models"]
    assert probes[0]["key"] == KEY
    assert circuit_gauge(proxy, "mock") == 0
    assert "backend mock: circuit closed again (background probe answered" in proxy.log()
    assert post(proxy, "m").status_code == 200


def test_a_probe_that_fails_reopens_the_circuit_with_a_doubled_cooldown(proxy):
    assert post(proxy, "dead-x").status_code == 502
    time.sleep(2.0)  # 0.5 s open, a failed probe, 1 s open (the cap), another failed probe
    log = proxy.log()
    assert "backend dead: circuit open for 0.5 s after 1 failures in a row" in log
    assert "backend dead: circuit open for 1 s after a failed probe" in log
    assert "backend dead: circuit probe GET /models got" in log
    assert circuit_gauge(proxy, "dead") == 1
    refused = post(proxy, "dead-x")
    assert refused.json()["error"]["code"] == "backend_unavailable"
