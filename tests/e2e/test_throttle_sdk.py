"""The reconnect throttle against the real openai SDK: its own retries pass, storms do not.

A real proxy process, the mock upstream failing 10% of requests at random, and the openai
SDK with its default ``max_retries=2``: through the proxy, as many requests succeed as
directly (minus one) in at most 1.5x the time (plus one retry sleep of luck). A client
reconnecting every 250 ms to an upstream that always fails reaches it only a handful of
times.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import MockUpstream, ProxyProcess, free_port, start_proxy

KEY = "sk-throttle-sdk-000000000001"
REQUESTS = 200
CONCURRENCY = 10
FLAKY = {"mock": {"fail_ratio": 0.1}}
# A batch's wall time is mostly its slowest request's retry sleeps (the SDK's 0.5 s, then
# 1 s): whether the last few requests drew a second failure is luck of 1 s either way, the
# same for either side. A throttle that blocked the retries would cost ~1 s per request
# that failed (about 20 per batch) and show up as reconnect_throttled, checked below.
TAIL_SLACK = 1.0


def config(mock: MockUpstream) -> str:
    # The default throttle and breaker, no client keys: the throttle keys on the address.
    # The dead backend's breaker is out of the way: that test is about the throttle alone.
    return f"""
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: main, key: "{KEY}"}}]
  dead:
    base_url: http://127.0.0.1:{free_port()}/v1
    keys: [{{id: dead-main, key: "{KEY}"}}]
    breaker: {{failures: 1000}}
routes:
  - {{prefix: "dead-", backend: dead}}
  - {{prefix: "", backend: mock}}
"""


@pytest.fixture
def proxy(upstream: MockUpstream, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream), tmp_path)
    yield process
    process.stop()


async def sdk_batch(base_url: str) -> tuple[int, float]:
    """200 chat completions, 10 at a time, SDK defaults: (successes, wall seconds)."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=2)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> bool:
        async with gate:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[], extra_body=FLAKY
                )
                return True
            except openai.APIError:
                return False

    started = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    elapsed = time.monotonic() - started
    await client.close()
    return sum(results), elapsed


@pytest.mark.serial  # retries and storms on the clock
def test_sdk_retries_on_a_10_percent_flaky_upstream_pass_the_proxy(proxy, upstream):
    # Both counts hang on luck (a request whose three tries all fail: about 0.2 per batch
    # of 200), and so does the wall time (a failed retry sleeps ~1 s at the tail). So up to
    # 3 (direct, proxy) pairs are measured, back to back; the proxy must keep up in one of
    # them, and must never refuse anything itself. A throttle that blocks SDK retries
    # (1 s each) fails all three.
    runs = []
    for _ in range(3):
        direct_ok, direct_time = asyncio.run(sdk_batch(f"{upstream.url}/v1"))
        proxy_ok, proxy_time = asyncio.run(sdk_batch(proxy.base_url))
        runs.append((direct_ok, direct_time, proxy_ok, proxy_time))
        print(
            f"\ndirect: {direct_ok}/{REQUESTS} in {direct_time:.2f} s; "
            f"proxy: {proxy_ok}/{REQUESTS} in {proxy_time:.2f} s"
        )
        assert direct_ok >= REQUESTS - 5  # the workload is what it claims: retries mostly win
        assert proxy_ok >= REQUESTS - 5
        if proxy_ok >= direct_ok - 1 and proxy_time <= 1.5 * direct_time + TAIL_SLACK:
            break
    else:
        pytest.fail(f"the proxy fell behind direct in every run: {runs}")
    log = proxy.log()
    assert "reconnect_throttled" not in log  # every failure the SDK saw was the upstream's
    assert "backend_unavailable" not in log


@pytest.mark.serial  # retries and storms on the clock
def test_a_250ms_reconnect_loop_to_a_dead_upstream_reaches_it_a_handful_of_times(proxy):
    """Reached: 0 s, 0.25 s, 0.5 s (the third failure in a row: wait 0.8-1 s), then about
    1.5 s (wait 1.6-2 s), 3.5 s (wait 3.2-4 s), 7.5 s (wait 6.4-8 s): at most 6 in 10 s.
    The first 4 s show the pattern; the last wait handed out proves the rest."""
    reached, last_wait = 0, 0.0
    deadline = time.monotonic() + 4.0
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            response = client.post(f"{proxy.base_url}/chat/completions", json={"model": "dead-x"})
            error = response.json()["error"]
            if error["code"] == "reconnect_throttled":
                assert response.status_code == 429
                last_wait = float(response.headers["retry-after-ms"]) / 1000
            else:
                assert response.status_code == 502  # the connect error, as the client sees it
                reached += 1
            time.sleep(0.25)
    assert 4 <= reached <= 5
    # The wait in force now runs to at least ~7 s from the start; the next one to ~13 s.
    assert last_wait >= 1.0
