"""The conversations the proxy keeps for translated Responses requests: a chain per
conversation, each owner's own (never seen, continued, deleted or evicted by another),
bounded by bytes, turns and age whatever the clients send."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.conversations import MAX_TURNS, Conversations


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def item(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def answer(rid: str, text: str) -> dict[str, Any]:
    return {"id": rid, "status": "completed", "output": [{"type": "message", "content": text}]}


def test_a_chain_is_walked_oldest_first_and_only_by_its_owner():
    kept = Conversations(1 << 20, 1 << 19, 60.0)
    assert kept.keep("a", "resp_1", None, [item("hi"), {"o": 1}], answer("resp_1", "x"))
    assert kept.keep("a", "resp_2", "resp_1", [item("and?"), {"o": 2}], answer("resp_2", "y"))
    assert kept.history("a", "resp_2") == [item("hi"), {"o": 1}, item("and?"), {"o": 2}]
    assert kept.history("b", "resp_2") is None and kept.response("b", "resp_1") is None
    assert not kept.delete("b", "resp_1")
    assert kept.input_items("a", "resp_2") == [item("and?")]
    assert kept.delete("a", "resp_1")
    assert kept.history("a", "resp_2") is None  # a broken chain continues nowhere
    assert kept.response("a", "resp_2") is not None


def test_age_alone_lets_them_go():
    clock = Clock()
    kept = Conversations(1 << 20, 1 << 20, 10.0, clock)
    kept.keep("a", "resp_1", None, [item("hi")], answer("resp_1", "x"))
    clock.now = 9.9
    assert kept.response("a", "resp_1") is not None
    clock.now = 10.0
    assert kept.response("a", "resp_1") is None
    assert len(kept) == 0 and kept.size == 0


def test_a_response_too_big_for_a_share_or_a_chain_too_long_is_not_kept():
    kept = Conversations(1 << 20, 4096, 60.0)
    assert not kept.keep("a", "resp_big", None, [item("x" * 5000)], answer("resp_big", ""))
    assert kept.response("a", "resp_big") is None
    previous = None
    for n in range(MAX_TURNS + 1):
        ok = kept.keep("a", f"resp_{n}", previous, [], {"id": f"resp_{n}"})
        previous = f"resp_{n}"
    assert not ok  # the 1001st turn of one chain


def test_a_client_filling_its_share_evicts_its_own_oldest_never_anothers():
    kept = Conversations(100_000, 20_000, 60.0)
    kept.keep("b", "resp_b", None, [item("mine")], answer("resp_b", "x"))
    for n in range(200):
        kept.keep("a", f"resp_{n}", None, [item("y" * 500)], answer(f"resp_{n}", ""))
    assert kept.owned_bytes("a") <= 20_000
    assert kept.response("b", "resp_b") is not None
    assert kept.response("a", "resp_199") is not None and kept.response("a", "resp_0") is None


owners = st.sampled_from(["a", "b", None])
ids = st.sampled_from([f"resp_{n}" for n in range(6)])


class KeptConversations(RuleBasedStateMachine):
    """Any sequence of keeps, reads, deletes and time: the bounds hold, and no owner's
    actions change what another sees."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.kept = Conversations(6000, 3000, 50.0, self.clock)
        self.watched: dict[str, bytes | None] = {}  # b's responses, as b last saw them

    @rule(owner=owners, rid=ids, previous=st.none() | ids, size=st.integers(0, 1500))
    def keep(self, owner, rid, previous, size):
        self.kept.keep(owner, rid, previous, [item("z" * size)], answer(rid, ""))
        if owner == "b":
            self.watched[rid] = self.kept.response("b", rid)

    @rule(owner=st.sampled_from(["a", None]), rid=ids)
    def others_read_and_delete(self, owner, rid):
        before = {r: self.kept.response("b", r) for r in self.watched}
        self.kept.history(owner, rid)
        self.kept.delete(owner, rid)
        # b's own: only the process-wide bound or age takes them, never another's delete
        for r, seen in before.items():
            now = self.kept.response("b", r)
            assert now is None or now == seen

    @precondition(lambda self: self.clock.now < 500)
    @rule(step=st.floats(0, 30))
    def time_passes(self, step):
        self.clock.now += step

    @invariant()
    def bounded(self):
        assert self.kept.size <= 6000
        for owner in ("a", "b", None):
            assert self.kept.owned_bytes(owner) <= 3000
        assert self.kept.size == sum(self.kept.owned_bytes(o) for o in ("a", "b", None))


TestKeptConversations = KeptConversations.TestCase
TestKeptConversations.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_a_chain_holds_at_most_what_a_client_may_send_at_once():
    kept = Conversations(1 << 24, 1 << 24, 60.0, max_chain_bytes=10_000)
    previous = None
    for n in range(20):
        ok = kept.keep("a", f"resp_{n}", previous, [item("w" * 900)], answer(f"resp_{n}", ""))
        if not ok:
            break
        previous = f"resp_{n}"
    assert not ok and n == 10  # ~950 bytes a turn: the 11th would pass 10,000
    history = kept.history("a", "resp_9")
    assert history is not None and len(orjson.dumps(history)) <= 10_000
