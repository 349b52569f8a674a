"""Responses -> Chat Completions, the pure translation: what Codex CLI sends maps field by
field or is refused by name, answers come back as the openai SDK reads them, and any chat
stream (random text, reasoning and tool-call deltas, interleaved, cut anywhere) becomes an
event sequence the SDK's own stream accumulator takes, with the same text and arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy.dialects.translate import ResponsesToChat, Untranslatable
from proxy.dialects.translate.chat_stream import StreamBroken
from proxy.dialects.translate.responses_chat import (
    ChatToResponsesStream,
    request,
    response,
    with_history,
)
from tests.sse import events_of, sse

CODEX_TOOLS = [
    {
        "type": "function",
        "name": "exec_command",
        "description": "Run a command",
        "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    },
    {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Agents",
        "tools": [{"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}}],
    },
]


def codex_turn(**more: Any) -> dict[str, Any]:
    """A Codex CLI 0.171 request's shape (its second turn: after a shell call)."""
    return {
        "model": "kimi-k2",
        "instructions": "You are Codex.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Rules."}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "List files"}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
            {
                "type": "function_call",
                "call_id": "call_a",
                "name": "exec_command",
                "arguments": '{"cmd":"ls"}',
            },
            {"type": "function_call_output", "call_id": "call_a", "output": "a.py\nb.py"},
        ],
        "tools": CODEX_TOOLS,
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto", "effort": "high"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "session-1",
        "client_metadata": {"x-codex-installation-id": "x"},
        **more,
    }


def test_a_codex_turn_maps_field_by_field():
    body = request(codex_turn(), "kimi-k2-0711-preview")
    assert body["model"] == "kimi-k2-0711-preview"
    assert body["messages"] == [
        {"role": "system", "content": "You are Codex.\n\nRules."},
        {"role": "user", "content": "List files"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "exec_command", "arguments": '{"cmd":"ls"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "a.py\nb.py"},
    ]
    assert [t["function"]["name"] for t in body["tools"]] == [
        "exec_command",
        "multi_agent_v1__spawn_agent",
    ]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["reasoning_effort"] == "high"
    for dropped in ("include", "prompt_cache_key", "client_metadata", "store", "reasoning"):
        assert dropped not in body
    assert "reasoning_effort" not in request(codex_turn(), "m", effort=False)


def test_strings_images_schemas_and_later_system_messages():
    payload = {
        "model": "m",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
            {"role": "developer", "content": "Answer in JSON now."},
            {"role": "user", "content": "Again"},
        ],
        "text": {
            "format": {
                "type": "json_schema",
                "name": "pet",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
        "max_output_tokens": 100,
        "temperature": 0.1,
        "user": "u-1",
        "tool_choice": {"type": "function", "name": "f"},
    }
    body = request(payload, "m")
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": "A cat."},
        {"role": "system", "content": "Answer in JSON now."},
        {"role": "user", "content": "Again"},
    ]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "pet", "schema": {"type": "object"}, "strict": True},
    }
    assert (body["max_tokens"], body["temperature"], body["user"]) == (100, 0.1, "u-1")
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert request({"model": "m", "input": "hi"}, "m")["messages"] == [
        {"role": "user", "content": "hi"}
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "web_search", "external_web_access": True}]}, "tools.0.type"),
        (
            {"tools": [{"type": "namespace", "name": "n", "tools": [{"type": "mcp"}]}]},
            "tools.0.tools.0",
        ),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"seed": 1}, "seed"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"reasoning": {"effort": "maximal"}}, "reasoning.effort"),
        ({"input": [{"type": "computer_call", "id": "c"}]}, "input.0.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input.0.content.0",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input.0.content.0.file_id",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "u"}],
                    }
                ]
            },
            "input.0.output",
        ),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(change, param):
    with pytest.raises(Untranslatable) as refused:
        request({"model": "m", "input": "hi", **change}, "m")
    assert refused.value.param == param
    assert 'web_search = "disabled"' in refused.value.why or param != "tools.0.type"


def test_history_goes_before_the_new_input_and_the_previous_id_goes():
    kept = [
        {"type": "message", "role": "user", "content": "hi"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "hello"}],
        },
    ]
    payload = with_history({"model": "m", "input": "and?", "previous_response_id": "resp_1"}, kept)
    assert "previous_response_id" not in payload
    assert request(payload, "m")["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    answer = {"status": "completed", "output": [{"type": "message", "id": "msg_1"}]}
    assert ResponsesToChat.kept({"input": "and?"}, answer) == [
        {"type": "message", "role": "user", "content": "and?"},
        {"type": "message", "id": "msg_1"},
    ]
    assert ResponsesToChat.kept({"input": "x", "store": False}, answer) is None


RESPONSE = TypeAdapter(Response)


def test_an_answer_with_text_a_namespaced_call_and_usage_is_a_response_the_sdk_reads():
    chat = {
        "id": "chatcmpl-1",
        "created": 1700000000,
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Spawning.",
                    "reasoning_content": "I need help",
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "multi_agent_v1__spawn_agent", "arguments": "{}"},
                        },
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "exec_command", "arguments": '{"cmd":"ls"}'},
                        },
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 30,
            "completion_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 10},
            "completion_tokens_details": {"reasoning_tokens": 4},
        },
    }
    document = response(chat, codex_turn(stream=False), "resp_x")
    parsed = RESPONSE.validate_python(document)
    assert parsed.id == "resp_x" and parsed.status == "completed" and parsed.model == "kimi-k2"
    assert parsed.output_text == "Spawning."
    kinds = [item.type for item in parsed.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    calls = [document["output"][2], document["output"][3]]
    assert (calls[0]["name"], calls[0]["namespace"]) == ("spawn_agent", "multi_agent_v1")
    assert calls[1]["name"] == "exec_command" and "namespace" not in calls[1]
    assert calls[0]["call_id"] != calls[1]["call_id"]  # the SDK tells calls apart by it
    assert parsed.usage is not None
    assert (parsed.usage.input_tokens, parsed.usage.output_tokens, parsed.usage.total_tokens) == (
        30,
        9,
        39,
    )
    assert parsed.usage.input_tokens_details.cached_tokens == 10
    assert parsed.usage.output_tokens_details.reasoning_tokens == 4


def test_a_cut_off_answer_is_incomplete():
    chat = {"choices": [{"index": 0, "finish_reason": "length", "message": {"content": "Once"}}]}
    document = response(chat, {"model": "m"}, "resp_y")
    assert document["status"] == "incomplete"
    assert document["incomplete_details"] == {"reason": "max_output_tokens"}
    with pytest.raises(ValueError):
        response({"choices": []}, {"model": "m"}, "resp_z")


pieces = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(min_size=1, max_size=12)),
        st.tuples(st.just("reasoning"), st.text(min_size=1, max_size=12)),
        st.tuples(st.just("refusal"), st.text(min_size=1, max_size=12)),
        st.tuples(
            st.just("tool"),
            st.fixed_dictionaries({"q": st.text(max_size=10), "n": st.integers(-5, 5)}),
            st.integers(1, 4),  # the arguments' JSON in this many deltas
        ),
    ),
    max_size=8,
)


def chat_stream(plan: list[Any], finish: str, interleave: bool) -> tuple[bytes, str, list[Any]]:
    """A chat stream for ``plan``: its bytes, its text, its tool calls' arguments (with
    ``interleave``, each call's deltas alternate with the next one's, as some servers do)."""
    out = [sse({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    text, tools, held = "", [], []
    for step in plan:
        if step[0] == "text":
            text += step[1]
            out.append(sse({"choices": [{"index": 0, "delta": {"content": step[1]}}]}))
        elif step[0] in ("reasoning", "refusal"):
            key = "reasoning_content" if step[0] == "reasoning" else "refusal"
            out.append(sse({"choices": [{"index": 0, "delta": {key: step[1]}}]}))
        else:
            arguments = json.dumps(step[1])
            n = len(tools)
            tools.append(step[1])
            size = max(1, len(arguments) // step[2])
            parts = [arguments[i : i + size] for i in range(0, len(arguments), size)]
            deltas = []
            for k, part in enumerate(parts):
                call: dict[str, Any] = {"index": n, "function": {"arguments": part}}
                if k == 0:
                    call |= {"id": f"call_{n}", "type": "function"}
                    call["function"]["name"] = f"tool{n}"
                deltas.append(sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}))
            if interleave:
                held.append(deltas)
            else:
                out += deltas
    while any(held):  # round robin over the calls' deltas
        for deltas in held:
            if deltas:
                out.append(deltas.pop(0))
    out.append(sse({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    out.append(sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out), text, tools


EVENT = TypeAdapter(ResponseStreamEvent)


@settings(max_examples=150, deadline=None)
@given(pieces, st.sampled_from(["stop", "tool_calls", "length"]), st.booleans(), st.data())
def test_any_chat_stream_becomes_events_the_sdk_accumulates(plan, finish, interleave, data):
    raw, text, tools = chat_stream(plan, finish, interleave)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    translator = ChatToResponsesStream({"model": "kimi-k2", "input": "hi"}, "resp_1")
    out = b""
    last = 0
    for cut in [*cuts, len(raw)]:
        out += translator.feed(raw[last:cut])
        last = cut
    assert translator.complete
    out += translator.end()
    events = events_of(out)
    state = ResponseStreamState(input_tools=[], text_format=omit)
    for event in events:
        state.handle_event(EVENT.validate_python(event))
    # The SDK's final object for a completed response; what it accumulated for another.
    final = state._completed_response or state._ResponseStreamState__current_snapshot
    assert final is not None and final.id == "resp_1"
    assert final.output_text == text
    calls = [item for item in final.output if item.type == "function_call"]
    assert [json.loads(c.arguments) for c in calls] == tools
    assert [c.name for c in calls] == [f"tool{i}" for i in range(len(tools))]
    last = RESPONSE.validate_python(events[-1]["response"])
    assert last.status == ("incomplete" if finish == "length" else "completed")
    assert last.usage is not None
    assert (last.usage.input_tokens, last.usage.output_tokens) == (11, 7)
    assert last.output_text == text
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == (
        "response.incomplete" if finish == "length" else "response.completed"
    )
    assert (
        translator.final is not None
        and translator.final["output"] == events[-1]["response"]["output"]
    )


def test_an_upstream_error_mid_stream_breaks_it_and_a_cut_stream_is_not_complete():
    translator = ChatToResponsesStream({"model": "m"}, "resp_1")
    translator.feed(sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}))
    assert not translator.complete
    with pytest.raises(StreamBroken, match="overloaded"):
        translator.feed(sse({"error": {"message": "overloaded"}}))


def test_a_stream_with_no_chunk_still_answers_a_whole_response():
    translator = ChatToResponsesStream({"model": "m"}, "resp_1")
    assert translator.feed(b"data: [DONE]\n\n") == b""
    events = events_of(translator.end())
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"max_output_tokens": "big"}, "max_output_tokens"),
        ({"max_output_tokens": True}, "max_output_tokens"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"store": "no"}, "store"),
        ({"metadata": "x"}, "metadata"),
        ({"user": {}}, "user"),
        ({"reasoning": {"effort": ["high"]}}, "reasoning.effort"),
        ({"reasoning": {"effort": {"a": 1}}}, "reasoning.effort"),
        ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]}, "tools.0.parameters"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_by_name_never_sent_on(change, param):
    with pytest.raises(Untranslatable) as refused:
        request({"model": "m", "input": "hi", **change}, "m")
    assert refused.value.param == param


def test_explicit_nulls_are_no_values():
    body = request(
        {"model": "m", "input": "hi", "previous_response_id": None, "top_logprobs": None}, "m"
    )
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_ids_the_proxy_renamed_still_tell_the_calls_deltas_apart():
    """Two calls with one id, an id too long, an id not a string: each call gets an id
    of its own, and the upstream's repeated ids keep finding their call."""
    translator = ChatToResponsesStream({"model": "m"}, "resp_1")
    long_id = "x" * 200
    deltas = [
        {"index": 0, "id": "dup", "function": {"name": "a", "arguments": ""}},
        {"index": 1, "id": "dup", "function": {"name": "b", "arguments": ""}},
        {"index": 2, "id": long_id, "function": {"name": "c", "arguments": ""}},
        {"index": 3, "id": 7, "function": {"name": "d", "arguments": ""}},
        {"index": 1, "id": "dup", "function": {"arguments": '{"b":1}'}},
        {"index": 2, "id": long_id, "function": {"arguments": '{"c":1}'}},
        {"index": 3, "id": 7, "function": {"arguments": '{"d":1}'}},
        {"index": 0, "id": "dup", "function": {"arguments": '{"a":1}'}},
    ]
    for delta in deltas:
        translator.feed(sse({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}))
    translator.feed(sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    translator.feed(b"data: [DONE]\n\n")
    translator.end()
    assert translator.final is not None
    calls = [(i["name"], i["call_id"], i["arguments"]) for i in translator.final["output"]]
    assert calls == [
        ("a", "dup", '{"a":1}'),
        ("b", "call_1", '{"b":1}'),
        ("c", "call_2", '{"c":1}'),
        ("d", "call_3", '{"d":1}'),
    ]


def test_a_stream_that_would_hold_too_much_is_broken_off(monkeypatch):
    many = ChatToResponsesStream({"model": "m"}, "resp_2")
    with pytest.raises(StreamBroken, match="1024 output items"):
        for n in range(1100):  # reasoning and text by turns: one item each
            key = "content" if n % 2 else "reasoning_content"
            many.feed(sse({"choices": [{"index": 0, "delta": {key: "z"}}]}))
    from proxy.dialects.translate import responses_chat

    monkeypatch.setattr(responses_chat, "MAX_HELD", 1000)
    translator = ChatToResponsesStream({"model": "m"}, "resp_1")
    with pytest.raises(StreamBroken, match="the answer passed"):
        for _ in range(20):
            translator.feed(sse({"choices": [{"index": 0, "delta": {"content": "y" * 100}}]}))
