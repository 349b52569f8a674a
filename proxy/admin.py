"""``GET /admin/status``: what the proxy is doing, for an operator. Never a secret."""

from __future__ import annotations

import time
from typing import Any

from proxy.runtime import Runtime


def status(runtime: Runtime) -> dict[str, Any]:
    config = runtime.config
    now = time.monotonic()
    backends = {}
    for name, backend in config.backends.items():
        breaker = runtime.breakers[name]
        pool = runtime.pools[name]
        keys = []
        for key in backend.keys:
            health = pool.health[key.id]
            state = health.state
            if state == "cooldown" and health.cooldown_until <= now:
                state = "ok"
            keys.append(
                {
                    "id": key.id,
                    "fingerprint": key.fingerprint,
                    "state": state,
                    "cooldown_seconds": max(0.0, round(health.cooldown_until - now, 1))
                    if state == "cooldown"
                    else None,
                    "last_error": health.last_error,
                    "last_used": _iso(health.last_used),
                }
            )
        backends[name] = {
            "base_url": backend.base_url,
            "breaker": {
                "state": breaker.state,
                "consecutive_failures": breaker.failures,
                "open_seconds": round(max(0.0, breaker.open_until - now), 1)
                if breaker.is_open
                else None,
            },
            "rate_limit": backend.rate_limit,
            "models": list(backend.models),
            "keys": keys,
        }
    return {
        "config": {
            "path": config.path,
            "sha256": config.digest,
            "loaded_at": _iso(runtime.loaded_at),
        },
        "storage": config.storage.split("@")[-1],  # never a password in a Redis URL
        "backends": backends,
        "aliases": dict(config.aliases),
        "routes": [
            {
                "prefix": r.prefix,
                "backend": r.backend,
                "strip_prefix": r.strip_prefix,
                "key": r.key,
                "fallback": [{"backend": f.backend, "model": f.model} for f in r.fallback],
            }
            for r in config.routes
        ],
        "clients": [
            {"id": c.id, "rate_limit": c.rate_limit, "models": list(c.models)}
            for c in config.clients
        ],
    }


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
