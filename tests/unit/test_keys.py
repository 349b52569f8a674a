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
