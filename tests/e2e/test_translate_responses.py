"""The openai SDK's Responses API through the proxy to a backend that speaks only Chat
Completions (``chat_wire: chat``): answers, a tool loop, the stream helper, conversations
the proxy keeps (``previous_response_id``, retrieve, delete) for their owner only, what is
refused, and the token counts, as the SDK and the access log see them.

The upstream is the scripted chat server of ``tests/chat_upstream.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.chat_upstream import ChatUpstream
from tests.conftest import ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

KEY_A = "ck-responses-a-0000000000"
KEY_B = "ck-responses-b-0000000000"
ADMIN = "adm-responses-00000000000"
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "exec_command",
        "description": "Run a shell command",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    }
]


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatUpstream]:
    upstream = ChatUpstream(("exec_command", {"cmd": "ls"}))
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def proxy(chat: ChatUpstream, tmp_path_factory) -> Iterator[ProxyProcess]:
    config = f"""
backends:
  chatonly:
    base_url: {chat.url}/v1
    chat_wire: chat
    keys: [{{id: chat-key, key: "sk-chat-only-000000000000"}}]
clients:
  - {{id: team-a, key: "{KEY_A}"}}
  - {{id: team-b, key: "{KEY_B}"}}
routes:
  - {{prefix: "", backend: chatonly}}
aliases: {{kimi-k2: chat-model}}
server: {{admin_key: "{ADMIN}"}}
"""
    tmp = tmp_path_factory.mktemp("responses")
    process = start_proxy(config, tmp, extra_args=("--log-format", "json"))
    yield process
    process.stop()


def sdk(proxy: ProxyProcess, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)


def logged(proxy: ProxyProcess, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in proxy.log().splitlines() if request_id in x]
        if lines or time.monotonic() > deadline:
            assert lines, "no access-log line"
            return lines[-1]
        time.sleep(0.05)


def test_an_answer_comes_back_as_a_response_with_the_upstreams_usage(proxy, chat):
    raw = sdk(proxy).responses.with_raw_response.create(
        model="kimi-k2", instructions="Be brief.", input="hi", store=False
    )
    answer = raw.parse()
    assert answer.output_text == "Hello from chat."
    assert answer.status == "completed" and answer.model == "kimi-k2"
    assert answer.id.startswith("resp_")
    assert answer.usage is not None
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (21, 8)
    assert answer.usage.input_tokens_details.cached_tokens == 4
    sent = chat.requests[-1]
    assert sent["model"] == "chat-model"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    line = logged(proxy, raw.headers["x-request-id"])
    assert (line["prompt_tokens"], line["completion_tokens"]) == (21, 8)
    assert line["upstream_wire"] == "chat"
    page = httpx.get(f"{proxy.url}/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    wanted = 'endpoint="openai",model="chat-model",status="200",stream="false",upstream_wire="chat"'
    assert any(wanted in line for line in page.splitlines() if "llm_proxy_requests_total" in line)


def test_a_tool_loop_round_trips_call_ids_and_arguments(proxy, chat):
    client = sdk(proxy)
    first = client.responses.create(model="kimi-k2", input="List files", tools=TOOLS, store=False)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("exec_command", {"cmd": "ls"})]
    assert calls[0].call_id == "call_7"
    second = client.responses.create(
        model="kimi-k2",
        input=[
            {"role": "user", "content": "List files"},
            {
                "type": "function_call",
                "call_id": "call_7",
                "name": "exec_command",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": "call_7", "output": "a.py b.py"},
        ],
        tools=TOOLS,
        store=False,
    )
    assert second.output_text == "The tool said: a.py b.py"
    assert chat.requests[-1]["messages"][-2]["tool_calls"][0]["id"] == "call_7"


def test_the_stream_helper_assembles_text_and_a_tool_call(proxy, chat):
    with sdk(proxy).responses.stream(
        model="kimi-k2", input="List files", tools=TOOLS, store=False
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == "Let me read it."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == [{"cmd": "ls"}]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    assert final.usage is not None and final.usage.output_tokens == 8
    assert chat.requests[-1]["stream_options"] == {"include_usage": True}


def test_a_stored_conversation_continues_is_retrieved_and_deleted_by_its_owner_only(proxy, chat):
    a, b = sdk(proxy, KEY_A), sdk(proxy, KEY_B)
    first = a.responses.create(model="kimi-k2", input="hi")  # store: true by default
    with a.responses.stream(
        model="kimi-k2", input="and again?", previous_response_id=first.id
    ) as s:
        second = s.get_final_response()
    assert second.output_text == "Hello from chat."
    assert chat.requests[-1]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello from chat."},
        {"role": "user", "content": "and again?"},
    ]
    third = a.responses.create(model="kimi-k2", input="last", previous_response_id=second.id)
    assert [m["content"] for m in chat.requests[-1]["messages"]] == [
        "hi",
        "Hello from chat.",
        "and again?",
        "Hello from chat.",
        "last",
    ]
    assert a.responses.retrieve(third.id).output_text == "Hello from chat."
    items = a.responses.input_items.list(third.id)
    assert [item.type for item in items.data] == ["message"]
    # Another client: nothing of it, and nothing sent upstream.
    sent = len(chat.requests)
    with pytest.raises(openai.NotFoundError):
        b.responses.retrieve(first.id)
    with pytest.raises(openai.APIStatusError) as refused:
        b.responses.create(model="kimi-k2", input="x", previous_response_id=first.id)
    assert refused.value.status_code in (400, 404)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(first.id)
    assert len(chat.requests) == sent
    # Its owner deletes it: gone, and so is the conversation through it.
    a.responses.delete(second.id)
    with pytest.raises(openai.APIStatusError) as gone:
        a.responses.create(model="kimi-k2", input="x", previous_response_id=third.id)
    assert gone.value.status_code in (400, 404)
    assert len(chat.requests) == sent


def test_a_conversation_no_one_kept_is_openais_400(proxy, chat):
    sent = len(chat.requests)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(proxy).responses.create(model="kimi-k2", input="x", previous_response_id="resp_nope123")
    assert refused.value.status_code in (400, 404)
    assert len(chat.requests) == sent


def test_a_built_in_tool_is_a_400_naming_it_and_nothing_is_sent(proxy, chat):
    sent = len(chat.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(proxy).responses.create(
            model="kimi-k2", input="news?", tools=[{"type": "web_search"}], store=False
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == "tools.0.type" and error["code"] == "untranslatable"
    assert "web_search" in error["message"] and "chatonly" in error["message"]
    assert len(chat.requests) == sent


def test_input_tokens_is_an_estimate_and_says_so(proxy):
    answer = httpx.post(
        f"{proxy.url}/v1/responses/input_tokens",
        headers={"authorization": f"Bearer {KEY_A}"},
        json={"model": "kimi-k2", "input": "x" * 400},
    )
    assert answer.status_code == 200
    assert answer.json()["object"] == "response.input_tokens"
    assert answer.json()["input_tokens"] > 100
    assert "x-proxy-estimate" in answer.headers


def test_an_upstream_error_mid_stream_reaches_the_sdk(proxy):
    stream = sdk(proxy).responses.stream(model="midfail-model", input="hi", store=False)
    with pytest.raises(openai.APIError, match="rate limit hit mid-stream"), stream as events:
        for _ in events:
            pass


def test_an_upstream_quoting_its_key_mid_stream_never_shows_it_to_the_client(proxy):
    stream = sdk(proxy).responses.stream(model="midfail-key-model", input="hi", store=False)
    with pytest.raises(openai.APIError) as broken, stream as events:
        for _ in events:
            pass
    assert "was refused mid-stream" in str(broken.value)
    assert "sk-chat-only-000000000000" not in str(broken.value)
    assert "sk-chat-only-000000000000" not in proxy.log()


def test_continuing_with_an_input_of_the_wrong_type_is_a_400_naming_it(proxy):
    client = sdk(proxy)
    first = client.responses.create(model="kimi-k2", input="hi")
    answer = httpx.post(
        f"{proxy.url}/v1/responses",
        headers={"authorization": f"Bearer {KEY_A}"},
        json={"model": "kimi-k2", "input": 5, "previous_response_id": first.id},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "input"
    # The continued response echoes the id it continues, as OpenAI's does.
    second = client.responses.create(model="kimi-k2", input="and?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
