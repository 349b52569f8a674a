"""The telemetry module in-process: provider names, the config, and the spans a request
leaves in the edge cases the end-to-end tests do not reach (a stream cut mid-way, a
request refused before any upstream call, a model name a client made huge)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from proxy.config import ConfigError, TelemetryConfig, parse_config
from proxy.context import RequestContext
from proxy.routing import Target
from proxy.telemetry import CLOSE_WAIT, Telemetry, provider_name
from proxy.usage import TokenCounts

CONFIG = """
telemetry: {otlp_endpoint: "http://127.0.0.1:9"}
backends:
  kimi: {base_url: "https://api.moonshot.ai/v1", keys: [{id: k1, key: "sk-aaaaaaaaaaaaaaaaaaaaaa"}]}
"""


@pytest.mark.parametrize(
    ("url", "declared", "expected"),
    [
        ("https://api.openai.com/v1", None, "openai"),
        ("https://api.moonshot.ai/v1", None, "moonshot_ai"),
        ("https://API.Moonshot.CN/v1", None, "moonshot_ai"),
        ("https://api.anthropic.com", None, "anthropic"),
        ("https://team.openai.azure.com/openai", None, "azure.ai.openai"),
        ("http://127.0.0.1:8000/v1", None, "vllm-box"),  # unknown: the backend's name
        ("http://127.0.0.1:8000/v1", "ollama", "ollama"),  # declared wins
    ],
)
def test_the_provider_name_is_declared_known_by_host_or_the_backends_name(url, declared, expected):
    assert provider_name("vllm-box", url, declared) == expected


def test_the_endpoint_and_the_sample_ratio_are_validated():
    bad = CONFIG.replace('"http://127.0.0.1:9"', '"ftp://x"') + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, "t.yaml", {})
    assert "telemetry.otlp_endpoint" in str(caught.value)
    ratio = CONFIG.replace("}\nbackends", ", sample_ratio: 1.5}\nbackends")
    with pytest.raises(ConfigError) as caught:
        parse_config(ratio, "t.yaml", {})
    assert "telemetry.sample_ratio" in str(caught.value)


def test_without_the_package_the_config_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http", None)
    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG, "t.yaml", {})
    assert "pip install 'llm-proxy[otel]'" in str(caught.value)
    assert ":2: telemetry.otlp_endpoint" in str(caught.value)


def traced(**settings: object) -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    config = TelemetryConfig(otlp_endpoint="http://127.0.0.1:9", metrics=False, **settings)
    paths = parse_config(CONFIG, "t.yaml", {}).server.forward_paths
    return Telemetry(config, paths, span_processor=SimpleSpanProcessor(exporter)), exporter


@pytest.fixture
def telemetry() -> Iterator[tuple[Telemetry, InMemorySpanExporter]]:
    found, exporter = traced()
    yield found, exporter
    asyncio.run(found.close())


def backends():
    return parse_config(CONFIG, "t.yaml", {}).backends


def test_a_stream_cut_mid_way_ends_both_spans_as_errors(telemetry):
    tel, exporter = telemetry
    ctx = RequestContext("POST", "/v1/chat/completions", "req_1")
    trace = tel.start(ctx, [(b"traceparent", b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01")])
    ctx.trace = trace
    ctx.requested("kimi-k2", stream=True)
    ctx.backend, ctx.key, ctx.upstream_model = "kimi", "k1", "kimi-k2-0711-preview"
    ctx.attempt_started()
    target = Target("kimi-k2", "kimi-k2", "kimi", "kimi-k2-0711-preview", label="kimi-k2")
    ctx.routed(target)
    headers: dict[str, str] = {}
    trace.attempt(
        headers,
        ctx.path,
        target,
        "k1",
        backends()["kimi"],
        URL("https://api.moonshot.ai/v1/chat/completions"),
    )
    trace.answered(200)
    ctx.responded(200)
    ctx.head_sent()
    ctx.counted(TokenCounts(prompt=40, completion=3), partial=True)
    ctx.upstream_broke("kimi", "k1", "stream_broken")
    trace.finish(ctx, backends())

    attempt, server = exporter.get_finished_spans()
    assert headers["traceparent"] == f"00-{'ab' * 16}-{attempt.context.span_id:016x}-01"
    assert attempt.kind is SpanKind.CLIENT and server.kind is SpanKind.SERVER
    assert attempt.name == "chat kimi-k2"  # the route's label: bounded by the config
    assert attempt.attributes["gen_ai.request.model"] == "kimi-k2-0711-preview"
    assert attempt.attributes["gen_ai.provider.name"] == "moonshot_ai"
    assert attempt.attributes["server.address"] == "api.moonshot.ai"
    assert attempt.attributes["server.port"] == 443
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.attributes["error.type"] == "stream_broken"
    assert server.name == "chat kimi-k2"
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "stream_broken"
    assert server.attributes["gen_ai.usage.output_tokens"] == 3  # what was counted
    assert server.parent is not None and server.parent.span_id == 0xCDCDCDCDCDCDCDCD


def test_a_request_refused_before_any_upstream_call_is_one_span(telemetry):
    tel, exporter = telemetry
    ctx = RequestContext("POST", "/v1/chat/completions", "req_2")
    ctx.trace = tel.start(ctx, [])
    ctx.requested("m" * 10_000, stream=False)
    ctx.failed("invalid_api_key", 401)
    ctx.trace.finish(ctx, backends())
    (server,) = exporter.get_finished_spans()
    assert server.parent is None
    assert server.attributes["http.response.status_code"] == 401
    assert len(server.attributes["gen_ai.request.model"]) == 256  # capped
    assert "gen_ai.provider.name" not in server.attributes  # no backend was tried
    assert server.attributes["error.type"] == "invalid_api_key"


def test_shutdown_with_the_collector_down_is_bounded():
    """Spans queued for a collector that never answers: the exit waits seconds, not the
    SDK's own retry timeouts."""
    tel = Telemetry(TelemetryConfig(otlp_endpoint="http://127.0.0.1:9", metrics=False))
    ctx = RequestContext("GET", "/v1/files", "req_4")
    ctx.trace = tel.start(ctx, [])
    ctx.trace.finish(ctx, backends())
    started = time.monotonic()
    asyncio.run(tel.close())
    assert time.monotonic() - started < CLOSE_WAIT + 1


def test_a_path_that_is_no_genai_operation_keeps_its_http_name(telemetry):
    tel, exporter = telemetry
    ctx = RequestContext("GET", "/v1/files/file-abc123/content", "req_3")
    ctx.trace = tel.start(ctx, [])
    ctx.responded(200)
    ctx.trace.finish(ctx, backends())
    (server,) = exporter.get_finished_spans()
    assert server.name == "GET /v1/files"  # no id in a span's name
    assert server.attributes["url.path"] == "/v1/files/file-abc123/content"
    assert "gen_ai.operation.name" not in server.attributes


def test_a_forged_or_unusual_trace_context_is_read_as_w3c_says(telemetry):
    tel, exporter = telemetry
    parent = b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01"
    cases = {
        "twice": [(b"traceparent", parent), (b"traceparent", parent)],  # no parent at all
        "big state": [(b"traceparent", parent), (b"tracestate", b"a=" + b"x" * 600)],
        "two states": [(b"traceparent", parent), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")],
    }
    sent = {}
    for name, headers in cases.items():
        ctx = RequestContext("POST", "/v1/chat/completions", name)
        ctx.trace = tel.start(ctx, headers)
        upstream: dict[str, str] = {}
        target = Target("m", "m", "kimi", "m", label="m")
        url = URL("https://api.moonshot.ai/v1/chat/completions")
        ctx.trace.attempt(upstream, ctx.path, target, "k1", backends()["kimi"], url)
        ctx.trace.finish(ctx, backends())
        sent[name] = upstream
    spans = {s.attributes.get("llm_proxy.request_id"): s for s in exporter.get_finished_spans()}
    assert spans["twice"].parent is None
    assert spans["big state"].parent is not None
    assert "tracestate" not in sent["big state"]  # dropped, not forwarded upstream
    assert sent["two states"]["tracestate"] == "a=1,b=2"


def test_an_untrusted_client_trace_is_a_link_not_the_parent():
    tel, exporter = traced(trust_client_trace=False)
    ctx = RequestContext("GET", "/v1/files", "req_5")
    headers = [(b"traceparent", b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-00")]  # unsampled
    ctx.trace = tel.start(ctx, headers)
    ctx.trace.finish(ctx, backends())
    (server,) = exporter.get_finished_spans()  # sampled by our ratio, not the client's flag
    assert server.parent is None
    assert [link.context.trace_id for link in server.links] == [int("ab" * 16, 16)]
    asyncio.run(tel.close())


def test_span_names_are_few_whatever_the_path(telemetry):
    tel, _ = telemetry
    assert tel.span_name("GET", "/v1/files/file-1/content") == "GET /v1/files"
    assert tel.span_name("POST", "/v1/" + "x" * 60_000) == "POST"
    assert tel.span_name("GET", "/admin/status") == "GET"


def _collector(answer: bytes) -> tuple[str, threading.Event]:
    """A collector that reads a request, writes ``answer`` and then holds the socket."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        held = []
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            if answer:
                conn.sendall(answer)
            held.append(conn)
        for conn in held:
            conn.close()
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}", stop


@pytest.mark.parametrize(
    ("answer", "bound"),
    [
        (b"", CLOSE_WAIT + 1),  # takes the request, never answers: cut at the wait
        # A 200 whose body never ends: the status is all the exporter reads, at once.
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\nxx", 1.0),
    ],
)
def test_close_is_bounded_whatever_the_collector_does(answer, bound):
    url, stop = _collector(answer)
    try:
        tel = Telemetry(TelemetryConfig(otlp_endpoint=url))
        for i in range(50):
            ctx = RequestContext("POST", "/v1/chat/completions", f"req_{i}")
            ctx.trace = tel.start(ctx, [])
            ctx.sent_at = ctx.started
            ctx.responded(200)
            ctx.trace.finish(ctx, backends())
        started = time.monotonic()
        asyncio.run(tel.close())
        assert time.monotonic() - started < bound
    finally:
        stop.set()
