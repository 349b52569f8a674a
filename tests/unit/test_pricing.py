"""Prices and cost: the shipped table, the config's rules, and how each count is priced."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.pricing import TABLE_SOURCE, Price, Prices, price_of, shipped_table
from proxy.usage import TokenCounts, token_counts


def test_the_shipped_table_says_where_it_came_from_and_prices_known_models():
    table, source = shipped_table()
    assert "litellm" in source and source == TABLE_SOURCE
    assert table["gpt-4o"] == Price(2.5, 10.0, cached_input=1.25)
    assert len(table) > 1000


def test_openai_usage_cached_and_reasoning_are_parts_of_the_totals():
    price = Price(input=2.5, output=10.0, cached_input=1.25, reasoning=20.0)
    tokens = token_counts(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"cached_tokens": 400},
            "completion_tokens_details": {"reasoning_tokens": 100},
        }
    )
    expected = (600 * 2.5 + 400 * 1.25 + 400 * 10.0 + 100 * 20.0) / 1e6
    assert price.cost(tokens) == pytest.approx(expected)


def test_anthropic_cache_writes_split_five_minutes_and_one_hour():
    price = Price(3.0, 15.0, cached_input=0.3, cache_write_5m=3.75, cache_write_1h=6.0)
    tokens = token_counts(
        {
            "input_tokens": 100,
            "output_tokens": 50,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 1000,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        }
    )
    assert tokens.cache_creation_1h == 200
    expected = (100 * 3.0 + 1000 * 0.3 + 100 * 3.75 + 200 * 6.0 + 50 * 15.0) / 1e6
    assert price.cost(tokens) == pytest.approx(expected)


def test_config_rules_come_first_exact_then_globs_then_the_table_then_backend_prefix():
    prices = Prices(
        {"gpt-4o": {"input": 1, "output": 2}, "kimi-*": {"input": 0.6, "output": 2.5}},
        {"gpt-4o": Price(9, 9), "deepseek/deepseek-chat": Price(0.28, 0.42)},
    )
    assert prices.lookup("openai", "gpt-4o") == Price(1, 2)
    assert prices.lookup("moonshot", "kimi-k2-0711-preview") == Price(0.6, 2.5)
    assert prices.lookup("deepseek", "deepseek-chat") == Price(0.28, 0.42)
    assert prices.cost("x", "nobody-knows-me", TokenCounts(prompt=5)) is None  # never $0


@given(st.dictionaries(st.sampled_from(["input", "output", "cached_input"]), st.from_type(object)))
def test_a_corrupt_price_prices_nothing(raw):
    price = price_of(raw)
    if price is not None:
        assert 0 <= price.input <= 1e6 and 0 <= price.output <= 1e6


@given(
    st.builds(
        TokenCounts,
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    )
)
def test_any_counts_cost_between_the_cheapest_and_dearest_rate(tokens):
    price = Price(1.0, 4.0, cached_input=0.5, cache_write_5m=1.25, cache_write_1h=2.0)
    usd = price.cost(tokens)
    total = tokens.prompt + tokens.completion
    assert 0 <= usd <= total * 4.0 / 1e6 + 1e-12
