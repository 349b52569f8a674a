"""What a request cost, in USD, from its token counts and a price table.

Prices are data, never code: the table shipped in ``proxy/data/prices.json`` (made by
``make prices`` from a public catalogue, with its source and date), overridden and
extended by the config's ``pricing:`` (a model id or a glob, first match in file order),
in USD per million tokens. A model is looked up by the id the backend was sent: the
config's ``pricing:`` first, then the table by that id, then by ``backend/id`` (the
catalogue prefixes most providers' ids with a name our backends often share: ``deepseek/``,
``moonshot/``, ``groq/``, ``openrouter/``). No price: the cost is unknown (``None``),
never a silent $0; the caller counts it as unpriced.

How the counts are priced (``usage.TokenCounts``): ``prompt`` is every input token, of
which ``cached`` were read from a cache (``cached_input``, default ``input``) and
``cache_creation`` written to one (``cache_write_5m``, and ``cache_write_1h`` for the
``cache_creation_1h`` part; default ``input``); ``completion`` every output token, of which
``reasoning`` may have its own price (default ``output``).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

from proxy.usage import TokenCounts

log = logging.getLogger("proxy.pricing")

PER = 1_000_000  # prices are per million tokens
MAX_PRICE = 1_000_000.0  # USD per million tokens: anything above is not a price
MAX_LOGGED_UNPRICED = 1000  # models logged once each as unpriced, at most


@dataclass(frozen=True, slots=True)
class Price:
    input: float
    output: float
    cached_input: float | None = None
    cache_write_5m: float | None = None
    cache_write_1h: float | None = None
    reasoning: float | None = None

    def cost(self, t: TokenCounts) -> float:
        """USD for ``t``."""
        cached = min(t.cached, t.prompt)
        written = min(t.cache_creation, t.prompt - cached)
        written_1h = min(t.cache_creation_1h, written)
        plain_input = t.prompt - cached - written
        write_5m = self.cache_write_5m if self.cache_write_5m is not None else self.input
        write_1h = self.cache_write_1h if self.cache_write_1h is not None else write_5m
        reasoning = min(t.reasoning, t.completion)
        usd = (
            plain_input * self.input
            + cached * (self.cached_input if self.cached_input is not None else self.input)
            + (written - written_1h) * write_5m
            + written_1h * write_1h
            + (t.completion - reasoning) * self.output
            + reasoning * (self.reasoning if self.reasoning is not None else self.output)
        )
        return usd / PER


def price_of(raw: Mapping[str, Any]) -> Price | None:
    """A price from the shipped table or the config: None unless input and output are
    sane numbers (a corrupt entry prices nothing rather than something wrong)."""

    def number(name: str) -> float | None:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        value = float(value)
        return value if math.isfinite(value) and 0 <= value <= MAX_PRICE else None

    base_in, base_out = number("input"), number("output")
    if base_in is None or base_out is None:
        return None
    return Price(
        base_in,
        base_out,
        number("cached_input"),
        number("cache_write_5m"),
        number("cache_write_1h"),
        number("reasoning"),
    )


def shipped_table() -> tuple[dict[str, Price], str]:
    """The table in the package, and where it came from (source, date)."""
    text = resources.files("proxy").joinpath("data/prices.json").read_bytes()
    document = orjson.loads(text)
    prices = {}
    for model, raw in document.get("prices", {}).items():
        price = price_of(raw) if isinstance(raw, dict) else None
        if price is not None:
            prices[model] = price
    return prices, f"{document.get('source', '?')}, {document.get('generated', '?')}"


class Prices:
    """Lookups of one config: the config's rules, then the shipped table. Per model, the
    answer is kept (bounded) so a request costs one dict hit."""

    def __init__(
        self,
        rules: Mapping[str, Mapping[str, Any]],
        table: Mapping[str, Price] | None = None,
    ) -> None:
        self._table = table if table is not None else _TABLE
        self._exact: dict[str, Price] = {}
        self._globs: list[tuple[re.Pattern[str], Price]] = []
        for pattern, raw in rules.items():
            price = price_of(raw)
            if price is None:
                continue
            if any(c in pattern for c in "*?["):
                self._globs.append((re.compile(fnmatch.translate(pattern)), price))
            else:
                self._exact.setdefault(pattern, price)
        self._found: dict[tuple[str, str], Price | None] = {}
        self._logged: set[str] = set()

    def lookup(self, backend: str, model: str) -> Price | None:
        key = (backend, model)
        try:
            return self._found[key]
        except KeyError:
            pass
        price = self._exact.get(model)
        if price is None:
            price = next((p for pattern, p in self._globs if pattern.match(model)), None)
        if price is None:
            price = self._table.get(model) or self._table.get(f"{backend}/{model}")
        if len(self._found) < 4096:  # model ids can come from clients: bounded
            self._found[key] = price
        return price

    def cost(self, backend: str, model: str, tokens: TokenCounts) -> float | None:
        """USD for ``tokens`` on ``model`` at ``backend``; None when it has no price."""
        price = self.lookup(backend, model)
        if price is None:
            if model not in self._logged and len(self._logged) < MAX_LOGGED_UNPRICED:
                self._logged.add(model)
                shown = model[:100].encode("unicode_escape").decode("ascii")
                log.warning(
                    "model '%s' on backend %s has no price: its requests are counted in "
                    "llm_proxy_unpriced_requests_total (add it under pricing:)",
                    shown,
                    backend,
                )
            return None
        return price.cost(tokens)


_TABLE, TABLE_SOURCE = shipped_table()
