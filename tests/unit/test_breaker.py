from __future__ import annotations

import time

from proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from proxy.config import BreakerConfig


def breaker() -> Breaker:
    return Breaker("b", BreakerConfig(failures=3, min_open=0.05, max_open=0.2))


def test_opens_after_n_consecutive_failures_only():
    b = breaker()
    b.failure()
    b.failure()
    b.success()  # a success in between resets the count
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.admit() == 0
    b.failure()
    assert b.state == OPEN
    assert 0 < b.admit() <= 0.05


def test_half_open_lets_exactly_one_probe_through():
    b = breaker()
    for _ in range(3):
        b.failure()
    time.sleep(0.06)
    assert b.admit() == 0  # the probe
    assert b.state == HALF_OPEN
    assert b.admit() > 0  # everyone else waits for the probe's result
    b.success()
    assert b.state == CLOSED and b.admit() == 0


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap():
    b = breaker()
    for _ in range(3):
        b.failure()
    opened = []
    for _ in range(4):
        time.sleep(b.open_for + 0.01)
        assert b.admit() == 0
        b.failure()
        opened.append(b.open_for)
    assert opened == [0.1, 0.2, 0.2, 0.2]
    time.sleep(0.21)
    b.admit()
    b.success()
    assert b.open_for == 0.05  # reset for the next time
