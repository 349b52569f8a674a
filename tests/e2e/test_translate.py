"""The anthropic SDK through the proxy to a backend that speaks only Chat Completions
(``chat_wire: chat``): answers, a tool loop, streams with tool calls, errors, refusals and
the token counts, as the SDK and the access log see them.

The upstream is the scripted chat server of ``tests/chat_upstream.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.chat_upstream import ChatUpstream, chat_only_config
from tests.conftest import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

CLIENT_KEY = "ck-translate-000000000000"
TOOLS = [
    {
        "name": "Read",
        "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatUpstream]:
    upstream = ChatUpstream(("Read", {"path": "main.py"}))
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def proxy(chat: ChatUpstream, tmp_path_factory) -> Iterator[ProxyProcess]:
    config = chat_only_config(chat, CLIENT_KEY, "aliases: {claude-sonnet-4-5: chat-model}\n")
    tmp = tmp_path_factory.mktemp("translate")
    process = start_proxy(config, tmp, extra_args=("--log-format", "json"))
    yield process
    process.stop()


def logged(proxy: ProxyProcess, wanted: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The last access-log line ``wanted`` picks (the log is written in batches)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in proxy.log().splitlines() if '"request_id"' in x]
        found = [line for line in lines if wanted(line)]
        if found or time.monotonic() > deadline:
            assert found, "no such access-log line"
            return found[-1]
        time.sleep(0.05)


def sdk(proxy: ProxyProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=CLIENT_KEY, max_retries=0)


def test_an_answer_comes_back_in_messages_shape_with_the_upstreams_usage(proxy, chat):
    message = sdk(proxy).messages.create(
        model="claude-sonnet-4-5",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hi"}],
    )
    assert [block.text for block in message.content] == ["Hello from chat."]
    assert message.stop_reason == "end_turn"
    assert message.model == "claude-sonnet-4-5"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (17, 4)
    assert message.usage.output_tokens == 8
    sent = chat.requests[-1]
    assert sent["model"] == "chat-model"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert sent["max_tokens"] == 100


def test_a_tool_loop_round_trips_ids_and_arguments(proxy, chat):
    client = sdk(proxy)
    ask = [{"role": "user", "content": "What does main.py print?"}]
    first = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=ask, tools=TOOLS
    )
    assert first.stop_reason == "tool_use"
    call = next(block for block in first.content if block.type == "tool_use")
    assert (call.id, call.name, call.input) == ("call_7", "Read", {"path": "main.py"})
    assert chat.requests[-1]["tools"][0]["function"]["name"] == "Read"
    turn = [
        *ask,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "print(1)"}],
        },
    ]
    second = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=100, messages=turn, tools=TOOLS
    )
    assert second.content[0].text == "The tool said: print(1)"
    sent = chat.requests[-1]["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == "call_7"
    assert json.loads(sent[-2]["tool_calls"][0]["function"]["arguments"]) == {"path": "main.py"}
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_7", "content": "print(1)"}


def test_a_stream_with_a_tool_call_assembles_as_the_sdk_expects(proxy, chat):
    with sdk(proxy).messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=100,
        messages=[{"role": "user", "content": "read main.py"}],
        tools=TOOLS,
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Let me read it."
    call = next(block for block in final.content if block.type == "tool_use")
    assert (call.id, call.name, call.input) == ("call_7", "Read", {"path": "main.py"})
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (17, 8)
    assert chat.requests[-1]["stream_options"] == {"include_usage": True}
    # The proxy's own count is the upstream's usage: 21 prompt tokens, 8 completion.
    line = logged(proxy, lambda line: line.get("stream") and line["path"] == "/v1/messages")
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"]) == (21, 8, 4)
    assert line["status"] == 200 and line["error"] is None
    assert line["upstream_wire"] == "chat"  # the client spoke Messages, the upstream chat


def test_what_cannot_be_translated_is_a_400_naming_it_and_nothing_is_sent(proxy, chat):
    before = len(chat.requests)
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(
            model="claude-sonnet-4-5",
            max_tokens=10,
            extra_body={"top_k": 5},
            messages=[{"role": "user", "content": "hi"}],
        )
    assert "top_k" in caught.value.message
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(proxy).messages.create(
            model="claude-sonnet-4-5",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert "web_search_20250305" in caught.value.message
    assert len(chat.requests) == before


def test_an_upstream_error_reaches_the_sdk_in_anthropics_shape(proxy):
    with pytest.raises(anthropic.InternalServerError) as caught:
        sdk(proxy).messages.create(
            model="fail-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "upstream exploded"},
    }


def test_count_tokens_is_an_estimate_and_says_so(proxy, chat):
    before = len(chat.requests)
    response = httpx.post(
        f"{proxy.url}/v1/messages/count_tokens",
        headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "x" * 400}]},
    )
    assert response.status_code == 200
    assert 100 <= response.json()["input_tokens"] <= 120
    assert response.headers["x-proxy-estimate"].startswith("input_tokens")
    assert len(chat.requests) == before


@pytest.fixture(scope="module")
def mixed(chat: ChatUpstream, fake_anthropic: str, tmp_path_factory) -> Iterator[ProxyProcess]:
    config = f"""
throttle: {{reconnect: {{enabled: false}}}}
backends:
  chatonly:
    base_url: {chat.url}/v1
    chat_wire: chat
    keys: [{{id: chat-key, key: "sk-chat-only-000000000000"}}]
  native:
    base_url: {fake_anthropic}/oa/v1
    anthropic_base_url: {fake_anthropic}/xkey
    keys: [{{id: native-key, key: "sk-native-0000000000000"}}]
clients:
  - {{id: coder, key: "{CLIENT_KEY}"}}
routes:
  - prefix: mixed-
    strategy: weighted
    affinity: none
    deployments:
      - {{backend: chatonly, model: chat-model}}
      - {{backend: native, model: claude-native}}
  - {{prefix: fb-, backend: chatonly, fallback: [{{backend: native}}]}}
"""
    tmp = tmp_path_factory.mktemp("mixed")
    process = start_proxy(config, tmp, extra_args=("--log-format", "json"))
    yield process
    process.stop()


@pytest.mark.parametrize("model", ["mixed-x", "fb-x"])
def test_a_request_only_the_native_member_can_carry_goes_there_never_a_500(mixed, chat, model):
    """A pool (and a fallback) of a chat-only backend and a native one: a request with a
    server tool cannot be translated, so the chat member is skipped, every time."""
    before = len(chat.requests)
    client = sdk(mixed)
    for _ in range(6):
        message = client.messages.create(
            model=model,
            max_tokens=20,
            messages=[{"role": "user", "content": "search the web"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
        assert message.type == "message"
    assert len(chat.requests) == before  # never sent to the chat member
    counted = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.input_tokens == 42  # the native member's own count, not an estimate


@pytest.mark.parametrize("model", ["garbage-model", "text-model"])
def test_a_200_that_holds_no_answer_is_a_502_never_an_empty_message(proxy, model):
    for stream in (False, True):
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk(proxy).messages.create(
                model=model,
                max_tokens=10,
                messages=[{"role": "user", "content": "hi"}],
                stream=stream,
            )
        assert caught.value.status_code == 502
        assert caught.value.body["error"]["type"] == "api_error"


def test_an_upstream_error_mid_stream_reaches_the_sdk_with_its_reason(proxy):
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        sdk(proxy).messages.stream(
            model="midfail-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        for _ in stream:
            pass
    assert "rate limit hit mid-stream" in str(caught.value)
