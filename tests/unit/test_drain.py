"""``proxy.drain`` in-process: the deadline's bounds in the config, and the drain's order
(wait for the requests in flight, end those left, then hand over to uvicorn)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from proxy.config import ConfigError, parse_config
from proxy.drain import DRAINED, Drain, Phase

BASE = "backends:\n  a: {base_url: 'http://127.0.0.1:1/v1', keys: [{id: k, key: sk-x}]}\n"


def drain_timeout(value: str) -> float:
    text = f"server: {{drain_timeout: {value}}}\n{BASE}"
    return parse_config(text, "c.yaml", {}).server.drain_timeout


def test_drain_timeout_defaults_to_30_s_takes_durations_and_is_capped() -> None:
    assert parse_config(BASE, "c.yaml", {}).server.drain_timeout == 30.0
    assert drain_timeout("2m") == 120.0
    assert drain_timeout("3600") == 3600.0
    for bad in ("0", "3601", "-1"):
        with pytest.raises(ConfigError):
            drain_timeout(bad)


def run_drain(timeout: float, work: float) -> tuple[list[str], Drain]:
    """A drain with one request of ``work`` seconds in flight: what happened, in order."""
    events: list[str] = []
    drain = Drain()

    async def scenario() -> None:
        async def request() -> None:
            try:
                await asyncio.sleep(work)
                events.append("finished")
            except asyncio.CancelledError as exc:
                events.append(f"cancelled:{exc.args[0] if exc.args else ''}")
                raise

        task = asyncio.create_task(request())
        drain.tasks.add(task)
        task.add_done_callback(drain.tasks.discard)
        drain.timeout = timeout
        drain._previous[signal.SIGTERM] = lambda sig, frame: events.append("uvicorn")
        drain.phase = Phase.DRAINING
        await drain.run(signal.SIGTERM)

    asyncio.run(scenario())
    return events, drain


def test_the_drain_hands_over_as_soon_as_the_last_request_ends() -> None:
    events, drain = run_drain(timeout=5, work=0.1)
    assert events == ["finished", "uvicorn"]
    assert drain.phase is Phase.DRAINING  # never expired: nothing was ended


def test_at_the_deadline_what_is_left_is_cancelled_with_drained_then_handed_over() -> None:
    events, drain = run_drain(timeout=0.1, work=5)
    assert events == [f"cancelled:{DRAINED}", "uvicorn"]
    assert drain.expired
