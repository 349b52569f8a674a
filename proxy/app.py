"""The ASGI application.

``POST /v1/...`` goes straight to the forwarding pipeline (pure ASGI, nothing buffered, no
middleware stack); the few cold endpoints (``/health``, ``/v1/models``) use Starlette's
router. The lifespan opens the upstream connection pools and closes them again.

``/metrics`` and ``/admin/*`` are internal: with ``server.admin_port`` set they answer only
on that listener (404 on the main port; see ``proxy.server``), otherwise on the main port:
there, with ``clients:`` configured, only with ``server.admin_key`` (``/admin/status``
always needs it). The shipped nginx config passes only ``/v1/`` and ``/health``.
With ``clients:`` configured, ``/v1/models`` needs a client key and lists only the models
that client may use.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import hmac
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from proxy import admin, errors, forward, metrics, realtime
from proxy.access_log import AccessLog
from proxy.clients import Client
from proxy.config import Config, load_config
from proxy.dialects import DEFAULT, Dialect, bearer_token, for_request
from proxy.dialects.translate import reaches
from proxy.drain import DRAIN
from proxy.errors import ProxyError
from proxy.exposure import BIND_HOST_ENV, refusal
from proxy.forward import Message, Receive, Scope, Send
from proxy.headers import REQUEST_ID, header_value
from proxy.pricing import TABLE_SOURCE
from proxy.reload import Reloader
from proxy.runtime import Runtime, build_runtime

log = logging.getLogger("proxy")

ORPHAN_CHECK_INTERVAL = 1.0
PR_SET_PDEATHSIG = 1  # prctl(2)

# How `proxy serve --workers N` hands its options to the worker processes.
CONFIG_ENV = "PROXY_CONFIG"
LOG_FORMAT_ENV = "PROXY_LOG_FORMAT"
ADMIN_PORT_ENV = "PROXY_ADMIN_PORT"  # `serve --admin-port`, over server.admin_port
SUPERVISOR_ENV = "PROXY_SUPERVISOR_PID"  # so a worker knows whose child it must be

Endpoint = Callable[[Request], Awaitable[Response]]


class ProxyApp:
    def __init__(self, config: Config, log_format: str = "text") -> None:
        self.runtime: Runtime = build_runtime(config)
        self.access_log = AccessLog(fmt=log_format)
        bind_host = os.environ.get(BIND_HOST_ENV)
        self.reloader = Reloader(
            config.path,
            lambda: self.runtime,
            self._swap,
            gate=lambda new: _reload_refusal(new, bind_host),
        )
        self._watch: asyncio.Task[None] | None = None
        self._orphan_watch: asyncio.Task[None] | None = None
        self.supervisor: int | None = None  # a worker's supervisor pid (--workers N)
        # Listeners are bound once: a reload cannot move the internal endpoints.
        self.admin_port = config.server.admin_port
        self.cold = Router(
            routes=[
                _route("/health", self.health, "GET"),
                _route("/ready", self.ready, "GET"),
                _route("/metrics", self._internal(self.metrics), "GET"),
                _route("/admin/status", self._internal(self.admin_status), "GET"),
                _route("/admin/usage", self._internal(self.admin_usage), "GET"),
                _route("/v1/models", self.list_models, "GET"),
                _route("/v1/models/{model_id:path}", self.get_model, "GET"),
            ],
            default=self.not_found,
            redirect_slashes=False,  # /health/ is 404, never a redirect to somewhere else
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith("/v1/") and not self._answered_here(scope):
                # One snapshot per request: a reload never changes a request half-way.
                runtime = self.runtime
                runtime.state.in_flight += 1
                task = _tracked(DRAIN.tasks)
                try:
                    await forward.handle(runtime, self.access_log, scope, receive, send)
                finally:
                    runtime.state.in_flight -= 1
                    DRAIN.tasks.discard(task)
            else:
                await self.cold(scope, receive, _with_request_id(scope, send))
        elif scope["type"] == "websocket":  # GET /v1/realtime (the only WebSocket endpoint)
            runtime = self.runtime
            runtime.state.in_flight += 1  # a reload keeps this snapshot's pools until it ends
            task = _tracked(DRAIN.sessions)
            try:
                await realtime.handle_websocket(runtime, self.access_log, scope, receive, send)
            finally:
                runtime.state.in_flight -= 1
                DRAIN.sessions.discard(task)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.start()
                    self.runtime.report()
                    self.reloader.install_signal_handler()
                    DRAIN.install(lambda: self.runtime.config.server.drain_timeout)
                    if self.runtime.config.server.config_poll_interval > 0:
                        self.reloader.interval = self.runtime.config.server.config_poll_interval
                        self._watch = asyncio.create_task(self.reloader.watch())
                    if self.supervisor is not None:
                        self._orphan_watch = asyncio.create_task(_exit_with(self.supervisor))
                    _freeze_start_up_objects()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for task in (self._watch, self._orphan_watch):
                    if task is not None:
                        task.cancel()
                await self.runtime.close()
                self.access_log.flush()
                metrics.worker_exit()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _answered_here(self, scope: Scope) -> bool:
        """The proxy's own model list, and the models it lists; any other ``/models/{id}``
        (a fine-tuned model to retrieve or delete) goes to the backend that routes it."""
        path: str = scope["path"]
        if path == "/v1/models":
            return True
        if not path.startswith("/v1/models/") or scope["method"] not in ("GET", "HEAD"):
            return False
        if header_value(scope["headers"], b"anthropic-version") is not None:
            return True  # Anthropic's API has no fine-tuned models: the list is all there is
        model_id = path.removeprefix("/v1/models/")
        runtime = self.runtime
        return model_id in runtime.router.listed or any(
            model_id in ids for ids in runtime.discovered.values()
        )

    def _swap(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # ------------------------------------------------------------ cold endpoints

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Ready when the config is loaded and at least one backend can serve: a usable key,
        a closed circuit, and seen answering since it was configured."""
        if DRAIN.draining:  # shutting down: out of the endpoints at once
            return JSONResponse({"ready": False, "draining": True, "backends": []}, 503)
        runtime = self.runtime
        serving = [
            name
            for name, pool in runtime.pools.items()
            if pool.usable()
            and not runtime.breakers[name].is_open
            and name not in runtime.state.unverified
        ]
        status = 200 if serving else 503
        return JSONResponse({"ready": bool(serving), "backends": serving}, status_code=status)

    def _internal(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` on the admin listener only, when there is one: 404 elsewhere."""

        async def internal(request: Request) -> Response:
            server = request.scope.get("server")
            if self.admin_port is not None and (server is None or server[1] != self.admin_port):
                return await self._not_found_response(request)
            return await endpoint(request)

        return internal

    async def metrics(self, request: Request) -> Response:
        config = self.runtime.config
        if config.clients and self.admin_port is None:
            # Clients share the main port: its metrics (client and key ids, traffic) are
            # the operator's, behind the admin key (none: not served there at all).
            refusal = await self._admin_refusal(request)
            if refusal is not None:
                return refusal
        self.runtime.publish_gauges()
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def admin_status(self, request: Request) -> Response:
        refusal = await self._admin_refusal(request)
        if refusal is not None:
            return refusal
        return JSONResponse(admin.status(self.runtime))

    async def admin_usage(self, request: Request) -> Response:
        """Per client with a budget or tpm: each window's spend, reservations and what is
        left (JSON); the price table's source."""
        refusal = await self._admin_refusal(request)
        if refusal is not None:
            return refusal
        runtime = self.runtime
        spend = runtime.spend
        clients = await spend.usage(runtime.throttle.guarded) if spend is not None else {}
        return JSONResponse({"prices": TABLE_SOURCE, "clients": clients})

    async def _admin_refusal(self, request: Request) -> Response | None:
        """None when the request carries the admin key; else 404 (no admin key configured:
        the page does not exist) or 401."""
        admin_key = self.runtime.config.server.admin_key
        if not admin_key:
            return await self._not_found_response(request)
        presented = bearer_token(request.headers.raw) or ""
        if hmac.compare_digest(presented.encode(), admin_key.encode()):
            return None
        return error_response(
            ProxyError(
                401,
                "Admin key required: 'Authorization: Bearer <admin_key>'.",
                code="invalid_api_key",
            )
        )

    async def _not_found_response(self, request: Request) -> Response:
        return error_response(errors.unknown_url(request.method, request.url.path))

    async def list_models(self, request: Request) -> Response:
        """OpenAI's list; Anthropic's shape when the request has ``anthropic-version``
        (the Anthropic SDK always sends it)."""
        runtime = self.runtime
        dialect = _models_dialect(request)
        models = self._visible_models(runtime, request, dialect)
        if isinstance(models, Response):
            return models
        return JSONResponse(dialect.models_page(list(models.items())))

    def _visible_models(
        self, runtime: Runtime, request: Request, dialect: Dialect
    ) -> dict[str, str] | Response:
        """The models the request's client may see (in another dialect, only those routed
        to a backend that speaks it), or the refusal of its key."""
        try:
            client = runtime.auth.authenticate(request.headers.raw, dialect)
        except ProxyError as err:
            return error_response(err, dialect)
        models = self._models(runtime, client)
        if dialect.every_backend_speaks:
            return models
        return {i: o for i, o in models.items() if _spoken(runtime, i, dialect)}

    def _models(self, runtime: Runtime, client: Client | None) -> dict[str, str]:
        """Aliases and listed models from the config, then each backend's discovered ids
        (id: owner); with client keys, only those the client may use (the rule of the POST
        path)."""
        models = {e.id: e.owned_by for e in runtime.router.models}
        for backend, ids in runtime.discovered.items():
            for model_id in ids:
                models.setdefault(model_id, backend)
        if client is None or client.models is None:
            return models
        return {i: m for i, m in models.items() if _may_use(runtime, client, i)}

    async def get_model(self, request: Request) -> Response:
        runtime = self.runtime
        dialect = _models_dialect(request)
        models = self._visible_models(runtime, request, dialect)
        if isinstance(models, Response):
            return models
        model_id = request.path_params["model_id"]
        owner = models.get(model_id)
        if owner is not None:
            return JSONResponse(dialect.model_object(model_id, owner))
        # A model the client may not use is "not listed" to it: nothing to learn from a 403.
        return error_response(
            errors.model_not_found(f"The model '{model_id}' is not listed by this proxy."),
            dialect,
        )

    async def not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(errors.unknown_url(scope["method"], scope["path"]))
        await response(scope, receive, send)


def _with_request_id(scope: Scope, send: Send) -> Send:
    """Every response carries an ``x-request-id``: the client's, or a new one."""
    request_id = header_value(scope["headers"], REQUEST_ID) or forward.new_request_id().encode()

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
        await send(message)

    return send_with_id


def _tracked(tasks: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
    """The request's task, known to the drain (which waits for it, then ends it)."""
    task = asyncio.current_task()
    assert task is not None  # an ASGI call always runs in a task
    tasks.add(task)
    return task


def with_admin_port(config: Config, port: int) -> Config:
    """``config`` with its internal endpoints on ``port`` (``serve --admin-port``)."""
    return dataclasses.replace(config, server=dataclasses.replace(config.server, admin_port=port))


def error_response(err: ProxyError, dialect: Dialect = DEFAULT) -> Response:
    body = dialect.error_body(err, "")
    headers, media_type = err.headers, "application/json"
    return Response(body, status_code=err.status, headers=headers, media_type=media_type)


def _spoken(runtime: Runtime, model_id: str, dialect: Dialect) -> bool:
    """``model_id`` is routed, in ``dialect``, to a backend that speaks it."""
    target = runtime.router.resolve(model_id, dialect)
    return target is not None and reaches(dialect, runtime.config.backends[target.backend])


def _models_dialect(request: Request) -> Dialect:
    return for_request(request.url.path, request.headers.raw)


class _Route(Route):
    """Starlette's route, answering other methods with an OpenAI-shaped 405 (Starlette's
    is plain text)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            allow = ", ".join(sorted(self.methods))
            err = errors.method_not_allowed(scope["method"], scope["path"], allow)
            await error_response(err)(scope, receive, send)
            return
        await super().handle(scope, receive, send)


def _route(path: str, endpoint: Endpoint, *methods: str) -> Route:
    return _Route(path, endpoint, methods=list(methods))  # GET brings HEAD, as in Starlette


def _reload_refusal(config: Config, bind_host: str | None) -> str | None:
    """A reload must not turn a closed listener open (one log line: no newlines)."""
    refused = refusal(config, bind_host) if bind_host is not None else None
    return " ".join(refused.split()) if refused is not None else None


def _may_use(runtime: Runtime, client: Client, model_id: str) -> bool:
    target = runtime.router.resolve(model_id)
    try:
        runtime.auth.check_model(client, model_id, target.model if target else model_id)
    except ProxyError:
        return False
    return True


def create_app() -> ProxyApp:
    """Factory for uvicorn workers: the config path comes from ``$PROXY_CONFIG``."""
    config = load_config(os.environ.get(CONFIG_ENV, "config.yaml"))
    admin_port = os.environ.get(ADMIN_PORT_ENV)
    if admin_port:
        config = with_admin_port(config, int(admin_port))
    logging.captureWarnings(True)  # in each worker too: warnings become (JSON) log records
    app = ProxyApp(config, log_format=os.environ.get(LOG_FORMAT_ENV, "text"))
    app.supervisor = int(os.environ.get(SUPERVISOR_ENV) or os.getppid())
    _terminate_with_parent()
    if os.getppid() != app.supervisor:  # it died before the line above could take effect
        os.kill(os.getpid(), signal.SIGTERM)
    return app


def _terminate_with_parent() -> None:
    """Linux: the kernel sends this worker SIGTERM when its supervisor dies, whatever the
    worker is doing (starting up included). Elsewhere the lifespan's polling does it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return


async def _exit_with(supervisor: int) -> None:
    """A worker whose supervisor is gone (killed with SIGKILL, say) shuts itself down:
    nobody would ever stop it, and it would hold the port and its memory for good."""
    while os.getppid() == supervisor:
        await asyncio.sleep(ORPHAN_CHECK_INTERVAL)
    log.warning("the supervisor (pid %d) is gone: this worker shuts down", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown: streams may finish


def _freeze_start_up_objects() -> None:
    """What start-up made (modules, config, router, pools: ~70 k objects) lives as long as
    the process: moved out of the collector's sight, so that no collection walks it again.
    A full collection walked all of it (30+ ms, every request waiting), and the young
    generations' collections, which age objects into it, cost ~30 µs per request more."""
    gc.collect()
    gc.freeze()
