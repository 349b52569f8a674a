"""The short soak (`make soak` runs the long one): nothing lost, nothing left open, no growth."""

from __future__ import annotations

import pytest

from tests.soak import run_soak


@pytest.mark.serial  # 3,000 requests at 64 concurrency against a 90 s cap, RSS growth bound
def test_short_soak_loses_nothing_and_leaves_nothing_open():
    report = run_soak(requests=3000, concurrency=64, max_seconds=90)
    assert report.sent == 3000
    assert report.lost == []
    assert report.abandoned == 375  # one in eight disconnects on purpose
    assert sum(report.answered.values()) == 3000 - 375
    assert report.answered.get(200, 0) >= 1500  # chats and streams
    assert report.streams_active_end == 0
    assert report.rss_end_mb - report.rss_after_1000_mb <= 20
