"""Issue 19: one client failing in a quiet moment never makes another client's request fail."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import MockUpstream, ProxyProcess, start_proxy

KEY = "sk-fair-breaker-0000000001"
TEAM_A, TEAM_B = "ck-team-a-0123456789", "ck-team-b-0123456789"


def config(mock: MockUpstream) -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
clients:
  - {{id: team-a, key: "{TEAM_A}"}}
  - {{id: team-b, key: "{TEAM_B}"}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: main, key: "{KEY}"}}]
    breaker: {{failures: 3, min_open: 2s, max_open: 10s}}
routes:
  - {{prefix: "", backend: mock}}
"""


@pytest.fixture
def proxy(upstream: MockUpstream, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream), tmp_path)
    yield process
    process.stop()


def post(proxy: ProxyProcess, client: str, **mock) -> httpx.Response:
    body = {"model": "m", "messages": [], **({"mock": mock} if mock else {})}
    headers = {"authorization": f"Bearer {client}"}
    return httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers, timeout=10)


def test_one_clients_failures_in_a_quiet_moment_never_refuse_another_client(proxy):
    # A quiet moment: nobody has succeeded lately. Three failures from team-a...
    assert [post(proxy, TEAM_A, status=500).status_code for _ in range(3)] == [500] * 3
    # ...then team-a failing every 0.5 s while team-b works: team-b is always served.
    served = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert post(proxy, TEAM_A, status=500).status_code == 500  # its own answer
        served.append(post(proxy, TEAM_B).status_code)
        time.sleep(0.5)
    assert served and set(served) == {200}
    assert "circuit open" not in proxy.log()


def test_failures_from_two_clients_still_open_it(proxy):
    for client in (TEAM_A, TEAM_B, TEAM_A):
        assert post(proxy, client, status=500).status_code == 500
    refused = post(proxy, TEAM_B)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "backend_unavailable"


LIMITED = {
    "status": 429,
    "headers": {"retry-after": "20"},
    "error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"},
}


def test_one_clients_429_cools_the_shared_key_down_for_that_client_only(proxy, upstream):
    assert post(proxy, TEAM_A, **LIMITED).status_code == 429
    # team-b is served on the very key that limited team-a, again and again.
    assert [post(proxy, TEAM_B).status_code for _ in range(3)] == [200] * 3
    # team-a waits out its retry-after: the proxy's 429, with the wait, nothing upstream.
    sent = len(upstream.requests())
    waiting = post(proxy, TEAM_A)
    assert waiting.status_code == 429
    assert waiting.json()["error"]["code"] == "upstream_rate_limited"
    assert 18 <= int(waiting.headers["retry-after"]) <= 20
    assert len(upstream.requests()) == sent


def test_two_clients_limited_by_the_key_cool_it_down_for_everyone(upstream, tmp_path):
    three = config(upstream).replace(
        "clients:\n", 'clients:\n  - {id: team-c, key: "ck-team-c-0123456789"}\n'
    )
    process = start_proxy(three, tmp_path)
    try:
        assert post(process, TEAM_A, **LIMITED).status_code == 429
        assert post(process, TEAM_B, **LIMITED).status_code == 429  # the quota is spent
        sent = len(upstream.requests())
        refused = post(process, "ck-team-c-0123456789")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "upstream_rate_limited"
        assert len(upstream.requests()) == sent  # the upstream is not hammered
    finally:
        process.stop()


def test_an_upstream_failure_with_an_oversized_body_still_counts_for_the_throttle(
    upstream, tmp_path
):
    """Review of issue 19: a 500 whose body was over the error-body cap (502 to the client)
    was not counted as the upstream's failure, so the reconnect throttle never engaged."""
    throttled = config(upstream).replace("throttle: {reconnect: {enabled: false}}\n", "")
    process = start_proxy(throttled, tmp_path)
    try:
        big = {"message": "x" * (1100 * 1024), "type": "server_error"}
        codes = [post(process, TEAM_A, status=500, error=big).status_code for _ in range(5)]
        assert codes[:3] == [502] * 3
        assert codes[3:] == [429, 429]  # reconnect_throttled: the upstream is spared
    finally:
        process.stop()
