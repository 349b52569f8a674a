"""``max_attempts`` bounds every upstream call of a request, whatever the upstream answers.

In-process (the pipeline's fake upstream): a pool of three deployments with two keys
each and a fallback, every upstream answer drawn by hypothesis (200, 5xx, 429, a refused
key, a 400, a body that is not JSON). Counted at the upstream: no request makes more
calls than ``max_attempts``, and ``x-proxy-attempts`` says exactly how many it made.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

import httpx
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_pipeline import (
    CHAT_ANSWER,
    FakeUpstream,
    Seen,
    chat,
    fake_upstream,
    proxy_in_front_of,
)

ANSWERS = st.sampled_from(["ok", "500", "503", "429", "401", "400", "junk"])


def pool_config(upstream: str, max_attempts: int) -> str:
    backends = "\n".join(
        f"""  {name}:
    base_url: {upstream}/{name}/v1
    keys:
      - {{id: {name}-1, key: sk-{name}-1-0000000000}}
      - {{id: {name}-2, key: sk-{name}-2-0000000000}}
    breaker: {{failures: 1000}}"""
        for name in ("a", "b", "c", "z")
    )
    return f"""
server: {{routing_headers: true, config_poll_interval: 0}}
throttle: {{reconnect: {{enabled: false}}}}
backends:
{backends}
routes:
  - prefix: m
    max_attempts: {max_attempts}
    affinity: none
    deployments:
      - {{backend: a, model: m-a}}
      - {{backend: b, model: m-b}}
      - {{backend: c, model: m-c}}
    fallback: [{{backend: z}}]
"""


def proxy(fake: FakeUpstream, max_attempts: int) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    return proxy_in_front_of(fake, pool_config(fake.url, max_attempts))


def answer_from(script: list[str]):
    answers = iter(script)

    async def answer(request: web.Request, seen: Seen) -> web.StreamResponse:
        kind = next(answers, "ok")
        if kind == "ok":
            return web.json_response(CHAT_ANSWER)
        if kind == "junk":
            return web.Response(status=502, text="<html>bad gateway</html>")
        if kind == "401":
            error = {"message": "Incorrect API key", "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=401)
        if kind == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        return web.json_response({"error": {"message": kind}}, status=int(kind))

    return answer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_attempts=st.integers(min_value=1, max_value=5),
    scripts=st.lists(st.lists(ANSWERS, max_size=8), min_size=1, max_size=6),
)
def test_no_request_makes_more_upstream_calls_than_max_attempts(max_attempts, scripts):
    async def main() -> None:
        async with fake_upstream() as fake, proxy(fake, max_attempts) as client:
            for script in scripts:
                fake.answer = answer_from(script)
                before = len(fake.posts())
                response = await client.post("/v1/chat/completions", json=chat("m"))
                calls = len(fake.posts()) - before
                assert calls <= max_attempts
                assert int(response.headers["x-proxy-attempts"]) == calls
                if calls == 0:  # every key cooling down (earlier 429s): refused at once
                    assert response.status_code in {429, 503}
                assert response.status_code in {200, 400, 429, 500, 502, 503}
                if response.status_code == 200:
                    assert response.json() == CHAT_ANSWER

    asyncio.run(asyncio.wait_for(main(), timeout=20))
