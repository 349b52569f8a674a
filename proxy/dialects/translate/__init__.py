"""Translations between wires: a client's dialect spoken to a backend that speaks another.

One module per pair, each pure (no I/O): a request body to a request body, an upstream
answer (JSON, or stream events as they come) to the client's, an upstream error to the
client's error shape. What cannot be translated is refused by name (``Untranslatable``),
never dropped. A backend declares the wire its chat endpoint speaks (``chat_wire``);
``pick`` finds the translation a request needs, if any: a backend that speaks the
client's dialect natively is always spoken to natively.

Pairs: ``messages_chat`` (Anthropic Messages to Chat Completions), ``responses_chat``
(OpenAI Responses to Chat Completions). ``chat_stream`` reads the chat streams both get.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

if TYPE_CHECKING:
    from proxy.config import BackendConfig
    from proxy.dialects.base import Dialect
    from proxy.dialects.translate.messages_chat import ChatToMessagesStream
    from proxy.dialects.translate.responses_chat import ChatToResponsesStream


class Untranslatable(ValueError):
    """A request field (or value) the pair cannot carry: the client hears which, as a 400."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(why)
        self.param = param
        self.why = why


class MessagesToChat:
    """Anthropic Messages requests sent to a Chat Completions endpoint (``chat_wire:
    chat``), their answers, streams and errors brought back."""

    wire = "chat"  # what the upstream speaks: the access log's upstream_wire
    paths: ClassVar[Mapping[str, str]] = {"/messages": "/chat/completions"}

    def __init__(self, effort: bool) -> None:
        self.effort = effort  # the backend takes reasoning_effort (from thinking)

    @property
    def upstream(self) -> Dialect:
        """The dialect the backend is spoken to in: its base URL and key header."""
        from proxy.dialects.openai import OPENAI

        return OPENAI

    estimated = "/messages/count_tokens"  # answered by the proxy: chat has no such call
    keeps_conversations = False

    def path(self, path: str) -> str:
        return self.paths.get(path, path)

    def estimate(self, body: bytes) -> bytes:
        """``count_tokens`` for a backend without one: the request's characters / 4, the
        rule of thumb the budgets use too (the answer's header says it is an estimate)."""
        return orjson.dumps({"input_tokens": len(body) // 4})

    def body(self, payload: dict[str, Any], model: str) -> dict[str, Any]:
        """The upstream's body (raises ``Untranslatable``)."""
        from proxy.dialects.translate import messages_chat

        return messages_chat.request(payload, model, self.effort)

    def document(self, data: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        """The client's answer for the upstream's JSON ``data`` (raises ``ValueError``)."""
        from proxy.dialects.translate import messages_chat

        model = str(payload.get("model") or "")
        return messages_chat.response(_json_object(data), model, _stops(payload))

    def stream(self, payload: dict[str, Any]) -> ChatToMessagesStream:
        from proxy.dialects.translate.messages_chat import ChatToMessagesStream

        return ChatToMessagesStream(str(payload.get("model") or ""), _stops(payload))

    @staticmethod
    def kept(payload: dict[str, Any], answer: dict[str, Any]) -> list[Any] | None:
        return None  # Messages keeps no conversation: the client sends it whole

    @staticmethod
    def continued(payload: dict[str, Any], items: list[Any]) -> dict[str, Any]:
        return payload

    def error(self, status: int, data: bytes) -> bytes:
        """The upstream's error (OpenAI's shape) in Anthropic's, its message kept."""
        from proxy.dialects.anthropic import error_document, error_type

        message = f"The upstream answered {status}."
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"][:2000]
        elif isinstance(error, str):
            message = error[:2000]
        return orjson.dumps(error_document(error_type(status), message))


def _stops(payload: dict[str, Any]) -> list[str]:
    stops = payload.get("stop_sequences")
    return [s for s in stops if isinstance(s, str)] if isinstance(stops, list) else []


class ResponsesToChat:
    """OpenAI Responses requests sent to a Chat Completions endpoint (``chat_wire: chat``),
    their answers, streams and errors brought back. A chat backend keeps no response: the
    proxy keeps the conversation (``keeps_conversations``) for ``previous_response_id``."""

    wire = "chat"
    paths: ClassVar[Mapping[str, str]] = {"/responses": "/chat/completions"}
    estimated = "/responses/input_tokens"
    keeps_conversations = True

    def __init__(self, effort: bool) -> None:
        self.effort = effort

    @property
    def upstream(self) -> Dialect:
        from proxy.dialects.openai import OPENAI

        return OPENAI

    def path(self, path: str) -> str:
        return self.paths.get(path, path)

    def estimate(self, body: bytes) -> bytes:
        return orjson.dumps({"object": "response.input_tokens", "input_tokens": len(body) // 4})

    def body(self, payload: dict[str, Any], model: str) -> dict[str, Any]:
        from proxy.dialects.translate import responses_chat

        return responses_chat.request(payload, model, self.effort)

    def document(self, data: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        from proxy.dialects.translate import responses_chat

        chat = _json_object(data)
        return responses_chat.response(chat, payload, responses_chat.response_id())

    def stream(self, payload: dict[str, Any]) -> ChatToResponsesStream:
        from proxy.dialects.translate.responses_chat import ChatToResponsesStream, response_id

        return ChatToResponsesStream(payload, response_id())

    def error(self, status: int, data: bytes) -> bytes:
        """The upstream's error: OpenAI's shape already; a body in no shape gets one."""
        from proxy.dialects.openai import error_body

        document = _loads(data)
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return data
        kind = "invalid_request_error" if status < 500 else "api_error"
        return error_body(f"The upstream answered {status}.", kind)

    @staticmethod
    def kept(payload: dict[str, Any], answer: dict[str, Any]) -> list[Any] | None:
        """What a stored answer adds to its conversation (its request's own input, then its
        output), or None when the request asked for it not to be stored."""
        from proxy.dialects.translate import responses_chat

        if payload.get("store") is False or answer.get("status") not in ("completed", "incomplete"):
            return None
        output = answer.get("output")
        return [*responses_chat.input_items(payload), *(output if isinstance(output, list) else [])]

    @staticmethod
    def continued(payload: dict[str, Any], items: list[Any]) -> dict[str, Any]:
        from proxy.dialects.translate import responses_chat

        return responses_chat.with_history(payload, items)


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _json_object(data: bytes) -> dict[str, Any]:
    document = _loads(data)
    if document is None:
        raise ValueError("an answer that is not JSON")
    if not isinstance(document, dict):
        raise ValueError("an answer that is not a JSON object")
    return document


Translation = MessagesToChat | ResponsesToChat


def client_wire(dialect: Dialect, path: str) -> str:
    """The wire a request speaks, as far as translations tell them apart: ``messages``,
    ``responses`` or "" (OpenAI's other calls: never translated)."""
    if dialect.name == "anthropic":
        return "messages"
    if path == "/responses" or path == "/responses/input_tokens":
        return "responses"
    return ""


def pick(dialect: Dialect, backend: BackendConfig, wire: str = "") -> Translation | None:
    """The translation a request in ``dialect`` (on ``wire``: ``client_wire``) needs to
    reach ``backend``; None when the backend speaks it natively, or nothing translates to
    what it speaks."""
    if backend.chat_wire != "chat":
        return None
    if wire == "messages" and not dialect.speaks(backend):
        return MessagesToChat(backend.reasoning_effort)
    if wire == "responses":  # a chat endpoint has no /responses
        return ResponsesToChat(backend.reasoning_effort)
    return None


def reaches(dialect: Dialect, backend: BackendConfig) -> bool:
    """``backend`` can be spoken to in ``dialect``: natively, or translated."""
    return dialect.speaks(backend) or pick(dialect, backend, client_wire(dialect, "")) is not None
