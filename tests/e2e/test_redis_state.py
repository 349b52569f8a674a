"""Redis-backed state under pressure: limits hold at any concurrency, a hung Redis costs
(almost) nothing, and garbage in Redis cannot crash or wedge the proxy."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import statistics
import time

import httpx
import pytest
import redis

from tests.conftest import MockUpstream, ProxyProcess, RedisServer, free_port, start_proxy

KEY = "sk-redis-state-00000000001"
CLIENT = "sk-redis-client-0000000002"
ADMIN = "admin-redis-state-000000003"


def config(mock: MockUpstream, redis_url: str) -> str:
    return f"""
storage: {redis_url}
server: {{admin_key: "{ADMIN}"}}
throttle: {{reconnect: {{base: 1s, max: 4s}}}}
clients:
  - {{id: team, key: "{CLIENT}", rate_limit: 20/minute}}
  - {{id: ops, key: "{CLIENT}-ops"}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: main, key: "{KEY}"}}]
    breaker: {{failures: 5, min_open: 1s, max_open: 3s}}
    max_cooldown: 5s
routes:
  - {{prefix: "", backend: mock}}
"""


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, free to be stopped (SIGSTOP) or filled with junk."""
    server = RedisServer(free_port(), None)  # type: ignore[arg-type]
    try:
        server.start()
    except Exception:  # no redis-server here: the redis_server fixture explains the skip
        pytest.skip("redis-server is not available")
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def proxy(upstream: MockUpstream, own_redis: RedisServer, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream, own_redis.url), tmp_path)
    yield process
    process.stop()


def post(proxy: ProxyProcess, key: str = f"{CLIENT}-ops", **mock) -> httpx.Response:
    body = {"model": "gpt-4o-mini", **({"mock": mock} if mock else {})}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers, timeout=10)


def storage_errors(proxy: ProxyProcess) -> float:
    admin = {"authorization": f"Bearer {ADMIN}"}
    for line in httpx.get(f"{proxy.url}/metrics", headers=admin).text.splitlines():
        if line.startswith("llm_proxy_storage_errors_total"):
            return float(line.split()[-1])
    raise AssertionError("no llm_proxy_storage_errors_total series")


@pytest.mark.serial  # Redis calls past their timeout fail open
def test_400_concurrent_requests_against_a_20_per_minute_limit_let_exactly_20_through(
    proxy, upstream
):
    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            headers = {"authorization": f"Bearer {CLIENT}"}
            body = {"model": "gpt-4o-mini"}
            url = f"{proxy.base_url}/chat/completions"
            responses = await asyncio.gather(
                *(client.post(url, json=body, headers=headers) for _ in range(400)),
                return_exceptions=True,
            )
        return [r.status_code if isinstance(r, httpx.Response) else -1 for r in responses]

    statuses = asyncio.run(burst())
    passed, refused = statuses.count(200), statuses.count(429)
    print(f"\n400 concurrent vs 20/minute: {passed} x 200, {refused} x 429")
    assert statuses.count(200) == 20
    assert statuses.count(429) == 380
    assert len(upstream.requests()) == 20
    assert storage_errors(proxy) == 0  # no fail-open: the pool waited, it did not run out


@pytest.mark.serial  # latency bound
def test_a_hung_redis_adds_almost_no_latency_and_limits_come_back(proxy, own_redis):
    def latencies(count: int) -> list[float]:
        seen = []
        for _ in range(count):
            started = time.perf_counter()
            assert post(proxy).status_code == 200
            seen.append(time.perf_counter() - started)
        return seen

    healthy = latencies(20)
    os.kill(own_redis.process.pid, signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        hung = latencies(30)
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    added_median = statistics.median(hung) - statistics.median(healthy)
    print(
        f"\nhung Redis: median added {added_median * 1000:.1f} ms, "
        f"worst {max(hung) * 1000:.0f} ms "
        f"(healthy median {statistics.median(healthy) * 1000:.1f} ms)"
    )
    assert added_median < 0.05
    assert max(hung) < 0.6  # only the first request pays, until the health ping notices
    assert sum(t > 0.2 for t in hung) <= 2
    assert storage_errors(proxy) > 0
    assert "failing open" in proxy.log()
    time.sleep(0.6)  # the health ping sees Redis again
    statuses = [post(proxy, key=CLIENT).status_code for _ in range(22)]
    assert statuses.count(200) == 20 and statuses.count(429) == 2  # enforced again


GARBAGE = ("nan", "inf", "-1", "1e30", "abc")


@pytest.mark.parametrize("junk", GARBAGE)
def test_garbage_in_redis_is_ignored_or_capped_never_a_crash(proxy, upstream, own_redis, junk):
    store = redis.Redis(port=own_redis.port)
    # What the replicas write: a breaker's open-until, a key's cooldown and invalid mark, and a
    # (client, model) reconnect streak. Here every field holds the junk value.
    store.set("shared/breaker/mock", junk)
    store.hset(
        "reconnect/streak/ops/gpt-4o-mini",
        mapping={"failures": junk, "ratio": junk, "seen": junk, "until": junk},
    )
    base = f"shared/key/mock/main/{hashlib.sha256(KEY.encode()).hexdigest()[:16]}"
    store.set(f"{base}/cooldown", junk)
    store.set(f"{base}/invalid", junk)
    time.sleep(1.2)  # two sync rounds

    answer = post(proxy)
    if junk == "1e30":  # a time far ahead: capped, so the circuit and the key are back soon
        assert answer.status_code in (429, 503), answer.text
    else:  # not a time at all: ignored
        assert answer.status_code == 200, answer.text
    status = httpx.get(
        f"{proxy.url}/admin/status", headers={"authorization": f"Bearer {ADMIN}"}
    ).json()
    backend = status["backends"]["mock"]
    assert backend["breaker"]["state"] in ("closed", "open", "half_open")
    assert (backend["breaker"]["open_seconds"] or 0) <= 3  # max_open
    key = backend["keys"][0]
    assert key["state"] in ("ok", "cooldown")
    assert (key["cooldown_seconds"] or 0) <= 5  # max_cooldown
    assert float(answer.headers.get("retry-after-ms", 0)) / 1000 <= 5
    assert "ResponseError" not in proxy.log() and "Traceback" not in proxy.log()
    if junk == "1e30":
        # Capped states end by time: after max_cooldown (and max_open, and the background
        # probe closing the circuit), the proxy serves again with no help.
        time.sleep(5.2)
        # The background probe closed the circuit on probation: a real success ends that.
        assert post(proxy).status_code == 200
    # The streak script validates what it reads: a failure is recorded with no error, and it
    # is the first of a new streak (no wait yet).
    assert post(proxy, status=500).status_code == 500
    last = post(proxy)
    assert last.status_code == 200, last.text
    assert "ResponseError" not in proxy.log() and "Traceback" not in proxy.log()
