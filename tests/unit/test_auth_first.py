"""Issue 19: the client key is checked from the headers before any body byte is read; an
unauthenticated request never holds memory, disk or an upload slot, and its connection
closes after the 401; a client's streamed uploads are capped, and each has a deadline."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
import pytest

from proxy import forward
from proxy.access_log import AccessLog
from proxy.bodies import SpillBudget, Upload, UploadSlots
from proxy.config import parse_config
from proxy.runtime import Runtime, build_runtime

CLIENT_KEY = "ck-team-a-000000000000"
CONFIG = f"""
server: {{config_poll_interval: 0, max_uploads_per_client: 1}}
backends:
  main:
    base_url: http://127.0.0.1:9/v1
    keys: [{{id: k1, key: sk-main-1111111111}}]
routes:
  - {{prefix: "m-", backend: main}}
  - {{prefix: "claude-", backend: main}}
clients:
  - {{id: team-a, key: {CLIENT_KEY}}}
"""
FORM = b"multipart/form-data; boundary=XX"


class Wire:
    """An ASGI receive/send pair: counts body reads, which block until ``release``."""

    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        await self.release.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> Any:
        return orjson.loads(self.sent[1]["body"])


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-length", b"1000000"), *headers],
        "client": ("127.0.0.1", 5000),
    }


def runtime() -> Runtime:
    return build_runtime(parse_config(CONFIG, "auth.yaml", {}))


async def served(rt: Runtime, wire: Wire, s: dict[str, Any]) -> None:
    await forward.handle(rt, AccessLog(out=io.StringIO()), s, wire.receive, wire.send)


@pytest.mark.parametrize(
    ("path", "headers", "shape"),
    [
        ("/v1/files", [(b"content-type", FORM)], "openai"),
        (
            "/v1/audio/transcriptions",
            [(b"content-type", FORM), (b"authorization", b"Bearer no")],
            "openai",
        ),
        ("/v1/chat/completions", [(b"content-type", b"application/json")], "openai"),
        (
            "/v1/messages",
            [(b"content-type", b"application/json"), (b"x-api-key", b"bad")],
            "anthropic",
        ),
    ],
)
def test_no_valid_key_is_401_before_any_body_byte_and_closes(
    path: str, headers: list[tuple[bytes, bytes]], shape: str
) -> None:
    async def main() -> Wire:
        wire, spilled = Wire(), SpillBudget.held
        await asyncio.wait_for(served(runtime(), wire, scope(path, headers)), 2)
        assert SpillBudget.held == spilled and UploadSlots.held == {}
        return wire

    wire = asyncio.run(main())
    assert wire.reads == 0  # not one byte of the body was asked for
    assert wire.status == 401
    assert wire.headers[b"connection"] == b"close"
    if shape == "openai":
        assert wire.body["error"]["code"] == "invalid_api_key"
    else:
        assert wire.body["type"] == "error"
        assert wire.body["error"]["type"] == "authentication_error"


def test_a_clients_uploads_beyond_its_cap_are_429_with_retry_after() -> None:
    headers = [(b"content-type", FORM), (b"authorization", f"Bearer {CLIENT_KEY}".encode())]

    async def main() -> tuple[Wire, Wire, dict[str, int]]:
        rt = runtime()
        first, second = Wire(), Wire()
        holding = asyncio.ensure_future(served(rt, first, scope("/v1/files", headers)))
        while first.reads == 0:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(served(rt, second, scope("/v1/files", headers)), 2)
        first.release.set()  # the first client leaves: its slot is given back
        await asyncio.wait_for(holding, 2)
        return first, second, dict(UploadSlots.held)

    _, second, held = asyncio.run(main())
    assert second.reads == 0 and second.status == 429
    assert second.body["error"]["code"] == "too_many_uploads"
    assert second.headers[b"retry-after"] == b"1"
    assert held == {}


def test_an_upload_trickling_past_its_deadline_is_408() -> None:
    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"-", "more_body": True}

    async def main() -> None:
        upload = Upload(trickle, [(b"content-type", FORM)], 10**9, 10**9, 10**10, deadline=0.3)
        await upload.read_head(b"XX", model_optional=False)

    with pytest.raises(forward.ProxyError) as caught:
        asyncio.run(asyncio.wait_for(main(), 3))
    assert caught.value.status == 408 and caught.value.code == "request_timeout"
