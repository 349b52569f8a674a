"""Key health and breaker state shared between replicas, through the throttle storage.

With ``storage: redis://...`` every replica runs ``SharedState.sync`` twice a second: what
this replica learnt since the last round (a key refused or rate limited, a circuit opened,
a key restored by its probe) is published, and what the others published is applied here.
So a 401 seen by replica A takes the key out on replica B within a second. Keys are shared
under their id *and* a hash of their value: a key given a new value starts fresh.

Nothing here runs on the request path: requests read only local state.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping

from limits.aio.storage import Storage

from proxy.breaker import OPEN, Breaker
from proxy.config import KeyConfig
from proxy.keys import KeyPool

log = logging.getLogger("proxy.shared")

SYNC_INTERVAL = 0.5
_INVALID_TTL = 24 * 3600  # a key nobody re-validates is tried again after a day


class SharedState:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._known_invalid: set[str] = (
            set()
        )  # storage keys we believe invalid, as of the last round
        self._published_until: dict[str, int] = {}  # storage key -> the end time we published

    async def sync(self, pools: Mapping[str, KeyPool], breakers: Mapping[str, Breaker]) -> None:
        now_ms = int(time.time() * 1000)
        for pool in pools.values():
            for key in pool.keys:
                if key.present:
                    await self._sync_key(pool, key, now_ms)
        for backend, breaker in breakers.items():
            await self._sync_breaker(backend, breaker, now_ms)

    async def _sync_key(self, pool: KeyPool, key: KeyConfig, now_ms: int) -> None:
        health = pool.health[key.id]
        base = _key_base(pool.backend, key)
        invalid_key = base + "/invalid"
        remote_invalid = await self.storage.get(invalid_key) > 0
        local_invalid = health.state == "invalid"
        known = invalid_key in self._known_invalid
        if local_invalid and not known:  # learnt here: tell the others
            await self._set(invalid_key, 1, _INVALID_TTL)
            self._known_invalid.add(invalid_key)
        elif not local_invalid and known:  # restored here by its probe
            await self.storage.clear(invalid_key)
            self._known_invalid.discard(invalid_key)
        elif remote_invalid and not local_invalid:  # learnt elsewhere
            pool.mark_invalid(key.id, "refused upstream (seen by another replica)")
            self._known_invalid.add(invalid_key)
        elif not remote_invalid and local_invalid and known:  # restored elsewhere
            pool.restore(key.id)
            self._known_invalid.discard(invalid_key)

        cooldown_key = base + "/cooldown"
        if health.state == "cooldown":
            until_ms = now_ms + int((health.cooldown_until - time.monotonic()) * 1000)
            if (
                until_ms > now_ms
                and abs(self._published_until.get(cooldown_key, 0) - until_ms) > 1000
            ):
                await self._set(cooldown_key, until_ms, math.ceil((until_ms - now_ms) / 1000) + 1)
                self._published_until[cooldown_key] = until_ms
        else:
            remote_until = await self.storage.get(cooldown_key)
            if remote_until > now_ms and remote_until != self._published_until.get(cooldown_key):
                pool.cool_down(
                    key.id, (remote_until - now_ms) / 1000, "rate limited (another replica)"
                )
                self._published_until[cooldown_key] = remote_until

    async def _sync_breaker(self, backend: str, breaker: Breaker, now_ms: int) -> None:
        key = f"shared/breaker/{backend}"
        if breaker.state == OPEN:
            until_ms = now_ms + int((breaker.open_until - time.monotonic()) * 1000)
            if until_ms > now_ms and self._published_until.get(key) != until_ms:
                await self._set(key, until_ms, math.ceil((until_ms - now_ms) / 1000) + 1)
                self._published_until[key] = until_ms
            return
        remote_until = await self.storage.get(key)
        if remote_until > now_ms and remote_until != self._published_until.get(key):
            breaker.force_open((remote_until - now_ms) / 1000)
            self._published_until[key] = remote_until

    async def _set(self, key: str, value: int, expiry: int) -> None:
        await self.storage.clear(key)
        await self.storage.incr(key, expiry, amount=value)


def _key_base(backend: str, key: KeyConfig) -> str:
    digest = hashlib.sha256(key.value.encode()).hexdigest()[:16]
    return f"shared/key/{backend}/{key.id}/{digest}"
