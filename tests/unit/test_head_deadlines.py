"""The head deadline of upstream requests: one timer for all of a backend's requests,
telling its own cancellations from a caller's, gone when nothing waits."""

from __future__ import annotations

import asyncio

import pytest

from proxy.upstream import HeadDeadlines


async def wait(deadlines: HeadDeadlines, seconds: float, hold: float) -> str:
    task = deadlines.enter(seconds)
    try:
        await asyncio.sleep(hold)
    except asyncio.CancelledError:
        if deadlines.expired(task):
            return "timed out"
        raise
    finally:
        deadlines.leave(task)
    return "answered"


def test_a_request_past_its_deadline_times_out_and_one_within_it_does_not():
    async def main() -> tuple[str, str, bool]:
        deadlines = HeadDeadlines()
        late, early = await asyncio.gather(wait(deadlines, 0.15, 5), wait(deadlines, 5, 0.05))
        await asyncio.sleep(HeadDeadlines.TICK * 2)
        return late, early, deadlines._timer is None

    started = asyncio.run(asyncio.wait_for(main(), 3))
    assert started == ("timed out", "answered", True)  # and no timer left behind


def test_a_callers_cancel_stays_a_cancel_even_when_the_deadline_passed_too():
    async def main() -> None:
        deadlines = HeadDeadlines()
        task = asyncio.ensure_future(wait(deadlines, 0.05, 5))
        await asyncio.sleep(0.3)  # the deadline's cancel is delivered...
        assert await task == "timed out"
        other = asyncio.ensure_future(wait(deadlines, 5, 5))
        await asyncio.sleep(0.05)
        other.cancel()  # ...a caller's is not the deadline's
        with pytest.raises(asyncio.CancelledError):
            await other

    asyncio.run(asyncio.wait_for(main(), 3))
