"""The front door under attack, over raw sockets: head size, head and body timeouts, the
connection cap. What a client sees (status, body, when the socket closes) and what the
proxy pays (RSS from /proc, open file descriptors)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import KEYS_ENV, MockUpstream, ProxyProcess, mock_config, rss_kb, start_proxy

HEAD_LIMIT = 16 * 1024


def front_door_config(mock: MockUpstream, server: str) -> str:
    """The shared mock config with a `server:` section of our own."""
    text = mock_config(mock)
    assert "server:\n  routing_headers: true\n" in text
    return text.replace("server:\n  routing_headers: true\n", f"server:\n{server}\n")


@pytest.fixture(scope="module")
def guarded(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    server = f"""  max_header_size: {HEAD_LIMIT}
  header_timeout: 1
  body_timeout: 1"""
    tmp = tmp_path_factory.mktemp("front-door")
    proxy = start_proxy(front_door_config(mock_upstream, server), tmp, KEYS_ENV)
    yield proxy
    proxy.stop()


def connect(proxy: ProxyProcess, timeout: float = 5) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers, body, and whether the server closed the connection after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside the body"
        rest += chunk
    body, extra = rest[:length], rest[length:]
    try:
        closed = not extra and sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        closed = False
    return status, headers, body, closed


def error_of(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---------------------------------------------------------------- upgrades


@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_an_upgrade_of_anything_but_a_get_is_refused_in_json_and_nothing_is_forwarded(
    guarded, upstream, method
):
    """The parser stops at an upgrade's head: served as a plain request, a POST would go
    upstream without its body. Refused instead, in the API's shape (not text/plain)."""
    body = b'{"model": "gpt-4o-mini", "messages": []}'
    before = len(upstream.requests())
    with connect(guarded) as sock:
        sock.sendall(
            f"{method} /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
            f"Upgrade: websocket\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, headers, answer, closed = read_response(sock)
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = error_of(answer)
    assert error["code"] == "unsupported_upgrade"
    assert f"not {method} /v1/chat/completions" in str(error["message"])
    assert closed
    assert len(upstream.requests()) == before


def test_a_get_upgrade_without_a_handshake_is_refused_in_json(guarded):
    with connect(guarded) as sock:
        sock.sendall(
            b"GET /v1/realtime?model=x HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        status, headers, answer, closed = read_response(sock)
    assert (status, headers["content-type"]) == (400, "application/json")
    assert error_of(answer)["code"] == "invalid_websocket_handshake"
    assert closed


# ---------------------------------------------------------------- head size


def test_a_head_over_the_limit_is_answered_431_and_closed(guarded):
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEAD_LIMIT + 100))
        status, headers, body, closed = read_response(sock)
    assert status == 431
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert error_of(body)["code"] == "request_header_fields_too_large"
    assert closed


def test_a_head_just_under_the_limit_is_served(guarded):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
    filler = b"a" * (HEAD_LIMIT - len(request) - 4)
    with connect(guarded) as sock:
        sock.sendall(request + filler + b"\r\n\r\n")
        status, _, body, _ = read_response(sock)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_a_large_body_in_the_same_read_as_the_head_is_not_mistaken_for_a_head(guarded, upstream):
    payload = json.dumps(
        {"model": "kimi-k2", "messages": [{"role": "user", "content": "x" * 200_000}]}
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    with connect(guarded) as sock:
        sock.sendall(head + payload)  # one write: the first read holds head and body
        status, _, body, _ = read_response(sock)
    assert status == 200, body


def test_fifty_megabyte_heads_on_ten_connections_do_not_grow_memory(guarded):
    pid = guarded.process.pid
    httpx.get(f"{guarded.url}/health")
    before = rss_kb(pid)
    peak = [before]
    outcomes: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.01)

    def flood() -> None:
        block = b"a" * (1 << 20)
        with connect(guarded, timeout=10) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                for _ in range(50):
                    sock.sendall(block)
                answer = sock.recv(64)  # all 50 MB went out: the proxy read and dropped it
                outcomes.append(answer[:12].decode())
            except OSError:
                outcomes.append("cut off")  # the proxy closed while we were sending

    sampler = threading.Thread(target=sample)
    sampler.start()
    floods = [threading.Thread(target=flood) for _ in range(10)]
    for t in floods:
        t.start()
    for t in floods:
        t.join(timeout=30)
    stop.set()
    sampler.join()
    assert len(outcomes) == 10
    assert set(outcomes) <= {"HTTP/1.1 431", "cut off"}, outcomes
    growth_mb = (peak[0] - before) / 1024
    print(f"RSS before {before / 1024:.1f} MB, peak {peak[0] / 1024:.1f} MB, +{growth_mb:.1f} MB")
    assert growth_mb < 5, f"RSS grew by {growth_mb:.1f} MB under the header flood"
    assert httpx.get(f"{guarded.url}/health").status_code == 200


# ---------------------------------------------------------------- timeouts


@pytest.mark.serial  # timeouts measured within a window
def test_slowloris_head_gets_408_after_the_header_timeout(guarded):
    with connect(guarded) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # nothing yet: the head is incomplete
        sock.sendall(b"H")  # a byte now and then does not extend the deadline
        sock.settimeout(5)
        status, _, body, closed = read_response(sock)
        elapsed = time.monotonic() - started
    assert status == 408
    assert error_of(body)["code"] == "request_timeout"
    assert closed
    assert 0.9 <= elapsed < 2.5, elapsed


@pytest.mark.serial  # timeouts measured within a window
def test_slow_head_on_a_kept_alive_connection_gets_408(guarded):
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response_keep(sock) == 200
        served = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # and never the rest
        status, _, _, closed = read_response(sock)
        elapsed = time.monotonic() - served
    assert status == 408 and closed
    assert 0.9 <= elapsed < 2.5, elapsed


def read_response_keep(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1])


@pytest.mark.serial  # timeouts measured within a window
def test_a_connection_that_sends_nothing_is_closed_quietly_after_the_header_timeout(guarded):
    with connect(guarded) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed, with no answer to a request never made
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5, elapsed


@pytest.mark.serial  # timeouts measured within a window
def test_a_never_ending_chunked_body_gets_408_after_the_body_timeout(guarded, upstream):
    with connect(guarded) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        started = time.monotonic()
        sock.settimeout(0.2)
        response = b""
        while time.monotonic() - started < 4:
            try:
                sock.sendall(b"1\r\n \r\n")
                response += sock.recv(65536)
                if response:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408 "), response
    body = response.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 <= elapsed < 2.5, elapsed
    assert upstream.requests() == []  # nothing half-received went upstream


def test_a_quick_request_on_a_kept_alive_connection_is_untouched_by_the_timeouts(guarded):
    with connect(guarded) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response_keep(sock) == 200
            time.sleep(0.6)  # 3 x 0.6 s > header_timeout: each request has its own deadline


# ---------------------------------------------------------------- connection cap


CAP = 20


@pytest.fixture(scope="module")
def capped(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    server = f"""  max_connections: {CAP}
  header_timeout: 30"""
    tmp = tmp_path_factory.mktemp("capped")
    proxy = start_proxy(front_door_config(mock_upstream, server), tmp, KEYS_ENV)
    yield proxy
    proxy.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_at_the_cap_health_answers_and_the_cap_is_logged_once(capped, upstream):
    idle = [connect(capped) for _ in range(300)]
    try:
        time.sleep(0.3)
        fds = open_fds(capped.process.pid)
        latencies = []
        for _ in range(10):
            started = time.monotonic()
            response = httpx.get(f"{capped.url}/health", timeout=5)
            latencies.append(time.monotonic() - started)
            assert response.status_code == 200
            assert httpx.get(f"{capped.url}/ready", timeout=5).status_code == 200
        # A real client is served too: the oldest silent socket gives it its place.
        served_at_cap = httpx.post(
            f"{capped.base_url}/chat/completions",
            json={"model": "kimi-k2", "messages": []},
            timeout=5,
        )
        print(f"/health at the cap: max {max(latencies) * 1000:.1f} ms; open fds {fds}")
        assert served_at_cap.status_code == 200
        # 300 sockets opened, but the proxy holds the cap, the reserve and its own few.
        assert fds < CAP + 8 + 60, fds
        assert capped.log().count("connection cap reached") == 1
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while "connections back under the cap" not in capped.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert capped.log().count("connections back under the cap") == 1
    served = httpx.post(
        f"{capped.base_url}/chat/completions", json={"model": "kimi-k2", "messages": []}
    )
    assert served.status_code == 200
    assert capped.log().count("connection cap reached") == 1
