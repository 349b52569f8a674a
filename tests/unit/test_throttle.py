from __future__ import annotations

import asyncio

import pytest

from proxy.config import parse_config
from proxy.throttle import LeanMemoryStorage, Outcome, Throttle, make_storage

CONFIG = """
backends:
  b: {base_url: "http://x/v1", keys: [{id: k, key: v}], rate_limit: 2/minute}
clients:
  - {id: c, key: ck, rate_limit: 3/minute}
throttle:
  reconnect: {base: 1s, max: 8s}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(text: str = CONFIG, clock: Clock | None = None) -> Throttle:
    config = parse_config(text, "t.yaml", {})
    return Throttle(config, make_storage("memory://", clock or Clock()))


@pytest.mark.parametrize(
    ("streak", "low", "high"),
    [(1, 0, 0), (2, 0, 0), (3, 0.8, 1), (4, 1.6, 2), (5, 3.2, 4), (6, 6.4, 8), (40, 6.4, 8)],
)
def test_backoff_starts_after_3_failures_doubles_from_base_and_caps_with_jitter(streak, low, high):
    t = throttle()
    waits = [t.backoff(streak) for _ in range(200)]
    assert low <= min(waits) and max(waits) <= high
    if high:
        assert max(waits) - min(waits) > 0  # jittered, so blocked clients spread out


def run_outcomes(t: Throttle, outcomes: str, client: str = "c") -> list[float]:
    """Record each outcome (F failure, S success, N neutral); the wait after each."""
    kinds = {"F": Outcome.FAILURE, "S": Outcome.SUCCESS, "N": Outcome.NEUTRAL}

    async def run() -> list[float]:
        waits = []
        for letter in outcomes:
            await t.record(client, "m", kinds[letter])
            waits.append(await t.reconnect_wait(client, "m"))
        return waits

    return asyncio.run(run())


def test_no_wait_before_three_failures_in_a_row_so_sdk_retries_pass():
    waits = run_outcomes(throttle(), "FF")
    assert waits == [0, 0]


def test_the_third_failure_in_a_row_waits_base_then_doubles():
    waits = run_outcomes(throttle(), "FFFF")
    assert waits[:2] == [0, 0]
    assert 0.8 <= waits[2] <= 1.0
    assert 1.6 <= waits[3] <= 2.0


def test_a_success_resets_the_streak_and_the_wait():
    waits = run_outcomes(throttle(), "FFFSFF")
    assert waits[2] > 0
    assert waits[3:] == [0, 0, 0]


def test_client_errors_count_for_nothing():
    assert run_outcomes(throttle(), "FFNNN")[-1] == 0
    assert run_outcomes(throttle(), "FFNF")[-1] > 0


def test_a_mostly_healthy_stream_never_waits_even_after_a_streak():
    # 10% failures, then 3 in a row: the failure ratio stays under 0.5, so no wait.
    waits = run_outcomes(throttle(), "SSSSFSSSSSSSSSFFF")
    assert waits[-1] == 0
    # ...while 3 more failures in a row tip the ratio over 0.5: a client hammering a dead
    # upstream is throttled whatever came before.
    assert run_outcomes(throttle(), "SSSSFSSSSSSSSSFFFFFFFF")[-1] > 0


def test_the_wait_ends_by_time_and_the_streak_is_forgotten_after_a_quiet_spell():
    clock = Clock()
    t = throttle(clock=clock)
    assert run_outcomes(t, "FFF")[-1] > 0
    clock.now += 1.0
    assert asyncio.run(t.reconnect_wait("c", "m")) == 0
    clock.now += 4 * 8 + 1  # 4 maximum waits of quiet: a new streak starts from scratch
    assert run_outcomes(t, "F") == [0]


def test_other_clients_and_models_are_not_throttled():
    t = throttle()
    run_outcomes(t, "FFFFF")
    assert asyncio.run(t.reconnect_wait("other", "m")) == 0
    assert asyncio.run(t.reconnect_wait("c", "other-model")) == 0


def test_memory_holds_a_bounded_number_of_streaks():
    from proxy.throttle import MemoryStreaks

    clock = Clock()
    streaks = MemoryStreaks(clock, entries=100)
    config = throttle().reconnect
    for i in range(1000):
        streaks.record(f"client-{i}", "m", True, config)
    assert len(streaks._streaks) == 100


def test_disabled_reconnect_throttle_never_blocks():
    t = throttle(CONFIG.replace("{base: 1s, max: 8s}", "{enabled: false}"))
    assert run_outcomes(t, "FFFFF") == [0] * 5


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
        async def hit(self, *args):
            raise ConnectionError("redis down")

    t = throttle()
    t._limiter = Broken()  # type: ignore[assignment]
    t._windows = None  # the path with Redis: limits decides, and its storage may fail
    decision = asyncio.run(t.hit_client("c"))
    assert decision is not None and decision.allowed
    assert t.storage_errors == 1


def test_memory_storage_sweeps_expired_entries_at_most_once_a_second():
    async def run() -> int:
        storage = make_storage("memory://").limits
        assert isinstance(storage, LeanMemoryStorage)
        for i in range(500):
            await storage.incr(f"k{i % 7}", 60)
        return storage.sweeps

    # If an upgrade of limits renames the hook, this fails instead of silently costing CPU.
    assert asyncio.run(run()) == 1
