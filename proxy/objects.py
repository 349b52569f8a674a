"""Objects stick to where they were made, and belong to who made them: object id →
(backend, key id, owner client id).

With ``clients:``, every record also names the client that made the object, and
``may_see`` is the one answer to "may this client see this id": another client naming it
gets the upstream's own 404 and nothing is sent upstream; list answers are filtered to the
caller's objects (``visible_ids``). Without ``clients:`` there is one tenant: owner None.

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
from enum import Enum
from typing import Any, Protocol, TypeGuard, TypeVar

import orjson
import redis.asyncio

log = logging.getLogger("proxy.objects")

T = TypeVar("T")

MAX_IDS = 64  # ids one answer may record, or one request may name
DEFAULT_TTL = 30 * 24 * 3600.0  # OpenAI keeps stored responses 30 days
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_PER_CLIENT = 20_000  # one client's share of the memory store
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


# Values in an id's place that are settings, not ids (`container: "auto"`).
_NOT_ID_VALUES = frozenset({"auto", "none"})


def _add(found: list[str], value: object) -> None:
    """``value`` appended when it is a valid id not yet there, below ``MAX_IDS`` ids."""
    if (
        _is_id(value)
        and len(found) < MAX_IDS
        and value not in found
        and value not in _NOT_ID_VALUES
    ):
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


@dataclass(frozen=True, slots=True)
class Record:
    """What the store knows of one id: where it lives and which client made it (None: made
    while the proxy was open, or recorded before owners were)."""

    placement: Placement
    owner: str | None


class Unknown(Enum):
    """What a client naming an id the proxy has no record of gets (``objects.unknown``)."""

    REFUSE = "refuse"  # fail closed: the upstream key is shared, the id may be another's
    ALLOW = "allow"  # objects made before the proxy recorded owners stay reachable


@dataclass(frozen=True, slots=True)
class Viewer:
    """A client as the object records see it; ``shared``: it sees every object."""

    client_id: str
    shared: bool = False


def may_see(viewer: Viewer | None, record: Record | None, unknown: Unknown) -> bool:
    """May ``viewer`` name an object with ``record`` (None: no record)? The one place
    tenancy is decided. ``viewer`` None is the open proxy's single tenant."""
    if viewer is None or viewer.shared:
        return True
    if record is None or record.owner is None:
        return unknown is Unknown.ALLOW
    return record.owner == viewer.client_id


def known_placements(keys: Mapping[str, Iterable[str]]) -> frozenset[Placement]:
    """Every (backend, key id) of a config, built once per runtime: ``lookup(ids, known)``
    then ignores placements of backends or keys that a reload took away."""
    return frozenset(Placement(b, key_id) for b, key_ids in keys.items() for key_id in key_ids)


class ObjectStore(Protocol):
    errors: int  # failed storage calls since the metrics loop last took them

    async def remember(
        self,
        ids: Sequence[str],
        backend: str,
        key_id: str,
        owner: str | None = None,
        lines: int | None = None,
    ) -> None:
        """Record that ``ids`` live on ``backend`` under ``key_id``, made by ``owner`` (a
        batch file: with its ``lines``); an id already recorded for another owner keeps its
        owner. Never raises."""

    async def records(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> dict[str, Record]:
        """The records of those of ``ids`` (the first ``MAX_IDS``) recorded, not expired
        and, with ``known``, placed on a backend and key of the running config; empty when
        the storage fails. Never raises."""

    async def lookup(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> Placement | None:
        """The placement of the first id (in order) recorded and not expired, among those in
        ``known`` when given; None when none is (or the storage fails). Never raises."""

    def reconfigure(
        self, ttl: float, max_entries: int, max_per_client: int = DEFAULT_MAX_PER_CLIENT
    ) -> None:
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
    """Objects remembered in this process, oldest first: at most ``max_entries``, at most
    ``max_per_client`` per owner (so one client's many ``store: true`` completions evict
    only its own), each for ``ttl`` seconds after it was last remembered (by ``clock``,
    monotonic by default).

    Oldest-first keeps every bound O(1): entries are in the order they were remembered, so
    the expired ones are always at the front (purged a few at a time on every call), the one
    evicted when full is also the next to expire, and each owner's ids are kept in the same
    order beside them.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self.max_per_client = max(1, max_per_client)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Record, float]] = OrderedDict()  # id → at
        self._by_owner: dict[str | None, OrderedDict[str, None]] = {}
        self.errors = 0  # memory never fails; here for the ObjectStore interface

    def __len__(self) -> int:
        return len(self._entries)

    def owned(self, owner: str | None) -> int:
        """How many ids ``owner`` has recorded (for tests and the quota)."""
        return len(self._by_owner.get(owner, ()))

    async def remember(
        self,
        ids: Sequence[str],
        backend: str,
        key_id: str,
        owner: str | None = None,
        lines: int | None = None,
    ) -> None:
        now = self._clock()
        self._purge(now)
        record = Record(Placement(backend, key_id, lines), owner)
        entries = self._entries
        mine = self._by_owner.setdefault(owner, OrderedDict())
        for object_id in ids[:MAX_IDS]:
            existing = entries.get(object_id)
            if existing is not None and existing[0].owner != owner:
                if now - existing[1] < self.ttl:
                    continue  # another client's object stays its own
                self._drop(object_id)
            entries[object_id] = (record, now)
            entries.move_to_end(object_id)
            mine[object_id] = None
            mine.move_to_end(object_id)
        while len(mine) > self.max_per_client:  # the quota evicts the owner's own oldest
            self._drop(next(iter(mine)))
        while len(entries) > self.max_entries:
            self._drop(next(iter(entries)))

    async def records(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> dict[str, Record]:
        found: dict[str, Record] = {}
        if not ids:
            return found
        now = self._clock()
        self._purge(now)
        for object_id in ids[:MAX_IDS]:
            entry = self._entries.get(object_id)
            if entry is None:
                continue
            record, at = entry
            if now - at >= self.ttl:  # the purge is bounded: this entry may be left
                continue
            if known is None or record.placement in known:
                found[object_id] = record
        return found

    async def lookup(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> Placement | None:
        return _first_placement(ids, await self.records(ids, known))

    def reconfigure(
        self, ttl: float, max_entries: int, max_per_client: int = DEFAULT_MAX_PER_CLIENT
    ) -> None:
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self.max_per_client = max(1, max_per_client)
        for mine in list(self._by_owner.values()):
            while len(mine) > self.max_per_client:
                self._drop(next(iter(mine)))
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))

    async def close(self) -> None:
        self._entries.clear()
        self._by_owner.clear()

    def _drop(self, object_id: str) -> None:
        entry = self._entries.pop(object_id, None)
        if entry is None:
            return
        owner = entry[0].owner
        mine = self._by_owner.get(owner)
        if mine is not None:
            mine.pop(object_id, None)
            if not mine:
                del self._by_owner[owner]

    def _purge(self, now: float, budget: int = 2 * MAX_IDS) -> None:
        """Drop expired entries from the front; a bounded number per call, and at least as
        many as a ``remember`` can add, so expired entries never pile up."""
        entries = self._entries
        while budget and entries:
            object_id, (_, at) = next(iter(entries.items()))
            if now - at < self.ttl:
                return
            self._drop(object_id)
            budget -= 1


def _first_placement(ids: Sequence[str], found: Mapping[str, Record]) -> Placement | None:
    for object_id in ids[:MAX_IDS]:
        record = found.get(object_id)
        if record is not None:
            return record.placement
    return None


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
        self,
        ids: Sequence[str],
        backend: str,
        key_id: str,
        owner: str | None = None,
        lines: int | None = None,
    ) -> None:
        if not ids or not _storable_name(backend) or not _storable_name(key_id):
            return
        if owner is not None and not _storable_name(owner):
            return
        # backend, key [, owner [, lines]]: a batch file without an owner has "" for it.
        value = f"{backend}{_SEP}{key_id}"
        if owner is not None or lines is not None:
            value += f"{_SEP}{owner or ''}"
        if lines is not None:
            value += f"{_SEP}{min(max(lines, 0), _MAX_LINES)}"
        seconds = max(1, int(self.ttl))

        async def write() -> None:
            # SET NX: the first to record an id owns it (another client's answer naming the
            # id cannot take it over); EXPIRE then refreshes the TTL as before.
            pipe = self.client.pipeline(transaction=False)
            for object_id in ids[:MAX_IDS]:
                pipe.set(REDIS_PREFIX + object_id, value, ex=seconds, nx=True)
                pipe.expire(REDIS_PREFIX + object_id, seconds)
            await pipe.execute()

        await self._guard(write, None, self._complaints.failed)

    async def records(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> dict[str, Record]:
        found: dict[str, Record] = {}
        if not ids:
            return found
        wanted = list(ids[:MAX_IDS])
        names = [REDIS_PREFIX + object_id for object_id in wanted]
        empty: list[Any] = []
        raw = await self._guard(lambda: self.client.mget(names), empty, self._complaints.failed)
        for object_id, value in zip(wanted, raw, strict=False):
            record = _record_of(value)
            if record is not None and (known is None or record.placement in known):
                found[object_id] = record
        return found

    async def lookup(
        self, ids: Sequence[str], known: Collection[Placement] | None = None
    ) -> Placement | None:
        return _first_placement(ids, await self.records(ids, known))

    def reconfigure(
        self, ttl: float, max_entries: int, max_per_client: int = DEFAULT_MAX_PER_CLIENT
    ) -> None:
        # Redis bounds itself by the TTLs and evicts nobody's records to make room, so no
        # client can push out another's: max_entries and max_per_client are for memory.
        self.ttl = ttl

    async def close(self) -> None:
        """The client belongs to whoever made it (the throttle's storage): left open."""


def _storable_name(name: str) -> bool:
    return 0 < len(name) <= _MAX_NAME and _CONTROL.search(name) is None


def _record_of(raw: object) -> Record | None:
    """A value read back from Redis, written by us or by anyone: None unless well-formed.
    ``backend\x1fkey`` (no owner: written while open, or before owners), with an owner, or
    with an owner (maybe empty) and a batch file's line count."""
    # A first bound in bytes before decoding (a UTF-8 character is at most 4 bytes); the
    # names' own bound is in characters, checked below.
    if not isinstance(raw, bytes) or len(raw) > 4 * (3 * _MAX_NAME) + 3 + len(str(_MAX_LINES)):
        return None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    names = text.split(_SEP)
    if len(names) not in (2, 3, 4) or not all(_storable_name(name) for name in names[:2]):
        return None
    owner = names[2] if len(names) >= 3 else None
    if owner is not None and not _storable_name(owner):
        if not (owner == "" and len(names) == 4):
            return None
        owner = None
    lines: int | None = None
    if len(names) == 4:
        count = names[3]
        if not (count.isascii() and count.isdigit() and len(count) <= 9):
            return None
        lines = int(count)
    return Record(Placement(names[0], names[1], lines), owner)


def make_object_store(
    redis_client: redis.asyncio.Redis | None,
    ttl: float = DEFAULT_TTL,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    guard: Guard | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_per_client: int = DEFAULT_MAX_PER_CLIENT,
) -> ObjectStore:
    """The store for the throttle's storage: ``make_object_store(store.redis, ttl,
    max_entries, store.call)`` with ``store`` a ``proxy.throttle.Store`` (its Redis pool and
    health-aware guard are reused); in memory when that storage is ``memory://``."""
    if redis_client is None:
        return MemoryObjects(ttl, max_entries, clock, max_per_client)
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
    owner: str | None = None,
    lines: int | None = None,
) -> list[str]:
    """Remember the objects a JSON answer created where it came from (the backend and key
    that answered: a fallback's, when it came to that), owned by the asking client, a batch
    file's ``lines`` with it; the ids recorded."""
    ids = created_ids(path, method, status, body, payload)
    if ids:
        await store.remember(ids, backend, key_id, owner, lines)
    return ids


# ---------------------------------------------------------------- lists: the caller's only

# Collections listed with GET whose items are objects made through the proxy: their pages
# are filtered by owner. Sub-collections (`/vector_stores/{id}/files`, a job's events) are
# not: their parent was already checked, and their items (events, input items) unrecorded.
_LIST_PATHS = frozenset("/" + "/".join(root) for root in _ROOTS)


def is_owned_list(path: str, method: str) -> bool:
    return method == "GET" and _strip_v1(path) in _LIST_PATHS


MAX_LIST_PAGES = 5  # upstream pages read for one filtered list page, the first included
DEFAULT_LIST_LIMIT = 20  # OpenAI's default `limit`
MAX_LIST_LIMIT = 100  # OpenAI's largest


@dataclass(slots=True)
class ListPage:
    """A list answer being filtered: the caller's items so far and the upstream's cursor."""

    document: dict[str, Any]
    kept: list[Any]
    has_more: bool
    upstream_last: str | None  # the last id of the upstream's last page: where to go on


def list_page(data: bytes) -> ListPage | None:
    """A list answer (``{"object": "list", "data": [...]}``) to filter; None for anything else."""
    document = _loads_dict(data)
    if document is None or not isinstance(document.get("data"), list):
        return None
    return ListPage(document, [], False, None)


async def add_visible(
    page: ListPage,
    data: bytes | dict[str, Any],
    store: ObjectStore,
    viewer: Viewer,
    unknown: Unknown,
    known: Collection[Placement] | None = None,
) -> None:
    """The items of one upstream page that ``viewer`` may see, added to ``page``."""
    document = data if isinstance(data, dict) else _loads_dict(data)
    items = document.get("data") if document is not None else None
    if document is None or not isinstance(items, list):
        page.has_more = False
        return
    ids = [item["id"] for item in items if isinstance(item, dict) and _is_id(item.get("id"))]
    found: dict[str, Record] = {}
    for start in range(0, len(ids), MAX_IDS):
        found |= await store.records(ids[start : start + MAX_IDS], known)
    page.kept += [
        item
        for item in items
        if isinstance(item, dict)
        and _is_id(item.get("id"))
        and may_see(viewer, found.get(item["id"]), unknown)
    ]
    page.has_more = document.get("has_more") is True
    page.upstream_last = ids[-1] if ids else None


def finished_list(page: ListPage, limit: int) -> bytes:
    """The filtered page: at most ``limit`` items, ``first_id``/``last_id`` from them,
    ``has_more`` true while the upstream has more or items were left for the next page (the
    SDK then asks ``after`` the last item shown: nothing is skipped)."""
    document = page.document
    kept = page.kept
    more = page.has_more or len(kept) > limit
    kept = kept[:limit]
    document["data"] = kept
    if "has_more" in document:
        document["has_more"] = more
    for name, index in (("first_id", 0), ("last_id", -1)):
        if name in document:
            document[name] = kept[index]["id"] if kept else None
    return orjson.dumps(document)


def list_limit(query: str) -> int:
    """The page size the client asked for (``limit``, 1 to 100 as OpenAI allows)."""
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if name == "limit" and value.isdigit():
            return min(max(int(value), 1), MAX_LIST_LIMIT)
    return DEFAULT_LIST_LIMIT


def query_after(query: str, after: str) -> str:
    """``query`` for the next upstream page: ``after`` that id, and the largest ``limit``
    OpenAI allows (100), so a few pages pass over many objects of other clients."""
    pairs = [p for p in query.split("&") if p and p.partition("=")[0] not in ("after", "limit")]
    return "&".join([*pairs, f"after={after}", f"limit={MAX_LIST_LIMIT}"])


async def visible_list(
    store: ObjectStore,
    data: bytes,
    viewer: Viewer,
    unknown: Unknown,
    known: Collection[Placement] | None = None,
    limit: int = 100,
) -> bytes:
    """One upstream list page with only the items ``viewer`` may see (see ``finished_list``);
    an answer that is not such a list is returned as it came."""
    page = list_page(data)
    if page is None:
        return data
    await add_visible(page, page.document, store, viewer, unknown, known)
    return finished_list(page, limit)


# ---------------------------------------------------------------- refusals, upstream-shaped

# OpenAI's 404 for an object that is not there, by the id's prefix: another client's
# object must look exactly like one that does not exist.
_KINDS = (
    ("file-", "File"),
    ("batch_", "Batch"),
    ("vs_", "VectorStore"),
    ("vsfb_", "VectorStoreFileBatch"),
    ("upload_", "Upload"),
    ("ftjob-", "FineTuningJob"),
    ("chatcmpl-", "ChatCompletion"),
    ("conv_", "Conversation"),
    ("cntr_", "Container"),
    ("eval_", "Eval"),
    ("evalrun_", "EvalRun"),
    ("asst_", "Assistant"),
    ("thread_", "Thread"),
    ("run_", "Run"),
    ("video_", "Video"),
)


def not_found_message(object_id: str) -> tuple[str, str | None]:
    """The message and ``param`` OpenAI answers a missing ``object_id`` with."""
    if object_id.startswith("resp_"):
        return f"Response with id '{object_id}' not found.", None
    if object_id.startswith("ft:"):
        return f"The model '{object_id}' does not exist", "model"
    kind = next((name for prefix, name in _KINDS if object_id.startswith(prefix)), "object")
    return f"No such {kind} object: {object_id}", "id"
