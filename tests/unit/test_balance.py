"""The pool choosers, without I/O: shares, least-busy, latency, affinity, and the budget."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.balance import (
    NEUTRAL_LATENCY,
    Affinity,
    DeploymentStats,
    Strategy,
    key_order,
    order,
    rendezvous_score,
    session_key,
)

NAMES = ("moonshot/kimi-k2-0711-preview", "openrouter/moonshotai/kimi-k2", "groq")


def stats(n: int = 3, now: float = 0.0) -> list[DeploymentStats]:
    return [DeploymentStats(now) for _ in range(n)]


def first_picks(strategy: Strategy, weights, healthy, pool, runs=2000, seed=7, session=None):
    rnd = random.Random(seed)
    return Counter(
        order(strategy, weights, healthy, pool, NAMES, session, rnd, 0.0)[0] for _ in range(runs)
    )


def test_weighted_shares_follow_the_weights_within_three_points():
    picks = first_picks(Strategy.WEIGHTED, (3.0, 1.0, 1.0), (True,) * 3, stats())
    shares = [picks[i] / 2000 for i in range(3)]
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.03)


def test_every_order_tries_each_deployment_once_unhealthy_ones_last():
    rnd = random.Random(1)
    for strategy in Strategy:
        tried = order(strategy, (1.0, 5.0, 1.0), (True, False, True), stats(), NAMES, None, rnd, 0)
        assert sorted(tried) == [0, 1, 2] and tried[-1] == 1


def test_least_busy_takes_the_fewest_in_flight_ties_by_weight():
    pool = stats()
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 4, 1, 1
    tried = order(
        Strategy.LEAST_BUSY, (1.0, 1.0, 2.0), (True,) * 3, pool, NAMES, None, random.Random(), 0
    )
    assert tried == [2, 1, 0]


def test_latency_avoids_a_deployment_that_turned_ten_times_slower():
    pool, now = stats(), 100.0
    for s in pool:
        s.observe(0.1, now)
    pool[1].observe(1.0, now)  # one slow sample: the estimate at once
    picks = Counter()
    rnd = random.Random(3)
    for step in range(200):
        t = now + step * 0.01
        first = order(Strategy.LATENCY, (1.0,) * 3, (True,) * 3, pool, NAMES, None, rnd, t)[0]
        picks[first] += 1
        pool[first].observe(1.0 if first == 1 else 0.1, t)
    assert picks[1] <= 20  # >= 90 % of the next 200 avoid it


def test_latency_wins_traffic_back_within_30_s_of_recovering():
    pool, rnd = stats(2), random.Random(5)
    pool[0].observe(0.1, 0.0)
    pool[1].observe(1.0, 0.0)  # slow...
    won_at = None
    t = 0.0
    while t < 60 and won_at is None:
        t += 0.1
        first = order(Strategy.LATENCY, (1.0, 1.0), (True, True), pool, NAMES[:2], None, rnd, t)[0]
        pool[first].observe(0.1, t)  # ...and recovered at once: it answers in 0.1 s too
        if first == 1:
            won_at = t
    assert won_at is not None and won_at <= 30


def test_a_new_deployment_starts_neutral_and_the_estimate_is_bounded():
    s = DeploymentStats(0.0)
    assert s.latency(0.0) == NEUTRAL_LATENCY
    for bad in (float("nan"), float("inf"), -1.0):
        s.observe(bad, 1.0)
    assert s.estimate == NEUTRAL_LATENCY
    for _ in range(20):
        s.observe(1e9, 2.0)
    assert s.estimate == 600.0


def test_one_slow_sample_raises_the_estimate_at_most_four_times():
    """Review of issue 20 (F2): one client's one 20 s request pushed everyone off."""
    s = DeploymentStats(0.0)  # 0.25 s
    s.observe(20.0, 0.0)
    assert s.estimate == pytest.approx(1.0)
    s.observe(20.0, 0.0)  # a deployment that really turned slow: the next sample too
    assert s.estimate == pytest.approx(4.0)


def test_a_deployment_failing_fast_does_not_look_fast():
    """Review of issue 20 (F1): failures gave no sample, the estimate faded, and the
    latency strategy sent most traffic to the deployment that failed every request."""
    pool, rnd = stats(2), random.Random(9)
    for s in pool:
        s.observe(0.1, 0.0)
    picks = Counter()
    for step in range(300):
        t = step * 0.05
        first = order(Strategy.LATENCY, (1.0, 1.0), (True, True), pool, NAMES[:2], None, rnd, t)[0]
        picks[first] += 1
        if first == 0:
            pool[0].failed(t)  # it fails at once, every time
        else:
            pool[1].observe(0.1, t)
    assert picks[0] <= 30


def test_a_fast_sample_after_a_fade_blends_from_the_faded_estimate():
    """Review of issue 20 (F3): a fast sample blended into the stored (unfaded) estimate
    and raised it."""
    s = DeploymentStats(0.0)
    s.observe(2.0, 0.0)
    faded = s.latency(30.0)
    s.observe(0.05, 30.0)
    assert s.estimate <= max(faded, 0.05) + 1e-9


@given(st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=2, max_size=6))
def test_rendezvous_a_leaving_deployment_moves_only_its_own_sessions(weights):
    names = [f"d{i}" for i in range(len(weights))]
    sessions = [f"s{i}" for i in range(300)]

    def home(session, alive):
        return max(alive, key=lambda i: rendezvous_score(session, names[i], weights[i]))

    everyone = list(range(len(weights)))
    before = {s: home(s, everyone) for s in sessions}
    gone = before[sessions[0]]
    after = {s: home(s, [i for i in everyone if i != gone]) for s in sessions}
    assert all(after[s] == before[s] for s in sessions if before[s] != gone)


def test_rendezvous_shares_follow_the_weights():
    names, weights = ("a", "b", "c"), (3.0, 1.0, 1.0)
    homes = Counter(
        max(range(3), key=lambda i: rendezvous_score(f"session-{n}", names[i], weights[i]))
        for n in range(3000)
    )
    assert [homes[i] / 3000 for i in range(3)] == pytest.approx([0.6, 0.2, 0.2], abs=0.03)


def test_a_session_always_starts_on_the_same_deployment_and_key():
    rnd = random.Random()
    firsts = {
        order(Strategy.WEIGHTED, (1.0,) * 3, (True,) * 3, stats(), NAMES, "team-a\x1fs1", rnd, 0)[0]
        for _ in range(50)
    }
    assert len(firsts) == 1
    assert key_order("team-a\x1fs1", ["k1", "k2", "k3"]) == key_order(
        "team-a\x1fs1", ["k3", "k1", "k2"]
    )


HEADERS = {b"x-claude-code-session-id": 0, b"session-id": 1, b"thread-id": 2}


@pytest.mark.parametrize(
    ("payload", "headers", "affinity", "expected"),
    [
        (
            {"prompt_cache_key": "pck", "user": "u"},
            [(b"session-id", b"h")],
            Affinity.SESSION,
            "c\x1fpck",
        ),
        ({}, [(b"thread-id", b"t"), (b"session-id", b"s")], Affinity.SESSION, "c\x1fs"),
        ({}, [(b"x-claude-code-session-id", b"cc")], Affinity.SESSION, "c\x1fcc"),
        ({"metadata": {"user_id": "anth"}, "user": "u"}, [], Affinity.SESSION, "c\x1fanth"),
        ({"user": "u"}, [], Affinity.SESSION, "c\x1fu"),
        ({}, [], Affinity.SESSION, None),
        ({}, [], Affinity.CLIENT, "c\x1f"),
        ({"prompt_cache_key": "pck"}, [], Affinity.NONE, None),
        ({"prompt_cache_key": 7, "user": ["x"]}, [], Affinity.SESSION, None),
    ],
)
def test_the_session_key_comes_from_the_first_source_found(payload, headers, affinity, expected):
    assert session_key(payload, headers, HEADERS, "c", affinity) == expected


def test_two_clients_with_one_session_id_are_placed_independently():
    a = session_key({"prompt_cache_key": "x" * 10_000}, [], HEADERS, "team-a", Affinity.SESSION)
    b = session_key({"prompt_cache_key": "x" * 10_000}, [], HEADERS, "team-b", Affinity.SESSION)
    assert a != b and len(a or "") <= 256 + len("team-a\x1f")
