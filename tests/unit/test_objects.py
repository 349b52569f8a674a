"""Objects stick to where they were made: which ids answers create and requests name, and
the stores that remember where they live (memory here; Redis in test_objects_redis.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.objects import (
    MAX_IDS,
    MemoryObjects,
    Placement,
    created_ids,
    event_created_ids,
    known_placements,
    make_object_store,
    named_ids,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(document: Any) -> bytes:
    return orjson.dumps(document)


# ---------------------------------------------------------------- named_ids: paths


@pytest.mark.parametrize(
    ("path", "ids"),
    [
        ("/files/file-abc/content", ["file-abc"]),
        ("/v1/files/file-abc", ["file-abc"]),
        ("/files", []),
        ("/responses/resp_123/input_items", ["resp_123"]),
        ("/responses/resp_123/cancel", ["resp_123"]),
        ("/responses/input_tokens", []),
        ("/responses/compact", []),
        ("/vector_stores/vs_1/files/file-2", ["vs_1", "file-2"]),
        ("/vector_stores/vs_1/file_batches/vsfb_3/files", ["vs_1", "vsfb_3"]),
        ("/vector_stores/vs_1/search", ["vs_1"]),
        ("/threads/thread_1/runs/run_2", ["thread_1", "run_2"]),
        ("/threads/runs", []),
        ("/chat/completions", []),
        ("/chat/completions/chatcmpl-9/messages", ["chatcmpl-9"]),
        ("/fine_tuning/jobs/ftjob-abc/cancel", ["ftjob-abc"]),
        ("/fine_tuning/jobs", []),
        ("/containers/cntr_1/files/cfile_2/content", ["cntr_1", "cfile_2"]),
        ("/evals/eval_1/runs/evalrun_2/output_items/oi_3", ["eval_1", "evalrun_2", "oi_3"]),
        ("/conversations/conv_1/items/msg_2", ["conv_1", "msg_2"]),
        ("/uploads/upload_1/parts", ["upload_1"]),
        ("/batches/batch_1/cancel", ["batch_1"]),
        ("/videos/video_1/content", ["video_1"]),
        ("/audio/speech", []),  # no object there: no lookup either
        ("/embeddings", []),
        ("/models/gpt-4o", []),  # model ids are never object ids
        ("/files/a", []),  # too short for an id
        ("/files/" + "x" * 200, []),  # too long
        ("/files/file%20x", []),  # not an id's characters
    ],
)
def test_path_ids(path: str, ids: list[str]) -> None:
    assert named_ids(path, None) == ids


def test_path_ids_bounded_in_segments() -> None:
    deep = "/threads/" + "/".join(f"s{i:04d}" for i in range(10_000))
    ids = named_ids(deep, None)
    assert ids[0] == "s0000"
    assert len(ids) <= 6  # only the first dozen segments are looked at


# ---------------------------------------------------------------- named_ids: bodies


@pytest.mark.parametrize(
    ("payload", "ids"),
    [
        ({"model": "gpt-4o", "input": "hi", "previous_response_id": "resp_1"}, ["resp_1"]),
        ({"conversation": "conv_1", "input": "hi"}, ["conv_1"]),
        ({"conversation": {"id": "conv_2"}}, ["conv_2"]),
        ({"input_file_id": "file-in", "endpoint": "/v1/chat/completions"}, ["file-in"]),
        ({"vector_store_ids": ["vs_1", "vs_2"]}, ["vs_1", "vs_2"]),
        ({"file_ids": ["file-1", "file-2"]}, ["file-1", "file-2"]),
        ({"training_file": "file-t", "validation_file": "file-v"}, ["file-t", "file-v"]),
        ({"assistant_id": "asst_1", "thread_id": "thread_2"}, ["thread_2", "asst_1"]),
        ({"container": "cntr_1"}, ["cntr_1"]),
        ({"file_id": "file-c"}, ["file-c"]),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "read this"},
                            {"type": "input_file", "file_id": "file-r"},
                        ],
                    }
                ]
            },
            ["file-r"],
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "file-m"}}]}
                ]
            },
            ["file-m"],
        ),
        (
            {
                "tools": [
                    {"type": "file_search", "vector_store_ids": ["vs_9"]},
                    {"type": "code_interpreter", "container": "cntr_7"},
                    {
                        "type": "code_interpreter",
                        "container": {"type": "auto", "file_ids": ["f-1"]},
                    },
                ]
            },
            ["vs_9", "cntr_7", "f-1"],
        ),
        ({"tool_resources": {"file_search": {"vector_store_ids": ["vs_a"]}}}, ["vs_a"]),
        ({"attachments": [{"file_id": "file-att", "tools": []}]}, ["file-att"]),
        # Not ids: wrong types, model names, empty strings, ids with spaces.
        ({"previous_response_id": 12345, "file_id": None, "conversation": ["x"]}, []),
        ({"model": "ft:gpt-4o:org:custom:abc", "messages": [{"content": "hi"}]}, []),
        ({"previous_response_id": "", "file_id": "has space"}, []),
        ({"vector_store_ids": "vs_1"}, []),  # a string where a list belongs
    ],
)
def test_body_ids(payload: dict[str, Any], ids: list[str]) -> None:
    assert named_ids("/responses", payload) == ids


def test_path_ids_come_first_and_duplicates_once() -> None:
    payload = {"file_id": "file-2", "vector_store_ids": ["vs_1"]}
    assert named_ids("/vector_stores/vs_1/files", payload) == ["vs_1", "file-2"]


def test_form_fields() -> None:
    assert named_ids("/containers/cntr_1/files", None, {"file_id": "file-f", "purpose": "x"}) == [
        "cntr_1",
        "file-f",
    ]


def test_chat_without_ids_names_nothing() -> None:
    payload = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "stream": True,
    }
    assert named_ids("/chat/completions", payload) == []


HUGE = "x" * (10 * 2**20)


@pytest.mark.parametrize(
    "payload",
    [
        {"vector_store_ids": [f"vs_{i}" for i in range(1_000_000)]},
        {"file_ids": [HUGE] * 1000 + ["file-late"]},
        {"previous_response_id": HUGE, "file_id": HUGE, "conversation": {"id": HUGE}},
        {"input": [{"content": [{"file_id": f"file-{i}"} for i in range(100_000)]}] * 10_000},
        {"messages": [[[[["deep"]]]]] * 100_000},
        {"tools": [{"container": {"file_ids": [f"f-{i}" for i in range(10_000)]}}] * 10_000},
    ],
    ids=["million-list", "huge-strings", "huge-scalars", "many-parts", "junk", "many-tools"],
)
def test_hostile_bodies_bounded(payload: dict[str, Any]) -> None:
    started = time.perf_counter()
    ids = named_ids("/responses/resp_1", payload)
    assert time.perf_counter() - started < 0.05
    assert len(ids) <= MAX_IDS
    assert all(len(i) <= 128 for i in ids)
    assert ids[:1] == ["resp_1"]


# ---------------------------------------------------------------- created_ids


@pytest.mark.parametrize(
    ("path", "document", "ids"),
    [
        ("/files", {"id": "file-1", "object": "file", "purpose": "batch"}, ["file-1"]),
        ("/batches", {"id": "batch_1", "object": "batch", "input_file_id": "file-1"}, ["batch_1"]),
        (
            "/batches/batch_1",
            {
                "id": "batch_1",
                "object": "batch",
                "output_file_id": "file-out",
                "error_file_id": "file-err",
            },
            ["batch_1", "file-out", "file-err"],
        ),
        (
            "/uploads/upload_1/complete",
            {"id": "upload_1", "object": "upload", "file": {"id": "file-u", "object": "file"}},
            ["upload_1", "file-u"],
        ),
        ("/vector_stores", {"id": "vs_1", "object": "vector_store"}, ["vs_1"]),
        ("/conversations", {"id": "conv_1", "object": "conversation"}, ["conv_1"]),
        (
            "/responses",
            {
                "id": "resp_1",
                "object": "response",
                "output": [{"type": "code_interpreter_call", "container_id": "cntr_a"}],
            },
            ["resp_1", "cntr_a"],
        ),
        (
            "/fine_tuning/jobs/ftjob-1",
            {"id": "ftjob-1", "object": "fine_tuning.job", "result_files": ["file-res"]},
            ["ftjob-1", "file-res"],
        ),
        ("/threads/runs", {"id": "run_1", "object": "thread.run", "thread_id": "thread_1"}, None),
        # Not recorded: lists, models, deletions, unknown kinds, non-objects.
        ("/files", {"object": "list", "data": [{"id": "file-1", "object": "file"}]}, []),
        ("/models/gpt-4o", {"id": "gpt-4o", "object": "model"}, []),
        ("/files/file-1", {"id": "file-1", "object": "file", "deleted": True}, []),
        ("/embeddings", {"id": "emb_1", "object": "embedding"}, []),
        ("/files", ["file-1"], []),
        ("/files", {"id": HUGE, "object": "file"}, []),
        ("/files", {"id": 123, "object": "file"}, []),
    ],
)
def test_created_ids(path: str, document: Any, ids: list[str] | None) -> None:
    expected = ids if ids is not None else ["run_1", "thread_1"]
    assert created_ids(path, "POST", 200, body(document)) == expected


def test_created_ids_only_for_successes_and_never_on_delete() -> None:
    answer = body({"id": "file-1", "object": "file"})
    assert created_ids("/files", "POST", 201, answer) == ["file-1"]
    assert created_ids("/files", "POST", 400, answer) == []
    assert created_ids("/files", "POST", 500, answer) == []
    assert created_ids("/files/file-1", "DELETE", 200, answer) == []
    assert created_ids("/files", "POST", 200, b"not json {") == []
    assert created_ids("/files", "POST", 200, b'{"object": "file"}') == []  # no id


def test_chat_completions_recorded_only_when_stored() -> None:
    answer = body({"id": "chatcmpl-1", "object": "chat.completion", "choices": []})
    assert created_ids("/chat/completions", "POST", 200, answer, {"model": "m"}) == []
    assert created_ids("/chat/completions", "POST", 200, answer, None) == []
    stored = {"model": "m", "store": True}
    assert created_ids("/chat/completions", "POST", 200, answer, stored) == ["chatcmpl-1"]


def test_responses_recorded_unless_not_stored() -> None:
    answer = body({"id": "resp_1", "object": "response"})
    assert created_ids("/responses", "POST", 200, answer, {"input": "x"}) == ["resp_1"]
    assert created_ids("/responses", "POST", 200, answer, {"store": False}) == []
    assert created_ids("/responses/resp_1", "GET", 200, answer) == ["resp_1"]


def test_created_ids_bounded_against_a_hostile_upstream() -> None:
    document = {
        "id": "batch_1",
        "object": "fine_tuning.job",
        "result_files": [f"file-{i}" for i in range(100_000)],
        "output": [{"container_id": f"cntr_{i}"} for i in range(100_000)],
    }
    started = time.perf_counter()
    ids = created_ids("/fine_tuning/jobs", "POST", 200, body(document))
    assert time.perf_counter() - started < 2.0  # a bound, not a benchmark (busy CI: 0.55 s)
    assert len(ids) == MAX_IDS
    assert ids[0] == "batch_1"


def test_event_created_ids() -> None:
    created = body({"type": "response.created", "response": {"id": "resp_s", "object": "response"}})
    delta = body({"type": "response.output_text.delta", "delta": "resp_x"})
    item = body(
        {
            "type": "response.output_item.added",
            "item": {"type": "code_interpreter_call", "container_id": "cntr_s"},
        }
    )
    assert event_created_ids("/responses", created) == ["resp_s"]
    assert event_created_ids("/responses", delta) == []
    assert event_created_ids("/responses", item) == ["cntr_s"]
    assert event_created_ids("/responses", created, {"store": False}) == []
    chunk = body({"id": "chatcmpl-s", "object": "chat.completion.chunk", "choices": []})
    assert event_created_ids("/chat/completions", chunk, {"store": True}) == ["chatcmpl-s"]
    assert event_created_ids("/chat/completions", chunk, {}) == []


# ---------------------------------------------------------------- memory store


def test_memory_remember_lookup_and_ttl() -> None:
    clock = Clock()
    store = MemoryObjects(ttl=100.0, max_entries=10, clock=clock)

    async def run() -> None:
        await store.remember(["file-1", "resp_1"], "openai", "k1")
        assert await store.lookup(["nope", "resp_1"]) == Placement("openai", "k1")
        assert await store.lookup(["nope"]) is None
        assert await store.lookup([]) is None
        clock.now += 99.0
        assert await store.lookup(["file-1"]) == Placement("openai", "k1")
        await store.remember(["file-1"], "azure", "k2")  # the last placement wins
        clock.now += 2.0
        assert await store.lookup(["resp_1"]) is None  # expired
        assert await store.lookup(["file-1"]) == Placement("azure", "k2")
        assert len(store) == 1  # the expired entry was purged
        clock.now += 100.0
        assert await store.lookup(["file-1"]) is None

    asyncio.run(run())


def test_memory_first_known_id_wins() -> None:
    store = MemoryObjects(clock=Clock())
    known = known_placements({"openai": ["k1", "k2"]})

    async def run() -> None:
        await store.remember(["vs_1"], "gone", "k1")  # a backend a reload took away
        await store.remember(["file-2"], "openai", "k2")
        await store.remember(["file-3"], "openai", "k1")
        ids = ["vs_1", "file-2", "file-3"]
        assert await store.lookup(ids) == Placement("gone", "k1")
        assert await store.lookup(ids, known) == Placement("openai", "k2")

    asyncio.run(run())


def test_memory_evicts_oldest_first() -> None:
    clock = Clock()
    store = MemoryObjects(ttl=1000.0, max_entries=3, clock=clock)

    async def run() -> None:
        for i in range(5):
            clock.now += 1
            await store.remember([f"file-{i}"], "openai", "k1")
        assert len(store) == 3
        assert await store.lookup(["file-0"]) is None
        assert await store.lookup(["file-1"]) is None
        assert await store.lookup(["file-4"]) == Placement("openai", "k1")
        store.reconfigure(ttl=1000.0, max_entries=1)
        assert len(store) == 1
        assert await store.lookup(["file-4"]) == Placement("openai", "k1")

    asyncio.run(run())


def test_memory_expired_entries_leave_by_time_alone() -> None:
    """Remembered then never looked up: later calls purge them, whatever their number."""
    clock = Clock()
    store = MemoryObjects(ttl=10.0, max_entries=100_000, clock=clock)

    async def run() -> None:
        for i in range(1000):
            await store.remember([f"file-{i}"], "openai", "k1")
        clock.now += 11.0
        for i in range(1000):
            await store.remember([f"new-{i}"], "openai", "k1")
        assert len(store) == 1000  # every expired one gone, the new ones kept

    asyncio.run(run())


def test_factory_memory_without_redis() -> None:
    store = make_object_store(None, ttl=5.0, max_entries=7)
    assert isinstance(store, MemoryObjects)
    assert (store.ttl, store.max_entries) == (5.0, 7)


ID_POOL = st.sampled_from([f"file-{i}" for i in range(12)])
PLACEMENTS = st.builds(Placement, st.sampled_from(["a", "b"]), st.sampled_from(["k1", "k2"]))


class MemoryMachine(RuleBasedStateMachine):
    """Any sequence of remember, lookup, clock steps and reloads: never more than
    ``max_entries``, never an expired placement, and the last placement remembered for an id
    (or nothing, once evicted or expired)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.max_entries = 5
        self.ttl = 50.0
        self.store = MemoryObjects(self.ttl, self.max_entries, self.clock)
        self.last: dict[str, tuple[Placement, float]] = {}  # id → last placement, when

    @rule(ids=st.lists(ID_POOL, max_size=4), placement=PLACEMENTS)
    def remember(self, ids: list[str], placement: Placement) -> None:
        asyncio.run(self.store.remember(ids, placement.backend, placement.key_id))
        for object_id in ids:
            self.last[object_id] = (placement, self.clock.now)

    @rule(step=st.floats(min_value=0.0, max_value=40.0))
    def advance(self, step: float) -> None:
        self.clock.now += step

    @rule(max_entries=st.integers(min_value=1, max_value=8), ttl=st.floats(1.0, 80.0))
    def reload(self, max_entries: int, ttl: float) -> None:
        self.max_entries, self.ttl = max_entries, ttl
        self.store.reconfigure(ttl, max_entries)

    @rule(object_id=ID_POOL)
    def lookup_one(self, object_id: str) -> None:
        found = asyncio.run(self.store.lookup([object_id]))
        if found is None:
            return  # evicted or expired: both allowed
        placement, at = self.last[object_id]
        assert found == placement
        assert self.clock.now - at < self.ttl

    @rule(ids=st.lists(ID_POOL, min_size=1, max_size=4))
    def lookup_many(self, ids: list[str]) -> None:
        found = asyncio.run(self.store.lookup(ids))
        live = [
            self.last[i][0]
            for i in ids
            if i in self.last and self.clock.now - self.last[i][1] < self.ttl
        ]
        assert found is None or found in live

    @rule()
    def fresh_id_is_found(self) -> None:
        asyncio.run(self.store.remember(["fresh-1"], "a", "k2"))
        self.last["fresh-1"] = (Placement("a", "k2"), self.clock.now)
        assert asyncio.run(self.store.lookup(["fresh-1"])) == Placement("a", "k2")

    @invariant()
    def bounded(self) -> None:
        assert len(self.store) <= self.max_entries

    @invariant()
    def nothing_expired_is_found(self) -> None:
        for object_id, (_, at) in self.last.items():
            if self.clock.now - at >= self.ttl:
                assert asyncio.run(self.store.lookup([object_id])) is None


MemoryMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryMachine = MemoryMachine.TestCase


# ---------------------------------------------------------------- the recipe, end to end

POOL_CONFIG = """
backends:
  openai:
    base_url: http://localhost:1/v1
    keys:
      - {id: k1, key: sk-one}
      - {id: k2, key: sk-two}
"""


class ProjectUpstream:
    """A fake upstream whose keys are two projects: a response exists only for its key."""

    def __init__(self) -> None:
        self.responses: dict[str, str] = {}  # response id → key that created it
        self.calls: list[tuple[str, str]] = []  # (key id, what)

    def answer(self, key_id: str, payload: dict[str, Any]) -> tuple[int, bytes]:
        previous = payload.get("previous_response_id")
        self.calls.append((key_id, previous or "new"))
        if previous is not None and self.responses.get(previous) != key_id:
            return 404, body({"error": {"message": f"Previous response '{previous}' not found"}})
        new_id = f"resp_{len(self.responses) + 1}"
        self.responses[new_id] = key_id
        return 200, body({"id": new_id, "object": "response", "status": "completed"})


def chain(use_store: bool) -> list[int]:
    from proxy.config import parse_config
    from proxy.keys import KeyPool
    from proxy.objects import placement_for, record_created

    pool = KeyPool(parse_config(POOL_CONFIG, "t.yaml", {}).backends["openai"])
    store = MemoryObjects(clock=Clock())
    known = known_placements({"openai": [k.id for k in pool.keys]})
    upstream = ProjectUpstream()

    async def create(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        placement = await placement_for(store, "/responses", payload, known) if use_store else None
        key = pool.pick(placement.key_id if placement else None)  # else round-robin
        status, answer = upstream.answer(key.id, payload)
        if use_store:
            await record_created(
                store, "/responses", "POST", status, answer, payload, "openai", key.id
            )
        return status, orjson.loads(answer)

    async def run() -> list[int]:
        statuses = []
        previous: str | None = None
        for turn in range(6):
            payload: dict[str, Any] = {"model": "gpt-4o", "input": f"turn {turn}"}
            if previous is not None:
                payload["previous_response_id"] = previous
            status, answer = await create(payload)
            statuses.append(status)
            previous = answer.get("id", previous)
        return statuses

    return asyncio.run(run())


def test_previous_response_chain_across_two_keys() -> None:
    assert chain(use_store=True) == [200] * 6
    # Without the store, round-robin sends the second turn to the other project's key.
    assert chain(use_store=False)[1] == 404


def test_a_fine_tuned_model_is_bound_to_the_key_whose_job_made_it() -> None:
    job = {
        "id": "ftjob-abc",
        "object": "fine_tuning.job",
        "status": "succeeded",
        "fine_tuned_model": "ft:gpt-4o-mini:acme::xyz",
    }
    ids = created_ids("/fine_tuning/jobs/ftjob-abc", "GET", 200, orjson.dumps(job))
    assert "ft:gpt-4o-mini:acme::xyz" in ids and "ftjob-abc" in ids


def test_a_batch_files_line_count_is_kept_in_memory_and_ignored_where_it_lives() -> None:
    async def run() -> tuple[Placement | None, Placement | None]:
        store = MemoryObjects()
        await store.remember(["file-lines"], "openai", "k", lines=10)
        await store.remember(["file-plain"], "openai", "k")
        known = known_placements({"openai": ["k"]})
        return await store.lookup(["file-lines"], known), await store.lookup(["file-plain"])

    with_lines, plain = asyncio.run(run())
    assert with_lines == Placement("openai", "k") and with_lines is not None
    assert with_lines.lines == 10
    assert plain is not None and plain.lines is None
