"""Every piece of failure state leaves by time alone, whatever happened before.

Stateful property tests (hypothesis): the breaker, the key pool and the reconnect throttle
are driven through any sequence of events (success, failure, timeout, a probe taken then
released or abandoned, a reload with new bounds, the clock moving, values from another
replica including nan, inf, huge and negative ones). After every step the state is one the
docs name and within its documented bounds; and when only the clock moves, every
non-closed state ends within its documented maximum. No exception may escape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy.breaker import MAX_STREAK, Breaker, BreakerState
from proxy.config import BreakerConfig, Config, ReconnectConfig, ThrottleConfig, parse_config
from proxy.keys import (
    CONFIRM_INTERVAL,
    CONFIRM_TIMEOUT,
    INVALID_MAX,
    KeyPool,
    KeyState,
    NoUsableKey,
)
from proxy.shared import _valid_time
from proxy.throttle import Outcome, Throttle, _valid_wait, make_storage

SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# What another replica, an upstream header or a corrupted store may hand over.
ANY_SECONDS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30, 1e308, 99999999.0]),
)
CLOCK_STEPS = st.floats(min_value=0.0, max_value=500.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- breaker

BREAKER_CONFIGS = st.builds(
    lambda failures, low, span: BreakerConfig(failures, low, low + span),
    st.integers(min_value=1, max_value=6),
    st.floats(min_value=0.01, max_value=60.0),
    st.floats(min_value=0.0, max_value=300.0),
)


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.breaker = Breaker("b", BreakerConfig(3, 1.0, 8.0), clock=self.clock, probe_timeout=5)
        self.holding_probe = False
        self.ticket = 0  # the probe slot's ticket, while this machine holds it

    @rule()
    def success(self) -> None:
        self.breaker.success()
        self.holding_probe = False

    @rule()
    def background_probe_answers(self) -> None:
        self.breaker.probe_succeeded()
        self.holding_probe = False

    @rule()
    def failure_or_timeout(self) -> None:
        self.breaker.failure()
        self.holding_probe = False

    @rule()
    def admit(self) -> None:
        wait = self.breaker.admit()
        assert math.isfinite(wait) and 0 <= wait <= max(self.breaker.config.max_open, 1.0)
        if wait == 0 and self.breaker.state is BreakerState.HALF_OPEN:
            self.holding_probe = True
            self.ticket = self.breaker.probe_ticket

    @precondition(lambda self: self.holding_probe)
    @rule(abandon=st.booleans())
    def probe_ends_without_a_verdict(self, abandon: bool) -> None:
        if not abandon:  # released (client gone, key cooling down, 4xx)...
            self.breaker.release(self.ticket)
        self.holding_probe = False  # ...or never reported: the deadline frees it

    @rule(config=BREAKER_CONFIGS)
    def reload(self, config: BreakerConfig) -> None:
        self.breaker.config = config

    @rule(seconds=ANY_SECONDS)
    def another_replica_opens(self, seconds: float) -> None:
        self.breaker.force_open(seconds)

    @rule(step=CLOCK_STEPS)
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @rule()
    def only_time_passes_until_the_documented_maximum(self) -> None:
        # Open lasts at most max_open; a probe slot is free again after probe_timeout.
        self.clock.now += self.breaker.config.max_open + self.breaker.probe_timeout
        assert self.breaker.state in (BreakerState.CLOSED, BreakerState.HALF_OPEN)
        assert self.breaker.admit() == 0
        self.holding_probe = self.breaker.state is BreakerState.HALF_OPEN
        self.ticket = self.breaker.probe_ticket

    @invariant()
    def state_is_documented_and_bounded(self) -> None:
        b = self.breaker
        assert b.state in BreakerState
        assert 0 <= b.open_seconds() <= b.config.max_open
        assert b.config.min_open <= b.open_for <= b.config.max_open
        assert (b.state is BreakerState.CLOSED) == (not b.is_open)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = SETTINGS


# ---------------------------------------------------------------- one client, others' admission


class TenantsMachine(RuleBasedStateMachine):
    """Several tenants: whatever client A does (fail, succeed, take and drop probe slots,
    over any time), client B, whose requests succeed, and the proxy's own background probe
    (the backend answers it) are always admitted: B's admission never depends on A."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        config = BreakerConfig(3, 1.0, 8.0)
        self.breaker = Breaker("b", config, clock=self.clock, probe_timeout=5, multi_tenant=True)
        self.ticket: int | None = None

    @rule()
    def a_fails(self) -> None:
        self.breaker.failure("a")

    @rule()
    def a_succeeds(self) -> None:
        self.breaker.success("a")

    @rule()
    def a_asks(self) -> None:
        probing = self.breaker.is_open
        if self.breaker.admit("a") == 0 and probing:
            self.ticket = self.breaker.probe_ticket

    @rule(abandon=st.booleans())
    def a_drops_its_probe(self, abandon: bool) -> None:
        if not abandon:
            self.breaker.release(self.ticket)
        self.ticket = None

    @rule()
    def the_proxys_probe_answers(self) -> None:
        if self.breaker.is_open and self.breaker.admit() == 0:
            self.breaker.probe_succeeded()

    @rule(step=CLOCK_STEPS)
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @rule(step=st.floats(min_value=0.0, max_value=2.0))
    def a_moment_passes(self, step: float) -> None:
        self.clock.now += step

    @invariant()
    def b_is_admitted_and_served(self) -> None:
        assert self.breaker.admit("b") == 0
        assert self.breaker.state is BreakerState.CLOSED


TestTenantsMachine = TenantsMachine.TestCase
TestTenantsMachine.settings = SETTINGS


class CollusionMachine(RuleBasedStateMachine):
    """Several tenants: clients a and c fail on purpose (any order, taking and dropping
    probe slots, over any time short of ``SUSPECT_FOR``), and the proxy's background probe
    answers. Once b, whose requests the backend serves, has closed the circuit, a and c can
    never open it again; b is refused only while the circuit their first streak opened is
    open, or a probe slot is out; and the breaker's memory of them stays bounded."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        config = BreakerConfig(3, 5.0, 60.0)
        self.breaker = Breaker("b", config, clock=self.clock, probe_timeout=5, multi_tenant=True)
        for client in ("a", "c", "a"):
            self.breaker.failure(client)
        self.tickets: dict[str, int | None] = {"a": None, "c": None}
        self.b_closed_it = False

    @rule(client=st.sampled_from(["a", "c"]), with_ticket=st.booleans())
    def a_colluder_fails(self, client: str, with_ticket: bool) -> None:
        ticket = self.tickets[client] if with_ticket else None
        self.breaker.failure(client, ticket)  # without it: another request of its failed
        if with_ticket:
            self.tickets[client] = None

    @rule(client=st.sampled_from(["a", "c"]))
    def a_colluder_asks(self, client: str) -> None:
        probing = self.breaker.is_open
        if self.breaker.admit(client) == 0 and probing:
            self.tickets[client] = self.breaker.probe_ticket

    @rule(client=st.sampled_from(["a", "c"]))
    def a_colluder_drops_its_probe(self, client: str) -> None:
        self.breaker.release(self.tickets[client])
        self.tickets[client] = None

    @rule()
    def the_proxys_probe_answers(self) -> None:
        if self.breaker.is_open and self.breaker.admit() == 0:
            self.breaker.probe_succeeded()

    @rule()
    def b_asks(self) -> None:
        state = self.breaker.state
        if self.breaker.admit("b") == 0:
            self.breaker.success("b")
            self.b_closed_it = True
        else:
            probe_out = any(t == self.breaker.probe_ticket for t in self.tickets.values())
            assert (state is BreakerState.OPEN and not self.b_closed_it) or probe_out

    @rule(step=st.floats(min_value=0.0, max_value=8.0))
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @invariant()
    def colluders_cannot_open_it_again_and_are_remembered_boundedly(self) -> None:
        b = self.breaker
        if self.b_closed_it:
            assert b.state is not BreakerState.OPEN
        assert len(b._held) <= 2 * MAX_STREAK and len(b._suspects) <= MAX_STREAK


TestCollusionMachine = CollusionMachine.TestCase
TestCollusionMachine.settings = SETTINGS


# ---------------------------------------------------------------- key pool

POOL_CONFIG = """
backends:
  b:
    base_url: http://localhost:1/v1
    max_cooldown: {max_cooldown}
    keys:
      - {{id: one, key: "sk-1"}}
      - {{id: two, key: "sk-2"}}
      - {{id: gone, key: "${{UNSET}}"}}
"""
KEY_IDS = st.sampled_from(["one", "two", "gone"])


POOL_BACKEND = parse_config(POOL_CONFIG.format(max_cooldown="300s"), "t.yaml", {}).backends["b"]


def key_pool(clock: Clock, max_cooldown: float) -> KeyPool:
    backend = dataclasses.replace(POOL_BACKEND, max_cooldown=max_cooldown)
    return KeyPool(backend, clock=clock)


class KeyPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.pool = key_pool(self.clock, 300.0)
        self.confirming: set[str] = set()

    @rule()
    def pick(self) -> None:
        try:
            self.pool.pick()
        except NoUsableKey as exc:
            if exc.retry_after is not None:
                assert 0 <= exc.retry_after <= self.pool.max_cooldown

    @rule(key=KEY_IDS, seconds=st.one_of(st.none(), ANY_SECONDS))
    def rate_limited(self, key: str, seconds: float | None) -> None:
        self.pool.cool_down(key, seconds, "429")

    @rule(key=KEY_IDS)
    def refused(self, key: str) -> None:
        self.pool.mark_invalid(key, "401")

    @rule(key=KEY_IDS)
    def refused_once_and_a_confirming_probe_starts(self, key: str) -> None:
        # A refusal alone changes no state: only a probe's confirmation (mark_invalid) does.
        before = self.pool.state_of(key)
        started = self.pool.begin_confirm(key)
        assert self.pool.state_of(key) is before
        if started:
            assert not self.pool.begin_confirm(key)  # one probe per key at a time
            self.confirming.add(key)

    @rule(key=KEY_IDS)
    def the_confirming_probe_ends(self, key: str) -> None:
        self.pool.end_confirm(key)
        self.confirming.discard(key)

    @rule(key=KEY_IDS)
    def probe_succeeded(self, key: str) -> None:
        self.pool.restore(key)

    @rule(key=KEY_IDS)
    def answered(self, key: str) -> None:
        self.pool.mark_success(key)

    @rule(max_cooldown=st.floats(min_value=0.5, max_value=3600.0))
    def reload(self, max_cooldown: float) -> None:
        fresh = key_pool(self.clock, max_cooldown)
        fresh.adopt_health(self.pool)
        self.pool = fresh

    @rule(step=CLOCK_STEPS)
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @rule()
    def only_time_passes_until_the_documented_maximum(self) -> None:
        self.clock.now += max(self.pool.max_cooldown, INVALID_MAX)
        for key in ("one", "two"):
            assert self.pool.state_of(key) is KeyState.OK
            # A confirming probe that never reported back frees its slot by time alone.
            assert self.pool.health[key].confirm_free_at <= self.clock.now
        self.confirming.clear()
        assert self.pool.state_of("gone") is KeyState.MISSING  # configuration, not failure

    @invariant()
    def states_are_documented_and_bounded(self) -> None:
        for key in ("one", "two", "gone"):
            assert self.pool.state_of(key) in KeyState
            left = self.pool.cooldown_left(key)
            assert math.isfinite(left) and 0 <= left <= self.pool.max_cooldown
        assert self.pool.state_of("gone") is KeyState.MISSING
        for key in ("one", "two"):  # a probe slot is bounded: deadline plus interval
            left = self.pool.health[key].confirm_free_at - self.clock.now
            assert left <= CONFIRM_TIMEOUT + CONFIRM_INTERVAL + 1e-9  # (float rounding)
        self.pool.missing_hint()  # the operator's text never raises


TestKeyPoolMachine = KeyPoolMachine.TestCase
TestKeyPoolMachine.settings = SETTINGS


CLIENTS = st.sampled_from(["a", "b", "c"])


class TenantKeyPoolMachine(RuleBasedStateMachine):
    """Several tenants on one key pool: one client's 429s, whatever their retry-after, never
    take a key from another client; two clients' do (the quota is spent), for at most
    ``max_cooldown``, as does a per-client cooldown, reload or not."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.max_cooldown = 300.0
        self.pool = self.fresh()
        self.limited: set[str] = set()  # clients that ever got a 429

    def fresh(self) -> KeyPool:
        backend = dataclasses.replace(POOL_BACKEND, max_cooldown=self.max_cooldown)
        return KeyPool(backend, clock=self.clock, multi_tenant=True)

    @rule(
        key=st.sampled_from(["one", "two"]),
        client=CLIENTS,
        seconds=st.one_of(st.none(), ANY_SECONDS),
    )
    def rate_limited(self, key: str, client: str, seconds: float | None) -> None:
        self.pool.cool_down(key, seconds, "429", client)
        self.limited.add(client)

    @rule(key=st.sampled_from(["one", "two"]))
    def served(self, key: str) -> None:
        self.pool.mark_success(key)

    @rule(client=CLIENTS)
    def pick(self, client: str) -> None:
        try:
            self.pool.pick(client=client)
        except NoUsableKey as exc:
            assert exc.retry_after is not None and 0 <= exc.retry_after <= self.max_cooldown

    @rule(max_cooldown=st.floats(min_value=0.5, max_value=3600.0))
    def reload(self, max_cooldown: float) -> None:
        self.max_cooldown = max_cooldown
        fresh = self.fresh()
        fresh.adopt_health(self.pool)
        self.pool = fresh

    @rule(step=CLOCK_STEPS)
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @rule()
    def only_time_passes_until_max_cooldown(self) -> None:
        self.clock.now += self.max_cooldown
        for client in ("a", "b", "c"):
            assert {self.pool.pick(client=client).id for _ in range(2)} == {"one", "two"}

    @invariant()
    def one_clients_429s_take_nothing_from_the_others(self) -> None:
        if len(self.limited) == 1:
            for client in {"a", "b", "c"} - self.limited:
                assert {self.pool.pick(client=client).id for _ in range(2)} == {"one", "two"}
                assert self.pool.has_usable(client=client)


TestTenantKeyPoolMachine = TenantKeyPoolMachine.TestCase
TestTenantKeyPoolMachine.settings = SETTINGS


# ---------------------------------------------------------------- reconnect throttle

THROTTLE_BASE: Config = parse_config(
    'backends: {b: {base_url: "http://x/v1", keys: [{id: k, key: v}]}}', "t.yaml", {}
)
CLIENTS = st.sampled_from(["10.0.0.1", "10.0.0.2"])
OUTCOMES = st.sampled_from(list(Outcome))


class ThrottleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.loop = asyncio.new_event_loop()
        self.storage = make_storage("memory://", self.clock)
        self.throttle = self.build(1.0, 8.0, 3, 0.5)

    def teardown(self) -> None:
        self.loop.close()

    def build(self, base: float, cap: float, after: int, ratio: float) -> Throttle:
        reconnect = ReconnectConfig(True, base, cap, after, ratio)
        config = dataclasses.replace(THROTTLE_BASE, throttle=ThrottleConfig(reconnect=reconnect))
        return Throttle(config, self.storage)

    def wait(self, client: str) -> float:
        return self.loop.run_until_complete(self.throttle.reconnect_wait(client, "m"))

    @rule(client=CLIENTS, outcome=OUTCOMES)
    def outcome(self, client: str, outcome: Outcome) -> None:
        self.loop.run_until_complete(self.throttle.record(client, "m", outcome))

    @rule(
        base=st.floats(min_value=0.01, max_value=10.0),
        extra=st.floats(min_value=0.0, max_value=120.0),
        after=st.integers(min_value=1, max_value=5),
        ratio=st.floats(min_value=0.0, max_value=1.0),
    )
    def reload(self, base: float, extra: float, after: int, ratio: float) -> None:
        self.throttle = self.build(base, base + extra, after, ratio)  # the same storage

    @rule(step=CLOCK_STEPS)
    def time_passes(self, step: float) -> None:
        self.clock.now += step

    @rule()
    def only_time_passes_until_the_documented_maximum(self) -> None:
        self.clock.now += self.throttle.reconnect.max
        assert self.wait("10.0.0.1") == 0 and self.wait("10.0.0.2") == 0

    @invariant()
    def waits_are_bounded(self) -> None:
        for client in ("10.0.0.1", "10.0.0.2"):
            wait = self.wait(client)
            assert math.isfinite(wait) and 0 <= wait <= self.throttle.reconnect.max


TestThrottleMachine = ThrottleMachine.TestCase
TestThrottleMachine.settings = SETTINGS


# ---------------------------------------------------------------- values read back from Redis


@given(raw=st.one_of(st.text(), st.binary(), st.floats().map(str), st.integers().map(str)))
def test_a_time_read_back_from_redis_is_a_finite_positive_number_or_nothing(raw):
    value = _valid_time(raw)
    assert value is None or (math.isfinite(value) and value > 0)


@given(seconds=ANY_SECONDS, cap=st.floats(min_value=0.01, max_value=3600.0))
def test_a_wait_read_back_from_redis_is_within_its_cap(seconds, cap):
    wait = _valid_wait(seconds, cap)
    assert math.isfinite(wait) and 0 <= wait <= cap
