"""The connection cap's bookkeeping and the log formatters, without sockets."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from proxy.logfmt import JsonFormatter, TextFormatter, escape_controls
from proxy.server import FD_HEADROOM, FrontDoor, Limits, effective_cap, probe_reserve


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeConnection:
    """What FrontDoor sees of a protocol: a transport it may abort."""

    def __init__(self) -> None:
        self.transport = FakeTransport()


class CapMachine(RuleBasedStateMachine):
    """Connections open, send their head, close, in any order: the count of open sockets
    stays bounded, the cap is logged once per episode, and the episode ends once enough
    connections have closed (which every connection does, by its timeouts)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []
        handler = _ListHandler(self.records)
        self.logger = logging.getLogger("proxy.server")
        self.logger.addHandler(handler)
        self.logger.setLevel(logging.INFO)
        self.handler = handler
        self.open: list[FakeConnection] = []
        self.served: dict[FakeConnection, str] = {}

    @initialize(cap=st.integers(1, 12))
    def configure(self, cap: int) -> None:
        self.cap = cap
        self.door = FrontDoor(Limits(1024, 1.0, 1.0, cap))

    def teardown(self) -> None:
        self.logger.removeHandler(self.handler)

    @rule()
    def every_connection_closes(self) -> None:
        """What the timeouts guarantee: in the end every connection closes."""
        for conn in list(self.open):
            self._close(conn)
        assert self.door.episode_since is None

    @rule()
    def connect(self) -> None:
        conn = FakeConnection()
        self.open.append(conn)
        admission = self.door.admit(len(self.open))
        if admission == "refuse":
            self.open.remove(conn)
            self.door.released(len(self.open))
            return
        if admission == "probe":
            self.door.waiting[conn] = None  # type: ignore[index]
        self.served[conn] = admission
        self._reap_evicted()

    @precondition(lambda self: self.door.waiting)
    @rule(data=st.data())
    def head_complete(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(list(self.door.waiting)))
        del self.door.waiting[conn]

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(self.open))
        self._close(conn)

    def _close(self, conn: FakeConnection) -> None:
        self.open.remove(conn)
        self.door.waiting.pop(conn, None)  # type: ignore[call-overload]
        self.door.released(len(self.open))

    def _reap_evicted(self) -> None:
        for conn in [c for c in self.open if c.transport.aborted]:
            self._close(conn)

    @invariant()
    def open_sockets_are_bounded(self) -> None:
        assert len(self.open) <= self.cap + probe_reserve(self.cap)

    @invariant()
    def one_log_line_per_episode(self) -> None:
        reached = sum("connection cap reached" in r for r in self.records)
        ended = sum("back under the cap" in r for r in self.records)
        assert ended <= reached <= ended + 1
        assert (reached == ended + 1) == (self.door.episode_since is not None)

    @invariant()
    def an_episode_lasts_only_while_above_the_low_water(self) -> None:
        if self.door.episode_since is not None:
            assert len(self.open) > self.door.low_water

    @invariant()
    def only_waiting_probe_connections_are_evictable(self) -> None:
        for conn in self.door.waiting:
            assert self.served.get(conn) == "probe"  # type: ignore[call-overload]


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


TestCapMachine = CapMachine.TestCase
TestCapMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


def test_closing_every_connection_ends_the_episode():
    door = FrontDoor(Limits(1024, 1.0, 1.0, 4))
    assert [door.admit(n) for n in range(1, 8)] == ["serve"] * 4 + ["probe"] * 3
    assert door.episode_since is not None
    door.released(0)
    assert door.episode_since is None


def test_a_full_reserve_evicts_its_oldest_idle_connection_before_refusing():
    cap = 4
    door = FrontDoor(Limits(1024, 1.0, 1.0, cap))
    ceiling = cap + probe_reserve(cap)
    waiting = [FakeConnection() for _ in range(probe_reserve(cap))]
    for n, conn in enumerate(waiting, start=cap + 1):
        assert door.admit(n) == "probe"
        door.waiting[conn] = None  # type: ignore[index]
    assert door.admit(ceiling + 1) == "probe"
    assert waiting[0].transport.aborted and not waiting[1].transport.aborted
    door.waiting.clear()  # every reserve connection has sent its head: nothing to evict
    assert door.admit(ceiling + 1) == "refuse"


def test_the_cap_stays_within_the_open_file_limit():
    assert effective_cap(2048, 20000) == 2048
    small = effective_cap(2048, 1024)
    assert 2 * small + FD_HEADROOM + probe_reserve(2048) <= 1024
    assert effective_cap(2048, 10) == 1  # never zero: the proxy must still serve


# ---------------------------------------------------------------- log formats


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nFAKE 2026 INFO proxy: forged")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("proxy", logging.WARNING, __file__, 1, message, args, exc_info)


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\x1b[31m", "\x7f", "\x85", "\u2028"])
def test_text_lines_escape_control_characters(bad):
    line = TextFormatter().format(record("model %s done", f"a{bad}2026 INFO forged"))
    assert len(line.splitlines()) == 1
    assert bad not in line
    assert "model a" in line and "2026 INFO forged done" in line


def test_text_tracebacks_are_indented_so_no_line_passes_for_a_record():
    lines = TextFormatter().format(record("failed", exc=True)).splitlines()
    assert "WARNING proxy: failed" in lines[0]
    assert all(line.startswith("    ") for line in lines[1:])
    assert any("forged" in line for line in lines[1:])


def test_json_lines_are_one_object_with_the_traceback_inside():
    line = JsonFormatter().format(record("bad \n%s", "x\r\n", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "proxy"
    assert entry["message"] == "bad \nx\r\n"
    assert "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("Z")


def test_escape_controls_leaves_printable_text_alone():
    text = "kimi-k2 ünïcödé → ok"
    assert escape_controls(text) == text
    assert escape_controls("a\tb") == "a\\tb"
