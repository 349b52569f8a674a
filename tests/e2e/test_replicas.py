"""Two proxy replicas sharing one real redis-server behave as one proxy."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from tests.conftest import MockUpstream, ProxyProcess, RedisServer, start_proxy

KEY_BAD = "sk-replica-bad-0000000001"
KEY_GOOD = "sk-replica-good-000000002"
CLIENT = "sk-replica-client-0000003"
ADMIN = "adm-replica-00000000000004"


def config(mock: MockUpstream, redis_url: str) -> str:
    return f"""
storage: {redis_url}
server: {{admin_key: "{ADMIN}"}}
throttle: {{reconnect: {{base: 2s, max: 8s}}}}
clients:
  - {{id: team, key: "{CLIENT}", rate_limit: 10/minute, models: ["limit-*"]}}
  - {{id: ops, key: "{CLIENT}-ops"}}
  - {{id: ops-2, key: "{CLIENT}-ops-2"}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys:
      - {{id: key-bad, key: "{KEY_BAD}"}}
      - {{id: key-good, key: "{KEY_GOOD}"}}
    key_probe_interval: 300
  fragile:
    base_url: {mock.url}/v1
    keys: [{{id: fragile-main, key: "{KEY_GOOD}"}}]
    breaker: {{failures: 2, min_open: 20s, max_open: 20s}}
    timeout: {{first_byte: 0.5}}
routes:
  - {{prefix: "fragile-", backend: fragile}}
  - {{prefix: "", backend: mock}}
"""


@pytest.fixture
def replicas(upstream, redis_server: RedisServer, tmp_path):
    redis.Redis(port=redis_server.port).flushall()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_proxy(config(upstream, redis_server.url), tmp_path / "a")
    b = start_proxy(config(upstream, redis_server.url), tmp_path / "b")
    yield a, b
    a.stop()
    b.stop()


def post(proxy: ProxyProcess, model: str, key: str = f"{CLIENT}-ops", **mock) -> httpx.Response:
    body = {"model": model, **({"mock": mock} if mock else {})}
    return httpx.post(
        f"{proxy.base_url}/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def test_a_client_limit_of_10_per_minute_holds_across_both_replicas(replicas, upstream):
    a, b = replicas
    statuses = [post((a, b)[i % 2], "limit-m", key=CLIENT).status_code for i in range(16)]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 6
    assert len(upstream.requests()) == 10


@pytest.mark.serial  # the wait left is read against a 1.5-2 s window
def test_a_reconnect_storm_alternating_between_replicas_is_throttled_as_one(replicas, upstream):
    a, b = replicas
    # Three failures in a row, alternating replicas: one streak, so the fourth waits.
    for proxy in (a, b, a):
        assert post(proxy, "storm", status=500).status_code == 500
    refused = post(b, "storm", status=500)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "reconnect_throttled"
    assert 1.5 <= float(refused.headers["retry-after-ms"]) / 1000 <= 2.0  # base 2 s, jittered
    assert post(a, "storm", status=500).status_code == 429
    assert len(upstream.requests()) == 3


def test_a_key_refused_on_one_replica_is_taken_out_on_the_other(replicas, upstream):
    a, b = replicas
    upstream.configure(invalid_keys=[KEY_BAD])
    assert post(a, "any").status_code == 200  # key-bad refused, retried on key-good
    time.sleep(1.2)  # two sync rounds
    upstream.reset()
    upstream.configure(invalid_keys=[KEY_BAD])
    for _ in range(4):
        assert post(b, "any").headers["x-proxy-key"] == "key-good"
    assert {r["key"] for r in upstream.requests()} == {KEY_GOOD}  # b never tried key-bad
    assert (
        "key key-bad taken out of rotation: refused upstream (seen by another replica)" in b.log()
    )


def test_a_circuit_opened_on_one_replica_is_open_on_the_other(replicas, upstream):
    a, b = replicas
    # Two clients time out (one client's streak would be its own; a 5xx only the model's).
    for i in range(2):
        key = (f"{CLIENT}-ops", f"{CLIENT}-ops-2")[i]
        assert post(a, f"fragile-{i}", key=key, delay=1.5).status_code == 504
    time.sleep(1.2)
    upstream.reset()
    refused = post(b, "fragile-x")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert upstream.requests() == []


def test_redis_down_fails_open_loudly_and_recovers(replicas, upstream, redis_server):
    a, _ = replicas
    redis_server.stop()
    try:
        started = time.monotonic()
        statuses = [post(a, "limit-x", key=CLIENT).status_code for _ in range(12)]
        assert statuses == [200] * 12  # limits not enforced, nothing refused or hung
        assert time.monotonic() - started < 10
        admin = {"authorization": f"Bearer {ADMIN}"}
        metrics = httpx.get(f"{a.url}/metrics", headers=admin).text
        errors = [
            line
            for line in metrics.splitlines()
            if line.startswith("llm_proxy_storage_errors_total")
        ]
        assert float(errors[0].split()[-1]) > 0
        assert "throttle storage failed" in a.log() and "failing open" in a.log()
    finally:
        redis_server.start()
    time.sleep(0.5)
    statuses = [post(a, "limit-y", key=CLIENT).status_code for _ in range(12)]
    # Enforced again. (One request may still fail open while a pooled connection from
    # before the restart is found dead and replaced.)
    assert statuses.count(200) in (10, 11) and statuses.count(429) == 12 - statuses.count(200)
    assert statuses[-1] == 429
