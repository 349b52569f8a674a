"""OpenTelemetry traces and GenAI metrics, exported over OTLP/HTTP (optional).

Off unless the config names ``telemetry.otlp_endpoint``; then ``opentelemetry-sdk`` and its
OTLP/HTTP exporter must be installed (``pip install 'llm-proxy[otel]'``). Off, nothing here
is imported and a request pays one ``is None`` test per hook (``RequestContext.trace``).

On, each request is one SERVER span named for its GenAI operation and model (``chat
gpt-4o``), continuing the client's ``traceparent``; each upstream call is a CLIENT child
span whose ``traceparent`` goes upstream with the call. The GenAI metrics (token usage,
request duration, time to first token, time per output token) are recorded as the request
ends. Spans and metrics leave from the SDK's own export threads, in batches, never on the
event loop; its queues are bounded (a collector that is down loses spans, never memory).

What goes into a span is what the access log writes: ids (client, key *id*, backend,
deployment), never a secret, never a prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer
    from yarl import URL

    from proxy.config import BackendConfig, TelemetryConfig
    from proxy.context import RequestContext
    from proxy.routing import Target

log = logging.getLogger("proxy.telemetry")


class GenAI:
    """Every name the proxy's spans and metrics use, in one table: the GenAI semantic
    conventions are still in development (semantic-conventions v1.41 ``gen-ai-spans.md``
    and ``gen-ai-metrics.md``; since v1.42 in semantic-conventions-genai), so a renamed
    attribute is a change here only."""

    OPERATION = "gen_ai.operation.name"
    PROVIDER = "gen_ai.provider.name"
    REQUEST_MODEL = "gen_ai.request.model"
    REQUEST_STREAM = "gen_ai.request.stream"
    RESPONSE_MODEL = "gen_ai.response.model"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"  # includes the cached ones
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
    CACHE_CREATION_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
    REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
    TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
    TOKEN_TYPE = "gen_ai.token.type"
    SERVER_ADDRESS = "server.address"
    SERVER_PORT = "server.port"
    ERROR_TYPE = "error.type"
    HTTP_METHOD = "http.request.method"
    HTTP_STATUS = "http.response.status_code"
    URL_PATH = "url.path"
    # The proxy's own, beside the conventions' (what the access log calls them).
    REQUEST_ID = "llm_proxy.request_id"
    CLIENT = "llm_proxy.client"
    BACKEND = "llm_proxy.backend"
    KEY = "llm_proxy.key"
    DEPLOYMENT = "llm_proxy.deployment"
    ATTEMPTS = "llm_proxy.attempts"
    COST = "llm_proxy.cost_usd"

    # Metrics, with the conventions' bucket advice.
    TOKEN_USAGE = "gen_ai.client.token.usage"
    REQUEST_DURATION = "gen_ai.server.request.duration"
    TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
    TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
    TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
    DURATION_BUCKETS = (
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92
    )  # fmt: skip
    TTFT_BUCKETS = (
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
    )  # fmt: skip
    TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

    # The operation, by the path the client called (within its dialect's /v1).
    OPERATIONS: Mapping[str, str] = {
        "/v1/chat/completions": "chat",
        "/v1/completions": "text_completion",
        "/v1/embeddings": "embeddings",
        "/v1/responses": "chat",
        "/v1/messages": "chat",
        "/v1/realtime": "chat",
    }
    # gen_ai.provider.name by the backend's host (the conventions' well-known values where
    # they have one); a backend's `provider:` overrides, an unknown host is its own name.
    PROVIDERS: Mapping[str, str] = {
        "api.openai.com": "openai",
        "api.anthropic.com": "anthropic",
        "api.moonshot.ai": "moonshot_ai",
        "api.moonshot.cn": "moonshot_ai",
        "api.deepseek.com": "deepseek",
        "api.groq.com": "groq",
        "api.mistral.ai": "mistral_ai",
        "api.x.ai": "x_ai",
        "api.perplexity.ai": "perplexity",
        "api.cohere.com": "cohere",
        "generativelanguage.googleapis.com": "gcp.gemini",
        "openrouter.ai": "openrouter",
        "api.together.xyz": "together_ai",
        "api.fireworks.ai": "fireworks_ai",
    }
    PROVIDER_SUFFIXES: Mapping[str, str] = {
        ".openai.azure.com": "azure.ai.openai",
        ".services.ai.azure.com": "azure.ai.inference",
    }


EXPORT_TIMEOUT = 5.0  # seconds an export may take, its retries included (SDK default: 10)
CLOSE_WAIT = 2.0  # at exit, seconds the collector has to take what is left
CLOSE_WAIT_MS = int(CLOSE_WAIT * 1000)
_MAX_TRACESTATE = 512  # bytes of a client's tracestate kept (W3C: 32 members, 512 is usual)
_MAX_REASON = 100  # characters of a collector's reason phrase kept (it is logged)
_LEFT = ("client_disconnected", "client_left_after_end")  # the client's doing
_MAX_MODEL = 256
_MAX_PATH = 512  # a model name the client sent, as far as a span shows it


@functools.lru_cache(maxsize=256)
def provider_name(backend: str, base_url: str, declared: str | None) -> str:
    """``gen_ai.provider.name`` of a backend: declared, known by its host, or its name."""
    if declared:
        return declared
    host = (urlsplit(base_url).hostname or "").lower()
    known = GenAI.PROVIDERS.get(host)
    if known is not None:
        return known
    for suffix, name in GenAI.PROVIDER_SUFFIXES.items():
        if host.endswith(suffix):
            return name
    return backend


@functools.lru_cache(maxsize=256)  # the config's URLs: parsed once, not per request
def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


class Telemetry:
    """The SDK's providers for one process, built at start-up, closed (flushed) at exit."""

    def __init__(
        self,
        config: TelemetryConfig,
        forward_paths: Iterable[str] = (),
        span_processor: SpanProcessor | None = None,
    ) -> None:
        """``forward_paths``: the resources span names may show (``/v1/files``);
        ``span_processor``: instead of the OTLP batch export (tests)."""
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise RuntimeError(
                f"telemetry.otlp_endpoint is set, but OpenTelemetry is not installed ({exc}):"
                " pip install 'llm-proxy[otel]'"
            ) from None
        # The SDK warns, per request, with what a client's tracestate held, and per retry of
        # an export: its errors are enough (a collector down), never a client's text.
        logging.getLogger("opentelemetry").setLevel(logging.ERROR)
        self.config = config
        self.resources = frozenset(p.split("/")[1] for p in forward_paths if p.startswith("/"))
        endpoint = config.otlp_endpoint
        assert endpoint is not None
        resource = Resource.create({"service.name": config.service_name})
        sampler = ParentBased(TraceIdRatioBased(config.sample_ratio))
        # No atexit hook: at exit the SDK would wait for a collector for as long as it
        # likes; close() waits a bounded time instead.
        self.tracer_provider: TracerProvider = TracerProvider(
            resource=resource, sampler=sampler, span_limits=_span_limits(), shutdown_on_exit=False
        )
        self._exporters: list[Any] = [
            OTLPSpanExporter(
                endpoint=f"{endpoint}/v1/traces", timeout=EXPORT_TIMEOUT, session=_session()
            )
        ]
        self.tracer_provider.add_span_processor(
            span_processor or BatchSpanProcessor(self._exporters[0])
        )
        self.tracer: Tracer = self.tracer_provider.get_tracer("llm-proxy")
        self.propagator = TraceContextTextMapPropagator()
        readers = []
        if config.metrics:
            exporter = OTLPMetricExporter(
                endpoint=f"{endpoint}/v1/metrics", timeout=EXPORT_TIMEOUT, session=_session()
            )
            self._exporters.append(exporter)
            readers.append(PeriodicExportingMetricReader(exporter))
        self.meter_provider: MeterProvider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
        meter = self.meter_provider.get_meter("llm-proxy")

        def histogram(name: str, unit: str, text: str, buckets: Iterable[float]) -> Histogram:
            return meter.create_histogram(
                name, unit=unit, description=text, explicit_bucket_boundaries_advisory=[*buckets]
            )

        self.token_usage = histogram(
            GenAI.TOKEN_USAGE, "{token}", "Tokens used, by type", GenAI.TOKEN_BUCKETS
        )
        self.duration = histogram(
            GenAI.REQUEST_DURATION, "s", "Request duration", GenAI.DURATION_BUCKETS
        )
        self.ttft = histogram(
            GenAI.TIME_TO_FIRST_TOKEN, "s", "Time to the first token", GenAI.TTFT_BUCKETS
        )
        self.tpot = histogram(
            GenAI.TIME_PER_OUTPUT_TOKEN, "s", "Time per output token after the first",
            GenAI.TPOT_BUCKETS,
        )  # fmt: skip

    def start(self, ctx: RequestContext, headers: Iterable[tuple[bytes, bytes]]) -> RequestTrace:
        """The request's span, begun now, continuing the client's trace if it sent one
        (``trust_client_trace: false``: a new trace, linked to the client's)."""
        from opentelemetry.trace import Link, SpanKind, get_current_span

        parent, links = None, None
        carrier = _trace_headers(headers)
        if carrier:
            context = self.propagator.extract(carrier)
            if not self.config.trust_client_trace:
                client = get_current_span(context).get_span_context()
                parent, links = None, [Link(client)] if client.is_valid else None
            else:
                parent = context
        span = self.tracer.start_span(
            self.span_name(ctx.method, ctx.path),  # renamed for its operation in finish()
            context=parent,
            kind=SpanKind.SERVER,
            attributes={GenAI.HTTP_METHOD: ctx.method, GenAI.URL_PATH: ctx.path[:_MAX_PATH]},
            links=links,
        )
        return RequestTrace(self, span)

    def span_name(self, method: str, path: str) -> str:
        """``GET /v1/files``: a resource the proxy forwards, never an id, never what a
        client made up (span names must be few); anything else is its method alone."""
        parts = path.split("/", 3)
        if len(parts) > 2 and parts[1] == "v1" and parts[2] in self.resources:
            return f"{method} /v1/{parts[2]}"
        return method

    async def close(self) -> None:
        """Flush what is queued and stop the exporters, in at most ``CLOSE_WAIT`` seconds:
        the SDK's own flush ignores its timeout and a collector may never answer. The work
        runs in a thread of its own (never the loop's shared pool, which uploads use); past
        the wait, the exporters are stopped and what is left is dropped."""
        closing = threading.Thread(target=self._flush_and_stop, name="otel-close", daemon=True)
        closing.start()
        deadline = time.monotonic() + CLOSE_WAIT
        while closing.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if closing.is_alive():
            for exporter in self._exporters:
                with contextlib.suppress(Exception):
                    exporter.shutdown()  # ends retries; a hung read ends with its thread

    def _flush_and_stop(self) -> None:
        self.tracer_provider.force_flush(CLOSE_WAIT_MS)
        self.meter_provider.force_flush(CLOSE_WAIT_MS)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(CLOSE_WAIT_MS)


def _span_limits() -> Any:
    """Bounds on each span, whatever a request carried (the SDK has none by default on
    attribute lengths)."""
    from opentelemetry.sdk.trace import SpanLimits

    return SpanLimits(max_attributes=64, max_attribute_length=1024, max_links=1, max_events=8)


def _session() -> Any:
    """The exporters' HTTP session: a collector's answer is its status; its body is never
    read (a hostile one could be gigabytes) and its reason phrase is cut short (it is
    logged)."""
    import requests  # the OTLP/HTTP exporter's own dependency

    class CappedSession(requests.Session):
        def request(  # type: ignore[override]  # the exporter passes keywords only
            self, method: str, url: str, **kwargs: Any
        ) -> requests.Response:
            kwargs["stream"] = True
            response = super().request(method, url, **kwargs)
            response._content = b""
            response.close()
            response.reason = (response.reason or "")[:_MAX_REASON]
            return response

    return CappedSession()


def _trace_headers(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The client's ``traceparent`` and ``tracestate``, as W3C Trace Context reads them: a
    repeated ``traceparent`` is no parent; repeated ``tracestate`` values are one list;
    a list past ``_MAX_TRACESTATE`` bytes is dropped (it would go upstream, and into every
    span)."""
    parents: list[bytes] = []
    states: list[bytes] = []
    for name, value in headers:
        if name == b"traceparent":
            parents.append(value)
        elif name == b"tracestate":
            states.append(value)
    if len(parents) != 1:
        return {}
    carrier = {"traceparent": parents[0].decode("latin-1")}
    state = b",".join(states)
    if state and len(state) <= _MAX_TRACESTATE:
        carrier["tracestate"] = state.decode("latin-1")
    return carrier


class RequestTrace:
    """One request's spans: its own and the upstream attempt under way."""

    __slots__ = ("_attempt", "_attempt_open", "_telemetry", "span")

    def __init__(self, telemetry: Telemetry, span: Span) -> None:
        self._telemetry = telemetry
        self.span = span
        self._attempt: Span | None = None
        self._attempt_open = False

    def attempt(
        self,
        headers: dict[str, str],
        path: str,
        target: Target,
        key_id: str,
        backend: BackendConfig,
        url: URL,
    ) -> None:
        """An upstream call is about to be sent: its span begins, its ``traceparent`` (and
        the client's ``tracestate``) go into ``headers``."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        self._end_attempt()
        telemetry = self._telemetry
        operation = GenAI.OPERATIONS.get(path)
        model = target.upstream_model
        attributes: dict[str, Any] = {
            GenAI.PROVIDER: provider_name(backend.name, backend.base_url, backend.provider),
            GenAI.SERVER_ADDRESS: url.host or "",
            GenAI.SERVER_PORT: url.port or 0,
            GenAI.BACKEND: target.backend,
            GenAI.KEY: key_id,
        }
        if operation is not None:
            attributes[GenAI.OPERATION] = operation
        if model:
            attributes[GenAI.REQUEST_MODEL] = model
        if target.deployment:
            attributes[GenAI.DEPLOYMENT] = target.deployment
        span = telemetry.tracer.start_span(
            # The route's label, not the id: bounded by the config, whatever a client sends.
            f"{operation} {target.label}" if operation else f"upstream {target.backend}",
            context=set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        telemetry.propagator.inject(headers, context=set_span_in_context(span))
        self._attempt, self._attempt_open = span, True

    def answered(self, status: int) -> None:
        """The upstream call's status (its span ends with the attempt, or the request)."""
        attempt = self._attempt
        if attempt is not None:
            attempt.set_attribute(GenAI.HTTP_STATUS, status)
            if status >= 400:  # an error for a client span (HTTP conventions)
                from opentelemetry.trace import StatusCode

                attempt.set_attribute(GenAI.ERROR_TYPE, str(status))
                attempt.set_status(StatusCode.ERROR)

    def attempt_failed(self, kind: str) -> None:
        """The upstream call failed (``connect``, ``timeout``, ``status_5xx``...): its span
        ends now, marked an error."""
        attempt = self._attempt
        if attempt is not None and self._attempt_open:
            from opentelemetry.trace import StatusCode

            attempt.set_attribute(GenAI.ERROR_TYPE, kind)
            attempt.set_status(StatusCode.ERROR, kind)
            self._end_attempt()

    def _end_attempt(self) -> None:
        if self._attempt is not None and self._attempt_open:
            self._attempt.end()
            self._attempt_open = False

    def finish(self, ctx: RequestContext, backends: Mapping[str, BackendConfig]) -> None:
        """The request ended: its span gets what the request did and ends (with the
        answering attempt's), and the GenAI metrics take their samples."""
        from opentelemetry.trace import StatusCode

        duration = time.perf_counter() - ctx.started
        span = self.span
        operation = GenAI.OPERATIONS.get(ctx.path)
        model = (ctx.model or "")[:_MAX_MODEL]
        if operation is not None:
            # The model's metrics label (a model the config names, else its route's pattern):
            # span names stay few whatever a client sends; the attribute has the model.
            span.update_name(f"{operation} {ctx.model_label}")
            span.set_attribute(GenAI.OPERATION, operation)
        attributes: dict[str, Any] = {
            GenAI.HTTP_STATUS: ctx.status,
            GenAI.REQUEST_ID: ctx.request_id,
            GenAI.REQUEST_STREAM: ctx.stream,
            GenAI.ATTEMPTS: ctx.attempts,
        }
        if model:
            attributes[GenAI.REQUEST_MODEL] = model
        if ctx.client is not None and ctx.client_label != "anonymous":
            attributes[GenAI.CLIENT] = ctx.client
        metric: dict[str, Any] = {GenAI.REQUEST_MODEL: ctx.model_label}
        if operation is not None:
            metric[GenAI.OPERATION] = operation
        config = backends.get(ctx.backend) if ctx.backend is not None else None
        if config is not None:
            provider = provider_name(config.name, config.base_url, config.provider)
            host, port = _address(config.base_url)
            attributes[GenAI.PROVIDER] = metric[GenAI.PROVIDER] = provider
            attributes[GenAI.SERVER_ADDRESS] = metric[GenAI.SERVER_ADDRESS] = host
            attributes[GenAI.SERVER_PORT] = port
            attributes[GenAI.BACKEND] = ctx.backend
        if ctx.key is not None:
            attributes[GenAI.KEY] = ctx.key
        if ctx.deployment is not None:
            attributes[GenAI.DEPLOYMENT] = ctx.deployment
        if ctx.upstream_model is not None and ctx.sent_at is not None:
            attributes[GenAI.RESPONSE_MODEL] = ctx.upstream_model
            if ctx.model_label == ctx.model:  # named by the config: a bounded value
                metric[GenAI.RESPONSE_MODEL] = ctx.upstream_model
        tokens = ctx.tokens
        if tokens:
            attributes[GenAI.INPUT_TOKENS] = tokens.prompt
            attributes[GenAI.OUTPUT_TOKENS] = tokens.completion
            if tokens.cached:
                attributes[GenAI.CACHE_READ_TOKENS] = tokens.cached
            if tokens.cache_creation:  # (the 1-hour writes are among them)
                attributes[GenAI.CACHE_CREATION_TOKENS] = tokens.cache_creation
            if tokens.reasoning:
                attributes[GenAI.REASONING_TOKENS] = tokens.reasoning
        if ctx.ttft is not None:
            attributes[GenAI.TIME_TO_FIRST_CHUNK] = ctx.ttft
        if ctx.cost is not None:
            attributes[GenAI.COST] = ctx.cost
        error = ctx.error if ctx.error != "client_left_after_end" else None
        if error is None and ctx.status >= 500:
            error = str(ctx.status)
        if error is not None:
            attributes[GenAI.ERROR_TYPE] = metric[GenAI.ERROR_TYPE] = error
        span.set_attributes(attributes)
        # A failure of ours or the upstream's, not the client's (a 4xx, or leaving): a
        # 5xx, or an answer under way that broke.
        if ctx.status >= 500 or (error is not None and ctx.status < 400 and error not in _LEFT):
            span.set_status(StatusCode.ERROR, error)
        if error is not None and self._attempt is not None and self._attempt_open:
            self._attempt.set_attribute(GenAI.ERROR_TYPE, error)  # e.g. the client left
        self._end_attempt()
        span.end()
        self._record(ctx, metric, duration, operation)

    def _record(
        self, ctx: RequestContext, metric: dict[str, Any], duration: float, operation: str | None
    ) -> None:
        if operation is None or ctx.sent_at is None:
            return  # not a GenAI operation, or never reached an upstream
        telemetry = self._telemetry
        telemetry.duration.record(duration, metric)
        tokens = ctx.tokens
        if tokens:  # (a cut stream's too, as far as counted: the Prometheus counters agree)
            telemetry.token_usage.record(tokens.prompt, {**metric, GenAI.TOKEN_TYPE: "input"})
            telemetry.token_usage.record(tokens.completion, {**metric, GenAI.TOKEN_TYPE: "output"})
        if ctx.ttft is not None and ctx.stream:
            telemetry.ttft.record(ctx.ttft, metric)
            if tokens.completion > 1 and ctx.error is None:
                telemetry.tpot.record((duration - ctx.ttft) / (tokens.completion - 1), metric)
