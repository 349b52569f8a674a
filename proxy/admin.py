"""``GET /admin/status``: what the proxy is doing, for an operator. Never a secret, never a
500: whatever the state holds (a value from another replica, a nan from an upstream), every
number on the page is finite or null."""

from __future__ import annotations

import math
import time
from typing import Any

from proxy.config import RouteConfig
from proxy.redact import redact_url
from proxy.runtime import Runtime


def status(runtime: Runtime) -> dict[str, Any]:
    config = runtime.config
    backends = {}
    for name, backend in config.backends.items():
        breaker = runtime.breakers[name]
        pool = runtime.pools[name]
        keys = []
        for key in backend.keys:
            health = pool.health[key.id]
            state = pool.state_of(key.id)
            keys.append(
                {
                    "id": key.id,
                    "fingerprint": key.fingerprint,
                    "state": str(state),
                    "cooldown_seconds": _seconds(pool.cooldown_left(key.id))
                    if state == "cooldown"
                    else None,
                    "last_error": health.last_error,
                    "last_used": _iso(health.last_used),
                }
            )
        backends[name] = {
            "base_url": redact_url(backend.base_url),
            "breaker": {
                "state": str(breaker.state),
                "consecutive_failures": breaker.failures,
                "open_seconds": _seconds(breaker.open_seconds()) if breaker.is_open else None,
                # Models whose own circuit is open (their 5xx): seconds left, 0 half-open.
                "models_open": {
                    model: _seconds(left)
                    for model, left in runtime.model_circuits[name].open_models().items()
                },
            },
            "rate_limit": backend.rate_limit,
            "models": list(backend.models),
            "keys": keys,
        }
    page: dict[str, Any] = {
        "config": {
            "path": config.path,
            "sha256": config.digest,
            "loaded_at": _iso(runtime.loaded_at),
        },
        "storage": redact_url(config.storage),
        "backends": backends,
        "aliases": dict(config.aliases),
        "routes": [
            {
                "prefix": r.prefix,
                "backend": r.backend,
                "strip_prefix": r.strip_prefix,
                "key": r.key,
                "fallback": [{"backend": f.backend, "model": f.model} for f in r.fallback],
                "max_attempts": r.max_attempts,
                "affinity": r.affinity,
                **(_pool(runtime, r) if len(r.deployments) > 1 else {}),
            }
            for r in config.routes
        ],
        "clients": [
            {"id": c.id, "rate_limit": c.rate_limit, "models": list(c.models)}
            for c in config.clients
        ],
    }
    return {name: finite(value) for name, value in page.items()}


def _pool(runtime: Runtime, route: RouteConfig) -> dict[str, Any]:
    """A route's deployments with their live state: what the balancer sees now."""
    now = time.monotonic()
    deployments = []
    for d in route.deployments:
        stats = runtime.deployments[d.name]
        model = d.model or ""
        deployments.append(
            {
                "name": d.name,
                "backend": d.backend,
                "model": d.model,
                "weight": d.weight,
                "key": d.key,
                "healthy": not (
                    runtime.breakers[d.backend].is_open
                    or runtime.model_circuits[d.backend].is_open(model)
                    or not runtime.pools[d.backend].has_usable(d.key)
                ),
                "in_flight": stats.in_flight,
                "latency_seconds": round(stats.latency(now), 4),
            }
        )
    return {"strategy": route.strategy, "deployments": deployments}


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (which JSON cannot carry) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _seconds(value: float) -> float | None:
    return round(max(0.0, value), 1) if math.isfinite(value) else None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None or not math.isfinite(timestamp):
        return None
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):
        return None
