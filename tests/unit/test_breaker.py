from __future__ import annotations

import itertools
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
    clock.now += 1.9  # open for 1 s, then held one more cooldown: others probe first
    assert b.admit("team-a") > 0
    clock.now += 0.1
    assert b.admit("team-a") == 0


def test_colluders_failing_every_probe_never_keep_it_open_for_the_others() -> None:
    """Review of issue 19: two clients that fail on purpose, one request every 0.5 s, with
    a cooldown longer than any hold: the circuit opens once, then stays half-open (a
    streak client's failed probe is its own), and a third client is let through."""
    clock = Clock()
    config = BreakerConfig(failures=3, min_open=15.0, max_open=120.0)
    b = Breaker("b", config, clock=clock, probe_timeout=10.0, multi_tenant=True)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    refused_b = upstream_calls = 0
    for step in range(2400):  # 20 minutes
        clock.now += 0.5
        for client in ("team-a", "team-c"):
            probing = b.is_open
            if b.admit(client) == 0:
                upstream_calls += 1
                b.failure(client, b.probe_ticket if probing else None)
        if step % 20 == 0:  # team-b every 10 s, whose requests the backend serves
            if b.admit("team-b") == 0:
                b.success("team-b")
                for _ in range(3):  # ... and the colluders open it again at once
                    for client in ("team-a", "team-c"):
                        b.failure(client)
            else:
                refused_b += 1
    # Open once at the start, and once more after their suspicion ran out (SUSPECT_FOR,
    # 10 min): two periods of 15 s in 20 min.
    assert refused_b <= 4
    assert upstream_calls > 0


def test_a_streak_clients_failed_probes_back_off_and_leave_it_half_open() -> None:
    clock = Clock()
    b = tenants(clock)  # min_open 1, max_open 4
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 2.0  # open 1 s, held 1 s more
    probes = []
    for _ in range(40):  # team-a tries every 0.25 s for 10 s, failing each probe
        probing = b.is_open
        if b.admit("team-a") == 0:
            probes.append(clock.now)
            b.failure("team-a", b.probe_ticket if probing else None)
        assert b.state is HALF_OPEN and b.would_admit("team-b")  # anyone else: at once
        clock.now += 0.25
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] == pytest.approx(4.0)  # 2, 4, 4 ... capped


def test_a_new_client_failing_the_probe_reopens_it() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 1.0
    assert b.admit("team-d") == 0
    b.failure("team-d", b.probe_ticket)  # a client new to the streak: the backend fails
    assert b.state is OPEN and b.open_seconds() == pytest.approx(2.0)


def test_on_probation_one_clients_failure_does_not_reopen_it_for_everyone() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 1.0
    assert b.admit() == 0  # the proxy's own background probe
    b.probe_succeeded()
    b.failure("team-a")  # a streak client: half-open, where anyone else probes at once
    assert b.state is HALF_OPEN and b.admit("team-a") > 0 and b.admit("team-b") == 0
    b.success("team-b")
    assert b.state is CLOSED and b.admit("team-a") == 0


def test_on_probation_a_new_clients_failure_reopens_it() -> None:
    clock = Clock()
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 1.0
    b.admit()
    b.probe_succeeded()
    b.failure("team-d")  # streak team-a, team-c and now team-d: the backend fails
    assert b.state is OPEN


def test_an_answer_that_is_not_a_success_resets_no_streak() -> None:
    """Review of issue 19: one client's 4xx (or its model's 5xx) must not keep wiping the
    timeouts two other clients are getting."""
    clock = Clock()
    b = tenants(clock)
    for _ in range(3):
        b.failure("team-a")
        b.answered()  # team-x's request answered 400 in between
        b.failure("team-c")
    assert b.state is OPEN


def test_an_answer_to_the_probe_closes_it_on_probation() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    assert b.admit("a") == 0
    b.answered(b.probe_ticket)
    assert b.state is CLOSED
    b.failure("a")  # on probation: the next failure reopens it, doubled
    assert b.state is OPEN and b.open_seconds() == pytest.approx(2.0)


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


def test_with_every_circuit_open_a_new_models_circuit_still_opens():
    """Review of issue 19: the new circuit was dropped right after it was made when all
    the others were open, so no further model's circuit could open."""
    clock = Clock()
    models = model_circuits(clock, bound=3)
    for name in ("m1", "m2", "m3", "m4"):
        for _ in range(3):
            models.get(name).failure()
    assert list(models.open_models()) == ["m2", "m3", "m4"]  # the oldest open one dropped


def test_two_new_broken_models_past_the_bound_do_not_evict_each_others_count():
    """Review of issue 19: with every circuit open, two new failing models took turns
    dropping each other's circuit (a closed one with failures), so neither ever opened."""
    clock = Clock()
    models = model_circuits(clock, bound=3)
    for name in ("m1", "m2", "m3"):
        for _ in range(3):
            models.get(name).failure()
    for _ in range(3):
        models.get("x").failure()
        models.get("y").failure()
    assert models.is_open("x") and models.is_open("y")


def test_a_models_5xx_leaves_the_backends_timeout_streak_alone():
    """Review of issue 19: team-x's model answering 500 reset the backend's streak, so
    timeouts from team-a and team-c never opened it."""
    clock = Clock()
    backend = tenants(clock)
    models = ModelCircuits("b", backend.config, 10.0, multi_tenant=True, clock=clock)
    for client in ("team-a", "team-x", "team-c", "team-x", "team-a"):
        passed = admit(backend, models.get("broken" if client == "team-x" else "m"), client)
        assert isinstance(passed, Admission)
        if client == "team-x":
            passed.answered_5xx(client)
        else:
            passed.backend_failed(client)  # a timeout
    assert backend.state is OPEN


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


def colluded(clock: Clock) -> Breaker:
    """Opened by team-a and team-c's failures, their holds over: half-open, slot free."""
    b = tenants(clock)
    for client in ("team-a", "team-c", "team-a"):
        b.failure(client)
    clock.now += 2.0
    assert b.state is HALF_OPEN
    return b


@pytest.mark.parametrize("how", ["released", "never reported"])
def test_a_client_that_drops_the_probe_cannot_take_it_again_at_once(how: str) -> None:
    """Review of issue 19 (F1): a client that took the probe slot and let it go unreported
    took it again the moment it freed, so the circuit never closed for anybody."""
    clock = Clock()
    b = colluded(clock)
    assert b.admit("team-x") == 0
    if how == "released":
        b.release(b.probe_ticket)
    else:
        clock.now += 10.0  # the probe timeout: its slot frees by time
    assert b.admit("team-x") > 0  # it waits a hold...
    assert b.admit("team-b") == 0  # ...another client probes
    b.success("team-b")
    assert b.state is CLOSED


def test_a_probes_2xx_head_closes_the_circuit_before_its_body_ends() -> None:
    clock = Clock()
    backend = colluded(clock)
    passed = admit(backend, None, "team-b")
    assert isinstance(passed, Admission) and passed.backend_ticket is not None
    passed.headed("team-b")
    assert backend.state is CLOSED and backend.admit("team-d") == 0
    passed.backend_failed("team-b")  # the body broke after all: on probation, reopened
    assert backend.state is OPEN


def test_others_served_while_the_circuit_is_closed_make_nobody_a_suspect() -> None:
    """Review of issue 19 (F2): a client served while honest clients had a natural failure
    made them suspects, so a real outage later opened nothing."""
    clock = Clock()
    b = tenants(clock)
    for _ in range(20):
        b.failure("team-c")
        b.success("team-b")  # b is served in between: c's failure was its own
        clock.now += 1.0
    for client in ("team-c", "team-d", "team-c"):  # the upstream goes down
        b.failure(client)
    assert b.state is OPEN


def test_a_streak_full_of_suspects_still_opens_on_an_innocent_clients_failures() -> None:
    """Review of issue 19 (F3): eight suspects filled the streak; nobody else's failures
    were counted, and the circuit never opened."""
    clock = Clock()
    b = tenants(clock)
    suspects = [f"s{i}" for i in range(8)]
    for client in suspects:
        b.failure(client)
    clock.now += 2.0
    assert b.admit("team-b") == 0
    b.success("team-b")  # the probe was served: all eight are suspects
    for client in suspects:
        b.failure(client)
    assert b.state is CLOSED  # suspects alone, while others are served
    b.failure("team-d")  # the ninth: not even in the streak's memory, but innocent
    assert b.state is OPEN


def test_suspects_alone_still_open_it_in_a_real_outage_at_a_higher_threshold() -> None:
    clock = Clock()
    b = colluded(clock)
    assert b.admit("team-b") == 0
    b.success("team-b")  # team-a and team-c are suspects now
    clock.now += 30.0  # nobody else served since: a quiet spell
    for _ in range(14):
        b.failure("team-a")
        b.failure("team-c")
    assert b.state is CLOSED  # 28 failures: under 10 x 3
    b.failure("team-a")
    b.failure("team-c")
    assert b.state is OPEN
