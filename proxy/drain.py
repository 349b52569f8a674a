"""Graceful shutdown: SIGTERM (or SIGINT) drains the process before uvicorn stops it.

Without this, uvicorn closes its listeners at the signal and waits up to its own timeout
for the requests in flight, then cancels them: a 10-minute stream was cut silently, and a
readiness probe saw a refused connection, not an answer. With it, per process (each worker
of ``--workers N`` gets the signal from the supervisor and drains on its own):

1. at the signal, ``/ready`` answers 503 (the readiness probe takes the pod out of the
   endpoints), ``/health`` stays 200, and the listeners stay open;
2. a new request on ``/v1/`` is refused with a 503 in its dialect's shape, with
   ``Retry-After: 1`` and ``connection: close``. Why refuse rather than serve: by then the
   preStop sleep has let the endpoints drop this pod, so what still arrives comes from a
   stale keep-alive connection or a late balancer; a request served now could outlast the
   deadline and be cut half-way, while a 503 with Retry-After is retried by the SDKs (and
   by nginx's ``proxy_next_upstream``) on a pod that will finish it;
3. the requests in flight get up to ``server.drain_timeout`` seconds; the process exits as
   soon as the last one ends;
4. at the deadline the ones left are cancelled with ``DRAINED``: a stream ends with its
   dialect's error event (``code: server_shutting_down``), a request with no answer yet
   gets that 503, and the access log says ``error=drained``; a Realtime session gets
   uvicorn's close frame 1012 (service restart) when uvicorn then shuts down.

A second signal during the drain ends it at once (the deadline is now).

Cost on the hot path: a set add and discard per request (the tasks to cancel at the
deadline), and one attribute check.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from collections.abc import Callable, Set
from types import FrameType
from typing import Any

from proxy import metrics

log = logging.getLogger("proxy.drain")

DRAINED = "drained"  # the cancel message of the deadline, and the access log's error
CUT_GRACE = 2.0  # after the deadline: time for the cancelled requests to write their end
POLL = 0.05  # how often the drain looks whether the last request has ended
SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], Any]


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # refusing new requests, waiting for those in flight
    EXPIRED = "expired"  # the deadline passed: those left are being ended


class Drain:
    """The drain of one process: its phase and the request tasks in flight."""

    def __init__(self) -> None:
        self.phase = Phase.SERVING
        self.tasks: set[asyncio.Task[Any]] = set()  # HTTP requests: cancelled at the deadline
        self.sessions: set[asyncio.Task[Any]] = set()  # Realtime: uvicorn's 1012 ends them
        self.timeout = 30.0
        self._configured: Callable[[], float] | None = None  # the config in force at the signal
        self._previous: dict[int, Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()

    @property
    def draining(self) -> bool:
        return self.phase is not Phase.SERVING

    @property
    def expired(self) -> bool:
        return self.phase is Phase.EXPIRED

    def install(self, timeout: Callable[[], float]) -> None:
        """Take SIGTERM and SIGINT over from uvicorn (called in the lifespan's start-up,
        after uvicorn installed its handlers): uvicorn's handler runs after the drain.
        ``timeout`` is read at the signal, so a reloaded ``drain_timeout`` counts."""
        self._configured = timeout
        self._loop = asyncio.get_running_loop()
        self._hurry = asyncio.Event()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if callable(previous):
                self._previous[sig] = previous
                signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._hand_over(sig, frame)
            return
        loop.call_soon_threadsafe(self._start, sig)

    def _start(self, sig: int) -> None:
        if self._run is not None:
            log.warning("signal %d during the drain: ending it now", sig)
            self._hurry.set()
            return
        self.phase = Phase.DRAINING
        if self._configured is not None:
            self.timeout = self._configured()
        self._run = asyncio.ensure_future(self.run(sig))

    async def run(self, sig: int) -> None:
        started = time.monotonic()
        log.info(
            "signal %d: draining (/ready 503, new requests 503) %d request(s) in flight, "
            "up to %g s (server.drain_timeout)",
            sig,
            len(self.tasks) + len(self.sessions),
            self.timeout,
        )
        await self._until_idle(started + self.timeout, self.sessions)
        left = len(self.tasks) + len(self.sessions)
        if left:
            self.phase = Phase.EXPIRED
            log.warning(
                "drain deadline: ending %d request(s) and %d Realtime session(s) in flight",
                len(self.tasks),
                len(self.sessions),
            )
            metrics.drained(left)
            for task in list(self.tasks):
                task.cancel(DRAINED)
            self._hurry.clear()
            await self._until_idle(time.monotonic() + CUT_GRACE)
        log.info(
            "drained in %.1f s (%d ended at the deadline): exiting",
            time.monotonic() - started,
            left,
        )
        self._hand_over(sig, None)

    async def _until_idle(
        self, deadline: float, also: Set[asyncio.Task[Any]] = frozenset()
    ) -> None:
        while (self.tasks or also) and not self._hurry.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), POLL)

    def _hand_over(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous.get(sig)
        if previous is None:
            return
        previous(sig, frame)  # uvicorn's: stop, close the WebSockets with 1012, exit
        # uvicorn raises the signal again once stopped, so the process dies of it (exit
        # -15). Drained on purpose, the process exits 0: the shutdown was clean.
        captured = getattr(getattr(previous, "__self__", None), "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


DRAIN = Drain()  # per process


def cancelled_by_drain(exc: asyncio.CancelledError) -> bool:
    """The cancellation is the drain's deadline (not the client leaving, not shutdown)."""
    return DRAIN.expired and DRAINED in exc.args
