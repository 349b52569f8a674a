"""The throttle's own rate windows (memory storage) decide as ``limits`` does, strategy by
strategy, for any sequence of hits, costs and pauses: each decision checked against
``limits``' own memory storage on the same clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import limits
import limits.aio.storage.memory as limits_memory
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits.aio.storage import MemoryStorage

from proxy.throttle import _STRATEGIES
from proxy.windows import Windows

steps = st.lists(
    st.tuples(st.floats(0, 4.0), st.integers(1, 3)),  # a pause (s), then a hit of this cost
    min_size=1,
    max_size=60,
)


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
@settings(max_examples=120, deadline=None)
@given(plan=steps, amount=st.integers(1, 6))
def test_each_decision_is_limits_own(strategy, plan, amount):
    now = [1_000_000.0]  # one clock for both (limits reads time.time())
    fake = SimpleNamespace(time=lambda: now[0])
    real = limits_memory.time
    limits_memory.time = fake  # type: ignore[assignment]
    try:
        item = limits.parse(f"{amount}/5 seconds")
        reference = _STRATEGIES[strategy](MemoryStorage("async+memory://"))
        ours = Windows(strategy, clock=lambda: now[0])
        for pause, cost in plan:
            now[0] += pause
            theirs = asyncio.run(reference.hit(item, "client", "c", cost=cost))
            mine = ours.hit(("client", "c", item.amount, item.get_expiry()), cost)
            assert (mine is None) == theirs, (strategy, now[0], cost)
            if mine is not None:
                assert 0 <= mine <= 2 * item.get_expiry()
    finally:
        limits_memory.time = real  # type: ignore[assignment]


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
@settings(max_examples=120, deadline=None)
@given(plan=steps, amount=st.integers(1, 6), cost=st.integers(1, 6))
def test_the_wait_a_refusal_gives_is_when_the_hit_would_pass(strategy, plan, amount, cost):
    """Retry-After: a client that waits what it was told gets in (and not much sooner)."""
    import copy

    now = [1_000_000.0]
    windows = Windows(strategy, clock=lambda: now[0])
    key = ("client", "c", amount, 5.0)
    for pause, step_cost in plan:
        now[0] += pause
        windows.hit(key, step_cost)
    if cost > amount:
        return
    probe = copy.deepcopy(windows)
    wait = probe.hit(key, cost)
    if wait is None:
        return
    assert 0 <= wait <= 10.0  # (sliding: into the next period at most)
    later = copy.deepcopy(windows)
    now[0] += wait
    assert later.hit(key, cost) is None, (strategy, wait)


def test_windows_of_limits_a_reload_removed_are_dropped():
    windows = Windows("moving-window", clock=lambda: 1.0)
    kept, gone = ("client", "a", 5, 60.0), ("client", "b", 5, 60.0)
    windows.hit(kept)
    windows.hit(gone)
    windows.retain({kept})
    assert list(windows._moving) == [kept]
