"""Which headers cross the proxy, in each direction.

Client → upstream is an allow-list: what SDKs send to describe the request (content type,
accept, user agent, the SDK's ``x-stainless-*`` telemetry, ``openai-beta``, idempotency
keys, the request id). Nothing else crosses: not the client's credentials (the proxy sets
``Authorization`` from the selected key), not ``OpenAI-Organization``/``OpenAI-Project``
(a client could otherwise make the upstream refuse the operator's key for everyone; a
backend sets them in its config ``headers``), not encodings or hop-by-hop headers the
proxy does not handle, not cookies or forwarding headers. Upstream → client: only what
SDKs and users read (content type and encoding, request id, rate-limit and retry hints,
``openai-*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from proxy.dialects.base import bearer_token as bearer_token
from proxy.dialects.base import header_value as header_value
from proxy.redact import NO_SECRETS, Redactor

FORWARDED_CLIENT_HEADERS = (
    "content-type",
    "accept",
    "user-agent",
    "openai-beta",
    "idempotency-key",
    "x-request-id",
    "anthropic-version",
    "anthropic-beta",
)
FORWARDED_CLIENT_PREFIXES = ("x-stainless-",)  # the openai/anthropic SDKs' own metadata

_FORWARDED = frozenset(name.encode() for name in FORWARDED_CLIENT_HEADERS)
_FORWARDED_PREFIXES = tuple(prefix.encode() for prefix in FORWARDED_CLIENT_PREFIXES)
_KEPT_ON_RESPONSE = frozenset(
    name.encode()
    for name in (
        "content-type",
        "content-encoding",
        "cache-control",
        "x-request-id",
        "request-id",  # Anthropic's: the anthropic SDK shows it as `_request_id`
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
    )
)
_KEPT_PREFIXES = (b"openai-", b"x-ratelimit-", b"anthropic-ratelimit-")

REQUEST_ID = b"x-request-id"
_UNSENDABLE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control bytes but tab


def forwarded_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    extra: Mapping[str, str],
    auth: tuple[str, str],
) -> dict[str, str]:
    """The upstream request's headers: the client's allowed ones, then ours, then the
    backend's key in the header its dialect uses (``dialect.upstream_auth``)."""
    headers = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in client_headers  # ASGI gives lower-cased names
        if name in _FORWARDED or name.startswith(_FORWARDED_PREFIXES)
    }
    headers.update(extra)
    headers[auth[0]] = auth[1]
    return headers


def kept_response_headers(
    raw: Iterable[tuple[bytes, bytes]],
    redactor: Redactor = NO_SECRETS,
    extra: tuple[bytes, ...] = (),
) -> list[tuple[bytes, bytes]]:
    """The upstream headers SDKs read (and ``extra`` ones); a value with control bytes is
    dropped (it cannot be sent on), and any configured secret in a value is replaced by its
    fingerprint."""
    kept = []
    for name, value in raw:
        lower = name.lower()
        if lower in _KEPT_ON_RESPONSE or lower.startswith(_KEPT_PREFIXES) or lower in extra:
            kept.append((lower, value))
    # One look at all the values together: the common case costs two scans, not 2 per header.
    joined = b" ".join(value for _, value in kept)
    if _UNSENDABLE.search(joined) is not None:
        kept = [(name, value) for name, value in kept if _UNSENDABLE.search(value) is None]
    if redactor.found_in(joined):
        kept = [(name, redactor.bytes(value)) for name, value in kept]
    return kept
