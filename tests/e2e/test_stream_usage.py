"""Tokens for every stream: the proxy asks the upstream for usage on streamed chat, counts
it, and gives a client that did not ask exactly the bytes it would have had without it."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import orjson

from tests.conftest import KEYS_ENV, MockUpstream, ProxyProcess, mock_config, start_proxy
from tests.e2e.test_observability import scrape

STREAM = {"model": "kimi-k2", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _tokens(proxy: ProxyProcess, kind: str) -> float:
    """The token counter; 0 before the series' first count (it is made by that count)."""
    labels = {"client": "anonymous", "backend": "mock", "model": "kimi-k2-0711-preview"}
    labels["type"] = kind
    key = ("llm_proxy_tokens_total", tuple(sorted(labels.items())))
    return scrape(proxy).get(key, 0.0)


def test_a_stream_without_stream_options_is_counted_and_its_bytes_are_unchanged(
    proxy: ProxyProcess, upstream: MockUpstream
) -> None:
    real_id = {**STREAM, "model": "kimi-k2-0711-preview"}
    key = {"authorization": "Bearer direct-test-key"}
    direct = httpx.post(f"{upstream.url}/v1/chat/completions", json=real_id, headers=key).content
    assert direct.startswith(b"data: ")
    prompt_before = _tokens(proxy, "prompt")
    through = httpx.post(f"{proxy.base_url}/chat/completions", json=STREAM).content
    assert through == direct  # the usage-only event the proxy asked for is not passed on
    assert b'"usage"' not in through
    sent = orjson.loads(upstream.requests()[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}
    assert _tokens(proxy, "prompt") == prompt_before + 5


def test_a_client_that_asked_for_usage_gets_it_as_the_upstream_sent_it(
    proxy: ProxyProcess, upstream: MockUpstream
) -> None:
    client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="kimi-k2",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 5
    sent = orjson.loads(upstream.requests()[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}


def test_a_client_that_said_no_to_usage_does_not_get_it_and_it_is_still_counted(
    proxy: ProxyProcess, upstream: MockUpstream
) -> None:
    body = {**STREAM, "stream_options": {"include_usage": False}}
    through = httpx.post(f"{proxy.base_url}/chat/completions", json=body).content
    assert b'"usage"' not in through and through.endswith(b"data: [DONE]\n\n")
    sent = orjson.loads(upstream.requests()[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}


def test_a_backend_that_refuses_the_field_is_not_sent_it(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    text = mock_config(upstream).replace(
        "    models: [kimi-k2-0711-preview, gpt-4o-mini]",
        "    models: [kimi-k2-0711-preview, gpt-4o-mini]\n    inject_stream_usage: false",
    )
    proxy = start_proxy(text, tmp_path, KEYS_ENV)
    try:
        httpx.post(f"{proxy.base_url}/chat/completions", json=STREAM).raise_for_status()
        sent = orjson.loads(upstream.requests()[-1]["body"])
        assert "stream_options" not in sent
    finally:
        proxy.stop()
