"""What an upstream answer means: the one place that reads an upstream status.

Key health, the circuit breaker, failover and the reconnect throttle all act on a
``Verdict`` from here; nobody else compares status codes. The rule that matters most: only
an error about the key itself (a 401, or a 403 whose type or code says the key is invalid
or revoked) may take a shared key out of rotation, and only once a probe with that key
alone confirms it (``Runtime.suspect_key``). A 401 or 403 about a scope, a permission, a
model or a path (OpenAI's ``missing_scope`` / "insufficient permissions", Anthropic's
``permission_error``) is ``KEY_LACKS_SCOPE``: the key is valid but this request is outside
what it may do; like any other 403 it is that one client's answer, relayed unchanged, and
changes nothing for anyone else.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum

import orjson


class Verdict(StrEnum):
    OK = "ok"  # 1xx/2xx: relay it
    CLIENT_ERROR = "client_error"  # a 4xx about this request: relay it, learn nothing
    KEY_REFUSED = "key_refused"  # the key looks invalid: confirm by probe, try another key
    KEY_LACKS_SCOPE = "key_lacks_scope"  # valid key, request outside its scopes: relay it
    KEY_LIMITED = "key_limited"  # 429: cool the key down, try another key
    BACKEND_FAILED = "backend_failed"  # 5xx: counts for the breaker, worth a fallback
    REDIRECT = "redirect"  # 3xx: never followed (it would re-send the prompt elsewhere)
    BAD_STATUS = "bad_status"  # not a final HTTP status: the upstream is broken


# Error types and codes that say "this key is bad", as providers write them. Wire
# vocabulary, not provider names: a 403 carrying one of these is about the key.
_KEY_ERRORS = frozenset(
    {
        "invalid_api_key",
        "invalid_authentication",
        "invalid_authentication_error",
        "authentication_error",
        "api_key_revoked",
        "revoked_api_key",
        "expired_api_key",
        "account_deactivated",
        "unauthorized",
    }
)

# Codes and types that say "the key is fine, this request is outside what it may do": a
# scope, a permission, a model or a path. Checked after _KEY_ERRORS (a revoked key wins).
_SCOPE_ERRORS = frozenset(
    {
        "missing_scope",
        "missing_scopes",
        "insufficient_scope",
        "insufficient_permissions",
        "permission_error",
        "permission_denied",
        "permission_denied_error",
        "model_not_found",
        "model_not_allowed",
        "unsupported_model",
        "access_denied",
    }
)
# The same in an error message, for providers that put it only in words ("You have
# insufficient permissions for this operation. Missing scopes: api.batch.write").
_SCOPE_MESSAGE = re.compile(
    rb"missing scope|insufficient permission|does not have (the )?(necessary |required )?"
    rb"(scope|permission|access)|not (allowed|permitted) to (use|access)|"
    rb"do(es)? not have access to (the )?model",
    re.IGNORECASE,
)

# A 429 that no wait can cure: the request itself is over the key's per-minute budget.
_TOO_LARGE = re.compile(rb"request too large|must be reduced", re.IGNORECASE)

# A wait longer than this from an upstream is nonsense (or hostile): it is capped here and
# again by each consumer's own maximum (key cooldown, breaker).
MAX_UPSTREAM_WAIT = 24 * 3600.0


def classify(status: int, body: bytes = b"") -> Verdict:
    """The verdict for an upstream answer with ``status`` (``body`` read for 403 and 429)."""
    if status < 200 or status > 599:  # 1xx (a 101 upgrade, say) or no HTTP status at all
        return Verdict.BAD_STATUS
    if status < 300:
        return Verdict.OK
    if status < 400:
        return Verdict.REDIRECT
    if status == 401 or status == 403:
        return _refusal(status, body)
    if status == 429:
        # "Request too large ... must be reduced": about this request, not the key's load.
        # Cooling the key (and the retry's key) down would fail every other client.
        return Verdict.CLIENT_ERROR if _TOO_LARGE.search(body) else Verdict.KEY_LIMITED
    if status >= 500:
        return Verdict.BACKEND_FAILED
    return Verdict.CLIENT_ERROR


def _refusal(status: int, body: bytes) -> Verdict:
    """A 401 or 403: about the key (invalid, revoked), about its scopes, or (a 403 that
    says neither) about the request."""
    kinds = error_kinds(body)
    if kinds & _KEY_ERRORS:
        return Verdict.KEY_REFUSED
    if kinds & _SCOPE_ERRORS or _SCOPE_MESSAGE.search(body[:4096]):
        return Verdict.KEY_LACKS_SCOPE
    return Verdict.KEY_REFUSED if status == 401 else Verdict.CLIENT_ERROR


def error_kinds(body: bytes) -> set[str]:
    """The ``type`` and ``code`` of an OpenAI-style (or Anthropic-style) error body,
    lower-cased."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return set()
    if not isinstance(error, dict):
        return set()
    return {str(v).lower() for v in (error.get("type"), error.get("code")) if v}


def parse_seconds(value: bytes | str | float | None, unit: float = 1.0) -> float | None:
    """A wait in seconds from an upstream header value counted in ``unit`` seconds
    (0.001 for ``retry-after-ms``); None when absent or not a sane number (non-finite,
    negative, an HTTP date). Large values are capped, once in seconds."""
    if value is None:
        return None
    try:
        seconds = float(value) * unit
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_UPSTREAM_WAIT)
