"""Which headers cross the proxy, in each direction.

Client → upstream: everything but hop-by-hop headers and the client's own credentials; the
proxy sets ``Authorization`` from the selected key. Upstream → client: only what SDKs and
users read (content type and encoding, request id, rate-limit and retry hints, ``openai-*``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
# The client's credentials are for the proxy, never for the provider; host and length are
# the upstream connection's own; cookies belong to neither.
_NOT_FORWARDED = frozenset(
    name.encode()
    for name in (
        *_HOP_BY_HOP,
        "host",
        "content-length",
        "expect",
        "authorization",
        "api-key",
        "x-api-key",
        "cookie",
        # Answers come back uncompressed, so token usage can be read without inflating them
        # (LLM answers are small JSON or SSE, which gains little from compression anyway).
        "accept-encoding",
    )
)
_KEPT_ON_RESPONSE = frozenset(
    name.encode()
    for name in (
        "content-type",
        "content-encoding",
        "cache-control",
        "x-request-id",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
    )
)
_KEPT_PREFIXES = (b"openai-", b"x-ratelimit-")

REQUEST_ID = b"x-request-id"


def forwarded_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    extra: Mapping[str, str],
    authorization: str,
) -> dict[str, str]:
    """The upstream request's headers: the client's (minus the excluded ones), then ours."""
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in client_headers  # ASGI gives lower-cased names
        if name not in _NOT_FORWARDED
    }
    headers.update(extra)
    headers["authorization"] = authorization
    return headers


def kept_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = []
    for name, value in raw:
        lower = name.lower()
        if lower in _KEPT_ON_RESPONSE or lower.startswith(_KEPT_PREFIXES):
            kept.append((lower, value))
    return kept


def header_value(raw: Iterable[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    """The first value of header ``wanted`` (lower-case) in ASGI-style raw headers."""
    for name, value in raw:
        if name == wanted:
            return value
    return None
