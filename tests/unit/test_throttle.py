from __future__ import annotations

import asyncio

import pytest

from proxy.config import parse_config
from proxy.throttle import Outcome, Throttle, make_storage

CONFIG = """
backends:
  b: {base_url: "http://x/v1", keys: [{id: k, key: v}], rate_limit: 2/minute}
clients:
  - {id: c, key: ck, rate_limit: 3/minute}
throttle:
  reconnect: {base: 1s, max: 8s}
"""


def throttle(text: str = CONFIG) -> Throttle:
    return Throttle(parse_config(text, "t.yaml", {}), make_storage("memory://"))


@pytest.mark.parametrize(
    ("streak", "low", "high"), [(1, 0.8, 1), (2, 1.6, 2), (3, 3.2, 4), (4, 6.4, 8), (9, 6.4, 8)]
)
def test_backoff_doubles_from_base_and_caps_with_jitter(streak, low, high):
    t = throttle()
    waits = [t.backoff(streak) for _ in range(200)]
    assert low <= min(waits) and max(waits) <= high
    assert max(waits) - min(waits) > 0  # jittered, so blocked clients spread out


def test_failures_block_and_a_success_resets_the_streak():
    async def run() -> list[float]:
        t = throttle()
        seen = [await t.reconnect_wait("c", "m")]
        await t.record("c", "m", Outcome.FAILURE)
        seen.append(await t.reconnect_wait("c", "m"))
        await t.record("c", "m", Outcome.FAILURE)
        seen.append(await t.reconnect_wait("c", "m"))
        seen.append(await t.reconnect_wait("other", "m"))
        await t.record("c", "m", Outcome.NEUTRAL)
        await t.record("c", "m", Outcome.SUCCESS)
        await t.record("c", "m", Outcome.FAILURE)
        seen.append(await t.reconnect_wait("c", "m"))
        return seen

    free, first, second, other, after_reset = asyncio.run(run())
    assert free == 0 and other == 0
    assert 0.7 < first <= 1.0
    assert 1.5 < second <= 2.0
    assert 0.7 < after_reset <= 1.0


def test_disabled_reconnect_throttle_never_blocks():
    async def run() -> float:
        t = throttle(CONFIG.replace("{base: 1s, max: 8s}", "{enabled: false}"))
        await t.record("c", "m", Outcome.FAILURE)
        return await t.reconnect_wait("c", "m")

    assert asyncio.run(run()) == 0


def test_client_and_backend_limits_count_separately():
    async def run():
        t = throttle()
        client = [await t.hit_client("c") for _ in range(4)]
        backend = [await t.hit_backend("b") for _ in range(3)]
        return client, backend, await t.hit_client("unlimited")

    client, backend, unlimited = asyncio.run(run())
    assert [d.allowed for d in client] == [True, True, True, False]
    assert 0 < client[3].reset_seconds <= 60
    assert [d.allowed for d in backend] == [True, True, False]
    assert unlimited is None


def test_a_failing_storage_fails_open_and_is_counted():
    class Broken:
        async def get(self, key):
            raise ConnectionError("redis down")

    t = throttle()
    t.storage = Broken()  # type: ignore[assignment]
    assert asyncio.run(t.reconnect_wait("c", "m")) == 0
    assert t.storage_errors == 1


def test_memory_storage_sweeps_expired_entries_at_most_once_a_second():
    async def run() -> int:
        storage = make_storage("memory://")
        for i in range(500):
            await storage.incr(f"k{i % 7}", 60)
        return storage.sweeps

    # If an upgrade of limits renames the hook, this fails instead of silently costing CPU.
    assert asyncio.run(run()) == 1
