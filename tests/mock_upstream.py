"""A fast, scriptable OpenAI-compatible mock upstream: one program for the tests and bench/.

Run: ``python tests/mock_upstream.py --port 0`` prints ``LISTENING <port>`` once it is ready.

It answers chat completions (JSON or SSE), completions, embeddings, responses (JSON or SSE)
and ``GET .../models`` with deterministic bytes, so a test can compare what came through the
proxy with what the mock sends directly. Raw asyncio + httptools keep it far faster than the
proxy it is used to measure.

A request steers its answer with an extra ``"mock"`` object in its JSON body (the proxy
forwards unknown fields unchanged; the openai SDK sends it with ``extra_body``):
  status, error, headers      answer this status / error body / extra response headers
  delay                       seconds before the response head
  chunks                      number of content chunks in a stream (default 3)
  first_chunk_delay, chunk_delay   seconds before the first / each further event
  drop_after, stall_after     after N events: cut the connection / go silent for 60 s
  no_done                     end the stream cleanly but without data: [DONE]
  crlf, comments              use \\r\\n line endings / send ": keep-alive" comments
  echo_key                    with status: the error message quotes the key it was sent
  pad_bytes                   a 200 JSON answer padded to about this many bytes
  glue_head                   a timed stream's head goes out in one write with its first event
Control endpoints: ``GET /_mock/requests`` (what was received), ``GET /_mock/stats`` (how
many timed answers were cut short by the client leaving), ``DELETE /_mock/requests``,
``POST /_mock/config`` with ``{"invalid_keys": [...], "limited_keys": {key: retry_after},
"models": [...], "by_model": {model id: a "mock" object}}`` (``by_model``: how requests for
that model are answered, e.g. one deployment of a pool slow or failing).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httptools
import orjson

CREATED = 1700000000
RECORDED_HEADERS = (
    b"authorization",
    b"user-agent",
    b"x-request-id",
    b"openai-beta",
    b"content-type",
    b"accept",
    b"accept-encoding",
    b"cookie",
    b"x-api-key",
    b"x-extra",
    b"openai-organization",
    b"openai-project",
    b"content-encoding",
    b"x-forwarded-for",
    b"traceparent",
    b"tracestate",
    b"x-stainless-lang",
    # Session headers (affinity): read by the proxy, never forwarded.
    b"x-claude-code-session-id",
    b"session-id",
    b"thread-id",
    b"x-my-session",
)


class State:
    def __init__(self, record: bool, models: list[str]) -> None:
        self.record = record
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=2000)
        self.invalid_keys: set[str] = set()
        self.limited_keys: dict[str, str] = {}  # key -> retry-after seconds: answered with 429
        self.by_model: dict[str, dict[str, Any]] = {}  # model id -> its "mock" settings
        self.models = models
        self.aborted = 0  # timed answers cut short because the client (the proxy) went away


def _head(status: int, headers: list[tuple[str, str]], length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(
        f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many"}
_REASONS |= {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def json_response(status: int, body: Any, extra: list[tuple[str, str]] | None = None) -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = [("content-type", "application/json"), ("x-request-id", "req_mock_upstream")]
    headers += extra or []
    return _head(status, headers, len(data)) + data


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> bytes:
    return json_response(
        status, {"error": {"message": message, "type": type_, "param": None, "code": code}}
    )


# ------------------------------------------------------------------ response bodies


def chat_completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }


def chat_events(model: str, chunks: int, include_usage: bool) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        body = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": f"tok{i} "}, None) for i in range(chunks)]
    events.append(chunk({}, "stop"))
    if include_usage:
        usage = {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}
        body = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        events.append(b"data: " + orjson.dumps(body) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def response_object(model: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "resp_mock",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_mock",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
    }


def response_events(model: str, chunks: int) -> list[bytes]:
    def event(kind: str, body: dict[str, Any]) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    text = "".join(f"tok{i} " for i in range(chunks))
    events = [event("response.created", {"type": "response.created", "sequence_number": 0})]
    for i in range(chunks):
        delta = {
            "type": "response.output_text.delta",
            "item_id": "msg_mock",
            "output_index": 0,
            "content_index": 0,
            "delta": f"tok{i} ",
            "sequence_number": i + 1,
        }
        events.append(event("response.output_text.delta", delta))
    done = {
        "type": "response.completed",
        "sequence_number": chunks + 1,
        "response": response_object(model, text),
    }
    events.append(event("response.completed", done))
    return events


# ------------------------------------------------------------------ the protocol


class Connection(asyncio.Protocol):
    def __init__(self, state: State) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(openai_error(400, "bad request", "invalid_request_error"))  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.split(b"?", 1)[0].decode()
        body = b"".join(self.body)
        keep_alive = self.parser.should_keep_alive()
        if self.state.record and not path.startswith("/_mock"):
            self.record(method, path, body)
        plan = self.plan(method, path, body)
        if isinstance(plan, bytes):
            self.transport.write(plan)  # type: ignore[union-attr]
            if not keep_alive:
                self.transport.close()  # type: ignore[union-attr]
            return
        # Reading stays on during a timed answer: that is how a client's close is noticed.
        self.task = asyncio.ensure_future(self.play(plan, keep_alive))

    def record(self, method: str, path: str, body: bytes) -> None:
        entry: dict[str, Any] = {
            "method": method,
            "path": path,
            "body": body.decode("utf-8", "replace"),
        }
        entry["headers"] = {
            k.decode(): v.decode("latin-1")
            for k, v in self.headers.items()
            if k in RECORDED_HEADERS
        }
        auth = self.headers.get(b"authorization", b"").decode("latin-1")
        entry["key"] = auth.removeprefix("Bearer ")
        try:
            entry["model"] = orjson.loads(body).get("model") if body else None
        except (orjson.JSONDecodeError, AttributeError):
            entry["model"] = None
        self.state.requests.append(entry)

    # ------------------------------------------------------------ deciding the answer

    def plan(self, method: str, path: str, body: bytes) -> bytes | dict[str, Any]:
        """Either the full answer as bytes (fast path) or a plan for ``play``."""
        if path.startswith("/_mock/"):
            return self.control(method, path, body)
        auth = self.headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ")
        if auth in self.state.invalid_keys or not auth:
            return openai_error(
                401, "Invalid Authentication", "invalid_authentication_error", "invalid_api_key"
            )
        if auth in self.state.limited_keys:
            retry_after = self.state.limited_keys[auth]
            error = {"message": "Rate limit reached", "type": "rate_limit_reached_error"}
            return json_response(429, {"error": error}, [("retry-after", retry_after)])
        if method == "GET" and path.endswith("/models"):
            data = [
                {"id": m, "object": "model", "created": CREATED, "owned_by": "mock"}
                for m in self.state.models
            ]
            return json_response(200, {"object": "list", "data": data})
        if method != "POST":
            return openai_error(404, f"no route {method} {path}", "invalid_request_error")
        try:
            request = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return openai_error(400, "invalid json", "invalid_request_error")
        mock = request.get("mock") or {}
        model = str(request.get("model"))
        if self.state.by_model.get(model):
            mock = {**mock, **self.state.by_model[model]}
        extra = [(str(k), str(v)) for k, v in (mock.get("headers") or {}).items()]
        if random.random() < float(mock.get("fail_ratio", 0)):  # a flaky upstream: 500 at random
            mock = {**mock, "status": 500}
        if "status" in mock:
            error = mock.get("error") or {
                "message": f"mock error {mock['status']}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
            if mock.get("echo_key"):  # as some providers do: the key, quoted back
                error = {**error, "message": f"Incorrect API key provided: {auth}"}
            answer = json_response(int(mock["status"]), {"error": error}, extra)
        elif mock.get("pad_bytes"):
            answer = json_response(200, {"pad": "x" * int(mock["pad_bytes"])}, extra)
        elif request.get("stream") is True and path.endswith(("/chat/completions", "/responses")):
            return self.stream_plan(path, model, request, mock, extra)
        else:
            answer = json_response(200, self.json_body(path, model, request), extra)
        if mock.get("delay"):
            return {"delay": float(mock["delay"]), "events": [], "whole": answer}
        return answer

    def json_body(self, path: str, model: str, request: dict[str, Any]) -> dict[str, Any]:
        if path.endswith("/chat/completions"):
            return chat_completion(model, "Hello from the mock upstream.")
        if path.endswith("/responses"):
            return response_object(model, "Hello from the mock upstream.")
        if path.endswith("/embeddings"):
            return {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": model,
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        if path.endswith("/completions"):
            return {
                "id": "cmpl-mock",
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "choices": [
                    {"text": "Hello", "index": 0, "finish_reason": "stop", "logprobs": None}
                ],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
            }
        return {"ok": True, "path": path, "model": model}

    def stream_plan(
        self,
        path: str,
        model: str,
        request: dict[str, Any],
        mock: dict[str, Any],
        extra: list[tuple[str, str]],
    ) -> dict[str, Any] | bytes:
        chunks = int(mock.get("chunks", 3))
        if path.endswith("/responses"):
            events = response_events(model, chunks)
        else:
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            events = chat_events(model, chunks, include_usage)
        if mock.get("no_done"):  # a clean end of the stream, but without [DONE]
            events = [e for e in events if e != b"data: [DONE]\n\n"]
        if mock.get("comments"):
            events = [b": keep-alive\n\n", *events[:2], b": keep-alive\n\n", *events[2:]]
        if mock.get("crlf"):
            events = [e.replace(b"\n", b"\r\n") for e in events]
        headers = [("content-type", "text/event-stream"), ("x-request-id", "req_mock_upstream")]
        head = _head(200, headers + extra, None)
        plan = {
            "head": head,
            "events": events,
            "delay": float(mock.get("delay", 0)),
            "first_chunk_delay": float(mock.get("first_chunk_delay", 0)),
            "chunk_delay": float(mock.get("chunk_delay", 0)),
            "drop_after": mock.get("drop_after"),
            "stall_after": mock.get("stall_after"),
            "glue_head": bool(mock.get("glue_head")),
        }
        timed = plan["delay"] or plan["first_chunk_delay"] or plan["chunk_delay"]
        if not timed and plan["drop_after"] is None and plan["stall_after"] is None:
            return head + b"".join(_chunk(e) for e in events) + b"0\r\n\r\n"
        return plan

    def control(self, method: str, path: str, body: bytes) -> bytes:
        if path == "/_mock/requests" and method == "GET":
            return json_response(200, list(self.state.requests))
        if path == "/_mock/stats" and method == "GET":
            return json_response(200, {"aborted": self.state.aborted})
        if path == "/_mock/requests" and method == "DELETE":
            self.state.requests.clear()
            self.state.aborted = 0
            return json_response(200, {"ok": True})
        if path == "/_mock/config" and method == "POST":
            settings = orjson.loads(body or b"{}")
            if "invalid_keys" in settings:
                self.state.invalid_keys = set(settings["invalid_keys"])
            if "models" in settings:
                self.state.models = list(settings["models"])
            if "limited_keys" in settings:
                self.state.limited_keys = dict(settings["limited_keys"])
            if "by_model" in settings:
                self.state.by_model = dict(settings["by_model"])
            return json_response(200, {"ok": True})
        return openai_error(404, "unknown control endpoint", "invalid_request_error")

    # ------------------------------------------------------------ timed answers

    async def play(self, plan: dict[str, Any], keep_alive: bool) -> None:
        try:
            await self._play(plan, keep_alive)
        except asyncio.CancelledError:
            self.state.aborted += 1
            raise

    async def _play(self, plan: dict[str, Any], keep_alive: bool) -> None:
        transport = self.transport
        assert transport is not None
        if plan["delay"]:
            await asyncio.sleep(plan["delay"])
        if "whole" in plan:
            transport.write(plan["whole"])
        else:
            events = plan["events"]
            if plan["glue_head"]:  # head and first event in one read at the other end
                transport.write(plan["head"] + _chunk(events[0]))
                events = [b"", *events[1:]]
            else:
                transport.write(plan["head"])
            for i, event in enumerate(events):
                if not event:
                    continue
                if i == plan["drop_after"]:
                    transport.abort()  # mid-stream death: no terminating chunk
                    return
                if i == plan["stall_after"]:
                    await asyncio.sleep(60)
                wait = plan["first_chunk_delay"] if i == 0 else plan["chunk_delay"]
                if wait:
                    await asyncio.sleep(wait)
                transport.write(_chunk(event))
            transport.write(b"0\r\n\r\n")
        self.task = None
        if not keep_alive:
            transport.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(host: str, port: int, state: State, tls: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(state), host, port, backlog=4096, ssl=tls)
    bound = server.sockets[0].getsockname()[1]
    print(f"LISTENING {bound}", flush=True)
    async with server:
        await server.serve_forever()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl, for
    ``--cert``/``--key`` (the TLS tests and ``BENCH_TLS=1``)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--no-record", action="store_true", help="do not keep received requests")
    parser.add_argument("--invalid-key", action="append", default=[], help="answer 401 to it")
    parser.add_argument("--models", default="mock-model", help="comma-separated /models list")
    parser.add_argument("--cert", help="serve https with this PEM certificate (and --key)")
    parser.add_argument("--key", help="the certificate's PEM private key")
    args = parser.parse_args()
    tls = None
    if args.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    state = State(record=not args.no_record, models=args.models.split(","))
    state.invalid_keys = set(args.invalid_key)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args.host, args.port, state, tls))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
