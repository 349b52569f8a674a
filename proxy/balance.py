"""Choosing among a route's deployments: the order a request tries them in.

A route's pool is its deployments, each a (backend, model id, weight). The choosers below
are pure functions over a snapshot (weights, health, requests in flight, latency
estimates) and a random source: no I/O, no clock of their own, unit-tested as such.

- ``weighted``: a weighted random order (Efraimidis-Spirakis keys ``u ** (1 / w)``): the
  first pick is in proportion to the weights, and each failover goes to another deployment.
- ``least-busy``: fewest requests in flight first, ties by weight, then at random.
- ``latency``: power of two choices on a peak EWMA of time to first token (streams) or
  duration (non-streams), times the requests in flight plus one. A slower sample replaces
  the estimate at once, up to ``MAX_RISE`` times it (a deployment that turns slow loses its
  traffic within a request or two, one slow request does not push it out); a failed attempt
  is such a sample too (failing fast is not being fast); faster ones blend in over ``DECAY``
  seconds; an estimate nobody refreshed fades
  towards nought over ``IDLE_DECAY`` seconds, so a deployment that was slow is tried again
  (and, recovered, wins its traffic back gradually). A new deployment starts at
  ``NEUTRAL_LATENCY``.

Affinity: a request naming a conversation (a session key) tries the deployments in their
weighted rendezvous order for that key (score ``-w / ln(h)``, ``h`` a hash of key and
deployment in (0, 1)): shares still follow the weights, replicas agree with no shared
state, and a deployment leaving the healthy set moves only its own sessions (to the next
in their order), its return moves them back. The same hashing picks the key within a
backend's pool (``key_order``). Unhealthy deployments (an open circuit, no usable key)
are tried last, in config order: they refuse at once, with no upstream call.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from enum import StrEnum

NEUTRAL_LATENCY = 0.25  # seconds: a deployment never measured
DECAY = 10.0  # seconds over which faster samples replace a slow estimate
IDLE_DECAY = 5.0  # seconds over which an estimate nobody refreshed fades (10x: 12 s)
MAX_SAMPLE = 600.0  # seconds: a longer sample is this long (bounded state)
MAX_RISE = 4.0  # one sample raises the estimate at most this many times (or to neutral)
MAX_SESSION_KEY = 256  # characters of a session key that count


class Strategy(StrEnum):
    WEIGHTED = "weighted"
    LEAST_BUSY = "least-busy"
    LATENCY = "latency"


class Affinity(StrEnum):
    SESSION = "session"  # the request's own session key, if it names one
    CLIENT = "client"  # ... else the client's id
    NONE = "none"


class DeploymentStats:
    """What one deployment's traffic taught this process: bounded, by the config."""

    __slots__ = ("estimate", "in_flight", "measured_at", "selections")

    def __init__(self, now: float) -> None:
        self.in_flight = 0
        self.selections = 0
        self.estimate = NEUTRAL_LATENCY
        self.measured_at = now

    def take_selections(self) -> int:
        """Selections since the last call (the metrics' counter adds them up)."""
        taken, self.selections = self.selections, 0
        return taken

    def observe(self, seconds: float, now: float) -> None:
        """One latency sample, from the estimate as it has faded by now: a slower one is the
        estimate at once, up to ``MAX_RISE`` times it (one client's one slow request must
        not push everybody off a deployment), faster ones blend in over ``DECAY``."""
        if not math.isfinite(seconds) or seconds < 0:
            return
        current = self.latency(now)
        seconds = min(seconds, MAX_SAMPLE)
        if seconds >= current:
            self.estimate = min(seconds, max(current * MAX_RISE, NEUTRAL_LATENCY))
        else:
            kept = math.exp(-max(0.0, now - self.measured_at) / DECAY)
            self.estimate = current * kept + seconds * (1 - kept)
        self.measured_at = now

    def failed(self, now: float) -> None:
        """A failed attempt (an error answer, a cut stream, no answer): a penalty sample, so
        a deployment failing fast does not look fast."""
        self.observe(MAX_SAMPLE, now)

    def latency(self, now: float) -> float:
        """The estimate as of ``now``: fading while nobody refreshes it."""
        return self.estimate * math.exp(-max(0.0, now - self.measured_at) / IDLE_DECAY)


def order(
    strategy: Strategy,
    weights: Sequence[float],
    healthy: Sequence[bool],
    stats: Sequence[DeploymentStats],
    names: Sequence[str],
    session: str | None,
    rnd: random.Random,
    now: float,
) -> list[int]:
    """The indexes of the deployments in the order a request tries them."""
    up = [i for i, ok in enumerate(healthy) if ok]
    down = [i for i, ok in enumerate(healthy) if not ok]
    if session is not None:
        up.sort(key=lambda i: rendezvous_score(session, names[i], weights[i]), reverse=True)
    elif strategy is Strategy.WEIGHTED:
        up.sort(key=lambda i: rnd.random() ** (1.0 / weights[i]), reverse=True)
    elif strategy is Strategy.LEAST_BUSY:
        up.sort(key=lambda i: (stats[i].in_flight, -weights[i], rnd.random()))
    else:
        up = _two_choices(up, stats, rnd, now)
    return up + down


def _two_choices(
    up: list[int], stats: Sequence[DeploymentStats], rnd: random.Random, now: float
) -> list[int]:
    """Of two deployments at random, the cheaper first; then the rest, cheapest first."""
    count = len(up)
    if count < 2:
        return up
    cost = {i: stats[i].latency(now) * (stats[i].in_flight + 1) for i in up}
    a = int(rnd.random() * count)
    b = int(rnd.random() * (count - 1))
    b += b >= a  # two different ones
    first = up[a] if cost[up[a]] <= cost[up[b]] else up[b]
    up.remove(first)
    up.sort(key=cost.__getitem__)
    return [first, *up]


def rendezvous_score(session: str, name: str, weight: float = 1.0) -> float:
    """Weighted rendezvous: ``-w / ln(h)``, ``h`` uniform in (0, 1) from the pair's hash."""
    digest = hashlib.blake2b(f"{session}\x1f{name}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # never 0 nor 1
    return -weight / math.log(h)


def key_order(session: str, key_ids: Sequence[str]) -> list[str]:
    """A session's order of a backend's keys: the same on every replica."""
    return sorted(key_ids, key=lambda k: rendezvous_score(session, k), reverse=True)


def session_key(
    payload: object,
    headers: Sequence[tuple[bytes, bytes]],
    header_ranks: Mapping[bytes, int],
    client: str | None,
    affinity: Affinity,
) -> str | None:
    """The conversation a request belongs to, first found: the body's
    ``prompt_cache_key`` (Codex CLI), a session header (Claude Code's, Codex's), Anthropic's
    ``metadata.user_id``, the body's ``user``; under ``client`` affinity, the client's id.
    Prefixed with the client, so two clients' sessions are placed independently."""
    if affinity is Affinity.NONE:
        return None
    found: str | None = None
    if isinstance(payload, dict):
        value = payload.get("prompt_cache_key")
        if isinstance(value, str) and value:
            found = value
    if found is None and header_ranks:
        best = len(header_ranks)
        for name, value in headers:
            rank = header_ranks.get(name, best)
            if rank < best and value:
                best, found = rank, value.decode("latin-1")
    if found is None and isinstance(payload, dict):
        metadata = payload.get("metadata")
        user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
        user = payload.get("user")
        if isinstance(user_id, str) and user_id:
            found = user_id
        elif isinstance(user, str) and user:
            found = user
    if found is None and affinity is Affinity.CLIENT and client is not None:
        return f"{client}\x1f"
    if found is None:
        return None
    return f"{client or ''}\x1f{found[:MAX_SESSION_KEY]}"
