"""Reconnect-storm backoff and rate limits, on a ``limits`` storage (memory or Redis).

Everything several replicas must agree on lives in that storage, so with ``redis://`` a
client's limit and backoff hold across workers and replicas. When the storage fails (Redis
down) the proxy fails open: requests go through, and the failure is logged and counted.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from enum import Enum

import limits
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.storage import storage_from_string

from proxy.config import Config, ReconnectConfig

log = logging.getLogger("proxy.throttle")

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}
_JITTER = 0.2  # a wait is shortened by up to 20% so clients blocked together spread out


class Outcome(Enum):
    SUCCESS = "success"  # resets the failure streak
    FAILURE = "failure"  # upstream 5xx/429, connect error, timeout, broken stream
    NEUTRAL = "neutral"  # client errors: neither


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int  # -1 when allowed: not worth a second storage round trip to know
    reset_seconds: float  # until the window frees a slot


class LeanMemoryStorage(MemoryStorage):
    """limits' async memory storage, with its expiry sweep run at most once a second.

    Upstream schedules a sweep (an ``asyncio.to_thread`` call per key) after every write, so
    under load a sweep is always running: 5% of the proxy's CPU in profiles. Expired entries
    are already ignored when read, so sweeping once a second only bounds memory.
    """

    SWEEP_INTERVAL = 1.0

    def __init__(self) -> None:
        super().__init__("async+memory://")
        self._last_sweep = 0.0
        self.sweeps = 0

    async def _MemoryStorage__schedule_expiry(self) -> None:  # overrides the private hook
        now = time.monotonic()
        if now - self._last_sweep < self.SWEEP_INTERVAL:
            return
        self._last_sweep = now
        self.sweeps += 1
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


def make_storage(uri: str) -> Storage:
    """``memory://`` or ``redis://host:port`` from the config, as an async limits storage."""
    if uri.startswith("memory://"):
        return LeanMemoryStorage()
    # Short socket timeouts: a Redis that hangs must not hold requests (limits fail open).
    return storage_from_string(
        f"async+{uri}",
        implementation="redispy",
        wrap_exceptions=True,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
    )


class Throttle:
    def __init__(self, config: Config, storage: Storage) -> None:
        self.storage = storage
        self.reconnect: ReconnectConfig = config.throttle.reconnect
        self._limiter = _STRATEGIES[config.throttle.rate_limit_strategy](storage)
        self._client_limits = {
            c.id: limits.parse_many(c.rate_limit) for c in config.clients if c.rate_limit
        }
        self._backend_limits = {
            name: limits.parse_many(b.rate_limit)
            for name, b in config.backends.items()
            if b.rate_limit
        }
        self._last_storage_error = 0.0
        self.storage_errors = 0

    # ------------------------------------------------------------ reconnect backoff

    async def reconnect_wait(self, client: str, model: str) -> float:
        """Seconds this (client, model) must still wait after its recent failures; 0: go."""
        if not self.reconnect.enabled:
            return 0.0
        try:
            # The block key's value is the time (ms since the epoch) the block ends: one read.
            until_ms = await self.storage.get(_block_key(client, model))
        except Exception as exc:
            self.storage_failed(exc)
            return 0.0
        return max(0.0, until_ms / 1000 - time.time()) if until_ms else 0.0

    async def record(self, client: str, model: str, outcome: Outcome) -> None:
        if not self.reconnect.enabled or outcome is Outcome.NEUTRAL:
            return
        try:
            if outcome is Outcome.SUCCESS:
                await self.storage.clear(_streak_key(client, model))
                return
            # The streak is forgotten after a quiet spell of a few maximum waits.
            forget_after = math.ceil(self.reconnect.max * 4)
            streak = await self.storage.incr(_streak_key(client, model), forget_after)
            wait = self.backoff(streak)
            block = _block_key(client, model)
            await self.storage.clear(block)
            # Redis expiries are whole seconds, so the end time itself is the stored value.
            until_ms = int((time.time() + wait) * 1000)
            await self.storage.incr(block, math.ceil(wait) + 1, amount=until_ms)
        except Exception as exc:
            self.storage_failed(exc)

    def backoff(self, streak: int) -> float:
        """``base * 2^(k-1)`` after the k-th failure in a row, capped, with jitter."""
        exponent = min(streak - 1, 32)  # 2^32 * base is far past any cap
        wait = min(self.reconnect.base * 2.0**exponent, self.reconnect.max)
        return wait * (1.0 - _JITTER * random.random())

    # ------------------------------------------------------------ rate limits

    async def hit_client(self, client: str) -> RateDecision | None:
        """Count one request of ``client``; None when it has no limit."""
        items = self._client_limits.get(client)
        return await self._hit(items, "client", client) if items else None

    async def hit_backend(self, backend: str) -> RateDecision | None:
        items = self._backend_limits.get(backend)
        return await self._hit(items, "backend", backend) if items else None

    async def _hit(self, items: list[limits.RateLimitItem], kind: str, name: str) -> RateDecision:
        try:
            for item in items:
                if not await self._limiter.hit(item, kind, name):
                    # Window stats only on a refusal: they cost as much as the hit itself.
                    stats = await self._limiter.get_window_stats(item, kind, name)
                    reset = max(0.0, stats.reset_time - time.time())
                    return RateDecision(False, item.amount, 0, reset)
        except Exception as exc:
            self.storage_failed(exc)
        return RateDecision(True, items[0].amount, -1, 0.0)

    # ------------------------------------------------------------ storage health

    def storage_failed(self, exc: Exception) -> None:
        self.storage_errors += 1
        now = time.monotonic()
        if now - self._last_storage_error > 10:  # loud, but not once per request
            self._last_storage_error = now
            log.error(
                "throttle storage failed (%s: %s): failing open, limits are not enforced",
                type(exc).__name__,
                exc,
            )


def _streak_key(client: str, model: str) -> str:
    return f"reconnect/streak/{client}/{model}"


def _block_key(client: str, model: str) -> str:
    return f"reconnect/block/{client}/{model}"
