"""The front door: uvicorn with bounds on what one connection, or many, can cost.

Why a protocol subclass: uvicorn's httptools protocol has no limit on the request head (the
URL and header fragments are accumulated in memory as they arrive: 10 connections sending
50 MB of header held 500 MB), no timeout before the head or the body is complete (a
slowloris or a never-ending chunked body holds its socket for ever), and no connection
cap that still lets a health probe in (``limit_concurrency`` answers 503 to everything,
probes included, and still accepts every socket). None of these is a setting, so
``GuardedHttpToolsProtocol`` adds them around the parser:

- head size: the bytes fed to the parser while a request head is incomplete are counted;
  past ``server.max_header_size`` the connection answers 431 and stops parsing, so memory
  never grows with what the client sends (a pipelined head that starts in the same read
  as the end of the previous body is counted from the next read: at most one read, 256 KiB,
  more);
- head timeout: from the connection's opening (or, on keep-alive, the end of the previous
  response) to the end of the head: ``server.header_timeout``, then 408. An idle keep-alive
  connection keeps uvicorn's own keep-alive timeout (5 s);
- body timeout: from the end of the head to the end of the body: ``server.body_timeout``,
  then 408 (or a plain close when a response was already sent). A multipart upload (up to
  ``max_upload_size``, 512 MiB) may take longer: for it the timeout is the longest silence,
  so a slow but steady upload is never cut;
- connection cap: up to ``server.max_connections`` (per process) connections are served
  normally. Beyond it, a small reserve of slots serves only ``/health`` and ``/ready`` (503
  for anything else, one request per connection, 2 s to send the head); when the reserve
  is full, a new connection evicts the reserve connection that has waited longest for its
  head (a probe sends its request at once, an idle socket does not), and only when no
  reserve connection is evictable is the new one refused. So idle sockets cannot lock the
  probes out, and file descriptors stay bounded. One log line when the cap is reached,
  one when the count is back under it.

Cost on the hot path: three thin overrides (``data_received``, ``on_headers_complete``,
``on_message_complete``) of a few attribute checks each, and a timer only when a head or a
body does not arrive in one read: measured in-process, +0.2 to 1.2 us per request on
about 18 us for uvicorn's own handling.

``serve`` raises ``RLIMIT_NOFILE`` to its hard limit, keeps the cap below what the file
descriptors allow, binds the main socket and (``server.admin_port``) the internal one, and
runs uvicorn on both, with ``--workers N`` too (uvicorn's supervisor takes a socket list).
Connections on the admin port are served only ``/metrics``, ``/admin/*``, ``/health`` and
``/ready``; the app itself answers 404 for ``/metrics`` and ``/admin/*`` on the main port.

WebSocket upgrades (``GET /v1/realtime``) are handed to uvicorn's ``websockets-sansio``
protocol with the head counted and timed like any other (its HTTP timers are cancelled at
the hand-over); the probe reserve and the admin listener refuse them (503 / 404), since the
WebSocket protocol would run the app past their wrappers.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import resource
import socket
import time
from asyncio import TimerHandle
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import uvicorn
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.bodies import is_upload
from proxy.config import Config
from proxy.dialects import DEFAULT
from proxy.errors import ProxyError, unknown_url
from proxy.realtime import MAX_FRAME_SIZE
from proxy.realtime import PATH as REALTIME_PATH

log = logging.getLogger("proxy.server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STARTUP_FAILURE = 3  # uvicorn's exit code when it cannot start
FD_HEADROOM = 256  # listeners, Redis pool, log and metrics files, DNS: beyond the 2 per request
PROBE_PATHS = frozenset({"/health", "/ready"})
INTERNAL_PATHS = frozenset({"/metrics", "/health", "/ready"})
PROBE_HEAD_TIMEOUT = 2.0  # a connection in the reserve has this long to send its head
SILENT_GRACE = 0.25  # a connection this young is not taken for a silent one
MAX_PIPELINED = 16  # requests queued behind the one in progress, per connection
SHUTDOWN_AFTER_DRAIN = 5  # uvicorn's own wait, after proxy.drain's
LINGER_SECONDS = 1.0  # after a 408/431: read and drop what is in flight, so the answer is seen


def probe_reserve(cap: int) -> int:
    """Slots beyond the cap for probes: 1/32 of it, at least 8, at most 64."""
    return max(8, min(64, cap // 32))


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_size: int
    header_timeout: float
    body_timeout: float
    max_connections: int  # the effective cap, fds considered
    admin_port: int | None = None

    @property
    def reserve(self) -> int:
        return probe_reserve(self.max_connections)


@dataclass
class FrontDoor:
    """Per process: the limits, and the connections queued in the probe reserve.

    Passed to every protocol through ``functools.partial``; with ``--workers`` each worker
    unpickles its own copy, so the cap and the episode are per process.
    """

    limits: Limits
    clock: Callable[[], float] = time.monotonic
    episode_since: float | None = None  # at the cap since then
    turned_away: int = 0  # connections refused, or served probe-only, in the episode
    waiting: dict[GuardedHttpToolsProtocol, None] = field(default_factory=dict)
    # Served connections that have not sent a whole request head yet, oldest first, with
    # when they opened: at the cap, the oldest of them gives its place to a new one.
    silent: dict[GuardedHttpToolsProtocol, float] = field(default_factory=dict)

    def admit(self, open_connections: int) -> str:
        """``serve``, ``probe`` (the reserve: /health and /ready only) or ``refuse``."""
        cap = self.limits.max_connections
        if open_connections <= cap or self._evict_oldest_silent():
            return "serve"
        if self.episode_since is None:
            self.episode_since = self.clock()
            self.turned_away = 0
            log.warning(
                "connection cap reached: %d open connections (server.max_connections, per "
                "process); new connections are served only for /health and /ready (503 for the "
                "rest) until at most %d are open",
                cap,
                self.low_water,
            )
        self.turned_away += 1
        if open_connections <= cap + self.limits.reserve:
            return "probe"
        return "probe" if self._evict_oldest_waiting() else "refuse"

    @property
    def low_water(self) -> int:
        """The episode ends at or under this: a tenth under the cap, so it does not flap."""
        cap = self.limits.max_connections
        return cap - max(1, cap // 10)

    def released(self, open_connections: int) -> None:
        if self.episode_since is not None and open_connections <= self.low_water:
            log.info(
                "connections back under the cap: %d open; %d connections were served "
                "probe-only or refused in the last %.1f s",
                open_connections,
                self.turned_away,
                self.clock() - self.episode_since,
            )
            self.episode_since = None

    def _evict_oldest_silent(self) -> bool:
        """Sockets that never send a byte must not lock everyone else out: at the cap, the
        connection that has waited longest for its first head (at least ``SILENT_GRACE``)
        is closed for the new one."""
        for oldest, opened in self.silent.items():
            if self.clock() - opened < SILENT_GRACE:
                return False  # the oldest is young: so are the others
            del self.silent[oldest]
            oldest.transport.abort()
            return True
        return False

    def _evict_oldest_waiting(self) -> bool:
        for oldest in self.waiting:
            del self.waiting[oldest]
            oldest.transport.abort()
            return True
        return False


def _error_bytes(
    status: int, message: str, code: str, type: str = "invalid_request_error"
) -> bytes:
    """A whole HTTP/1.1 response with the default dialect's error body, closing the
    connection (the request's path, and so its dialect, is not known yet)."""
    body = DEFAULT.error_body(ProxyError(status, message, type=type, code=code), "")
    head = (
        STATUS_LINE[status] + b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


def _is_handshake(headers: list[tuple[bytes, bytes]]) -> bool:
    """The headers a WebSocket opening handshake needs besides the upgrade (RFC 6455, 4.1)."""
    found = dict(headers)  # uvicorn lower-cases the names
    return bool(found.get(b"sec-websocket-key")) and found.get(b"sec-websocket-version") == b"13"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head/body bounds and the connection cap (see module)."""

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        front_door: FrontDoor,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.front_door = front_door
        self.limits = front_door.limits
        self.reading_head = True  # between two requests, or inside a head
        self.head_bytes = 0  # bytes fed while the current head is incomplete
        self.head_timer: TimerHandle | None = None
        self.body_timer: TimerHandle | None = None
        self.upload = False  # the body is a multipart upload: its timeout is for silence
        self.body_progress = 0.0  # loop time of an upload's last read
        self.lingering = False
        self.pipeline_overflow = False  # closing: too many pipelined requests
        self.probe_only = False
        self.upgraded = False  # handed over to the WebSocket protocol (/v1/realtime)

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        head_timeout = self.limits.header_timeout
        admission = self.front_door.admit(len(self.connections))
        if admission == "refuse":
            transport.write(_busy_response())
            transport.close()
            return
        if admission == "probe":
            self.probe_only = True
            self.front_door.waiting[self] = None
            self.app = _ProbesOnly(self.app, internal=self._on_admin_port())
            head_timeout = min(head_timeout, PROBE_HEAD_TIMEOUT)
        else:
            self.front_door.silent[self] = self.front_door.clock()
            if self._on_admin_port():
                self.app = _InternalOnly(self.app)
        self.head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_timers()
        if self.probe_only:
            self.front_door.waiting.pop(self, None)
        self.front_door.silent.pop(self, None)
        self.front_door.released(len(self.connections))

    def _on_admin_port(self) -> bool:
        port = self.limits.admin_port
        return port is not None and self.server is not None and self.server[1] == port

    # ------------------------------------------------------------ bytes in

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # answered and closing: drop whatever still arrives
        if self.reading_head:
            room = self.limits.max_header_size - self.head_bytes
            if len(data) > room:
                self._feed_up_to_head_limit(data, room)
                return
            self.head_bytes += len(data)
        keep_alive = self.timeout_keep_alive_task  # the parent cancels it: read it first
        super().data_received(data)
        if self.upgraded:
            return  # a WebSocket now: no HTTP head or body timer may touch it again
        # Timers only when a head or a body did not arrive whole in this read.
        if self.reading_head:
            if self.head_bytes and self.head_timer is None:
                self._arm_head_timer(keep_alive)
        elif self.body_timer is None and not self.transport.is_closing():
            self.body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        elif self.upload:
            self.body_progress = self.loop.time()  # the timer, when it fires, looks here

    def _feed_up_to_head_limit(self, data: bytes, room: int) -> None:
        """Feed only what fits under the limit; a head still incomplete then is too large."""
        self.head_bytes += room
        super().data_received(data[:room])
        if self.transport.is_closing() or self.lingering:
            return
        if self.reading_head:
            self._answer_and_close(
                431,
                f"Request line and headers are larger than {self.limits.max_header_size} bytes.",
                "request_header_fields_too_large",
            )
            return
        self.data_received(data[room:])  # the head ended inside: the rest is body or next

    def _arm_head_timer(self, keep_alive: TimerHandle | None) -> None:
        """The head's deadline counts from the end of the previous response when the
        connection was idle in keep-alive (its timer says when that was), else from now."""
        if self.transport.is_closing():
            return
        now = self.loop.time()
        since = keep_alive.when() - self.timeout_keep_alive if keep_alive is not None else now
        self.head_timer = self.loop.call_at(
            min(since, now) + self.limits.header_timeout, self._head_timed_out
        )

    # ------------------------------------------------------------ parser callbacks

    def on_headers_complete(self) -> None:
        if self.pipeline_overflow:
            return  # the connection is closing: the rest of this read builds nothing
        self.reading_head = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.probe_only:
            self.front_door.waiting.pop(self, None)  # no longer an idle slot to evict
        self.front_door.silent.pop(self, None)  # it spoke: never evicted as silent
        super().on_headers_complete()
        self.upload = is_upload(self.headers)
        self.body_progress = self.loop.time()
        if len(self.pipeline) > MAX_PIPELINED:
            # uvicorn queues every request of a read behind the one in progress: thousands
            # of pipelined heads would cost megabytes per connection. No client needs this
            # many; the queued ones are dropped with the connection (no answer can be
            # written in the middle of another).
            self.pipeline_overflow = True
            self.pipeline.clear()
            self.transport.close()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_head = True
        self.head_bytes = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the WebSocket protocol (``GET /v1/realtime``), with no
        HTTP timer left that could fire into it later (a Realtime session lasts as long as
        it likes; a 408 written into its frames would break it).

        The WebSocket protocol runs the app itself, not ``self.app``: the probe reserve and
        the admin listener must refuse the upgrade here, or their wrappers (probes only,
        internal endpoints only) would be bypassed."""
        method = self.parser.get_method()
        path = self.url.partition(b"?")[0].decode("latin-1")[:200]
        refusal: bytes | None = None
        if self.probe_only:
            refusal = _busy_response()
        elif self._on_admin_port():
            refusal = _error_bytes(404, f"Unknown request URL: GET {path}.", "unknown_url")
        elif method != b"GET":
            # Only a GET opens a WebSocket (RFC 6455, 4.1). Refused here, in JSON: the
            # parser stops at an upgrade's head, so as a plain request its body would be lost.
            refusal = _error_bytes(
                400,
                f"'Upgrade: websocket' is only for GET {REALTIME_PATH}, not "
                f"{method.decode('latin-1')[:20]} {path}.",
                "unsupported_upgrade",
            )
        elif not _is_handshake(self.headers):
            # What the WebSocket protocol would refuse in text/plain: in the API's shape.
            refusal = _error_bytes(
                400,
                "Not a WebSocket handshake: Sec-WebSocket-Key and Sec-WebSocket-Version: 13 "
                "are required.",
                "invalid_websocket_handshake",
            )
        if refusal is not None:
            self._cancel_timers()
            self.transport.write(refusal)
            self.transport.close()
            return
        self.upgraded = True
        self._cancel_timers()
        self.front_door.silent.pop(self, None)
        super().handle_websocket_upgrade()

    # ------------------------------------------------------------ timeouts

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self.reading_head:
            return
        if self.head_bytes == 0:
            # Nothing asked: close quietly, as nginx does. An answer here could be read by
            # a client that opened the connection ahead of time as the reply to its next request.
            self.transport.close()
            return
        self._answer_and_close(
            408,
            f"The request headers were not received within {self.limits.header_timeout:g} s.",
            "request_timeout",
        )

    def _body_timed_out(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or self.reading_head:
            return
        if self.upload:
            silent_until = self.body_progress + self.limits.body_timeout
            if silent_until > self.loop.time():  # it kept sending: wait for the next gap
                self.body_timer = self.loop.call_at(silent_until, self._body_timed_out)
                return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()  # too late for a status: just end it
            return
        if cycle is not None:
            # The app sees the client as gone (its receive() returns http.disconnect) and
            # anything it still sends is dropped: the 408 below is the answer.
            cycle.disconnected = True
            cycle.message_event.set()
        self._answer_and_close(
            408,
            f"The request body was not received within {self.limits.body_timeout:g} s.",
            "request_timeout",
        )

    def _answer_and_close(self, status: int, message: str, code: str) -> None:
        """Answer, stop parsing (its buffers go), then read and drop input for a moment
        before closing: a close with unread input makes the kernel send a reset, which
        can destroy the answer before the client reads it."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            self.transport.close()  # a response is under way: an answer would corrupt it
            return
        self.transport.write(_error_bytes(status, message, code))
        self.lingering = True
        self.parser = None  # type: ignore[assignment]
        self.url = b""
        self.headers = []
        self._cancel_timers()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self._close_after_linger)

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser cannot read (an unknown method, control bytes in a
        header, broken framing) gets an OpenAI-shaped 400, not uvicorn's plain text."""
        self.transport.write(
            _error_bytes(400, "Invalid HTTP request: it could not be parsed.", "invalid_http")
        )
        self.transport.close()

    def _close_after_linger(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self.head_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.head_timer = self.body_timer = None


@functools.cache
def _busy_response() -> bytes:
    return _error_bytes(
        503,
        "The proxy is at its connection limit; retry shortly.",
        "too_many_connections",
        type="server_error",
    )


class _ProbesOnly:
    """The app for connections in the probe reserve: /health and /ready, one request each."""

    def __init__(self, app: ASGIApp, internal: bool) -> None:
        self.app = app
        self.allowed = INTERNAL_PATHS if internal else PROBE_PATHS
        self.internal = internal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (
            path in self.allowed or (self.internal and path.startswith("/admin/"))
        ):
            await _send_error(
                send,
                ProxyError(
                    503,
                    "The proxy is at its connection limit; retry shortly.",
                    type="server_error",
                    code="too_many_connections",
                ),
            )
            return

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)


class _InternalOnly:
    """The app for connections on the admin port: internal endpoints and probes only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path not in INTERNAL_PATHS and not path.startswith("/admin/"):
                await _send_error(send, unknown_url(scope["method"], path))
                return
        await self.app(scope, receive, send)


async def _send_error(send: Send, err: ProxyError) -> None:
    body = DEFAULT.error_body(err, "")
    headers = [*err.raw_headers(body), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------- start-up


def raise_fd_limit() -> int:
    """Soft ``RLIMIT_NOFILE`` up to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


def effective_cap(configured: int, open_files: int) -> int:
    """The connection cap the fds allow: each client connection may hold an upstream one."""
    fits = (open_files - FD_HEADROOM - probe_reserve(configured)) // 2
    return max(1, min(configured, fits))


def limits_for(config: Config, open_files: int) -> Limits:
    server = config.server
    cap = effective_cap(server.max_connections, open_files)
    if cap < server.max_connections:
        log.warning(
            "server.max_connections %d is more than %d open files allow (2 per connection, "
            "%d spare): the cap is %d per process",
            server.max_connections,
            open_files,
            FD_HEADROOM,
            cap,
        )
    limits = Limits(
        max_header_size=server.max_header_size,
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        max_connections=cap,
        admin_port=server.admin_port,
    )
    log.info(
        "front door: at most %d connections per process (+%d for /health and /ready), "
        "headers <= %d bytes within %g s, body within %g s, open-file limit %d",
        cap,
        limits.reserve,
        limits.max_header_size,
        limits.header_timeout,
        limits.body_timeout,
        open_files,
    )
    return limits


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(
    config: Config,
    app: ASGIApp | str,
    *,
    host: str,
    port: int,
    workers: int,
    log_config: dict[str, Any],
    log_level: str,
) -> int:
    """Run uvicorn (one process, or ``workers`` of them) on the main and admin sockets."""
    admin_port = config.server.admin_port
    if admin_port is not None and admin_port == port:
        log.error("server.admin_port %d is the main port too: give them different ports", port)
        return 2
    front_door = FrontDoor(limits_for(config, raise_fd_limit()))
    protocol = functools.partial(GuardedHttpToolsProtocol, front_door=front_door)
    uv_config = uvicorn.Config(
        app,
        factory=isinstance(app, str),
        workers=workers,
        loop="uvloop",
        http=cast(type[asyncio.Protocol], protocol),
        # /v1/realtime. websockets' sans-I/O protocol: uvicorn's default implementation, with
        # C-accelerated frame masking (audio frames are large), the library the openai SDK
        # itself uses, and bounded reading (one message held until the app takes it).
        ws="websockets-sansio",
        ws_max_size=MAX_FRAME_SIZE,  # 1009 beyond, as upstream
        # Frames go on as they came: compressing every one for the client would cost the
        # proxy CPU per frame, for base64 audio that hardly compresses.
        ws_per_message_deflate=False,
        lifespan="on",
        access_log=False,  # the proxy writes its own line per request
        server_header=False,
        proxy_headers=False,  # never trust X-Forwarded-For blindly
        log_config=log_config,
        log_level=log_level,
        # proxy.drain has already waited server.drain_timeout and ended what was left: this
        # is only for Realtime sessions to take their 1012 close frame, and stragglers.
        timeout_graceful_shutdown=SHUTDOWN_AFTER_DRAIN,
    )
    sockets = []
    for listen_port in (port,) if admin_port is None else (port, admin_port):
        try:
            sockets.append(bind(host, listen_port))
        except OSError as exc:  # a port in use, mostly: name it, no traceback
            for sock in sockets:
                sock.close()
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
            log.error("cannot listen on %s port %d: %s", host, listen_port, reason)
            return STARTUP_FAILURE
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d", shown, port)
    if admin_port is not None:
        log.info("internal endpoints (/metrics, /admin/*) on http://%s:%d only", shown, admin_port)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(uv_config, sockets=sockets).run()
        return 0
    server = uvicorn.Server(uv_config)
    server.run(sockets=sockets)
    return 0 if server.started else STARTUP_FAILURE
