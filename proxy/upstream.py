"""One pooled HTTP client per backend, and transport failures mapped to ``ProxyError``.

aiohttp's client is on the forwarding path because it measured fastest here: about 0.3 ms
of CPU per proxied request against 1-3 ms for ``httpx.AsyncClient`` (see the README's
Performance section). Bodies are passed through as bytes: no decompression, no re-encoding.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from proxy.config import BackendConfig
from proxy.dialects import DEFAULT
from proxy.errors import (
    ProxyError,
    upstream_response_too_large,
    upstream_timeout,
    upstream_unreachable,
)
from proxy.metrics import STALE_CONNECTIONS

Body = bytes | AsyncIterator[bytes] | None  # an upload is sent as it arrives

_URL_CACHE_LIMIT = 1024
_PROBE_BODY_LIMIT = 16 * 1024 * 1024  # a model list; anything bigger is not one
_TOO_LARGE = "body too large"  # _get_models: a body past its cap
# Headers aiohttp would add on its own; the client's own values are forwarded instead.
_NO_AUTO_HEADERS = ("Accept-Encoding", "User-Agent", "Content-Type")
# A Realtime session may be silent for as long as it likes (no receive timeout); the close
# handshake is bounded.
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)


class HeadDeadlines:
    """The longest wait for a response head, for every request to one backend, on one
    timer: ``asyncio.timeout`` per request cost 4.7 µs (a timer handle and a context
    object each); this costs a dict entry. The timer runs only while a request waits,
    every ``TICK``: a request past its deadline is cancelled at most that much late."""

    TICK = 0.1

    def __init__(self) -> None:
        self._waiting: dict[asyncio.Task[Any], tuple[float, int]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def enter(self, seconds: float) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        self._waiting[task] = (loop.time() + seconds, task.cancelling())
        if self._timer is None:
            self._timer = loop.call_later(self.TICK, self._check, loop)
        return task

    def leave(self, task: asyncio.Task[Any]) -> None:
        self._waiting.pop(task, None)
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """The task's cancellation was this deadline's alone (as ``asyncio.timeout``
        tells its own from a caller's): then it goes on, to raise a timeout."""
        entry = self._waiting.get(task)
        if task not in self._expired or entry is None:
            return False
        return task.uncancel() <= entry[1]

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for task, (deadline, _) in list(self._waiting.items()):
            if deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        if len(self._waiting) > len(self._expired):
            self._timer = loop.call_later(self.TICK, self._check, loop)


class Upstream:
    """The connection pool and URL builder for one backend."""

    def __init__(self, backend: BackendConfig) -> None:
        self.name = backend.name
        self.base_url = backend.base_url
        self.extra_headers = dict(backend.headers)
        self._backend = backend
        timeout = backend.timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None,  # a stream may run for many minutes; the gaps are what is bounded
            connect=timeout.connect,
            sock_connect=timeout.connect,
            sock_read=timeout.first_byte_seconds,  # the wait for the response head...
        )
        # ...and, once the head is in, the longest silence between two chunks.
        self._idle = (
            timeout.idle_seconds if timeout.idle_seconds != timeout.first_byte_seconds else None
        )
        self._head_deadline = timeout.connect + timeout.first_byte_seconds
        self._deadlines = HeadDeadlines()
        self._probe_timeout = aiohttp.ClientTimeout(total=10, connect=timeout.connect)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                ssl=tls_context(self._backend),
                limit=0,  # no pool cap: 1,000 concurrent streams must not queue behind 100
                ttl_dns_cache=300,
                keepalive_timeout=30,
                enable_cleanup_closed=True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str, query: str = "", base: str | None = None) -> URL:
        """``base`` (default ``base_url``; a dialect may have its own, e.g. the backend's
        ``anthropic_base_url``) + the path after ``/v1`` (an allowed one), query kept.

        Only query-less URLs are cached: the paths are a short list from the config, while
        a client can send any number of distinct queries."""
        base = self.base_url if base is None else base
        if query:
            return URL(f"{base}{path}?{query}", encoded=True)
        whole = base + path
        url = self._urls.get(whole)
        if url is None:
            url = URL(whole, encoded=True)
            if len(self._urls) < _URL_CACHE_LIMIT:
                self._urls[whole] = url
        return url

    async def send(
        self, method: str, url: URL, headers: dict[str, str], body: Body
    ) -> aiohttp.ClientResponse:
        """Send the request and return once the response headers are in."""
        if self._session is None:
            raise ProxyError(503, "The proxy is starting up.", type="server_error")
        # A deadline of our own for the head: aiohttp drops its read timer after a 1xx
        # informational answer, so an upstream that sends one and goes silent would
        # otherwise hold the request for ever.
        deadlines = self._deadlines
        task = deadlines.enter(self._head_deadline)
        try:
            try:
                # Redirects are never followed: a 307 would re-send the prompt and the
                # backend's headers to another host, a 301 would turn a stream into a GET.
                response = await self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                )
            except aiohttp.ClientOSError as exc:
                if not (_never_sent(exc) and (body is None or isinstance(body, bytes))):
                    raise
                # The pooled connection was closed by the upstream (its keep-alive ended,
                # or it closes after every answer) before this request's first byte went
                # out: nothing reached the upstream, so sending it again is safe for any
                # method. Once: the pool drops closed connections, so this one is fresh
                # or newly opened. A streamed upload cannot be replayed and is not.
                STALE_CONNECTIONS.labels(self.name).inc()
                response = await self._session.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                )
        except asyncio.CancelledError:
            if deadlines.expired(task):
                raise self._failure(TimeoutError(), "waiting for the response") from None
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, "waiting for the response") from None
        finally:
            deadlines.leave(task)
        if self._idle is not None:
            self._switch_to_idle_timeout(response)
        return response

    async def websocket(
        self,
        path: str,
        query: str,
        headers: dict[str, str],
        *,
        protocols: tuple[str, ...] = (),
        max_frame_size: int,
        heartbeat: float | None,
    ) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket to ``base_url`` + ``path`` (``ws://`` for ``http://``, ``wss://`` for
        ``https://``), open once the upstream answered 101.

        Raises ``aiohttp.WSServerHandshakeError`` when the upstream answered another status
        (the caller judges it: a refused key is not a failed backend), ``ProxyError`` for
        transport failures and timeouts. Frames larger than ``max_frame_size`` end the
        socket with 1009; with ``heartbeat`` an upstream that stops answering pings ends it
        after 1.5 x ``heartbeat`` (a session may be idle for as long as it likes)."""
        if self._session is None:
            raise ProxyError(503, "The proxy is starting up.", type="server_error")
        url = self.url(path, query)
        url = url.with_scheme("wss" if url.scheme == "https" else "ws")
        try:
            async with asyncio.timeout(self._head_deadline):
                return await self._session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    timeout=_WS_TIMEOUT,
                    heartbeat=heartbeat,
                    max_msg_size=max_frame_size,
                    autoping=True,
                    compress=0,  # frames go on as they came: no inflating, no deflating
                )
        except aiohttp.WSServerHandshakeError:
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, "waiting for the WebSocket handshake") from None

    def _failure(self, exc: BaseException, waiting_for: str) -> ProxyError:
        """A transport failure as the proxy's own error (504 or 502), never echoing what
        was sent."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return upstream_timeout(self.name, "connecting")
        if isinstance(exc, TimeoutError | aiohttp.SocketTimeoutError):
            return upstream_timeout(self.name, waiting_for)
        if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
            exc, aiohttp.ClientConnectorCertificateError
        ):
            return upstream_unreachable(self.name, f"cannot connect to {exc.host}:{exc.port}")
        return upstream_unreachable(self.name, _describe(exc))

    def _switch_to_idle_timeout(self, response: aiohttp.ClientResponse) -> None:
        """From the head on, the longest silence allowed is ``idle``, not ``first_byte``.

        When the head and the first chunk came in one read, the timer already running was
        armed with ``first_byte``: re-arm it, unless the body is complete (a timer armed on
        a finished response would fire on the pooled connection).
        """
        connection = response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None:
            return
        protocol.read_timeout = self._idle
        if not response.content.is_eof():
            protocol.start_timeout()

    async def list_models(self, key: str) -> tuple[int | str, list[str]]:
        """``GET {base_url}/models`` with ``key``: the status (or why it could not be sent)
        and the model ids listed. Used to re-probe invalid keys and to discover models."""
        auth = DEFAULT.upstream_auth(self._backend, key)  # the base_url side: its /models
        status, body = await self._get_models(auth, ok_body=True, limit=_PROBE_BODY_LIMIT)
        if status != 200:
            return (status if status != _TOO_LARGE else "model list too large"), []
        try:
            data = orjson.loads(body).get("data") or []
            ids = [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            ids = []
        return 200, ids

    async def check_key(self, auth: tuple[str, str]) -> tuple[int | str, bytes]:
        """``GET {base_url}/models`` with one key's ``auth`` header (the dialect's): the
        status (or why it could not be sent) and, for a refusal, its error body (capped),
        so ``classify`` can tell a revoked key from one that lacks a scope."""
        status, body = await self._get_models(auth, ok_body=False, limit=_CHECK_BODY_LIMIT)
        return (status if status != _TOO_LARGE else "error body too large"), body

    async def _get_models(
        self, auth: tuple[str, str], ok_body: bool, limit: int
    ) -> tuple[int | str, bytes]:
        """One ``GET /models``: no redirect followed, the probe timeout, the body read
        (capped at ``limit``) for a 200 when ``ok_body``, for a refusal otherwise."""
        if self._session is None:
            return "not started", b""
        headers = {auth[0]: auth[1], "accept": "application/json"}
        try:
            async with self._session.get(
                self.url("/models"),
                headers={**self.extra_headers, **headers},
                timeout=self._probe_timeout,
                allow_redirects=False,
            ) as response:
                if (response.status == 200) != ok_body:
                    return response.status, b""
                return response.status, await self._read_capped(response, limit)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _describe(exc), b""
        except ProxyError:
            return _TOO_LARGE, b""

    async def read_all(self, response: aiohttp.ClientResponse, limit: int) -> bytes:
        """The whole body of a response that is not streamed to the client, at most
        ``limit`` bytes (502 ``upstream_response_too_large`` beyond: never buffered whole)."""
        try:
            return await self._read_capped(response, limit)
        except (TimeoutError, aiohttp.SocketTimeoutError):
            raise upstream_timeout(self.name, "reading the response body") from None
        except aiohttp.ClientError as exc:
            raise upstream_unreachable(self.name, _describe(exc)) from None

    async def _read_capped(self, response: aiohttp.ClientResponse, limit: int) -> bytes:
        declared = response.content_length
        if declared is not None and declared > limit:
            raise upstream_response_too_large(self.name, limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                response.close()  # the rest is never read: drop the connection
                raise upstream_response_too_large(self.name, limit)
            chunks.append(chunk)
        return b"".join(chunks)


def tls_context(backend: BackendConfig) -> ssl.SSLContext | bool:
    """How the backend's https certificate is checked: against the system's roots, plus
    the backend's ``ca_file`` (an internal CA, a self-signed vLLM) when it names one."""
    if backend.ca_file is None:
        return True  # aiohttp's default context
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=backend.ca_file)
    return context


_CHECK_BODY_LIMIT = 64 * 1024  # a refusal's error body, read to classify it


def _never_sent(exc: aiohttp.ClientOSError) -> bool:
    """The request failed because its connection was already closing when the first write
    was tried (aiohttp's writer raises ``ClientConnectionResetError`` then): the upstream
    got nothing of it. A reset once bytes were out is another error, and may have been
    applied (a POST is never sent twice for it)."""
    return isinstance(exc.__cause__, aiohttp.ClientConnectionResetError)


def _describe(exc: BaseException) -> str:
    # Never echo request headers: an exception's text may carry them in other clients.
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", "") or "not trusted"
        return (
            f"cannot connect to {exc.host}:{exc.port}: its certificate is refused ({reason});"
            " a private CA's goes in the backend's ca_file"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Our own wording: aiohttp's says "ssl:default" even for an http:// URL.
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    return type(exc).__name__ + (
        f" ({exc})" if isinstance(exc, aiohttp.ClientConnectionError) else ""
    )
