"""Messages -> Chat Completions, the pure translation: every request field maps or is
refused by name, answers come back as the anthropic SDK reads them, and any chat stream
(random text, reasoning and tool-call deltas, cut anywhere) becomes an event sequence the
SDK's own accumulator takes, with the same text and tool arguments."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects.translate import Untranslatable
from proxy.dialects.translate.messages_chat import (
    ChatToMessagesStream,
    StreamBroken,
    request,
    response,
)
from tests.sse import events_of, sse


def test_a_tool_loop_turn_maps_field_by_field():
    payload = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "Read main.py"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should read it", "signature": "sig"},
                    {"type": "text", "text": "Reading."},
                    {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "a"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"},
                    {"type": "text", "text": "Now explain."},
                ],
            },
        ],
        "tools": [
            {"name": "Read", "description": "Read a file", "input_schema": {"type": "object"}}
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "stream": True,
        "metadata": {"user_id": "u-1"},
        "thinking": {"type": "enabled", "budget_tokens": 8000},
    }
    body = request(payload, "kimi-k2-0711-preview")
    assert body == {
        "model": "kimi-k2-0711-preview",
        "max_tokens": 1024,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Read main.py"},
            {
                "role": "assistant",
                "content": "Reading.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "Read", "arguments": '{"path":"a"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "print(1)"},
            {"role": "user", "content": "Now explain."},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "Read",
                    "parameters": {"type": "object"},
                    "description": "Read a file",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-1",
        "reasoning_effort": "medium",
    }


def test_images_and_error_results():
    payload = {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "is_error": True,
                        "content": "boom",
                    },
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAA"},
                    },
                    {"type": "text", "text": "what is it?"},
                ],
            }
        ],
    }
    messages = request(payload, "m")["messages"]
    assert messages == [
        {"role": "tool", "tool_call_id": "t", "content": "Error: boom"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                {"type": "text", "text": "what is it?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"top_k": 5}, "top_k"),
        ({"mcp_servers": []}, "mcp_servers"),
        ({"surprise": 1}, "surprise"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0.content.0",
        ),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_what_cannot_be_translated_is_refused_by_name(change, param):
    payload = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(Untranslatable) as caught:
        request({**payload, **change}, "m")
    assert caught.value.param == param


def test_an_answer_with_text_and_a_tool_call():
    chat = {
        "id": "chatcmpl-9",
        "choices": [
            {
                "message": {
                    "content": "Let me look.",
                    "tool_calls": [
                        {"id": "call_1", "function": {"name": "Read", "arguments": '{"p": 1}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 20},
        },
    }
    assert response(chat, "claude-x", []) == {
        "id": "msg_chatcmpl-9",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "call_1", "name": "Read", "input": {"p": 1}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 30,
            "output_tokens": 9,
            "cache_read_input_tokens": 20,
            "cache_creation_input_tokens": 0,
        },
    }


@pytest.mark.parametrize(
    ("finish", "text", "expected"),
    [
        ("stop", "done", ("end_turn", None)),
        ("stop", "done END", ("stop_sequence", "END")),
        ("length", "cut", ("max_tokens", None)),
        ("content_filter", "", ("refusal", None)),
        (None, "", ("end_turn", None)),
    ],
)
def test_finish_reasons(finish, text, expected):
    chat = {"choices": [{"message": {"content": text}, "finish_reason": finish}]}
    answer = response(chat, "m", ["END"])
    assert (answer["stop_reason"], answer["stop_sequence"]) == expected


# ------------------------------------------------------------------ streams


pieces = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(min_size=1, max_size=12)),
        st.tuples(st.just("reasoning"), st.text(min_size=1, max_size=12)),
        st.tuples(
            st.just("tool"),
            st.fixed_dictionaries(
                {"q": st.text(max_size=10), "n": st.integers(-5, 5), "ok": st.booleans()}
            ),
            st.integers(1, 4),  # the arguments' JSON in this many deltas
        ),
    ),
    max_size=8,
)


def chat_stream(plan: list[Any], finish: str) -> tuple[bytes, str, list[Any]]:
    """A chat stream for ``plan``: its bytes, its text, its tool calls' arguments."""
    out = [sse({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    text, tools = "", []
    for step in plan:
        if step[0] == "text":
            text += step[1]
            out.append(sse({"choices": [{"index": 0, "delta": {"content": step[1]}}]}))
        elif step[0] == "reasoning":
            out.append(sse({"choices": [{"index": 0, "delta": {"reasoning_content": step[1]}}]}))
        else:
            arguments = json.dumps(step[1])
            n = len(tools)
            tools.append(step[1])
            size = max(1, len(arguments) // step[2])
            parts = [arguments[i : i + size] for i in range(0, len(arguments), size)]
            for k, part in enumerate(parts):
                call: dict[str, Any] = {"index": n, "function": {"arguments": part}}
                if k == 0:
                    call |= {"id": f"call_{n}", "type": "function"}
                    call["function"]["name"] = f"tool{n}"
                out.append(sse({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}))
    out.append(sse({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    out.append(sse({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out), text, tools


@settings(max_examples=150, deadline=None)
@given(pieces, st.sampled_from(["stop", "tool_calls", "length"]), st.data())
def test_any_chat_stream_becomes_events_the_sdk_accumulates(plan, finish, data):
    raw, text, tools = chat_stream(plan, finish)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    translator = ChatToMessagesStream("claude-x", [])
    out = b""
    last = 0
    for cut in [*cuts, len(raw)]:
        out += translator.feed(raw[last:cut])
        last = cut
    assert translator.complete
    out += translator.end()
    snapshot, buffers = None, {}
    events = events_of(out)
    for event in events:
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    blocks = snapshot.content
    assert "".join(b.text for b in blocks if b.type == "text") == text
    assert [b.input for b in blocks if b.type == "tool_use"] == tools
    assert [b.name for b in blocks if b.type == "tool_use"] == [
        f"tool{i}" for i in range(len(tools))
    ]
    expected = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}[finish]
    assert snapshot.stop_reason == expected
    assert (snapshot.usage.input_tokens, snapshot.usage.output_tokens) == (11, 7)
    assert events[0]["type"] == "message_start"
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
    starts = [e for e in events if e["type"] == "content_block_start"]
    stops = [e for e in events if e["type"] == "content_block_stop"]
    assert [e["index"] for e in starts] == [e["index"] for e in stops] == list(range(len(starts)))


def test_an_upstream_error_mid_stream_breaks_it():
    translator = ChatToMessagesStream("m", [])
    translator.feed(sse({"choices": [{"delta": {"content": "hi"}}]}))
    with pytest.raises(StreamBroken):
        translator.feed(b'data: {"error": {"message": "overloaded"}}\n\n')


def test_a_stream_cut_before_its_end_is_not_complete_and_an_endless_event_breaks():
    translator = ChatToMessagesStream("m", [])
    translator.feed(sse({"choices": [{"delta": {"content": "hi"}}]}))
    assert not translator.complete
    with pytest.raises(StreamBroken):
        translator.feed(b"data: " + b"x" * (1 << 20) + b"x")


def test_interleaved_tool_arguments_break_the_stream_rather_than_lose_them():
    translator = ChatToMessagesStream("m", [])

    def call(i: int, args: str, first: bool = False) -> bytes:
        c: dict[str, Any] = {"index": i, "function": {"arguments": args}}
        if first:
            c |= {"id": f"c{i}", "function": {"name": "t", "arguments": args}}
        return sse({"choices": [{"delta": {"tool_calls": [c]}}]})

    translator.feed(call(0, '{"a":', True) + call(1, "{}", True))
    with pytest.raises(StreamBroken):
        translator.feed(call(0, "1}"))


def test_what_claude_code_sends_maps():
    """Fields the real Claude Code CLI sends (2.1.x): system turns inside the messages,
    output_config.effort, adaptive thinking, context_management, a JSON user_id."""
    payload = {
        "model": "m",
        "max_tokens": 32000,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "system", "content": "a reminder"},
        ],
        "output_config": {"effort": "high"},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": '{"device_id": "' + "a" * 64 + '"}'},
    }
    body = request(payload, "m", effort=True)
    assert body["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "a reminder"},
    ]
    assert body["reasoning_effort"] == "high"
    assert "user" not in body  # longer than chat's user takes
    assert "reasoning_effort" not in request(payload, "m", effort=False)


def test_a_json_schema_output_format_is_a_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    payload = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
    }
    assert request(payload, "m")["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }
    with pytest.raises(Untranslatable) as caught:
        request({**payload, "output_config": {"task_budget": 5}}, "m")
    assert caught.value.param == "output_config.task_budget"


def test_one_huge_chunk_of_tiny_events_is_read_in_one_pass():
    """A hostile upstream's 2 MB chunk of 100,000 tiny events: each event was once copied
    off the rest of the buffer (quadratic: hours); now one pass."""
    event = b'data: {"choices":[]}\n\n'
    translator = ChatToMessagesStream("m", [])
    started = time.monotonic()
    translator.feed(event * 100_000)
    assert time.monotonic() - started < 2


def test_after_done_nothing_more_is_the_answers():
    translator = ChatToMessagesStream("m", [])
    out = translator.feed(
        sse({"choices": [{"delta": {"content": "before"}}]}) + b"data: [DONE]\n\n"
    )
    out += translator.feed(sse({"choices": [{"delta": {"content": " AFTER"}}]}))
    assert translator.done
    text = [e["delta"]["text"] for e in events_of(out) if e["type"] == "content_block_delta"]
    assert text == ["before"]


def test_usage_where_moonshot_puts_it_and_a_null_error_are_read():
    translator = ChatToMessagesStream("m", [])
    translator.feed(sse({"error": None, "choices": [{"delta": {"content": "hi"}}]}))
    usage = {"prompt_tokens": 9, "completion_tokens": 2}
    translator.feed(
        sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "usage": usage}]})
    )
    assert translator.usage == usage
    assert translator.text_bytes == 2


def test_a_new_id_at_a_used_index_is_another_call_and_a_nameless_call_breaks():
    translator = ChatToMessagesStream("m", [])

    def call(**fields: Any) -> bytes:
        return sse({"choices": [{"delta": {"tool_calls": [fields]}}]})

    out = translator.feed(
        call(index=0, id="a", function={"name": "Read", "arguments": '{"p": 1}'})
        + call(index=0, id="b", function={"name": "Write", "arguments": '{"q": 2}'})
        + call(function={"arguments": ""})  # no index, no id: the open call goes on
    )
    starts = [e["content_block"] for e in events_of(out) if e["type"] == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("a", "Read"), ("b", "Write")]
    with pytest.raises(StreamBroken):
        translator.feed(call(index=5, id="c", function={"arguments": "{}"}))


def test_an_event_in_many_small_pieces_costs_one_pass():
    translator = ChatToMessagesStream("m", [])
    event = sse({"choices": [{"delta": {"content": "x" * 900_000}}]})
    started = time.monotonic()
    out = b"".join(translator.feed(event[i : i + 512]) for i in range(0, len(event), 512))
    assert time.monotonic() - started < 0.5
    assert b"x" * 1000 in out


@pytest.mark.parametrize(
    "chat",
    [
        {"choices": []},
        {"choices": [{"finish_reason": "stop"}]},
        {"choices": [{"message": {"tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}}]},
    ],
)
def test_an_answer_with_nothing_to_translate_is_an_error_not_an_empty_message(chat):
    with pytest.raises(ValueError):
        response(chat, "m", [])
