"""One model on several providers, through a real proxy in front of the mock upstream.

Each deployment is its own backend sending its own model id, so the mock (``by_model``)
can make one deployment slow or failing while the others answer. What the client sees is
read from the routing headers (``x-proxy-backend``, ``-key``, ``-attempts``); what reached
the upstream, from the mock's own request log.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import MockUpstream, ProxyProcess, free_port, start_proxy

pytestmark = pytest.mark.e2e


def pool_config(mock: MockUpstream, top: str = "") -> str:
    keys = "\n".join(
        f"""  {name}:
    base_url: {mock.url}/v1
    keys:
      - {{id: {name}-1, key: "sk-{name}-1-000000000000"}}
      - {{id: {name}-2, key: "sk-{name}-2-000000000000"}}"""
        for name in ("moonshot", "openrouter", "groq")
    )
    return f"""
{top}
server:
  routing_headers: true
  admin_key: "ak-admin-000000000000"
throttle:
  reconnect: {{enabled: false}}
backends:
{keys}
  dead:
    base_url: http://127.0.0.1:{free_port()}/v1
    keys: [{{id: dead-1, key: "sk-dead-1-000000000000"}}]
    timeout: {{connect: 1}}
    breaker: {{failures: 5, min_open: 60, max_open: 60}}  # no probe during a test
aliases:
  k2: kimi-k2
routes:
  - prefix: kimi-k2
    deployments:
      - {{backend: moonshot, model: kimi-k2-0711-preview, weight: 3}}
      - {{backend: openrouter, model: moonshotai/kimi-k2, weight: 1}}
      - {{backend: groq, model: moonshotai/kimi-k2-instruct, weight: 1}}
    affinity: none
  - prefix: sticky
    deployments:
      - {{backend: moonshot, model: sticky-a}}
      - {{backend: openrouter, model: sticky-b}}
      - {{backend: groq, model: sticky-c}}
  - prefix: by-client
    affinity: client
    deployments:
      - {{backend: moonshot, model: client-a}}
      - {{backend: openrouter, model: client-b}}
  - prefix: fast
    strategy: latency
    affinity: none
    deployments:
      - {{backend: moonshot, model: fast-a}}
      - {{backend: openrouter, model: fast-b}}
      - {{backend: groq, model: fast-c}}
  - prefix: half-dead
    affinity: none
    max_attempts: 2
    deployments:
      - {{backend: dead, model: half-dead-x, weight: 5}}
      - {{backend: moonshot, model: half-dead-a}}
  - prefix: flaky
    affinity: none
    deployments:
      - {{backend: moonshot, model: flaky-a}}
      - {{backend: openrouter, model: flaky-b}}
      - {{backend: groq, model: flaky-c}}
    fallback: [{{backend: moonshot, model: flaky-fallback}}]
"""


@pytest.fixture
def pool_proxy(upstream: MockUpstream, tmp_path: Path) -> Iterator[ProxyProcess]:
    process = start_proxy(pool_config(upstream), tmp_path)
    yield process
    process.stop()


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def many(
    url: str, bodies: list[dict[str, object]], headers: dict[str, str] | None = None
) -> list[httpx.Response]:
    """``bodies`` sent 16 at a time; bounded in time by the client's timeout."""
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:

        async def one(body: dict[str, object]) -> httpx.Response:
            async with limit:
                return await client.post("/v1/chat/completions", json=body, headers=headers)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_weighted_split_is_within_three_points_of_the_shares(pool_proxy: ProxyProcess) -> None:
    answers = asyncio.run(many(pool_proxy.url, [chat("kimi-k2")] * 2000))
    assert {a.status_code for a in answers} == {200}
    served = Counter(a.headers["x-proxy-backend"] for a in answers)
    shares = {name: served[name] / 2000 for name in ("moonshot", "openrouter", "groq")}
    assert shares == pytest.approx({"moonshot": 0.6, "openrouter": 0.2, "groq": 0.2}, abs=0.03)
    models = {a.headers["x-proxy-backend"]: a.headers["x-proxy-model"] for a in answers}
    assert models == {
        "moonshot": "kimi-k2-0711-preview",
        "openrouter": "moonshotai/kimi-k2",
        "groq": "moonshotai/kimi-k2-instruct",
    }


def test_a_session_stays_on_one_deployment_and_key_on_two_replicas(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = start_proxy(pool_config(upstream), tmp_path / "one")
    two = start_proxy(pool_config(upstream), tmp_path / "two")
    try:
        sources: list[tuple[dict[str, object], dict[str, str]]] = [
            ({"prompt_cache_key": "{s}"}, {}),
            ({}, {"x-claude-code-session-id": "{s}"}),
            ({}, {"session-id": "{s}"}),
            ({}, {"thread-id": "{s}"}),
        ]
        for extra, headers in sources:
            homes: dict[str, set[tuple[str, str]]] = {}
            for replica in (one, two):
                for s in range(12):  # 12 sessions: enough to spread over the homes
                    body = chat("sticky", **{k: str(v).format(s=s) for k, v in extra.items()})
                    sent = {k: v.format(s=s) for k, v in headers.items()}
                    answers = asyncio.run(many(replica.url, [body] * 5, sent))
                    homes.setdefault(str(s), set()).update(
                        (a.headers["x-proxy-backend"], a.headers["x-proxy-key"]) for a in answers
                    )
            assert all(len(h) == 1 for h in homes.values()), (extra, headers)
            assert len({h for hs in homes.values() for h in hs}) >= 3  # sessions spread
        # No session named: balanced on its own (both backends and keys used).
        plain = asyncio.run(many(one.url, [chat("sticky")] * 60))
        assert len({a.headers["x-proxy-backend"] for a in plain}) == 3
    finally:
        one.stop()
        two.stop()


def test_affinity_client_keeps_each_client_on_one_deployment(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    config = (
        pool_config(upstream)
        + """
clients:
  - {id: team-a, key: "ck-team-a-000000000000"}
  - {id: team-b, key: "ck-team-b-000000000000"}
  - {id: team-c, key: "ck-team-c-000000000000"}
"""
    )
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    replicas = [start_proxy(config, tmp_path / "one"), start_proxy(config, tmp_path / "two")]
    try:
        for team in ("team-a", "team-b", "team-c"):
            auth = {"authorization": f"Bearer ck-{team}-000000000000"}
            homes = set()
            for replica in replicas:  # the two replicas agree, with no shared state
                answers = asyncio.run(many(replica.url, [chat("by-client")] * 20, auth))
                assert {a.status_code for a in answers} == {200}
                homes |= {(a.headers["x-proxy-backend"], a.headers["x-proxy-key"]) for a in answers}
            assert len(homes) == 1, (team, homes)
    finally:
        for replica in replicas:
            replica.stop()


def test_latency_avoids_a_slow_deployment_and_wins_it_back(
    upstream: MockUpstream, pool_proxy: ProxyProcess
) -> None:
    fast = {"delay": 0.02}
    upstream.configure(by_model={"fast-a": fast, "fast-b": fast, "fast-c": {"delay": 0.2}})
    with httpx.Client(base_url=pool_proxy.url, timeout=10) as client:
        for _ in range(30):  # every deployment measured
            client.post("/v1/chat/completions", json=chat("fast"))
        picked = Counter(
            client.post("/v1/chat/completions", json=chat("fast")).headers["x-proxy-model"]
            for _ in range(200)
        )
        assert picked["fast-c"] <= 20, picked  # >= 90 % avoid the 10x slower one
        upstream.configure(by_model={"fast-a": fast, "fast-b": fast, "fast-c": fast})
        recovered = time.monotonic()
        back = None
        recent: deque[str] = deque(maxlen=60)
        while time.monotonic() - recovered < 30:
            answer = client.post("/v1/chat/completions", json=chat("fast"))
            recent.append(answer.headers["x-proxy-model"])
            # Won back: a fifth of the last 60 requests (a fair share is a third).
            if len(recent) == 60 and recent.count("fast-c") >= 12:
                back = time.monotonic() - recovered
                break
            time.sleep(0.02)
    assert back is not None and back < 30


def test_a_dead_deployment_costs_no_client_a_failure_and_is_left_once_open(
    pool_proxy: ProxyProcess,
) -> None:
    answers = asyncio.run(many(pool_proxy.url, [chat("half-dead")] * 200))
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["x-proxy-backend"] for a in answers} == {"moonshot"}
    attempts = [int(a.headers["x-proxy-attempts"]) for a in answers]
    assert max(attempts) <= 2  # max_attempts: the dead one at most once per request
    assert attempts[-50:] == [1] * 50  # its breaker is open: not tried at all
    admin = {"authorization": "Bearer ak-admin-000000000000"}
    status = httpx.get(f"{pool_proxy.url}/admin/status", headers=admin).json()
    pool = next(r for r in status["routes"] if r["prefix"] == "half-dead")
    health = {d["name"]: d["healthy"] for d in pool["deployments"]}
    assert health == {"dead/half-dead-x": False, "moonshot/half-dead-a": True}


def test_no_request_makes_more_than_max_attempts_upstream_calls(
    upstream: MockUpstream, pool_proxy: ProxyProcess
) -> None:
    """Random 5xx on every deployment and the fallback: counted at the upstream."""
    flaky = {"fail_ratio": 0.6}
    upstream.configure(
        by_model={m: flaky for m in ("flaky-a", "flaky-b", "flaky-c", "flaky-fallback")}
    )
    answers = asyncio.run(many(pool_proxy.url, [chat("flaky")] * 300))
    attempts = [int(a.headers["x-proxy-attempts"]) for a in answers]
    assert max(attempts) <= 3
    assert Counter(a.status_code for a in answers).keys() <= {200, 500, 503}
    received = [r for r in upstream.requests() if r["path"].endswith("/chat/completions")]
    assert len(received) == sum(attempts)  # every attempt counted, none unreported


def homes_of(url: str, sessions: range) -> dict[int, str]:
    bodies = [chat("sticky", prompt_cache_key=f"move-{s}") for s in sessions]
    answers = asyncio.run(many(url, bodies))
    assert {a.status_code for a in answers} == {200}
    return {s: a.headers["x-proxy-model"] for s, a in zip(sessions, answers, strict=True)}


def test_a_broken_deployments_sessions_move_and_come_back_the_others_stay(
    upstream: MockUpstream, pool_proxy: ProxyProcess
) -> None:
    sessions = range(90)
    before = homes_of(pool_proxy.url, sessions)
    assert set(before.values()) == {"sticky-a", "sticky-b", "sticky-c"}
    upstream.configure(by_model={"sticky-b": {"status": 500}})  # its model breaks
    for _ in range(3):  # its 5xx open its circuit; its sessions fail over meanwhile
        homes_of(pool_proxy.url, sessions)
    during = homes_of(pool_proxy.url, sessions)
    moved = [s for s in sessions if during[s] != before[s]]
    assert "sticky-b" not in during.values()
    assert all(before[s] == "sticky-b" for s in moved)  # only its own sessions moved
    assert len(moved) == sum(1 for s in sessions if before[s] == "sticky-b")  # all of them
    # Its share follows the weights (1 of 3): the rendezvous hash of these 90 fixed keys
    # gives 31 (34 %); more than ~3 standard deviations off would be a broken hash.
    assert 0.20 <= len(moved) / len(sessions) <= 0.47
    upstream.configure(by_model={})  # repaired: its circuit closes, its sessions return
    deadline = time.monotonic() + 30
    after = during
    while time.monotonic() < deadline and after != before:
        time.sleep(0.5)
        after = homes_of(pool_proxy.url, sessions)
    assert after == before


def test_a_deployment_that_fails_fast_loses_its_traffic_and_costs_no_client_an_error(
    upstream: MockUpstream, pool_proxy: ProxyProcess
) -> None:
    """Review of issue 20 (F1, F4): a deployment answering 404 model_not_found at once (a
    retired id) looked fast to the latency strategy, and its 404 reached the client."""
    missing = {"status": 404, "error": {"message": "no such model", "code": "model_not_found"}}
    upstream.configure(by_model={"fast-c": missing})
    with httpx.Client(base_url=pool_proxy.url, timeout=10) as client:
        answers = [client.post("/v1/chat/completions", json=chat("fast")) for _ in range(200)]
    assert {a.status_code for a in answers} == {200}
    retried = sum(int(a.headers["x-proxy-attempts"]) > 1 for a in answers)
    assert retried <= 40, retried  # it is tried now and then, not most of the time


def test_the_session_headers_are_the_configs_and_are_read_never_forwarded(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    """``session_headers`` replaces the defaults: a header it names keeps a session on one
    (deployment, key); one it no longer names is nobody's session (balanced); none of them
    reaches an upstream."""
    proxy = start_proxy(pool_config(upstream, "session_headers: [x-my-session]"), tmp_path)
    try:
        upstream.reset()
        homes: dict[int, set[tuple[str, str]]] = {}
        for s in range(12):
            answers = asyncio.run(many(proxy.url, [chat("sticky")] * 5, {"x-my-session": f"m{s}"}))
            homes[s] = {(a.headers["x-proxy-backend"], a.headers["x-proxy-key"]) for a in answers}
        assert all(len(h) == 1 for h in homes.values())
        assert len(set().union(*homes.values())) >= 3  # sessions spread
        old = {"x-claude-code-session-id": "one-session", "session-id": "one-session"}
        spread = asyncio.run(many(proxy.url, [chat("sticky")] * 60, old))
        assert len({a.headers["x-proxy-backend"] for a in spread}) == 3
        seen = [r["headers"] for r in upstream.requests() if str(r["model"]).startswith("sticky")]
        assert len(seen) == 12 * 5 + 60
        names = {"x-my-session", "x-claude-code-session-id", "session-id", "thread-id"}
        assert not [h for h in seen if names & set(h)]
    finally:
        proxy.stop()


def access_lines(proxy: ProxyProcess) -> dict[str, dict[str, object]]:
    time.sleep(0.2)  # the access log is flushed every 50 ms
    lines = [orjson.loads(t) for t in proxy.log().splitlines() if t.startswith('{"time"')]
    return {str(line["request_id"]): line for line in lines if "attempts" in line}


def test_the_fallback_waits_until_the_pool_is_spent_and_the_log_counts_every_attempt(
    upstream: MockUpstream, pool_proxy: ProxyProcess
) -> None:
    upstream.configure(by_model={m: {"status": 500} for m in ("flaky-a", "flaky-b")})
    with httpx.Client(base_url=pool_proxy.url, timeout=10) as client:
        ids = [f"fallback-test-{i}" for i in range(40)]
        answers = [
            client.post("/v1/chat/completions", json=chat("flaky"), headers={"x-request-id": i})
            for i in ids
        ]
        assert {a.status_code for a in answers} == {200}
        assert {a.headers["x-proxy-model"] for a in answers} == {"flaky-c"}  # no fallback
        logged = access_lines(pool_proxy)
        for i, a in zip(ids, answers, strict=True):  # the log's attempts are the header's
            line = logged[i]
            assert line["attempts"] == int(a.headers["x-proxy-attempts"])
            assert line["deployment"] == "groq/flaky-c"
        assert max(int(a.headers["x-proxy-attempts"]) for a in answers) > 1
        # Every deployment failing: once their circuits are open, the fallback serves.
        upstream.configure(by_model={m: {"status": 500} for m in ("flaky-a", "flaky-b", "flaky-c")})
        later = [client.post("/v1/chat/completions", json=chat("flaky")) for _ in range(30)]
    assert all(int(a.headers.get("x-proxy-attempts", "0")) <= 3 for a in later)
    served = [a for a in later if a.status_code == 200]
    assert served and {a.headers["x-proxy-model"] for a in served} == {"flaky-fallback"}
    assert later[-1].status_code == 200


def test_an_alias_onto_a_pool_is_balanced_and_the_deployment_metrics_name_only_the_config(
    pool_proxy: ProxyProcess,
) -> None:
    """Requests for ``k2`` (an alias of ``kimi-k2``) are the pool's; the per-deployment
    series are one per configured deployment, whatever model ids the clients send."""
    answers = asyncio.run(many(pool_proxy.url, [chat("k2")] * 200))
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["x-proxy-backend"] for a in answers} == {"moonshot", "openrouter", "groq"}
    junk = [chat(f"kimi-k2-{n}-junk") for n in range(50)] + [chat("kimi-k2\u00e9")]
    asyncio.run(many(pool_proxy.url, junk))
    time.sleep(1.2)  # the deployment gauges are set by the metrics loop, every second
    admin = {"authorization": "Bearer ak-admin-000000000000"}
    text = httpx.get(f"{pool_proxy.url}/metrics", headers=admin).text
    labels = set()
    for line in text.splitlines():
        if line.startswith("llm_proxy_deployment_"):
            labels.add(line.split('deployment="', 1)[1].split('"', 1)[0])
    configured = {
        f"{backend}/{model}"
        for backend, model in [
            ("moonshot", "kimi-k2-0711-preview"),
            ("openrouter", "moonshotai/kimi-k2"),
            ("groq", "moonshotai/kimi-k2-instruct"),
        ]
    }
    assert configured <= labels
    assert all(label.count("/") >= 1 and "junk" not in label for label in labels)
    assert len(labels) <= 17  # the pools' deployments in pool_config, no more
