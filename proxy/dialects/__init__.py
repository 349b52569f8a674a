"""The wire dialects the proxy speaks: ``openai`` and ``anthropic``.

``for_request(path, headers)`` picks one per request from its path (and, for the shared
``/v1/models``, the ``anthropic-version`` header the Anthropic SDK always sends).
"""

from __future__ import annotations

from proxy.dialects import anthropic, openai
from proxy.dialects.anthropic import ANTHROPIC, AnthropicDialect
from proxy.dialects.base import Dialect, RawHeaders, StreamKind, bearer_token, header_value
from proxy.dialects.openai import OPENAI, OpenAIDialect

DIALECTS: dict[str, Dialect] = {OPENAI.name: OPENAI, ANTHROPIC.name: ANTHROPIC}
# The wire of whatever no other dialect claims: a request on any other path (Realtime
# included), and the front door's errors before a request's path is known.
DEFAULT: Dialect = OPENAI

__all__ = [
    "ANTHROPIC",
    "DEFAULT",
    "DIALECTS",
    "OPENAI",
    "AnthropicDialect",
    "Dialect",
    "OpenAIDialect",
    "RawHeaders",
    "StreamKind",
    "bearer_token",
    "for_request",
    "header_value",
    "stream_error_event",
]


def stream_error_event(kind: StreamKind, message: str, code: str, last_chunk: bytes) -> bytes:
    """The event that tells a stream's SDK it broke, in the shape its kind's SDK raises on."""
    if kind is StreamKind.ANTHROPIC:
        return anthropic.stream_error_event(message)
    return openai.stream_error_event(message, code, last_chunk, kind)


def for_request(path: str, headers: RawHeaders) -> Dialect:
    """The dialect of a request to ``path`` (the whole path, ``/v1/...``)."""
    if path.startswith("/v1/messages") and (len(path) == 12 or path[12] == "/"):
        return ANTHROPIC
    if path.startswith("/v1/models") and header_value(headers, b"anthropic-version") is not None:
        return ANTHROPIC
    return DEFAULT
