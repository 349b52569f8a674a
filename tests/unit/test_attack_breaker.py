"""Breaker reproductions from the attack session (see tests/e2e/test_attack_findings.py)."""

from __future__ import annotations

from proxy.breaker import HALF_OPEN, Breaker
from proxy.config import BreakerConfig


def test_an_attempt_admitted_while_closed_does_not_free_a_later_probes_slot() -> None:
    """ "In half_open one probe at a time is let through" (breaker.py). ``release()``
    clears the probe slot whoever calls it: an attempt admitted while the circuit was
    still closed (no slot taken) whose client then leaves calls ``release()`` from
    ``failover._try_backend`` and frees the slot the real probe holds, so a second probe
    goes out while the first is in flight (and more, one per such attempt). Fix: ``admit``
    returns a token (or the attempt remembers whether it took the slot) and only the slot's
    holder may release it."""
    now = [0.0]
    breaker = Breaker("b", BreakerConfig(failures=2, min_open=1.0, max_open=4.0), lambda: now[0])
    assert breaker.admit() == 0.0  # attempt A, circuit closed: no probe slot
    breaker.failure("x")
    breaker.failure("y")  # other requests open the circuit
    now[0] = 1.5
    assert breaker.state is HALF_OPEN
    assert breaker.admit() == 0.0  # attempt B takes the probe slot
    breaker.release()  # attempt A's client leaves: A had no slot to hand back
    assert breaker.admit() > 0.0  # so nobody else may probe while B is out
