"""Per-backend key pools: round-robin over the usable keys, key health, and hints.

A key is usable when it has a value (an unset ``${VAR}`` leaves it missing), the upstream
has not refused it, and it is not cooling down after a 429. A refusal (a 401, or a 403
about the key) only makes the key a suspect: it is ``invalid`` once a confirming probe with
that key alone (``GET /models``) is refused too, until a background probe succeeds. Probes
are bounded per key: one in flight, with a deadline, and at most one per
``CONFIRM_INTERVAL`` (``begin_confirm``), so no client can make the proxy hammer the
upstream or take a key out by itself. The pool only ever hands out ``KeyConfig`` objects;
callers log and return ``key.id``, never ``key.value``.

Every failure state leaves by time alone: ``cooldown`` lasts at most the backend's
``max_cooldown``, whatever retry-after the upstream (or another replica) sent; ``invalid``
lasts until the background probe succeeds, and at most ``INVALID_MAX`` (then the key is
tried again, and a refusal takes it out again). ``missing`` is configuration, not a failure:
it changes with the config.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

from proxy.balance import key_order
from proxy.config import BackendConfig, KeyConfig

log = logging.getLogger("proxy.keys")

_COOLDOWN_BASE = 1.0  # a 429 without retry-after: 1 s, 2 s, 4 s ... while it repeats
_COOLDOWN_MAX = 60.0  # ...up to this (or the backend's max_cooldown, when smaller)
INVALID_MAX = 24 * 3600.0  # an invalid key nobody re-validated is tried again after a day
CONFIRM_TIMEOUT = 10.0  # a confirming probe's deadline (its slot frees by time alone)
CONFIRM_INTERVAL = 10.0  # at most one confirming probe per key this often


class KeyState(StrEnum):
    OK = "ok"
    MISSING = "missing"  # no value: an unset ${VAR}
    INVALID = "invalid"  # the upstream refused it (401, or a 403 about the key)
    COOLDOWN = "cooldown"  # rate limited: unusable until cooldown_until


class NoUsableKey(Exception):
    """No key can serve the request; ``hint`` says why and what the operator can do."""

    def __init__(self, backend: str, hint: str, retry_after: float | None = None) -> None:
        super().__init__(hint)
        self.backend = backend
        self.hint = hint
        self.retry_after = retry_after  # set when keys are only cooling down: try again then


@dataclass(slots=True)
class KeyHealth:
    state: KeyState = KeyState.OK  # as last set; see KeyPool.state_of for the one in force
    last_error: str | None = None
    last_used: float | None = None  # wall-clock time, for /admin
    cooldown_until: float = 0.0  # pool clock
    invalid_until: float = 0.0  # pool clock
    cooldown_streak: int = 0
    confirm_free_at: float = 0.0  # pool clock: no confirming probe of this key before it


class KeyPool:
    def __init__(self, backend: BackendConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend.name
        self.keys: tuple[KeyConfig, ...] = backend.keys
        self._ids = tuple(key.id for key in backend.keys)
        self.max_cooldown = backend.max_cooldown
        self._clock = clock
        self._by_id = {k.id: k for k in backend.keys}
        self.health = {
            k.id: KeyHealth(state=KeyState.OK if k.present else KeyState.MISSING) for k in self.keys
        }
        self._next = 0

    # ------------------------------------------------------------ picking

    def pick(
        self, pinned: str | None = None, exclude: Collection[str] = (), session: str | None = None
    ) -> KeyConfig:
        """The next usable key: round robin, or for a ``session`` the first usable in its
        rendezvous order (the same on every replica: its prompt cache stays with it)."""
        now = self._clock()
        if pinned is not None:
            candidates: tuple[KeyConfig, ...] = (self._by_id[pinned],)
        else:
            candidates = self.keys
        count = len(candidates)
        if session is not None and count > 1:
            for key_id in key_order(session, self._ids):
                if key_id not in exclude and self._usable(key_id, now):
                    self.health[key_id].last_used = time.time()
                    return self._by_id[key_id]
            raise self._no_usable_key(candidates, now)
        for offset in range(count):
            index = (self._next + offset) % count
            key = candidates[index]
            if key.id not in exclude and self._usable(key.id, now):
                if pinned is None:
                    self._next = index + 1
                self.health[key.id].last_used = time.time()
                return key
        raise self._no_usable_key(candidates, now)

    def states(self) -> list[tuple[KeyConfig, bool]]:
        now = self._clock()
        return [(k, self._usable(k.id, now)) for k in self.keys]

    def has_usable(self, pinned: str | None = None) -> bool:
        ids = (pinned,) if pinned is not None else self._ids
        health = self.health
        for key_id in ids:  # the common case, with no clock read: a key that is ok
            if health[key_id].state is KeyState.OK:
                return True
        now = self._clock()
        return any(self._usable(key_id, now) for key_id in ids)

    def usable(self) -> list[KeyConfig]:
        now = self._clock()
        return [k for k in self.keys if self._usable(k.id, now)]

    def state_of(self, key_id: str) -> KeyState:
        """The state in force now: a cooldown or an invalid mark whose time is over is ok."""
        return self._current(self.health[key_id], self._clock())

    def cooldown_left(self, key_id: str) -> float:
        """Seconds until a cooling key is usable again; 0 when it is not cooling down."""
        health = self.health[key_id]
        if self._current(health, self._clock()) is not KeyState.COOLDOWN:
            return 0.0
        return min(max(0.0, health.cooldown_until - self._clock()), self.max_cooldown)

    def _usable(self, key_id: str, now: float) -> bool:
        health = self.health[key_id]
        state = self._current(health, now)
        if state is not health.state:  # its time is over: write it down once
            health.state = state
        return state is KeyState.OK

    @staticmethod
    def _current(health: KeyHealth, now: float) -> KeyState:
        if health.state is KeyState.COOLDOWN and now >= health.cooldown_until:
            return KeyState.OK
        if health.state is KeyState.INVALID and now >= health.invalid_until:
            return KeyState.OK
        return health.state

    def adopt_health(self, previous: KeyPool) -> None:
        """After a reload: keep what was learnt about keys whose id and value are unchanged,
        bounded by this config's ``max_cooldown``."""
        latest = self._clock() + self.max_cooldown
        for key in self.keys:
            before = previous._by_id.get(key.id)
            if before is not None and before.value == key.value and key.present:
                health = previous.health[key.id]
                health.cooldown_until = min(health.cooldown_until, latest)
                self.health[key.id] = health

    # ------------------------------------------------------------ what the upstream said

    def mark_invalid(self, key_id: str, reason: str) -> None:
        health = self.health[key_id]
        if health.state is KeyState.MISSING:
            return
        if self._current(health, self._clock()) is not KeyState.INVALID:  # logged once
            log.warning(
                "backend %s: key %s taken out of rotation: %s", self.backend, key_id, reason
            )
        health.state = KeyState.INVALID
        health.invalid_until = self._clock() + INVALID_MAX
        health.last_error = reason

    def begin_confirm(self, key_id: str) -> bool:
        """A refusal makes ``key_id`` a suspect: whether a confirming probe may start now
        (none in flight, none in the last ``CONFIRM_INTERVAL``). True takes the slot until
        ``end_confirm`` or, at the latest, the deadline plus the interval."""
        health = self.health[key_id]
        now = self._clock()
        if health.state is KeyState.MISSING or now < health.confirm_free_at:
            return False
        if self._current(health, now) is KeyState.INVALID:
            return False  # already out: the re-validation probe owns it
        health.confirm_free_at = now + CONFIRM_TIMEOUT + CONFIRM_INTERVAL
        return True

    def end_confirm(self, key_id: str) -> None:
        """The confirming probe is over (whatever it said): the next one after the interval."""
        health = self.health[key_id]
        health.confirm_free_at = min(health.confirm_free_at, self._clock() + CONFIRM_INTERVAL)

    def cool_down(self, key_id: str, seconds: float | None, reason: str) -> None:
        """A 429: out of rotation for ``seconds`` (the upstream's retry-after) or, when that is
        absent, not a finite non-negative number, 1 s, 2 s, 4 s ... while 429s repeat; never
        longer than the backend's ``max_cooldown``."""
        health = self.health[key_id]
        if health.state is KeyState.MISSING:
            return
        health.cooldown_streak = min(health.cooldown_streak + 1, 64)
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            seconds = _COOLDOWN_BASE * 2.0 ** (health.cooldown_streak - 1)
            seconds = min(seconds, _COOLDOWN_MAX)
        seconds = min(seconds, self.max_cooldown)
        health.last_error = reason
        if self._current(health, self._clock()) is KeyState.INVALID:
            return  # refused outright: a cooldown would only hide that
        health.state = KeyState.COOLDOWN
        health.cooldown_until = self._clock() + seconds

    def mark_success(self, key_id: str) -> None:
        health = self.health[key_id]
        if health.cooldown_streak:
            health.cooldown_streak = 0

    def restore(self, key_id: str) -> None:
        """A background probe succeeded: the key serves again."""
        health = self.health[key_id]
        if health.state is KeyState.MISSING:
            return
        if self._current(health, self._clock()) is KeyState.INVALID:
            log.warning("backend %s: key %s is valid again (probe succeeded)", self.backend, key_id)
        health.state = KeyState.OK
        health.cooldown_streak = 0

    def invalid_keys(self) -> list[KeyConfig]:
        now = self._clock()
        return [k for k in self.keys if self._current(self.health[k.id], now) is KeyState.INVALID]

    # ------------------------------------------------------------ hints

    def missing_hint(self) -> str:
        return self._describe(self.keys, self._clock())

    def _no_usable_key(self, candidates: tuple[KeyConfig, ...], now: float) -> NoUsableKey:
        cooling = [
            min(max(0.0, self.health[k.id].cooldown_until - now), self.max_cooldown)
            for k in candidates
            if self._current(self.health[k.id], now) is KeyState.COOLDOWN
        ]
        retry_after = min(cooling) if cooling else None
        if not candidates:
            return NoUsableKey(self.backend, "no keys are configured")
        return NoUsableKey(self.backend, self._describe(candidates, now), retry_after)

    def _describe(self, keys: tuple[KeyConfig, ...], now: float) -> str:
        if not keys:
            return "no keys are configured"
        return "; ".join(f"key '{k.id}' is {self._state_text(k, now)}" for k in keys)

    def _state_text(self, key: KeyConfig, now: float) -> str:
        health = self.health[key.id]
        state = self._current(health, now)
        if state is KeyState.MISSING:
            if key.env_vars:
                return "missing: set " + " or ".join(key.env_vars)
            return "empty in the config"
        if state is KeyState.INVALID:
            return f"invalid ({health.last_error})"
        if state is KeyState.COOLDOWN:
            return f"cooling down for {health.cooldown_until - now:.0f} s ({health.last_error})"
        return "usable"


def build_pools(backends: Mapping[str, BackendConfig]) -> dict[str, KeyPool]:
    return {name: KeyPool(backend) for name, backend in backends.items()}
