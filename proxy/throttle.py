"""Reconnect-storm backoff and rate limits, on a storage (memory or Redis).

Everything several replicas must agree on lives in that storage, so with ``redis://`` a
client's limit and backoff hold across workers and replicas. When Redis is really down or
hung the proxy fails open: requests go through, and the failure is logged and counted. Our
own congestion is not a Redis failure: the connection pool blocks (bounded) instead of
running out, so a limit holds whatever the concurrency.

The reconnect throttle keys on (client, model): the client is the client key's id, or the
client address when no client keys are configured. A (client, model) waits only once it has
failed ``after`` times in a row *and* most of its recent requests failed (a failure ratio,
decayed over about the last ``WINDOW`` outcomes, of at least ``min_failure_ratio``): an SDK
retrying a random 5xx, or users behind one address sharing a mostly healthy upstream, never
wait; a client hammering a dead upstream waits ``base * 2^(k - after)`` after its k-th
failure in a row, capped at ``max``, jittered. A success resets the streak and the wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import limits
import redis
import redis.asyncio
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from proxy.config import Config, ReconnectConfig
from proxy.spend import MemoryLedger, RedisLedger
from proxy.windows import Windows

log = logging.getLogger("proxy.throttle")

T = TypeVar("T")

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}
_JITTER = 0.2  # a wait is shortened by up to 20% so clients blocked together spread out
WINDOW = 10  # the failure ratio weighs about the last 10 outcomes of a (client, model)
_DRIFT = 1.0  # seconds two replicas' clocks may disagree by
MEMORY_ENTRIES = 20_000  # (client, model) pairs remembered in memory; the oldest go first

# Redis on the request path: a call waits at most CALL_TIMEOUT for Redis itself. Past that,
# if Redis still answers its health pings, the wait is our own congestion (a busy event
# loop, a full pool): keep waiting, up to CALL_HARD_TIMEOUT. Else fail open.
CALL_TIMEOUT = 0.15
CALL_HARD_TIMEOUT = 2.0
POOL_SIZE = 64  # connections per process; more callers queue for one (BlockingConnectionPool)
HEALTH_INTERVAL = 0.1  # the health thread pings Redis this often...
HEALTH_TIMEOUT = 0.2  # ...and calls it down when a ping takes longer
_RECHECK = 0.05  # past CALL_TIMEOUT, how often a waiting call looks at the health again


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


class StorageDown(Exception):
    """Redis does not answer its health pings: calls are not even tried."""


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


class RedisHealth:
    """A thread that pings Redis: whether Redis itself answers, measured away from the event
    loop, so a busy loop is never mistaken for a hung Redis (nor the other way round)."""

    def __init__(self, uri: str) -> None:
        self.up = True
        self._client = redis.Redis.from_url(
            uri, socket_timeout=HEALTH_TIMEOUT, socket_connect_timeout=HEALTH_TIMEOUT
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            self._client.close()

    def _watch(self) -> None:
        while not self._stop.wait(HEALTH_INTERVAL):
            try:
                self._client.ping()
                up = True
            except Exception:  # down, hung, refusing: all the same to the request path
                up = False
            if up != self.up:
                if up:
                    log.warning("throttle storage answers again: limits are enforced again")
                else:
                    log.error("throttle storage does not answer: failing open")
            self.up = up

    def close(self) -> None:
        self._stop.set()


@dataclass(eq=False)
class Store:
    """The storage behind the throttle and the shared state: limits' storage for the rate
    limiters and, with Redis, the Redis client itself (atomic scripts) and its health."""

    uri: str
    limits: Storage
    redis: redis.asyncio.Redis | None = None
    health: RedisHealth | None = None
    # In memory, reconnect streaks live here: kept, like the storage, across reloads.
    streaks: MemoryStreaks | None = None
    ledger: MemoryLedger | RedisLedger | None = None  # budgets' windows (spend.py)
    # In memory, the rate windows, by strategy (kept across reloads, like the streaks).
    windows: dict[str, Windows] = field(default_factory=dict)

    async def call(
        self, make: Callable[[], Awaitable[T]], default: T, failed: Callable[[Exception], None]
    ) -> T:
        """``await make()``, or ``default`` (after ``failed``) when the storage fails."""
        if self.health is None:  # memory: no I/O, nothing to bound
            try:
                return await make()
            except Exception as exc:
                failed(exc)
                return default
        if not self.health.up:
            failed(StorageDown("Redis does not answer its health pings"))
            return default
        task = asyncio.ensure_future(make())
        loop = asyncio.get_running_loop()
        hard = loop.time() + CALL_HARD_TIMEOUT
        timeout = CALL_TIMEOUT
        while True:
            done, _ = await asyncio.wait((task,), timeout=timeout)
            if done:
                try:
                    return task.result()
                except Exception as exc:
                    failed(exc)
                    return default
            timeout = min(_RECHECK, hard - loop.time())
            if not self.health.up or timeout <= 0:
                task.cancel()
                failed(TimeoutError(f"storage call took more than {CALL_TIMEOUT} s"))
                return default

    def abandon(self) -> None:
        """Never used (a reload that failed): stop the health thread; no connection is open."""
        if self.health is not None:
            self.health.close()

    async def close(self) -> None:
        if self.health is not None:
            self.health.close()
        if self.redis is not None:
            await self.redis.connection_pool.disconnect()


def make_storage(uri: str, clock: Callable[[], float] = time.monotonic) -> Store:
    """``memory://`` or ``redis://host:port`` from the config. Raises on a URI it cannot use.
    ``clock`` times the reconnect streaks kept in memory (Redis ones use wall time)."""
    if uri.startswith("memory://"):
        return Store(uri, LeanMemoryStorage(), streaks=MemoryStreaks(clock), ledger=MemoryLedger())
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        uri,
        max_connections=POOL_SIZE,
        timeout=CALL_HARD_TIMEOUT,  # waiting for a free connection: our own congestion
        socket_connect_timeout=CALL_HARD_TIMEOUT,
        socket_timeout=CALL_HARD_TIMEOUT,  # a backstop: Store.call decides much sooner
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    shared_pool: dict[str, Any] = {"connection_pool": pool}  # limits' types say str only
    storage = RedisStorage(
        f"async+{uri}", implementation="redispy", wrap_exceptions=True, **shared_pool
    )
    return Store(uri, storage, client, RedisHealth(uri), ledger=RedisLedger(client))


# ---------------------------------------------------------------- reconnect streaks


@dataclass(slots=True)
class Streak:
    """What the throttle knows about one (client, model)."""

    failures: int = 0  # in a row
    ratio: float = 0.0  # recent failure ratio, decayed over about WINDOW outcomes
    seen: int = 0  # outcomes counted in the ratio, up to WINDOW
    until: float = 0.0  # clock time the wait ends
    touched: float = 0.0  # clock time of the last outcome


def next_streak(
    streak: Streak, failed: bool, config: ReconnectConfig, now: float, jitter: float
) -> Streak:
    """The state after one more outcome. ``jitter`` in [0, 1) shortens a wait by up to 20%."""
    seen = min(streak.seen + 1, WINDOW)
    ratio = streak.ratio + ((1.0 if failed else 0.0) - streak.ratio) / seen
    if not failed:
        return Streak(0, ratio, seen, 0.0, now)
    failures = min(streak.failures + 1, 1_000_000)
    until = streak.until
    if failures >= config.after and ratio >= config.min_failure_ratio:
        until = now + wait_for(failures, config, jitter)
    return Streak(failures, ratio, seen, until, now)


def wait_for(failures: int, config: ReconnectConfig, jitter: float) -> float:
    """``base * 2^(k - after)`` after the k-th failure in a row, capped, with jitter."""
    exponent = min(max(failures - config.after, 0), 32)  # 2^32 * base is far past any cap
    wait = min(config.base * 2.0**exponent, config.max)
    return wait * (1.0 - _JITTER * jitter)


class MemoryStreaks:
    """Streaks in this process: bounded in number, each forgotten after a quiet spell."""

    def __init__(self, clock: Callable[[], float], entries: int = MEMORY_ENTRIES) -> None:
        self._clock = clock
        self._entries = entries
        self._streaks: OrderedDict[tuple[str, str], Streak] = OrderedDict()

    def wait(self, client: str, model: str, config: ReconnectConfig) -> float:
        key = (client, model)
        streak = self._streaks.get(key)
        if streak is None:
            return 0.0
        now = self._clock()
        wait = _valid_wait(streak.until - now, config.max)
        if streak.until > now + wait:
            # Longer than a reload's new maximum allows: cut to what is enforced now, so it
            # still ends within the maximum from here (not half-enforced for longer).
            self._streaks[key] = dataclasses.replace(streak, until=now + wait)
        return wait

    def record(self, client: str, model: str, failed: bool, config: ReconnectConfig) -> None:
        now = self._clock()
        key = (client, model)
        streak = self._streaks.pop(key, None)
        if streak is None or now - streak.touched > _forget_after(config):
            streak = Streak()
        self._streaks[key] = next_streak(streak, failed, config, now, random.random())
        while len(self._streaks) > self._entries:
            self._streaks.popitem(last=False)


# Redis: one script reads, updates and writes a (client, model) atomically, whatever other
# replicas do at the same time; values are validated first (garbage resets them).
_RECORD_SCRIPT = """
local now, failed = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, after, min_ratio = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local base, cap, jitter, forget = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  tonumber(ARGV[9])
local s = redis.call('HMGET', KEYS[1], 'failures', 'ratio', 'seen', 'until')
local function valid(x, hi)
  x = tonumber(x)
  if x == nil or x ~= x or x < 0 or x > hi then return 0 end
  return x
end
local failures, ratio, seen = valid(s[1], 1000000), valid(s[2], 1), valid(s[3], window)
local untl = valid(s[4], now + cap)
seen = math.min(seen + 1, window)
ratio = ratio + (failed - ratio) / seen
if failed == 1 then
  failures = math.min(failures + 1, 1000000)
  if failures >= after and ratio >= min_ratio then
    local exponent = math.min(math.max(failures - after, 0), 32)
    untl = now + math.min(base * 2 ^ exponent, cap) * (1 - jitter)
  end
else
  failures, untl = 0, 0
end
redis.call('HSET', KEYS[1], 'failures', failures, 'ratio', string.format('%.6f', ratio),
  'seen', seen, 'until', string.format('%d', untl))
redis.call('PEXPIRE', KEYS[1], math.floor(forget + math.max(untl - now, 0)))
return 1
"""


class RedisStreaks:
    """Streaks in Redis, shared by every replica; times are wall-clock milliseconds."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._script = client.register_script(_RECORD_SCRIPT)

    async def wait(self, client: str, model: str, config: ReconnectConfig) -> float:
        until_ms = await self._client.hget(_streak_key(client, model), "until")
        if until_ms is None:
            return 0.0
        return _valid_wait(_number(until_ms) / 1000 - time.time(), config.max)

    async def record(self, client: str, model: str, failed: bool, config: ReconnectConfig) -> None:
        args = (
            int(time.time() * 1000),
            1 if failed else 0,
            WINDOW,
            config.after,
            config.min_failure_ratio,
            config.base * 1000,
            config.max * 1000,
            _JITTER * random.random(),  # the script shortens the wait by this fraction
            _forget_after(config) * 1000,
        )
        await self._script(keys=[_streak_key(client, model)], args=args)


def _forget_after(config: ReconnectConfig) -> float:
    """A streak is forgotten after a quiet spell of a few maximum waits."""
    return max(4 * config.max, 1.0)


def _valid_wait(seconds: float, cap: float) -> float:
    """A wait read back from storage, read again on every request: 0 unless finite and
    positive, and 0 when absurd (beyond ``cap`` by more than a clock's drift: nothing we
    wrote, and a value that would block for as long as it stays there); else at most ``cap``.
    """
    if not math.isfinite(seconds) or seconds <= 0 or seconds > cap + _DRIFT:
        return 0.0
    return min(seconds, cap)


def _number(raw: Any) -> float:
    """A number stored as text, by us or by anyone: nan when it is not one."""
    try:
        return float(raw)
    except (TypeError, ValueError):
        return math.nan


def _streak_key(client: str, model: str) -> str:
    return f"reconnect/streak/{client}/{model}"


# ---------------------------------------------------------------- the throttle


class Throttle:
    def __init__(self, config: Config, storage: Store) -> None:
        self.storage = storage
        self.reconnect: ReconnectConfig = config.throttle.reconnect
        strategy = config.throttle.rate_limit_strategy
        self._limiter = _STRATEGIES[strategy](storage.limits)
        self._client_limits = {
            c.id: limits.parse_many(c.rate_limit) for c in config.clients if c.rate_limit
        }
        self._backend_limits = {
            name: limits.parse_many(b.rate_limit)
            for name, b in config.backends.items()
            if b.rate_limit
        }
        # Without Redis, this process's own windows decide (limits' async layers cost
        # 5-10 µs a request; these under 1).
        self._windows: Windows | None = None
        if storage.redis is None:
            for other in [name for name in storage.windows if name != strategy]:
                del storage.windows[other]  # a strategy no longer chosen: its windows go
            self._windows = storage.windows.setdefault(strategy, Windows(strategy))
            self._windows.retain(self._window_keys())
        self._memory = storage.streaks
        self._redis = RedisStreaks(storage.redis) if storage.redis is not None else None
        self._last_storage_error = 0.0
        self.storage_errors = 0

    async def guarded(self, make: Callable[[], Awaitable[T]], default: T) -> T:
        """``await make()`` on the storage, or ``default`` when it fails (counted, logged)."""
        return await self.storage.call(make, default, self.storage_failed)

    # ------------------------------------------------------------ reconnect backoff

    async def reconnect_wait(self, client: str, model: str) -> float:
        """Seconds this (client, model) must still wait after its recent failures; 0: go."""
        if not self.reconnect.enabled:
            return 0.0
        if self._memory is not None:
            return self._memory.wait(client, model, self.reconnect)
        assert self._redis is not None
        redis_streaks = self._redis
        return await self.storage.call(
            lambda: redis_streaks.wait(client, model, self.reconnect), 0.0, self.storage_failed
        )

    async def record(self, client: str, model: str, outcome: Outcome) -> None:
        if not self.reconnect.enabled or outcome is Outcome.NEUTRAL:
            return
        failed = outcome is Outcome.FAILURE
        if self._memory is not None:
            self._memory.record(client, model, failed, self.reconnect)
            return
        assert self._redis is not None
        redis_streaks = self._redis
        await self.storage.call(
            lambda: redis_streaks.record(client, model, failed, self.reconnect),
            None,
            self.storage_failed,
        )

    def backoff(self, streak: int) -> float:
        """The wait after the ``streak``-th failure in a row (0 before ``after`` of them),
        assuming most recent requests failed."""
        if streak < self.reconnect.after:
            return 0.0
        return wait_for(streak, self.reconnect, random.random())

    # ------------------------------------------------------------ rate limits

    def _window_keys(self) -> set[tuple[str, str, int, float]]:
        limited = [("client", self._client_limits), ("backend", self._backend_limits)]
        return {
            (kind, name, item.amount, item.get_expiry())
            for kind, table in limited
            for name, items in table.items()
            for item in items
        }

    async def hit_client(self, client: str, cost: int = 1) -> RateDecision | None:
        """Count ``cost`` requests of ``client`` (a batch: its lines); None when it has no
        limit."""
        items = self._client_limits.get(client)
        return await self._hit(items, "client", client, cost) if items else None

    def client_capacity(self, client: str) -> int | None:
        """The most requests ``client`` may make in one window of its tightest limit."""
        items = self._client_limits.get(client)
        return min(item.amount for item in items) if items else None

    async def hit_backend(self, backend: str) -> RateDecision | None:
        items = self._backend_limits.get(backend)
        return await self._hit(items, "backend", backend) if items else None

    async def _hit(
        self, items: list[limits.RateLimitItem], kind: str, name: str, cost: int = 1
    ) -> RateDecision:
        windows = self._windows
        if windows is not None:
            for item in items:
                wait = windows.hit((kind, name, item.amount, item.get_expiry()), cost)
                if wait is not None:
                    # (a sliding window's may reach into the next period: at most two)
                    wait = min(wait, 2 * item.get_expiry())
                    return RateDecision(False, item.amount, 0, wait)
            return RateDecision(True, items[0].amount, -1, 0.0)
        allowed = RateDecision(True, items[0].amount, -1, 0.0)
        return await self.storage.call(
            lambda: self._hit_all(items, kind, name, cost), allowed, self.storage_failed
        )

    async def _hit_all(
        self, items: list[limits.RateLimitItem], kind: str, name: str, cost: int = 1
    ) -> RateDecision:
        for item in items:
            if not await self._limiter.hit(item, kind, name, cost=cost):
                # Window stats only on a refusal: they cost as much as the hit itself.
                stats = await self._limiter.get_window_stats(item, kind, name)
                reset = min(max(stats.reset_time - time.time(), 0.0), item.get_expiry())
                return RateDecision(False, item.amount, 0, reset)
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
