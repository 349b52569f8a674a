"""Provider quirks declared in the config, seen on real requests through a running proxy."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import MockUpstream, ProxyProcess, start_proxy


def config(mock: MockUpstream) -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
backends:
  quirky:
    base_url: {mock.url}/v1
    keys: [{{id: q, key: sk-quirky-000000000001}}]
    request_rewrite:
      rename: {{max_completion_tokens: max_tokens}}
      clamp: {{temperature: [0, 1]}}
      drop: [functions, logit_bias]
      set: {{safe_prompt: true}}
    no_retry_errors: [exceeded_current_quota_error]
  plain:
    base_url: {mock.url}/v1
    keys: [{{id: p, key: sk-plain-000000000002}}]
routes:
  - {{prefix: "quirky-strict-", backend: quirky, request_rewrite: {{set: {{n: 1}}}}}}
  - {{prefix: "quirky-", backend: quirky}}
  - {{prefix: "plain-", backend: plain}}
"""


@pytest.fixture
def proxy(upstream, tmp_path) -> ProxyProcess:
    process = start_proxy(config(upstream), tmp_path)
    yield process
    process.stop()


def sent_body(upstream: MockUpstream) -> dict:
    return json.loads(upstream.requests()[-1]["body"])


def test_every_rule_is_applied_before_forwarding(proxy, upstream):
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    sdk.chat.completions.create(
        model="quirky-k2",
        messages=[{"role": "user", "content": "hi"}],
        temperature=1.6,
        max_completion_tokens=64,
        logit_bias={"50256": -100},
        extra_body={"functions": [{"name": "f", "parameters": {}}]},
    )
    body = sent_body(upstream)
    assert body["temperature"] == 1
    assert body["max_tokens"] == 64 and "max_completion_tokens" not in body
    assert "functions" not in body and "logit_bias" not in body
    assert body["safe_prompt"] is True
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_route_rules_apply_on_top_of_the_backends(proxy, upstream):
    httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={"model": "quirky-strict-x", "n": 3, "temperature": 5},
    )
    body = sent_body(upstream)
    assert (body["n"], body["temperature"], body["safe_prompt"]) == (1, 1, True)


def test_a_body_that_needs_no_rewrite_is_forwarded_as_sent(proxy, upstream):
    raw = b'{"model": "plain-m",  "temperature": 1.50, "functions": []}'
    httpx.post(f"{proxy.base_url}/chat/completions", content=raw)
    assert upstream.requests()[-1]["body"].encode() == raw
    untouched = b'{"model": "quirky-k2", "temperature": 0.50, "safe_prompt": true}'
    httpx.post(f"{proxy.base_url}/chat/completions", content=untouched)
    assert upstream.requests()[-1]["body"].encode() == untouched


def test_errors_that_never_succeed_on_retry_tell_the_sdk_so(proxy, upstream):
    quota = {"message": "Your account is suspended", "type": "exceeded_current_quota_error"}
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=2)
    with pytest.raises(openai.RateLimitError) as info:
        sdk.chat.completions.create(
            model="quirky-k2", messages=[], extra_body={"mock": {"status": 429, "error": quota}}
        )
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.body == quota  # the upstream's body, unchanged
    assert len(upstream.requests()) == 1  # the SDK did not retry


def test_retry_after_is_added_from_a_try_again_message(proxy, upstream):
    slow = {
        "message": "Too many requests, please try again after 3 seconds",
        "type": "rate_limit_reached_error",
    }
    response = httpx.post(
        f"{proxy.base_url}/chat/completions",
        json={"model": "plain-x", "mock": {"status": 429, "error": slow}},
    )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json() == {"error": slow}
