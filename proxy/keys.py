"""Per-backend key pools: round-robin over the usable keys, key health, and hints.

A key is usable when it has a value (an unset ``${VAR}`` leaves it missing), the upstream
has not refused it, and it is not cooling down after a 429. A refusal (a 401, or a 403
about the key) only makes the key a suspect: it is ``invalid`` once a confirming probe with
that key alone (``GET /models``) is refused too, until a background probe succeeds. Probes
are bounded per key: one in flight, with a deadline, and at most one per
``CONFIRM_INTERVAL`` (``begin_confirm``), so no client can make the proxy hammer the
upstream or take a key out by itself. The pool only ever hands out ``KeyConfig`` objects;
callers log and return ``key.id``, never ``key.value``.

A 429 is attributed to the client whose request got it. With several tenants it cools the
key down for that client only (its next requests try another key, or wait): one client's
429 (a request over a per-minute token budget, a burst of its own) must not make the key
unusable for everybody. The key cools down for everyone once a second client is limited by
it before the key served anyone again: then its quota really is spent, and the upstream is
not hammered. An open proxy, or one client, is one tenant: a 429 cools the key down at once.
Per-client cooldowns are this replica's (another replica learns the key-wide ones).

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
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.balance import key_order
from proxy.config import BackendConfig, KeyConfig

log = logging.getLogger("proxy.keys")

_COOLDOWN_BASE = 1.0  # a 429 without retry-after: 1 s, 2 s, 4 s ... while it repeats
_COOLDOWN_MAX = 60.0  # ...up to this (or the backend's max_cooldown, when smaller)
INVALID_MAX = 24 * 3600.0  # an invalid key nobody re-validated is tried again after a day
CONFIRM_TIMEOUT = 10.0  # a confirming probe's deadline (its slot frees by time alone)
CONFIRM_INTERVAL = 10.0  # at most one confirming probe per key this often
MAX_CLIENT_COOLDOWNS = 1024  # per key: clients come from the config, this is a backstop


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
    # With several tenants: the clients this key limited (pool clock: until when, and when
    # the 429 came), one per configured client; when it last served anyone.
    client_until: dict[str, tuple[float, float]] = field(default_factory=dict)
    served_at: float = 0.0
    confirm_free_at: float = 0.0  # pool clock: no confirming probe of this key before it


class KeyPool:
    def __init__(
        self,
        backend: BackendConfig,
        clock: Callable[[], float] = time.monotonic,
        multi_tenant: bool = False,
    ) -> None:
        self.backend = backend.name
        self.multi_tenant = multi_tenant  # a 429 is its client's until a second client's
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
        self,
        pinned: str | None = None,
        exclude: Collection[str] = (),
        session: str | None = None,
        client: str | None = None,
    ) -> KeyConfig:
        """The next key usable for ``client``: round robin, or for a ``session`` the first
        usable in its rendezvous order (the same on every replica: its prompt cache stays
        with it)."""
        now = self._clock()
        if pinned is not None:
            candidates: tuple[KeyConfig, ...] = (self._by_id[pinned],)
        else:
            candidates = self.keys
        count = len(candidates)
        if session is not None and count > 1:
            for key_id in key_order(session, self._ids):
                if key_id not in exclude and self._usable(key_id, now, client):
                    self.health[key_id].last_used = time.time()
                    return self._by_id[key_id]
            raise self._no_usable_key(candidates, now, client)
        for offset in range(count):
            index = (self._next + offset) % count
            key = candidates[index]
            if key.id not in exclude and self._usable(key.id, now, client):
                if pinned is None:
                    self._next = index + 1
                self.health[key.id].last_used = time.time()
                return key
        raise self._no_usable_key(candidates, now, client)

    def states(self) -> list[tuple[KeyConfig, bool]]:
        now = self._clock()
        return [(k, self._usable(k.id, now)) for k in self.keys]

    def has_usable(self, pinned: str | None = None, client: str | None = None) -> bool:
        ids = (pinned,) if pinned is not None else self._ids
        health = self.health
        for key_id in ids:  # the common case, with no clock read: a key ok for everyone
            entry = health[key_id]
            if entry.state is KeyState.OK and not entry.client_until:
                return True
        now = self._clock()
        return any(self._usable(key_id, now, client) for key_id in ids)

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

    def _usable(self, key_id: str, now: float, client: str | None = None) -> bool:
        health = self.health[key_id]
        state = self._current(health, now)
        if state is not health.state:  # its time is over: write it down once
            health.state = state
        if state is not KeyState.OK:
            return False
        return client is None or self._client_wait(health, client, now) == 0.0

    @staticmethod
    def _client_wait(health: KeyHealth, client: str | None, now: float) -> float:
        """Seconds ``client`` still waits for this key after its own 429 (0: none)."""
        if client is None or not health.client_until:
            return 0.0
        entry = health.client_until.get(client)
        if entry is None:
            return 0.0
        until = entry[0]
        if now >= until:
            del health.client_until[client]
            return 0.0
        return until - now

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
                health.client_until = {
                    client: (min(until, latest), at)
                    for client, (until, at) in health.client_until.items()
                }
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

    def cool_down(
        self, key_id: str, seconds: float | None, reason: str, client: str | None = None
    ) -> None:
        """A 429 (to ``client``'s request): out of rotation for ``seconds`` (the upstream's
        retry-after) or, when that is absent, not a finite non-negative number, 1 s, 2 s,
        4 s ... while 429s repeat; never longer than the backend's ``max_cooldown``. With
        several tenants, for that client only until a second client is limited too."""
        health = self.health[key_id]
        if health.state is KeyState.MISSING:
            return
        now = self._clock()
        # One client's 429s leave the key's streak alone: else a burst of them would make
        # the first 429 of another client a long cooldown for everyone.
        own = self.multi_tenant and client is not None and not self._spent(health, client, now)
        if not own:
            health.cooldown_streak = min(health.cooldown_streak + 1, 64)
        if seconds is None or not math.isfinite(seconds) or seconds < 0:
            seconds = _COOLDOWN_BASE * 2.0 ** max(0, health.cooldown_streak - 1)
            seconds = min(seconds, _COOLDOWN_MAX)
        seconds = min(seconds, self.max_cooldown)
        health.last_error = reason
        if self._current(health, now) is KeyState.INVALID:
            return  # refused outright: a cooldown would only hide that
        if own and client is not None:
            self._cool_for(health, client, now, seconds)
            return
        health.state = KeyState.COOLDOWN
        health.cooldown_until = now + seconds

    @staticmethod
    def _spent(health: KeyHealth, client: str, now: float) -> bool:
        """Whether another client is still cooling down after a 429 this key gave it since
        it last served anyone: two clients limited, so the quota is everyone's."""
        return any(
            other != client and until > now and at > health.served_at
            for other, (until, at) in health.client_until.items()
        )

    @staticmethod
    def _cool_for(health: KeyHealth, client: str, now: float, seconds: float) -> None:
        cooling = health.client_until
        if client not in cooling and len(cooling) >= MAX_CLIENT_COOLDOWNS:
            for other in [c for c, (until, _) in cooling.items() if until <= now]:
                del cooling[other]
            if len(cooling) >= MAX_CLIENT_COOLDOWNS:
                return  # a backstop: clients come from the config
        cooling[client] = (now + seconds, now)

    def mark_success(self, key_id: str) -> None:
        """The key served a request: the 429s before say nothing about everyone's quota."""
        health = self.health[key_id]
        if health.cooldown_streak:
            health.cooldown_streak = 0
        if health.client_until:
            health.served_at = self._clock()

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

    def _no_usable_key(
        self, candidates: tuple[KeyConfig, ...], now: float, client: str | None = None
    ) -> NoUsableKey:
        waits = (self._wait(k.id, now, client) for k in candidates)
        cooling = [min(wait, self.max_cooldown) for wait in waits if wait > 0.0]
        retry_after = min(cooling) if cooling else None
        if not candidates:
            return NoUsableKey(self.backend, "no keys are configured")
        return NoUsableKey(self.backend, self._describe(candidates, now, client), retry_after)

    def _wait(self, key_id: str, now: float, client: str | None) -> float:
        """Seconds until a key that is only cooling down (for everyone, or after the
        client's own 429) serves ``client`` again; 0 for one that is not cooling down."""
        health = self.health[key_id]
        state = self._current(health, now)
        if state is KeyState.COOLDOWN:
            return max(0.0, health.cooldown_until - now)
        return self._client_wait(health, client, now) if state is KeyState.OK else 0.0

    def _describe(self, keys: tuple[KeyConfig, ...], now: float, client: str | None = None) -> str:
        if not keys:
            return "no keys are configured"
        return "; ".join(f"key '{k.id}' is {self._state_text(k, now, client)}" for k in keys)

    def _state_text(self, key: KeyConfig, now: float, client: str | None = None) -> str:
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
        wait = self._client_wait(health, client, now)
        if wait > 0.0:
            return (
                f"cooling down for {wait:.0f} s after a 429 to your request ({health.last_error})"
            )
        return "usable"


def build_pools(
    backends: Mapping[str, BackendConfig], multi_tenant: bool = False
) -> dict[str, KeyPool]:
    return {name: KeyPool(backend, multi_tenant=multi_tenant) for name, backend in backends.items()}
