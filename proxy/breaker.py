"""Per-backend circuit breaker: stop hammering an upstream that keeps failing.

closed ──(N failures in a row)──▶ open ──(cooldown over)──▶ half-open ──(probe ok)──▶ closed
                                   ▲                            │
                                   └──(probe fails: cooldown x2)┘

Failures are connect errors, timeouts and 5xx; the cooldown doubles from ``min_open`` to
``max_open`` while the backend keeps failing and resets when a probe succeeds.
"""

from __future__ import annotations

import logging
import time

from proxy.config import BreakerConfig

log = logging.getLogger("proxy.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(self, backend: str, config: BreakerConfig) -> None:
        self.backend = backend
        self.config = config
        self.state = CLOSED
        self.failures = 0
        self.open_for = config.min_open
        self.open_until = 0.0  # monotonic
        self._probe_out = False

    def admit(self) -> float:
        """0 when a request may go upstream now; otherwise seconds until it may."""
        if self.state == CLOSED:
            return 0.0
        now = time.monotonic()
        if self.state == OPEN:
            if now < self.open_until:
                return self.open_until - now
            self.state = HALF_OPEN
            self._probe_out = False
        if self._probe_out:  # half-open: one probe at a time
            return min(1.0, self.open_for)
        self._probe_out = True
        return 0.0

    def success(self) -> None:
        if self.state != CLOSED:
            log.warning("backend %s: circuit closed again (probe succeeded)", self.backend)
            self.state = CLOSED
            self.open_for = self.config.min_open
            self._probe_out = False
        self.failures = 0

    def release(self) -> None:
        """The attempt ended with no verdict on the backend: free the probe slot."""
        if self.state == HALF_OPEN:
            self._probe_out = False

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN:
            self.open_for = min(self.open_for * 2, self.config.max_open)
            self._open()
        elif self.state == CLOSED and self.failures >= self.config.failures:
            self.open_for = self.config.min_open
            self._open()

    def force_open(self, seconds: float) -> None:
        """Another replica opened this backend's circuit: stay away here too."""
        self.state = OPEN
        self.open_until = time.monotonic() + seconds
        self._probe_out = False
        log.warning(
            "backend %s: circuit open for %.0f s (opened by another replica)", self.backend, seconds
        )

    def _open(self) -> None:
        self.state = OPEN
        self.open_until = time.monotonic() + self.open_for
        self._probe_out = False
        log.warning(
            "backend %s: circuit open for %.0f s after %d failures in a row",
            self.backend,
            self.open_for,
            self.failures,
        )

    @property
    def is_open(self) -> bool:
        return self.state != CLOSED
