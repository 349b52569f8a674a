from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Admission,
    Breaker,
    BreakerState,
    ModelCircuits,
    admit,
)
from proxy.config import BreakerConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, probe_timeout: float = 10.0) -> Breaker:
    config = BreakerConfig(failures=3, min_open=1.0, max_open=4.0)
    return Breaker("b", config, clock=clock, probe_timeout=probe_timeout)


def opened(clock: Clock) -> Breaker:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    return b


def test_states_are_a_str_enum_with_the_documented_names():
    assert [str(s) for s in BreakerState] == ["closed", "open", "half_open"]


def test_opens_after_n_consecutive_failures_only():
    clock = Clock()
    b = breaker(clock)
    b.failure()
    b.failure()
    b.success()  # a success in between resets the count
    b.failure()
    b.failure()
    assert b.state == CLOSED and b.admit() == 0
    b.failure()
    assert b.state == OPEN and b.is_open
    assert b.admit() == pytest.approx(1.0)


def test_open_becomes_half_open_by_time_alone_without_any_request():
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    assert b.state == HALF_OPEN  # read from the clock: /ready and the gauges see it
    assert b.is_open  # ...and it is still not serving until a probe says so


def test_half_open_lets_exactly_one_probe_through():
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    assert b.admit() == 0  # the probe
    assert b.admit() > 0  # everyone else waits for the probe's result
    b.success()
    assert b.state == CLOSED and b.admit() == 0


def test_a_released_probe_frees_the_slot_at_once():
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    assert b.admit() == 0
    b.release(b.probe_ticket)  # the probe's client left, or its key cooled down: no verdict
    assert b.state == HALF_OPEN
    assert b.admit() == 0  # the next request probes


def test_an_unreported_probe_frees_the_slot_after_its_deadline():
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    assert b.admit() == 0  # a probe that never reports back
    clock.now += 9.9
    assert b.admit() > 0
    clock.now += 0.2
    assert b.admit() == 0  # never wedged half-open


def test_a_failed_probe_doubles_the_cooldown_up_to_the_cap():
    clock = Clock()
    b = opened(clock)
    periods = []
    for _ in range(4):
        clock.now += b.open_for
        assert b.admit() == 0
        b.failure()
        periods.append(b.open_for)
        assert b.state == OPEN
    assert periods == [2.0, 4.0, 4.0, 4.0]
    clock.now += 4.0
    b.admit()
    b.success()
    assert b.open_for == 1.0  # reset for the next time


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf, -1.0, 0.0])
def test_force_open_ignores_values_that_are_not_a_time(seconds):
    b = breaker(Clock())
    b.force_open(seconds)
    assert b.state == CLOSED


def test_force_open_is_capped_at_max_open_and_never_shortens():
    clock = Clock()
    b = breaker(clock)
    b.force_open(1e30)
    assert b.state == OPEN and b.open_seconds() == 4.0
    b.force_open(1.0)
    assert b.open_seconds() == 4.0
    clock.now += 4.0
    assert b.state == HALF_OPEN


def test_reconfigure_applies_new_bounds_to_the_state_held():
    clock = Clock()
    b = opened(clock)
    for _ in range(3):  # 2 s, 4 s, 4 s
        clock.now += b.open_for
        b.admit()
        b.failure()
    assert b.open_seconds() == 4.0
    b.config = BreakerConfig(failures=3, min_open=0.5, max_open=1.0)
    assert b.open_seconds() == 1.0 and b.open_for == 1.0
    clock.now += 1.0
    assert b.admit() == 0


def test_one_clients_failing_requests_do_not_open_the_circuit_for_others() -> None:
    now = [0.0]
    breaker = Breaker("b", BreakerConfig(failures=3, min_open=1, max_open=4), lambda: now[0])
    breaker.success("good-client")
    for _ in range(10):  # a flood of requests that fail upstream, all from one client
        now[0] += 0.1
        breaker.failure("bad-client")
    assert breaker.state == "closed"
    assert breaker.admit() == 0.0


def test_a_one_client_streak_opens_it_when_nobody_else_succeeded_lately() -> None:
    now = [0.0]
    breaker = Breaker("b", BreakerConfig(failures=3, min_open=1, max_open=4), lambda: now[0])
    breaker.success("other")
    now[0] = 11.0  # the other client's success is older than the window
    for _ in range(3):
        breaker.failure("only-client")
    assert breaker.state == "open"


def test_failures_from_two_clients_open_it_whoever_succeeded() -> None:
    now = [0.0]
    breaker = Breaker("b", BreakerConfig(failures=3, min_open=1, max_open=4), lambda: now[0])
    breaker.success("third")
    for client in ("a", "b", "a"):
        breaker.failure(client)
    assert breaker.state == "open"


def tenants(clock: Clock) -> Breaker:
    config = BreakerConfig(failures=3, min_open=1.0, max_open=4.0)
    return Breaker("b", config, clock=clock, probe_timeout=10.0, multi_tenant=True)


def test_several_tenants_one_clients_streak_never_opens_it_in_a_quiet_moment() -> None:
    """Issue 19: nobody else succeeded lately, 3 failures from A, then A failing every
    0.5 s: the circuit stays closed for B (A's own reconnect throttle slows A down)."""
    clock = Clock()
    b = tenants(clock)
    for _ in range(80):  # 40 s of A failing twice a second
        b.failure("team-a")
        clock.now += 0.5
    assert b.state == CLOSED and b.admit("team-b") == 0


def test_several_tenants_two_failing_clients_open_it() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    assert b.state == OPEN


def test_the_half_open_probe_is_never_the_failing_clients_own() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 1.0
    assert b.state == HALF_OPEN
    assert b.admit("team-a") > 0  # its failures are the streak: it may not probe
    assert b.admit("team-b") == 0  # another client probes
    b.success("team-b")
    assert b.state == CLOSED and b.admit("team-a") == 0


def test_the_failing_clients_may_probe_again_by_time_alone() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 10.0  # refused, they failed no more: SOLO_WINDOW later they may probe
    assert b.admit("team-a") == 0


def test_on_probation_one_clients_failure_does_not_reopen_it_for_everyone() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 1.0
    assert b.admit() == 0  # the proxy's own background probe
    b.probe_succeeded()
    b.failure("team-a")
    assert b.state == CLOSED and b.admit("team-b") == 0
    b.failure("team-c")  # a second client fails too: the backend does
    assert b.state == OPEN


def test_an_open_proxy_is_one_tenant_and_still_protects_the_upstream() -> None:
    clock = Clock()
    b = breaker(clock)  # multi_tenant=False: no clients configured
    for _ in range(3):
        b.failure("127.0.0.1")
    assert b.state == OPEN
    clock.now += 1.0
    assert b.admit("127.0.0.1") == 0  # the one tenant may probe


# ---------------------------------------------------------------- a model's own circuit


def model_circuits(clock: Clock, bound: int = 256) -> ModelCircuits:
    config = BreakerConfig(failures=3, min_open=1.0, max_open=8.0)
    return ModelCircuits("b", config, 10.0, multi_tenant=False, clock=clock, bound=bound)


def test_a_models_5xx_open_only_that_model_and_leave_by_time_alone():
    clock = Clock()
    backend, models = breaker(clock), model_circuits(clock)
    for _ in range(3):
        passed = admit(backend, models.get("broken"), "a")
        assert isinstance(passed, Admission)
        passed.answered_5xx("a")
    assert admit(backend, models.get("broken"), "a") == pytest.approx(1.0)
    assert isinstance(admit(backend, models.get("fine"), "a"), Admission)
    assert backend.state is CLOSED and list(models.open_models()) == ["broken"]
    clock.now += 1.0  # half-open: one probe, and a success closes it
    probe = admit(backend, models.get("broken"), "a")
    assert isinstance(probe, Admission) and probe.model_ticket is not None
    assert admit(backend, models.get("broken"), "b") > 0  # the slot is taken
    probe.served("a")
    assert models.open_models() == {}


def test_connect_errors_stay_backend_wide_and_free_the_models_probe_slot():
    clock = Clock()
    backend, models = breaker(clock), model_circuits(clock)
    for _ in range(3):
        models.get("m").failure("a")
    clock.now += 1.0  # m half-open: this attempt takes its probe slot
    for _ in range(3):
        passed = admit(backend, models.get("m"), "a")
        assert isinstance(passed, Admission)
        passed.backend_failed("a")  # no answer at all: the backend's failure
    assert backend.state is OPEN
    assert admit(backend, models.get("other"), "a") > 0  # every model waits for it
    clock.now += 1.0
    assert isinstance(admit(backend, None, "a"), Admission)  # its probe slot was freed


def test_a_model_refused_after_the_backend_admitted_hands_the_backends_slot_back():
    clock = Clock()
    backend, models = opened(clock), model_circuits(clock)
    for _ in range(3):
        models.get("m").failure("a")
    clock.now += 1.0  # both half-open
    models.get("m").admit("x")  # someone holds m's probe slot
    assert admit(backend, models.get("m"), "a") > 0
    assert isinstance(admit(backend, None, "b"), Admission)  # the backend's slot is free


def test_model_circuits_are_bounded_and_drop_closed_ones_first():
    clock = Clock()
    models = model_circuits(clock, bound=3)
    for _ in range(3):
        models.get("open-one").failure()
    for i in range(50):  # a client sending 50 made-up model ids
        models.get(f"made-up-{i}")
    assert len(models) == 3
    assert list(models.open_models()) == ["open-one"]  # not pushed out by closed ones


@given(st.lists(st.sampled_from(["5xx", "ok", "release", "tick"]), max_size=60))
def test_whatever_happens_to_one_model_another_model_is_admitted(steps):
    clock = Clock()
    backend, models = breaker(clock), model_circuits(clock)
    for step in steps:
        if step == "tick":
            clock.now += 0.7
            continue
        passed = admit(backend, models.get("a"), "a")
        if isinstance(passed, Admission):
            if step == "5xx":
                passed.answered_5xx("a")
            elif step == "ok":
                passed.served("a")
            else:
                passed.released()
        other = admit(backend, models.get("b"), "b")
        assert isinstance(other, Admission)
        other.served("b")
