"""A fake Realtime upstream: an aiohttp WebSocket server for ``.../realtime?model=…``.

It checks the key each handshake came with (``Authorization: Bearer``), remembers what it
saw (path, query, key, subprotocols, headers, the close code it got), echoes every message
unchanged, and obeys a few test events sent as text:

- ``{"type": "response.create"}`` → a ``response.done`` with usage (11 in, 7 out);
- ``{"type": "test.close", "code": 4001, "reason": "bye"}`` → closes with that code;
- ``{"type": "test.big", "size": N}`` → one text message of N bytes;
- ``{"type": "test.flood", "count": N}`` → N small text messages;
- ``{"type": "test.vanish"}`` → drops the TCP connection, no close frame;
- ``{"type": "test.silent"}`` → stops reading (no pong ever again), socket left open.

Control: ``GET/DELETE /_rt/log``; ``POST /_rt/config`` with ``valid_keys`` (None: any),
``invalid_keys`` (401), ``limited_keys`` ({key: retry-after seconds}, 429),
``fail_status`` (every handshake answered with it), ``handshake_delay`` (seconds). Run as a process
(``python tests/realtime_upstream.py --port 0`` prints ``LISTENING <port>``) or in-process
with ``make_app()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import WSMsgType, web

USAGE = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}
PROTOCOLS = ("realtime", "openai-beta.realtime-v1")
LOG = web.AppKey("log", list[dict[str, Any]])
CONFIG = web.AppKey("config", dict[str, Any])


def make_app() -> web.Application:
    app = web.Application()
    app[LOG] = []
    app[CONFIG] = _default_config()
    app.router.add_get("/_rt/log", _get_log)
    app.router.add_delete("/_rt/log", _clear_log)
    app.router.add_post("/_rt/config", _configure)
    app.router.add_get("/{prefix:.*}/models", _models)
    app.router.add_get("/{prefix:.*}/realtime", _realtime)
    return app


def _default_config() -> dict[str, Any]:
    return {
        "valid_keys": None,
        "invalid_keys": [],
        "limited_keys": {},
        "fail_status": None,
        "handshake_delay": 0,
    }


async def _get_log(request: web.Request) -> web.Response:
    return web.json_response(request.app[LOG])


async def _clear_log(request: web.Request) -> web.Response:
    request.app[LOG].clear()
    request.app[CONFIG].clear()
    request.app[CONFIG].update(_default_config())
    return web.json_response({})


async def _configure(request: web.Request) -> web.Response:
    request.app[CONFIG].update(await request.json())
    return web.json_response(request.app[CONFIG])


async def _models(request: web.Request) -> web.Response:
    """The proxy's key probes: a key refused at the handshake is refused here too."""
    if _bearer(request) in request.app[CONFIG]["invalid_keys"]:
        return _error(401, "Incorrect API key provided.")
    return web.json_response({"object": "list", "data": [{"id": "gpt-realtime"}]})


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    return web.json_response(body, status=status, headers=headers)


async def _realtime(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    key = _bearer(request)
    entry: dict[str, Any] = {
        "path": request.path,
        "query": request.query_string,
        "key": key,
        "protocols": [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p
        ],
        "openai_beta": request.headers.get("OpenAI-Beta"),
        "extra": request.headers.get("X-Backend-Extra"),
        "status": None,
        "close_code": None,
        "close_reason": None,
        "received": 0,
    }
    request.app[LOG].append(entry)
    if config["handshake_delay"]:
        await asyncio.sleep(config["handshake_delay"])
    if config["fail_status"]:
        entry["status"] = config["fail_status"]
        return _error(config["fail_status"], "failing on purpose")
    if (
        key is None
        or key in config["invalid_keys"]
        or (config["valid_keys"] is not None and key not in config["valid_keys"])
    ):
        entry["status"] = 401
        return _error(401, "Incorrect API key provided.")
    if key in config["limited_keys"]:
        entry["status"] = 429
        return _error(429, "Rate limited.", {"retry-after": str(config["limited_keys"][key])})
    ws = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=0, autoping=True)
    await ws.prepare(request)
    entry["status"] = 101
    model = request.query.get("model")
    await ws.send_str(json.dumps({"type": "session.created", "session": {"model": model}}))
    while True:
        message = await ws.receive()
        if message.type is WSMsgType.CLOSE:  # aiohttp has answered it
            entry["close_code"], entry["close_reason"] = message.data, message.extra
            return ws
        if message.type in (WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
            entry["close_code"] = ws.close_code
            return ws
        entry["received"] += 1
        try:
            if message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
            elif message.type is WSMsgType.TEXT and await _obey(request, ws, message.data):
                return ws
        except ConnectionResetError:  # the peer left while we answered
            entry["close_code"] = ws.close_code
            return ws


async def _obey(request: web.Request, ws: web.WebSocketResponse, text: str) -> str | None:
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    kind = event.get("type") if isinstance(event, dict) else None
    if kind == "response.create":
        done = {"type": "response.done", "response": {"id": "resp_1", "usage": USAGE}}
        await ws.send_str(json.dumps(done))
    elif kind == "test.close":
        await ws.close(code=event["code"], message=event.get("reason", "").encode())
        return "stop"
    elif kind == "test.big":
        await ws.send_str("x" * int(event["size"]))
    elif kind == "test.flood":
        for i in range(int(event["count"])):
            await ws.send_str(f'{{"type":"flood","i":{i}}}')
    elif kind == "test.vanish":
        assert request.transport is not None
        request.transport.abort()
        return "stop"
    elif kind == "test.silent":
        assert request.transport is not None
        request.transport.pause_reading()  # pings are never read, never answered
        await asyncio.sleep(3600)
    else:
        await ws.send_str(text)  # echoed exactly as it came
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    async def run() -> None:
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"LISTENING {port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
