"""An OTLP/HTTP receiver for the tests: what a collector would get, decoded with the
official protobuf definitions (``opentelemetry-proto``).

It listens on 127.0.0.1 in a thread of the test process; the proxy under test exports to
it as it would to a collector (``POST /v1/traces``, ``POST /v1/metrics``, protobuf bodies).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

T = TypeVar("T")


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def attributes_of(pairs: list[KeyValue]) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


@dataclass
class Span:
    name: str
    kind: int  # 2: SERVER, 3: CLIENT (the protobuf's SpanKind)
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int  # 2: ERROR
    resource: dict[str, Any]


@dataclass
class Point:
    """One histogram data point of a metric."""

    metric: str
    attributes: dict[str, Any]
    count: int
    sum: float


class Receiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.points: list[Point] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    receiver._traces(body)
                elif self.path == "/v1/metrics":
                    receiver._metrics(body)
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _traces(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = attributes_of(list(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        Span(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes=attributes_of(list(span.attributes)),
                            status_code=span.status.code,
                            resource=resource,
                        )
                    )
        with self.lock:
            self.spans += found

    def _metrics(self, body: bytes) -> None:
        request = ExportMetricsServiceRequest.FromString(body)
        found = []
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.WhichOneof("data") != "histogram":
                        continue
                    for point in metric.histogram.data_points:
                        attributes = attributes_of(list(point.attributes))
                        found.append(Point(metric.name, attributes, point.count, point.sum))
        with self.lock:
            self.points += found

    def wait_for(self, look: Callable[[Receiver], T | None], timeout: float = 10.0) -> T:
        """What ``look`` finds once it finds something (the exporters send in batches)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = look(self)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"not received within {timeout} s: {self.spans[-5:]}")
            time.sleep(0.05)

    def latest(self, metric: str, **attributes: Any) -> Point | None:
        """The last point of ``metric`` whose attributes include ``attributes`` (the
        exports are cumulative: the last is the total so far)."""
        matching = [
            p
            for p in self.points
            if p.metric == metric and all(p.attributes.get(k) == v for k, v in attributes.items())
        ]
        return matching[-1] if matching else None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
