"""Every metric, in one place. The names are a contract: dashboards and alerts use them.

Labels come from the config only (backend names, key ids, client ids, configured model ids
or route patterns), never from a raw client string, so a client cannot grow the series.
With ``--workers N`` prometheus-client's multiprocess mode sums the workers' values; its
directory must be set (``PROMETHEUS_MULTIPROC_DIR``) before this module is imported.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from proxy import __version__

if TYPE_CHECKING:
    from proxy.context import RequestContext

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise

# 5 ms ... 10 min: an embedding answers in milliseconds, a long generation in minutes.
LLM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

REQUESTS = Counter(
    "llm_proxy_requests",
    "Requests answered, by client, backend, model, status, stream, endpoint (the wire "
    "dialect: openai, anthropic) and upstream_wire (native, or the wire a request was "
    "translated to: chat).",
    ["client", "backend", "model", "status", "stream", "endpoint", "upstream_wire"],
)
DRAINED = Counter(
    "llm_proxy_drained",
    "Requests (streams, answers, Realtime sessions) still in flight at the end of a "
    "shutdown's server.drain_timeout, and ended then.",
)
DURATION = Histogram(
    "llm_proxy_request_duration_seconds",
    "Time from request in to the last byte out.",
    ["backend", "model", "stream"],
    buckets=LLM_BUCKETS,
)
TTFT = Histogram(
    "llm_proxy_time_to_first_token_seconds",
    "Streams: time from request in to the upstream's first data: event.",
    ["backend", "model"],
    buckets=LLM_BUCKETS,
)
OVERHEAD = Histogram(
    "llm_proxy_overhead_seconds",
    "Time the proxy itself adds: request in to upstream request out, plus upstream "
    "first byte to client first byte.",
    buckets=OVERHEAD_BUCKETS,
)
TOKENS = Counter(
    "llm_proxy_tokens",
    "Tokens reported in the upstream's usage, by type: prompt, completion, cached (of prompt, "
    "read from a prompt cache), reasoning (of completion), cache_creation and cache_read "
    "(Anthropic's cache counts), cache_creation_1h (of cache_creation: written for an hour).",
    ["client", "backend", "model", "type"],
)
COST = Counter(
    "llm_proxy_cost_usd",
    "USD spent, from the upstream's reported usage and the price table (the shipped one and "
    "the config's pricing:), by client, backend and model.",
    ["client", "backend", "model"],
)
UNPRICED = Counter(
    "llm_proxy_unpriced_requests",
    "Requests with tokens whose model has no price (add it under pricing:): their cost is "
    "unknown, not $0.",
    ["backend", "model"],
)
PARTIAL_TOKENS = Counter(
    "llm_proxy_partial_tokens",
    "The part of llm_proxy_tokens_total counted from streams cut mid-way (the tokens=partial "
    "log lines): the counts they reported, and completion estimated as text bytes / 4 where "
    "none came.",
    ["backend", "model", "type"],
)
STREAMS_ACTIVE = Gauge(
    "llm_proxy_streams_active",
    "Streams being relayed now.",
    ["backend"],
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter(
    "llm_proxy_upstream_errors",
    "Failed upstream attempts, by kind: connect, timeout, redirect, bad_status, status_4xx, "
    "status_429, status_5xx, body_broken, stream_broken.",
    ["backend", "key", "kind"],
)
STALE_CONNECTIONS = Counter(
    "llm_proxy_upstream_stale_connections",
    "Requests sent again on another connection because the pooled one was found closed by "
    "the upstream before any byte of the request went out (its keep-alive ended first).",
    ["backend"],
)
THROTTLED = Counter(
    "llm_proxy_throttled",
    "Requests the proxy refused itself, by reason: reconnect, client_rate_limit, "
    "backend_rate_limit, circuit_open.",
    ["reason"],
)
KEY_USABLE = Gauge(
    "llm_proxy_key_usable",
    "1 when the key can be picked, 0 when it is missing, invalid or cooling down.",
    ["backend", "key"],
    multiprocess_mode="livemin",
)
CIRCUIT_OPEN = Gauge(
    "llm_proxy_circuit_open",
    "1 while the backend's circuit breaker is open or half-open.",
    ["backend"],
    multiprocess_mode="livemax",
)
CONFIG_RELOADS = Counter(
    "llm_proxy_config_reloads", "Config reloads, by result (success, failure).", ["result"]
)
STORAGE_ERRORS = Counter(
    "llm_proxy_storage_errors",
    "Throttle storage (Redis) operations that failed; limits fail open meanwhile.",
)
# Realtime (WebSocket) sessions: seconds to hours.
SESSION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
DEPLOYMENT_SELECTIONS = Counter(
    "llm_proxy_deployment_selections",
    "Attempts sent to each deployment of a route's pool (backend/model, from the config).",
    ["deployment"],
)
DEPLOYMENT_IN_FLIGHT = Gauge(
    "llm_proxy_deployment_in_flight",
    "Requests a pool deployment is answering now.",
    ["deployment"],
    multiprocess_mode="livesum",
)
DEPLOYMENT_LATENCY = Gauge(
    "llm_proxy_deployment_latency_seconds",
    "A pool deployment's latency estimate (peak EWMA of time to first token or duration), "
    "as the latency strategy sees it now.",
    ["deployment"],
    multiprocess_mode="livemax",
)
REALTIME_SESSIONS = Gauge(
    "llm_proxy_realtime_sessions_active",
    "Realtime WebSocket sessions being relayed now.",
    ["backend"],
    multiprocess_mode="livesum",
)
REALTIME_DURATION = Histogram(
    "llm_proxy_realtime_session_duration_seconds",
    "Realtime sessions: from the accepted handshake to the close.",
    ["backend", "model"],
    buckets=SESSION_BUCKETS,
)
REALTIME_FRAMES = Counter(
    "llm_proxy_realtime_frames",
    "Realtime WebSocket messages relayed, by direction (client_to_upstream, upstream_to_client).",
    ["backend", "model", "direction"],
)
REALTIME_BYTES = Counter(
    "llm_proxy_realtime_bytes",
    "Realtime WebSocket payload bytes relayed, by direction (client_to_upstream, "
    "upstream_to_client).",
    ["backend", "model", "direction"],
)
BUILD_INFO = Gauge(
    "llm_proxy_build_info", "The proxy's version.", ["version"], multiprocess_mode="livemax"
)
BUILD_INFO.labels(__version__).set(1)
for _result in ("success", "failure"):
    CONFIG_RELOADS.labels(_result)  # present at 0 from the start, for rate() and alerts


class _Children:
    """``metric.labels(...)`` costs a lock and validation; reuse each child once made."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self.cache.get(labels)
        if child is None:
            child = self.cache[labels] = self.metric.labels(*labels)
        return child


requests_child = _Children(REQUESTS)
duration_child = _Children(DURATION)
ttft_child = _Children(TTFT)
tokens_child = _Children(TOKENS)
cost_child = _Children(COST)
unpriced_child = _Children(UNPRICED)
partial_tokens_child = _Children(PARTIAL_TOKENS)
streams_child = _Children(STREAMS_ACTIVE)
errors_child = _Children(UPSTREAM_ERRORS)
throttled_child = _Children(THROTTLED)

realtime_sessions_child = _Children(REALTIME_SESSIONS)
realtime_frames_child = _Children(REALTIME_FRAMES)
realtime_bytes_child = _Children(REALTIME_BYTES)


def drained(count: int) -> None:
    DRAINED.inc(count)


def observe_request(record: RequestContext) -> None:
    """Count one finished request: called once, after the last byte, off the byte path."""
    backend = record.backend or "none"
    model = record.model_label
    stream = "true" if record.stream else "false"
    client = record.client_label
    wire = record.upstream_wire or "native"
    requests_child(
        client, backend, model, str(record.status), stream, record.dialect.name, wire
    ).inc()
    if record.throttle_reason is not None:
        throttled_child(record.throttle_reason).inc()
    for attempt in record.attempt_errors:
        errors_child(*attempt).inc()
    if record.sent_at is None:
        return  # never reached an upstream: no latency or token figures to add
    duration_child(backend, model, stream).observe(time.perf_counter() - record.started)
    if record.ttft is not None:
        ttft_child(backend, model).observe(record.ttft)
    if record.overhead is not None:
        OVERHEAD.observe(record.overhead)
    tokens = record.tokens.nonzero()
    for kind, count in tokens:
        tokens_child(client, backend, model, kind).inc(count)
        if record.tokens_partial:
            partial_tokens_child(backend, model, kind).inc(count)
    if tokens:
        if record.cost is None:
            unpriced_child(backend, model).inc()
        elif record.cost:
            cost_child(client, backend, model).inc(record.cost)


def observe_realtime_session(record: RequestContext, seconds: float) -> None:
    """Count one Realtime session that was accepted, once it ended: a 101 answer and its
    length. Its tokens were counted as each ``response.done`` came (``count_tokens``): a
    session may last an hour, the token panels must not wait for its end."""
    backend = record.backend or "none"
    labels = (record.client_label, backend, record.model_label, "101", "true", record.dialect.name)
    requests_child(*labels, "native").inc()
    for attempt in record.attempt_errors:
        errors_child(*attempt).inc()
    REALTIME_DURATION.labels(backend, record.model_label).observe(seconds)


def count_tokens(
    client: str, backend: str, model: str, prompt: int, completion: int, cost: float | None
) -> None:
    """A Realtime response's tokens and cost, counted as it ends."""
    if prompt:
        tokens_child(client, backend, model, "prompt").inc(prompt)
    if completion:
        tokens_child(client, backend, model, "completion").inc(completion)
    if prompt or completion:
        if cost is None:
            unpriced_child(backend, model).inc()
        elif cost:
            cost_child(client, backend, model).inc(cost)


def exposition() -> tuple[bytes, str]:
    """The text a scrape gets: this process's metrics, or every worker's summed."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def set_key_states(states: Iterable[tuple[str, str, bool]]) -> None:
    for backend, key, usable in states:
        KEY_USABLE.labels(backend, key).set(1 if usable else 0)


def set_deployment_states(states: Iterable[tuple[str, int, int, float]]) -> None:
    """Per deployment: attempts since the last call, in flight now, latency estimate."""
    for name, new_selections, in_flight, latency in states:
        if new_selections:
            DEPLOYMENT_SELECTIONS.labels(name).inc(new_selections)
        DEPLOYMENT_IN_FLIGHT.labels(name).set(in_flight)
        DEPLOYMENT_LATENCY.labels(name).set(latency)


def set_circuit_states(states: Iterable[tuple[str, bool]]) -> None:
    for backend, is_open in states:
        CIRCUIT_OPEN.labels(backend).set(1 if is_open else 0)


def worker_exit() -> None:
    """Drop this worker's live gauges from the sums (multiprocess mode)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
