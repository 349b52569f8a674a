"""The guarded protocol on a virtual clock: whatever bytes arrive, in whatever pieces, a
connection never holds more than the head limit of an unfinished head, answers only with
statuses the docs name, and is closed once the client goes quiet long enough."""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from uvicorn.config import Config
from uvicorn.server import ServerState

from proxy.server import LINGER_SECONDS, FrontDoor, GuardedHttpToolsProtocol, Limits

HEAD_LIMIT = 256
HEAD_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
KEEP_ALIVE = 5  # uvicorn's default, kept for idle connections
QUIET = HEAD_TIMEOUT + BODY_TIMEOUT + KEEP_ALIVE + LINGER_SECONDS + 1
STATUSES = {200, 400, 408, 431}


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """Timers run on ``now``, which only the test moves."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def next_timer(self) -> float | None:
        """When the earliest live timer is due (asyncio keeps them in ``_scheduled``)."""
        due = [h.when() for h in self._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return min(due, default=None)


class FakeTransport(asyncio.Transport):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self.loop = loop
        self.protocol: asyncio.Protocol | None = None
        self.written = bytearray()
        self.closing = False
        self.eof_written = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written, "a write after the answer that ends the connection"
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            assert self.protocol is not None
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body, then answers 200: the app never holds a connection itself."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            break
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def head(pad: int) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"


def sized(body: bytes, sent: int) -> bytes:
    return b"POST /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:sent]


def chunked(chunks: int, finished: bool) -> bytes:
    return (
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3\r\nabc\r\n" * chunks
        + (b"0\r\n\r\n" if finished else b"")
    )


requests = st.one_of(
    st.integers(0, 2 * HEAD_LIMIT).map(head),
    st.builds(sized, st.binary(max_size=64), st.integers(0, 64)),
    st.builds(chunked, st.integers(0, 5), st.booleans()),
    st.just(b"\x00NOT HTTP\r\n\r\n"),
)


class ProtocolMachine(RuleBasedStateMachine):
    @initialize(stream=st.lists(requests, min_size=1, max_size=4).map(b"".join))
    def connect(self, stream: bytes) -> None:
        self.loop = VirtualClockLoop()
        config = Config(echo_app, lifespan="off", timeout_keep_alive=KEEP_ALIVE)
        config.load()
        door = FrontDoor(Limits(HEAD_LIMIT, HEAD_TIMEOUT, BODY_TIMEOUT, 100))
        factory = functools.partial(GuardedHttpToolsProtocol, front_door=door)
        self.protocol = factory(
            config=config, server_state=ServerState(), app_state={}, _loop=self.loop
        )
        self.transport = FakeTransport(self.loop)
        self.transport.protocol = self.protocol
        self.protocol.connection_made(self.transport)
        self.pending = stream

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            if not self.transport.closing:
                self.transport.close()
            self.settle()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.settle()
            self.loop.close()

    def settle(self) -> None:
        for _ in range(6):
            self.loop.run_until_complete(asyncio.sleep(0))

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` on, stopping at each timer due on the way: in virtual
        time nothing but a timer can happen, so every timeout fires at its exact moment
        (stepping in small increments and settling after each one did the same, 40 times
        slower)."""
        target = self.loop.now + seconds
        for _ in range(1000):  # a timer re-arming itself at "now" forever is a bug
            due = self.loop.next_timer()
            if due is None or due > target:
                self.loop.now = target
                self.settle()
                return
            self.loop.now = max(self.loop.now, due)
            self.settle()
        raise AssertionError("timers kept firing without the clock moving on")

    @precondition(lambda self: self.pending and not self.transport.closing)
    @rule(size=st.integers(1, 600))
    def client_sends(self, size: int) -> None:
        piece, self.pending = self.pending[:size], self.pending[size:]
        self.protocol.data_received(piece)
        self.settle()

    @rule(seconds=st.floats(0, 3))
    def time_passes(self, seconds: float) -> None:
        self.advance(seconds)

    @rule()
    def client_goes_quiet(self) -> None:
        self.pending = b""
        self.advance(QUIET)
        assert self.transport.closing, "a connection outlived every timeout"

    @invariant()
    def unfinished_head_is_bounded(self) -> None:
        if hasattr(self, "protocol"):
            assert self.protocol.head_bytes <= HEAD_LIMIT

    @invariant()
    def only_documented_answers(self) -> None:
        if hasattr(self, "transport"):
            statuses = {int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", self.transport.written)}
            assert statuses <= STATUSES, statuses


TestProtocolMachine = ProtocolMachine.TestCase
TestProtocolMachine.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)


def _run(machine_steps: list[tuple[str, Any]]) -> FakeTransport:
    """A fixed scenario, for the cases worth naming."""
    machine = ProtocolMachine()
    machine.connect(stream=b"")
    for action, arg in machine_steps:
        if action == "send":
            machine.protocol.data_received(arg)
            machine.settle()
        else:
            machine.advance(arg)
    transport = machine.transport
    machine.teardown()
    return transport


def test_an_oversized_head_is_refused_with_431_without_waiting():
    transport = _run([("send", head(2 * HEAD_LIMIT))])
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    assert transport.eof_written


def test_a_slow_head_is_refused_with_408_at_the_header_timeout():
    transport = _run([("send", b"GET / HTTP/1.1\r\n"), ("wait", HEAD_TIMEOUT - 0.3)])
    assert transport.written == b""
    transport = _run([("send", b"GET / HTTP/1.1\r\n"), ("wait", HEAD_TIMEOUT + 0.3)])
    assert transport.written.startswith(b"HTTP/1.1 408 ")


def test_an_unfinished_body_is_refused_with_408_at_the_body_timeout():
    transport = _run([("send", chunked(2, finished=False)), ("wait", BODY_TIMEOUT - 0.3)])
    assert transport.written == b""
    transport = _run([("send", chunked(2, finished=False)), ("wait", BODY_TIMEOUT + 0.3)])
    assert transport.written.startswith(b"HTTP/1.1 408 ")
