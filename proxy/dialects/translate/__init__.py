"""Translations between wires: a client's dialect spoken to a backend that speaks another.

One module per pair, each pure (no I/O): a request body to a request body, an upstream
answer (JSON, or stream events as they come) to the client's, an upstream error to the
client's error shape. What cannot be translated is refused by name (``Untranslatable``),
never dropped. A backend declares the wire its chat endpoint speaks (``chat_wire``);
``pick`` finds the translation a request needs, if any: a backend that speaks the
client's dialect natively is always spoken to natively.

Pairs: ``messages_chat`` (Anthropic Messages to Chat Completions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

if TYPE_CHECKING:
    from proxy.config import BackendConfig
    from proxy.dialects.base import Dialect
    from proxy.dialects.translate.messages_chat import ChatToMessagesStream


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

    def answer(self, data: bytes, payload: dict[str, Any]) -> bytes:
        """The client's answer for the upstream's JSON ``data``."""
        from proxy.dialects.translate import messages_chat

        try:
            chat = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ValueError("an answer that is not JSON") from None
        if not isinstance(chat, dict):
            raise ValueError("an answer that is not a JSON object")
        model = str(payload.get("model") or "")
        return orjson.dumps(messages_chat.response(chat, model, _stops(payload)))

    def stream(self, payload: dict[str, Any]) -> ChatToMessagesStream:
        from proxy.dialects.translate.messages_chat import ChatToMessagesStream

        return ChatToMessagesStream(str(payload.get("model") or ""), _stops(payload))

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


Translation = MessagesToChat  # the one pair so far; a Protocol once there are two


def pick(dialect: Dialect, backend: BackendConfig) -> Translation | None:
    """The translation a request in ``dialect`` needs to reach ``backend``; None when the
    backend speaks it natively, or nothing translates to what it speaks."""
    if dialect.speaks(backend) or backend.chat_wire is None:
        return None
    if dialect.name == "anthropic" and backend.chat_wire == "chat":
        return MessagesToChat(backend.reasoning_effort)
    return None


def reaches(dialect: Dialect, backend: BackendConfig) -> bool:
    """``backend`` can be spoken to in ``dialect``: natively, or translated."""
    return dialect.speaks(backend) or pick(dialect, backend) is not None
