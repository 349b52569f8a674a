"""A fake OpenAI upstream for the resource endpoints: uploads, files, batches, responses,
speech, downloads. Objects belong to the key that created them, as on OpenAI (a key is a
project): any other key gets a 404 for them, so a request routed with the wrong key fails.

Run: ``python tests/resource_upstream.py --port 0`` prints ``LISTENING <port>``.
Control: ``GET /_mock/requests`` lists what came in (method, path, key, model, sha256 of
uploaded files, sizes); ``DELETE /_mock/requests`` forgets it. ``POST /_mock/batches/{id}``
with ``{"status", "usage"}`` ends a batch as the upstream would once it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import sys
from typing import Any

from aiohttp import BodyPartReader, web

CREATED = 1700000000
_HEAD_KEPT = 64 * 1024  # a file at most this big is recorded whole (its lines)
_ids = itertools.count(1)
# Ids unique across upstream processes: tests sharing one Redis (its placement records
# outlive a module's upstream) must never see another run's "resp_3".
_RUN = os.urandom(3).hex()


class Store:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.objects: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (key, object)
        self.contents: dict[str, bytes] = {}

    def own(self, key: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[obj["id"]] = (key, obj)
        return obj

    def get(self, key: str, object_id: str) -> dict[str, Any] | None:
        found = self.objects.get(object_id)
        return found[1] if found is not None and found[0] == key else None


def _key(request: web.Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")


def _not_found(what: str) -> web.Response:
    error = {"message": f"No such {what}", "type": "invalid_request_error", "param": None}
    return web.json_response({"error": {**error, "code": None}}, status=404)


def _record(request: web.Request, **extra: Any) -> None:
    entry = {"method": request.method, "path": request.path, "key": _key(request), **extra}
    request.app["store"].requests.append(entry)


async def _read_form(request: web.Request) -> tuple[dict[str, str], dict[str, Any]]:
    """The form's fields, and its file's name, size and sha256 (read in pieces)."""
    fields: dict[str, str] = {}
    upload: dict[str, Any] = {}
    reader = await request.multipart()
    order: list[str] = []
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        order.append(part.name or "")
        if part.filename is None:
            fields[part.name or ""] = (await part.read()).decode()
            continue
        digest, size, head = hashlib.sha256(), 0, b""
        while chunk := await part.read_chunk(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
            head = (head + chunk)[:_HEAD_KEPT]
        upload = {"filename": part.filename, "size": size, "sha256": digest.hexdigest()}
        if size <= _HEAD_KEPT:  # a small file's lines, for tests of batch files
            upload["lines"] = head.decode("latin-1").split("\n")
    upload["order"] = order
    return fields, upload


async def transcribe(request: web.Request) -> web.Response:
    fields, upload = await _read_form(request)
    _record(request, model=fields.get("model"), **upload)
    return web.json_response({"text": f"{upload.get('size', 0)} bytes heard"})


async def create_file(request: web.Request) -> web.Response:
    store: Store = request.app["store"]
    fields, upload = await _read_form(request)
    _record(request, **upload)
    file = {
        "id": f"file-{_RUN}{next(_ids)}",
        "object": "file",
        "bytes": upload.get("size", 0),
        "created_at": CREATED,
        "filename": upload.get("filename", ""),
        "purpose": fields.get("purpose", ""),
        "status": "processed",
    }
    store.contents[file["id"]] = upload.get("sha256", "").encode()
    return web.json_response(store.own(_key(request), file))


async def list_files(request: web.Request) -> web.Response:
    _record(request)
    store: Store = request.app["store"]
    key = _key(request)
    data = [o for k, o in store.objects.values() if k == key and o["object"] == "file"]
    after = request.query.get("after")  # OpenAI's cursor: the items after this id
    if after is not None:
        ids = [o["id"] for o in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    limit = int(request.query.get("limit", "10000"))
    page = {"object": "list", "data": data[:limit], "has_more": len(data) > limit}
    return web.json_response(page)


async def file_object(request: web.Request) -> web.Response:
    _record(request)
    store: Store = request.app["store"]
    file_id = request.match_info["id"]
    found = store.get(_key(request), file_id)
    if found is None:
        return _not_found("file")
    if request.method == "DELETE":
        del store.objects[file_id]
        return web.json_response({"id": file_id, "object": "file", "deleted": True})
    return web.json_response(found)


async def file_content(request: web.Request) -> web.StreamResponse:
    """A file's bytes; ``file-big`` is ``?size=`` bytes sent in pieces, ``?pause=`` seconds
    after the first one (so a test sees the first byte before the last is sent)."""
    _record(request)
    store: Store = request.app["store"]
    file_id = request.match_info["id"]
    if file_id != "file-big" and store.get(_key(request), file_id) is None:
        return _not_found("file")
    size = int(request.query.get("size", "1000"))
    pause = float(request.query.get("pause", "0"))
    response = web.StreamResponse(headers={"content-type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    piece = bytes(range(256)) * 1024  # 256 KiB
    sent = 0
    while sent < size:
        chunk = piece[: min(len(piece), size - sent)]
        await response.write(chunk)
        sent += len(chunk)
        if sent == len(chunk) and pause:
            await asyncio.sleep(pause)
        if sent == len(chunk) and "cut" in request.query:
            assert request.transport is not None
            request.transport.close()  # the connection dies mid-body
            return response
    await response.write_eof()
    return response


async def create_batch(request: web.Request) -> web.Response:
    body = await request.json()
    _record(request, body=body)
    store: Store = request.app["store"]
    if store.get(_key(request), body.get("input_file_id", "")) is None:
        return _not_found("input file")
    batch = {
        "id": f"batch_{_RUN}{next(_ids)}",
        "object": "batch",
        "endpoint": body.get("endpoint"),
        "input_file_id": body["input_file_id"],
        "completion_window": body.get("completion_window", "24h"),
        "status": "validating",
        "created_at": CREATED,
    }
    return web.json_response(store.own(_key(request), batch))


async def list_batches(request: web.Request) -> web.Response:
    _record(request)
    store: Store = request.app["store"]
    key = _key(request)
    data = [o for k, o in store.objects.values() if k == key and o["object"] == "batch"]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    page = {"object": "list", "data": data, "first_id": first, "last_id": last}
    return web.json_response({**page, "has_more": False})


async def batch_object(request: web.Request) -> web.Response:
    body = await request.read()
    _record(request, body_size=len(body))
    store: Store = request.app["store"]
    batch = store.get(_key(request), request.match_info["id"])
    if batch is None:
        return _not_found("batch")
    if request.path.endswith("/cancel"):
        batch["status"] = "cancelling"
    return web.json_response(batch)


def _response(key: str, model: str, previous: str | None, text: str) -> dict[str, Any]:
    return {
        "id": f"resp_{_RUN}{next(_ids)}",
        "object": "response",
        "created_at": CREATED,
        "status": "completed",
        "model": model,
        "previous_response_id": previous,
        "output": [
            {
                "type": "message",
                "id": f"msg_{_RUN}{next(_ids)}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        "key_seen": key[-4:],
    }


async def create_response(request: web.Request) -> web.Response:
    body = await request.json()
    key = _key(request)
    _record(request, model=body.get("model"), previous=body.get("previous_response_id"))
    store: Store = request.app["store"]
    previous = body.get("previous_response_id")
    if previous is not None and store.get(key, previous) is None:
        return _not_found(f"previous response '{previous}' for this project")
    answer = _response(key, body.get("model", ""), previous, "hello")
    return web.json_response(store.own(key, answer))


async def response_object(request: web.Request) -> web.Response:
    _record(request)
    found = request.app["store"].get(_key(request), request.match_info["id"])
    return _not_found("response") if found is None else web.json_response(found)


async def create_chat(request: web.Request) -> web.Response:
    """A chat completion, kept (and retrievable) when the request said ``store: true``."""
    body = await request.json()
    key = _key(request)
    _record(request, model=body.get("model"))
    answer = {
        "id": f"chatcmpl-{_RUN}{next(_ids)}",
        "object": "chat.completion",
        "created": CREATED,
        "model": body.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    if body.get("store") is True:
        request.app["store"].own(key, answer)
    return web.json_response(answer)


async def chat_object(request: web.Request) -> web.Response:
    _record(request)
    found = request.app["store"].get(_key(request), request.match_info["id"])
    return _not_found("chat completion") if found is None else web.json_response(found)


async def speech(request: web.Request) -> web.StreamResponse:
    """Audio generated over time: one piece at once, the rest ``pause`` seconds later."""
    body = await request.json()
    _record(request, model=body.get("model"))
    pause = float(body.get("pause", 0.0))
    response = web.StreamResponse(headers={"content-type": "audio/mpeg"})
    await response.prepare(request)
    for i in range(4):
        await response.write(b"ID3" + bytes([i]) * 4096)
        if i == 0 and pause:
            await asyncio.sleep(pause)
    await response.write_eof()
    return response


async def model_object(request: web.Request) -> web.Response:
    """A fine-tuned model: retrieved, or deleted."""
    _record(request)
    model_id = request.match_info["id"]
    if request.method == "DELETE":
        return web.json_response({"id": model_id, "object": "model", "deleted": True})
    return web.json_response({"id": model_id, "object": "model", "created": 0, "owned_by": "me"})


async def requests_log(request: web.Request) -> web.Response:
    store: Store = request.app["store"]
    if request.method == "DELETE":
        store.requests.clear()
    return web.json_response(store.requests)


# The other object types, kept the same way (per key) by one generic handler each:
# collection path -> (object type, id prefix).
COLLECTIONS = {
    "vector_stores": ("vector_store", "vs"),
    "conversations": ("conversation", "conv"),
    "containers": ("container", "cntr"),
    "fine_tuning/jobs": ("fine_tuning.job", "ftjob"),
    "evals": ("eval", "eval"),
    "uploads": ("upload", "upload"),
}


def _collection(request: web.Request) -> str:
    path = request.path.removeprefix("/v1/")
    return next(c for c in sorted(COLLECTIONS, key=len, reverse=True) if path.startswith(c))


async def create_object(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    _record(request)
    kind, prefix = COLLECTIONS[_collection(request)]
    store: Store = request.app["store"]
    obj: dict[str, Any] = {**body, "id": f"{prefix}_{_RUN}{len(store.objects)}", "object": kind}
    obj["created_at"] = CREATED
    if kind == "fine_tuning.job":
        obj["fine_tuned_model"] = f"ft:{body.get('model', 'gpt-4o-mini')}:org::{obj['id']}"
        obj["status"] = "succeeded"
    return web.json_response(store.own(_key(request), obj))


async def list_objects(request: web.Request) -> web.Response:
    _record(request)
    kind = COLLECTIONS[_collection(request)][0]
    key = _key(request)
    objects = request.app["store"].objects.values()
    data = [o for k, o in objects if k == key and o["object"] == kind]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    page = {"object": "list", "data": data, "first_id": first, "last_id": last}
    return web.json_response({**page, "has_more": False})


async def an_object(request: web.Request) -> web.Response:
    await request.read()
    _record(request)
    store: Store = request.app["store"]
    obj = store.get(_key(request), request.match_info["id"])
    if obj is None:
        return _not_found(COLLECTIONS[_collection(request)][0])
    if request.method == "DELETE":
        del store.objects[obj["id"]]
        return web.json_response(
            {"id": obj["id"], "object": obj["object"] + ".deleted", "deleted": True}
        )
    if request.path.endswith("/cancel"):
        obj["status"] = "cancelled"
    return web.json_response(obj)


def make_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app["store"] = Store()
    app.router.add_post("/v1/audio/transcriptions", transcribe)
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_route("*", "/v1/files/{id}", file_object)
    app.router.add_get("/v1/files/{id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_route("*", "/v1/batches/{id}", batch_object)
    app.router.add_post("/v1/batches/{id}/cancel", batch_object)
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{id}", response_object)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/v1/chat/completions", create_chat)
    app.router.add_get("/v1/chat/completions/{id}", chat_object)
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": []}))
    app.router.add_route("*", "/v1/models/{id}", model_object)
    for collection in COLLECTIONS:
        app.router.add_post(f"/v1/{collection}", create_object)
        app.router.add_get(f"/v1/{collection}", list_objects)
        app.router.add_route("*", f"/v1/{collection}/{{id}}", an_object)
        app.router.add_post(f"/v1/{collection}/{{id}}/cancel", an_object)
    app.router.add_route("*", "/_mock/requests", requests_log)
    app.router.add_post("/_mock/batches/{id}", end_batch)
    return app


async def end_batch(request: web.Request) -> web.Response:
    store: Store = request.app["store"]
    found = store.objects.get(request.match_info["id"])
    if found is None:
        return _not_found("batch")
    found[1].update(await request.json())
    return web.json_response(found[1])


async def main(port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"LISTENING {bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    try:
        asyncio.run(main(parser.parse_args().port))
    except KeyboardInterrupt:
        sys.exit(0)
