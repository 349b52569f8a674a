"""Errors the proxy itself answers with. What one says (status, message, type, code,
param, headers) is here; its body is its dialect's to write (``Dialect.error_body``:
OpenAI's ``{"error": {...}}``, Anthropic's ``{"type": "error", ...}``)."""

from __future__ import annotations

import math


class ProxyError(Exception):
    """An error the proxy answers with: status, message, type/code/param, headers; a
    dialect renders its body (``type`` and ``param`` are the OpenAI API's words, which
    another dialect maps to its own)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def raw_headers(self, body: bytes) -> list[tuple[bytes, bytes]]:
        """Headers for an ASGI ``http.response.start`` of ``body``, content type and length
        included."""
        body_len = str(len(body)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", body_len)]
        headers += [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        return headers


# The openai SDK honours it over its own rule (retry 5xx twice).
NO_RETRY = {"x-should-retry": "false"}

# Constructors for the errors named in the contract, so status/type/code stay consistent.


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def previous_response_not_found(response_id: str) -> ProxyError:
    shown = response_id[:128]
    return ProxyError(
        400,
        f"Previous response with id '{shown}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


def model_not_found(message: str) -> ProxyError:
    return ProxyError(404, message, param="model", code="model_not_found")


def untranslatable(param: str, why: str, backend: str, wire: str) -> ProxyError:
    return ProxyError(
        400,
        f"{param}: {why} (backend '{backend}' speaks {wire}: this request is translated to it).",
        param=param,
        code="untranslatable",
    )


def untranslatable_answer(backend: str, why: str) -> ProxyError:
    return ProxyError(
        502,
        f"Backend '{backend}' answered what cannot be translated: {why}.",
        type="api_error",
        code="upstream_bad_response",
    )


def dialect_not_spoken(model: str, backend: str, dialect: str, speakers: list[str]) -> ProxyError:
    which = ", ".join(speakers) if speakers else "none (give a backend anthropic_base_url)"
    return ProxyError(
        400,
        f"The model '{model}' is routed to backend '{backend}', which does not speak the "
        f"{dialect} API (it has no {dialect}_base_url). Backends that speak it: {which}.",
        param="model",
        code="dialect_not_spoken",
    )


def unknown_url(method: str, path: str) -> ProxyError:
    return ProxyError(404, f"Unknown request URL: {method} {path}.", code="unknown_url")


def missing_model(path: str) -> ProxyError:
    return ProxyError(
        400,
        "You must provide a model parameter (requests without one are routed by the proxy's "
        f"`paths:` rules or `default_backend`, and none routes POST /v1{path[:200]}).",
        param="model",
        code="missing_model",
    )


def no_path_route(method: str, path: str) -> ProxyError:
    return ProxyError(
        404,
        f"{method} /v1{path} names no model, and no rule routes it: add a `paths:` rule "
        f"(e.g. {{prefix: {_first_segment(path)}, backend: <name>}}) or `default_backend: "
        "<name>` to the proxy's config.",
        code="no_route",
    )


def _first_segment(path: str) -> str:
    return "/" + path.lstrip("/").split("/", 1)[0][:40]


def method_not_allowed(method: str, path: str, allow: str) -> ProxyError:
    return ProxyError(
        405,
        f"Method {method} is not allowed on {path}; allowed: {allow}.",
        code="method_not_allowed",
        headers={"allow": allow},
    )


def invalid_client_key(detail: str) -> ProxyError:
    return ProxyError(401, detail, code="invalid_api_key", headers={"x-should-retry": "false"})


def model_not_allowed(client: str, model: str) -> ProxyError:
    return ProxyError(
        403,
        f"Client '{client}' may not use model '{model}'.",
        type="permission_error",
        param="model",
        code="model_not_allowed",
    )


def body_too_large(limit: int) -> ProxyError:
    return ProxyError(413, f"Request body is larger than {limit} bytes.", code="request_too_large")


def no_usable_key(backend: str, hint: str) -> ProxyError:
    return ProxyError(
        503,
        f"Backend '{backend}' has no usable API key: {hint}.",
        type="server_error",
        code="no_usable_key",
        headers=NO_RETRY,  # retrying cannot set the variable: tell the SDK not to
    )


def upstream_unreachable(backend: str, reason: str) -> ProxyError:
    return ProxyError(
        502,
        f"Could not reach backend '{backend}': {reason}.",
        type="api_error",
        code="upstream_unreachable",
    )


def upstream_timeout(backend: str, what: str) -> ProxyError:
    return ProxyError(
        504,
        f"Backend '{backend}' timed out ({what}).",
        type="api_error",
        code="upstream_timeout",
    )


def upstream_response_too_large(backend: str, limit: int) -> ProxyError:
    return ProxyError(
        502,
        f"Backend '{backend}' sent a response larger than {limit} bytes "
        "(server.max_response_size); it was not relayed.",
        type="api_error",
        code="upstream_response_too_large",
        headers=NO_RETRY,  # the same answer again would only be generated (and paid) again
    )


def upstream_redirect(backend: str, status: int) -> ProxyError:
    return ProxyError(
        502,
        f"Backend '{backend}' answered with a redirect ({status}); the proxy never follows "
        "redirects: check the backend's base_url.",
        type="api_error",
        code="upstream_redirect",
        headers=NO_RETRY,  # a misconfigured base_url does not fix itself
    )


def upstream_bad_status(backend: str, status: int) -> ProxyError:
    return ProxyError(
        502,
        f"Backend '{backend}' answered with status {status}, which is not a final HTTP status.",
        type="api_error",
        code="upstream_bad_response",
    )


def keys_refused(backend: str, key_ids: list[str]) -> ProxyError:
    """The upstream refused the proxy's own keys: say so, instead of passing on a 401 the
    client would read as "your API key is wrong"."""
    keys = ", ".join(f"'{k}'" for k in key_ids)
    return ProxyError(
        503,
        f"Backend '{backend}' refused the proxy's API key {keys} (the operator must fix the "
        "key in the proxy's config; your own key is fine).",
        type="server_error",
        code="no_usable_key",
        headers=NO_RETRY,
    )


def invalid_path(path: str) -> ProxyError:
    return ProxyError(400, f"Invalid request path: {path!r}.", code="invalid_path")


def unsupported_encoding(encoding: str) -> ProxyError:
    return ProxyError(
        415,
        f"Content-Encoding {encoding!r} is not supported: send the JSON body uncompressed.",
        code="unsupported_content_encoding",
    )


_MAX_ADVERTISED_WAIT = 24 * 3600.0


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up) and ``retry-after-ms``: the SDK reads both.

    Defensive: a wait computed from outside values is bounded to [1 ms, 1 day] here, so a
    non-finite one can never reach ``math.ceil``."""
    if not math.isfinite(seconds):
        seconds = _MAX_ADVERTISED_WAIT
    seconds = min(max(seconds, 0.001), _MAX_ADVERTISED_WAIT)
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def shutting_down() -> ProxyError:
    """A request refused, or ended, by the drain (``proxy.drain``): another replica will
    serve it. 503 with Retry-After, which the SDKs retry; the connection is closed so the
    client's next request opens one to a replica that stays."""
    return ProxyError(
        503,
        "The proxy is shutting down; retry the request (another replica will serve it).",
        type="server_error",
        code="server_shutting_down",
        headers=retry_after_headers(1) | {"connection": "close"},
    )


def reconnect_throttled(model: str, wait: float) -> ProxyError:
    return ProxyError(
        429,
        f"Too many failed requests for '{model}' in a row: wait {wait:.1f} s before retrying "
        "(the upstream is failing; retrying sooner would only add to its load).",
        type="rate_limit_error",
        code="reconnect_throttled",
        headers=retry_after_headers(wait),
    )


def client_rate_limited(client: str, limit: int, reset: float) -> ProxyError:
    headers = retry_after_headers(reset) | {
        "x-ratelimit-limit-requests": str(limit),
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{max(reset, 0.001):.3f}s",
    }
    return ProxyError(
        429,
        f"Rate limit reached for client '{client}': {limit} requests per window.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers=headers,
    )


def budget_exceeded(
    client: str,
    what: str,
    used: str,
    reset: float,
    monthly: bool,
    extra: dict[str, str] | None = None,
) -> ProxyError:
    """A client's budget or tpm has no room for this request's reservation."""
    headers = retry_after_headers(reset) | (extra or {})
    if monthly:  # a day's, week's or month's budget: an SDK must not retry in a loop
        headers["x-should-retry"] = "false"
    return ProxyError(
        429,
        f"Client '{client}' has reached its limit of {what} ({used} spent or reserved); "
        f"it resets in {_duration(reset)}.",
        type="rate_limit_error" if not monthly else "insufficient_quota",
        code="budget_exceeded",
        headers=headers,
    )


def unpriced_for_budget(client: str, model: str, backend: str) -> ProxyError:
    """A client with a USD budget asked for a model the proxy has no price for: the
    budget could not be held, so the request is not sent."""
    return ProxyError(
        403,
        f"Client '{client}' has a budget in USD and model '{model}' on backend '{backend}' "
        "has no price, so the budget cannot be held: the operator adds it under pricing:.",
        type="permission_error",
        code="unpriced_model",
    )


def _duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = (
        [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    )
    return " ".join(parts or [f"{secs}s"]) if days or hours or minutes else f"{secs}s"


def backend_rate_limited(backend: str, reset: float) -> ProxyError:
    return ProxyError(
        429,
        f"The proxy's outbound rate limit for backend '{backend}' is reached.",
        type="rate_limit_error",
        code="backend_rate_limited",
        headers=retry_after_headers(reset),
    )


def keys_cooling_down(backend: str, hint: str, wait: float) -> ProxyError:
    return ProxyError(
        429,
        f"Every key of backend '{backend}' is rate limited by the upstream: {hint}.",
        type="rate_limit_error",
        code="upstream_rate_limited",
        headers=retry_after_headers(wait),
    )


def circuit_open(backend: str, wait: float) -> ProxyError:
    return ProxyError(
        503,
        f"Backend '{backend}' is failing; the proxy stopped sending it requests for "
        f"{wait:.1f} s (circuit breaker open).",
        type="server_error",
        code="backend_unavailable",
        headers=retry_after_headers(wait),
    )


def model_circuit_open(backend: str, model: str, wait: float) -> ProxyError:
    return ProxyError(
        503,
        f"Model '{model[:200]}' on backend '{backend}' keeps failing (5xx); the proxy stopped "
        f"sending it requests for {wait:.1f} s (circuit breaker open). Other models of the "
        "backend are served.",
        type="server_error",
        code="backend_unavailable",
        headers=retry_after_headers(wait),
    )


def too_many_uploads(client: str, limit: int) -> ProxyError:
    return ProxyError(
        429,
        f"Client '{client}' is sending {limit} uploads at once, as many as it may; "
        "retry when one has finished.",
        type="rate_limit_error",
        code="too_many_uploads",
        headers=retry_after_headers(1.0),
    )


def upload_deadline(seconds: float) -> ProxyError:
    return ProxyError(
        408,
        f"The upload was not received within {seconds:g} s.",
        type="invalid_request_error",
        code="request_timeout",
    )


def server_busy(what: str) -> ProxyError:
    return ProxyError(
        503,
        f"The proxy is holding as many {what} as it may; try again in a moment.",
        type="server_error",
        code="server_busy",
        headers=retry_after_headers(1.0),
    )


def internal_error() -> ProxyError:
    return ProxyError(
        500,
        "The proxy hit an internal error; it has been logged.",
        type="server_error",
        code="internal_error",
    )
