"""Budgets and tpm: reserve, then settle; in memory (stateful property) and in a real Redis
shared by two "replicas" (atomic under concurrency, garbage read as nothing)."""

from __future__ import annotations

import asyncio
import calendar
import time

import pytest
import redis
import redis.asyncio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from proxy.config import parse_config
from proxy.pricing import Price, Prices
from proxy.spend import (
    REDIS_PREFIX,
    Estimate,
    Hold,
    Limit,
    MemoryLedger,
    Meter,
    RedisLedger,
    Refusal,
    Reservation,
    Spend,
    estimate_tokens,
    window_of,
)
from proxy.usage import TokenCounts
from tests.conftest import RedisServer

CONFIG = """
backends:
  b: {base_url: http://127.0.0.1:1/v1, keys: [{id: k, key: sk-0000000000}]}
clients:
  - {id: team-a, key: ck-a-000000000000, budget: {usd: 1.0, per: day}, tpm: 1000}
  - {id: team-b, key: ck-b-000000000000}
spend: {reservation_timeout: 60}
"""


async def direct(make, default):  # the throttle's guarded call, without a storage to fail
    return await make()


def spend(ledger=None) -> Spend:
    config = parse_config(CONFIG, "t.yaml", {})
    return Spend(config, ledger or MemoryLedger(), Prices({}, {"m": Price(1.0, 2.0)}))


def est(tokens: int, usd: float, prompt: int = 0) -> Estimate:
    return Estimate(prompt, tokens - prompt, usd, Price(1.0, 2.0))


def test_windows_are_utc_calendar_days_weeks_months_and_minutes():
    now = calendar.timegm((2026, 12, 31, 23, 59, 30))  # a Thursday
    assert window_of("minute", now) == (now - 30, now + 30)
    assert window_of("day", now) == (now - 86370, now + 30)
    monday = calendar.timegm((2026, 12, 28, 0, 0, 0))
    assert window_of("week", now) == (monday, monday + 7 * 86400)
    assert window_of("month", now) == (
        calendar.timegm((2026, 12, 1, 0, 0, 0)),
        calendar.timegm((2027, 1, 1, 0, 0, 0)),
    )


def test_the_estimate_is_the_prompt_bytes_over_four_plus_the_output_asked_for():
    assert estimate_tokens({"max_tokens": 100}, 400, "/chat/completions", 4096) == (100, 100)
    assert estimate_tokens({"max_output_tokens": 7}, 0, "/responses", 4096) == (0, 7)
    assert estimate_tokens({"max_tokens": True}, 40, "/chat/completions", 4096) == (10, 4096)
    assert estimate_tokens({}, 40, "/embeddings", 4096) == (10, 0)


def test_a_client_is_refused_once_its_reservations_do_not_fit_and_settling_frees_them():
    s = spend()

    async def run() -> None:
        first = await s.reserve("team-a", est(600, 0.1), direct)
        assert isinstance(first, Reservation)
        second = await s.reserve("team-a", est(600, 0.1), direct)
        assert isinstance(second, Refusal) and second.limit.name == "tpm"
        assert second.used == 600 and 0 < second.reset <= 60
        assert await s.reserve("team-b", est(10**6, 100.0), direct) is None  # no limits
        await s.settle(first, TokenCounts(prompt=100, completion=50), 0.01, direct)
        third = await s.reserve("team-a", est(600, 0.1), direct)
        assert isinstance(third, Reservation) and third.taken == [0.01, 150.0]

    asyncio.run(run())


def test_a_request_bigger_than_a_whole_window_goes_alone():
    s = spend()

    async def run() -> None:
        big = await s.reserve("team-a", est(10**6, 0.0), direct)
        assert isinstance(big, Reservation) and big.holds[1].amount == 1000
        assert isinstance(await s.reserve("team-a", est(1, 0.0), direct), Refusal)

    asyncio.run(run())


class LedgerMachine(RuleBasedStateMachine):
    """Any reserves, settles and time: what is held never exceeds a cap at reservation
    time, a settled reservation holds nothing, and a forgotten one is released by time."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = MemoryLedger()
        self.limit = Limit("tpm", Meter.TOKENS, 1000.0, "minute")
        self.now = 1_000_020.0  # inside one minute window, for the whole run
        self.open: list[tuple[str, float]] = []
        self.used = 0.0
        self.count = 0

    def hold(self, amount: float) -> Hold:
        return Hold(self.limit, "k", 1_000_080.0, min(amount, self.limit.cap))

    @rule(amount=st.floats(0, 2000))
    def reserve(self, amount: float) -> None:
        self.count += 1
        rid = f"r{self.count}"
        hold = self.hold(amount)
        index, taken = asyncio.run(self.ledger.reserve([hold], rid, self.now + 10, self.now))
        if index < 0:
            assert taken[0] + hold.amount <= self.limit.cap
            self.open.append((rid, hold.amount))
        else:
            assert taken[0] + hold.amount > self.limit.cap

    @rule(actual=st.floats(0, 3000))
    def settle(self, actual: float) -> None:
        if self.open:
            rid, _ = self.open.pop(0)
            asyncio.run(self.ledger.settle([self.hold(0)], rid, [actual]))
            self.used += actual

    @rule(seconds=st.floats(0, 4))
    def time_passes(self, seconds: float) -> None:
        self.now = min(self.now + seconds, 1_000_079.0)

    @invariant()
    def held_is_what_is_open_and_leaves_by_time(self) -> None:
        used, held = asyncio.run(self.ledger.taken("k", self.now))
        assert used == pytest.approx(self.used)
        assert held <= min(sum(amount for _, amount in self.open), self.limit.cap) + 1e-9
        _, later_held = asyncio.run(self.ledger.taken("k", self.now + 10))
        assert later_held == 0  # every reservation is released by time alone


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


@pytest.mark.e2e
def test_two_replicas_sharing_redis_overshoot_a_budget_by_at_most_one_reservation(
    redis_server: RedisServer,
) -> None:
    """64 requests at once, half on each replica, against a nearly spent budget."""

    async def run() -> tuple[int, float]:
        one = redis.asyncio.Redis.from_url(redis_server.url)
        two = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            replicas = [spend(RedisLedger(one)), spend(RedisLedger(two))]
            key_day = replicas[0].holds("team-a", 0, 0.0, time.time())[0].key
            await one.delete(
                key_day, *[h.key for h in replicas[0].holds("team-a", 0, 0, time.time())]
            )
            await one.hset(key_day, "used", "0.95")  # $0.95 of $1.00 spent
            results = await asyncio.gather(
                *(replicas[i % 2].reserve("team-a", est(1, 0.01), direct) for i in range(64))
            )
            granted = [r for r in results if isinstance(r, Reservation)]
            await asyncio.gather(
                *(
                    replicas[i % 2].settle(r, TokenCounts(prompt=1), 0.012, direct)
                    for i, r in enumerate(granted)
                )
            )
            used, _ = await replicas[0].ledger.taken(key_day, time.time())
            return len(granted), used
        finally:
            await one.aclose()
            await two.aclose()

    granted, used = asyncio.run(run())
    assert granted == 5  # 0.95 + 5 x 0.01 = 1.00
    assert used == pytest.approx(0.95 + 5 * 0.012)  # over by the estimates' error only
    assert used - 1.0 <= 0.012


@pytest.mark.e2e
@pytest.mark.parametrize("garbage", [b"nan", b"-5", b"1e308", b"lots", b""])
def test_garbage_in_redis_counts_as_nothing(redis_server: RedisServer, garbage: bytes) -> None:
    direct_client = redis.Redis.from_url(redis_server.url)
    limit = Limit("budget", Meter.USD, 1.0, "day")
    _, end = limit.window(time.time())
    hold = Hold(limit, f"{REDIS_PREFIX}garbage:{garbage!r}", end, 0.5)
    direct_client.delete(hold.key)
    direct_client.hset(hold.key, mapping={"used": garbage, "r:x": b"junk", "r:y": garbage + b":9"})
    direct_client.close()

    async def run() -> tuple[int, list[float]]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            return await RedisLedger(client).reserve([hold], "r1", time.time() + 60, time.time())
        finally:
            await client.aclose()

    assert asyncio.run(run()) == (-1, [0.0])  # nothing spent, nothing held: it fits


def test_an_answered_request_whose_usage_never_came_costs_at_least_its_prompt():
    """Review of issue 21: a client that left a stream early was charged 8 tokens of the
    4,000 the upstream bills."""
    s = spend()

    async def run() -> tuple[float, float]:
        cut = await s.reserve("team-a", est(900, 0.5, prompt=800), direct)
        assert isinstance(cut, Reservation)
        await s.settle(cut, TokenCounts(completion=8), 0.0, direct, floor=True)
        day, minute = (h.key for h in cut.holds)
        return (await s.ledger.taken(day, time.time()))[0], (
            await s.ledger.taken(minute, time.time())
        )[0]

    usd, tokens = asyncio.run(run())
    assert tokens == 808
    assert usd == pytest.approx((800 * 1.0 + 8 * 2.0) / 1e6)


@pytest.mark.e2e
def test_a_settle_after_its_window_key_expired_gives_it_an_end_again(
    redis_server: RedisServer,
) -> None:
    async def run() -> int:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            s = spend(RedisLedger(client))
            async for key in client.scan_iter(f"{REDIS_PREFIX}team-a:*"):  # other tests'
                await client.delete(key)
            reservation = await s.reserve("team-a", est(10, 0.001), direct)
            assert isinstance(reservation, Reservation)
            for hold in reservation.holds:
                await client.delete(hold.key)  # expired while the request ran
            await s.settle(reservation, TokenCounts(prompt=5), 0.001, direct)
            return min([await client.pttl(h.key) for h in reservation.holds])
        finally:
            await client.aclose()

    assert asyncio.run(run()) > 0  # no key left without an end
