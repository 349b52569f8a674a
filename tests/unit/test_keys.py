from __future__ import annotations

import math

import pytest

from proxy.config import parse_config
from proxy.keys import INVALID_MAX, KeyPool, KeyState, NoUsableKey

CONFIG = """
backends:
  b:
    base_url: http://localhost:1/v1
    keys:
      - {id: one, key: "${K1}"}
      - {id: two, key: "${K2}"}
      - {id: three, key: "${K3}"}
"""


def pool(**env: str) -> KeyPool:
    return KeyPool(parse_config(CONFIG, "t.yaml", env).backends["b"])


def test_round_robin_over_usable_keys_skips_missing_ones():
    p = pool(K1="sk-1", K3="sk-3")
    assert [p.pick().id for _ in range(5)] == ["one", "three", "one", "three", "one"]


def test_pinned_key_is_always_used():
    p = pool(K1="sk-1", K2="sk-2", K3="sk-3")
    assert {p.pick("two").id for _ in range(4)} == {"two"}


def test_no_usable_key_names_every_variable_to_set():
    with pytest.raises(NoUsableKey) as info:
        pool().pick()
    assert "set K1" in info.value.hint and "set K3" in info.value.hint


def test_pinned_missing_key_names_its_variable():
    with pytest.raises(NoUsableKey) as info:
        pool(K1="sk-1").pick("two")
    assert info.value.hint == "key 'two' is missing: set K2"


def test_invalid_key_is_skipped_until_restored():
    p = pool(K1="sk-1", K2="sk-2")
    p.mark_invalid("one", "401 from upstream: bad key")
    assert [p.pick().id for _ in range(3)] == ["two", "two", "two"]
    assert p.invalid_keys()[0].id == "one"
    p.restore("one")
    assert {p.pick().id for _ in range(2)} == {"one", "two"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def clocked_pool(clock: Clock, max_cooldown: str = "") -> KeyPool:
    text = CONFIG + (f"    max_cooldown: {max_cooldown}\n" if max_cooldown else "")
    return KeyPool(parse_config(text, "t.yaml", {"K1": "sk-1"}).backends["b"], clock=clock)


def test_key_states_are_a_str_enum_with_the_documented_names():
    assert [str(s) for s in KeyState] == ["ok", "missing", "invalid", "cooldown"]


def test_cooldown_ends_by_itself_and_defaults_to_exponential():
    clock = Clock()
    p = clocked_pool(clock)
    p.cool_down("one", 0.05, "429 from upstream")
    with pytest.raises(NoUsableKey) as info:
        p.pick()
    assert 0 < info.value.retry_after <= 0.05
    assert "cooling down" in info.value.hint
    assert p.state_of("one") is KeyState.COOLDOWN
    clock.now += 0.05
    assert p.state_of("one") is KeyState.OK  # by time alone
    assert p.pick().id == "one"
    p.cool_down("one", None, "429")  # no retry-after: 2^(streak-1) s, streak 2 -> 2 s
    p.cool_down("one", None, "429")  # streak 3 -> 4 s
    assert p.cooldown_left("one") == 4.0
    p.mark_success("one")  # a successful answer ends the streak
    assert p.health["one"].cooldown_streak == 0


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf, -1.0])
def test_a_cooldown_that_is_not_a_time_falls_back_to_the_exponential_one(seconds):
    p = clocked_pool(Clock())
    p.cool_down("one", seconds, "429")
    assert p.cooldown_left("one") == 1.0
    assert "cooling down for 1 s" in p.missing_hint()


def test_a_huge_cooldown_is_capped_at_max_cooldown():
    clock = Clock()
    p = clocked_pool(clock, max_cooldown="30s")
    p.cool_down("one", 1e308, "429 with retry-after: 1e308")
    assert p.cooldown_left("one") == 30.0
    clock.now += 30.0
    assert p.pick().id == "one"


def test_an_invalid_mark_ends_after_a_day_at_most():
    clock = Clock()
    p = clocked_pool(clock)
    p.mark_invalid("one", "401")
    assert p.state_of("one") is KeyState.INVALID and p.usable() == []
    clock.now += INVALID_MAX
    assert p.state_of("one") is KeyState.OK


def test_a_reload_caps_cooldowns_at_the_new_max_cooldown():
    clock = Clock()
    before = clocked_pool(clock, max_cooldown="300s")
    before.cool_down("one", 200.0, "429")
    after = clocked_pool(clock, max_cooldown="10s")
    after.adopt_health(before)
    assert after.cooldown_left("one") == 10.0


def test_exclude_skips_keys_already_tried_in_this_request():
    p = pool(K1="sk-1", K2="sk-2")
    assert p.pick(exclude=["one"]).id == "two"
    with pytest.raises(NoUsableKey):
        p.pick(exclude=["one", "two"])


def tenant_pool(clock: Clock) -> KeyPool:
    backend = parse_config(CONFIG, "t.yaml", {"K1": "sk-1"}).backends["b"]
    return KeyPool(backend, clock=clock, multi_tenant=True)


def test_one_clients_429_burst_does_not_lengthen_the_cooldown_a_second_client_starts():
    """Review of issue 19: eight 429s (no retry-after) to one client raised the key's
    shared streak, so another client's first 429 cooled it down for everyone for 60 s."""
    clock = Clock()
    p = tenant_pool(clock)
    for _ in range(8):
        p.cool_down("one", None, "429", "attacker")
    p.cool_down("one", None, "429", "victim")  # two clients: everyone's, for 1 s
    assert p.cooldown_left("one") == pytest.approx(1.0)
    clock.now += 1.0
    assert p.pick(client="third").id == "one"
