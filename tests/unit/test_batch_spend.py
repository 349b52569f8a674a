"""A batch's charge: the ledger's notes and corrections, in memory and in a real Redis (two
"replicas" polling the same ended batch count it once; garbage in Redis is not a charge)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis.asyncio

from proxy.batch_spend import BatchSpend, FileEstimate
from proxy.config import parse_config
from proxy.pricing import Price, Prices
from proxy.routing import Target
from proxy.spend import (
    MAX_NOTES,
    REDIS_PREFIX,
    Estimate,
    MemoryLedger,
    RedisLedger,
    Reservation,
    Spend,
)
from proxy.usage import TokenCounts
from tests.conftest import RedisServer

CONFIG = """
backends:
  b: {base_url: http://127.0.0.1:1/v1, keys: [{id: k, key: sk-0000000000}]}
clients:
  - {id: team-a, key: ck-a-000000000000, budget: {tokens: 100000, per: day}, tpm: 50}
  - {id: team-b, key: ck-b-000000000000}
"""
USAGE = {"input_tokens": 300, "output_tokens": 200, "total_tokens": 500}


async def direct(make, default):
    return await make()


def batch_spend(ledger) -> BatchSpend:
    config = parse_config(CONFIG, "t.yaml", {})
    spend = Spend(config, ledger, Prices({}, {"m": Price(1.0, 2.0)}))
    return BatchSpend(spend, 3600, frozenset({"team-a", "team-b"}), frozenset({"b"}))


def a_file(batches: BatchSpend) -> FileEstimate:
    file = FileEstimate()
    target = Target(requested="m", model="m", backend="b", upstream_model="m", label="m")
    for _ in range(3):
        batches.line(file, target, {"model": "m", "max_tokens": 1000}, 400, "/v1/chat/completions")
    return file


async def charge_and_end(batches: BatchSpend, replicas: list[BatchSpend]) -> float:
    file = a_file(batches)
    assert file.tokens == 3 * (100 + 1000)
    found = await batches.reserve("team-a", file, direct)
    assert isinstance(found, Reservation)
    assert [h.limit.name for h in found.holds] == ["budget"]  # not the tpm
    await batches.spend.settle(found, found_tokens(found), found.usd, direct)
    await batches.made("batch_1", "team-a", file, found, direct)
    document = {"id": "batch_1", "status": "completed", "usage": USAGE}
    await asyncio.gather(*(r.ended("batch_1", document, direct) for r in replicas * 3))
    used, held = await batches.spend.ledger.taken(found.holds[0].key, time.time())
    assert held == 0
    return used


def found_tokens(found: Reservation) -> TokenCounts:
    return TokenCounts(prompt=found.tokens)


def test_an_ended_batch_is_corrected_to_its_usage_once_however_often_it_is_seen():
    ledger = MemoryLedger()
    batches = batch_spend(ledger)
    assert asyncio.run(charge_and_end(batches, [batches])) == 500


@pytest.mark.e2e
def test_two_replicas_sharing_redis_correct_an_ended_batch_once(redis_server: RedisServer):
    async def run() -> float:
        one = redis.asyncio.Redis.from_url(redis_server.url)
        two = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            async for key in one.scan_iter(f"{REDIS_PREFIX}team-a:*"):
                await one.delete(key)
            await one.delete(f"{REDIS_PREFIX}batch:batch_1")
            replicas = [batch_spend(RedisLedger(one)), batch_spend(RedisLedger(two))]
            return await charge_and_end(replicas[0], replicas)
        finally:
            await one.aclose()
            await two.aclose()

    assert asyncio.run(run()) == 500


@pytest.mark.e2e
@pytest.mark.parametrize(
    "garbage",
    [
        b"nan",
        b"{}",
        orjson.dumps({"c": "team-a", "e": {"t": 1}, "w": []}),
        # A window of another client's: a charge note cannot move team-b's spend.
        orjson.dumps(
            {
                "c": "team-a",
                "e": {"t": 10, "u": 0.0, "b": "b", "m": "m", "l": "m"},
                "w": [[f"{REDIS_PREFIX}team-b:budget:0", "tokens", 1e9]],
            }
        ),
        orjson.dumps(
            {
                "c": "team-a",
                "e": {"t": 10, "u": 0.0, "b": "b", "m": "m", "l": "m"},
                "w": [[f"{REDIS_PREFIX}team-a:budget:0", "tokens", -5]],
            }
        ),
    ],
)
def test_garbage_charge_notes_in_redis_move_nothing(redis_server: RedisServer, garbage: bytes):
    async def run() -> list[bytes | None]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            victims = [f"{REDIS_PREFIX}team-b:budget:0", f"{REDIS_PREFIX}team-a:budget:0"]
            for victim in victims:
                await client.hset(victim, "used", "1000")
            await client.set(f"{REDIS_PREFIX}batch:batch_g", garbage)
            batches = batch_spend(RedisLedger(client))
            document = {"id": "batch_g", "status": "completed", "usage": USAGE}
            await batches.ended("batch_g", document, direct)
            return [await client.hget(victim, "used") for victim in victims]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == [b"1000", b"1000"]


def test_a_correction_never_takes_spend_below_nothing_nor_revives_an_ended_window():
    ledger = MemoryLedger()

    async def run() -> tuple[float, float]:
        s = batch_spend(ledger).spend
        found = await s.reserve("team-a", a_file_estimate(), direct, only=("budget",))
        assert isinstance(found, Reservation)
        key = found.holds[0].key
        await s.settle(found, found_tokens(found), 0.0, direct)
        await ledger.adjust(key, -1e12)
        await ledger.adjust("no-such-window", 5.0)
        return (await ledger.taken(key, time.time()))[0], (
            await ledger.taken("no-such-window", time.time())
        )[0]

    assert asyncio.run(run()) == (0.0, 0.0)


def a_file_estimate() -> Estimate:
    return Estimate(50, 0, 0.0, None)


def test_one_clients_notes_never_push_out_anothers():
    ledger = MemoryLedger()

    async def run() -> tuple[bytes | None, bytes | None, int]:
        await ledger.put_note("file:b-1", b"b", 60, "team-b")
        for n in range(MAX_NOTES + 50):
            await ledger.put_note(f"file:a-{n}", b"a", 60, "team-a")
        kept = 0
        for n in range(MAX_NOTES + 50):
            kept += await ledger.get_note(f"file:a-{n}") is not None
        return await ledger.get_note("file:b-1"), await ledger.get_note("file:a-0"), kept

    other, oldest, kept = asyncio.run(run())
    assert other == b"b" and oldest is None and kept == MAX_NOTES


def test_a_note_is_taken_once_and_ends_by_time_alone(monkeypatch):
    ledger = MemoryLedger()
    clock = [1000.0]
    monkeypatch.setattr("proxy.spend.time.monotonic", lambda: clock[0])

    async def run() -> list[bytes | None]:
        await ledger.put_note("batch:x", b"1", 60, "team-a")
        await ledger.put_note("batch:y", b"2", 60, "team-a")
        first = await ledger.get_note("batch:x", take=True)
        second = await ledger.get_note("batch:x", take=True)
        clock[0] += 61
        return [first, second, await ledger.get_note("batch:y")]

    assert asyncio.run(run()) == [b"1", None, None]


def test_a_clients_uploads_never_push_out_its_batch_charges():
    """Review: 10,001 free batch-file uploads evicted the client's own charge note, so
    its batch was never corrected to a usage 35 times its estimate."""
    ledger = MemoryLedger()
    batches = batch_spend(ledger)

    async def run() -> float:
        file = a_file(batches)
        found = await batches.reserve("team-a", file, direct)
        assert isinstance(found, Reservation)
        await batches.spend.settle(found, found_tokens(found), found.usd, direct)
        await batches.made("batch_kept", "team-a", file, found, direct)
        for n in range(MAX_NOTES + 1):
            await batches.file_made(f"file-{n}", "team-a", file, direct)
        document = {"id": "batch_kept", "status": "completed", "usage": USAGE}
        await batches.ended("batch_kept", document, direct)
        return (await ledger.taken(found.holds[0].key, time.time()))[0]

    assert asyncio.run(run()) == 500
