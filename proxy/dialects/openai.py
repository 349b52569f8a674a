"""OpenAI's wire: ``Authorization: Bearer`` both ways, ``{"error": {...}}`` bodies, and
streams that end with ``data: [DONE]`` (chat, completions) or typed events (Responses)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from proxy.dialects.base import RawHeaders, StreamKind, bearer_token

if TYPE_CHECKING:
    from proxy.config import BackendConfig, Config
    from proxy.errors import ProxyError

_DONE_PATHS = ("/chat/completions", "/completions")  # streams that must end with [DONE]
_METHODS = ("GET", "POST", "DELETE")  # all the OpenAI API uses
_MODEL_METHODS = ("GET", "DELETE")  # /models/{id}: retrieve, delete a fine-tuned model


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    # All four keys are always present: the openai SDK and many clients read them blindly.
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


class OpenAIDialect:
    name = "openai"
    key_hint = "send it as 'Authorization: Bearer <key>'"

    def serves(self, path: str, config: Config) -> bool:
        allowed = config.server.forward_paths
        return any(path == prefix or path.startswith(prefix + "/") for prefix in allowed)

    def methods(self, path: str) -> tuple[str, ...]:
        return _MODEL_METHODS if path.startswith("/models/") else _METHODS

    def client_key(self, headers: RawHeaders) -> str | None:
        return bearer_token(headers)

    def speaks(self, backend: BackendConfig) -> bool:
        return True  # every backend has a base_url

    def base_url(self, backend: BackendConfig) -> str:
        return backend.base_url

    def upstream_auth(self, backend: BackendConfig, key: str) -> tuple[str, str]:
        return "authorization", "Bearer " + key

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        return error_body(err.message, err.type, err.code, err.param)

    def stream_kind(self, path: str) -> StreamKind:
        if path in _DONE_PATHS:
            return StreamKind.DONE_TERMINATED
        if path == "/responses":
            return StreamKind.RESPONSES
        return StreamKind.PLAIN

    every_backend_speaks = True  # every backend has a base_url
    routes_by_path = True
    makes_objects = True

    def models_page(self, entries: list[tuple[str, str]]) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_object(i, o) for i, o in entries]}

    def model_object(self, model_id: str, owned_by: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}

    def models_headers(self) -> dict[str, str]:
        return {}


OPENAI = OpenAIDialect()


def stream_error_event(message: str, code: str, last_chunk: bytes, kind: StreamKind) -> bytes:
    """The event that ends a broken stream: ``data: {"error": ...}`` (the openai SDK raises
    on it), or for Responses an ``event: error`` numbered after the last event seen."""
    if kind is StreamKind.RESPONSES:
        return b"event: error\ndata: " + _responses_error(message, code, last_chunk)
    return b"data: " + error_body(message, "api_error", code)


_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d{1,18})')


def _responses_error(message: str, code: str, last_chunk: bytes) -> bytes:
    """A Responses-API ``error`` event (``type: error``, what its SDKs parse), numbered
    after the last event seen; its ``error`` object makes the openai SDK raise."""
    numbers = _SEQUENCE.findall(last_chunk)
    sequence = int(numbers[-1]) + 1 if numbers else 0
    error = {"message": message, "type": "api_error", "param": None, "code": code}
    event = {
        "type": "error",
        "code": code,
        "message": message,
        "param": None,
        "sequence_number": sequence,
        "error": error,
    }
    return orjson.dumps(event)
