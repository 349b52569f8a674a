"""Per-backend key pools: round-robin over the usable keys, key health, and hints.

A key is usable when it has a value (an unset ``${VAR}`` leaves it missing), the upstream
has not refused it (401/403 make it ``invalid`` until a background probe succeeds), and it
is not cooling down after a 429. The pool only ever hands out ``KeyConfig`` objects;
callers log and return ``key.id``, never ``key.value``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from proxy.config import BackendConfig, KeyConfig

log = logging.getLogger("proxy.keys")

_COOLDOWN_BASE = 1.0  # a 429 without retry-after: 1 s, 2 s, 4 s ... while it repeats
_COOLDOWN_MAX = 60.0


class NoUsableKey(Exception):
    """No key can serve the request; ``hint`` says why and what the operator can do."""

    def __init__(self, backend: str, hint: str, retry_after: float | None = None) -> None:
        super().__init__(hint)
        self.backend = backend
        self.hint = hint
        self.retry_after = retry_after  # set when keys are only cooling down: try again then


@dataclass(slots=True)
class KeyHealth:
    state: str = "ok"  # ok | missing | invalid | cooldown
    last_error: str | None = None
    last_used: float | None = None  # wall-clock time, for /admin
    cooldown_until: float = 0.0  # monotonic
    cooldown_streak: int = 0


class KeyPool:
    def __init__(self, backend: BackendConfig) -> None:
        self.backend = backend.name
        self.keys: tuple[KeyConfig, ...] = backend.keys
        self._by_id = {k.id: k for k in backend.keys}
        self.health = {k.id: KeyHealth(state="ok" if k.present else "missing") for k in self.keys}
        self._next = 0

    # ------------------------------------------------------------ picking

    def pick(self, pinned: str | None = None, exclude: Collection[str] = ()) -> KeyConfig:
        now = time.monotonic()
        if pinned is not None:
            candidates: tuple[KeyConfig, ...] = (self._by_id[pinned],)
        else:
            candidates = self.keys
        count = len(candidates)
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
        now = time.monotonic()
        return [(k, self._usable(k.id, now)) for k in self.keys]

    def usable(self) -> list[KeyConfig]:
        now = time.monotonic()
        return [k for k in self.keys if self._usable(k.id, now)]

    def _usable(self, key_id: str, now: float) -> bool:
        health = self.health[key_id]
        if health.state == "ok":
            return True
        if health.state == "cooldown" and now >= health.cooldown_until:
            health.state = "ok"
            return True
        return False

    def adopt_health(self, previous: KeyPool) -> None:
        """After a reload: keep what was learnt about keys whose id and value are unchanged."""
        for key in self.keys:
            before = previous._by_id.get(key.id)
            if before is not None and before.value == key.value and key.present:
                self.health[key.id] = previous.health[key.id]

    # ------------------------------------------------------------ what the upstream said

    def mark_invalid(self, key_id: str, reason: str) -> None:
        health = self.health[key_id]
        if health.state != "invalid":  # logged once, not once per request
            log.warning(
                "backend %s: key %s taken out of rotation: %s", self.backend, key_id, reason
            )
        health.state = "invalid"
        health.last_error = reason

    def cool_down(self, key_id: str, seconds: float | None, reason: str) -> None:
        health = self.health[key_id]
        health.cooldown_streak += 1
        if seconds is None:
            seconds = min(_COOLDOWN_BASE * 2 ** (health.cooldown_streak - 1), _COOLDOWN_MAX)
        health.state = "cooldown"
        health.cooldown_until = time.monotonic() + seconds
        health.last_error = reason

    def mark_success(self, key_id: str) -> None:
        health = self.health[key_id]
        if health.cooldown_streak:
            health.cooldown_streak = 0

    def restore(self, key_id: str) -> None:
        """A background probe succeeded: the key serves again."""
        health = self.health[key_id]
        if health.state == "invalid":
            log.warning("backend %s: key %s is valid again (probe succeeded)", self.backend, key_id)
        health.state = "ok"
        health.cooldown_streak = 0

    def invalid_keys(self) -> list[KeyConfig]:
        return [k for k in self.keys if self.health[k.id].state == "invalid"]

    # ------------------------------------------------------------ hints

    def missing_hint(self) -> str:
        return self._describe(self.keys, time.monotonic())

    def _no_usable_key(self, candidates: tuple[KeyConfig, ...], now: float) -> NoUsableKey:
        cooling = [
            self.health[k.id].cooldown_until - now
            for k in candidates
            if self.health[k.id].state == "cooldown"
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
        if health.state == "missing":
            if key.env_vars:
                return "missing: set " + " or ".join(key.env_vars)
            return "empty in the config"
        if health.state == "invalid":
            return f"invalid ({health.last_error})"
        if health.state == "cooldown" and health.cooldown_until > now:
            return f"cooling down for {health.cooldown_until - now:.0f} s ({health.last_error})"
        return "usable"


def build_pools(backends: Mapping[str, BackendConfig]) -> dict[str, KeyPool]:
    return {name: KeyPool(backend) for name, backend in backends.items()}
