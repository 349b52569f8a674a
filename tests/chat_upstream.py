"""A scripted Chat Completions server for the translation tests, in a thread of the test
process on 127.0.0.1: it answers a request offering its tool with a call of it (streamed
in pieces), a request whose last message is a tool result with that result's text, and
anything else with a greeting; model ``fail-model`` gets a 500, ``garbage-model`` a 200
without choices, ``text-model`` a 200 in text/plain, ``midfail-model`` a stream with an
error event in its middle (``midfail-key-model``: one quoting the key it was sent)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import free_port

USAGE = {"prompt_tokens": 21, "completion_tokens": 8, "prompt_tokens_details": {"cached_tokens": 4}}


class ChatUpstream:
    """A Chat Completions server on 127.0.0.1, in a thread; ``requests`` holds the bodies."""

    def __init__(self, tool_call: tuple[str, dict[str, Any]]) -> None:
        self.tool_call = tool_call  # (name, input) it calls when that tool is offered
        self.requests: list[dict[str, Any]] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "chat-model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if body["model"] == "garbage-model":  # a 200 with no answer in it
            return web.Response(body=b'{"choices": []}', content_type="application/json")
        if body["model"] == "text-model":  # a 200 in a content type nobody asked for
            return web.Response(text="plain words", content_type="text/plain")
        if body["model"] == "fail-model":
            error = {"error": {"message": "upstream exploded", "type": "server_error"}}
            return web.json_response(error, status=500)
        last = body["messages"][-1]
        if last["role"] == "tool":
            text, calls = f"The tool said: {last['content']}", []
        elif self.tool_call[0] in {t["function"]["name"] for t in body.get("tools") or ()}:
            name, arguments = self.tool_call
            text, calls = "Let me read it.", [("call_7", name, json.dumps(arguments))]
        else:
            text, calls = "Hello from chat.", []
        finish = "tool_calls" if calls else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                    for i, n, a in calls
                ]
            choice = {"index": 0, "message": message, "finish_reason": finish}
            return web.json_response({"id": "chatcmpl-t", "choices": [choice], "usage": USAGE})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            data = {"id": "chatcmpl-t", "choices": [choice], **more}
            await response.write(b"data: " + orjson.dumps(data) + b"\n\n")

        await chunk({"role": "assistant"})
        if body["model"] in ("midfail-model", "midfail-key-model"):  # an error mid-stream
            await chunk({"content": "Half an "})
            message = "rate limit hit mid-stream"
            if body["model"] == "midfail-key-model":  # an upstream quoting the key it got
                key = request.headers.get("authorization", "").removeprefix("Bearer ")
                message = f"key {key} was refused mid-stream"
            error = {"error": {"message": message, "type": "server_error"}}
            await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
            return response
        for i in range(0, len(text), 5):
            await chunk({"content": text[i : i + 5]})
        for n, (call_id, name, arguments) in enumerate(calls):
            first = {"index": n, "id": call_id, "type": "function", "function": {"name": name}}
            await chunk({"tool_calls": [first]})
            for i in range(0, len(arguments), 6):
                piece = {"index": n, "function": {"arguments": arguments[i : i + 6]}}
                await chunk({"tool_calls": [piece]})
        await chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-t", "choices": [], "usage": USAGE}
            await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def chat_only_config(chat: ChatUpstream, client_key: str, extra: str = "") -> str:
    """A proxy config with one client and one backend, ``chat``, reached by translation."""
    return f"""
backends:
  chatonly:
    base_url: {chat.url}/v1
    chat_wire: chat
    keys: [{{id: chat-key, key: "sk-chat-only-000000000000"}}]
clients:
  - {{id: coder, key: "{client_key}"}}
routes:
  - {{prefix: "", backend: chatonly}}
{extra}"""
