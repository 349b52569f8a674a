"""The floor the benchmark compares against: the least a Python LLM proxy can be.

Starlette + one pooled aiohttp session, the same server (uvicorn, uvloop, httptools, one
worker, no access log) and the same upstream; it forwards ``POST /v1/chat/completions``
with its body, the key swapped, and relays the answer chunk by chunk. No auth, routing,
limits, accounting or checks: everything ours does beyond this is what the ratio prices.

Environment: BENCH_UPSTREAM (the upstream's base URL), BENCH_CA_FILE (a CA to trust for an
https upstream), MINIMAL_PORT.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ["BENCH_UPSTREAM"] + "/v1/chat/completions"
CA_FILE = os.environ.get("BENCH_CA_FILE")
session: aiohttp.ClientSession | None = None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=CA_FILE) if CA_FILE else True
    connector = aiohttp.TCPConnector(limit=0, ssl=tls)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    yield
    await session.close()


async def chat(request: Request) -> Response:
    assert session is not None
    body = await request.body()
    headers = {"authorization": "Bearer sk-upstream", "content-type": "application/json"}
    upstream = await session.post(UPSTREAM, data=body, headers=headers)
    kind = upstream.headers.get("content-type", "application/json")
    if kind.startswith("text/event-stream"):

        async def relay():  # type: ignore[no-untyped-def]
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
            finally:
                upstream.release()

        return StreamingResponse(relay(), status_code=upstream.status, media_type=kind)
    data = await upstream.read()
    upstream.release()
    return Response(data, status_code=upstream.status, media_type=kind)


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])], lifespan=lifespan)

if __name__ == "__main__":
    port = int(os.environ.get("MINIMAL_PORT", "8091"))
    uvicorn.run(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False,
        log_level="warning",
    )  # fmt: skip
