"""The runtime snapshot: everything a request needs, built once from one config.

A request takes the current snapshot at its start and uses only that, so a config reload
(a new snapshot, one reference swapped) never changes a request half-way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config import Config
from proxy.keys import KeyPool, build_pools
from proxy.routing import Router
from proxy.upstream import Upstream

log = logging.getLogger("proxy")


@dataclass(frozen=True)
class Runtime:
    config: Config
    router: Router
    pools: Mapping[str, KeyPool]
    upstreams: Mapping[str, Upstream]

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()

    def report(self) -> None:
        """Say at start-up which backends can serve and which need a key set."""
        for name, backend in self.config.backends.items():
            pool = self.pools[name]
            if pool.usable:
                ids = ", ".join(k.id for k in pool.usable)
                log.info("backend %s: %s, usable keys: %s", name, backend.base_url, ids)
            else:
                log.warning(
                    "backend %s: %s, NO usable key (%s): requests routed here get 503",
                    name,
                    backend.base_url,
                    pool.missing_hint(),
                )


def build_runtime(config: Config) -> Runtime:
    return Runtime(
        config=config,
        router=Router(config),
        pools=build_pools(config.backends),
        upstreams={name: Upstream(b) for name, b in config.backends.items()},
    )
