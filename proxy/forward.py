"""The forwarding pipeline for ``/v1/...``: one request, one direction.

read body → auth → model → route → throttle → key/upstream (failover) → relay → log.
Each step is a call into the module that owns it; this module only strings them together
and turns a ``ProxyError`` from any step into an answer in the request's dialect (picked
from its path: OpenAI's API, or Anthropic's ``/v1/messages``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from functools import partial
from typing import Any

import aiohttp
import orjson

from proxy import errors, metrics
from proxy.access_log import AccessLog
from proxy.batch import BatchFilter, BatchLines
from proxy.batch_spend import FileEstimate
from proxy.bodies import (
    FORM,
    JSON_TYPES,
    ClientGone,
    Upload,
    UploadSlots,
    checked_model,
    form_boundary,
    json_or_opaque,
    media_type,
    parse_payload,
    read_whole,
)
from proxy.clients import Client
from proxy.context import RequestContext
from proxy.dialects import DEFAULT, Dialect, for_request
from proxy.dialects.translate import Untranslatable, pick, reaches
from proxy.drain import DRAIN, DRAINED, cancelled_by_drain
from proxy.errors import ProxyError
from proxy.failover import (
    Delivery,
    FailedAnswer,
    RequestParts,
    deliver,
    deployment_done,
    untranslated,
)
from proxy.headers import REQUEST_ID, header_value, kept_response_headers
from proxy.objects import (
    MAX_IDS,
    MAX_LIST_LIMIT,
    MAX_LIST_PAGES,
    Unknown,
    Viewer,
    add_visible,
    event_created_ids,
    finished_list,
    is_owned_list,
    list_limit,
    list_page,
    may_see,
    named_ids,
    not_found_message,
    query_after,
    record_created,
)
from proxy.rewrite import NO_RULES
from proxy.routing import Target
from proxy.runtime import Runtime
from proxy.spend import Meter, Refusal, shown_usd, token_headers
from proxy.streaming import (
    RelayResult,
    ResponseCut,
    StreamKind,
    TranslatedStream,
    relay_bytes,
    relay_stream,
    translated,
    usage_of,
)
from proxy.usage import NO_TOKENS, TokenCounts, token_counts

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("proxy")

_EVENT_STREAM = "text/event-stream"
OTHER_REQUEST_ID = b"request-id"  # the name some providers (Anthropic) give it


async def handle(
    runtime: Runtime, access_log: AccessLog, scope: Scope, receive: Receive, send: Send
) -> None:
    request_id = client_request_id(scope["headers"]) or new_request_id()
    dialect = for_request(scope["path"], scope["headers"])
    ctx = RequestContext(scope["method"], scope["path"], request_id, dialect)
    if runtime.telemetry is not None:
        ctx.trace = runtime.telemetry.start(ctx, scope["headers"])
    parts: RequestParts | None = None
    body_unread = True
    try:
        if DRAIN.draining:
            raise errors.shutting_down()
        path = forwarded_path(scope, dialect, runtime)
        check_method(scope["method"], path, dialect)
        refuse_content_encoding(scope["headers"])
        client = authenticate(runtime, scope, dialect, ctx)
        with upload_slot(runtime, scope, client):
            body_unread = False
            parts = await read_request(runtime, scope, receive, path)
            parts.dialect = dialect
            upload = parts.upload
            await _cancel_on_disconnect(
                receive,
                ctx,
                forward(runtime, scope, send, parts, ctx, client),
                upload.done if upload is not None else None,
                runtime.config.server.usage_grace,
            )
        if ctx.client_gone:  # left, but the stream was read to its end in the grace
            ctx.left_after_end()
    except ProxyError as err:
        # Refused before its body was read (no key, a bad path): the connection closes
        # after the answer, so an unread body cannot go on holding it.
        await _answer_error(runtime, send, ctx, err, close=body_unread)
    except ClientGone:
        ctx.client_left()
    except ResponseCut:
        raise  # the server drops the connection: the client sees the body end too early
    except asyncio.CancelledError as exc:
        if cancelled_by_drain(exc) and not ctx.client_gone:
            _uncancel()
            # (A stream under way ended itself with its error event, in relay_stream.)
            if ctx.response_started:  # a body half-sent: dropped, so it is seen incomplete
                ctx.error = DRAINED
                raise ResponseCut(DRAINED) from None
            await _answer_error(runtime, send, ctx, errors.shutting_down())
            ctx.error = DRAINED  # after _answer_error's code: the log says why it ended
        if not ctx.client_gone:
            raise
        # The client left: the upstream call was cancelled with this task, so nothing is
        # generated (and paid for) for nobody.
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        ctx.client_left()
    except Exception:
        log.exception("internal error while handling %s %s", scope["method"], scope["path"])
        await _answer_error(runtime, send, ctx, errors.internal_error())
    finally:
        if parts is not None and parts.upload is not None:
            parts.upload.close()
        deployment_done(ctx)
        await account(runtime, ctx)
        access_log.write(ctx)
        metrics.observe_request(ctx)
        if ctx.trace is not None:
            ctx.trace.finish(ctx, runtime.config.backends)
        if ctx.target is not None and ctx.client is not None:
            await runtime.throttle.record(ctx.client, ctx.target.model, ctx.outcome)


def _uncancel() -> None:
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()


async def read_request(runtime: Runtime, scope: Scope, receive: Receive, path: str) -> RequestParts:
    """The request as it will be sent on: a JSON body read whole, an upload's head (up to
    its model), or a model id taken from the path (``/models/{id}``)."""
    server = runtime.config.server
    method: str = scope["method"]
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    query = scope["query_string"].decode("latin-1")
    if sum(1 for name, _ in headers if name == b"content-type") > 1:
        # The proxy reads the first (a form, text: no model to check), the upstream the
        # last (JSON with a model): one request, two readings. Refused.
        raise errors.bad_request(
            "A request may carry one Content-Type header.", code="invalid_content_type"
        )
    media = media_type(headers)
    if method == "POST" and media == FORM:
        upload = Upload(
            receive,
            headers,
            server.max_upload_size,
            server.max_buffered_bodies,
            server.max_spilled_bodies,
            server.upload_deadline,
        )
        model_optional = runtime.router.path_rule(path) is not None or path.startswith(
            FORMS_WITHOUT_MODEL
        )
        # A batch file is routed by its lines' model: the head is read to its first line.
        peek = BatchLines(server.max_body_size) if path == "/files" else None
        await upload.read_head(form_boundary(headers), model_optional, peek)
        form_model = upload.model or ""
        if peek is not None and peek.is_batch:
            if upload.model is not None:
                raise errors.bad_request(
                    "A batch file's form has no model field: each line names its own.",
                    param="model",
                    code="invalid_batch_file",
                )
            form_model = peek.first_model or ""
        return RequestParts(method, path, query, headers, {}, b"", form_model, upload)
    body = await read_whole(scope, receive, server.max_body_size, server.max_buffered_bodies)
    if path.startswith("/models/"):
        model = checked_model(path.removeprefix("/models/"))
        return RequestParts(method, path, query, headers, {}, body, model, model_in_path=True)
    if method != "POST":
        payload: dict[str, Any] = {}
    elif media in JSON_TYPES or media.endswith(b"+json"):
        payload = parse_payload(body)
    else:
        payload = json_or_opaque(body)
    stream = payload.get("stream")
    if stream is not None and type(stream) is not bool:
        # vLLM and other pydantic backends take "true" or 1 as true, where the proxy reads
        # no stream: the two would disagree on what the answer is (and its usage).
        raise errors.bad_request("'stream' must be a JSON boolean (true or false).", param="stream")
    named = payload.get("model")
    model = checked_model(named) if named is not None else ""
    return RequestParts(method, path, query, headers, payload, body, model)


def authenticate(
    runtime: Runtime, scope: Scope, dialect: Dialect, ctx: RequestContext
) -> Client | None:
    """The client, from the headers alone, before any byte of the body is read: a request
    without a valid key never holds an upload's memory, disk or slot."""
    client = runtime.auth.authenticate(scope["headers"], dialect)
    if client is not None:
        ctx.authenticated(client.id)
    else:
        ctx.anonymous(runtime.auth.address(scope))
    return client


@contextlib.contextmanager
def upload_slot(runtime: Runtime, scope: Scope, client: Client | None) -> Iterator[None]:
    """One of the client's ``max_uploads_per_client`` slots, for a streamed upload (an
    open proxy has no client keys: its clients may share one address behind a balancer)."""
    if client is None or scope["method"] != "POST" or media_type(scope["headers"]) != FORM:
        yield
        return
    limit = runtime.config.server.max_uploads_per_client
    if not UploadSlots.take(client.id, limit):
        raise errors.too_many_uploads(client.id, limit)
    try:
        yield
    finally:
        UploadSlots.give_back(client.id)


async def forward(
    runtime: Runtime,
    scope: Scope,
    send: Send,
    parts: RequestParts,
    ctx: RequestContext,
    client: Client | None,
) -> None:
    # route
    model = parts.model
    ctx.requested(model, parts.payload.get("stream") is True)
    kept = len(runtime.conversations) and parts.path.startswith("/responses/")
    if kept and await answer_kept(runtime, send, ctx, parts, client):
        return
    target = route(runtime, parts)
    # Objects are made (and named) on OpenAI's API only; most requests name none: then no
    # storage call, not even an await.
    ids = named_objects(parts) if parts.dialect.makes_objects else []
    if ids:
        target = await stick_to_objects(runtime, ids, target, client, parts.wire)
    ctx.routed(target)
    batch_file = batch_upload(parts)
    if batch_file is not None:
        # Every line checked as the request it is, line 1's model included.
        target = await check_batch_lines(runtime, ctx, client, batch_file, target)
    elif model:
        runtime.auth.check_model(client, model, target.model)
    cost = await batch_cost(runtime, ctx, client, parts) if parts.path == "/batches" else 1

    # throttle, then the client's budget and tpm
    await admit_client(runtime, ctx, client, target.model or parts.path, cost)
    translation = target.translation
    if translation is not None:
        # A kept conversation is rebuilt only for an admitted request (it may be 10 MiB).
        if translation.keeps_conversations:
            continue_conversation(runtime, parts, client, target)
        if parts.path != translation.estimated:
            translatable(target, parts)
    if translation is not None and parts.path == translation.estimated and all_translated(target):
        await _send_json(send, ctx, translation.estimate(parts.body), _ESTIMATE)
        return
    if ctx.batch is not None and parts.path == "/batches":
        await reserve_batch(runtime, ctx, client)
    elif batch_file is None:  # a batch file costs nothing until a batch runs it
        await reserve_spend(runtime, ctx, client, target, parts)
    ctx.admitted(target)

    # key → upstream, with retries on another key and fallbacks
    try:
        result = await deliver(runtime, target, parts, ctx)
    except ProxyError as err:
        ctx.refused(err.status, err.code)
        raise
    if isinstance(result, FailedAnswer):
        await _send_failed(runtime, send, ctx, result)
    else:
        await _relay(runtime, send, ctx, result, parts, client)


async def _relay(
    runtime: Runtime,
    send: Send,
    ctx: RequestContext,
    delivery: Delivery,
    parts: RequestParts,
    client: Client | None = None,
) -> None:
    """Relay an upstream's answer by its kind: events as they come, a JSON answer read
    whole (its usage and ids taken), anything else (audio, a file) chunk by chunk."""
    response = delivery.response
    relay = _Relay(runtime, send, ctx, delivery, parts, client)
    try:
        ctx.responded(response.status)
        content_type = response.content_type
        translation = delivery.target.translation
        if translation is not None and response.status < 300:
            wanted = _EVENT_STREAM if parts.payload.get("stream") is True else "application/json"
            if content_type != wanted:  # relayed as it is, the SDK would take it for an answer
                relay.failed_answer()
                why = f"{content_type or 'no content type'} for a request wanting {wanted}"
                raise errors.untranslatable_answer(delivery.target.backend, why)
        if content_type == _EVENT_STREAM:
            await relay.events(delivery.target.dialect.stream_kind(parts.path))
        elif content_type == "application/json" and not parts.path.endswith("/content"):
            await relay.json()
        else:
            await relay.bytes()
    finally:
        if not relay.reported:  # the client left before the answer was in: no verdict
            delivery.admission.released()
        # Returns the connection to the pool when the body was read to the end, closes it
        # otherwise (client gone, stream broken): the upstream stops generating at once.
        response.release()


class _Relay:
    """One upstream answer on its way to the client; the breaker hears its outcome once."""

    def __init__(
        self,
        runtime: Runtime,
        send: Send,
        ctx: RequestContext,
        delivery: Delivery,
        parts: RequestParts,
        client: Client | None = None,
    ) -> None:
        self.runtime = runtime
        self.parts = parts
        self.client = client
        self.owner = client.id if client is not None else None  # what it makes is its own
        self.send = send
        self.ctx = ctx
        self.delivery = delivery
        self.backend = delivery.target.backend
        self.reported = False
        self.head_at = time.perf_counter()

    def _headers(self, extra: tuple[bytes, ...] = ()) -> list[tuple[bytes, bytes]]:
        response = self.delivery.response
        kept = kept_response_headers(response.raw_headers, self.runtime.redactor, extra)
        return _response_headers(
            self.runtime, self.ctx, self.delivery.target, self.delivery.key_id, kept
        )

    def _served(self) -> None:
        self.delivery.admission.served(self.ctx.client)
        self.reported = True

    def failed_answer(self) -> None:
        """An answer that cannot be relayed: the backend failed this request."""
        self._failed("bad_answer")

    def _failed(self, kind: str) -> None:
        """Cut or stalled after the head: the backend failed, whatever it began."""
        self.delivery.admission.backend_failed(self.ctx.client)
        self.reported = True
        self.ctx.upstream_broke(self.backend, self.delivery.key_id, kind)

    async def _start(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.ctx.head_sent()
        status = self.delivery.response.status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def events(self, kind: StreamKind) -> None:
        ctx = self.ctx
        await self._start(self._headers())  # (a probe held was decided at the head)
        ctx.overhead_measured(time.perf_counter() - self.head_at)
        streams = metrics.streams_child(self.backend)
        streams.inc()
        result = RelayResult()
        ctx.streaming = True
        translation = self.delivery.target.translation
        source: aiohttp.ClientResponse | TranslatedStream = self.delivery.response
        translator = None
        if translation is not None:
            translator = translation.stream(self.parts.as_sent)
            source = translated(self.delivery.response, translator)
        try:
            await relay_stream(
                source,
                self._recording_ids(self.send),
                self.backend,
                kind,
                self.runtime.redactor,
                strip_usage_event=self.delivery.strip_usage,
                result=result,
                gone=lambda: ctx.client_gone,
                grace_bytes=self.runtime.config.server.usage_grace_bytes,
            )
        finally:
            ctx.streaming = False
            streams.dec()
            if _generates(self.parts):  # not a stored response's events replayed (GET)
                # Counted however the relay ended (cancelled too): what is known.
                _count_stream(ctx, result)
        if result.first_data_at is not None:
            ctx.first_data(result.first_data_at)
        if translator is not None and translator.final is not None and result.complete:
            self._keep(translator.final)
        if ctx.client_gone and not result.complete:
            raise ClientGone()
        if result.error == DRAINED:
            ctx.error = DRAINED  # the proxy ended it, shutting down: no fault of the backend
            self.delivery.admission.released()
            self.reported = True
        elif result.error is not None:
            self._failed(result.error)  # cut or stalled mid-way: the backend failed
        else:
            self._served()

    def _keep(self, document: dict[str, Any]) -> None:
        """A translated answer the proxy keeps for its owner (a conversation to continue,
        a response to retrieve), when its request asked for that."""
        translation = self.delivery.target.translation
        conversation = self.parts.conversation
        if translation is None or conversation is None:
            return
        previous, own = conversation
        items = translation.kept(own, document)
        response_id = document.get("id")
        if items is not None and isinstance(response_id, str):
            self.runtime.conversations.keep(self.owner, response_id, previous, items, document)

    def _recording_ids(self, send: Send) -> Send:
        """``send``, noting the objects a stream reveals as it goes by (a Responses
        stream's ``response.created``, a stored chat completion's id): a stream that makes
        an object is as sticky as a JSON answer."""
        parts = self.parts
        path, payload = parts.path, parts.payload
        if not _may_reveal_ids(path, payload):
            return send
        objects, backend, key_id = self.runtime.objects, self.backend, self.delivery.key_id
        owner = self.owner
        seen: set[str] = set()

        async def record_and_send(message: Message) -> None:
            # Recorded before the client hears of the id, as for a JSON answer: a client
            # that retrieves a background response the moment `response.created` arrives
            # (on another replica, through Redis) must find where it lives.
            body: bytes = message.get("body", b"")
            # At most MAX_IDS per stream, as per JSON answer: a hostile upstream streaming
            # endless `response.created` events must not fill the store (or `seen`).
            if len(seen) < MAX_IDS and any(marker in body for marker in _ID_MARKERS):
                for line in body.split(b"\n"):
                    if line.startswith(b"data:"):
                        ids = event_created_ids(path, line[5:], payload)
                        found = [i for i in ids if i not in seen][: MAX_IDS - len(seen)]
                        if found:
                            seen.update(found)
                            await objects.remember(found, backend, key_id, owner)
            await send(message)

        return record_and_send

    async def json(self) -> None:
        runtime, ctx = self.runtime, self.ctx
        response = self.delivery.response
        limit = runtime.config.server.max_response_size
        try:
            data = await runtime.upstreams[self.backend].read_all(response, limit)
        except ProxyError as err:
            if err.code == "upstream_response_too_large":
                self._served()  # an answer, if too big to relay
            else:
                self._failed("body_broken")
            raise
        self._served()
        data = runtime.redactor.bytes(data)
        read_at = time.perf_counter()
        tokens = _json_tokens(data) if response.status == 200 and b'"usage"' in data else None
        translation = self.delivery.target.translation
        if translation is not None:  # counted above from the upstream's own usage
            try:
                if response.status < 300:
                    document = translation.document(data, self.parts.as_sent)
                    self._keep(document)
                    data = orjson.dumps(document)
                else:
                    data = translation.error(response.status, data)
            except ValueError as exc:  # a 200 with no answer in it: never an empty "answer"
                ctx.counted(tokens or NO_TOKENS)
                raise errors.untranslatable_answer(self.backend, str(exc)) from None
            data = runtime.redactor.bytes(data)  # escapes the upstream wrote are decoded now
        # What the client hears of (a translated answer's own ids): recorded before it does.
        if response.status < 300 and self.delivery.target.dialect.makes_objects:
            # Before the client hears of it: its next call finds it.
            parts = self.parts
            made = await record_created(
                runtime.objects,
                parts.path,
                parts.method,
                response.status,
                data,
                parts.payload,
                self.backend,
                self.delivery.key_id,
                self.owner,
                lines=batch_requests(parts),
            )
            if made and ctx.batch is not None:
                await batch_made(runtime, ctx, parts, made[0])
            if self.client is not None and is_owned_list(parts.path, parts.method):
                data = await _owned_page(runtime, self.client, data, self.delivery, parts, ctx)
        if response.status < 300 and self.parts.path.startswith("/batches"):
            # Before the body goes: once it is sent the client may close, and the request
            # be cancelled half-way through the correction (seen with Redis).
            await batches_seen(runtime, self.parts, data)
        headers = self._headers()
        headers.append((b"content-length", str(len(data)).encode()))
        await self._start(headers)
        await self.send({"type": "http.response.body", "body": data, "more_body": False})
        ctx.overhead_measured(time.perf_counter() - read_at)
        if tokens is not None and _generates(self.parts):
            ctx.counted(tokens)

    async def bytes(self) -> None:
        """Audio, a file's content: passed on as it comes, with backpressure, never whole.
        The upstream's length is kept: a body cut short (or scrubbed of a secret) then
        fails visibly at the client instead of looking complete."""
        self._served()
        await self._start(self._headers(_BINARY_HEADERS))
        self.ctx.overhead_measured(time.perf_counter() - self.head_at)
        error = await relay_bytes(self.delivery.response, self.send, self.runtime.redactor)
        if error is not None:
            self._failed(error)
            raise ResponseCut(error)


_BINARY_HEADERS = (b"content-length", b"content-disposition")
_ID_MARKERS = (b'"response.created"', b'"container_id"', b'"chat.completion.chunk"')


def _generates(parts: RequestParts) -> bool:
    """A request whose answer's usage was spent by it: a POST that names no object in its
    path. Retrieving a stored response, a stored chat completion or a batch (polled every
    few seconds) shows the usage of work done once, which must not be counted again."""
    return parts.method == "POST" and not named_ids(parts.path, None)


def _may_reveal_ids(path: str, payload: dict[str, Any]) -> bool:
    """Responses streams (unless not stored) and stored chat completions make objects."""
    if path == "/responses":
        return payload.get("store") is not False
    return path == "/chat/completions" and payload.get("store") is True


_REWRITTEN = (b"content-type", b"content-encoding")
_JSON = (b"content-type", b"application/json")
_ESTIMATE = [(b"x-proxy-estimate", b"input_tokens: request characters / 4")]


async def _send_json(
    send: Send, ctx: RequestContext, body: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    """A 200 JSON answer the proxy makes itself."""
    ctx.responded(200)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    ctx.head_sent()
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_failed(
    runtime: Runtime, send: Send, ctx: RequestContext, answer: FailedAnswer
) -> None:
    """Pass an upstream's error through unchanged: status, body and the headers SDKs read
    (a 404 for a model gets a ``proxy_hint`` naming the closest ids)."""
    ctx.responded(answer.status)
    started = time.perf_counter()
    body = answer.body
    if answer.status == 404:
        body = _with_model_hint(runtime, answer.target, body)
    translation = answer.target.translation
    if translation is not None:  # in the client's shape (an SDK reads its own errors)
        body = runtime.redactor.bytes(translation.error(answer.status, body))
    headers = _response_headers(runtime, ctx, answer.target, answer.key_id, list(answer.headers))
    if translation is not None:  # the body is the proxy's JSON now
        headers = [h for h in headers if h[0] not in _REWRITTEN] + [_JSON]
    headers.append((b"content-length", str(len(body)).encode()))
    ctx.head_sent()
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    ctx.overhead_measured(time.perf_counter() - started)


def _response_headers(
    runtime: Runtime,
    ctx: RequestContext,
    target: Target,
    key_id: str,
    headers: list[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """The kept upstream headers plus the request id and the routing headers."""
    upstream_id = header_value(headers, REQUEST_ID)
    if upstream_id is None:
        headers.append((REQUEST_ID, ctx.request_id.encode("latin-1")))
        upstream_id = header_value(headers, OTHER_REQUEST_ID)
    if upstream_id is not None:  # the SDK shows it as `_request_id`: the provider's is useful
        ctx.upstream_identified(upstream_id.decode("latin-1"))
    if runtime.config.server.routing_headers:
        headers += _routing_headers(target.backend, target.upstream_model, key_id, ctx.attempts)
    if ctx.limit_headers is not None:  # a limited client: its own limit, not the key's
        headers = [h for h in headers if h[0] not in _TOKEN_LIMIT_HEADERS]
        headers += ctx.limit_headers
    return headers


_TOKEN_LIMIT_HEADERS = frozenset(
    (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")
)


def _with_model_hint(runtime: Runtime, target: Target, data: bytes) -> bytes:
    """A 404 for a model the backend's discovered list lacks gets a ``proxy_hint`` field
    naming the closest ids; the upstream's own fields stay as they were."""
    discovered = runtime.discovered.get(target.backend)
    if not discovered or target.upstream_model in discovered:
        return data
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data
    if not isinstance(body, dict):
        return data
    close = difflib.get_close_matches(target.upstream_model, discovered, n=3, cutoff=0.6)
    hint = f"'{target.upstream_model}' is not served by {target.backend}"
    body["proxy_hint"] = hint + (f"; did you mean {', '.join(close)}?" if close else ".")
    return orjson.dumps(body)


def _json_tokens(data: bytes) -> TokenCounts:
    try:
        return token_counts(usage_of(orjson.loads(data)))
    except orjson.JSONDecodeError:
        return NO_TOKENS


# ---------------------------------------------------------------- steps


def route(runtime: Runtime, parts: RequestParts) -> Target:
    """By the model when the request names one; else by its path. A request in a dialect
    goes only to a backend that speaks it."""
    dialect = parts.dialect
    if parts.model:
        return routed_model(runtime, parts.model, dialect, parts.wire)
    if not dialect.routes_by_path:  # each of its requests names its model
        raise errors.missing_model(parts.path)
    target = runtime.router.resolve_path(parts.path)
    if target is None:
        if parts.method == "POST" and parts.upload is None:
            raise errors.missing_model(parts.path)  # most likely a chat body without one
        raise errors.no_path_route(parts.method, parts.path)
    return target


def continue_conversation(
    runtime: Runtime, parts: RequestParts, client: Client | None, target: Target
) -> None:
    """A translated request that continues a response the proxy kept: the conversation
    goes in front of its input (the backend keeps none). One it does not hold, or holds for
    another client, is OpenAI's 400 for it."""
    payload = parts.payload
    previous = payload.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            why = "'previous_response_id' must be a string."
            raise errors.bad_request(why, param="previous_response_id")
        owner = client.id if client is not None else None
        history = runtime.conversations.history(owner, previous)
        if history is None:
            raise errors.previous_response_not_found(previous)
        assert target.translation is not None
        try:
            parts.payload = target.translation.continued(payload, history)
        except Untranslatable as exc:
            raise errors.bad_request(f"{exc.param}: {exc.why}.", param=exc.param) from None
    # (Kept, or not, by the answer's own request: `kept` reads its `store`.)
    parts.conversation = (previous, payload)


async def answer_kept(
    runtime: Runtime, send: Send, ctx: RequestContext, parts: RequestParts, client: Client | None
) -> bool:
    """``GET``/``DELETE /v1/responses/{id}`` (and its ``input_items``) for a response the
    proxy keeps for this client (translated: no backend has it); False for any other."""
    segments = parts.path.split("/")  # "", "responses", id[, "input_items"]
    if len(segments) not in (3, 4) or (len(segments) == 4 and segments[3] != "input_items"):
        return False
    owner = client.id if client is not None else None
    kept, response_id = runtime.conversations, segments[2]
    body: bytes | None = None
    if len(segments) == 3 and parts.method == "GET":
        body = kept.response(owner, response_id)
    elif len(segments) == 3 and parts.method == "DELETE":
        if kept.delete(owner, response_id):
            body = orjson.dumps({"id": response_id, "object": "response", "deleted": True})
    elif parts.method == "GET":
        items = kept.input_items(owner, response_id)
        if items is not None:
            body = orjson.dumps(input_items_page(items, response_id))
    if body is None:
        return False
    await admit_client(runtime, ctx, client, parts.path)
    await _send_json(send, ctx, body, [])
    return True


def input_items_page(items: list[Any], response_id: str) -> dict[str, Any]:
    """A kept response's input items, newest first (OpenAI's default order), with ids."""
    data = []
    for n, item in enumerate(reversed(items)):
        entry = dict(item) if isinstance(item, dict) else {"value": item}
        entry.setdefault("id", f"item_{response_id[5:21]}_{len(items) - n}")
        entry.setdefault("type", "message")
        data.append(entry)
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": False}


def all_translated(target: Target) -> bool:
    """Every backend the request may reach is spoken to through a translation."""
    candidates = (*(target.pool.members if target.pool else (target,)), *target.fallbacks)
    return all(c.translation is not None for c in candidates)


def translatable(target: Target, parts: RequestParts) -> None:
    """A request whose every candidate is translated: refused at once (400, naming the
    field) when the translation cannot carry it, before any upstream is tried. With a
    native candidate among them, the translated ones that cannot are skipped instead."""
    if not all_translated(target):
        return
    refused = untranslated(target, parts)
    if refused is not None:
        raise refused


def routed_model(
    runtime: Runtime, model: str, dialect: Dialect = DEFAULT, wire: str = ""
) -> Target:
    """The target of ``model``, on a backend that speaks the request's dialect (``wire``:
    which translation reaches one that does not)."""
    target = runtime.router.resolve(model, dialect, wire)
    if target is None:
        summary = runtime.router.routable_summary()
        raise errors.model_not_found(
            f"The model '{model}' is not routed by this proxy. Routable: {summary}."
        )
    if not reaches(dialect, runtime.config.backends[target.backend]):
        speakers = runtime.router.speakers(dialect)
        raise errors.dialect_not_spoken(model, target.backend, dialect.name, speakers)
    return target


async def admit_client(
    runtime: Runtime,
    ctx: RequestContext,
    client: Client | None,
    throttled_as: str,
    cost: int = 1,
) -> None:
    """The client's own rate limit (``cost`` requests: a batch's lines), then the reconnect
    backoff of (client, ``throttled_as``: the model, or the path of a request without one)."""
    if client is not None:
        decision = await runtime.throttle.hit_client(client.id, cost)
        if decision is not None and not decision.allowed:
            ctx.throttled("client_rate_limit")
            raise errors.client_rate_limited(client.id, decision.limit, decision.reset_seconds)
    assert ctx.client is not None
    wait = await runtime.throttle.reconnect_wait(ctx.client, throttled_as)
    if wait > 0:
        ctx.throttled("reconnect")
        raise errors.reconnect_throttled(throttled_as, wait)


async def reserve_spend(
    runtime: Runtime,
    ctx: RequestContext,
    client: Client | None,
    target: Target,
    parts: RequestParts,
) -> None:
    """Reserve the request's estimate against its client's budget and tpm (``spend``), or
    refuse it: 429 ``budget_exceeded``. Settled in ``account`` once the request ends."""
    spend = runtime.spend
    if spend is None or client is None or not target.model or client.id not in spend.limits:
        return
    estimate = spend.estimate(
        target.backend, target.upstream_model, parts.payload, len(parts.body), parts.path
    )
    ctx.limit_headers = []  # a limited client: the upstream's token headers are not its own
    if estimate.price is None and spend.needs_a_price(client.id):
        raise errors.unpriced_for_budget(client.id, target.upstream_model, target.backend)
    found = await spend.reserve(client.id, estimate, runtime.throttle.guarded)
    if isinstance(found, Refusal):
        raise _over_budget(ctx, client, found)
    if found is None:
        return
    ctx.reservation = found
    ctx.limit_headers = [(k.encode(), v.encode()) for k, v in found.token_headers().items()]


def _over_budget(ctx: RequestContext, client: Client, found: Refusal) -> ProxyError:
    """429 ``budget_exceeded`` naming the limit with no room (a request's, a batch's)."""
    ctx.throttled("budget")
    limit = found.limit
    used = shown_usd(found.used) if limit.meter is Meter.USD else f"{found.used:g} tokens"
    calendar = limit.name == "budget"
    headers = token_headers(limit.cap, 0, found.reset) if limit.name == "tpm" else {}
    return errors.budget_exceeded(client.id, limit.describe(), used, found.reset, calendar, headers)


async def account(runtime: Runtime, ctx: RequestContext) -> None:
    """What the request cost, and its reservation settled to it (released if nothing was
    used). Runs once, as the request ends, whatever ended it."""
    if ctx.tokens and ctx.backend is not None and ctx.upstream_model is not None:
        ctx.cost = runtime.prices.cost(ctx.backend, ctx.upstream_model, ctx.tokens)
    reservation = ctx.reservation
    if reservation is not None and runtime.spend is not None:
        answered = 200 <= ctx.status < 300
        call = runtime.throttle.guarded
        if reservation.whole:  # a batch: once made upstream, its whole estimate is spent
            used = TokenCounts(prompt=reservation.tokens) if answered else NO_TOKENS
            await runtime.spend.settle(reservation, used, reservation.usd * answered, call)
            return
        floor = ctx.tokens_partial or (answered and ctx.client_gone and not ctx.tokens)
        await runtime.spend.settle(reservation, ctx.tokens, ctx.cost, call, floor)


def named_objects(parts: RequestParts) -> list[str]:
    """The ids of objects the request names (path, body fields, a fine-tuned model)."""
    ids = named_ids(parts.path, parts.payload)
    if parts.model.startswith(FINE_TUNED):
        ids.append(parts.model)  # made by a fine-tuning job through the proxy
    return ids


def viewer_of(client: Client | None) -> Viewer | None:
    """The client as object records see it; None for the open proxy's one tenant."""
    return None if client is None else Viewer(client.id, client.shared_objects)


async def _owned_page(
    runtime: Runtime,
    client: Client,
    data: bytes,
    delivery: Delivery,
    parts: RequestParts,
    ctx: RequestContext,
) -> bytes:
    """A list page with only the objects ``client`` may see, filled from up to
    ``MAX_LIST_PAGES`` upstream pages (asked ``after`` the last, with the same key) so that
    another client's many objects do not leave the caller an empty page."""
    viewer = viewer_of(client)
    assert viewer is not None
    page = list_page(data)
    if viewer.shared or page is None:
        return data
    unknown = Unknown(runtime.config.objects.unknown)
    store, known = runtime.objects, runtime.placements
    await add_visible(page, page.document, store, viewer, unknown, known)
    limit = list_limit(parts.query)
    same_key = dataclasses.replace(delivery.target, pinned_key=delivery.key_id, fallbacks=())
    for _ in range(MAX_LIST_PAGES - 1):
        if not page.has_more or len(page.kept) >= limit or page.upstream_last is None:
            break
        following = dataclasses.replace(
            parts, query=query_after(parts.query, page.upstream_last), _bodies={}
        )
        next_data = await _next_page(runtime, same_key, following, ctx)
        if next_data is None:
            break  # the upstream's cursor stays where it was: has_more says so
        await add_visible(page, next_data, store, viewer, unknown, known)
    return finished_list(page, limit)


async def _next_page(
    runtime: Runtime, target: Target, parts: RequestParts, ctx: RequestContext
) -> bytes | None:
    """One more upstream page of a list, or None when it could not be had."""
    try:
        result = await deliver(runtime, target, parts, ctx)
    except ProxyError:
        return None
    if isinstance(result, FailedAnswer):
        return None
    response = result.response
    admission = result.admission
    try:
        if response.status != 200 or response.content_type != "application/json":
            admission.released()
            return None
        limit = runtime.config.server.max_response_size
        data = await runtime.upstreams[result.target.backend].read_all(response, limit)
        admission.served(ctx.client)
        return runtime.redactor.bytes(data)
    except ProxyError:
        admission.released()
        return None
    finally:
        response.release()


def object_not_found(object_id: str) -> ProxyError:
    """The upstream's own 404 for a missing object: another client's object, or one the
    proxy has no record of, looks exactly like one that does not exist."""
    message, param = not_found_message(object_id)
    code = "model_not_found" if param == "model" else None
    return ProxyError(404, message, param=param, code=code)


async def stick_to_objects(
    runtime: Runtime, ids: list[str], target: Target, client: Client | None = None, wire: str = ""
) -> Target:
    """A request naming a file, response, batch... made through the proxy goes where it was
    made, with the key that made it (another key's project does not have it), whatever
    round robin or a route would pick; no fallback: the object is nowhere else.

    With ``clients:``, every id named must be the client's own (``may_see``): else the
    upstream's 404, and nothing is sent."""
    found = await runtime.objects.records(ids, runtime.placements)
    viewer = viewer_of(client)
    if viewer is not None:
        unknown = Unknown(runtime.config.objects.unknown)
        for object_id in ids[:MAX_IDS]:
            if not may_see(viewer, found.get(object_id), unknown):
                raise object_not_found(object_id)
    placement = next((found[i].placement for i in ids if i in found), None)
    if placement is None:
        return target
    same_backend = placement.backend == target.backend
    backend = runtime.config.backends.get(placement.backend)
    translation = target.translation
    if not same_backend and backend is not None:  # spoken to as that backend speaks
        translation = pick(target.dialect, backend, wire)
    return dataclasses.replace(
        target,
        backend=placement.backend,
        pinned_key=placement.key_id,
        fallbacks=(),
        pool=None,  # the object is on that one deployment: no other is tried
        upstream_model=target.upstream_model if same_backend else target.model,
        rewrite=target.rewrite if same_backend else NO_RULES,
        translation=translation,
    )


# ---------------------------------------------------------------- batches


def batch_upload(parts: RequestParts) -> Upload | None:
    """The upload when it is a ``purpose: batch`` file (its purpose before its file)."""
    upload = parts.upload
    if upload is None or not isinstance(upload.peek, BatchLines) or not upload.peek.is_batch:
        return None
    return upload


async def check_batch_lines(
    runtime: Runtime, ctx: RequestContext, client: Client | None, upload: Upload, target: Target
) -> Target:
    """Check (and rewrite) every line of a batch file on its way out: each line's model
    routed and allowed as a single request's would be, all of them on ``target``'s backend
    (the first line's). An object lives on one backend: no fallback."""

    def resolve(model: str) -> Target:
        line_target = routed_model(runtime, model)
        runtime.auth.check_model(client, model, line_target.model)
        return line_target

    measure = None
    batches = runtime.batches
    if batches is not None:
        file = ctx.batch = FileEstimate()
        measure = partial(batches.line, file)
    lines = BatchLines(runtime.config.server.max_body_size, resolve, target.backend, measure)
    assert upload.boundary is not None
    upload.peek = lines  # from here on, its count is the file's
    await upload.filter_with(BatchFilter(upload.boundary, lines), runtime.router.renames)
    key = target.pinned_key
    rule = runtime.router.path_rule("/files")
    if key is None and rule is not None and rule.backend == target.backend:
        key = rule.pinned_key  # `paths: /files` names the key files go with
    return dataclasses.replace(target, fallbacks=(), pinned_key=key)


def batch_requests(parts: RequestParts) -> int | None:
    """The requests of a batch file just uploaded, for its placement record."""
    upload = batch_upload(parts)
    return (
        upload.peek.requests if upload is not None and isinstance(upload.peek, BatchLines) else None
    )


async def batch_cost(
    runtime: Runtime, ctx: RequestContext, client: Client | None, parts: RequestParts
) -> int:
    """What creating a batch costs against the client's rate limit: its file's requests
    (and its file's estimate, in ``ctx.batch``, for its budget and its usage). A client
    with a limit or model globs may only run files the proxy checked."""
    if parts.method != "POST":
        return 1
    file_id = parts.payload.get("input_file_id")
    placement = (
        await runtime.objects.lookup([file_id], runtime.placements)
        if isinstance(file_id, str)
        else None
    )
    lines = placement.lines if placement is not None else None
    batches = runtime.batches
    if lines is not None and batches is not None and isinstance(file_id, str):
        ctx.batch = await batches.file_estimate(file_id, runtime.throttle.guarded)
    if client is None:
        return 1
    capacity = runtime.throttle.client_capacity(client.id)
    budget = runtime.spend is not None and runtime.spend.has_budget(client.id)
    if lines is None or (budget and ctx.batch is None):
        if capacity is None and client.models is None and not budget:
            return 1
        raise errors.bad_request(
            "The batch's input_file_id must name a file uploaded through this proxy with "
            "purpose 'batch' (its lines are checked, counted and estimated there; an "
            "estimate lasts as long as the file's record): upload it again.",
            param="input_file_id",
            code="unchecked_batch_file",
        )
    if capacity is not None and lines > capacity:
        raise errors.bad_request(
            f"The batch has {lines} requests, more than client '{client.id}' may make in "
            f"one rate-limit window ({capacity}): it can never fit. Split the file.",
            param="input_file_id",
            code="batch_exceeds_rate_limit",
        )
    return max(lines, 1)


async def reserve_batch(runtime: Runtime, ctx: RequestContext, client: Client | None) -> None:
    """A batch's estimate reserved against its client's budget, or 429 ``budget_exceeded``
    (403 ``unpriced_model`` with a USD budget and a line whose model has no price).
    Settled to the whole estimate in ``account`` once the upstream made the batch."""
    spend, batches, file = runtime.spend, runtime.batches, ctx.batch
    if spend is None or batches is None or file is None or client is None:
        return
    if not spend.has_budget(client.id):
        return
    if file.usd is None and spend.needs_a_price(client.id):
        model = file.model or "(one of its lines' models)"
        raise errors.unpriced_for_budget(client.id, model, file.backend)
    too_big = batches.beyond_budget(client.id, file)
    if too_big is not None:
        raise errors.bad_request(
            f"The batch's estimate ({too_big}) is more than client '{client.id}' may spend in "
            "a whole budget window: it can never fit. Split the file.",
            param="input_file_id",
            code="batch_exceeds_budget",
        )
    found = await batches.reserve(client.id, file, runtime.throttle.guarded)
    if isinstance(found, Refusal):
        raise _over_budget(ctx, client, found)
    ctx.reservation = found


async def batch_made(runtime: Runtime, ctx: RequestContext, parts: RequestParts, made: str) -> None:
    """The upstream made a batch file (its estimate noted under its id) or a batch (its
    charge noted, to be corrected to its usage when it ends)."""
    batches, file, call = runtime.batches, ctx.batch, runtime.throttle.guarded
    if batches is None or file is None:
        return
    if parts.path == "/batches":
        await batches.made(made, ctx.client_label, file, ctx.reservation, call)
    elif batch_requests(parts) is not None:
        await batches.file_made(made, ctx.client_label, file, call)


async def batches_seen(runtime: Runtime, parts: RequestParts, data: bytes) -> None:
    """Batches in an answer (one retrieved, or a page of the caller's): those that ended
    with a usage have their charge corrected to it and their tokens counted, once."""
    batches = runtime.batches
    if batches is None or parts.method != "GET" or b'"usage"' not in data:
        return
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if not isinstance(document, dict):
        return
    items = document.get("data") if parts.path == "/batches" else [document]
    for item in items[:MAX_LIST_LIMIT] if isinstance(items, list) else ():
        batch_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(batch_id, str) and batch_id.startswith("batch_"):
            await batches.ended(batch_id, item, runtime.throttle.guarded)


FINE_TUNED = "ft:"  # OpenAI's fine-tuned model ids

# The OpenAI API's forms that carry no model field: sent on from their first file part,
# never held while looking for a model (with no `paths:` rule for them too).
FORMS_WITHOUT_MODEL = ("/files", "/uploads/", "/containers/", "/skills", "/audio/voice")


def check_method(method: str, path: str, dialect: Dialect = DEFAULT) -> None:
    allowed = dialect.methods(path)
    if method not in allowed:
        raise errors.method_not_allowed(method, "/v1" + path[:200], ", ".join(allowed))


MODEL_ID_METHODS = frozenset({"GET", "HEAD", "DELETE"})  # /models/{id}: retrieve, delete


def forwarded_path(scope: Scope, dialect: Dialect, runtime: Runtime) -> str:
    """The path after ``/v1`` when it is one the proxy forwards in ``dialect``; 400 for
    dot-segments or encoded slashes and dots (never normalised and forwarded), 404 for any
    other path.

    The upstream URL is built from the allowed path itself, never from the client's bytes.
    """
    raw = scope.get("raw_path") or scope["path"].encode()
    lowered = raw.lower()
    if lowered.startswith(b"/v1/models/") and scope["method"] in MODEL_ID_METHODS:
        # The SDK encodes the "/" of a prefixed id (`moonshot/kimi-latest`): here only, a
        # %2F is part of the id; everything below still holds for the decoded path.
        lowered = lowered.replace(b"%2f", b"")
    if b"%2e" in lowered or b"%2f" in lowered or b"%5c" in lowered or b"\\" in raw:
        raise errors.invalid_path(raw.decode("latin-1")[:200])
    path: str = scope["path"]
    if "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        raise errors.invalid_path(path[:200])
    tail = path[3:]
    if "//" in tail or tail.endswith("/") or not dialect.serves(tail, runtime.config):
        raise errors.unknown_url(scope["method"], path[:200])
    if _PATH_CHARS.fullmatch(path) is None:
        # The server decoded the path once and the upstream URL is built from it as is:
        # a decoded `?` or `#` would start a query or a fragment there, `%252e` would reach
        # the upstream as `%2e` (a dot-segment to a server that decodes), and a space or a
        # control character would break the request line.
        raise errors.invalid_path(raw.decode("latin-1")[:200])
    return tail


# RFC 3986 path characters (unreserved, sub-delims, ":", "@", "/"): nothing that means
# something else in a URL once decoded, nothing a request line cannot carry.
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


def refuse_content_encoding(headers: list[tuple[bytes, bytes]]) -> None:
    """The body is read as JSON and never sent on with the client's encoding header: a
    compressed body is refused here, not forwarded for the upstream to choke on (its 5xx
    would count against the backend for everyone)."""
    encoding = header_value(headers, b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
        raise errors.unsupported_encoding(encoding.decode("latin-1")[:50])


_REQUEST_ID_OK = re.compile(rb"[\x21-\x7e]{1,128}")


def client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's X-Request-Id when it is short and printable; else the proxy makes one."""
    value = header_value(headers, REQUEST_ID)
    if value is None or not _REQUEST_ID_OK.fullmatch(value):
        return None
    return value.decode("ascii")


_ID_PREFIX = "req_" + os.urandom(6).hex()  # random per process: unique across replicas
_id_counter = itertools.count(1)


def new_request_id() -> str:
    # A counter, not os.urandom per request: a syscall on every request showed in profiles.
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


def _routing_headers(
    backend: str, model: str, key_id: str | None, attempts: int
) -> list[tuple[bytes, bytes]]:
    headers = [(b"x-proxy-backend", backend.encode()), (b"x-proxy-model", model.encode())]
    if key_id is not None:
        headers.append((b"x-proxy-key", key_id.encode()))
    headers.append((b"x-proxy-attempts", _ATTEMPTS[attempts] if attempts < 16 else b"16"))
    return headers


_ATTEMPTS = [str(n).encode() for n in range(16)]


def _count_stream(ctx: RequestContext, result: RelayResult) -> None:
    """A stream's tokens: its usage when whole; what is known of a cut one (or of a whole
    one that reported none), the completion estimated from the text seen when no count of
    it came (``partial`` in the log)."""
    counts = token_counts(result.usage)
    if result.complete and (result.usage is not None or not result.text_bytes):
        ctx.counted(counts)
    elif counts.completion == 0:
        ctx.counted(counts._replace(completion=result.estimated_completion()), partial=True)
    else:
        ctx.counted(counts, partial=True)


async def _cancel_on_disconnect(
    receive: Receive,
    ctx: RequestContext,
    work: Awaitable[None],
    body_done: asyncio.Event | None,
    grace: float = 0.0,
) -> None:
    """Run ``work``; cancel it the moment the client disconnects.

    uvicorn's ``send`` silently drops data once the client is gone, so without this an
    abandoned request would go on generating (and costing) upstream until it ends. An
    upload is still being received meanwhile: its own reads see a disconnect until its end.
    """
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> None:
        if body_done is not None:
            await body_done.wait()
        message = await receive()  # after the body: returns on disconnect or response end
        if message["type"] == "http.disconnect" and not ctx.finished:
            ctx.disconnected()
            if ctx.streaming and grace > 0:
                # The upstream answered: read on (sending nothing) for the usage event,
                # which Codex and the SDKs leave before; bounded in time here, in bytes
                # by the relay.
                await asyncio.sleep(grace)
                if ctx.finished:
                    return
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    finally:
        ctx.work_done()
        watcher.cancel()


async def _answer_error(
    runtime: Runtime, send: Send, ctx: RequestContext, err: ProxyError, close: bool = False
) -> None:
    ctx.failed(err.code or err.type, err.status)
    if ctx.response_started:
        return  # too late for a status; streams end with an error event instead
    body = ctx.dialect.error_body(err, ctx.request_id)
    headers = err.raw_headers(body)
    headers.append((REQUEST_ID, ctx.request_id.encode("latin-1")))
    if close and all(name != b"connection" for name, _ in headers):  # the drain's 503 has it
        headers.append((b"connection", b"close"))
    if ctx.backend is not None and runtime.config.server.routing_headers:
        # The backend and key last tried (a fallback's, when it came to that).
        headers += _routing_headers(ctx.backend, ctx.upstream_model or "", ctx.key, ctx.attempts)
    ctx.head_sent()
    try:
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except (OSError, aiohttp.ClientError):  # the client may be gone already
        pass
