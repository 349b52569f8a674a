"""Provider quirks as data: request rewrite rules and upstream-error annotations.

"OpenAI-compatible" providers differ in small ways that break requests (temperature
ranges, renamed or refused fields). Instead of code per provider, a backend or route
declares ``request_rewrite`` in the config; this module applies it to the parsed body.
No provider name appears here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.classify import error_kinds, parse_seconds


@dataclass(frozen=True)
class RewriteRules:
    rename: tuple[tuple[str, str], ...] = ()  # (from, to)
    clamp: tuple[tuple[str, float, float], ...] = ()  # (field, low, high)
    drop: tuple[str, ...] = ()
    set: tuple[tuple[str, Any], ...] = ()  # (field, value): values are JSON scalars or lists

    def __bool__(self) -> bool:
        return bool(self.rename or self.clamp or self.drop or self.set)

    def merged(self, more: RewriteRules) -> RewriteRules:
        """These rules, then ``more`` (a route's rules on top of its backend's)."""
        return RewriteRules(
            self.rename + more.rename,
            self.clamp + more.clamp,
            self.drop + more.drop,
            self.set + more.set,
        )

    def describe(self) -> list[str]:
        lines = [f"rename {a} -> {b}" for a, b in self.rename]
        lines += [f"clamp {f} to [{lo:g}, {hi:g}]" for f, lo, hi in self.clamp]
        lines += [f"drop {f}" for f in self.drop]
        lines += [f"set {f} = {orjson.dumps(v).decode()}" for f, v in self.set]
        return lines


NO_RULES = RewriteRules()


def apply(rules: RewriteRules, payload: dict[str, Any]) -> bool:
    """Rewrite ``payload`` in place; True when anything changed."""
    changed = False
    for old, new in rules.rename:
        if old in payload:
            value = payload.pop(old)
            payload.setdefault(new, value)  # a value already under the new name wins
            changed = True
    for name, low, high in rules.clamp:
        value = payload.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            bounded = min(max(value, low), high)
            if bounded != value:
                payload[name] = int(bounded) if isinstance(value, int) else bounded
                changed = True
    for name in rules.drop:
        if name in payload:
            del payload[name]
            changed = True
    for name, value in rules.set:
        if payload.get(name, _ABSENT) != value:
            payload[name] = value
            changed = True
    return changed


_ABSENT = object()
_RETRY_IN_MESSAGE = re.compile(rb"try again (?:after|in) (\d+(?:\.\d+)?) ?s", re.IGNORECASE)


def error_annotations(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    no_retry_errors: frozenset[str],
) -> list[tuple[bytes, bytes]]:
    """Headers to add to an upstream error so SDKs retry only what can succeed.

    ``x-should-retry: false`` when the error's type or code is one the config names as
    never succeeding on retry (an exhausted balance, say); ``retry-after`` when a 429's
    message says "try again after N seconds" and the upstream sent no retry-after header.
    The body is never changed.
    """
    added: list[tuple[bytes, bytes]] = []
    names = {name for name, _ in headers}
    if no_retry_errors and error_kinds(body) & {e.lower() for e in no_retry_errors}:
        added.append((b"x-should-retry", b"false"))
    if status == 429 and b"retry-after" not in names and b"retry-after-ms" not in names:
        seconds = retry_after_in_message(body)
        if seconds is not None:
            added.append((b"retry-after", str(max(1, round(seconds))).encode()))
    return added


def retry_after_in_message(body: bytes) -> float | None:
    """The N of "try again after N seconds", as a sane, capped wait; None without one."""
    match = _RETRY_IN_MESSAGE.search(body)
    return parse_seconds(match[1]) if match else None
