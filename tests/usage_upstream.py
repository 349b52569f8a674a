"""A fake upstream for counting tokens at a stream's edges (aiohttp).

Every stream ends with its dialect's final usage (chat: a usage-only chunk then
``[DONE]``; Responses: ``response.completed``; Messages: ``message_delta`` then
``message_stop``), then waits ``tail`` seconds (query ``?tail=0.02``) before ending the
body: what a real provider's connection does after its last event. ``?cut=after_text``
drops the connection after the text and before any final usage; ``?cut=no_end`` ends the
body cleanly without the final event. Usage: 1000 prompt + 500 completion (Anthropic:
``message_start`` input 1000, ``message_delta`` output 500).

Paths: ``/v1/chat/completions``, ``/v1/responses``, ``/v1/messages``. Run as a process
(``python tests/usage_upstream.py --port 0`` prints ``LISTENING <port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web

PROMPT, COMPLETION = 1000, 500
TEXT = "hello " * 20


def _data(event: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return (head + "data: " + json.dumps(event) + "\n\n").encode()


def _chat() -> tuple[list[bytes], list[bytes]]:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    text = [
        _data({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        _data({**chunk, "choices": [{"index": 0, "delta": {"content": TEXT}}]}),
        _data({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ]
    usage = {"prompt_tokens": PROMPT, "completion_tokens": COMPLETION, "total_tokens": 1500}
    final = [_data({**chunk, "choices": [], "usage": usage}), b"data: [DONE]\n\n"]
    return text, final


def _responses() -> tuple[list[bytes], list[bytes]]:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m"}
    response |= {"status": "in_progress", "output": [], "usage": None}
    text = [
        _data({"type": "response.created", "sequence_number": 0, "response": response}),
        _data(
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": TEXT,
                "logprobs": [],
            }
        ),
    ]
    usage = {
        "input_tokens": PROMPT,
        "output_tokens": COMPLETION,
        "total_tokens": 1500,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    done = {**response, "status": "completed", "usage": usage}
    final = [_data({"type": "response.completed", "sequence_number": 2, "response": done})]
    return text, final


def _messages() -> tuple[list[bytes], list[bytes]]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}
    message |= {"content": [], "stop_reason": None, "stop_sequence": None}
    message["usage"] = {"input_tokens": PROMPT, "output_tokens": 1}
    text = [
        _data({"type": "message_start", "message": message}, "message_start"),
        _data(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
        _data(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": TEXT},
            },
            "content_block_delta",
        ),
        _data({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    ]
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    delta["usage"] = {"output_tokens": COMPLETION}
    final = [
        _data(delta, "message_delta"),
        _data({"type": "message_stop"}, "message_stop"),
    ]
    return text, final


STREAMS = {"/v1/chat/completions": _chat, "/v1/responses": _responses, "/v1/messages": _messages}


async def stream(request: web.Request) -> web.StreamResponse:
    text, final = STREAMS[request.path]()
    cut = request.query.get("cut")
    tail = float(request.query.get("tail", "0"))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in text:
        await response.write(event)
    if cut == "after_text":
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # the connection drops: no usage, no end
        return response
    if cut != "no_end":
        await response.write(b"".join(final))
    await asyncio.sleep(tail)
    await response.write_eof()
    return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = web.Application()
    for path in STREAMS:
        app.router.add_post(path, stream)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"LISTENING {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
