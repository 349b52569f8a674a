"""Realtime: ``GET /v1/realtime?model=…`` over WebSocket, relayed to the backend's endpoint.

Before the handshake is answered, the same steps as a ``POST``: client auth (the
``Authorization`` header, or the ``openai-insecure-api-key.<key>`` subprotocol browsers
use), the ``model`` query parameter routed (aliases, routes, the client's model globs),
client rate limit and reconnect throttle, the backend's circuit breaker and outbound limit,
a key from the pool (a 401 at the upstream handshake takes it out and tries once more with
another key; a 429 cools it down likewise). A refusal is an HTTP answer with OpenAI's
error body (uvicorn's ``websocket.http.response`` extension), never a bare close.

Once both handshakes are done, every message goes on unchanged both ways (text stays text,
binary stays binary), each direction awaiting the other side's send (backpressure: at most
one message per direction is held here, and neither side reads ahead more than its own
bounded buffer). Either side closing closes the other with its code and reason; an
upstream that goes away ends the client's socket at once with 1011. Messages are bounded
(``MAX_FRAME_SIZE``: 1009 beyond, on either side). Pings are answered by uvicorn (client)
and aiohttp (upstream); an upstream that stops answering its pings is taken for gone.

Tokens come from ``response.done`` events: only text messages holding that string are
parsed, and they are counted the moment they pass (a session may last an hour).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote_plus

import aiohttp
import orjson

from proxy import errors, metrics
from proxy.access_log import AccessLog
from proxy.attempt import KeyTurns, report
from proxy.breaker import Admission, admit
from proxy.classify import Verdict, classify, parse_seconds
from proxy.context import RequestContext
from proxy.dialects import for_request
from proxy.errors import ProxyError
from proxy.failover import backend_limited, candidates
from proxy.forward import (
    Receive,
    Scope,
    Send,
    admit_client,
    client_request_id,
    new_request_id,
    routed_model,
)
from proxy.headers import REQUEST_ID, forwarded_request_headers, header_value
from proxy.keys import NoUsableKey
from proxy.pricing import Prices
from proxy.redact import Redactor
from proxy.routing import MAX_MODEL_LENGTH, Target, usable_model_id
from proxy.runtime import Runtime
from proxy.usage import TokenCounts

log = logging.getLogger("proxy")

PATH = "/v1/realtime"
UPSTREAM_PATH = "/realtime"  # after the backend's base_url, as for every other endpoint
MAX_FRAME_SIZE = 16 * 1024 * 1024  # per message, each way; also uvicorn's ws_max_size
UPSTREAM_HEARTBEAT = 20.0  # seconds between pings to the upstream (uvicorn's client default)
TALLY_INTERVAL = 1.0  # seconds: frame and byte counters are at most this late

INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."
# Subprotocols that say which Realtime dialect the client speaks: passed upstream and echoed
# back (a browser drops a socket whose answer names none of those it offered). Everything
# else offered (the insecure key, openai-organization./openai-project. ids) stays here.
DIALECT_PROTOCOLS = ("realtime", "openai-beta.realtime-v1")

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"

_DONE_MARK = '"response.done"'
_MAX_REASON = 123  # bytes: a close frame's reason must fit in a 125-byte control frame
# Close codes that may not be sent in a close frame (RFC 6455 7.4.1): reserved, or meaning
# "no code" / "connection dropped"; anything outside 1000-1014 and 3000-4999 likewise.
_UNSENDABLE_CODES = frozenset({1004, 1005, 1006, 1015})


@dataclass(slots=True)
class _Opened:
    target: Target
    socket: aiohttp.ClientWebSocketResponse
    key_id: str


@dataclass(slots=True)
class _End:
    """How a session ended: which side ended it, and the close to send on to the other."""

    by_upstream: bool
    code: int
    reason: str
    error: str | None = None  # for the access log, when the end was not a clean close


class _ClientGone(Exception):
    """The client left before its handshake was answered."""


async def handle_websocket(
    runtime: Runtime, access_log: AccessLog, scope: Scope, receive: Receive, send: Send
) -> None:
    """One Realtime session, from the client's handshake to the last close."""
    if (await receive())["type"] != "websocket.connect":
        return  # gone before its handshake was even read
    request_id = client_request_id(scope["headers"]) or new_request_id()
    dialect = for_request(scope["path"], scope["headers"])
    ctx = RequestContext("GET", scope["path"][:200], request_id, dialect, stream=True)
    if runtime.telemetry is not None:
        ctx.trace = runtime.telemetry.start(ctx, scope["headers"])
    accepted_at: float | None = None
    try:
        opened = await _unless_client_leaves(receive, _open_upstream(runtime, scope, ctx))
        try:
            await _accept(runtime, scope, send, opened, request_id)
            accepted_at = time.perf_counter()
            ctx.responded(101)
            await _relay(ctx, opened, receive, send, runtime.redactor, runtime.prices)
        finally:
            if not opened.socket.closed:  # the client left during our accept, or a bug
                await _close_upstream(opened.socket, 1011, "")
    except ProxyError as err:
        ctx.failed(err.code or err.type, err.status)
        await _refuse(scope, send, err, ctx)
    except _ClientGone:
        ctx.client_left()
    except Exception:
        log.exception("internal error in a Realtime session")
        if accepted_at is None:
            ctx.failed("internal_error", 500)
            await _refuse(scope, send, errors.internal_error(), ctx)
        else:
            ctx.failed("internal_error")
            await _close_client(send, 1011, "internal error in the proxy")
    finally:
        access_log.write(ctx)
        if accepted_at is not None:
            metrics.observe_realtime_session(ctx, time.perf_counter() - accepted_at)
        else:
            metrics.observe_request(ctx)
        if ctx.trace is not None:
            ctx.trace.finish(ctx, runtime.config.backends)
        if ctx.target is not None and ctx.client is not None:
            await runtime.throttle.record(ctx.client, ctx.target.model, ctx.outcome)


async def _unless_client_leaves(receive: Receive, opening: Awaitable[_Opened]) -> _Opened:
    """Open the upstream while watching the client: one that leaves meanwhile cancels the
    opening (no upstream session is started, and paid for, for nobody)."""
    work = asyncio.ensure_future(opening)
    watch = asyncio.ensure_future(receive())  # before accept, only a disconnect can come
    try:
        done, _ = await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    if watch not in done:
        watch.cancel()  # uvicorn's receive is a queue get: nothing is lost
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        opened = await work
        await _close_upstream(opened.socket, 1001, "")  # it was open already
    raise _ClientGone


# ---------------------------------------------------------------- before the handshake


async def _open_upstream(runtime: Runtime, scope: Scope, ctx: RequestContext) -> _Opened:
    """Every check a POST gets, then the upstream socket, open. Raises ``ProxyError``."""
    if scope["path"] != PATH:
        raise errors.unknown_url("GET", scope["path"][:200])
    client = runtime.auth.authenticate(_auth_headers(scope))
    if client is not None:
        ctx.authenticated(client.id)
    else:
        ctx.anonymous(runtime.auth.address(scope))

    model = requested_model(scope["query_string"])
    ctx.requested(model, True)
    target = routed_model(runtime, model)
    ctx.routed(target)
    runtime.auth.check_model(client, model, target.model)

    await admit_client(runtime, ctx, client, target.model)
    ctx.admitted(target)
    # The route's deployments in the pool's order, as for a POST: the next one when one is
    # down, its circuit open, its keys spent; all of them together within max_attempts.
    ctx.attempt_limit = ctx.attempts + target.max_attempts
    last: ProxyError | None = None
    for candidate in candidates(runtime, target, ctx):
        if not ctx.attempts_left:
            break
        ctx.routed(candidate)
        try:
            return await _connect(runtime, scope, candidate, ctx)
        except ProxyError as err:
            last = err
            if err.status < 500 and err.status != 429:
                break  # about the session asked for: another deployment would say the same
    assert last is not None  # the first candidate always has its turn
    ctx.refused(last.status, last.code)
    raise last


def _auth_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The headers to authenticate the client by: its own, or, when it sent no
    ``Authorization`` (a browser cannot), the key from its insecure-key subprotocol."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    if header_value(headers, b"authorization") is not None:
        return headers
    for protocol in scope.get("subprotocols") or ():
        if protocol.startswith(INSECURE_KEY_PROTOCOL):
            key = protocol[len(INSECURE_KEY_PROTOCOL) :]
            return [(b"authorization", b"Bearer " + key.encode("latin-1", "replace"))]
    return headers


def requested_model(query_string: bytes) -> str:
    """The ``model`` query parameter (the first one), refused when it could hurt."""
    query = query_string.decode("latin-1")
    model = next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == "model"), None)
    if model is None:
        raise errors.bad_request(
            "You must provide a model query parameter: /v1/realtime?model=<model>.",
            param="model",
            code="missing_model",
        )
    if not model or not usable_model_id(model):
        raise errors.bad_request(
            f"The model parameter must be a non-empty string of at most {MAX_MODEL_LENGTH} "
            "characters, with no control characters.",
            param="model",
            code="invalid_model",
        )
    return model


# The query parameters OpenAI's Realtime API defines for the WebSocket URL: `model`, and
# `call_id` (joining a WebRTC/SIP call); `intent` (beta: `intent=transcription`).
_REALTIME_PARAMS = ("call_id", "intent")


def upstream_query(query_string: bytes, upstream_model: str) -> str:
    """The upstream's query: the model (the upstream's id) and the API's other parameters,
    each once, as sent; nothing else the client wrote (a ``deployment=`` or a second
    ``model`` would let the client pick what the proxy did not route)."""
    parts = ["model=" + quote(upstream_model, safe="")]
    seen: set[str] = set()
    for part in query_string.decode("latin-1").split("&"):
        name = unquote_plus(part.partition("=")[0])
        if name in _REALTIME_PARAMS and name not in seen:
            seen.add(name)
            parts.append(part)
    return "&".join(parts)


def upstream_protocols(offered: list[str]) -> tuple[str, ...]:
    return tuple(p for p in offered if p in DIALECT_PROTOCOLS)


def accepted_protocol(offered: list[str], upstream_chose: str | None) -> str | None:
    """The subprotocol named to the client: the upstream's choice when the client offered
    it, else the first dialect the client offered; never its key."""
    if upstream_chose is not None and upstream_chose in offered:
        return upstream_chose
    return next((p for p in offered if p in DIALECT_PROTOCOLS), None)


async def _connect(runtime: Runtime, scope: Scope, target: Target, ctx: RequestContext) -> _Opened:
    """The upstream socket, through the breaker, the backend limit and the key pool: one
    more key when the first is refused (401) or rate limited (429), as for a POST."""
    backend = target.backend
    admitted = admit(runtime.breakers[backend], None, ctx.client)
    if not isinstance(admitted, Admission):
        ctx.throttled("circuit_open")
        raise errors.circuit_open(backend, admitted)
    verdict: Verdict | None = None
    try:
        limited = await backend_limited(runtime, ctx, backend)
        if limited is not None:
            raise limited
        pool = runtime.pools[backend]
        upstream = runtime.upstreams[backend]
        query = upstream_query(scope["query_string"], target.upstream_model)
        protocols = upstream_protocols(scope.get("subprotocols") or [])
        turns = KeyTurns(runtime, target, ctx)
        while True:
            try:
                key = turns.take()
            except NoUsableKey as exc:
                raise turns.no_key(exc) from None
            auth = ctx.dialect.upstream_auth(runtime.config.backends[backend], key.value)
            headers = forwarded_request_headers(scope["headers"], upstream.extra_headers, auth)
            if ctx.trace is not None:
                turns.sending(headers, upstream.url(UPSTREAM_PATH))  # the span: host, port
            try:
                socket = await upstream.websocket(
                    UPSTREAM_PATH,
                    query,
                    headers,
                    protocols=protocols,
                    max_frame_size=MAX_FRAME_SIZE,
                    heartbeat=UPSTREAM_HEARTBEAT,
                )
            except ProxyError as err:
                verdict = Verdict.BACKEND_FAILED
                ctx.attempt_failed(backend, key.id, "timeout" if err.status == 504 else "connect")
                raise
            except aiohttp.WSServerHandshakeError as exc:
                turns.answered(exc.status)
                verdict = classify(exc.status)
                if verdict is Verdict.OK:  # a 2xx that is not a 101: not a WebSocket server
                    verdict = Verdict.BAD_STATUS
                if verdict is Verdict.KEY_REFUSED or verdict is Verdict.KEY_LIMITED:
                    reason = f"{exc.status} from upstream at the Realtime handshake"
                    turns.refused_key(key.id, verdict, reason, ctx.dialect, _retry_after(exc))
                    if turns.another():
                        continue  # one more key, never a storm of them
                else:
                    ctx.attempt_failed(backend, key.id, _failure_kind(verdict))
                raise _handshake_error(backend, exc.status, verdict, turns) from None
            verdict = Verdict.OK
            turns.answered(101)
            pool.mark_success(key.id)
            runtime.state.verified(backend)
            return _Opened(target, socket, key.id)
    finally:
        report(admitted, verdict, ctx.client, answered_5xx=False)  # a 5xx: the backend's
        if verdict is Verdict.OK:
            admitted.served(ctx.client)  # a 101: a session


def _failure_kind(verdict: Verdict) -> str:
    """The access log's kind of a refused handshake that is not about the key."""
    if verdict is Verdict.BACKEND_FAILED:
        return "status_5xx"
    if verdict is Verdict.REDIRECT:
        return "redirect"
    if verdict is Verdict.BAD_STATUS:
        return "bad_status"
    return "status_4xx"


def _retry_after(exc: aiohttp.WSServerHandshakeError) -> float | None:
    if exc.headers is None:
        return None
    headers = exc.headers
    millis = headers.get("retry-after-ms")
    if millis is not None:
        value = parse_seconds(millis, unit=0.001)
        if value is not None:
            return value
    seconds = headers.get("retry-after")
    return parse_seconds(seconds.encode("latin-1")) if seconds is not None else None


def _handshake_error(backend: str, status: int, verdict: Verdict, turns: KeyTurns) -> ProxyError:
    """What the client is told when the upstream refused the handshake (its body cannot be
    read through aiohttp's WebSocket client: the status is passed on, in our words)."""
    refused = turns.refused_error()
    if refused is not None:
        return refused
    if verdict is Verdict.KEY_LIMITED:
        return ProxyError(
            429,
            f"Backend '{backend}' is rate limiting the proxy's keys (429 at the Realtime "
            "handshake); retry later.",
            type="rate_limit_error",
            code="upstream_rate_limited",
        )
    if verdict is Verdict.REDIRECT:
        return errors.upstream_redirect(backend, status)
    if verdict is Verdict.BAD_STATUS or verdict is Verdict.OK:
        return ProxyError(
            502,
            f"Backend '{backend}' answered the Realtime handshake with {status}, not 101: "
            "does it serve the Realtime API?",
            type="api_error",
            code="upstream_bad_response",
        )
    if verdict is Verdict.BACKEND_FAILED:
        return ProxyError(
            502,
            f"Backend '{backend}' failed the Realtime handshake with status {status}.",
            type="api_error",
            code="upstream_error",
        )
    return ProxyError(
        status,
        f"Backend '{backend}' refused the Realtime handshake with status {status}.",
        code="upstream_refused",
    )


async def _refuse(scope: Scope, send: Send, err: ProxyError, ctx: RequestContext) -> None:
    """Refuse the handshake with an HTTP answer in the session's dialect's error shape;
    where the server cannot send one, a close (1008: policy, 1011: our failure) naming the
    reason."""
    try:
        if "websocket.http.response" in (scope.get("extensions") or {}):
            body = ctx.dialect.error_body(err, ctx.request_id)
            headers = [*err.raw_headers(body), (REQUEST_ID, ctx.request_id.encode("latin-1"))]
            await send(
                {"type": "websocket.http.response.start", "status": err.status, "headers": headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            code = 1011 if err.status >= 500 else 1008
            await send({"type": "websocket.close", "code": code, "reason": _reason(err.message)})
    except OSError:  # the client is gone already
        pass


async def _accept(
    runtime: Runtime, scope: Scope, send: Send, opened: _Opened, request_id: str
) -> None:
    headers = [(REQUEST_ID, request_id.encode("latin-1"))]
    if runtime.config.server.routing_headers:
        target = opened.target
        headers += [
            (b"x-proxy-backend", target.backend.encode()),
            (b"x-proxy-model", target.upstream_model.encode()),
            (b"x-proxy-key", opened.key_id.encode()),
        ]
    offered = scope.get("subprotocols") or []
    message: dict[str, object] = {"type": "websocket.accept", "headers": headers}
    protocol = accepted_protocol(offered, opened.socket.protocol)
    if protocol is not None:
        message["subprotocol"] = protocol
    try:
        await send(message)
    except OSError:  # uvicorn: the client disconnected
        raise _ClientGone from None


# ---------------------------------------------------------------- the session


class _Tally:
    """Messages and bytes relayed in one direction, added to the counters at most once a
    second and at the end: two counter increments per message measured ~7% of the relay's
    CPU. A count is never more than ``TALLY_INTERVAL`` late, idle sessions included."""

    __slots__ = ("_bytes", "_frames", "_timer", "frames", "size")

    def __init__(self, backend: str, label: str, direction: str) -> None:
        self._frames = metrics.realtime_frames_child(backend, label, direction)
        self._bytes = metrics.realtime_bytes_child(backend, label, direction)
        self.frames = 0
        self.size = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, size: int) -> None:
        self.frames += 1
        self.size += size
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(TALLY_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.frames:
            self._frames.inc(self.frames)
            self._bytes.inc(self.size)
            self.frames = self.size = 0


async def _relay(
    ctx: RequestContext,
    opened: _Opened,
    receive: Receive,
    send: Send,
    redactor: Redactor,
    prices: Prices,
) -> None:
    """Both directions at once until one ends; then the other side is closed with the
    code and reason of the first, and the task still reading is cancelled."""
    target = opened.target
    backend, label = target.backend, target.label
    active = metrics.realtime_sessions_child(backend)
    active.inc()
    sent = _Tally(backend, label, CLIENT_TO_UPSTREAM)
    received = _Tally(backend, label, UPSTREAM_TO_CLIENT)
    up = asyncio.ensure_future(_client_to_upstream(receive, opened.socket, sent))
    down = asyncio.ensure_future(
        _upstream_to_client(opened.socket, send, ctx, label, received, redactor, prices)
    )
    try:
        done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        end = (down if down in done else up).result()
        for task in (up, down):
            task.cancel()
        if end.error is not None:
            ctx.failed(end.error)
        if end.by_upstream:
            if end.error is not None:
                ctx.session_broke(backend, opened.key_id)
            await _close_client(send, end.code, end.reason)
            await _close_upstream(opened.socket, 1000, "")  # no-op when it closed itself
        else:
            await _close_upstream(opened.socket, end.code, end.reason)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        sent.flush()
        received.flush()
        active.dec()


async def _client_to_upstream(
    receive: Receive, socket: aiohttp.ClientWebSocketResponse, tally: _Tally
) -> _End:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            try:
                if text is not None:
                    await socket.send_str(text)
                    size = len(text) if text.isascii() else len(text.encode())
                else:
                    data = message.get("bytes") or b""
                    await socket.send_bytes(data)
                    size = len(data)
            except (ConnectionError, aiohttp.ClientError):
                return _End(True, 1011, "upstream connection lost", "upstream_closed")
            tally.add(size)
        elif kind == "websocket.disconnect":
            code = message.get("code", 1005)
            reason = message.get("reason") or ""
            if code == 1005:  # a close frame without a code: a normal close
                return _End(False, 1000, "")
            if code == 1006 or not _sendable(code):  # dropped: "going away" upstream
                return _End(False, 1001, "", "client_dropped")
            return _End(False, code, reason, "client_message_too_big" if code == 1009 else None)


async def _upstream_to_client(
    socket: aiohttp.ClientWebSocketResponse,
    send: Send,
    ctx: RequestContext,
    label: str,
    tally: _Tally,
    redactor: Redactor,
    prices: Prices,
) -> _End:
    """Upstream messages on to the client, any configured secret in them (a key an
    upstream echoes in an error event) replaced by its fingerprint, as in every answer."""
    while True:
        message = await socket.receive()
        kind = message.type
        if kind is aiohttp.WSMsgType.TEXT:
            text: str = redactor.text(message.data)
            if _DONE_MARK in text:
                _count_usage(text, ctx, label, prices)
            try:
                await send({"type": "websocket.send", "text": text})
            except OSError:  # uvicorn: the client is gone
                return _End(False, 1001, "", "client_dropped")
            tally.add(len(text) if text.isascii() else len(text.encode()))
        elif kind is aiohttp.WSMsgType.BINARY:
            data: bytes = redactor.bytes(message.data)
            try:
                await send({"type": "websocket.send", "bytes": data})
            except OSError:
                return _End(False, 1001, "", "client_dropped")
            tally.add(len(data))
        elif kind is aiohttp.WSMsgType.CLOSE:
            # A close frame (aiohttp has answered it): its code and reason go on.
            code = message.data if isinstance(message.data, int) else 0
            reason = redactor.text(message.extra) if isinstance(message.extra, str) else ""
            if code in (0, 1005):  # a close frame without a code: a normal close
                return _End(True, 1000, reason)
            if not _sendable(code):
                return _End(True, 1011, reason, "upstream_bad_close_code")
            return _End(True, code, reason)
        elif kind is aiohttp.WSMsgType.ERROR:
            if getattr(message.data, "code", None) == 1009:
                return _End(
                    True,
                    1009,
                    f"upstream message larger than {MAX_FRAME_SIZE} bytes",
                    "upstream_message_too_big",
                )
            return _End(True, 1011, "upstream connection failed", "upstream_error")
        elif kind in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            # The connection ended without a close frame (the upstream vanished, or
            # stopped answering pings): abnormal, whatever aiohttp's close_code says.
            return _End(True, 1011, "upstream connection lost", "upstream_closed")
        # PING and PONG are answered by aiohttp (autoping) and never come here.


def _count_usage(text: str, ctx: RequestContext, label: str, prices: Prices) -> None:
    """Tokens from a ``response.done`` event, counted now (metrics) and for the log line."""
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return
    if not isinstance(event, dict) or event.get("type") != "response.done":
        return
    response = event.get("response")
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return
    prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    ctx.added_tokens(prompt, completion)
    backend = ctx.backend or "none"
    cost = prices.cost(backend, ctx.upstream_model or "", TokenCounts(prompt, completion))
    if cost is not None:
        ctx.cost = (ctx.cost or 0.0) + cost
    metrics.count_tokens(ctx.client_label, backend, label, prompt, completion, cost)


def _count(value: object) -> int:
    # Only plain non-negative integers count: a hostile upstream cannot make a counter go
    # backwards or take a float that never adds up.
    return value if type(value) is int and 0 <= value < 1 << 40 else 0


async def _close_client(send: Send, code: int, reason: str) -> None:
    with contextlib.suppress(OSError, RuntimeError):  # gone, or closed already
        await send({"type": "websocket.close", "code": code, "reason": _reason(reason)})


async def _close_upstream(socket: aiohttp.ClientWebSocketResponse, code: int, reason: str) -> None:
    """Close the upstream with ``code`` (its close handshake bounded by aiohttp's
    ``ws_close`` timeout); the connection is dropped whatever happens."""
    if not _sendable(code):
        code = 1011
    with contextlib.suppress(OSError, aiohttp.ClientError):
        await socket.close(code=code, message=_reason(reason).encode())


def _sendable(code: int) -> bool:
    return (1000 <= code <= 1014 and code not in _UNSENDABLE_CODES) or 3000 <= code <= 4999


def _reason(text: str) -> str:
    """At most 123 bytes of UTF-8, cut on a character boundary."""
    data = text.encode()
    if len(data) <= _MAX_REASON:
        return text
    return data[:_MAX_REASON].decode("utf-8", "ignore")
