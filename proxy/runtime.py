"""The runtime snapshot: everything a request needs, built once from one config.

A request takes the current snapshot at its start and uses only that, so a config reload
(a new snapshot, one reference swapped) never changes a request half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy import metrics
from proxy.breaker import Breaker
from proxy.clients import ClientAuth
from proxy.config import BackendConfig, Config
from proxy.keys import KeyPool, build_pools
from proxy.redact import NO_SECRETS, Redactor
from proxy.routing import Router
from proxy.shared import SYNC_INTERVAL, SharedState
from proxy.throttle import Throttle, make_storage
from proxy.upstream import Upstream

log = logging.getLogger("proxy")


@dataclass(frozen=True)
class Runtime:
    config: Config
    router: Router
    auth: ClientAuth
    throttle: Throttle
    pools: Mapping[str, KeyPool]
    breakers: Mapping[str, Breaker]
    upstreams: Mapping[str, Upstream]
    redactor: Redactor = NO_SECRETS  # every configured secret, scrubbed from what we write
    loaded_at: float = field(default_factory=time.time)
    in_flight: list[int] = field(default_factory=lambda: [0])  # requests using this snapshot
    discovered: dict[str, tuple[str, ...]] = field(default_factory=dict)  # backend -> ids
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        for name, backend in self.config.backends.items():
            self._tasks.append(asyncio.create_task(self._probe_invalid_keys(name)))
            if backend.discover_models:
                self._tasks.append(asyncio.create_task(self._discover(name)))
        self._tasks.append(asyncio.create_task(self._refresh_gauges()))
        if not self.config.storage.startswith("memory://"):
            self._tasks.append(asyncio.create_task(self._share_state()))

    async def close(self) -> None:
        await self._stop_tasks()
        for upstream in self.upstreams.values():
            await upstream.close()

    async def retire(self, successor: Runtime) -> None:
        """After a reload: stop background work now; close pools the successor does not
        use once the last request that began on this snapshot has finished."""
        await self._stop_tasks()
        while self.in_flight[0] > 0:
            await asyncio.sleep(0.5)
        reused = {id(u) for u in successor.upstreams.values()}
        for upstream in self.upstreams.values():
            if id(upstream) not in reused:
                await upstream.close()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _probe_invalid_keys(self, backend: str) -> None:
        """Every ``key_probe_interval``: try each invalid key on ``GET /models``."""
        pool, upstream = self.pools[backend], self.upstreams[backend]
        interval = self.config.backends[backend].key_probe_interval
        while True:
            await asyncio.sleep(interval)
            for key in pool.invalid_keys():
                status, _ = await upstream.list_models(key.value)
                if status == 200:
                    pool.restore(key.id)

    async def _discover(self, backend: str) -> None:
        """At start and every ``discover_interval``: the backend's own model list."""
        pool, upstream = self.pools[backend], self.upstreams[backend]
        while True:
            for key in pool.usable()[:2]:  # a second key if the first one is refused
                status, ids = await upstream.list_models(key.value)
                if status == 200:
                    self.discovered[backend] = tuple(ids)
                    break
                log.warning(
                    "backend %s: model discovery with key %s got %s", backend, key.id, status
                )
            await asyncio.sleep(self.config.backends[backend].discover_interval)

    async def _share_state(self) -> None:
        """Several replicas on one Redis: exchange key and breaker state twice a second."""
        shared = SharedState(self.throttle.storage)
        while True:
            try:
                await shared.sync(self.pools, self.breakers)
            except Exception as exc:  # Redis down: local state goes on, and it is counted
                self.throttle.storage_failed(exc)
            await asyncio.sleep(SYNC_INTERVAL)

    async def _refresh_gauges(self) -> None:
        """Key and breaker gauges follow the state they report, once a second."""
        while True:
            self.publish_gauges()
            await asyncio.sleep(1.0)

    def publish_gauges(self) -> None:
        metrics.set_key_states(
            (name, key.id, usable)
            for name, pool in self.pools.items()
            for key, usable in pool.states()
        )
        metrics.set_circuit_states((name, b.is_open) for name, b in self.breakers.items())
        if self.throttle.storage_errors:
            metrics.STORAGE_ERRORS.inc(self.throttle.storage_errors)
            self.throttle.storage_errors = 0

    def report(self) -> None:
        """Say at start-up which backends can serve and which need a key set."""
        self.auth.report()
        for name, backend in self.config.backends.items():
            pool = self.pools[name]
            usable = pool.usable()
            if usable:
                ids = ", ".join(k.id for k in usable)
                log.info("backend %s: %s, usable keys: %s", name, backend.base_url, ids)
            else:
                log.warning(
                    "backend %s: %s, NO usable key (%s): requests routed here get 503",
                    name,
                    backend.base_url,
                    pool.missing_hint(),
                )


def build_runtime(config: Config, previous: Runtime | None = None) -> Runtime:
    """A snapshot for ``config``; after a reload, carrying over what is still true.

    Kept from ``previous``: connection pools of backends whose URL, timeouts and headers
    are unchanged; the health of every key whose id and value are unchanged (a key whose
    value changed starts fresh); breakers of backends whose URL is unchanged; the throttle
    storage when its URI is unchanged (backoff and limits go on counting).
    """
    old = previous.config if previous is not None else None
    storage = (
        previous.throttle.storage
        if previous is not None and old is not None and old.storage == config.storage
        else make_storage(config.storage)
    )
    pools = build_pools(config.backends)
    upstreams: dict[str, Upstream] = {}
    breakers: dict[str, Breaker] = {}
    for name, backend in config.backends.items():
        before = old.backends.get(name) if old is not None else None
        if previous is not None and before is not None:
            pools[name].adopt_health(previous.pools[name])
            if _same_connection(before, backend):
                upstreams[name] = previous.upstreams[name]
            if before.base_url == backend.base_url:
                breakers[name] = previous.breakers[name]
                breakers[name].config = backend.breaker
        upstreams.setdefault(name, Upstream(backend))
        breakers.setdefault(name, Breaker(name, backend.breaker))
    discovered = {
        name: ids
        for name, ids in (previous.discovered.items() if previous is not None else ())
        if name in config.backends and config.backends[name].discover_models
    }
    return Runtime(
        config=config,
        discovered=discovered,
        router=Router(config),
        auth=ClientAuth(config),
        throttle=Throttle(config, storage),
        pools=pools,
        breakers=breakers,
        upstreams=upstreams,
        redactor=Redactor.for_config(config),
    )


def _same_connection(a: BackendConfig, b: BackendConfig) -> bool:
    return (
        a.base_url == b.base_url and a.timeout == b.timeout and dict(a.headers) == dict(b.headers)
    )
