"""Getting one request answered: which backend and key to try, and when to give up.

For the route's backend, then each of its fallbacks in order, before any byte has reached
the client: skip a backend whose circuit is open or whose outbound limit is spent; send with
the next usable key; when the upstream refuses the key itself (``classify``) have a probe
confirm it before the key is taken out (``Runtime.suspect_key``) and try once more with
another key; on 429 cool the key down and try once more with another. A
5xx, a 429, refused keys, a connect error or a timeout move on to the next fallback. An
error about the request itself (a 400, a 401 or 403 about a scope, a permission, a model or
a path) is relayed as it is:
nothing is learnt from it and nothing is retried. When everything failed, the last failure
is answered: an upstream error passed through unchanged, or the proxy's own error (503
``no_usable_key`` when the upstream refused the proxy's keys, never the upstream's 401).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from proxy import balance, errors, rewrite
from proxy.attempt import KeyTurns, report
from proxy.balance import Affinity, DeploymentStats, session_key
from proxy.bodies import ClientGone, Upload
from proxy.breaker import Admission, admit
from proxy.classify import Verdict, classify, parse_seconds
from proxy.config import BackendConfig
from proxy.context import RequestContext
from proxy.dialects import DEFAULT, Dialect
from proxy.dialects.translate import Untranslatable, client_wire
from proxy.drain import DRAINED
from proxy.errors import ProxyError
from proxy.headers import forwarded_request_headers, kept_response_headers
from proxy.keys import NoUsableKey
from proxy.routing import Target
from proxy.runtime import Runtime
from proxy.upstream import Body


@dataclass(slots=True)
class RequestParts:
    """What the client sent, ready to be sent again to another backend or with another key."""

    method: str
    path: str  # after /v1, still percent-encoded
    query: str
    client_headers: list[tuple[bytes, bytes]]
    payload: dict[str, Any]
    body: bytes
    model: str  # as the client sent it ("" when it named none): the body holds this id
    upload: Upload | None = None  # a streamed body, sent from the client as it arrives
    model_in_path: bool = False  # /models/{id}: the id is in the path, not the body
    dialect: Dialect = DEFAULT  # the wire the client speaks (from the request's path)
    # A translated request whose answer the proxy keeps: (the response it continues, the
    # payload as the client sent it, before the kept conversation was put in front).
    conversation: tuple[str | None, dict[str, Any]] | None = None

    @property
    def wire(self) -> str:
        """The wire it speaks, as translations tell them apart (``client_wire``)."""
        return client_wire(self.dialect, self.path)

    @property
    def as_sent(self) -> dict[str, Any]:
        """The payload as the client sent it (before a kept conversation went in front):
        what a translated answer echoes."""
        return self.conversation[1] if self.conversation is not None else self.payload

    _bodies: dict[tuple[str, int, int], bytes] = field(default_factory=dict)

    @property
    def replayable(self) -> bool:
        """Whether another key or backend can still be tried: an upload under way cannot
        be sent twice."""
        return self.upload is None or self.upload.replayable

    def path_for(self, target: Target) -> str:
        if self.model_in_path and (target.upstream_model != self.model or "/" in self.model):
            # One path segment upstream too: a "/" in the id goes on as %2F.
            return "/models/" + quote(target.upstream_model, safe=":")
        return self.path

    def wants_usage_injected(self, backend: BackendConfig) -> bool:
        """A streamed chat or text completion whose client did not ask for usage: the
        upstream is asked anyway (the tokens are counted), and the client is not sent it."""
        if not backend.inject_stream_usage or self.path not in USAGE_PATHS:
            return False
        if self.payload.get("stream") is not True:
            return False
        options = self.payload.get("stream_options")
        return not (isinstance(options, dict) and options.get("include_usage") is True)

    def body_for(self, target: Target, inject_usage: bool = False) -> bytes:
        """The body for ``target``: its model id and rewrite rules applied, usage asked for
        when ``inject_usage``; the bytes as the client sent them when nothing changes."""
        if not target.model:  # a request without a model is sent as it came
            return self.body
        if target.translation is not None:
            return self._translated(target)
        same_model = target.upstream_model == self.model
        if same_model and not target.rewrite:
            if not inject_usage:
                return self.body
            if "stream_options" not in self.payload:
                # The common case, without a parse-and-dump round: one field put in front.
                return _USAGE_FIELD + self.body.lstrip()[1:]
        cache_key = (target.upstream_model, id(target.rewrite), int(inject_usage))
        body = self._bodies.get(cache_key)
        if body is None:
            payload = dict(self.payload)  # each target's rules start from the client's body
            payload["model"] = target.upstream_model
            changed = rewrite.apply(target.rewrite, payload)
            if inject_usage:
                options = payload.get("stream_options")
                options = dict(options) if isinstance(options, dict) else {}
                payload["stream_options"] = {**options, "include_usage": True}
                changed = True
            body = self.body if not changed and same_model else orjson.dumps(payload)
            self._bodies[cache_key] = body
        return body

    def _translated(self, target: Target) -> bytes:
        """The body in the wire ``target`` is translated to, its backend's rules applied
        (they are written for that wire). Raises ``Untranslatable``."""
        translation = target.translation
        assert translation is not None
        # Per translation too: two backends' translations differ (reasoning_effort).
        cache_key = (target.upstream_model, id(target.rewrite), id(translation))
        body = self._bodies.get(cache_key)
        if body is None:
            payload = translation.body(self.payload, target.upstream_model)
            rewrite.apply(target.rewrite, payload)
            try:
                body = orjson.dumps(payload)
            except orjson.JSONEncodeError:  # parsed at 1,024 levels, written at 254 at most
                raise Untranslatable("messages", "the request is nested too deeply") from None
            self._bodies[cache_key] = body
        return body


USAGE_PATHS = ("/chat/completions", "/completions")  # streams whose usage must be asked for
_USAGE_FIELD = b'{"stream_options":{"include_usage":true},'


@dataclass(slots=True)
class Delivery:
    """An upstream answered with a status worth relaying; its body is not read yet."""

    response: aiohttp.ClientResponse
    target: Target
    key_id: str
    admission: Admission  # through the circuits: the relay reports the outcome to it
    strip_usage: bool = False  # usage was asked for by the proxy, not by the client


@dataclass(slots=True)
class FailedAnswer:
    """An upstream's error answer, read whole so a fallback can still be tried."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    target: Target
    key_id: str
    verdict: Verdict


Result = Delivery | FailedAnswer

_ERROR_BODY_LIMIT = 1024 * 1024  # error bodies are small; a huge one is not relayed


async def deliver(
    runtime: Runtime, target: Target, parts: RequestParts, ctx: RequestContext
) -> Result:
    """The first good answer among the route's deployments (in the pool's order) and its
    fallbacks, else the last failure; at most ``target.max_attempts`` upstream calls.

    Raises ``ProxyError`` when the last failure is the proxy's own (open circuit, no key,
    connect error, timeout, backend limit, no attempt left).
    """
    ctx.attempt_limit = ctx.attempts + target.max_attempts  # this delivery's budget
    if target.affinity is not Affinity.NONE and (
        target.pool is not None or len(runtime.pools[target.backend].keys) > 1
    ):  # a choice to keep: among deployments, or among a backend's keys
        ctx.session = session_key(
            parts.payload,
            parts.client_headers,
            runtime.session_headers,
            ctx.client,
            target.affinity,
        )
    last: Result | ProxyError | None = None
    for candidate in candidates(runtime, target, ctx):
        if not ctx.attempts_left:
            break
        ctx.routed(candidate)
        result = await _try_backend(runtime, candidate, parts, ctx)
        if isinstance(result, Delivery):
            return result
        last = result
        if not _worth_a_fallback(result, target.pool is not None) or not parts.replayable:
            break
    assert last is not None  # the first candidate always has its attempt
    if isinstance(last, ProxyError):
        raise last
    return last


_RANDOM = random.Random()
_CLIENT_WIRE_HEADERS = ("anthropic-version", "anthropic-beta")
_NO_ANSWER = (Verdict.BACKEND_FAILED, Verdict.BAD_STATUS, Verdict.REDIRECT)


def candidates(runtime: Runtime, target: Target, ctx: RequestContext) -> Sequence[Target]:
    """The route's deployments in the order this request (or Realtime session) tries
    them, then its fallbacks."""
    pool = target.pool
    if pool is None:
        return (target, *target.fallbacks)
    healthy = [_healthy(runtime, member, ctx.client) for member in pool.members]
    stats = [runtime.deployments[name] for name in pool.names]
    now = time.monotonic()
    session = ctx.session
    indexes = balance.order(
        pool.strategy, pool.weights, healthy, stats, pool.names, session, _RANDOM, now
    )
    return [*(pool.members[i] for i in indexes), *target.fallbacks]


def _healthy(runtime: Runtime, member: Target, client: str | None) -> bool:
    """Worth trying in its turn: its circuits would let this request through (closed, or
    half-open with the probe slot free: this request may be the probe that closes it) and
    it has a usable key."""
    backend = member.backend
    return (
        runtime.breakers[backend].would_admit(client)
        and runtime.model_circuits[backend].would_admit(member.upstream_model, client)
        and runtime.pools[backend].has_usable(member.pinned_key, client)
    )


async def _try_backend(
    runtime: Runtime, target: Target, parts: RequestParts, ctx: RequestContext
) -> Result | ProxyError:
    if target.translation is not None:
        refused = untranslated(target, parts)
        if refused is not None:  # nothing sent, nothing learnt: the next candidate
            return refused
    model = target.upstream_model
    backend = runtime.breakers[target.backend]
    admitted = admit(
        backend, runtime.model_circuits[target.backend].get(model) if model else None, ctx.client
    )
    if not isinstance(admitted, Admission):
        ctx.throttled("circuit_open")
        if backend.is_open:
            return errors.circuit_open(target.backend, admitted)
        return errors.model_circuit_open(target.backend, model, admitted)
    attempt = _Attempt(runtime, target, parts, ctx, admitted)
    stats = runtime.deployments.get(target.deployment) if target.deployment else None
    result: Result | ProxyError | None = None
    if stats is not None:
        stats.selections += 1
        stats.in_flight += 1
        since = time.perf_counter()
    try:
        result = await attempt.run()
        return result
    finally:
        if stats is not None:
            _deployment_tried(ctx, stats, since, result)
        # However the attempt ended (client gone, key cooling down, backend limit, a 4xx),
        # the circuits hear an outcome (an OK's is the relay's, once the answer is in).
        verdict = attempt.verdict
        report(admitted, verdict, ctx.client, attempt.answered_5xx)
        if verdict is not None and verdict not in _NO_ANSWER:
            runtime.state.verified(target.backend)


def untranslated(target: Target, parts: RequestParts) -> ProxyError | None:
    """Why ``target``'s translation cannot carry the request (a 400 naming the field), or
    None when it can; its body is then made (and kept for the attempts)."""
    translation = target.translation
    assert translation is not None
    if parts.path not in translation.paths:
        why = f"/v1{parts.path} is not translated"
        return errors.untranslatable("path", why, target.backend, translation.wire)
    try:
        parts.body_for(target)
    except Untranslatable as exc:
        return errors.untranslatable(exc.param, exc.why, target.backend, translation.wire)
    return None


def _deployment_tried(
    ctx: RequestContext, stats: DeploymentStats, since: float, result: Result | ProxyError | None
) -> None:
    """A deployment's attempt ended: an answer being relayed stays in flight until the
    request ends (``deployment_done``); a failure it made (not the request's own 4xx) is a
    penalty sample for its latency estimate."""
    if isinstance(result, Delivery):
        ctx.deployment, ctx.deployment_stats, ctx.deployment_since = (
            result.target.deployment,
            stats,
            since,
        )
        return
    stats.in_flight -= 1
    if (
        isinstance(result, FailedAnswer)
        and result.verdict in _THE_REQUESTS_OWN
        and not _model_missing(result)
    ):
        return  # about the request (a 400): nothing about the deployment
    if result is not None:  # an error answer, no answer: the deployment failed it
        stats.failed(time.monotonic())


def deployment_done(ctx: RequestContext) -> None:
    """The request ended: its deployment has one request fewer in flight, and learns how
    long it took (to the first token of a stream, to the end of an answer)."""
    stats = ctx.deployment_stats
    if stats is None:
        return
    ctx.deployment_stats = None
    stats.in_flight -= 1
    if ctx.error is not None and ctx.error != DRAINED and not ctx.client_gone:
        stats.failed(time.monotonic())  # cut or stalled mid-way
        return
    if ctx.error is not None or ctx.status >= 500 or ctx.status == 0:
        return
    now = time.perf_counter()
    if ctx.ttft is not None and ctx.sent_at is not None:
        sample = ctx.sent_at + ctx.ttft - ctx.deployment_since
    else:
        sample = now - ctx.deployment_since
    stats.observe(sample, time.monotonic())


async def backend_limited(runtime: Runtime, ctx: RequestContext, backend: str) -> ProxyError | None:
    """The backend's outbound rate limit: the proxy's own 429 when it is spent."""
    decision = await runtime.throttle.hit_backend(backend)
    if decision is None or decision.allowed:
        return None
    ctx.throttled("backend_rate_limit")
    return errors.backend_rate_limited(backend, decision.reset_seconds)


class _Attempt:
    """Sending one request to one backend: one key, and once more with another key when
    the first is refused or rate limited."""

    def __init__(
        self,
        runtime: Runtime,
        target: Target,
        parts: RequestParts,
        ctx: RequestContext,
        admission: Admission,
    ) -> None:
        self.runtime = runtime
        self.target = target
        self.parts = parts
        self.ctx = ctx
        self.verdict: Verdict | None = None  # the last upstream verdict; None: no answer
        self.admission = admission  # the probe slots, if held: handed on with a Delivery
        self.answered_5xx = False  # BACKEND_FAILED by a 5xx answer (not a connect error)

    async def run(self) -> Result | ProxyError:
        runtime, target, parts, ctx = self.runtime, self.target, self.parts, self.ctx
        backend = target.backend
        limited = await backend_limited(runtime, ctx, backend)
        if limited is not None:
            return limited
        pool = runtime.pools[backend]
        upstream = runtime.upstreams[backend]
        config = runtime.config.backends[backend]
        translation = target.translation
        # Where the path goes and how the key is sent: the client's wire, or the one its
        # request is translated to.
        dialect = target.dialect if translation is None else translation.upstream
        path = parts.path_for(target)
        if translation is not None:
            path = translation.path(path)
        # A translated request's query is its own wire's (the SDK's ?beta=true): not sent.
        query = parts.query if translation is None else ""
        url = upstream.url(path, query, dialect.base_url(config))
        inject_usage = translation is None and parts.wants_usage_injected(config)
        turns = KeyTurns(runtime, target, ctx)
        last_answer: FailedAnswer | None = None
        while True:
            try:
                key = turns.take()
            except NoUsableKey as exc:
                return self._nothing_left(turns, last_answer, exc)
            auth = dialect.upstream_auth(config, key.value)
            headers = forwarded_request_headers(parts.client_headers, upstream.extra_headers, auth)
            if translation is not None:  # its answer is read and rewritten: never compressed
                headers["accept-encoding"] = "identity"
                for name in _CLIENT_WIRE_HEADERS:  # the client's wire's, not the upstream's
                    headers.pop(name, None)
            turns.sending(headers, url)
            try:
                response = await upstream.send(
                    parts.method, url, headers, self._body(headers, inject_usage)
                )
            except ProxyError as err:
                upload = parts.upload
                if upload is not None and upload.failure is not None:
                    # The client's upload stopped (too large, or the client left): nothing
                    # to learn about the backend.
                    if isinstance(upload.failure, ClientGone):
                        raise upload.failure from None
                    return upload.failure
                self.verdict = Verdict.BACKEND_FAILED
                self._attempt_failed(key.id, "timeout" if err.status == 504 else "connect")
                return err
            status = response.status
            turns.answered(status)
            if status < 400 or status > 599:
                self.verdict = classify(status)
                if self.verdict is Verdict.REDIRECT:
                    response.release()
                    self._attempt_failed(key.id, "redirect")
                    return errors.upstream_redirect(backend, status)
                if self.verdict is Verdict.BAD_STATUS:
                    response.close()
                    self._attempt_failed(key.id, "bad_status")
                    return errors.upstream_bad_status(backend, status)
                pool.mark_success(key.id)
                if 200 <= status < 300:
                    self.admission.headed(ctx.client)  # a probe held is answered now
                return Delivery(response, target, key.id, self.admission, inject_usage)
            try:
                last_answer = await self._read_failed(response, key.id)
            except ProxyError as err:  # an error body past the size cap
                self.verdict = classify(status)
                self.answered_5xx = status >= 500
                # Still the upstream's failure (its status), for the log and the throttle.
                kind = (
                    "status_5xx"
                    if status >= 500
                    else "status_429"
                    if status == 429
                    else "status_4xx"
                )
                self._attempt_failed(key.id, kind)
                return err
            self.verdict = last_answer.verdict
            if self.verdict is Verdict.CLIENT_ERROR or self.verdict is Verdict.KEY_LACKS_SCOPE:
                # About this request only (a scope or permission the key lacks included):
                # relayed as it is, no key state changed, no retry on another key.
                self._attempt_failed(key.id, "status_4xx")
                return last_answer
            if self.verdict is Verdict.BACKEND_FAILED:
                self.answered_5xx = True
                self._attempt_failed(key.id, "status_5xx")
                return last_answer
            reason = self._reason(last_answer)
            turns.refused_key(key.id, self.verdict, reason, dialect, _retry_after(last_answer))
            if not turns.another(parts.replayable):
                return self._nothing_left(turns, last_answer)

    def _body(self, headers: dict[str, str], inject_usage: bool) -> Body:
        """What this attempt sends: JSON bytes, or an upload's bytes as they come."""
        parts = self.parts
        upload = parts.upload
        if upload is None:
            body = parts.body_for(self.target, inject_usage)
            return body if body or parts.method == "POST" else None
        model = self.target.upstream_model or None
        length = upload.length_for(model)
        if length is not None:
            headers["content-length"] = str(length)
        return upload.chunks(model)

    def _nothing_left(
        self, turns: KeyTurns, last: FailedAnswer | None, exc: NoUsableKey | None = None
    ) -> Result | ProxyError:
        """No (further) key: the proxy's own keys refused → 503 naming them; a 429 from
        the upstream → relayed; nothing tried at all → why no key could be picked."""
        if last is not None and last.verdict is Verdict.KEY_REFUSED:
            refused = turns.refused_error()
            if refused is not None:
                return refused
        if last is not None:
            return last
        assert exc is not None
        return turns.no_key(exc)

    def _attempt_failed(self, key_id: str, kind: str) -> None:
        self.ctx.attempt_failed(self.target.backend, key_id, kind)

    async def _read_failed(self, response: aiohttp.ClientResponse, key_id: str) -> FailedAnswer:
        backend = self.target.backend
        upstream = self.runtime.upstreams[backend]
        try:
            body = await upstream.read_all(response, _ERROR_BODY_LIMIT)
        except ProxyError as err:
            if err.code == "upstream_response_too_large":
                raise
            body = b""
        finally:
            response.release()
        body = self.runtime.redactor.bytes(body)  # an upstream may echo the key it got
        headers = kept_response_headers(response.raw_headers, self.runtime.redactor)
        no_retry = self.runtime.config.backends[backend].no_retry_errors
        headers += rewrite.error_annotations(response.status, headers, body, no_retry)
        verdict = classify(response.status, body)
        return FailedAnswer(response.status, headers, body, self.target, key_id, verdict)

    def _reason(self, answer: FailedAnswer) -> str:
        """``401 from upstream: <its message>``, for logs and /admin; secrets scrubbed."""
        return self.runtime.redactor.text(_reason(answer))


_THE_REQUESTS_OWN = (Verdict.CLIENT_ERROR, Verdict.KEY_LACKS_SCOPE)


def _worth_a_fallback(result: FailedAnswer | ProxyError, pooled: bool = False) -> bool:
    """A fallback may help when this backend failed or its keys are refused or limited;
    never for an answer about the request itself (a 4xx relayed to the client), except, in
    a pool, a deployment's 404 for its own model id (retired, or mistyped in the config)."""
    if isinstance(result, FailedAnswer):
        if result.verdict in _THE_REQUESTS_OWN:
            return pooled and _model_missing(result)
        return True
    # A member that cannot carry the request translated: another may, natively.
    return result.status >= 500 or result.status == 429 or result.code == "untranslatable"


def _model_missing(answer: FailedAnswer) -> bool:
    """A 404 saying the model does not exist (``model_not_found``, as OpenAI and most
    compatible servers write it)."""
    return answer.status == 404 and b"model_not_found" in answer.body[:4096]


def _retry_after(answer: FailedAnswer) -> float | None:
    """The upstream's retry-after (seconds), or the "try again after N seconds" it wrote;
    None when it gave none that is a sane number."""
    for name, value in answer.headers:
        if name == b"retry-after-ms":
            seconds = parse_seconds(value, unit=0.001)
            if seconds is not None:
                return seconds
        if name == b"retry-after":
            seconds = parse_seconds(value)
            if seconds is not None:
                return seconds
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
