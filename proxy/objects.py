"""Objects stick to where they were made: object id → (backend, key id).

A file, batch, vector store, response, conversation or upload made through the proxy exists
only on the backend that made it and, with several keys, only for that key's project. The
pipeline records the ids a successful answer created (``created_ids`` then ``remember``) and
sends every later request that names one of them (``named_ids`` then ``lookup``) to the same
backend with the same key, whatever round-robin would pick.

Both extractors are bounded whatever the input: they read named fields only (never walk a
document), scan at most ``_MAX_ITEMS`` items of any list, and return at most ``MAX_IDS`` ids,
each matching ``_ID`` (so no model id, prompt text or 10 MB string ever becomes a key). A
hostile upstream can therefore record at most ``MAX_IDS`` short ids per answer, and the
stores are bounded anyway: in memory by ``max_entries``, in Redis by the TTL on every key.

The stores never raise into the request path: Redis down, hung or holding garbage means
"not found" (the request is routed as if the id were unknown) and a dropped ``remember``,
logged at most once a minute and counted in ``errors``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard, TypeVar

import orjson
import redis.asyncio

log = logging.getLogger("proxy.objects")

T = TypeVar("T")

MAX_IDS = 64  # ids one answer may record, or one request may name
DEFAULT_TTL = 30 * 24 * 3600.0  # OpenAI keeps stored responses 30 days
DEFAULT_MAX_ENTRIES = 100_000
REDIS_PREFIX = "objects/"  # like "shared/..." and "reconnect/streak/...": one namespace each
REDIS_TIMEOUT = 0.25  # without the throttle's health-aware guard: the longest a call may take
_LOG_EVERY = 60.0  # seconds between two log lines about a failing store
_MAX_ITEMS = 64  # items of any one list looked at (messages, input, tools, output, file_ids)
_MAX_PARTS = 16  # content parts looked at per message
_MAX_SEGMENTS = 12  # path segments looked at
_MAX_NAME = 256  # backend names and key ids read back from Redis
_SEP = "\x1f"  # between backend and key id in a Redis value; config names never hold it
_MAX_LINES = 999_999_999  # a batch file's line count, as stored (OpenAI's cap is 50,000)

# An object id: OpenAI's are `file-…`, `resp_…`, `chatcmpl-…`, `ftjob-…`; at most 128 chars.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{2,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_id(value: object) -> TypeGuard[str]:
    # Length first: fullmatch on a 10 MB string would scan it all before failing.
    return isinstance(value, str) and 3 <= len(value) <= 128 and _ID.fullmatch(value) is not None


# ---------------------------------------------------------------- what an answer created

# `object` values of answers that create (or show) something stored upstream: their `id` is
# recorded. Lists, models, deletions and anything unknown are not.
_STORED_OBJECTS = frozenset(
    {
        "file",
        "batch",
        "upload",
        "vector_store",
        "vector_store.file",
        "vector_store.file_batch",
        "response",
        "conversation",
        "chat.completion",
        "fine_tuning.job",
        "container",
        "container.file",
        "eval",
        "eval.run",
        "assistant",
        "thread",
        "thread.run",
        "video",
    }
)
# Ids of other objects an answer reveals, made by the upstream later or alongside.
# A fine-tuned model exists only for the project (key) whose job made it.
_SCALAR_REFS = ("output_file_id", "error_file_id", "thread_id", "fine_tuned_model")
_LIST_REFS = ("result_files",)  # a fine-tuning job's result files


def created_ids(
    path: str, method: str, status: int, body: bytes, payload: Mapping[str, Any] | None = None
) -> list[str]:
    """The ids of the objects a successful JSON answer created or shows, to ``remember``.

    ``path`` is the path after ``/v1`` (a leading ``/v1`` is tolerated), ``payload`` the
    request's parsed JSON body when there was one: a chat completion is recorded only when
    the request asked for ``store: true``, a response unless it said ``store: false``
    (OpenAI's defaults), so unstored answers cost nothing.
    """
    if status < 200 or status > 299 or method == "DELETE" or b'"id"' not in body:
        return []
    path = _strip_v1(path)
    if path == "/chat/completions" and (payload is None or payload.get("store") is not True):
        return []
    if path == "/responses" and payload is not None and payload.get("store") is False:
        return []
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(document, dict) or document.get("deleted") is True:
        return []
    return _ids_of_object(document)


def event_created_ids(
    path: str, data: bytes, payload: Mapping[str, Any] | None = None
) -> list[str]:
    """The ids one streamed event's ``data:`` reveals: a Responses stream's
    ``response.created`` (its response), a code-interpreter item's ``container_id``, or a
    stored chat completion's chunk id. Cheap on every other event (a substring test)."""
    path = _strip_v1(path)
    if path == "/responses":
        if payload is not None and payload.get("store") is False:
            return []
        if b'"response.created"' not in data and b'"container_id"' not in data:
            return []
        event = _loads_dict(data)
        if event is None:
            return []
        response = event.get("response")
        if isinstance(response, dict) and event.get("type") == "response.created":
            return _ids_of_object(response)
        item = event.get("item")
        if isinstance(item, dict) and _is_id(item.get("container_id")):
            return [item["container_id"]]
        return []
    if path == "/chat/completions" and payload is not None and payload.get("store") is True:
        chunk = _loads_dict(data) if b'"chat.completion.chunk"' in data else None
        if chunk is not None and _is_id(chunk.get("id")):
            return [chunk["id"]]
    return []


def _ids_of_object(document: Mapping[str, Any]) -> list[str]:
    kind = document.get("object")
    if kind not in _STORED_OBJECTS:
        return []
    found: list[str] = []
    _add(found, document.get("id"))
    for name in _SCALAR_REFS:
        _add(found, document.get(name))
    for name in _LIST_REFS:
        _add_all(found, document.get(name))
    nested = document.get("file")  # a completed upload holds the file it made
    if isinstance(nested, dict):
        _add(found, nested.get("id"))
    output = document.get("output")  # a response's code interpreter may create a container
    if isinstance(output, list):
        for item in output[:_MAX_ITEMS]:
            if isinstance(item, dict):
                _add(found, item.get("container_id"))
    return found


# ---------------------------------------------------------------- what a request names

# Path roots whose next segment is an object id, then `{sub-collection}/{id}` pairs below it
# (`/vector_stores/vs_1/files/file-2`). Roots are matched on whole segments.
_ROOTS: tuple[tuple[str, ...], ...] = (
    ("chat", "completions"),
    ("fine_tuning", "jobs"),
    ("files",),
    ("batches",),
    ("uploads",),
    ("vector_stores",),
    ("responses",),
    ("conversations",),
    ("containers",),
    ("evals",),
    ("assistants",),
    ("threads",),
    ("videos",),
)
_ROOT_OF: dict[str, tuple[str, ...]] = {root[0]: root for root in _ROOTS if len(root) == 1}
_LONG_ROOTS = tuple(root for root in _ROOTS if len(root) > 1)
# Words in an id's place that are endpoints, not ids (`/responses/input_tokens`).
_NOT_IDS = frozenset({"input_tokens", "compact", "runs", "search"})

_SCALAR_FIELDS = (
    "previous_response_id",
    "response_id",
    "conversation",
    "thread_id",
    "assistant_id",
    "upload_id",
    "input_file_id",
    "file_id",
    "training_file",
    "validation_file",
    "container",
    "container_id",
)
_LIST_FIELDS = ("vector_store_ids", "file_ids")
_SCALAR_SET = frozenset(_SCALAR_FIELDS)
_NESTED_FIELDS = frozenset({"input", "messages", "tools", "tool_resources", "attachments"})
_ALL_FIELDS = _SCALAR_SET | frozenset(_LIST_FIELDS) | _NESTED_FIELDS
# Id-less paths seen (`/chat/completions`), so the common case skips the parsing; bounded,
# since a client may send any number of distinct paths.
_NO_ID_PATHS: set[str] = set()
_NO_ID_PATHS_LIMIT = 1024


def named_ids(
    path: str, payload: Mapping[str, Any] | None, form_fields: Mapping[str, str] | None = None
) -> list[str]:
    """The object ids a request names, most telling first: the path's, then the body's
    top-level fields, then those inside ``input``/``messages`` parts and ``tools``.

    A request that names nothing costs one split of its path, a set intersection over its
    top-level keys and, with ``messages``/``input``, a type test per item.
    """
    found: list[str] = []
    if path not in _NO_ID_PATHS:
        _path_ids(path, found)
        if not found and len(_NO_ID_PATHS) < _NO_ID_PATHS_LIMIT:
            _NO_ID_PATHS.add(path)
    if payload:
        _payload_ids(payload, found)
    if form_fields:
        for name in _SCALAR_FIELDS:
            _add(found, form_fields.get(name))
    return found


def _path_ids(path: str, found: list[str]) -> None:
    segments = _strip_v1(path).split("/", _MAX_SEGMENTS + 1)[1 : _MAX_SEGMENTS + 1]
    if len(segments) < 2:  # `/files`, `/responses`: a collection, no id
        return
    root = _ROOT_OF.get(segments[0])
    if root is None:
        root = next((r for r in _LONG_ROOTS if tuple(segments[: len(r)]) == r), None)
        if root is None:
            return
    rest = segments[len(root) :]
    for index in range(0, len(rest), 2):  # ids at 0, 2, 4...; sub-collections between
        segment = rest[index]
        if segment not in _NOT_IDS:
            _add(found, segment)


def _payload_ids(payload: Mapping[str, Any], found: list[str]) -> None:
    present = _ALL_FIELDS.intersection(payload)
    if not present:
        return
    if not present.isdisjoint(_SCALAR_SET):
        for name in _SCALAR_FIELDS:
            value = payload.get(name)
            if isinstance(value, dict):  # `conversation: {"id": ...}`, `container: {...}`
                _add(found, value.get("id"))
                _add_all(found, value.get("file_ids"))
            elif value is not None:
                _add(found, value)
    for name in _LIST_FIELDS:
        if name in present:
            _add_all(found, payload[name])
    if present.isdisjoint(_NESTED_FIELDS):
        return
    if "input" in present:
        _message_ids(payload["input"], found)
    if "messages" in present:
        _message_ids(payload["messages"], found)
    if "tools" in present:
        _tool_ids(payload["tools"], found)
    resources = payload.get("tool_resources")  # assistants, threads
    if isinstance(resources, dict):
        for resource in list(resources.values())[:_MAX_ITEMS]:
            if isinstance(resource, dict):
                _add_all(found, resource.get("file_ids"))
                _add_all(found, resource.get("vector_store_ids"))
    attachments = payload.get("attachments")  # thread messages
    if isinstance(attachments, list):
        for attachment in attachments[:_MAX_ITEMS]:
            if isinstance(attachment, dict):
                _add(found, attachment.get("file_id"))


def _message_ids(messages: object, found: list[str]) -> None:
    """``file_id`` in Responses input items and their content parts, and in chat content
    parts (``{"type": "file", "file": {"file_id": ...}}``): two levels, bounded."""
    if not isinstance(messages, list):
        return
    for message in messages[:_MAX_ITEMS]:
        if not isinstance(message, dict):
            continue
        if "file_id" in message:
            _add(found, message["file_id"])
        content = message.get("content")
        if not isinstance(content, list):  # text: the usual case
            continue
        for part in content[:_MAX_PARTS]:
            if not isinstance(part, dict):
                continue
            if "file_id" in part:
                _add(found, part["file_id"])
            file = part.get("file")
            if isinstance(file, dict):
                _add(found, file.get("file_id"))


def _tool_ids(tools: object, found: list[str]) -> None:
    """``file_search`` tools' ``vector_store_ids``, ``code_interpreter`` tools' container."""
    if not isinstance(tools, list):
        return
    for tool in tools[:_MAX_ITEMS]:
        if not isinstance(tool, dict):
            continue
        if "vector_store_ids" in tool:
            _add_all(found, tool["vector_store_ids"])
        container = tool.get("container")
        if isinstance(container, dict):
            _add_all(found, container.get("file_ids"))
        elif container is not None:
            _add(found, container)


def _add(found: list[str], value: object) -> None:
    """``value`` appended when it is a valid id not yet there, below ``MAX_IDS`` ids."""
    if _is_id(value) and len(found) < MAX_IDS and value not in found:
        found.append(value)


def _add_all(found: list[str], values: object) -> None:
    if isinstance(values, list):
        for value in values[:_MAX_ITEMS]:
            _add(found, value)


def _strip_v1(path: str) -> str:
    return path[3:] if path.startswith("/v1/") else path


def _loads_dict(data: bytes) -> dict[str, Any] | None:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


# ---------------------------------------------------------------- where objects live


@dataclass(frozen=True, slots=True)
class Placement:
    backend: str
    key_id: str
    # --- batch files (issue 19): the requests a `purpose: batch` file holds, counted as
    # it was uploaded; what a batch made from it costs. Not part of where it lives.
    lines: int | None = field(default=None, compare=False)


def known_placements(keys: Mapping[str, Iterable[str]]) -> frozenset[Placement]:
    """Every (backend, key id) of a config, built once per runtime: ``lookup(ids, known)``
    then ignores placements of backends or keys that a reload took away."""
    return frozenset(Placement(b, key_id) for b, key_ids in keys.items() for key_id in key_ids)


class ObjectStore(Protocol):
    errors: int  # failed storage calls since the metrics loop last took them

    async def remember(
        self, ids: Sequence[str], backend: str, key_id: str, lines: int | None = None
    ) -> None:
        """Record that ``ids`` live on ``backend`` under ``key_id`` (a batch file: with
        its ``lines``); never raises."""

    async def lookup(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> Placement | None:
        """The placement of the first id (in order) recorded and not expired, among those in
        ``known`` when given; None when none is (or the storage fails). Never raises."""

    def reconfigure(self, ttl: float, max_entries: int) -> None:
        """A reload's new settings; what is remembered stays."""

    async def close(self) -> None: ...


class _Complaints:
    """Counts failures and logs one line a minute at most: a dead Redis must not flood."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.errors = 0
        self._clock = clock
        self._last_log: float | None = None

    def failed(self, exc: Exception) -> None:
        self.errors += 1
        now = self._clock()
        if self._last_log is None or now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.error(
                "object store failed (%s: %s): requests naming objects are routed as if "
                "the objects were unknown",
                type(exc).__name__,
                exc,
            )


class MemoryObjects:
    """Objects remembered in this process, oldest first: at most ``max_entries``, each for
    ``ttl`` seconds after it was last remembered (by ``clock``, monotonic by default).

    Oldest-first keeps both bounds O(1): entries are in the order they were remembered, so
    the expired ones are always at the front (purged a few at a time on every call) and the
    one evicted when full is also the next to expire.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Placement, float]] = OrderedDict()  # id → at
        self.errors = 0  # memory never fails; here for the ObjectStore interface

    def __len__(self) -> int:
        return len(self._entries)

    async def remember(
        self, ids: Sequence[str], backend: str, key_id: str, lines: int | None = None
    ) -> None:
        now = self._clock()
        self._purge(now)
        placement = Placement(backend, key_id, lines)
        entries = self._entries
        for object_id in ids[:MAX_IDS]:
            entries[object_id] = (placement, now)
            entries.move_to_end(object_id)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    async def lookup(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> Placement | None:
        if not ids:
            return None
        now = self._clock()
        self._purge(now)
        for object_id in ids[:MAX_IDS]:
            entry = self._entries.get(object_id)
            if entry is None:
                continue
            placement, at = entry
            if now - at >= self.ttl:  # the purge is bounded: this entry may be left
                continue
            if known is None or placement in known:
                return placement
        return None

    def reconfigure(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def close(self) -> None:
        self._entries.clear()

    def _purge(self, now: float, budget: int = 2 * MAX_IDS) -> None:
        """Drop expired entries from the front; a bounded number per call, and at least as
        many as a ``remember`` can add, so expired entries never pile up."""
        entries = self._entries
        while budget and entries:
            _, at = next(iter(entries.values()))
            if now - at < self.ttl:
                return
            entries.popitem(last=False)
            budget -= 1


class Guard(Protocol):
    """Runs one storage call bounded in time, ``default`` (after ``failed``) when it fails:
    ``proxy.throttle.Store.call`` (health-aware), or ``bounded_call`` below."""

    def __call__(
        self, make: Callable[[], Awaitable[T]], default: T, failed: Callable[[Exception], None]
    ) -> Awaitable[T]: ...


def bounded_call(timeout: float = REDIS_TIMEOUT) -> Guard:
    """A guard for a bare Redis client: ``timeout`` seconds per call, any error → default."""

    async def call(
        make: Callable[[], Awaitable[T]], default: T, failed: Callable[[Exception], None]
    ) -> T:
        try:
            return await asyncio.wait_for(make(), timeout)
        except Exception as exc:  # down, hung, refusing, garbage: never into the request
            failed(exc)
            return default

    return call


class RedisObjects:
    """Objects in Redis, shared by every replica: ``SET objects/<id> <backend>\\x1f<key id>
    EX ttl`` per id (one pipeline), ``MGET`` to look up. Values read back are validated
    (two non-empty names without control characters, at most 256 chars each) and, with
    ``known``, must name a backend and key of the running config: garbage is "not found"."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        ttl: float = DEFAULT_TTL,
        guard: Guard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self._guard: Guard = guard if guard is not None else bounded_call()
        self._complaints = _Complaints(clock)

    @property
    def errors(self) -> int:
        return self._complaints.errors

    @errors.setter
    def errors(self, value: int) -> None:
        self._complaints.errors = value

    async def remember(
        self, ids: Sequence[str], backend: str, key_id: str, lines: int | None = None
    ) -> None:
        if not ids or not _storable_name(backend) or not _storable_name(key_id):
            return
        value = f"{backend}{_SEP}{key_id}"
        if lines is not None:  # batch files: a third field
            value += f"{_SEP}{min(max(lines, 0), _MAX_LINES)}"
        seconds = max(1, int(self.ttl))

        async def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for object_id in ids[:MAX_IDS]:
                pipe.set(REDIS_PREFIX + object_id, value, ex=seconds)
            await pipe.execute()

        await self._guard(write, None, self._complaints.failed)

    async def lookup(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> Placement | None:
        if not ids:
            return None
        names = [REDIS_PREFIX + object_id for object_id in ids[:MAX_IDS]]
        empty: list[Any] = []
        raw = await self._guard(lambda: self.client.mget(names), empty, self._complaints.failed)
        for value in raw:
            placement = _placement_of(value)
            if placement is not None and (known is None or placement in known):
                return placement
        return None

    def reconfigure(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl  # Redis bounds itself by the TTLs: max_entries is for memory

    async def close(self) -> None:
        """The client belongs to whoever made it (the throttle's storage): left open."""


def _storable_name(name: str) -> bool:
    return 0 < len(name) <= _MAX_NAME and _CONTROL.search(name) is None


def _placement_of(raw: object) -> Placement | None:
    """A value read back from Redis, written by us or by anyone: None unless well-formed."""
    if not isinstance(raw, bytes) or len(raw) > 2 * _MAX_NAME + 2 + len(str(_MAX_LINES)):
        return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    backend, sep, key_id = text.partition(_SEP)
    key_id, lines_sep, lines = key_id.partition(_SEP)  # batch files: their line count
    if not sep or not _storable_name(backend) or not _storable_name(key_id):
        return None
    if lines_sep and not (lines.isascii() and lines.isdigit() and len(lines) <= 9):
        return None
    return Placement(backend, key_id, int(lines) if lines_sep else None)


def make_object_store(
    redis_client: redis.asyncio.Redis | None,
    ttl: float = DEFAULT_TTL,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    guard: Guard | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ObjectStore:
    """The store for the throttle's storage: ``make_object_store(store.redis, ttl,
    max_entries, store.call)`` with ``store`` a ``proxy.throttle.Store`` (its Redis pool and
    health-aware guard are reused); in memory when that storage is ``memory://``."""
    if redis_client is None:
        return MemoryObjects(ttl, max_entries, clock)
    return RedisObjects(redis_client, ttl, guard, clock)


# ---------------------------------------------------------------- the pipeline's two calls


async def placement_for(
    store: ObjectStore,
    path: str,
    payload: Mapping[str, Any] | None,
    known: Collection[Placement] | None = None,
    form_fields: Mapping[str, str] | None = None,
) -> Placement | None:
    """Where the objects this request names live; None when it names none we know (then
    no storage call at all: the usual chat request costs about a microsecond here)."""
    ids = named_ids(path, payload, form_fields)
    return await store.lookup(ids, known) if ids else None


async def record_created(
    store: ObjectStore,
    path: str,
    method: str,
    status: int,
    body: bytes,
    payload: Mapping[str, Any] | None,
    backend: str,
    key_id: str,
    lines: int | None = None,
) -> list[str]:
    """Remember the objects a JSON answer created where it came from (the backend and key
    that answered: a fallback's, when it came to that), a batch file's ``lines`` with it;
    the ids recorded."""
    ids = created_ids(path, method, status, body, payload)
    if ids:
        if lines is None:
            await store.remember(ids, backend, key_id)
        else:
            await store.remember(ids, backend, key_id, lines)
    return ids
