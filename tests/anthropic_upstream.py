"""A fake Anthropic Messages upstream (aiohttp): what Moonshot, DeepSeek or Anthropic serve
at ``{anthropic_base_url}/v1/...``.

It checks the key header: under ``/xkey/`` it must be ``x-api-key``, elsewhere (``/bearer/``,
or the OpenAI side's ``GET .../models`` probes) ``Authorization: Bearer``; and remembers
every request (path, query, the key headers, ``anthropic-version``/``-beta``, the model).

- ``POST .../v1/messages``: a message; with ``"stream": true`` the SSE events the real API
  sends (``message_start`` with input and cache usage, ``ping``s, a text block, a
  ``tool_use`` block built from ``input_json_delta``s when the request has ``tools``,
  ``message_delta`` with the output count, ``message_stop``), in several chunks.
- ``POST .../v1/messages/count_tokens``: ``{"input_tokens": 42}``.
- ``GET .../v1/models``: two models in Anthropic's shape.

A request's body may carry ``"test": {...}`` (the SDK's ``extra_body``): ``status`` (answer
that error: 401 authentication, 429 rate limit with ``retry_after``, 529 overloaded, any
other), ``cut`` (drop the connection mid-stream), ``no_stop`` (end the stream cleanly
without ``message_stop``), ``stall`` (stop sending mid-stream, connection left open),
``trickle`` (pings every 50 ms for 10 s; a reader that leaves is logged as ``gone``).
Control: ``GET/DELETE /_anth/log``; ``POST /_anth/config`` with ``valid_keys`` (None: any
key), ``fail_next`` (a list of ``test`` objects used by
the next requests, one each). Run as a process (``python tests/anthropic_upstream.py
--port 0`` prints ``LISTENING <port>``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web

LOG = web.AppKey("log", list[dict[str, Any]])
CONFIG = web.AppKey("config", dict[str, Any])
INPUT_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 5,
    "cache_read_input_tokens": 10,
    "output_tokens": 1,
}
OUTPUT_TOKENS = 15
TOOL_INPUT = {"city": "Paris", "unit": "celsius"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def make_app() -> web.Application:
    app = web.Application()
    app[LOG] = []
    app[CONFIG] = {"valid_keys": None, "fail_next": []}
    app.router.add_get("/_anth/log", _get_log)
    app.router.add_delete("/_anth/log", _clear_log)
    app.router.add_post("/_anth/config", _configure)
    app.router.add_post("/{prefix:.*}v1/messages", _messages)
    app.router.add_post("/{prefix:.*}v1/messages/count_tokens", _count_tokens)
    app.router.add_get("/{prefix:.*}v1/models", _models)
    return app


async def _get_log(request: web.Request) -> web.Response:
    return web.json_response(request.app[LOG])


async def _clear_log(request: web.Request) -> web.Response:
    request.app[LOG].clear()
    request.app[CONFIG].update(valid_keys=None, fail_next=[])
    return web.json_response({})


async def _configure(request: web.Request) -> web.Response:
    request.app[CONFIG].update(await request.json())
    return web.json_response(request.app[CONFIG])


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": "req_upstream_err",
    }
    return web.json_response(body, status=status, headers=headers)


def _wants_bearer(request: web.Request) -> bool:
    """Under ``/xkey/`` the key must come in ``x-api-key``; anywhere else (``/bearer/``,
    and the OpenAI side the proxy probes with ``GET /models``) as a Bearer token."""
    return not request.path.startswith("/xkey/")


def _presented_key(request: web.Request) -> str | None:
    if _wants_bearer(request):
        value = request.headers.get("authorization", "")
        return value.removeprefix("Bearer ") if value.startswith("Bearer ") else None
    return request.headers.get("x-api-key")


async def _admit(request: web.Request, body: dict[str, Any] | None) -> web.Response | None:
    """Log the request; an error answer when the key or a test setting says so."""
    config = request.app[CONFIG]
    key = _presented_key(request)
    request.app[LOG].append(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "x-api-key": request.headers.get("x-api-key"),
            "authorization": request.headers.get("authorization"),
            "anthropic-version": request.headers.get("anthropic-version"),
            "anthropic-beta": request.headers.get("anthropic-beta"),
            "model": (body or {}).get("model"),
        }
    )
    if key is None:
        where = "Authorization: Bearer" if _wants_bearer(request) else "x-api-key"
        return error(401, f"missing key: expected it in {where}")
    if config["valid_keys"] is not None and key not in config["valid_keys"]:
        return error(401, "invalid x-api-key")
    test = _test(request, body)
    status = test.get("status")
    if status is not None:
        headers = {}
        if "retry_after" in test:
            headers["retry-after"] = str(test["retry_after"])
        return error(int(status), test.get("message", f"test error {status}"), headers)
    return None


def _test(request: web.Request, body: dict[str, Any] | None) -> dict[str, Any]:
    pending = request.app[CONFIG]["fail_next"]
    if pending:
        return dict(pending.pop(0))
    test = (body or {}).get("test")
    return test if isinstance(test, dict) else {}


async def _messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    refused = await _admit(request, body)
    if refused is not None:
        return refused
    test = body.get("test") if isinstance(body.get("test"), dict) else {}
    if body.get("stream") is True:
        return await _stream(request, body, test)
    return web.json_response(_message(body), headers={"request-id": "req_upstream_1"})


def _message(body: dict[str, Any]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": "Hello from the fake."}]
    if body.get("tools"):
        content.append(
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": TOOL_INPUT}
        )
    return {
        "id": "msg_fake_1",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": "tool_use" if body.get("tools") else "end_turn",
        "stop_sequence": None,
        "usage": {**INPUT_USAGE, "output_tokens": OUTPUT_TOKENS},
    }


def event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(body: dict[str, Any]) -> list[bytes]:
    """The events of one streamed answer, in the real API's order (deterministic: the same
    request gives the same bytes, so a test can compare through-proxy with direct)."""
    message = {**_message(body), "content": [], "stop_reason": None, "usage": INPUT_USAGE}
    events = [
        event("message_start", {"type": "message_start", "message": message}),
        event("ping", {"type": "ping"}),
        event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    ]
    for piece in ("Hello", " from", " the fake."):
        delta = {"type": "text_delta", "text": piece}
        events.append(
            event(
                "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
            )
        )
    events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    stop_reason = "end_turn"
    if body.get("tools"):
        stop_reason = "tool_use"
        block = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}
        events.append(
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 1, "content_block": block},
            )
        )
        text = json.dumps(TOOL_INPUT)
        for part in (text[:9], text[9:20], text[20:]):
            delta = {"type": "input_json_delta", "partial_json": part}
            events.append(
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 1, "delta": delta},
                )
            )
        events.append(event("content_block_stop", {"type": "content_block_stop", "index": 1}))
    events.append(event("ping", {"type": "ping"}))
    events.append(
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": OUTPUT_TOKENS},
            },
        )
    )
    events.append(event("message_stop", {"type": "message_stop"}))
    return events


async def _stream(
    request: web.Request, body: dict[str, Any], test: dict[str, Any]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream", "request-id": "req_upstream_s"}
    )
    await response.prepare(request)
    try:
        await _write_events(request, response, body, test)
    except (ConnectionError, asyncio.CancelledError):
        request.app[LOG].append({"method": "-", "path": request.path, "gone": True})
        raise
    if test.get("cut"):
        assert request.transport is not None
        request.transport.close()  # no terminating chunk: a broken connection
        return response
    await response.write_eof()
    return response


async def _write_events(
    request: web.Request, response: web.StreamResponse, body: dict[str, Any], test: dict[str, Any]
) -> None:
    events = stream_events(body)
    if test.get("cut") or test.get("stall") or test.get("trickle") or test.get("no_stop"):
        events = events[:4] if not test.get("no_stop") else events[:-1]
    for i, data in enumerate(events):
        # Some events split in two chunks, some chunks holding two events: relays must not
        # care where the chunks are cut.
        if i % 3 == 1:
            await response.write(data[:7])
            await asyncio.sleep(0.001)
            await response.write(data[7:])
        else:
            await response.write(data)
        await asyncio.sleep(0.001)
    if test.get("stall"):
        await asyncio.sleep(3600)
    if test.get("trickle"):  # a long answer: pings until the reader goes away
        for _ in range(200):
            await asyncio.sleep(0.05)
            await response.write(event("ping", {"type": "ping"}))


async def _count_tokens(request: web.Request) -> web.Response:
    body = await request.json()
    refused = await _admit(request, body)
    return refused or web.json_response({"input_tokens": 42})


async def _models(request: web.Request) -> web.Response:
    refused = await _admit(request, None)
    if refused is not None:
        return refused
    data = [
        {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
        for m in ("claude-fake-1", "kimi-k2-anthropic")
    ]
    return web.json_response(
        {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    )


async def _serve(port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    assert site._server is not None
    sockets = getattr(site._server, "sockets", None) or []
    print(f"LISTENING {sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
