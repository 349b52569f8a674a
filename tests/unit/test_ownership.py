"""Ownership of objects: ``may_see`` (the one tenancy decision), the per-client quota of the
memory store (no client evicts another's), first owner wins, and list pages filtered."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.objects import (
    MemoryObjects,
    Placement,
    Record,
    Unknown,
    Viewer,
    may_see,
    not_found_message,
    visible_list,
)

A = Viewer("team-a")
B = Viewer("team-b")
HERE = Placement("openai", "k1")


@pytest.mark.parametrize(
    ("viewer", "record", "unknown", "seen"),
    [
        (None, None, Unknown.REFUSE, True),  # open proxy: one tenant
        (None, Record(HERE, "team-a"), Unknown.REFUSE, True),
        (A, Record(HERE, "team-a"), Unknown.REFUSE, True),
        (B, Record(HERE, "team-a"), Unknown.REFUSE, False),
        (B, Record(HERE, "team-a"), Unknown.ALLOW, False),  # allow is for unknown ids only
        (B, None, Unknown.REFUSE, False),  # fail closed
        (B, None, Unknown.ALLOW, True),
        (B, Record(HERE, None), Unknown.REFUSE, False),  # made while open: no owner
        (B, Record(HERE, None), Unknown.ALLOW, True),
        (Viewer("ops", shared=True), Record(HERE, "team-a"), Unknown.REFUSE, True),
        (Viewer("ops", shared=True), None, Unknown.REFUSE, True),
    ],
)
def test_may_see(
    viewer: Viewer | None, record: Record | None, unknown: Unknown, seen: bool
) -> None:
    assert may_see(viewer, record, unknown) is seen


def test_the_refusal_is_the_upstreams_own_404_wording() -> None:
    assert not_found_message("file-abc") == ("No such File object: file-abc", "id")
    assert not_found_message("resp_1") == ("Response with id 'resp_1' not found.", None)
    assert not_found_message("batch_9")[0] == "No such Batch object: batch_9"


def test_another_clients_answer_cannot_take_an_id_over() -> None:
    async def run() -> tuple[Record | None, Record | None]:
        store = MemoryObjects()
        await store.remember(["file-1"], "openai", "k1", "team-a")
        await store.remember(["file-1"], "openai", "k2", "team-b")
        return (await store.records(["file-1"])).get("file-1"), None

    assert asyncio.run(run())[0] == Record(HERE, "team-a")


def test_one_clients_many_stored_completions_evict_only_its_own() -> None:
    async def run() -> tuple[int, int, bool]:
        store = MemoryObjects(max_entries=1000, max_per_client=100)
        await store.remember(["file-a1", "file-a2"], "openai", "k1", "team-a")
        for n in range(50):  # 3200 ids: 32 x the quota
            await store.remember(
                [f"chatcmpl-b{n}-{i}" for i in range(64)], "openai", "k1", "team-b"
            )
        found = await store.records(["file-a1", "file-a2"])
        return store.owned("team-a"), store.owned("team-b"), len(found) == 2

    assert asyncio.run(run()) == (2, 100, True)


async def _page(store: MemoryObjects, viewer: Viewer, unknown: Unknown = Unknown.REFUSE) -> dict:  # type: ignore[type-arg]
    page = {
        "object": "list",
        "data": [{"id": "file-a1"}, {"id": "file-b1"}, {"id": "file-a2"}, {"id": "file-x"}],
        "first_id": "file-a1",
        "last_id": "file-x",
        "has_more": True,
    }
    out = await visible_list(store, orjson.dumps(page), viewer, unknown)
    return orjson.loads(out)  # type: ignore[no-any-return]


def test_a_list_page_keeps_only_the_callers_objects_and_its_cursors_follow() -> None:
    async def run() -> tuple[dict, dict]:  # type: ignore[type-arg]
        store = MemoryObjects()
        await store.remember(["file-a1", "file-a2"], "openai", "k1", "team-a")
        await store.remember(["file-b1"], "openai", "k1", "team-b")
        return await _page(store, A), await _page(store, B)

    a, b = asyncio.run(run())
    assert [item["id"] for item in a["data"]] == ["file-a1", "file-a2"]
    assert (a["first_id"], a["last_id"], a["has_more"]) == ("file-a1", "file-a2", True)
    assert [item["id"] for item in b["data"]] == ["file-b1"]
    assert (b["first_id"], b["last_id"]) == ("file-b1", "file-b1")


OWNERS = ("team-a", "team-b", "team-c")


class QuotaMachine(RuleBasedStateMachine):
    """Whatever each client records, nobody holds more than its quota, the total stays
    within the global bound, an owner's ids are never another's, and a client under its
    quota keeps everything it recorded (while the global bound is not reached)."""

    QUOTA = 8

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryObjects(max_entries=10_000, max_per_client=self.QUOTA)
        self.made: dict[str, list[str]] = {owner: [] for owner in OWNERS}
        self.serial = 0

    @rule(owner=st.sampled_from(OWNERS), count=st.integers(1, 12))
    def record(self, owner: str, count: int) -> None:
        ids = []
        for _ in range(count):
            self.serial += 1
            ids.append(f"obj-{self.serial}")
        asyncio.run(self.store.remember(ids, "openai", "k1", owner))
        self.made[owner] += ids

    @rule(owner=st.sampled_from(OWNERS), other=st.sampled_from(OWNERS))
    def steal(self, owner: str, other: str) -> None:
        """``owner``'s answer names ``other``'s ids: they stay ``other``'s."""
        ids = self.made[other][-3:]
        asyncio.run(self.store.remember(ids, "openai", "k1", owner))

    @invariant()
    def bounded_and_separate(self) -> None:
        counts: Counter[str | None] = Counter()
        for owner, ids in self.made.items():
            found = asyncio.run(self.store.records(ids[-64:]))
            for record in found.values():
                assert record.owner == owner
            expected = min(len(ids), self.QUOTA)
            assert self.store.owned(owner) == expected
            newest = ids[-expected:] if expected else []
            assert set(newest) <= set(found)  # the newest within the quota all kept
            counts[owner] = self.store.owned(owner)
        assert len(self.store) == sum(counts.values())


TestQuota = QuotaMachine.TestCase
TestQuota.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_list_cursors_and_limits() -> None:
    from proxy.objects import list_limit, query_after

    assert list_limit("") == 20
    assert list_limit("limit=5&order=desc") == 5
    assert list_limit("limit=1000") == 100
    assert list_limit("limit=x") == 20
    assert query_after("limit=5&after=file-1&order=asc", "file-9") == (
        "order=asc&after=file-9&limit=100"
    )


def test_a_page_holds_at_most_limit_items_and_has_more_when_some_were_held_back() -> None:
    async def run() -> dict:  # type: ignore[type-arg]
        store = MemoryObjects()
        await store.remember(["file-a1", "file-a2"], "openai", "k1", "team-a")
        page = {"object": "list", "data": [{"id": "file-a1"}, {"id": "file-a2"}]}
        page |= {"has_more": False, "last_id": "file-a2"}
        out = await visible_list(store, orjson.dumps(page), A, Unknown.REFUSE, limit=1)
        return orjson.loads(out)  # type: ignore[no-any-return]

    page = asyncio.run(run())
    assert (page["data"], page["has_more"], page["last_id"]) == (
        [{"id": "file-a1"}],
        True,
        "file-a1",
    )
