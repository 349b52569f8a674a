"""Budgets and token-rate limits per client: reserve before a request, settle after it.

A client may have a ``budget`` (USD or tokens per UTC day, week or month) and a ``tpm``
(tokens per minute). Checking what was spent and recording after the fact overshoots under
concurrency (every request in flight passes the check), so each request first *reserves*
its estimate (``estimate``: prompt bytes / 4 plus the output it may produce) against every
limit of its client in one atomic step, and is refused (429 ``budget_exceeded``) when the
reservation does not fit. When it ends (answer read, stream over, client gone) it
*settles*: the reservation is replaced by what the upstream reported. A reservation is
capped at its limit (a request bigger than a whole window is let through alone) and lasts
at most ``spend.reservation_timeout``: one whose request died (a replica killed mid-way)
is released by time alone.

The ledger is the throttle's storage: in memory (one process), or Redis (every replica,
one Lua script per reserve and per settle, so N replicas never spend N times a cap). A
window is a hash ``used`` + one field per reservation in flight, expiring with its window.
Values read back from Redis are validated: garbage counts as nothing. Redis down: fail
open (the request goes through, the failure is counted), as for the rate limits.
"""

from __future__ import annotations

import calendar
import itertools
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any

import redis.asyncio

from proxy.config import ClientConfig, Config
from proxy.pricing import Price, Prices
from proxy.usage import MAX_TOKENS, TokenCounts

REDIS_PREFIX = "llm-proxy:spend:"
MAX_ESTIMATE = 10_000_000  # tokens one request may reserve, at most
MAX_NOTES = 10_000  # notes (batch estimates and charges) kept per client in memory
_ids = itertools.count(1)
_PROCESS = os.urandom(4).hex()  # reservation ids unique across replicas


class Meter(StrEnum):
    USD = "usd"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of one client: ``budget`` (per day, week or month) or ``tpm``."""

    name: str  # "budget" | "tpm"
    meter: Meter
    cap: float
    per: str  # "minute" | "day" | "week" | "month"

    def window(self, now: float) -> tuple[float, float]:
        """The UTC window holding wall time ``now``: (start, end) in epoch seconds."""
        return window_of(self.per, now)

    def describe(self) -> str:
        amount = shown_usd(self.cap) if self.meter is Meter.USD else f"{self.cap:g} tokens"
        return (
            f"{amount} per {self.per}"
            if self.name == "budget"
            else f"{self.cap:g} tokens per minute"
        )


def shown_usd(amount: float) -> str:
    """$12.50, $0.0042, $0.000066: cents for big amounts, what matters for small ones."""
    if amount >= 1:
        return f"${amount:,.2f}"
    return "$" + (f"{amount:.6f}".rstrip("0").rstrip(".") or "0")


def window_of(per: str, now: float) -> tuple[float, float]:
    if per == "minute":
        start = math.floor(now / 60) * 60
        return start, start + 60
    day = time.gmtime(now)
    midnight = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0))
    if per == "day":
        return midnight, midnight + 86400
    if per == "week":  # Monday 00:00 UTC
        start = midnight - day.tm_wday * 86400
        return start, start + 7 * 86400
    start = calendar.timegm((day.tm_year, day.tm_mon, 1, 0, 0, 0))
    year, month = (day.tm_year + 1, 1) if day.tm_mon == 12 else (day.tm_year, day.tm_mon + 1)
    return start, calendar.timegm((year, month, 1, 0, 0, 0))


def limits_of(client: ClientConfig) -> tuple[Limit, ...]:
    limits = []
    if client.budget is not None:
        meter = Meter.USD if client.budget.usd is not None else Meter.TOKENS
        cap = client.budget.usd if client.budget.usd is not None else client.budget.tokens
        limits.append(Limit("budget", meter, float(cap or 0), client.budget.per))
    if client.tpm is not None:
        limits.append(Limit("tpm", Meter.TOKENS, float(client.tpm), "minute"))
    return tuple(limits)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request may cost, before it is sent."""

    prompt: int
    output: int
    usd: float
    price: Price | None  # None: its model has no price


@dataclass(slots=True)
class Hold:
    """One limit's share of a reservation: where it is held, and how much."""

    limit: Limit
    key: str  # the window's storage key
    end: float  # the window's end (epoch seconds)
    amount: float


@dataclass(slots=True)
class Reservation:
    client: str
    id: str
    holds: list[Hold]
    tokens: int  # the estimate
    usd: float
    taken: list[float]  # each window's spent and held before this reservation
    prompt: int = 0  # the estimate's prompt part: the least a request that was answered costs
    price: Price | None = None  # its model's, to price that floor
    settled: bool = False
    whole: bool = False  # a batch's: once the upstream made it, the estimate is spent

    def token_headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*-tokens`` for the client's own tpm (none without one)."""
        for hold, taken in zip(self.holds, self.taken, strict=True):
            if hold.limit.name == "tpm":
                left = max(0, int(hold.limit.cap - taken - hold.amount))
                return token_headers(hold.limit.cap, left, max(0.0, hold.end - time.time()))
        return {}


def token_headers(cap: float, left: int, reset: float) -> dict[str, str]:
    return {
        "x-ratelimit-limit-tokens": str(int(cap)),
        "x-ratelimit-remaining-tokens": str(left),
        "x-ratelimit-reset-tokens": f"{reset:.3f}s",
    }


@dataclass(frozen=True, slots=True)
class Refusal:
    limit: Limit
    used: float  # spent and held, in the limit's meter
    reset: float  # seconds until its window ends


@dataclass(slots=True)
class _Window:
    end: float
    used: float = 0.0
    held: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> amount, until


class MemoryLedger:
    """One process's windows; old ones dropped as new ones are made (bounded by clients x
    limits, and by the requests in flight)."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        # Notes (batch_spend.py): per owner, name -> (value, monotonic expiry); the owner of
        # each name, to find it.
        self._notes: dict[str, dict[str, tuple[bytes, float]]] = {}
        self._owners: dict[str, str] = {}

    async def reserve(
        self, holds: Sequence[Hold], rid: str, until: float, now: float
    ) -> tuple[int, list[float]]:
        """(-1, what each window had spent and held before) when every hold fits (and is
        taken); else (the index of the first that does not, the same)."""
        windows = [self._window(h, now) for h in holds]
        taken = []
        for i, (hold, w) in enumerate(zip(holds, windows, strict=True)):
            for other, (_, expiry) in list(w.held.items()):
                if expiry <= now:
                    del w.held[other]
            taken.append(w.used + sum(amount for amount, _ in w.held.values()))
            if taken[i] + hold.amount > hold.limit.cap:
                return i, taken
        for hold, w in zip(holds, windows, strict=True):
            w.held[rid] = (hold.amount, until)
        return -1, taken

    async def settle(self, holds: Sequence[Hold], rid: str, actual: Sequence[float]) -> None:
        for hold, amount in zip(holds, actual, strict=True):
            w = self._windows.get(hold.key)
            if w is not None:
                w.held.pop(rid, None)
                w.used += amount

    async def taken(self, key: str, now: float) -> tuple[float, float]:
        w = self._windows.get(key)
        if w is None:
            return 0.0, 0.0
        held = sum(amount for amount, until in w.held.values() if until > now)
        return w.used, held

    async def adjust(self, key: str, delta: float) -> None:
        """Correct a window's spend after the fact (a batch's estimate to its usage); a
        window already over is left alone, and spend never goes below nothing."""
        w = self._windows.get(key)
        if w is not None and math.isfinite(delta):
            w.used = max(0.0, w.used + delta)

    async def put_note(self, name: str, value: bytes, ttl: float, owner: str) -> None:
        """Keep ``value`` under ``name`` for ``ttl`` seconds. At most ``MAX_NOTES`` per
        ``owner`` (its oldest dropped first): no client's notes push out another's."""
        now = time.monotonic()
        self._drop(name)
        notes = self._notes.setdefault(owner, {})
        while notes:  # oldest first: the expired, and one past the bound
            old = next(iter(notes))
            if notes[old][1] > now and len(notes) < MAX_NOTES:
                break
            del notes[old]
            del self._owners[old]
        notes[name] = (value, now + ttl)
        self._owners[name] = owner

    async def get_note(self, name: str, take: bool = False) -> bytes | None:
        """The note under ``name`` (None: never kept, expired or dropped); ``take``: and
        gone, so that of two callers only one gets it."""
        owner = self._owners.get(name)
        if owner is None:
            return None
        value, until = self._notes[owner][name]
        if until <= time.monotonic():
            self._drop(name)
            return None
        if take:
            self._drop(name)
        return value

    def _drop(self, name: str) -> None:
        owner = self._owners.pop(name, None)
        if owner is not None:
            del self._notes[owner][name]

    def _window(self, hold: Hold, now: float) -> _Window:
        w = self._windows.get(hold.key)
        if w is None:
            for key in [k for k, old in self._windows.items() if old.end <= now]:
                del self._windows[key]
            w = self._windows[hold.key] = _Window(hold.end)
        return w


_RESERVE = """
local now, rid, untl, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function num(x, hi)
  x = tonumber(x)
  if x == nil or x ~= x or x < 0 or x > hi then return 0 end  -- not a count: garbage
  return x
end
local all = {}
for i = 1, n do
  local cap, amount = tonumber(ARGV[5 + 3 * (i - 1)]), tonumber(ARGV[6 + 3 * (i - 1)])
  local fields = redis.call('HGETALL', KEYS[i])
  local taken = 0
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if name == 'used' then
      taken = taken + num(value, 1e15)
    elseif string.sub(name, 1, 2) == 'r:' then
      local sep = string.find(value, ':', 1, true)
      local held = sep and num(string.sub(value, 1, sep - 1), 1e15) or 0
      local expiry = sep and num(string.sub(value, sep + 1), 1e15) or 0
      if expiry <= now then
        redis.call('HDEL', KEYS[i], name)
      else
        taken = taken + held
      end
    end
  end
  all[i] = tostring(taken)
  if taken + amount > cap then return {i, unpack(all)} end
end
for i = 1, n do
  local amount, expire_at = ARGV[6 + 3 * (i - 1)], tonumber(ARGV[7 + 3 * (i - 1)])
  redis.call('HSET', KEYS[i], 'r:' .. rid, amount .. ':' .. string.format('%d', untl))
  redis.call('PEXPIREAT', KEYS[i], math.floor(expire_at))
end
return {0, unpack(all)}
"""

_SETTLE = """
local rid, n = ARGV[1], #KEYS
for i = 1, n do
  redis.call('HDEL', KEYS[i], 'r:' .. rid)
  local amount = tonumber(ARGV[1 + i])
  if amount ~= nil and amount == amount and amount > 0 and amount < 1e15 then
    redis.call('HINCRBYFLOAT', KEYS[i], 'used', amount)
    if redis.call('PTTL', KEYS[i]) < 0 then  -- expired meanwhile: made again, with its end
      redis.call('PEXPIREAT', KEYS[i], math.floor(tonumber(ARGV[1 + n + i])))
    end
  end
end
return 1
"""


_ADJUST = """
local delta = tonumber(ARGV[1])
if delta == nil or delta ~= delta or delta < -1e15 or delta > 1e15 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end  -- the window is over
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
if used == nil or used ~= used or used < 0 or used > 1e15 then used = 0 end  -- garbage
used = used + delta
if used < 0 then used = 0 end
redis.call('HSET', KEYS[1], 'used', string.format('%.17g', used))
return 1
"""


class RedisLedger:
    """Windows in Redis, shared by every replica; times are wall-clock milliseconds."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._adjust = client.register_script(_ADJUST)

    async def adjust(self, key: str, delta: float) -> None:
        await self._adjust(keys=[key], args=[repr(delta)])

    async def put_note(self, name: str, value: bytes, ttl: float, owner: str) -> None:
        # Bounded by the TTLs, as the object records are: Redis evicts nobody's to make room.
        await self._client.set(REDIS_PREFIX + name, value, ex=max(1, int(ttl)))

    async def get_note(self, name: str, take: bool = False) -> bytes | None:
        key = REDIS_PREFIX + name
        raw = await (self._client.getdel(key) if take else self._client.get(key))
        return raw if isinstance(raw, bytes) else None

    async def reserve(
        self, holds: Sequence[Hold], rid: str, until: float, now: float
    ) -> tuple[int, list[float]]:
        args: list[Any] = [int(now * 1000), rid, int(until * 1000), len(holds)]
        for h in holds:
            args += [repr(h.limit.cap), repr(h.amount), int((h.end + 60) * 1000)]
        found = await self._reserve(keys=[h.key for h in holds], args=args)
        return int(found[0]) - 1, [_number(t) for t in found[1:]]

    async def settle(self, holds: Sequence[Hold], rid: str, actual: Sequence[float]) -> None:
        ends = [int((h.end + 60) * 1000) for h in holds]
        await self._settle(keys=[h.key for h in holds], args=[rid, *map(repr, actual), *ends])

    async def taken(self, key: str, now: float) -> tuple[float, float]:
        fields = await self._client.hgetall(key)
        used = held = 0.0
        for raw_name, raw_value in fields.items():
            name, value = _text(raw_name), _text(raw_value)
            if name == "used":
                used = _number(value)
            elif name.startswith("r:"):
                amount, _, expiry = value.partition(":")
                if _number(expiry) > now * 1000:
                    held += _number(amount)
        return used, held


def _text(raw: bytes | str) -> str:
    return raw.decode("latin-1") if isinstance(raw, bytes) else raw


def _number(raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and 0 <= value < 1e15 else 0.0


Ledger = MemoryLedger | RedisLedger


def estimate_tokens(
    payload: dict[str, Any], body_size: int, path: str, default: int
) -> tuple[int, int]:
    """(prompt, output) a request may cost, before it is sent: its body's bytes / 4, and
    the output it asks for at most (``max_tokens``, ``max_completion_tokens``,
    ``max_output_tokens``) or ``default``; embeddings produce none."""
    prompt = min(body_size // 4, MAX_ESTIMATE)
    if path.startswith("/embeddings"):
        return prompt, 0
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if type(value) is int and 0 <= value < MAX_TOKENS:
            return prompt, min(value, MAX_ESTIMATE)
    return prompt, default


def new_reservation_id() -> str:
    return f"{_PROCESS}{next(_ids):x}"


class Spend:
    """The clients' limits of one config, over the ledger of the throttle's storage."""

    def __init__(self, config: Config, ledger: Ledger, prices: Prices) -> None:
        self.limits = {c.id: limits for c in config.clients if (limits := limits_of(c))}
        self.ledger = ledger
        self.prices = prices
        self.timeout = config.spend.reservation_timeout
        self.default_max_tokens = config.spend.default_max_tokens

    def holds(
        self, client: str, tokens: int, usd: float, now: float, only: tuple[str, ...] = ()
    ) -> list[Hold]:
        holds = []
        for limit in self.limits.get(client, ()):
            if only and limit.name not in only:
                continue
            start, end = limit.window(now)
            amount = usd if limit.meter is Meter.USD else float(tokens)
            key = f"{REDIS_PREFIX}{client}:{limit.name}:{int(start)}"
            holds.append(Hold(limit, key, end, min(amount, limit.cap)))
        return holds

    def estimate(
        self, backend: str, model: str, payload: dict[str, Any], body_size: int, path: str
    ) -> Estimate:
        prompt, output = estimate_tokens(payload, body_size, path, self.default_max_tokens)
        price = self.prices.lookup(backend, model)
        usd = price.cost(TokenCounts(prompt=prompt, completion=output)) if price else 0.0
        return Estimate(prompt, output, usd, price)

    def has_budget(self, client: str) -> bool:
        return any(limit.name == "budget" for limit in self.limits.get(client, ()))

    def needs_a_price(self, client: str) -> bool:
        """Whether ``client`` has a budget in USD (a model without a price cannot be held
        to it)."""
        return any(limit.meter is Meter.USD for limit in self.limits.get(client, ()))

    async def reserve(
        self, client: str, estimate: Estimate, call: Caller, only: tuple[str, ...] = ()
    ) -> Reservation | Refusal | None:
        """A reservation, a refusal naming the limit that does not fit, or None (no limits,
        or the storage failed: open). ``only``: against those limits alone (a batch:
        ``budget``)."""
        now = time.time()
        tokens, usd = estimate.prompt + estimate.output, estimate.usd
        holds = self.holds(client, tokens, usd, now, only)
        if not holds:
            return None
        rid = new_reservation_id()
        ledger = self.ledger
        found = await call(lambda: ledger.reserve(holds, rid, now + self.timeout, now), None)
        if found is None:
            return None  # the storage failed: open
        index, taken = found
        if index >= 0:
            hold = holds[index]
            return Refusal(hold.limit, taken[index], max(0.0, hold.end - now))
        return Reservation(client, rid, holds, tokens, usd, taken, estimate.prompt, estimate.price)

    async def settle(
        self,
        reservation: Reservation,
        tokens: TokenCounts,
        usd: float | None,
        call: Caller,
        floor: bool = False,
    ) -> None:
        """Replace the reservation by what was used (once; nothing used: it is released).
        ``floor``: the upstream answered but its usage is not (all) known (a stream cut, a
        client gone): at least the estimated prompt is charged."""
        if reservation.settled:
            return
        reservation.settled = True
        if floor and tokens.prompt < reservation.prompt:  # answered, its usage never came
            tokens = tokens._replace(prompt=reservation.prompt)
            price = reservation.price
            usd = price.cost(tokens) if price is not None else usd
        used_tokens = float(tokens.prompt + tokens.completion)
        actual = [
            (usd or 0.0) if h.limit.meter is Meter.USD else used_tokens for h in reservation.holds
        ]
        ledger = self.ledger
        await call(lambda: ledger.settle(reservation.holds, reservation.id, actual), None)

    async def usage(self, call: Caller) -> dict[str, Any]:
        """Per client with limits: each limit's window, spent, held and left."""
        now = time.time()
        clients: dict[str, Any] = {}
        for client, limits in self.limits.items():
            shown = []
            for limit, hold in zip(limits, self.holds(client, 0, 0.0, now), strict=True):
                start, end = limit.window(now)
                used, held = await call(partial(self.ledger.taken, hold.key, now), (0.0, 0.0))
                shown.append(
                    {
                        "limit": limit.name,
                        "meter": str(limit.meter),
                        "cap": limit.cap,
                        "per": limit.per,
                        "window_start": _iso(start),
                        "window_end": _iso(end),
                        "used": round(used, 6),
                        "reserved": round(held, 6),
                        "remaining": round(max(0.0, limit.cap - used - held), 6),
                    }
                )
            clients[client] = shown
        return clients


Caller = Callable[[Callable[[], Awaitable[Any]], Any], Awaitable[Any]]


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
