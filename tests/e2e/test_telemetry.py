"""OpenTelemetry through a real proxy: spans and GenAI metrics as a collector receives them.

A real proxy process exports over OTLP/HTTP to an in-test receiver that decodes the
protobufs with the official package; the openai SDK sends chat (streamed and not),
embeddings and a request whose first key is refused. Checked: the client's trace is
continued, each upstream call is a child span whose ``traceparent`` the upstream got, the
GenAI attributes and metrics carry the upstream's usage, and no secret is in any of it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import MockUpstream, ProxyProcess, start_proxy
from tests.otlp_receiver import Receiver, Span

pytestmark = pytest.mark.e2e

KEY_A, KEY_B = "sk-otel-first-0000000000", "sk-otel-second-000000000"
CLIENT_KEY = "ck-otel-team-a-000000000"
SERVER, CLIENT_KIND = 2, 3  # the protobuf's SpanKind
ERROR = 2  # the protobuf's Status.code
# The exporters' batches, short for a test (the SDK reads these; defaults 5 s and 60 s).
EXPORT_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


@pytest.fixture
def proxy(upstream: MockUpstream, receiver: Receiver, tmp_path) -> Iterator[ProxyProcess]:
    config = f"""
telemetry: {{otlp_endpoint: "{receiver.url}", service_name: otel-test}}
backends:
  mock:
    base_url: {upstream.url}/v1
    provider: openai
    # Named in the config: metric labels and span names as themselves (others: the route's
    # pattern, here "*").
    models: [metrics-model, gpt-4o-mini, text-embedding-3-small]
    keys: [{{id: first, key: "{KEY_A}"}}, {{id: second, key: "{KEY_B}"}}]
clients:
  - {{id: team-a, key: "{CLIENT_KEY}"}}
routes:
  - {{prefix: "", backend: mock}}
"""
    process = start_proxy(config, tmp_path, env=EXPORT_ENV)
    yield process
    process.stop()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def spans_of(receiver: Receiver, trace_id: str, count: int) -> list[Span]:
    return receiver.wait_for(
        lambda r: (found if len(found := [s for s in r.spans if s.trace_id == trace_id]) >= count
                   else None)
    )  # fmt: skip


def sdk(proxy: ProxyProcess, header: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=proxy.base_url,
        api_key=CLIENT_KEY,
        max_retries=0,
        default_headers={"traceparent": header, "tracestate": "vendor=opaque"},
    )


def test_a_chat_continues_the_clients_trace_and_its_upstream_call_is_a_child_span(
    proxy, upstream, receiver
):
    header, trace_id, client_span = traceparent()
    answer = sdk(proxy, header).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == 5
    spans = spans_of(receiver, trace_id, 2)
    server = next(s for s in spans if s.kind == SERVER)
    attempt = next(s for s in spans if s.kind == CLIENT_KIND)

    assert server.parent_span_id == client_span  # the client's trace, continued
    assert server.name == "chat gpt-4o-mini"
    assert server.resource["service.name"] == "otel-test"
    assert server.attributes | {"server.port": 0} == server.attributes | {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini",
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 7,
        "gen_ai.request.stream": False,
        "server.address": "127.0.0.1",
        "server.port": 0,
        "http.response.status_code": 200,
        "llm_proxy.client": "team-a",
        "llm_proxy.backend": "mock",
        "llm_proxy.key": "first",
        "llm_proxy.attempts": 1,
    }
    assert server.attributes["server.port"] == int(upstream.url.rsplit(":", 1)[1])
    assert server.status_code != ERROR

    assert attempt.parent_span_id == server.span_id
    assert attempt.name == "chat gpt-4o-mini"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["llm_proxy.key"] == "first"
    # What the upstream got: the attempt span's context, and the client's tracestate.
    received = upstream.requests()[-1]["headers"]
    assert received["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
    assert received["tracestate"] == "vendor=opaque"


def test_a_stream_counts_its_usage_and_time_to_first_token(proxy, upstream, receiver):
    header, trace_id, _ = traceparent()
    stream = sdk(proxy, header).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert chunks
    server = next(s for s in spans_of(receiver, trace_id, 2) if s.kind == SERVER)
    assert server.attributes["gen_ai.request.stream"] is True
    assert server.attributes["gen_ai.usage.input_tokens"] == 5  # usage injected upstream
    assert server.attributes["gen_ai.usage.output_tokens"] == 3
    assert server.attributes["gen_ai.response.time_to_first_chunk"] > 0
    ttft = receiver.wait_for(
        lambda r: r.latest("gen_ai.server.time_to_first_token", **{"gen_ai.operation.name": "chat"})
    )
    assert ttft.count >= 1


def test_embeddings_are_their_own_operation(proxy, receiver):
    header, trace_id, _ = traceparent()
    sdk(proxy, header).embeddings.create(model="text-embedding-3-small", input="hello")
    server = next(s for s in spans_of(receiver, trace_id, 2) if s.kind == SERVER)
    assert server.name == "embeddings text-embedding-3-small"
    assert server.attributes["gen_ai.operation.name"] == "embeddings"
    assert server.attributes["gen_ai.usage.input_tokens"] == 3


def test_a_refused_key_and_the_retry_are_two_child_spans(proxy, upstream, receiver):
    upstream.configure(invalid_keys=[KEY_A])
    header, trace_id, _ = traceparent()
    sdk(proxy, header).chat.completions.create(model="gpt-4o-mini", messages=[])
    spans = spans_of(receiver, trace_id, 3)
    server = next(s for s in spans if s.kind == SERVER)
    attempts = [s for s in spans if s.kind == CLIENT_KIND]
    assert [a.attributes["llm_proxy.key"] for a in attempts] == ["first", "second"]
    assert [a.attributes["http.response.status_code"] for a in attempts] == [401, 200]
    assert [a.status_code == ERROR for a in attempts] == [True, False]
    assert all(a.parent_span_id == server.span_id for a in attempts)
    assert server.attributes["llm_proxy.attempts"] == 2
    received = [r["headers"]["traceparent"] for r in upstream.requests()]
    assert received == [f"00-{trace_id}-{a.span_id}-01" for a in attempts]


def test_the_genai_metrics_carry_the_upstreams_usage(proxy, receiver):
    header, _, _ = traceparent()
    client = sdk(proxy, header)
    for _ in range(3):
        client.chat.completions.create(model="metrics-model", messages=[])
    # The model attribute is bounded as the Prometheus label is: a model id the config
    # names is itself, any other the route's pattern.
    model = {"gen_ai.request.model": "metrics-model"}

    def three(r: Receiver, kind: str) -> object:
        point = r.latest("gen_ai.client.token.usage", **model, **{"gen_ai.token.type": kind})
        return point if point is not None and point.count == 3 else None

    assert receiver.wait_for(lambda r: three(r, "input")).sum == 15
    assert receiver.wait_for(lambda r: three(r, "output")).sum == 21
    duration = receiver.wait_for(lambda r: r.latest("gen_ai.server.request.duration", **model))
    assert duration.count == 3
    assert duration.attributes["gen_ai.provider.name"] == "openai"
    assert duration.attributes["gen_ai.operation.name"] == "chat"


def test_a_request_without_a_traceparent_or_with_a_forged_one_starts_a_trace(proxy, receiver):
    for header in (None, "00-zz-not-a-trace-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01"):
        headers = {"authorization": f"Bearer {CLIENT_KEY}"}
        if header is not None:
            headers["traceparent"] = header
        marker = secrets.token_hex(6)
        body = {"model": f"m-{marker}", "messages": []}
        response = httpx.post(f"{proxy.base_url}/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
        server = receiver.wait_for(
            lambda r, marker=marker: next(
                (s for s in r.spans if s.attributes.get("gen_ai.request.model") == f"m-{marker}"
                 and s.kind == SERVER), None,
            )
        )  # fmt: skip
        assert server.parent_span_id == ""  # a root: nothing of the forged header kept
        assert server.trace_id != "0" * 32


def test_no_secret_reaches_a_span(proxy, receiver):
    header, trace_id, _ = traceparent()
    sdk(proxy, header).chat.completions.create(model="gpt-4o-mini", messages=[])
    spans = spans_of(receiver, trace_id, 2)
    text = json.dumps([s.attributes for s in receiver.spans] + [s.resource for s in spans])
    for secret in (KEY_A, KEY_B, CLIENT_KEY):
        assert secret not in text
