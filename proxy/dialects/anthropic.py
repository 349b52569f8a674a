"""Anthropic's Messages wire: passed through, never translated.

The client's key comes in ``x-api-key`` (``ANTHROPIC_API_KEY``) or ``Authorization: Bearer``
(``ANTHROPIC_AUTH_TOKEN``, what Claude Code sends); the backend's key goes out the way the
backend's ``anthropic_auth`` says. Errors the proxy writes are
``{"type": "error", "error": {"type", "message"}, "request_id"}`` with Anthropic's type for
the status; a stream is complete at ``message_stop``, and a broken one ends with
``event: error`` so the SDK raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from proxy.dialects.base import RawHeaders, StreamKind, bearer_token, header_value

if TYPE_CHECKING:
    from proxy.config import BackendConfig, Config
    from proxy.errors import ProxyError

PATHS = ("/messages", "/messages/count_tokens")
_METHODS = ("POST",)
VERSION = "2023-06-01"  # the anthropic-version the SDKs have sent since 2023
API_PREFIX = "/v1"  # the SDK's base URL excludes it; the paths here are after it

# Anthropic's error types by status (docs.claude.com/en/api/errors). The SDK picks its
# exception class by status; the type is what people read.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# The proxy's 503s: "overloaded" when the backend (or the proxy) is busy or failing and a
# later try may pass; a missing or refused key is the operator's problem, an api_error.
_OVERLOADED_CODES = frozenset({"backend_unavailable", "server_busy"})


def error_type(status: int, code: str | None = None) -> str:
    """Anthropic's ``error.type`` for an error the proxy answers with ``status``."""
    if status == 503:
        return "overloaded_error" if code in _OVERLOADED_CODES else "api_error"
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_document(kind: str, message: str, request_id: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        document["request_id"] = request_id
    return document


class AnthropicDialect:
    name = "anthropic"
    key_hint = "send it as 'x-api-key: <key>' or 'Authorization: Bearer <key>'"

    def serves(self, path: str, config: Config) -> bool:
        return path in PATHS

    def methods(self, path: str) -> tuple[str, ...]:
        return _METHODS

    def client_key(self, headers: RawHeaders) -> str | None:
        value = header_value(headers, b"x-api-key")
        if value is not None and value.strip():
            return value.decode("latin-1").strip()
        return bearer_token(headers)

    def speaks(self, backend: BackendConfig) -> bool:
        return backend.anthropic_base_url is not None

    def base_url(self, backend: BackendConfig) -> str:
        assert backend.anthropic_base_url is not None  # routing refused it otherwise
        return backend.anthropic_base_url + API_PREFIX

    def upstream_auth(self, backend: BackendConfig, key: str) -> tuple[str, str]:
        if backend.anthropic_auth == "bearer":
            return "authorization", "Bearer " + key
        return "x-api-key", key

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        kind = error_type(err.status, err.code)
        return orjson.dumps(error_document(kind, err.message, request_id))

    def stream_kind(self, path: str) -> StreamKind:
        return StreamKind.ANTHROPIC

    every_backend_speaks = False  # only those with an anthropic_base_url
    routes_by_path = False  # every request names its model
    makes_objects = False

    def models_page(self, entries: list[tuple[str, str]]) -> dict[str, Any]:
        return models_page(entries)

    def model_object(self, model_id: str, owned_by: str) -> dict[str, Any]:
        return model_object(model_id, owned_by)

    def models_headers(self) -> dict[str, str]:
        return {"anthropic-version": VERSION}


ANTHROPIC = AnthropicDialect()


def stream_error_event(message: str) -> bytes:
    """``event: error``: the anthropic SDK raises ``APIStatusError`` on it."""
    return b"event: error\ndata: " + orjson.dumps(error_document("api_error", message))


def models_page(ids: list[tuple[str, str]]) -> dict[str, Any]:
    """``GET /v1/models`` in Anthropic's shape: every listed id on one page."""
    data = [model_object(model_id, owner) for model_id, owner in ids]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def model_object(model_id: str, owned_by: str) -> dict[str, Any]:
    # created_at is required by the SDK's type; the proxy does not know it: the epoch.
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": "1970-01-01T00:00:00Z",
    }
