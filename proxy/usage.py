"""Token counts out of an upstream's usage object, whatever its dialect.

One function, ``token_counts(usage)``, reads every shape the proxy relays: chat and legacy
completions (``prompt_tokens``/``completion_tokens`` with ``*_details``), embeddings
(``prompt_tokens`` only), Responses and Realtime (``input_tokens``/``output_tokens`` with
``input_tokens_details`` / ``input_token_details``) and Anthropic Messages
(``input_tokens`` plus ``cache_creation_input_tokens``/``cache_read_input_tokens``). The
result is what the access log prints and what ``llm_proxy_tokens_total{type}`` counts.

The types are measures, not parts of a sum: ``prompt`` is every input token (cached ones
included, as OpenAI reports it and as OpenTelemetry's ``gen_ai.usage.input_tokens`` means
it), ``cached`` the part of it read from a cache (in every dialect, so one ratio
``cached / prompt`` works for all providers), ``reasoning`` the part of ``completion``
spent thinking, and ``cache_creation`` / ``cache_read`` Anthropic's own two fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

# A count at or above this is not a count (one request of a billion tokens does not
# exist): an upstream sending 1e308, -5, "7" or true must not move a counter.
MAX_TOKENS = 10**9

# The ``type`` label values, in the order the access log prints them.
TOKEN_TYPES = (
    "prompt",
    "completion",
    "cached",
    "reasoning",
    "cache_creation",
    "cache_read",
    "cache_creation_1h",
)


class TokenCounts(NamedTuple):  # a tuple: made once per request, cheaply
    prompt: int = 0
    completion: int = 0
    cached: int = 0  # of prompt: read from the provider's prompt cache
    reasoning: int = 0  # of completion: reasoning / thinking tokens
    cache_creation: int = 0  # Anthropic: written to the cache (priced above input)
    cache_read: int = 0  # Anthropic: read from the cache (the same tokens as cached)
    cache_creation_1h: int = 0  # of cache_creation: written for an hour (priced higher)

    def nonzero(self) -> list[tuple[str, int]]:
        """(type, count) for every count above zero: what the metrics increment."""
        counts = (
            self.prompt,
            self.completion,
            self.cached,
            self.reasoning,
            self.cache_creation,
            self.cache_read,
            self.cache_creation_1h,
        )
        return [(kind, count) for kind, count in zip(TOKEN_TYPES, counts, strict=True) if count]

    def __bool__(self) -> bool:
        return any(self)  # counts are never negative: any above zero


NO_TOKENS = TokenCounts()


def token_counts(usage: Mapping[str, Any] | None) -> TokenCounts:
    """The counts in one usage object; anything absent or not a sane count is 0."""
    if not usage or not isinstance(usage, dict):  # parsed JSON: a dict, never another Mapping
        return NO_TOKENS
    cache_creation = _count(usage.get("cache_creation_input_tokens"))
    cache_read = _count(usage.get("cache_read_input_tokens"))
    prompt = _first_count(usage, "prompt_tokens", "input_tokens")
    if cache_creation or cache_read:
        # Anthropic's input_tokens leaves both cache parts out; prompt means all of the input.
        prompt = _capped(prompt + cache_creation + cache_read)
    cached = (
        _detail(usage, "prompt_tokens_details", "cached_tokens")  # chat, completions
        or _detail(usage, "input_tokens_details", "cached_tokens")  # Responses
        or _detail(usage, "input_token_details", "cached_tokens")  # Realtime
        or _count(usage.get("cached_tokens"))  # Moonshot, at the top of its usage
        or _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
        or cache_read
    )
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens") or _detail(
        usage, "output_tokens_details", "reasoning_tokens"
    )
    return TokenCounts(
        prompt=prompt,
        completion=_first_count(usage, "completion_tokens", "output_tokens"),
        cached=cached,
        reasoning=reasoning,
        cache_creation=cache_creation,
        cache_read=cache_read,
        cache_creation_1h=min(
            _detail(usage, "cache_creation", "ephemeral_1h_input_tokens"), cache_creation
        ),
    )


def _count(value: Any) -> int:
    # type() and not isinstance(): True is an int to Python, not a count to anyone.
    if type(value) is int and 0 <= value < MAX_TOKENS:
        return value
    return 0


def _capped(value: int) -> int:
    return value if value < MAX_TOKENS else 0


def _first_count(usage: Mapping[str, Any], name: str, other: str) -> int:
    value = usage.get(name)
    return _count(value if value is not None else usage.get(other))


def _detail(usage: Mapping[str, Any], group: str, name: str) -> int:
    details = usage.get(group)
    return _count(details.get(name)) if isinstance(details, dict) else 0


def asks_for_usage(payload: Mapping[str, Any]) -> bool:
    """Whether the client's own request asks for the stream's usage event: if it does not
    and the proxy asks for it anyway, the event is taken out of what the client gets."""
    options = payload.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True
