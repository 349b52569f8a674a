"""Spend you can see and cap, through a real proxy in front of the mock upstream: cost
counters that equal the usage times the prices, budgets refused once spent on two
replicas sharing one Redis, tpm under concurrency, /admin/usage and the token headers."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.conftest import MockUpstream, ProxyProcess, RedisServer, start_proxy

pytestmark = pytest.mark.e2e

ADMIN = "ak-spend-admin-0000000000"
KEYS = {c: f"ck-{c}-00000000000000" for c in ("team-a", "team-b", "team-c", "team-t")}
PRICE_IN, PRICE_OUT = 2.0, 8.0  # USD per million tokens, for spend-model


def config(mock: MockUpstream, storage: str = "memory://", tpm: int = 3000) -> str:
    return f"""
server: {{admin_key: "{ADMIN}", routing_headers: true}}
storage: {storage}
throttle: {{reconnect: {{enabled: false}}}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: spend-key, key: "sk-spend-000000000000"}}]
    models: [spend-model, unpriced-model]
pricing:
  spend-model: {{input: {PRICE_IN}, output: {PRICE_OUT}}}
clients:
  - {{id: team-a, key: "{KEYS["team-a"]}"}}
  - {{id: team-b, key: "{KEYS["team-b"]}"}}
  - {{id: team-c, key: "{KEYS["team-c"]}", budget: {{usd: 0.0002, per: day}}}}
  - {{id: team-t, key: "{KEYS["team-t"]}", tpm: {tpm}}}
spend: {{default_max_tokens: 20}}
"""


def samples(proxy: ProxyProcess, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = httpx.get(f"{proxy.url}/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match[1])))
            found[labels] = float(match[2])
    return found


def sdk(proxy: ProxyProcess, client: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=KEYS[client], max_retries=0)


def test_cost_counters_equal_the_usage_times_the_prices_per_client(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(config(upstream), tmp_path)
    try:
        for client in ("team-a", "team-b"):
            api = sdk(proxy, client)
            api.chat.completions.create(
                model="spend-model", messages=[{"role": "user", "content": "hi"}]
            )
            stream = api.chat.completions.create(
                model="spend-model", messages=[{"role": "user", "content": "hi"}], stream=True
            )  # no stream_options: the proxy asks for usage itself
            assert len(list(stream)) > 1
            api.responses.create(model="spend-model", input="hi")
            api.embeddings.create(model="spend-model", input="hi")
            with api.chat.completions.with_streaming_response.create(
                model="spend-model",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_body={"mock": {"chunks": 50, "chunk_delay": 0.01}},
            ) as cut:
                next(cut.iter_bytes())  # the client leaves early
            api.chat.completions.create(
                model="unpriced-model", messages=[{"role": "user", "content": "hi"}]
            )
        time.sleep(3)  # the cut stream's grace, then its line
        tokens = samples(proxy, "llm_proxy_tokens_total")
        cost = samples(proxy, "llm_proxy_cost_usd_total")
        unpriced = samples(proxy, "llm_proxy_unpriced_requests_total")
    finally:
        proxy.stop()
    for client in ("team-a", "team-b"):

        def count(kind: str, client: str = client) -> float:
            key = (
                ("backend", "mock"),
                ("client", client),
                ("model", "spend-model"),
                ("type", kind),
            )
            return tokens.get(key, 0.0)

        assert count("prompt") > 0 and count("completion") > 0
        expected = (count("prompt") * PRICE_IN + count("completion") * PRICE_OUT) / 1e6
        key = (("backend", "mock"), ("client", client), ("model", "spend-model"))
        assert cost[key] == pytest.approx(expected, abs=0.005)  # to the cent
        assert cost[key] == pytest.approx(expected, rel=1e-9)  # ... and exactly
    assert unpriced[(("backend", "mock"), ("model", "unpriced-model"))] == 2


def test_a_spent_budget_is_refused_on_both_replicas_sharing_redis(
    upstream: MockUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    direct = redis.Redis.from_url(redis_server.url)
    for key in direct.scan_iter("llm-proxy:spend:team-c:*"):
        direct.delete(key)
    direct.close()
    one = start_proxy(config(upstream, redis_server.url), tmp_path / "one")
    two = start_proxy(config(upstream, redis_server.url), tmp_path / "two")
    try:
        statuses = []
        for i in range(40):  # each answer costs 5 x $2 + 7 x $8 per million: $0.000066
            replica = (one, two)[i % 2]
            answer = httpx.post(
                f"{replica.base_url}/chat/completions",
                json={"model": "spend-model", "messages": [], "max_tokens": 7},
                headers={"authorization": f"Bearer {KEYS['team-c']}"},
            )
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                error = answer.json()["error"]
                assert error["code"] == "budget_exceeded"
                assert "$0.0002 per day" in error["message"]
                assert int(answer.headers["retry-after"]) > 0
                assert answer.headers["x-should-retry"] == "false"
        assert 2 <= statuses.count(200) <= 3 and statuses[-2:] == [429, 429]  # both replicas
        usage = httpx.get(f"{one.url}/admin/usage", headers={"authorization": f"Bearer {ADMIN}"})
        [budget] = usage.json()["clients"]["team-c"]
        assert budget["limit"] == "budget" and budget["remaining"] < 0.0001  # < an estimate
        assert budget["used"] == pytest.approx(0.000066 * statuses.count(200))
        assert "litellm" in usage.json()["prices"]
    finally:
        one.stop()
        two.stop()


def test_tpm_holds_within_ten_percent_under_concurrency_32_streams_included(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(config(upstream, tpm=600), tmp_path)
    try:
        if time.time() % 60 > 40:  # one minute window for the whole test
            time.sleep(61 - time.time() % 60)
        start_minute = int(time.time() // 60)

        async def run() -> list[httpx.Response]:
            limit = asyncio.Semaphore(32)
            auth = {"authorization": f"Bearer {KEYS['team-t']}"}
            async with httpx.AsyncClient(base_url=proxy.base_url, timeout=10) as client:

                async def one(i: int) -> httpx.Response:
                    body = {"model": "spend-model", "messages": [], "max_tokens": 10}
                    if i % 2:
                        body |= {"stream": True, "mock": {"chunks": 10}}
                    async with limit:
                        return await client.post("/chat/completions", json=body, headers=auth)

                return await asyncio.gather(*(one(i) for i in range(200)))

        answers = asyncio.run(run())
        assert int(time.time() // 60) == start_minute
    finally:
        proxy.stop()
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert served and refused and len(served) + len(refused) == 200
    used = sum(12 if "data:" not in a.text else 15 for a in served)  # the mock's usage
    assert used <= 600 * 1.1
    assert used >= 600 * 0.5  # the limit is not far below what was allowed either
    first = served[0].headers
    assert first["x-ratelimit-limit-tokens"] == "600"
    assert int(first["x-ratelimit-remaining-tokens"]) < 600
    assert refused[0].json()["error"]["code"] == "budget_exceeded"


def test_a_budget_in_usd_refuses_a_model_without_a_price_and_hides_the_keys_headers(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    """Review of issue 21: an unpriced model's requests cost a USD budget nothing, and a
    limited client saw the operator key's token headers."""
    proxy = start_proxy(config(upstream), tmp_path)
    try:
        auth = {"authorization": f"Bearer {KEYS['team-c']}"}
        refused = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": "unpriced-model", "messages": []},
            headers=auth,
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "unpriced_model"
        key_headers = {"x-ratelimit-remaining-tokens": "123", "x-ratelimit-limit-tokens": "9"}
        body = {"model": "spend-model", "messages": [], "mock": {"headers": key_headers}}
        served = httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=auth)
        assert served.status_code == 200 and "x-ratelimit-remaining-tokens" not in served.headers
        other = {"authorization": f"Bearer {KEYS['team-a']}"}  # no limits: the key's own
        plain = httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=other)
        assert plain.headers["x-ratelimit-remaining-tokens"] == "123"
    finally:
        proxy.stop()
