"""What every wire dialect must say, and the two header helpers all of them use.

A dialect is the part of a wire protocol that differs between, say, OpenAI's API and
Anthropic's Messages API: which paths it serves, how a client presents its key, how the
upstream wants the backend's key, what an error the proxy writes looks like, when a stream
is complete and how a broken one is told to the SDK. Everything else (routing, keys,
throttle, breaker, metrics, the access log) is shared. A new dialect is one module that
implements ``Dialect`` plus its config fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.config import BackendConfig, Config
    from proxy.errors import ProxyError

RawHeaders = Iterable[tuple[bytes, bytes]]


class StreamKind(Enum):
    """How a stream says it is complete, and how a failure must be told to its SDK: the
    relay asks a kind its rules (below), never which dialect it is."""

    DONE_TERMINATED = "done"  # chat and text completions: must end with data: [DONE]
    RESPONSES = "responses"  # Responses API: typed events; a failure is `event: error`
    PLAIN = "plain"  # anything else: a clean end is an end
    ANTHROPIC = "anthropic"  # Messages: must reach `message_stop`; a failure is `event: error`

    @property
    def ends_with_done(self) -> bool:
        """Complete only once ``data: [DONE]`` came."""
        return self is StreamKind.DONE_TERMINATED

    @property
    def ends_with_response_end(self) -> bool:
        """Complete only once ``response.completed`` (``failed``, ``incomplete``) came."""
        return self is StreamKind.RESPONSES

    @property
    def ends_with_stop_event(self) -> bool:
        """Complete once ``message_stop`` came, whatever follows (an error event after it
        would make the SDK raise on a whole message); the upstream's own error event ends
        it too."""
        return self is StreamKind.ANTHROPIC

    @property
    def usage_in_parts(self) -> bool:
        """Its usage comes in pieces to be merged (input at the start, output at the end)."""
        return self is StreamKind.ANTHROPIC

    @property
    def text_key(self) -> bytes:
        """The JSON key of a delta's text (the estimate of a cut stream without usage)."""
        return _TEXT_KEYS.get(self, b"content")


_TEXT_KEYS = {StreamKind.RESPONSES: b"delta", StreamKind.ANTHROPIC: b"text"}


def header_value(raw: RawHeaders, wanted: bytes) -> bytes | None:
    """The first value of header ``wanted`` (lower-case) in ASGI-style raw headers."""
    for name, value in raw:
        if name == wanted:
            return value
    return None


def bearer_token(raw: RawHeaders) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when there is none."""
    value = header_value(raw, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Dialect(Protocol):
    """One wire protocol's differences; the instances are module-level singletons."""

    @property
    def name(self) -> str:
        """``openai``, ``anthropic``: the metrics' ``endpoint`` label, the logs' word."""
        ...

    @property
    def key_hint(self) -> str:
        """How a client sends its key, for the message of a 401."""
        ...

    def serves(self, path: str, config: Config) -> bool:
        """Whether ``path`` (after ``/v1``) is one this dialect forwards."""
        ...

    def methods(self, path: str) -> tuple[str, ...]:
        """The HTTP methods ``path`` takes."""
        ...

    def client_key(self, headers: RawHeaders) -> str | None:
        """The key the client presented, however this wire carries it."""
        ...

    def speaks(self, backend: BackendConfig) -> bool:
        """Whether ``backend`` has an endpoint for this dialect."""
        ...

    def base_url(self, backend: BackendConfig) -> str:
        """Where this dialect's paths (after ``/v1``) are appended, for ``backend``."""
        ...

    def upstream_auth(self, backend: BackendConfig, key: str) -> tuple[str, str]:
        """The header (lower-case name, value) that carries ``key`` to ``backend``."""
        ...

    def error_body(self, err: ProxyError, request_id: str) -> bytes:
        """The body of an error the proxy itself answers with."""
        ...

    def stream_kind(self, path: str) -> StreamKind:
        """How a stream on ``path`` ends, and how its failure is told."""
        ...

    @property
    def every_backend_speaks(self) -> bool:
        """Every backend has this dialect's endpoint (its ``base_url``): no backend is
        left out of its routes or its model list."""
        ...

    @property
    def routes_by_path(self) -> bool:
        """A request may name no model (a file upload, a list): it is routed by its path."""
        ...

    @property
    def makes_objects(self) -> bool:
        """Its API makes objects named by id afterwards (files, responses, batches...):
        their owners and placements are recorded."""
        ...

    def models_page(self, entries: list[tuple[str, str]]) -> dict[str, Any]:
        """``GET /v1/models`` in this wire's shape, from (id, owner) pairs."""
        ...

    def model_object(self, model_id: str, owned_by: str) -> dict[str, Any]:
        """``GET /v1/models/{id}`` in this wire's shape."""
        ...

    def models_headers(self) -> dict[str, str]:
        """What a ``GET /models`` of this wire needs besides the key (``check --online``)."""
        ...
