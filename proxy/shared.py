"""Key health and breaker state shared between replicas, through Redis.

With ``storage: redis://...`` every replica runs ``SharedState.sync`` twice a second: what
this replica learnt since the last round (a key refused or rate limited, a circuit opened,
a key restored by its probe) is published, and what the others published is applied here.
So a 401 seen by replica A takes the key out on replica B within a second. Keys are shared
under their id *and* a hash of their value: a key given a new value starts fresh.

Every write is one atomic ``SET key value PX ms`` (the value is the wall-clock time, in ms,
the state ends; Redis forgets it soon after). Every value read back, whoever wrote it, is
validated: not a finite number, in the past or negative → ignored; too far ahead → capped
at the configured maximum (``max_cooldown``, ``max_open``) by the pool and the breaker.

Nothing here runs on the request path: requests read only local state.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping

import redis.asyncio

from proxy.breaker import OPEN, Breaker
from proxy.config import KeyConfig
from proxy.keys import KeyPool, KeyState

log = logging.getLogger("proxy.shared")

SYNC_INTERVAL = 0.5
INVALID_TTL = 24 * 3600  # a key nobody re-validates is tried again after a day
_REPUBLISH_MS = 1000  # an end time that moved by less than this is not published again
_DRIFT_MS = 60_000  # replicas' clocks may disagree, but not by more than this


class SharedState:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._known_invalid: set[str] = set()  # storage keys we believe invalid, last round
        self._published_until: dict[str, float] = {}  # storage key -> end time seen or sent

    async def sync(self, pools: Mapping[str, KeyPool], breakers: Mapping[str, Breaker]) -> None:
        names: list[str] = []
        for pool in pools.values():
            for key in pool.keys:
                if key.present:
                    base = _key_base(pool.backend, key)
                    names += [base + "/invalid", base + "/cooldown"]
        names += [_breaker_key(backend) for backend in breakers]
        if not names:
            return
        raw = await self.client.mget(names)
        remote = dict(zip(names, raw, strict=True))
        now_ms = time.time() * 1000
        for pool in pools.values():
            for key in pool.keys:
                if key.present:
                    await self._sync_key(pool, key, remote, now_ms)
        for backend, breaker in breakers.items():
            await self._sync_breaker(backend, breaker, remote, now_ms)

    async def _sync_key(
        self, pool: KeyPool, key: KeyConfig, remote: Mapping[str, object], now_ms: float
    ) -> None:
        base = _key_base(pool.backend, key)
        invalid_key = base + "/invalid"
        marked = _valid_time(remote.get(invalid_key))
        # The value is when it was marked: one in the future is nothing a replica wrote.
        remote_invalid = marked is not None and marked <= now_ms + _DRIFT_MS
        state = pool.state_of(key.id)
        local_invalid = state is KeyState.INVALID
        known = invalid_key in self._known_invalid
        if local_invalid and not known:  # learnt here: tell the others
            await self._set(invalid_key, now_ms, INVALID_TTL * 1000)
            self._known_invalid.add(invalid_key)
        elif not local_invalid and known:  # restored here by its probe (or by time)
            await self.client.delete(invalid_key)
            self._known_invalid.discard(invalid_key)
        elif remote_invalid and not local_invalid:  # learnt elsewhere
            pool.mark_invalid(key.id, "refused upstream (seen by another replica)")
            self._known_invalid.add(invalid_key)
        elif local_invalid and known and not remote_invalid:  # restored elsewhere
            pool.restore(key.id)
            self._known_invalid.discard(invalid_key)

        cooldown_key = base + "/cooldown"
        if state is KeyState.COOLDOWN:
            until_ms = now_ms + pool.cooldown_left(key.id) * 1000
            if abs(self._published_until.get(cooldown_key, 0.0) - until_ms) > _REPUBLISH_MS:
                await self._set(cooldown_key, until_ms, until_ms - now_ms)
                self._published_until[cooldown_key] = until_ms
            return
        remote_until = _valid_time(remote.get(cooldown_key))
        if (
            remote_until is not None
            and remote_until > now_ms
            and remote_until != self._published_until.get(cooldown_key)
        ):
            # cool_down caps the time at the backend's max_cooldown.
            pool.cool_down(key.id, (remote_until - now_ms) / 1000, "rate limited (another replica)")
            self._published_until[cooldown_key] = remote_until

    async def _sync_breaker(
        self, backend: str, breaker: Breaker, remote: Mapping[str, object], now_ms: float
    ) -> None:
        key = _breaker_key(backend)
        if breaker.state is OPEN:
            until_ms = now_ms + breaker.open_seconds() * 1000
            if abs(self._published_until.get(key, 0.0) - until_ms) > _REPUBLISH_MS:
                await self._set(key, until_ms, until_ms - now_ms)
                self._published_until[key] = until_ms
            return
        remote_until = _valid_time(remote.get(key))
        if (
            remote_until is not None
            and remote_until > now_ms
            and remote_until != self._published_until.get(key)
        ):
            breaker.force_open((remote_until - now_ms) / 1000)  # capped at max_open there
            self._published_until[key] = remote_until

    async def _set(self, key: str, until_ms: float, ttl_ms: float) -> None:
        """One atomic write: the value and its expiry together (never clear-then-increment)."""
        await self.client.set(key, str(int(until_ms)), px=max(1, int(ttl_ms)) + 1000)


def _valid_time(raw: object) -> float | None:
    """A time (ms since the epoch) read back from Redis; None unless a finite, positive number."""
    if raw is None:
        return None
    try:
        value = float(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (UnicodeDecodeError, ValueError):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


def _breaker_key(backend: str) -> str:
    return f"shared/breaker/{backend}"


def _key_base(backend: str, key: KeyConfig) -> str:
    digest = hashlib.sha256(key.value.encode()).hexdigest()[:16]
    return f"shared/key/{backend}/{key.id}/{digest}"
