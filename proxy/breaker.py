"""Per-backend circuit breaker: stop hammering an upstream that keeps failing.

closed ──(N failures in a row)──▶ open ──(cooldown over: by time alone)──▶ half_open
   ▲                               ▲                                          │
   │                               └──────(probe fails: cooldown x2)──────────┤
   └─────────────────────────(probe succeeds)─────────────────────────────────┘

Failures are connect errors, timeouts, broken statuses and 5xx to requests without a model;
a 5xx to a model's request is that model's (``ModelCircuits``: a broken or retired model
does not close its backend's other models). The cooldown doubles from ``min_open`` to
``max_open`` while the backend keeps failing and resets when a probe succeeds.

Failures are attributed to clients. With several tenants (``clients:`` lists more than
one), a streak whose failures all come from one client never opens the circuit, quiet
moment or not: one client's failing requests must not shut a backend for everybody (its own
reconnect throttle slows it down instead); it takes failures from two clients or more.
The clients whose failures opened the circuit (its streak, at most ``MAX_STREAK``) are kept
off the half-open probe for the open period and one more cooldown, so the probe is the
proxy's own (the runtime's background ``GET /models``) or another client's. After that a
streak client may probe, but its failed probe (or its failure on probation) does not reopen
the circuit for the others: it leaves it half-open, where anyone else may probe at once, and
keeps that client off the probe for a hold that doubles with each of its failures (up to
``max_open``). When another client's request closes the circuit, the streak's clients are
suspects for ``SUSPECT_FOR``: their failures alone open it no more (with anyone else's they
do). So colluding clients cannot hold a healthy circuit open, nor reopen it after each
close, and a broken upstream still sees at most one probe per streak client per hold. A
client new to the streak failing a probe reopens it, doubled, as without tenants.

An open proxy is one tenant: any ``failures`` in a row open it, and any request may probe
(the breaker still protects a failing upstream). Without clients, and with one client, a
lone client's streak opens it as before, also when another recently succeeded
(``SOLO_WINDOW`` applies only there, where clients are told apart by address).

Only a real success (a 2xx served) forgets a streak. A 4xx, or a 5xx to a model's request,
is an answer: it closes the circuit (on probation) when that request held the probe, and
otherwise changes nothing, so one client's answered-but-refused requests cannot keep
resetting a streak others' timeouts are building.

Every state leaves by time alone: ``open`` lasts at most ``max_open``; in ``half_open`` one
probe at a time is let through, and a probe whose outcome is never reported (its client
left, its key was cooling down...) frees its slot after ``probe_timeout`` at the latest.
The state is computed from the clock on every read, not only when a request arrives, so
``/ready`` and the gauges see ``half_open`` with no traffic at all (the runtime's
background probe then closes the circuit when the backend answers again).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from proxy.config import BreakerConfig

log = logging.getLogger("proxy.breaker")

PROBE_TIMEOUT = 60.0  # the default (and the cap) for a probe that never reports back
SOLO_WINDOW = 10.0  # another client's success this recent makes a one-client streak its own
MAX_STREAK = 8  # clients remembered in a streak (a ninth failing client is a new one)
SUSPECT_FOR = 600.0  # how long a streak whose circuit another client's success closed is suspect
SUSPECT_FACTOR = 10  # a streak of suspects alone opens only at this many times ``failures``...
SUSPECT_WINDOW = 30.0  # ...and only when no other client was served this recently


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Breaker:
    def __init__(
        self,
        backend: str,
        config: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        probe_timeout: float = PROBE_TIMEOUT,
        multi_tenant: bool = False,
    ) -> None:
        self.backend = backend
        self.multi_tenant = multi_tenant  # several clients: one client's streak is its own
        self._clock = clock
        self.probe_timeout = _bounded(probe_timeout, PROBE_TIMEOUT, PROBE_TIMEOUT)
        self.failures = 0
        self._opened = False  # closed when False; open or half-open (by the clock) when True
        self.open_until = 0.0  # clock time the open period ends
        self._probe_deadline = 0.0  # clock time an unreported probe frees its slot; 0: none
        self.probe_ticket = 0  # counts probe slots handed out: the holder's ticket
        self._probation = False  # closed by the background probe, not yet by a real success
        self._config = config
        self.open_for = config.min_open
        self._streak_clients: set[str] = set()  # who failed in the current streak
        self._held: dict[str, tuple[float, float]] = {}  # streak client -> (until, hold)
        self._suspects: dict[str, float] = {}  # client -> until (<= MAX_STREAK entries)
        self._innocent = False  # a failure of this streak came from a client not suspected
        self._probe_holder: str | None = None  # the client the probe slot was handed to
        self._innocent_served_at = -math.inf  # a client not suspected was served then
        self._recent_successes: dict[str, float] = {}  # client -> clock time (<= 2 entries)

    # ------------------------------------------------------------ configuration

    @property
    def config(self) -> BreakerConfig:
        return self._config

    @config.setter
    def config(self, config: BreakerConfig) -> None:
        self.reconfigure(config)

    def reconfigure(self, config: BreakerConfig) -> None:
        """A reload kept this breaker: the new bounds apply at once, to the state it holds."""
        self._config = config
        self.open_for = min(max(self.open_for, config.min_open), config.max_open)
        latest = self._clock() + config.max_open
        if self.open_until > latest:
            self.open_until = latest

    # ------------------------------------------------------------ reading the state

    @property
    def state(self) -> BreakerState:
        if not self._opened:
            return CLOSED
        return OPEN if self._clock() < self.open_until else HALF_OPEN

    @property
    def is_open(self) -> bool:
        """Not closed: open, or half-open waiting for a probe to say the backend is back."""
        return self._opened

    def open_seconds(self) -> float:
        """Seconds left in the open period (0 when closed or half-open)."""
        if not self._opened:
            return 0.0
        return min(max(0.0, self.open_until - self._clock()), self._config.max_open)

    # ------------------------------------------------------------ the request path

    def admit(self, client: str | None = None) -> float:
        """0 when a request may go upstream now; otherwise seconds until it may.

        In half-open, a 0 hands the caller the one probe slot: it must then report exactly
        one of ``success()``, ``failure()`` or ``release()``. With several tenants, a client
        whose failures make the current streak does not get it (it waits a second; the
        proxy's own probe or another client's decides).
        """
        if not self._opened:
            return 0.0
        now = self._clock()
        if now < self.open_until:
            return min(self.open_until - now, self._config.max_open)  # (float rounding)
        if self._probe_deadline and now < self._probe_deadline:  # a probe is out
            return min(1.0, self._probe_deadline - now)
        if self._probe_deadline:  # a probe that never reported: its client waits a hold
            self._probe_deadline = 0.0
            self._hold_holder()
        if self._held_by(client, now):
            return min(max(1.0, self._held[client or ""][0] - now), self._config.max_open)
        self._probe_deadline = now + self.probe_timeout
        self._probe_holder = client
        self.probe_ticket += 1  # the holder's proof, for release()
        return 0.0

    def would_admit(self, client: str | None = None) -> bool:
        """Whether ``admit(client)`` would let a request through now (changing nothing):
        closed, or half-open with its probe slot free for this client."""
        if not self._opened:
            return True
        now = self._clock()
        if now < self.open_until or (self._probe_deadline and now < self._probe_deadline):
            return False
        return not self._held_by(client, now)

    def _held_by(self, client: str | None, now: float) -> bool:
        """Whether ``client`` may not take the probe slot: several tenants, and its failures
        are the current streak's, its hold not over yet (it leaves by time alone)."""
        if not self.multi_tenant or client is None:
            return False
        held = self._held.get(client)
        return held is not None and now < held[0]

    def success(self, client: str | None = None) -> None:
        if (self._opened and self.state is HALF_OPEN and client == self._probe_holder) or (
            self._probation  # closed by the background probe, this client served first
        ):
            self._probe_served(client)
        if self._opened:
            log.warning("backend %s: circuit closed again (probe succeeded)", self.backend)
            self._opened = False
            self._probe_deadline = 0.0
        self.open_for = self._config.min_open  # a real success: the backend serves
        self._probation = False
        self.failures = 0
        self._streak_clients.clear()
        self._innocent = False
        self._held.clear()
        if client is not None:
            self._note_success(client)
            if not self._suspected(client):
                self._innocent_served_at = self._clock()

    def probe_succeeded(self) -> None:
        """The background probe's ``GET /models`` answered: close the circuit (so /ready
        recovers with no traffic), on probation. A model list answering does not prove that
        completions work: the next real failure re-opens the circuit at once, with the
        doubled cooldown; only a real success forgets the doubling."""
        if self._opened:
            log.warning(
                "backend %s: circuit closed again (background probe answered; on probation)",
                self.backend,
            )
            self._opened = False
            self._probe_deadline = 0.0
            self._probation = True
        self.failures = 0  # the streak's clients are kept: their failures are still theirs

    def answered(self, ticket: int | None = None, served: str | None = None) -> None:
        """The backend answered: it is up. That closes the circuit (on probation) only when
        this request held the probe; it resets no streak (a client's refused requests must
        not hide the timeouts others get). ``served``: the answer is a 2xx head, to that
        client (its probe succeeded: the streak's clients become suspects)."""
        if ticket is not None and ticket == self.probe_ticket and self.state is HALF_OPEN:
            if served is not None:
                self._probe_served(served)
            self.probe_succeeded()
        else:
            self.release(ticket, hold=False)

    def _probe_served(self, client: str | None) -> None:
        """The probe, another client's than the streak's, was served: the streak's failures
        were its clients' own (colluding, or a poisoned body each)."""
        if self.multi_tenant and client is not None and client not in self._streak_clients:
            self._suspect_streak()

    def failure(self, client: str | None = None, ticket: int | None = None) -> None:
        """A failure, from ``client``; ``ticket`` frees the probe slot if it held it."""
        self.failures += 1
        member = client is not None and client in self._streak_clients
        if client is not None and not member and len(self._streak_clients) < MAX_STREAK:
            self._streak_clients.add(client)
        if not self._suspected(client):
            self._innocent = True
        state = self.state
        if state is HALF_OPEN or (state is CLOSED and self._probation):
            own = member or self._suspected(client)
            self._failed_test(client if own else None, state)
        elif (
            state is CLOSED
            and self.failures >= self._config.failures
            and not self._one_clients_problem()
        ):
            self.open_for = self._config.min_open
            self._open(self.open_for, f"after {self.failures} failures in a row")
        self.release(ticket, hold=False)

    def _failed_test(self, member: str | None, state: BreakerState) -> None:
        """A failure in half-open or on probation. From a client of the streak (several
        tenants): its own again; it is held off the probe, the circuit stays (or goes back
        to) half-open for the others. Otherwise the backend still fails: reopen, doubled."""
        if self.multi_tenant and member is not None:
            self._hold(member)
            if state is CLOSED:  # on probation: half-open now, anyone else may probe
                self._opened, self.open_until, self._probe_deadline = True, self._clock(), 0.0
            return
        if state is CLOSED and self.multi_tenant and self._one_clients_problem():
            return  # one client failing on probation: its own, not the backend's
        self._probation = False
        self.open_for = min(self.open_for * 2, self._config.max_open)
        why = "after a failed probe" if state is HALF_OPEN else "after a failure on probation"
        self._open(self.open_for, why)

    def _hold(self, client: str) -> None:
        """Keep a client off the probe: its hold doubles with each failed or dropped one."""
        _, hold = self._held.pop(client, (0.0, self.open_for / 2))
        hold = min(max(hold * 2, self._config.min_open), self._config.max_open)
        self._held[client] = (self._clock() + hold, hold)
        while len(self._held) > 2 * MAX_STREAK:  # bounded: the oldest hold goes first
            del self._held[next(iter(self._held))]

    def _hold_holder(self) -> None:
        """The probe slot came back with no verdict (released, or its deadline passed):
        its client may not take it again at once (or one client could hold it forever)."""
        holder, self._probe_holder = self._probe_holder, None
        if self.multi_tenant and holder is not None:
            self._hold(holder)

    def _note_success(self, client: str) -> None:
        """Remember the last two clients that succeeded, and when (bounded: two entries)."""
        self._recent_successes[client] = self._clock()
        if len(self._recent_successes) > 2:
            oldest = min(self._recent_successes, key=self._recent_successes.__getitem__)
            del self._recent_successes[oldest]

    def _suspect_streak(self) -> None:
        """Another client's probe was served as soon as the circuit let it: the streak's
        failures were its clients' own. For ``SUSPECT_FOR`` their failures alone open it
        only when nobody else was served for ``SUSPECT_WINDOW``, and at ``SUSPECT_FACTOR``
        times the threshold; with anyone else's failures, as usual."""
        until = self._clock() + SUSPECT_FOR
        for client in self._streak_clients:
            self._suspects.pop(client, None)
            self._suspects[client] = until
        while len(self._suspects) > MAX_STREAK:
            del self._suspects[next(iter(self._suspects))]  # the oldest first

    def _suspected(self, client: str | None) -> bool:
        until = self._suspects.get(client or "")
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._suspects[client or ""]
        return False

    def _one_clients_problem(self) -> bool:
        """Every failure of the streak came from one client while another client succeeded
        within ``SOLO_WINDOW``: that client's requests fail (a poisoned body, say), the
        backend does not, and the circuit stays closed for everybody else. With several
        tenants, also a streak of suspects only (``_suspect_streak``)."""
        if self.multi_tenant and self._streak_clients:
            if len(self._streak_clients) == 1:
                return True
            if self._innocent:
                return False  # someone not suspected fails too: the backend does
            # Suspects alone: theirs while others are served; else (a real outage, quiet
            # otherwise) they open it too, at a higher threshold.
            quiet = self._clock() - self._innocent_served_at >= SUSPECT_WINDOW
            return not quiet or self.failures < self._config.failures * SUSPECT_FACTOR
        if len(self._streak_clients) != 1:
            return False
        (only,) = self._streak_clients
        now = self._clock()
        return any(
            client != only and now - at <= SOLO_WINDOW
            for client, at in self._recent_successes.items()
        )

    def release(self, ticket: int | None = None, hold: bool = True) -> None:
        """The attempt holding the probe slot ended with no verdict on the backend (client
        gone, backend limit, a redirect): the next request may probe, and (``hold``) the
        holder's client waits a hold first. Only the holder frees it (``ticket``:
        ``probe_ticket`` as it was when its ``admit()`` gave it the slot); an attempt
        admitted while the circuit was closed holds no slot."""
        if ticket is not None and ticket == self.probe_ticket and self._probe_deadline:
            self._probe_deadline = 0.0
            if hold:
                self._hold_holder()
            else:
                self._probe_holder = None

    def force_open(self, seconds: float, why: str = "(opened by another replica)") -> None:
        """Another replica opened this backend's circuit: stay away here too.

        The value comes from shared storage: a non-finite or negative one is ignored, a
        large one is capped at ``max_open``; an open period here is never shortened.
        """
        if not math.isfinite(seconds) or seconds <= 0:
            return
        seconds = min(seconds, self._config.max_open)
        until = self._clock() + seconds
        if self.state is OPEN and self.open_until >= until:
            return
        self._open(seconds, why)

    def _open(self, seconds: float, why: str) -> None:
        self._opened = True
        self.open_until = self._clock() + seconds
        self._probe_deadline = 0.0
        if self.multi_tenant:  # the streak's clients wait out one more cooldown: others probe
            for client in self._streak_clients:
                self._held[client] = (self.open_until + seconds, seconds)
        shown = f"{round(seconds, 1):g}"  # 0.5 s, 1 s, 60 s
        log.warning("backend %s: circuit open for %s s %s", self.backend, shown, why)


# ---------------------------------------------------------------- a model's own circuit

MAX_MODEL_CIRCUITS = 256  # per backend: model ids can come from clients (a catch-all route)


class ModelCircuits:
    """The circuits of one backend's models. A 5xx is about the model that answered it (a
    broken or retired model): it opens that model's circuit, never its backend's other
    models. Connect errors and timeouts stay with the backend's own breaker.

    Bounded: at most ``MAX_MODEL_CIRCUITS``, made on a model's first request; past the
    bound a closed circuit with no failures is dropped first (it holds nothing), else the
    least recently used (dropping
    an open one only lets that model be tried again: the breaker's purpose is protecting the
    upstream, which the backend's own breaker still does)."""

    def __init__(
        self,
        backend: str,
        config: BreakerConfig,
        probe_timeout: float = PROBE_TIMEOUT,
        multi_tenant: bool = False,
        clock: Callable[[], float] = time.monotonic,
        bound: int = MAX_MODEL_CIRCUITS,
    ) -> None:
        self.backend = backend
        self._clock = clock
        self._bound = max(1, bound)
        self._breakers: OrderedDict[str, Breaker] = OrderedDict()
        self.reconfigure(config, probe_timeout, multi_tenant)

    def reconfigure(self, config: BreakerConfig, probe_timeout: float, multi_tenant: bool) -> None:
        self.config, self.probe_timeout, self.multi_tenant = config, probe_timeout, multi_tenant
        for breaker in self._breakers.values():
            breaker.reconfigure(config)
            breaker.probe_timeout = _bounded(probe_timeout, PROBE_TIMEOUT, PROBE_TIMEOUT)
            breaker.multi_tenant = multi_tenant

    def __len__(self) -> int:
        return len(self._breakers)

    def get(self, model: str) -> Breaker:
        breaker = self._breakers.get(model)
        if breaker is not None:
            self._breakers.move_to_end(model)
            return breaker
        shown = model[:100].encode("unicode_escape").decode("ascii")  # a client's id, logged
        breaker = Breaker(
            f"{self.backend} model '{shown}'",
            self.config,
            self._clock,
            self.probe_timeout,
            self.multi_tenant,
        )
        if len(self._breakers) >= self._bound:  # before inserting: never the new one
            # A closed circuit with no failures holds nothing; else the least recently used
            # (never one counting failures by LRU order alone, or two new broken models
            # would evict each other's count, turn by turn, and neither would ever open).
            idle = next(
                (m for m, b in self._breakers.items() if not b.is_open and not b.failures), None
            )
            del self._breakers[idle if idle is not None else next(iter(self._breakers))]
        self._breakers[model] = breaker
        return breaker

    def would_admit(self, model: str, client: str | None = None) -> bool:
        """Whether ``model``'s circuit would let a request through now (none made: yes)."""
        breaker = self._breakers.get(model)
        return breaker is None or breaker.would_admit(client)

    def is_open(self, model: str) -> bool:
        """Whether ``model``'s circuit is not closed (no circuit made: closed)."""
        breaker = self._breakers.get(model)
        return breaker is not None and breaker.is_open

    def open_models(self) -> dict[str, float]:
        """Models whose circuit is not closed, with the seconds left open (0: half-open)."""
        return {m: b.open_seconds() for m, b in self._breakers.items() if b.is_open}


@dataclass(slots=True)
class Admission:
    """An attempt let through its circuits (the backend's, and its model's when it names
    one), with the probe slots it took: exactly one outcome is reported, which frees them."""

    backend: Breaker
    model: Breaker | None
    backend_ticket: int | None
    model_ticket: int | None

    def served(self, client: str | None) -> None:
        """A success: the request was served."""
        self.backend.success(client)
        if self.model is not None:
            self.model.success(client)

    def headed(self, client: str | None) -> None:
        """A 2xx head came: a probe this attempt holds has succeeded now, not only once the
        body is in (a slow answer must not keep the slot; a body cut later is a failure on
        probation). The slots are spent: the outcome reported later frees nothing more."""
        if self.backend_ticket is not None:
            self.backend.answered(self.backend_ticket, served=client or "")
            self.backend_ticket = None
        if self.model is not None and self.model_ticket is not None:
            self.model.answered(self.model_ticket, served=client or "")
            self.model_ticket = None

    def answered(self) -> None:
        """An answer that is not a success (a 4xx, a 429): the backend is up, the model
        proved nothing."""
        self.backend.answered(self.backend_ticket)
        if self.model is not None:
            self.model.release(self.model_ticket)

    def backend_failed(self, client: str | None) -> None:
        """No answer (connect error, timeout), a broken status or a cut body: the backend's."""
        self.backend.failure(client, self.backend_ticket)
        if self.model is not None:
            self.model.release(self.model_ticket)

    def answered_5xx(self, client: str | None) -> None:
        """A 5xx answer: the model's failure; the backend itself answered. Without a model
        (a file, a batch...) it is the backend's."""
        if self.model is None:
            self.backend.failure(client, self.backend_ticket)
            return
        self.model.failure(client, self.model_ticket)
        self.backend.answered(self.backend_ticket)

    def released(self) -> None:
        """No verdict (the client left, a key cooling down, a redirect)."""
        self.backend.release(self.backend_ticket)
        if self.model is not None:
            self.model.release(self.model_ticket)


def admit(backend: Breaker, model: Breaker | None, client: str | None) -> float | Admission:
    """Through ``backend``'s circuit, then ``model``'s: the wait (seconds) when either is
    open, else the ``Admission`` holding whatever probe slots were taken."""
    probing = backend.is_open
    wait = backend.admit(client)
    if wait:
        return wait
    backend_ticket = backend.probe_ticket if probing else None
    model_ticket = None
    if model is not None:
        probing = model.is_open
        wait = model.admit(client)
        if wait:
            backend.release(backend_ticket, hold=False)  # handed back unused
            return wait
        model_ticket = model.probe_ticket if probing else None
    return Admission(backend, model, backend_ticket, model_ticket)


def _bounded(value: float, default: float, cap: float) -> float:
    if not math.isfinite(value) or value <= 0:
        return default
    return min(value, cap)
