"""A hostile upstream for the fuzzer: it plays back, byte for byte, the answer a request scripts.

Run: ``python tests/hostile_upstream.py --port 0`` prints ``LISTENING <port>`` once ready.

The proxy forwards a request's JSON body unchanged, so a ``"hostile"`` object in the body
(a *plan*) decides the answer. All the randomness lives in the fuzzer (``tests/fuzz.py``),
which makes every answer reproducible from the case file alone. A plan:

  status_line     the raw first line (default ``HTTP/1.1 <status> <reason>``)
  status, reason  the status code (any number, 1xx-5xx or not) and reason phrase
  headers         ``[[name, value], ...]``, sent as given (latin-1), duplicates allowed
  framing         length | chunked | close | none | lie (``content-length: <declared>``)
  declared        the content-length sent with framing ``lie`` (any string)
  parts           ``[[data, delay_before], ...]``: body pieces (latin-1 text); with
                  ``chunked`` each piece is one chunk
  pad             append this many bytes of ``x`` (big bodies without big plans)
  head_delay      seconds before the head
  before_head     abort (reset, nothing sent) | hang (silence, never a head)
  after           end | abort (cut, no terminator) | hang (silence) | trickle (": ping"
                  comments every 0.3 s, for ever)

In headers and parts, ``{SELF}`` becomes this server's URL, ``{AUTH}`` the Authorization
header the proxy sent, ``{KEY}`` the bare key and ``{KEY_URL}`` its URL-encoded form: an
upstream that echoes the operator's key. Nothing lasts longer than ``MAX_PLAY`` seconds.

Without a plan, a POST gets a correct chat completion (or SSE stream with ``"stream": true``)
and ``GET .../models`` a model list. Control endpoints:
  GET  /_hostile/stats    {"plays_active", "plays_total", "redirect_hits", "requests"}
  POST /_hostile/models   {"plan": {...} | null}: what ``GET .../models`` answers (probes)
Any request under ``/redirected/`` counts as a followed redirect (plans point 3xx there).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.parse
from typing import Any

import httptools
import orjson

MAX_PLAY = 60.0  # a hung or trickling answer ends by itself after this long
TRICKLE_EVERY = 0.3


class State:
    def __init__(self) -> None:
        self.plays_active = 0  # scripted answers still being played (POST only)
        self.plays_total = 0
        self.redirect_hits = 0
        self.requests = 0
        self.models_plan: dict[str, Any] | None = None


def _json(status: int, body: Any) -> bytes:
    data = orjson.dumps(body)
    head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
    return head.encode() + b"content-length: %d\r\n\r\n" % len(data) + data


def normal_chat(model: str) -> bytes:
    return _json(
        200,
        {
            "id": "chatcmpl-hostile",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "calm"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    )


def normal_stream(model: str) -> bytes:
    events = []
    for piece in ("calm", " answer"):
        chunk = {
            "id": "chatcmpl-hostile",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def models_list() -> bytes:
    data = [{"id": m, "object": "model", "owned_by": "hostile"} for m in ("h-listed", "calm-1")]
    return _json(200, {"object": "list", "data": data})


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
            self.task.cancel()  # the proxy went away: stop playing at once

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.state.requests += 1
        method = self.parser.get_method().decode()
        path = self.url.split(b"?", 1)[0].decode("latin-1")
        auth = self.headers.get(b"authorization", b"").decode("latin-1")
        plan, counted = self.decide(method, path)
        if isinstance(plan, bytes):
            self.transport.write(plan)
            return
        self.task = asyncio.ensure_future(self.play(plan, auth, counted))

    def decide(self, method: str, path: str) -> tuple[bytes | dict[str, Any], bool]:
        body = b"".join(self.body)
        if path.startswith("/redirected/"):
            self.state.redirect_hits += 1
            return _json(200, {"redirected": True}), False
        if path.startswith("/_hostile/"):
            return self.control(method, path, body), False
        if method == "GET" and path.endswith("/models"):
            return (self.state.models_plan or models_list()), False
        try:
            request = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            return _json(400, {"error": {"message": "invalid json", "type": "x"}}), False
        if not isinstance(request, dict):
            return _json(400, {"error": {"message": "not an object", "type": "x"}}), False
        plan = request.get("hostile")
        if isinstance(plan, dict):
            return plan, True
        model = str(request.get("model"))
        return (
            normal_stream(model) if request.get("stream") is True else normal_chat(model)
        ), False

    def control(self, method: str, path: str, body: bytes) -> bytes:
        if path == "/_hostile/stats":
            s = self.state
            return _json(
                200,
                {
                    "plays_active": s.plays_active,
                    "plays_total": s.plays_total,
                    "redirect_hits": s.redirect_hits,
                    "requests": s.requests,
                },
            )
        if path == "/_hostile/models" and method == "POST":
            self.state.models_plan = orjson.loads(body or b"{}").get("plan")
            return _json(200, {"ok": True})
        return _json(404, {"error": {"message": "unknown control endpoint"}})

    async def play(self, plan: dict[str, Any], auth: str, counted: bool) -> None:
        if counted:
            self.state.plays_active += 1
            self.state.plays_total += 1
        try:
            await asyncio.wait_for(self._play(plan, auth), MAX_PLAY)
        except (TimeoutError, asyncio.CancelledError, ConnectionError, ValueError, TypeError):
            pass
        finally:
            if counted:
                self.state.plays_active -= 1
            self.task = None
            # close() flushes what was written; a plan that wants a reset says `abort`.
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    async def _play(self, plan: dict[str, Any], auth: str) -> None:
        transport = self.transport
        assert transport is not None
        key = auth.removeprefix("Bearer ").strip()
        host, port = transport.get_extra_info("sockname")[:2]

        def fill(text: str) -> bytes:
            text = text.replace("{AUTH}", auth).replace("{KEY}", key)
            text = text.replace("{SELF}", f"http://{host}:{port}")
            text = text.replace("{KEY_URL}", urllib.parse.quote(key, safe=""))
            return text.encode("latin-1", "replace")

        await asyncio.sleep(min(float(plan.get("head_delay", 0)), 10))
        before = plan.get("before_head")
        if before == "abort":
            transport.abort()
            return
        if before == "hang":
            await asyncio.sleep(MAX_PLAY)
            return
        status = plan.get("status", 200)
        line = plan.get("status_line") or f"HTTP/1.1 {status} {plan.get('reason', 'X')}"
        headers = [(fill(str(k)), fill(str(v))) for k, v in plan.get("headers", [])]
        parts = [(fill(str(d)), float(w)) for d, w in plan.get("parts", [])]
        if plan.get("pad"):
            parts.append((b"x" * int(plan["pad"]), 0.0))
        framing = plan.get("framing", "length")
        if framing == "length":
            headers.append((b"content-length", str(sum(len(p) for p, _ in parts)).encode()))
        elif framing == "chunked":
            headers.append((b"transfer-encoding", b"chunked"))
        elif framing == "lie":
            headers.append((b"content-length", str(plan.get("declared", "99999999")).encode()))
        elif framing == "close":
            headers.append((b"connection", b"close"))
        head = fill(line) + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        transport.write(head + b"\r\n")
        for data, wait in parts:
            if wait:
                await asyncio.sleep(min(wait, 10))
            if framing == "chunked":
                if data:
                    transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                transport.write(data)
        after = plan.get("after", "end")
        if after == "abort":
            transport.abort()
        elif after == "hang":
            await asyncio.sleep(MAX_PLAY)
        elif after == "trickle":
            while True:
                await asyncio.sleep(TRICKLE_EVERY)
                ping = b": ping\n\n"
                transport.write(
                    b"%x\r\n%s\r\n" % (len(ping), ping) if framing == "chunked" else ping
                )
        else:
            if framing == "chunked":
                transport.write(b"0\r\n\r\n")
            if framing in ("close", "none", "lie"):
                transport.close()


async def serve(host: str, port: int) -> None:
    state = State()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(state), host, port, backlog=1024)
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
