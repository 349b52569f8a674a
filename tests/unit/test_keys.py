from __future__ import annotations

import pytest

from proxy.config import parse_config
from proxy.keys import KeyPool, NoUsableKey

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


def test_cooldown_ends_by_itself_and_defaults_to_exponential():
    p = pool(K1="sk-1")
    p.cool_down("one", 0.05, "429 from upstream")
    with pytest.raises(NoUsableKey) as info:
        p.pick()
    assert 0 < info.value.retry_after <= 0.05
    assert "cooling down" in info.value.hint
    import time

    time.sleep(0.06)
    assert p.pick().id == "one"
    p.cool_down("one", None, "429")  # no retry-after: 2^(streak-1) s, streak 2 -> 2 s
    p.cool_down("one", None, "429")  # streak 3 -> 4 s
    remaining = p.health["one"].cooldown_until - time.monotonic()
    assert 3.9 < remaining <= 4.0
    p.mark_success("one")  # a successful answer ends the streak
    assert p.health["one"].cooldown_streak == 0


def test_exclude_skips_keys_already_tried_in_this_request():
    p = pool(K1="sk-1", K2="sk-2")
    assert p.pick(exclude=["one"]).id == "two"
    with pytest.raises(NoUsableKey):
        p.pick(exclude=["one", "two"])
