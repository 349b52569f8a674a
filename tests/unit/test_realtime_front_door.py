"""WebSocket upgrades through the guarded HTTP protocol: handed over with no HTTP timer left
behind, and refused where only probes are served (the WebSocket protocol would otherwise run
the app itself, past the reserve's wrapper)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from proxy.server import FrontDoor, GuardedHttpToolsProtocol, Limits
from tests.unit.test_front_door_protocol import FakeTransport, VirtualClockLoop

UPGRADE = (
    b"GET /v1/realtime?model=m HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


class SwappableTransport(FakeTransport):
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]


async def accepting_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "websocket"
    await receive()
    await send({"type": "websocket.accept"})
    await receive()  # holds the session open until the socket ends


def connect(already_open: int) -> tuple[VirtualClockLoop, SwappableTransport]:
    loop = VirtualClockLoop()
    config = Config(accepting_app, lifespan="off", ws="websockets-sansio")
    config.load()
    door = FrontDoor(Limits(1024, 1.0, 2.0, max_connections=4), clock=loop.time)
    state = ServerState()
    state.connections.update(object() for _ in range(already_open))  # type: ignore[misc]
    protocol = functools.partial(GuardedHttpToolsProtocol, front_door=door)(
        config=config, server_state=state, app_state={}, _loop=loop
    )
    transport = SwappableTransport(loop)
    transport.protocol = protocol
    protocol.connection_made(transport)

    async def feed() -> None:  # in the loop: the WebSocket protocol takes the running loop
        protocol.data_received(UPGRADE)

    loop.run_until_complete(feed())
    return loop, transport


def run_for(loop: VirtualClockLoop, seconds: float) -> None:
    for _ in range(int(seconds / 0.25)):
        loop.now += 0.25
        for _ in range(4):
            loop.run_until_complete(asyncio.sleep(0))


def test_an_upgraded_connection_outlives_every_http_timeout() -> None:
    loop, transport = connect(already_open=0)
    run_for(loop, 30)  # header (1 s), body (2 s) and keep-alive (5 s) timeouts long past
    assert transport.written.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"408" not in transport.written
    assert not transport.closing
    assert type(transport.protocol).__name__ == "WebSocketsSansIOProtocol"
    transport.close()
    run_for(loop, 1)
    loop.close()


def test_a_connection_in_the_probe_reserve_cannot_upgrade() -> None:
    loop, transport = connect(already_open=10)  # over the cap of 4: probes only
    run_for(loop, 1)
    assert transport.written.startswith(b"HTTP/1.1 503 ")
    assert b"too_many_connections" in transport.written
    assert transport.closing
    assert isinstance(transport.protocol, GuardedHttpToolsProtocol)  # never handed over
    loop.close()
