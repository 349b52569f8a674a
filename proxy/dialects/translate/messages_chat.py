"""Anthropic Messages (what Claude Code and the anthropic SDK speak) to Chat Completions
(what most providers speak), and the answers back. Pure functions and one stream state
machine; no I/O.

Request, field by field (anything else is refused by name, ``Untranslatable``):

- ``system`` (a string, or text blocks) -> a first ``system`` message;
- ``messages``: text -> text; ``image`` (base64 or URL) -> ``image_url`` parts; an
  assistant's ``tool_use`` blocks -> its ``tool_calls`` (ids kept, ``input`` as a JSON
  string); a user's ``tool_result`` blocks -> ``tool`` messages, before the rest of that
  turn; ``thinking``/``redacted_thinking`` blocks of earlier turns are left out (a chat
  backend takes no signed reasoning back); ``cache_control`` anywhere is left out (a caching
  hint, not content);
- ``tools`` (custom tools: ``name``, ``description``, ``input_schema``) -> functions;
  ``tool_choice`` auto/any/tool/none -> auto/required/the function/none, and
  ``disable_parallel_tool_use`` -> ``parallel_tool_calls: false``;
- ``max_tokens``, ``temperature``, ``top_p``, ``stop_sequences`` (-> ``stop``), ``stream``
  (with usage asked for), ``metadata.user_id`` (-> ``user``), ``thinking`` (enabled ->
  ``reasoning_effort`` by its budget, where the route allows it).

Answer: the chat completion's text and tool calls become ``text`` and ``tool_use`` blocks
(``reasoning_content``, as DeepSeek and Kimi send it, a ``thinking`` block), its
``finish_reason`` the ``stop_reason`` (stop: ``end_turn``, or ``stop_sequence`` with the
sequence when the text ends with one of the request's; length: ``max_tokens``;
tool_calls: ``tool_use``; content_filter: ``refusal``), its usage Anthropic's (input
without the cached part, which is ``cache_read_input_tokens``). A stream is translated
event by event (``ChatToMessagesStream``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.dialects.translate import Untranslatable
from proxy.dialects.translate.chat_stream import (
    ChatStreamReader,
    StreamBroken,
    is_map,
)

# Fields of a Messages request and what happens to each: "map" (translated below) or
# "drop" (no meaning for a chat backend, and no effect on what is answered).
_FIELDS = {
    "model": "map",
    "messages": "map",
    "system": "map",
    "max_tokens": "map",
    "temperature": "map",
    "top_p": "map",
    "stop_sequences": "map",
    "stream": "map",
    "tools": "map",
    "tool_choice": "map",
    "metadata": "map",
    "thinking": "map",
    "output_config": "map",
    "cache_control": "drop",  # a caching hint (top-level automatic caching)
    # Anthropic's server-side clearing of old tool results or thinking as the context
    # fills (Claude Code always sends it): a chat backend gets the whole history instead.
    "context_management": "drop",
}
_REFUSED = {  # named, so the client is told what and why
    "top_k": "top_k has no Chat Completions equivalent",
    "service_tier": "service_tier is Anthropic's own",
    "container": "containers are Anthropic's own",
    "mcp_servers": "MCP connectors run on Anthropic's side",
}
_MAX_USER = 64  # characters of metadata.user_id sent as chat's user (a longer one is left out)
# Effort for a thinking budget (tokens): what reasoning_effort backends take.
_EFFORTS = ((4096, "low"), (16384, "medium"))


def request(payload: Mapping[str, Any], model: str, effort: bool = True) -> dict[str, Any]:
    """The Chat Completions body for a Messages request ``payload``, to ``model`` (the
    upstream's id). ``effort``: the backend takes ``reasoning_effort``."""
    for name in payload:
        if name in _REFUSED:
            raise Untranslatable(name, f"{_REFUSED[name]}: not translated to a chat backend")
        if name not in _FIELDS:
            raise Untranslatable(name, f"'{name}' is not translated to a chat backend")
    body: dict[str, Any] = {"model": model}
    messages = _system(payload.get("system"))
    raw = payload.get("messages")
    if not isinstance(raw, list):
        raise Untranslatable("messages", "messages must be a list")
    for i, message in enumerate(raw):
        messages += _message(message, f"messages.{i}")
    body["messages"] = messages
    if "max_tokens" in payload:
        body["max_tokens"] = payload["max_tokens"]
    for name in ("temperature", "top_p"):
        if name in payload:
            body[name] = payload[name]
    stops = payload.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise Untranslatable("stop_sequences", "stop_sequences must be strings")
        body["stop"] = stops
    if payload.get("stream") is True:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    metadata = payload.get("metadata")
    user = metadata.get("user_id") if is_map(metadata) else None
    if isinstance(user, str) and 0 < len(user) <= _MAX_USER:  # (Claude Code's: a JSON blob)
        body["user"] = user
    if payload.get("tools"):
        body["tools"] = [_tool(t, f"tools.{i}") for i, t in enumerate(_list(payload, "tools"))]
    if "tool_choice" in payload:
        body.update(_tool_choice(payload["tool_choice"]))
    output = _output_config(payload.get("output_config"))
    if "format" in output:
        body["response_format"] = output["format"]
    chosen = output.get("effort") or _thinking_effort(payload.get("thinking"))
    if chosen is not None and effort:
        body["reasoning_effort"] = chosen
    return body


def _thinking_effort(thinking: Any) -> str | None:
    """The effort a ``thinking`` setting asks for: by its budget, or medium (adaptive)."""
    if not is_map(thinking) or thinking.get("type") not in ("enabled", "adaptive"):
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int):
        return "medium"
    return next((e for limit, e in _EFFORTS if budget < limit), "high")


def _output_config(config: Any) -> dict[str, Any]:
    """``output_config``: ``effort`` (low/medium/high: reasoning effort, a hint where the
    backend has none) and ``format`` (a JSON schema: ``response_format``)."""
    if config is None:
        return {}
    if not is_map(config):
        raise Untranslatable("output_config", "output_config must be an object")
    found: dict[str, Any] = {}
    for name, value in config.items():
        if name == "effort":
            if value not in ("low", "medium", "high"):
                raise Untranslatable("output_config.effort", f"effort {value!r} is not translated")
            found["effort"] = value
        elif name == "format":
            found["format"] = _response_format(value)
        else:
            raise Untranslatable(f"output_config.{name}", f"'{name}' is not translated")
    return found


def _response_format(value: Any) -> dict[str, Any]:
    if not is_map(value) or value.get("type") != "json_schema" or not is_map(value.get("schema")):
        raise Untranslatable("output_config.format", "only a json_schema format is translated")
    schema = {"name": "output", "schema": value["schema"], "strict": True}
    return {"type": "json_schema", "json_schema": schema}


def _map(value: Any) -> dict[str, Any]:
    """``value`` when it is an object, else an empty one (what a hostile body may hold)."""
    return value if isinstance(value, dict) else {}


def _list(payload: Mapping[str, Any], name: str) -> list[Any]:
    value = payload.get(name)
    if not isinstance(value, list):
        raise Untranslatable(name, f"{name} must be a list")
    return value


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None or system == "" or system == []:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    if isinstance(system, list):
        texts = []
        for i, block in enumerate(system):
            if not is_map(block) or block.get("type") != "text":
                raise Untranslatable(f"system.{i}", "system blocks must be text")
            texts.append(_text(block, f"system.{i}"))
        return [{"role": "system", "content": _JOIN.join(texts)}]
    raise Untranslatable("system", "system must be a string or text blocks")


def _message(message: Any, place: str) -> list[dict[str, Any]]:
    if not is_map(message):
        raise Untranslatable(place, "a message must be an object")
    role = message.get("role")
    content = message.get("content")
    if role == "system":  # a system turn within the conversation (Claude Code sends them)
        return _system(content) if content not in (None, "", []) else []
    if role not in ("user", "assistant"):
        raise Untranslatable(f"{place}.role", "role must be user, assistant or system")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise Untranslatable(f"{place}.content", "content must be a string or blocks")
    if role == "assistant":
        return [_assistant(content, place)]
    return _user(content, place)


def _assistant(blocks: list[Any], place: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if is_map(block) else None
        where = f"{place}.content.{i}"
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_use":
            calls.append(_tool_call(block, where))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier reasoning, signed for Anthropic: no chat backend takes it
        else:
            raise Untranslatable(f"{place}.content.{i}", _block_refusal(kind))
    # Chat takes a null content only beside tool calls.
    message: dict[str, Any] = {"role": "assistant", "content": _JOIN.join(texts) or None}
    if not calls and message["content"] is None:
        message["content"] = ""
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[Any], place: str) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        kind = block.get("type") if is_map(block) else None
        where = f"{place}.content.{i}"
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, where)})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_result":
            tools.append(
                {
                    "role": "tool",
                    "tool_call_id": str(block.get("tool_use_id", "")),
                    "content": _tool_result_text(block, where),
                }
            )
        else:
            raise Untranslatable(where, _block_refusal(kind))
    # The results answer the previous assistant turn's calls: they come first.
    if not parts and not tools:
        raise Untranslatable(f"{place}.content", "a user turn without content")
    if not parts:
        return tools
    if all(p["type"] == "text" for p in parts):
        return [*tools, {"role": "user", "content": _JOIN.join(p["text"] for p in parts)}]
    return [*tools, {"role": "user", "content": parts}]


_JOIN = "\n\n"  # between a turn's text blocks (Claude Code's reminders are blocks of their own)


def _text(block: Mapping[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise Untranslatable(f"{where}.text", "a text block's text must be a string")
    return text


def _tool_call(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id, name, given = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        raise Untranslatable(where, "a tool_use block needs its id and name")
    if not isinstance(given, dict):
        raise Untranslatable(f"{where}.input", "a tool_use input must be an object")
    try:
        arguments = orjson.dumps(given).decode()
    except orjson.JSONEncodeError:
        raise Untranslatable(f"{where}.input", "the input is nested too deeply") from None
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _image(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if is_map(source) and source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif is_map(source) and source.get("type") == "url":
        url = str(source.get("url", ""))
    else:
        raise Untranslatable(f"{where}.source", "an image must be base64 or a URL")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_text(block: Mapping[str, Any], where: str) -> str:
    content = block.get("content")
    text = ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for i, part in enumerate(content):
            if not is_map(part) or part.get("type") != "text":
                kind = part.get("type") if is_map(part) else None
                raise Untranslatable(
                    f"{where}.content.{i}", f"a tool result's {kind} block is not translated"
                )
            pieces.append(str(part.get("text", "")))
        text = "\n".join(pieces)
    if block.get("is_error") is True:
        return f"Error: {text}" if text else "Error"
    return text


def _block_refusal(kind: Any) -> str:
    return f"content blocks of type {kind!r} are not translated to a chat backend"


def _tool(tool: Any, place: str) -> dict[str, Any]:
    if not is_map(tool):
        raise Untranslatable(place, "a tool must be an object")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise Untranslatable(
            f"{place}.type", f"server tool {kind!r} runs on Anthropic's side: not translated"
        )
    function: dict[str, Any] = {
        "name": str(tool.get("name", "")),
        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = str(tool["description"])
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> dict[str, Any]:
    if not is_map(choice):
        raise Untranslatable("tool_choice", "tool_choice must be an object")
    kind = choice.get("type")
    chosen: Any
    if kind == "auto":
        chosen = "auto"
    elif kind == "any":
        chosen = "required"
    elif kind == "none":
        chosen = "none"
    elif kind == "tool":
        chosen = {"type": "function", "function": {"name": str(choice.get("name", ""))}}
    else:
        raise Untranslatable("tool_choice.type", f"tool_choice {kind!r} is not translated")
    body: dict[str, Any] = {"tool_choice": chosen}
    if choice.get("disable_parallel_tool_use") is True:
        body["parallel_tool_calls"] = False
    return body


# ------------------------------------------------------------------ answers


_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def stop_reason(finish: Any, text: str, stops: list[str]) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for a chat ``finish_reason``. Chat says
    only "stop"; a stop sequence ends the text when it was the cause (backends that keep
    it) — else it was cut off, and the turn's end is the best reading."""
    reason = _STOP_REASONS.get(str(finish), "end_turn")
    if reason == "end_turn":
        for stop in stops:
            if stop and text.endswith(stop):
                return "stop_sequence", stop
    return reason, None


def usage(chat_usage: Any) -> dict[str, int]:
    """Anthropic's usage from a chat usage object: input without its cached part."""
    if not is_map(chat_usage):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = _int(chat_usage.get("prompt_tokens"))
    details = chat_usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if is_map(details) else 0
    cached = min(cached, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": _int(chat_usage.get("completion_tokens")),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def message_id(chat_id: Any) -> str:
    text = str(chat_id or "")
    return "msg_" + (re.sub(r"[^A-Za-z0-9_-]", "", text)[:64] or "proxy")


def _tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments (a JSON string) as Anthropic's ``input`` object. Arguments
    that are not a JSON object are kept whole under ``_arguments`` (never dropped)."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"_arguments": str(arguments)}
    return value if isinstance(value, dict) else {"_arguments": value}


def response(chat: Mapping[str, Any], model: str, stops: list[str]) -> dict[str, Any]:
    """A Messages answer for a chat completion ``chat``; ``model`` as the client named it."""
    choices = chat.get("choices")
    choice = _map(choices[0]) if isinstance(choices, list) and choices else {}
    if not is_map(choice.get("message")):
        raise ValueError("a chat completion without choices[0].message")
    message = choice["message"]
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    text = text if isinstance(text, str) else ""
    if text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = _map(call.get("function")) if is_map(call) else {}
        if not function.get("name") or not isinstance(function["name"], str):
            raise ValueError("a tool call without a name")
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or ""),
                "name": str(function.get("name") or ""),
                "input": _tool_input(function.get("arguments")),
            }
        )
    reason, sequence = stop_reason(choice.get("finish_reason"), text, stops)
    return {
        "id": message_id(chat.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(chat.get("usage")),
    }


def event(kind: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ChatToMessagesStream(ChatStreamReader):
    """Chat Completions stream bytes in, Messages events out, as they come.

    ``feed(chunk)`` returns the events the chunk completes (any chunking: an event split
    anywhere waits for its end); ``end()`` those that close the message once the chat
    stream said ``[DONE]``. ``usage`` is the chat usage seen (for the proxy's own counts).
    Raises ``StreamBroken`` on an upstream error event or an event past 1 MiB."""

    call_prefix = "toolu_"

    def __init__(self, model: str, stops: list[str]) -> None:
        self.model = model
        self.stops = stops
        super().__init__()
        self._index = -1  # the open block's index, -1: none
        self._open: str | None = None  # its kind: text, thinking, tool_use
        self._tools: dict[int, int] = {}  # the answer's tool call (its slot) -> block index
        self._text = ""  # the answer's text so far (the tail, for the stop sequence)

    def end(self) -> bytes:
        """The closing events (after ``[DONE]``, or a clean end with a finish reason)."""
        out = [self._start()] if not self._started else []
        out.append(self._close_block())
        reason, sequence = stop_reason(self._finish, self._text, self.stops)
        out.append(
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage(self.usage),
                },
            )
        )
        out.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def on_first(self, chunk: Mapping[str, Any]) -> bytes:
        return self._start(chunk.get("id"))

    def _start(self, chat_id: Any = None) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": message_id(chat_id),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return event("message_start", {"type": "message_start", "message": message})

    def on_choice(self, choice: Mapping[str, Any]) -> bytes:
        out: list[bytes] = []
        delta = _map(choice.get("delta"))
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            out.append(self._open_block("thinking", {"type": "thinking", "thinking": ""}))
            out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(self._open_block("text", {"type": "text", "text": ""}))
            out.append(self._delta({"type": "text_delta", "text": text}))
            self._text = (self._text + text)[-256:]
            self._output += len(text)
        for call in delta.get("tool_calls") or ():
            if is_map(call):
                out.append(self._on_tool_call(call))
        return b"".join(out)

    def _on_tool_call(self, call: Mapping[str, Any]) -> bytes:
        out: list[bytes] = []
        function = _map(call.get("function"))
        slot, new = self.slot_of(call)
        if new:
            name = function.get("name")
            if not isinstance(name, str) or not name:
                raise StreamBroken("the upstream began a tool call without its name")
            block_id = self.call_ids[slot]
            block = {"type": "tool_use", "id": block_id, "name": name, "input": {}}
            out.append(self._open_block("tool_use", block, force=True))
            self._tools[slot] = self._index
        elif self._tools[slot] != self._index:
            # Arguments for a call whose block is closed: Messages cannot reopen it, and
            # dropping them would hand the client a tool call it never made.
            raise StreamBroken("the upstream interleaved the arguments of two tool calls")
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
            self._output += len(arguments)
        return b"".join(out)

    def _open_block(self, kind: str, block: dict[str, Any], force: bool = False) -> bytes:
        """A block of ``kind`` open at the current index (a new one when the open one is
        another kind, or ``force``: each tool call is its own block)."""
        if self._open == kind and not force:
            return b""
        out = self._close_block()
        self._index += 1
        self._open = kind
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        return out + event("content_block_start", start)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        data = {"type": "content_block_delta", "index": self._index, "delta": delta}
        return event("content_block_delta", data)

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        out = b""
        if self._open == "thinking":  # the SDK's thinking block ends with its signature
            out = self._delta({"type": "signature_delta", "signature": ""})
        self._open = None
        return out + event(
            "content_block_stop", {"type": "content_block_stop", "index": self._index}
        )
