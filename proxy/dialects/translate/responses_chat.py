"""OpenAI Responses (what Codex CLI and ``client.responses`` speak) to Chat Completions
(what most providers speak), and the answers back. Pure functions and one stream state
machine; no I/O.

Request, field by field (anything else is refused by name, ``Untranslatable``):

- ``instructions``, and the system/developer messages that open ``input`` -> one first
  ``system`` message (strict chat templates take only one, first); later ones stay
  ``system`` messages where they are;
- ``input`` (a string: one user message; or items): messages (``input_text``,
  ``output_text`` -> text; ``input_image`` by URL -> ``image_url``; ``refusal`` -> text),
  ``function_call`` -> the assistant's ``tool_calls`` (consecutive calls one turn, ids
  kept), ``function_call_output`` -> ``tool`` messages; ``reasoning`` items of earlier
  turns are left out (a chat backend takes no encrypted reasoning back);
- ``tools``: ``function`` tools -> functions; a ``namespace`` of functions (Codex's
  ``multi_agent_v1``) -> functions named ``<namespace>__<name>``, named back in the
  answer; built-in tools (``web_search``, ``file_search``, ``computer_use``, ...) are
  refused: they run on OpenAI's side;
- ``tool_choice``, ``parallel_tool_calls``, ``max_output_tokens`` (-> ``max_tokens``),
  ``temperature``, ``top_p``, ``text.format`` (-> ``response_format``), ``reasoning.effort``
  (-> ``reasoning_effort``, where the route allows it), ``user``/``safety_identifier``
  (-> ``user``), ``stream`` (with usage asked for);
- answered by the proxy itself: ``store``, ``previous_response_id`` (the conversation is
  kept by the proxy and sent whole: ``with_history``), ``metadata`` (kept on the stored
  response); dropped as hints with no chat meaning: ``include``, ``prompt_cache_key``
  (the proxy's affinity reads it), ``client_metadata``, ``reasoning.summary``,
  ``text.verbosity``, ``truncation``, ``stream_options``, ``service_tier`` auto/default.

Answer: the chat completion becomes a ``response`` whose ``output`` holds a ``reasoning``
item (``reasoning_content``, as DeepSeek and Kimi send it, as its summary), a ``message``
item (``output_text``, or ``refusal``) and one ``function_call`` item per tool call; its
``finish_reason`` the ``status`` (length: ``incomplete`` with ``max_output_tokens``,
content_filter: ``incomplete``), its usage Responses' (cached and reasoning tokens in the
details). A stream is translated event by event (``ChatToResponsesStream``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.dialects.translate import Untranslatable
from proxy.dialects.translate.chat_stream import ChatStreamReader, StreamBroken, is_map

_MAPPED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "reasoning",
        "user",
        "safety_identifier",
        "stream",
        "store",  # the proxy keeps the conversation (forward)
        "metadata",  # kept on the stored response, not sent
        "background",  # false only
        "service_tier",  # auto/default only
    }
)
_DROPPED = frozenset(  # hints with no meaning for a chat backend, no effect on the answer
    {"include", "prompt_cache_key", "client_metadata", "truncation", "stream_options"}
)
_REFUSED = {
    "previous_response_id": "the conversation it names is not one this proxy kept",
    "conversation": "conversations are objects of OpenAI's own",
    "prompt": "prompt templates are OpenAI's own",
    "max_tool_calls": "max_tool_calls has no Chat Completions equivalent",
    "top_logprobs": "logprobs are not translated",
}
_BUILT_IN = (
    "runs on OpenAI's side: not translated to a chat backend"
    ' (Codex CLI: web_search = "disabled" in its config.toml)'
)
_MAX_USER = 64  # characters of user / safety_identifier sent as chat's user
_EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}
NAMESPACE_JOIN = "__"  # <namespace>__<tool>: a chat function name for a namespaced tool
# What a stream's translation holds for its done events (the whole text, each call's
# arguments): 16 MiB, ~30x the longest answer a model writes today; past it, or past
# MAX_ITEMS output items, the stream is broken off (StreamBroken), never held on.
MAX_HELD = 16 << 20
MAX_ITEMS = 1024


def request(payload: Mapping[str, Any], model: str, effort: bool = True) -> dict[str, Any]:
    """The Chat Completions body for a Responses request ``payload``, to ``model`` (the
    upstream's id). ``effort``: the backend takes ``reasoning_effort``."""
    for name, value in payload.items():
        if name in _MAPPED or name in _DROPPED:
            continue
        if name in _REFUSED:
            if value is None:  # an explicit null is no value (some clients send them)
                continue
            raise Untranslatable(name, f"{_REFUSED[name]}: not translated to a chat backend")
        raise Untranslatable(name, f"'{name}' is not translated to a chat backend")
    _check_types(payload)
    if payload.get("background") not in (None, False):
        raise Untranslatable("background", "background responses are OpenAI's own")
    if payload.get("service_tier") not in (None, "auto", "default"):
        raise Untranslatable("service_tier", "service tiers are OpenAI's own")
    body: dict[str, Any] = {"model": model, "messages": messages(payload)}
    if "max_output_tokens" in payload and payload["max_output_tokens"] is not None:
        body["max_tokens"] = payload["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls"):
        if payload.get(name) is not None:
            body[name] = payload[name]
    if payload.get("stream") is True:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    user = payload.get("safety_identifier") or payload.get("user")
    if isinstance(user, str) and 0 < len(user) <= _MAX_USER:
        body["user"] = user
    tools = payload.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise Untranslatable("tools", "tools must be a list")
        body["tools"] = [f for i, t in enumerate(tools) for f in _tool(t, f"tools.{i}")]
    if payload.get("tool_choice") is not None:
        body["tool_choice"] = _tool_choice(payload["tool_choice"])
    text = payload.get("text")
    if text is not None:
        body.update(_text_format(text))
    chosen = _effort(payload.get("reasoning"))
    if chosen is not None and effort:
        body["reasoning_effort"] = chosen
    return body


# Fields sent on (or read) as they are: their type checked here, so that a backend never
# gets what the client's own API would have refused.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "max_output_tokens": ((int,), "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "parallel_tool_calls": ((bool,), "a boolean"),
    "store": ((bool,), "a boolean"),
    "stream": ((bool,), "a boolean"),
    "background": ((bool,), "a boolean"),
    "metadata": ((dict,), "an object"),
    "user": ((str,), "a string"),
    "safety_identifier": ((str,), "a string"),
    "instructions": ((str,), "a string"),
}


def _check_types(payload: Mapping[str, Any]) -> None:
    for name, (types, word) in _TYPES.items():
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise Untranslatable(name, f"{name} must be {word}")


def with_history(payload: Mapping[str, Any], items: list[Any]) -> dict[str, Any]:
    """``payload`` continuing a kept conversation: its ``items`` (the earlier turns' input
    and output, in order) before the request's own input, ``previous_response_id`` gone
    (the instructions are the request's own, as OpenAI does)."""
    continued = {k: v for k, v in payload.items() if k != "previous_response_id"}
    given = payload.get("input")
    new = [{"role": "user", "content": given}] if isinstance(given, str) else given or []
    if not isinstance(new, list):
        raise Untranslatable("input", "input must be a string or a list of items")
    continued["input"] = [*items, *new]
    return continued


def input_items(payload: Mapping[str, Any]) -> list[Any]:
    """The request's input as items (a string is one user message), to keep."""
    given = payload.get("input")
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return list(given) if isinstance(given, list) else []


# ------------------------------------------------------------------ request pieces


def messages(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    system: list[str] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str) and instructions:
        system.append(instructions)
    elif instructions not in (None, ""):
        raise Untranslatable("instructions", "instructions must be a string")
    given = payload.get("input")
    items: list[Any]
    if isinstance(given, str):
        items = [{"role": "user", "content": given}]
    elif isinstance(given, list):
        items = given
    elif given is None:
        items = []
    else:
        raise Untranslatable("input", "input must be a string or a list of items")
    out: list[dict[str, Any]] = []
    opening = True  # still in the system/developer messages that open the input
    for i, item in enumerate(items):
        place = f"input.{i}"
        if not is_map(item):
            raise Untranslatable(place, "an input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                text = _message_text(item, place)
                if opening:
                    system.append(text)
                else:
                    out.append({"role": "system", "content": text})
                continue
            opening = False
            out.append(_message(item, role, place))
        elif kind == "function_call":
            opening = False
            _add_call(out, _function_call(item, place))
        elif kind == "function_call_output":
            opening = False
            out.append(_function_output(item, place))
        elif kind == "reasoning":
            continue  # earlier reasoning, encrypted for OpenAI: no chat backend takes it
        else:
            raise Untranslatable(
                f"{place}.type", f"input items of type {kind!r} are not translated"
            )
    head = [{"role": "system", "content": _JOIN.join(system)}] if system else []
    return head + out


_JOIN = "\n\n"


def _message_text(item: Mapping[str, Any], place: str) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    parts = _parts(content, place)
    if any(p["type"] != "text" for p in parts):
        raise Untranslatable(f"{place}.content", "a system message takes text only")
    return _JOIN.join(p["text"] for p in parts)


def _message(item: Mapping[str, Any], role: Any, place: str) -> dict[str, Any]:
    if role not in ("user", "assistant"):
        raise Untranslatable(f"{place}.role", "role must be user, assistant, system or developer")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    parts = _parts(content, place)
    if all(p["type"] == "text" for p in parts):
        return {"role": role, "content": _JOIN.join(p["text"] for p in parts)}
    if role == "assistant":
        raise Untranslatable(f"{place}.content", "an assistant message takes text only")
    return {"role": role, "content": parts}


def _parts(content: Any, place: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise Untranslatable(f"{place}.content", "content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        where = f"{place}.content.{i}"
        kind = part.get("type") if is_map(part) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": _string(part, "text", where)})
        elif kind == "refusal":
            parts.append({"type": "text", "text": _string(part, "refusal", where)})
        elif kind == "input_image":
            assert is_map(part)
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise Untranslatable(f"{where}.file_id", "an image by file_id is not translated")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise Untranslatable(where, f"content parts of type {kind!r} are not translated")
    return parts


def _string(part: Mapping[str, Any], name: str, where: str) -> str:
    value = part.get(name)
    if not isinstance(value, str):
        raise Untranslatable(f"{where}.{name}", f"{name} must be a string")
    return value


def _function_call(item: Mapping[str, Any], place: str) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
    if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
        raise Untranslatable(place, "a function_call needs its call_id and name")
    if not isinstance(arguments, str):
        raise Untranslatable(f"{place}.arguments", "arguments must be a JSON string")
    namespace = item.get("namespace")
    if isinstance(namespace, str) and namespace:
        name = namespace + NAMESPACE_JOIN + name
    function = {"name": name, "arguments": arguments or "{}"}
    return {"id": call_id, "type": "function", "function": function}


def _add_call(out: list[dict[str, Any]], call: dict[str, Any]) -> None:
    """A call joins the assistant turn just before it (its text, or calls before it)."""
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant" and isinstance(last["content"], str | None):
        last.setdefault("tool_calls", []).append(call)
        if last["content"] == "":
            last["content"] = None
        return
    out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_output(item: Mapping[str, Any], place: str) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise Untranslatable(f"{place}.call_id", "a function_call_output needs its call_id")
    output = item.get("output")
    if isinstance(output, str):
        text = output
    else:
        parts = _parts(output, place.replace("content", "output"))
        if any(p["type"] != "text" for p in parts):
            raise Untranslatable(f"{place}.output", "a tool output takes text only on chat")
        text = "\n".join(p["text"] for p in parts)
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _tool(tool: Any, place: str) -> list[dict[str, Any]]:
    if not is_map(tool):
        raise Untranslatable(place, "a tool must be an object")
    kind = tool.get("type")
    if kind == "function":
        return [_function(tool, place, "")]
    if kind == "namespace":
        namespace = tool.get("name")
        inner = tool.get("tools")
        if not isinstance(namespace, str) or not namespace or not isinstance(inner, list):
            raise Untranslatable(place, "a namespace needs its name and tools")
        found = []
        for j, t in enumerate(inner):
            where = f"{place}.tools.{j}"
            if not is_map(t) or t.get("type") != "function":
                raise Untranslatable(where, "a namespace of functions only is translated")
            found.append(_function(t, where, namespace))
        return found
    raise Untranslatable(f"{place}.type", f"built-in tool {kind!r} {_BUILT_IN}")


def _function(tool: Mapping[str, Any], place: str, namespace: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise Untranslatable(f"{place}.name", "a function needs its name")
    if namespace:
        name = namespace + NAMESPACE_JOIN + name
    parameters = tool.get("parameters")
    if parameters is not None and not is_map(parameters):
        raise Untranslatable(f"{place}.parameters", "parameters must be a JSON schema object")
    function: dict[str, Any] = {
        "name": name,
        "parameters": parameters or {"type": "object", "properties": {}},
    }
    if isinstance(tool.get("description"), str) and tool["description"]:
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if is_map(choice) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if is_map(choice) else choice
    raise Untranslatable("tool_choice", f"tool_choice {kind!r} is not translated")


def _text_format(text: Any) -> dict[str, Any]:
    if not is_map(text):
        raise Untranslatable("text", "text must be an object")
    for name in text:
        if name not in ("format", "verbosity"):
            raise Untranslatable(f"text.{name}", f"'{name}' is not translated")
    fmt = text.get("format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if is_map(fmt) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        assert is_map(fmt)
        if not is_map(fmt.get("schema")):
            raise Untranslatable("text.format.schema", "a json_schema format needs its schema")
        schema: dict[str, Any] = {"name": str(fmt.get("name") or "output"), "schema": fmt["schema"]}
        for name in ("strict", "description"):
            if fmt.get(name) is not None:
                schema[name] = fmt[name]
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise Untranslatable("text.format.type", f"text format {kind!r} is not translated")


def _effort(reasoning: Any) -> str | None:
    if reasoning is None:
        return None
    if not is_map(reasoning):
        raise Untranslatable("reasoning", "reasoning must be an object")
    effort = reasoning.get("effort")
    if effort is None or effort == "none":
        return None
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise Untranslatable("reasoning.effort", f"effort {effort!r} is not translated")
    return _EFFORTS[effort]


# ------------------------------------------------------------------ answers


def response_id() -> str:
    """A new response's id: the proxy's own (a chat backend keeps no response)."""
    return "resp_" + secrets.token_hex(24)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage(chat_usage: Any) -> dict[str, Any]:
    """Responses' usage from a chat usage object (cached and reasoning tokens kept)."""
    chat_usage = chat_usage if is_map(chat_usage) else {}
    prompt = _int(chat_usage.get("prompt_tokens"))
    completion = _int(chat_usage.get("completion_tokens"))
    details = chat_usage.get("prompt_tokens_details")
    cached = min(_int(details.get("cached_tokens")) if is_map(details) else 0, prompt)
    out_details = chat_usage.get("completion_tokens_details")
    reasoning = _int(out_details.get("reasoning_tokens")) if is_map(out_details) else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": min(reasoning, completion)},
        "total_tokens": prompt + completion,
    }


_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def shell(payload: Mapping[str, Any], rid: str, created: int) -> dict[str, Any]:
    """A response object with the request's settings echoed (as OpenAI's does), no output."""
    tools = payload.get("tools")
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "model": str(payload.get("model") or ""),
        "output": [],
        "parallel_tool_calls": payload.get("parallel_tool_calls", True),
        "previous_response_id": payload.get("previous_response_id"),
        "reasoning": payload.get("reasoning") or {"effort": None, "summary": None},
        "store": payload.get("store", True) is not False,
        "temperature": payload.get("temperature"),
        "text": payload.get("text") or {"format": {"type": "text"}},
        "tool_choice": payload.get("tool_choice", "auto"),
        "tools": tools if isinstance(tools, list) else [],
        "top_p": payload.get("top_p"),
        "truncation": payload.get("truncation", "disabled"),
        "usage": None,
        "user": payload.get("user"),
        "metadata": payload.get("metadata") or {},
    }


def _finished(document: dict[str, Any], finish: Any, chat_usage: Any) -> dict[str, Any]:
    reason = _INCOMPLETE.get(str(finish))
    document["status"] = "incomplete" if reason else "completed"
    document["incomplete_details"] = {"reason": reason} if reason else None
    document["usage"] = usage(chat_usage)
    return document


def tool_name(name: str, namespaces: frozenset[str]) -> dict[str, str]:
    """A chat function's name as the client named it: ``name`` and, for a namespaced tool
    the request offered, its ``namespace``."""
    space, sep, inner = name.partition(NAMESPACE_JOIN)
    if sep and inner and space in namespaces:
        return {"name": inner, "namespace": space}
    return {"name": name}


def namespaces_of(payload: Mapping[str, Any]) -> frozenset[str]:
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return frozenset()
    return frozenset(
        t["name"]
        for t in tools
        if is_map(t) and t.get("type") == "namespace" and isinstance(t.get("name"), str)
    )


def _item_id(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def response(chat: Mapping[str, Any], payload: Mapping[str, Any], rid: str) -> dict[str, Any]:
    """A Responses answer for a chat completion ``chat``, with id ``rid``."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and is_map(choices[0]) else {}
    message = choice.get("message")
    if not is_map(message):
        raise ValueError("a chat completion without choices[0].message")
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        summary = [{"type": "summary_text", "text": reasoning}]
        output.append({"type": "reasoning", "id": _item_id("rs_"), "summary": summary})
    parts: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        parts.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    if parts:
        output.append(_message_item(_item_id("msg_"), parts, "completed"))
    namespaces = namespaces_of(payload)
    seen: set[str] = set()
    for n, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if is_map(call) else None
        name = function.get("name") if is_map(function) else None
        if not isinstance(name, str) or not name:
            raise ValueError("a tool call without a name")
        assert is_map(call) and is_map(function)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id or call_id in seen:
            call_id = f"call_{n}"
        seen.add(call_id)
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments or {}).decode()
        output.append(
            _call_item(
                _item_id("fc_"), call_id, tool_name(name, namespaces), arguments, "completed"
            )
        )
    created = chat.get("created")
    document = shell(payload, rid, created if isinstance(created, int) else int(time.time()))
    document["output"] = output
    return _finished(document, choice.get("finish_reason"), chat.get("usage"))


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": parts,
    }


def _call_item(
    item_id: str, call_id: str, name: dict[str, str], arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        **name,
        "arguments": arguments,
        "status": status,
    }


# ------------------------------------------------------------------ streams


class ChatToResponsesStream(ChatStreamReader):
    """Chat Completions stream bytes in, Responses events out, as they come.

    Items open in the order their first delta comes: reasoning (a summary), the message
    (its text or refusal parts), one function call per tool call. Reasoning and message
    close when another item begins; function calls stay open to the end (chat servers may
    interleave the arguments of parallel calls, which Responses can carry: each delta names
    its item). ``end()`` closes them and sends ``response.completed`` (or ``.incomplete``)
    with the whole response, which is then ``final`` (what the proxy keeps, when stored).
    """

    def __init__(self, payload: Mapping[str, Any], rid: str) -> None:
        super().__init__()
        self.payload = payload
        self._response = shell(payload, rid, int(time.time()))
        self._namespaces = namespaces_of(payload)
        self._sequence = 0
        self._items: list[dict[str, Any]] = []  # output items, by output_index
        self._open: int | None = None  # the open reasoning or message item's index
        self._part: str | None = None  # the open message part's kind: output_text, refusal
        self._calls: dict[int, int] = {}  # the answer's tool call (its slot) -> output index
        self._held = 0  # characters held for the done events (MAX_HELD)

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, **data, "sequence_number": self._sequence}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def on_first(self, chunk: Mapping[str, Any]) -> bytes:
        self._started = True
        return self._event("response.created", {"response": self._response}) + self._event(
            "response.in_progress", {"response": self._response}
        )

    def on_choice(self, choice: Mapping[str, Any]) -> bytes:
        delta = choice.get("delta")
        if not is_map(delta):
            return b""
        out: list[bytes] = []
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            out.append(self._reasoning(reasoning))
        text = delta.get("content")
        if isinstance(text, str) and text:
            out.append(self._text("output_text", text))
            self._output += len(text)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            out.append(self._text("refusal", refusal))
        for call in delta.get("tool_calls") or ():
            if is_map(call):
                out.append(self._tool_call(call))
        return b"".join(out)

    def _hold(self, text: str) -> None:
        self._held += len(text)
        if self._held > MAX_HELD:
            raise StreamBroken(f"the answer passed {MAX_HELD >> 20} MiB")

    def _add(self, item: dict[str, Any]) -> bytes:
        if len(self._items) >= MAX_ITEMS:
            raise StreamBroken(f"the answer passed {MAX_ITEMS} output items")
        self._items.append(item)
        index = len(self._items) - 1
        return self._event("response.output_item.added", {"output_index": index, "item": item})

    def _reasoning(self, text: str) -> bytes:
        out = b""
        index = self._open
        if index is None or self._items[index]["type"] != "reasoning":
            out = self._close_open()
            item: dict[str, Any] = {"type": "reasoning", "id": _item_id("rs_"), "summary": []}
            out += self._add(item)
            index = self._open = len(self._items) - 1
            part = {"type": "summary_text", "text": ""}
            out += self._event(
                "response.reasoning_summary_part.added",
                {"item_id": item["id"], "output_index": index, "summary_index": 0, "part": part},
            )
            item["_text"] = []
        item = self._items[index]
        self._hold(text)
        item["_text"].append(text)
        return out + self._event(
            "response.reasoning_summary_text.delta",
            {"item_id": item["id"], "output_index": index, "summary_index": 0, "delta": text},
        )

    def _text(self, kind: str, text: str) -> bytes:
        out = b""
        index = self._open
        if index is None or self._items[index]["type"] != "message":
            out = self._close_open()
            item = _message_item(_item_id("msg_"), [], "in_progress")
            out += self._add(item)
            index = self._open = len(self._items) - 1
            item["_parts"] = []
        item = self._items[index]
        if self._part != kind:
            out += self._close_part()
            self._part = kind
            part: dict[str, Any] = (
                {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                if kind == "output_text"
                else {"type": "refusal", "refusal": ""}
            )
            item["_parts"].append([kind, []])
            out += self._event(
                "response.content_part.added",
                {
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": len(item["_parts"]) - 1,
                    "part": part,
                },
            )
        self._hold(text)
        item["_parts"][-1][1].append(text)
        where = {"item_id": item["id"], "output_index": index}
        where["content_index"] = len(item["_parts"]) - 1
        if kind == "output_text":
            return out + self._event(
                "response.output_text.delta", {**where, "delta": text, "logprobs": []}
            )
        return out + self._event("response.refusal.delta", {**where, "delta": text})

    def _close_part(self) -> bytes:
        """The open message part's done event."""
        if self._part is None or self._open is None:
            return b""
        item = self._items[self._open]
        kind, pieces = item["_parts"][-1]
        text = "".join(pieces)
        item["content"].append(_part(kind, text))
        where = {
            "item_id": item["id"],
            "output_index": self._open,
            "content_index": len(item["_parts"]) - 1,
        }
        self._part = None
        if kind == "output_text":
            done = self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
        else:
            done = self._event("response.refusal.done", {**where, "refusal": text})
        return done + self._event(
            "response.content_part.done", {**where, "part": _part(kind, text)}
        )

    def _close_open(self) -> bytes:
        """The open reasoning or message item, done."""
        index = self._open
        if index is None:
            return b""
        item = self._items[index]
        out = b""
        if item["type"] == "reasoning":
            text = "".join(item.pop("_text"))
            part = {"type": "summary_text", "text": text}
            where = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            out += self._event("response.reasoning_summary_text.done", {**where, "text": text})
            out += self._event("response.reasoning_summary_part.done", {**where, "part": part})
            item["summary"] = [part]
        else:
            out += self._close_part()
            item.pop("_parts")
            item["status"] = "completed"
        self._open = None
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def _tool_call(self, call: Mapping[str, Any]) -> bytes:
        function = call.get("function")
        function = function if is_map(function) else {}
        slot, new = self.slot_of(call)
        out = b""
        if new:
            name = function.get("name")
            if not isinstance(name, str) or not name:
                raise StreamBroken("the upstream began a tool call without its name")
            out = self._close_open()
            named = tool_name(name, self._namespaces)
            item = _call_item(_item_id("fc_"), self.call_ids[slot], named, "", "in_progress")
            out += self._add(item)
            self._calls[slot] = len(self._items) - 1
            item["_arguments"] = []
        index = self._calls[slot]
        item = self._items[index]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._hold(arguments)
            item["_arguments"].append(arguments)
            self._output += len(arguments)
            out += self._event(
                "response.function_call_arguments.delta",
                {"item_id": item["id"], "output_index": index, "delta": arguments},
            )
        return out

    def end(self) -> bytes:
        out = [] if self._started else [self.on_first({})]
        out.append(self._close_open())
        for index in sorted(self._calls.values()):
            item = self._items[index]
            arguments = "".join(item.pop("_arguments"))
            item["arguments"] = arguments
            item["status"] = "completed"
            where = {"item_id": item["id"], "output_index": index}
            done = {**where, "name": item["name"], "arguments": arguments}
            out.append(self._event("response.function_call_arguments.done", done))
            out.append(
                self._event("response.output_item.done", {"output_index": index, "item": item})
            )
        document = dict(self._response, output=self._items)
        final = _finished(document, self._finish, self.usage)
        self.final = final
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        out.append(self._event(kind, {"response": final}))
        return b"".join(out)


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "refusal", "refusal": text}
