"""Per-backend key pools: round-robin over the usable keys, or one pinned key.

A key is usable when it has a value (an unset ``${VAR}`` leaves it missing). The pool only
ever hands out ``KeyConfig`` objects; callers log and return ``key.id``, never ``key.value``.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config import BackendConfig, KeyConfig


class NoUsableKey(Exception):
    """No key can serve the request; ``hint`` says what the operator should do."""

    def __init__(self, backend: str, hint: str) -> None:
        super().__init__(hint)
        self.backend = backend
        self.hint = hint


class KeyPool:
    def __init__(self, backend: BackendConfig) -> None:
        self.backend = backend.name
        self._keys: dict[str, KeyConfig] = {k.id: k for k in backend.keys}
        self._usable: tuple[KeyConfig, ...] = tuple(k for k in backend.keys if k.present)
        self._next = 0

    @property
    def usable(self) -> tuple[KeyConfig, ...]:
        return self._usable

    def pick(self, pinned: str | None = None) -> KeyConfig:
        if pinned is not None:
            key = self._keys[pinned]  # the config validated that the id exists
            if not key.present:
                raise NoUsableKey(self.backend, f"pinned key '{key.id}' is {_missing(key)}")
            return key
        usable = self._usable
        if not usable:
            raise NoUsableKey(self.backend, self.missing_hint())
        index = self._next % len(usable)
        self._next = index + 1
        return usable[index]

    def missing_hint(self) -> str:
        keys = list(self._keys.values())
        if not keys:
            return "no keys are configured"
        return "; ".join(f"key '{k.id}' is {_missing(k)}" for k in keys)


def _missing(key: KeyConfig) -> str:
    if key.present:
        return "set"
    if key.env_vars:
        return "missing: set " + " or ".join(key.env_vars)
    return "empty in the config"


def build_pools(backends: Mapping[str, BackendConfig]) -> dict[str, KeyPool]:
    return {name: KeyPool(backend) for name, backend in backends.items()}
