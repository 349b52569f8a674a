"""Getting one request answered: which backend and key to try, and when to give up.

For the route's backend, then each of its fallbacks in order, before any byte has reached
the client: skip a backend whose circuit is open or whose outbound limit is spent; send with
the next usable key; on 401/403 take the key out and try once more with another key; on 429
cool the key down and try once more with another. A 5xx, a 429, a connect error or a timeout
moves on to the next fallback. When everything failed, the last failure is answered:
an upstream error passed through unchanged, or the proxy's own error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from proxy import errors, rewrite
from proxy.access_log import RequestRecord
from proxy.errors import ProxyError
from proxy.headers import forwarded_request_headers, kept_response_headers
from proxy.keys import NoUsableKey
from proxy.routing import Target
from proxy.runtime import Runtime


@dataclass(slots=True)
class RequestParts:
    """What the client sent, ready to be sent again to another backend or with another key."""

    path: str  # after /v1, still percent-encoded
    query: str
    client_headers: list[tuple[bytes, bytes]]
    payload: dict[str, Any]
    body: bytes
    model: str  # as the client sent it: the body holds this id
    _bodies: dict[tuple[str, int], bytes] = field(default_factory=dict)

    def body_for(self, target: Target) -> bytes:
        """The body for ``target``: its model id and rewrite rules applied; the bytes as the
        client sent them when neither changes anything."""
        if target.upstream_model == self.model and not target.rewrite:
            return self.body
        cache_key = (target.upstream_model, id(target.rewrite))
        body = self._bodies.get(cache_key)
        if body is None:
            payload = dict(self.payload)  # each target's rules start from the client's body
            payload["model"] = target.upstream_model
            changed = rewrite.apply(target.rewrite, payload)
            if not changed and target.upstream_model == self.model:
                body = self.body
            else:
                body = orjson.dumps(payload)
            self._bodies[cache_key] = body
        return body


@dataclass(slots=True)
class Delivery:
    """An upstream answered with a status worth relaying; its body is not read yet."""

    response: aiohttp.ClientResponse
    target: Target
    key_id: str


@dataclass(slots=True)
class FailedAnswer:
    """An upstream's error answer, read whole so a fallback can still be tried."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    target: Target
    key_id: str


Result = Delivery | FailedAnswer


async def deliver(
    runtime: Runtime, target: Target, parts: RequestParts, record: RequestRecord
) -> Result:
    """The first good answer among the target and its fallbacks, else the last failure.

    Raises ``ProxyError`` when the last failure is the proxy's own (open circuit, no key,
    connect error, timeout, backend limit).
    """
    last: Result | ProxyError | None = None
    for candidate in (target, *target.fallbacks):
        record.backend, record.upstream_model = candidate.backend, candidate.upstream_model
        record.model_label = candidate.label
        result = await _try_backend(runtime, candidate, parts, record)
        if isinstance(result, Delivery):
            return result
        last = result
        if not _worth_a_fallback(result):
            break
    if isinstance(last, ProxyError):
        raise last
    assert last is not None
    return last


async def _try_backend(
    runtime: Runtime, target: Target, parts: RequestParts, record: RequestRecord
) -> Result | ProxyError:
    backend = target.backend
    breaker = runtime.breakers[backend]
    wait = breaker.admit()
    if wait:
        record.throttled = "circuit_open"
        return errors.circuit_open(backend, wait)
    decision = await runtime.throttle.hit_backend(backend)
    if decision is not None and not decision.allowed:
        record.throttled = "backend_rate_limit"
        return errors.backend_rate_limited(backend, decision.reset_seconds)

    pool = runtime.pools[backend]
    upstream = runtime.upstreams[backend]
    url = upstream.url(parts.path, parts.query)
    body = parts.body_for(target)
    no_retry = runtime.config.backends[backend].no_retry_errors
    tried: list[str] = []
    last_answer: FailedAnswer | None = None
    while True:
        try:
            key = pool.pick(target.pinned_key, exclude=tried)
        except NoUsableKey as exc:
            if last_answer is not None:  # no other key for the retry: answer what we got
                return last_answer
            return _no_key_error(exc)
        tried.append(key.id)
        record.key = key.id
        if record.sent_at is None:
            record.sent_at = time.perf_counter()
        headers = forwarded_request_headers(
            parts.client_headers, upstream.extra_headers, "Bearer " + key.value
        )
        try:
            response = await upstream.send("POST", url, headers, body)
        except ProxyError as err:
            breaker.failure()
            record.upstream_error = "timeout" if err.status == 504 else "connect"
            record.attempt_errors.append((backend, key.id, record.upstream_error))
            return err
        status = response.status
        if status < 400 or (status < 500 and status not in (401, 403, 429)):
            breaker.success()
            pool.mark_success(key.id)
            return Delivery(response, target, key.id)
        last_answer = await _read_failed(response, target, key.id, no_retry)
        if status >= 500:
            breaker.failure()
            record.upstream_error = "status_5xx"
            record.attempt_errors.append((backend, key.id, "status_5xx"))
            return last_answer
        breaker.success()  # the backend is up: it is the key that is refused or limited
        if status == 429:
            record.upstream_error = "status_429"
            pool.cool_down(key.id, _retry_after(last_answer), _reason(last_answer))
        else:
            record.upstream_error = "status_4xx"
            pool.mark_invalid(key.id, _reason(last_answer))
        record.attempt_errors.append((backend, key.id, record.upstream_error))
        if len(tried) > 1:
            return last_answer  # one retry per request, never a storm of them


def _worth_a_fallback(result: Result | ProxyError) -> bool:
    status = result.status
    return status >= 500 or status in (401, 403, 429)


def _no_key_error(exc: NoUsableKey) -> ProxyError:
    if exc.retry_after is not None:
        return errors.keys_cooling_down(exc.backend, exc.hint, exc.retry_after)
    return errors.no_usable_key(exc.backend, exc.hint)


async def _read_failed(
    response: aiohttp.ClientResponse, target: Target, key_id: str, no_retry: frozenset[str]
) -> FailedAnswer:
    try:
        body = await response.read()  # error bodies are small
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    finally:
        response.release()
    headers = kept_response_headers(response.raw_headers)
    headers += rewrite.error_annotations(response.status, headers, body, no_retry)
    return FailedAnswer(response.status, headers, body, target, key_id)


def _retry_after(answer: FailedAnswer) -> float | None:
    """The upstream's retry-after (seconds), or the "try again after N seconds" it wrote."""
    for name, value in answer.headers:
        if name == b"retry-after-ms":
            try:
                return float(value) / 1000
            except ValueError:
                pass
        if name == b"retry-after":
            try:
                return float(value)
            except ValueError:
                pass
    return rewrite.retry_after_in_message(answer.body)


def _reason(answer: FailedAnswer) -> str:
    """``401: <the upstream's message>``, for logs and /admin; never any header."""
    message = ""
    try:
        error = orjson.loads(answer.body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("type") or "")
        elif isinstance(error, str):
            message = error
    except (orjson.JSONDecodeError, AttributeError):
        message = answer.body[:200].decode("utf-8", "replace")
    return f"{answer.status} from upstream: {message[:200]}" if message else f"{answer.status}"
