"""The real openai SDK, sync and async, against a real proxy process and mock upstream."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import KEY_A, KEY_B, KEY_OTHER, ProxyProcess


def client(proxy: ProxyProcess, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key="client-key", max_retries=0, **kwargs)


def test_alias_goes_upstream_as_the_real_id_with_a_backend_key(proxy, upstream):
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="kimi-k2", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the mock upstream."
    assert completion.model == "kimi-k2-0711-preview"
    assert raw.headers["x-proxy-backend"] == "mock"
    assert raw.headers["x-proxy-model"] == "kimi-k2-0711-preview"
    assert raw.headers["x-proxy-key"] in ("key-a", "key-b")
    assert raw.request_id == "req_mock_upstream"  # the upstream's id reaches the SDK user
    [seen] = upstream.requests()
    assert seen["model"] == "kimi-k2-0711-preview"
    assert seen["key"] in (KEY_A, KEY_B)
    assert seen["headers"]["authorization"] != "Bearer client-key"


def test_keys_rotate_and_a_pinned_route_always_uses_its_key(proxy, upstream):
    c = client(proxy)
    for _ in range(4):
        c.chat.completions.create(model="gpt-4o-mini", messages=[])
    for _ in range(3):
        c.chat.completions.create(model="pinned-model", messages=[])
    keys = [r["key"] for r in upstream.requests()]
    assert sorted(keys[:4]) == sorted([KEY_A, KEY_B, KEY_A, KEY_B])
    assert keys[4:] == [KEY_B, KEY_B, KEY_B]


def test_strip_prefix_route_sends_the_bare_id_to_its_backend(proxy, upstream):
    completion = client(proxy).chat.completions.create(model="other/llama3", messages=[])
    assert completion.model == "llama3"
    [seen] = upstream.requests()
    assert seen["path"] == "/other/v1/chat/completions"
    assert seen["key"] == KEY_OTHER


def test_sync_stream_delivers_every_chunk(proxy, upstream):
    stream = client(proxy).chat.completions.create(
        model="kimi-k2",
        messages=[],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"chunks": 5}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1].usage.completion_tokens == 5


def test_async_client_streams_and_plain_calls(proxy, upstream):
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as c:
            plain = await c.chat.completions.create(model="fast", messages=[])
            stream = await c.chat.completions.create(model="fast", messages=[], stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            return plain.choices[0].message.content, text

    plain, streamed = asyncio.run(run())
    assert plain == "Hello from the mock upstream."
    assert streamed == "tok0 tok1 tok2 "
    assert [r["model"] for r in upstream.requests()] == ["kimi-k2-0711-preview"] * 2


def test_embeddings_completions_and_responses_endpoints(proxy, upstream):
    c = client(proxy)
    assert c.embeddings.create(model="gpt-4o-mini", input="hi").data[0].embedding == [0.1, 0.2, 0.3]
    assert c.completions.create(model="gpt-4o-mini", prompt="hi").choices[0].text == "Hello"
    assert c.responses.create(model="kimi-k2", input="hi").output_text == (
        "Hello from the mock upstream."
    )
    events = list(c.responses.create(model="kimi-k2", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    paths = [r["path"] for r in upstream.requests()]
    assert paths == [
        "/v1/embeddings",
        "/v1/completions",
        "/v1/responses",
        "/v1/responses",
    ]


def test_models_list_has_aliases_and_listed_models(proxy):
    models = {m.id: m.owned_by for m in client(proxy).models.list()}
    assert models == {
        "kimi-k2": "mock",
        "fast": "mock",
        "kimi-k2-0711-preview": "mock",
        "gpt-4o-mini": "mock",
    }
    assert client(proxy).models.retrieve("kimi-k2").owned_by == "mock"
    with pytest.raises(openai.NotFoundError):
        client(proxy).models.retrieve("nope")


def test_unknown_model_is_a_404_naming_the_model(proxy, upstream):
    with pytest.raises(openai.NotFoundError) as info:
        client(proxy).chat.completions.create(model="mystery-model", messages=[])
    assert info.value.code == "model_not_found"
    assert "mystery-model" in info.value.body["message"]
    assert "kimi-k2" in info.value.body["message"]  # and what is routable
    assert upstream.requests() == []


def test_backend_without_key_answers_503_naming_the_variable(proxy, upstream):
    with pytest.raises(openai.InternalServerError) as info:
        client(proxy).chat.completions.create(model="unkeyed-model", messages=[])
    assert info.value.status_code == 503
    assert "UNSET_TEST_KEY" in info.value.body["message"]
    assert info.value.response.headers["x-should-retry"] == "false"
    assert upstream.requests() == []


def test_upstream_errors_pass_through_unchanged(proxy, upstream):
    error = {"message": "slow down", "type": "rate_limit_reached_error"}
    with pytest.raises(openai.RateLimitError) as info:
        client(proxy).chat.completions.create(
            model="flaky-model",
            messages=[],
            extra_body={"mock": {"status": 429, "error": error, "headers": {"retry-after": "7"}}},
        )
    assert info.value.status_code == 429
    assert info.value.body == error
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.response.headers["x-proxy-backend"] == "flaky"


def test_unreachable_backend_is_502(proxy):
    with pytest.raises(openai.APIStatusError) as info:
        client(proxy).chat.completions.create(model="dead-model", messages=[])
    assert info.value.status_code == 502
    assert info.value.code == "upstream_unreachable"


def test_stream_cut_mid_way_raises_in_the_sdk_instead_of_ending_quietly(proxy, upstream):
    stream = client(proxy).chat.completions.create(
        model="kimi-k2", messages=[], stream=True, extra_body={"mock": {"drop_after": 3}}
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert "closed the stream before it was complete" in info.value.body["message"]
