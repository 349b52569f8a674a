"""Rate windows in this process's memory: a throttle without Redis decides here.

What ``limits``' three strategies decide, without its async storage layers (four
coroutines and a lock per hit: 5-10 µs a request, the largest single item of a proxied
request's own cost in profiles; this is under 1 µs). With Redis (replicas sharing their
counts) ``limits`` decides, as before. Keys come from the config (clients, backends and
their limits), so the number of windows is bounded by it; each window's state by its
limit (a moving window keeps one entry per request in it, as ``limits`` does).

- ``fixed-window``: a window opens at its first hit and lasts the limit's period; every
  hit counts, a refused one too.
- ``moving-window``: exact: at most ``amount`` in any period ending now.
- ``sliding-window-counter``: ``limits``' approximation: this period's count plus the
  last period's, weighted by how much of it still overlaps the sliding window.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

Key = tuple[str, str, int, float]  # kind, name, amount, period


class Windows:
    """One strategy's windows; ``hit`` counts and decides."""

    def __init__(self, strategy: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.strategy = strategy
        self._clock = clock
        self._fixed: dict[Key, list[float]] = {}  # [count, ends at]
        self._moving: dict[Key, tuple[deque[tuple[float, int]], list[int]]] = {}
        self._sliding: dict[Key, list[float]] = {}  # [period index, current, previous]
        self._decide = {
            "fixed-window": self._fixed_hit,
            "moving-window": self._moving_hit,
            "sliding-window-counter": self._sliding_hit,
        }[strategy]

    def hit(self, key: Key, cost: int = 1) -> float | None:
        """Count ``cost`` against the window of ``key``: None when allowed; else the
        seconds until it would be."""
        return self._decide(key, cost, self._clock())

    def _fixed_hit(self, key: Key, cost: int, now: float) -> float | None:
        amount, period = key[2], key[3]
        window = self._fixed.get(key)
        if window is None or window[1] <= now:
            window = self._fixed[key] = [0, now + period]
        window[0] += cost  # (a refused hit counts too, as in limits: the window's end is fixed)
        if window[0] > amount:
            return window[1] - now
        return None

    def _moving_hit(self, key: Key, cost: int, now: float) -> float | None:
        amount, period = key[2], key[3]
        found = self._moving.get(key)
        if found is None:
            found = self._moving[key] = (deque(), [0])
        hits, total = found
        start = now - period
        while hits and hits[0][0] <= start:  # out of the window: no longer counted
            total[0] -= hits.popleft()[1]
        if total[0] + cost > amount:
            if cost > amount or not hits:
                return period
            # When enough of the oldest have left for this one to fit.
            needed, freed = total[0] + cost - amount, 0
            for at, count in hits:
                freed += count
                if freed >= needed:
                    return max(at + period - now, 0.0)
            return period
        if hits and hits[-1][0] == now:  # one entry per instant, whatever the cost
            hits[-1] = (now, hits[-1][1] + cost)
        else:
            hits.append((now, cost))
        total[0] += cost
        return None

    def _sliding_hit(self, key: Key, cost: int, now: float) -> float | None:
        amount, period = key[2], key[3]
        index = math.floor(now / period)
        window = self._sliding.get(key)
        if window is None:
            window = self._sliding[key] = [index, 0, 0]
        elif window[0] != index:
            previous = window[1] if window[0] == index - 1 else 0
            window[0], window[1], window[2] = index, 0, previous
        into = (now / period) % 1  # how far into the current period
        previous, current = window[2], window[1]
        weighted = previous * (1 - into) + current
        if cost > amount:
            return period  # never fits: a period, and the client is told so again
        if math.floor(weighted) + cost > amount:
            room = amount - cost - current  # what the previous period's share must fall to
            if room >= 0 and previous > 0:
                fits_at = 1 - (room + 1) / previous  # floor(previous * (1 - x)) <= room
                return max(fits_at - into, 0.0) * period + 0.001
            # This period alone is full: past its end, its count weighs as the previous one.
            fits_at = max(0.0, 1 - (amount - cost + 1) / current) if current > 0 else 0.0
            return (1 - into + fits_at) * period + 0.001
        window[1] += cost
        return None

    def retain(self, keys: set[Key]) -> None:
        """Only the windows of ``keys`` (the limits the config names now): a reload that
        removes a client or changes a limit leaves nothing behind."""
        for table in (self._fixed, self._moving, self._sliding):
            for key in [k for k in table if k not in keys]:
                del table[key]
