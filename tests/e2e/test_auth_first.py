"""Issue 19, attack 2: sockets without a valid key, each sending a multipart head and then
one byte every few seconds, held every connection slot (valid clients got 503
``too_many_connections``) and had their uploads spilled to disk. Now the key is checked
from the headers first: each gets its 401 at once and its connection closes, nothing of
its body is read or written to disk, and valid clients are served throughout."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import KEYS_ENV, MockUpstream, ProxyProcess, start_proxy
from tests.e2e.test_front_door import connect, front_door_config, read_response

CAP = 20
FLOOD = 3 * CAP  # well past the cap: before the fix, every slot was held by the flood
CLIENT_KEY = "ck-valid-team-0000000000"
BOUNDARY = "XXflood"


@pytest.fixture(scope="module")
def keyed(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    server = f"""  max_connections: {CAP}
  header_timeout: 30
  body_timeout: 30"""
    text = (
        front_door_config(mock_upstream, server)
        + f"clients:\n  - {{id: team, key: {CLIENT_KEY}}}\n"
    )
    tmp = tmp_path_factory.mktemp("auth-first")
    spill = tmp / "spill"
    spill.mkdir()
    proxy = start_proxy(text, tmp, KEYS_ENV | {"TMPDIR": str(spill)})
    yield proxy, spill
    proxy.stop()


def flood_head(key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
        f"{auth}Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        "Content-Length: 50000000\r\n\r\n"
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode()


class Flood:
    """``FLOOD`` sockets, each re-opened when the proxy closes it, trickling one byte each
    every ``gap`` seconds; counts the answers it got."""

    def __init__(self, proxy: ProxyProcess, gap: float = 2.0) -> None:
        self.proxy, self.gap = proxy, gap
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.opened = 0
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(FLOOD)]

    def _one(self, index: int) -> None:
        key = "ck-bogus-000" if index % 2 else None
        while not self.stop.is_set():
            try:
                sock = connect(self.proxy, timeout=self.gap)
                self.opened += 1
                sock.sendall(flood_head(key))
                while not self.stop.is_set():
                    sock.sendall(b"\0")
                    try:
                        status, _, _, _ = read_response(sock)
                        self.statuses.append(status)
                        break  # answered: open another, as the attacker would
                    except (TimeoutError, AssertionError):
                        continue  # no answer within the gap: trickle on
            except OSError:
                pass
            finally:
                sock.close()
            self.stop.wait(0.5)  # re-open at most twice a second per socket

    def __enter__(self) -> Flood:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


def fds_into(pid: int, directory: Path) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def test_an_unauthenticated_slow_upload_flood_leaves_valid_clients_served(keyed, upstream):
    proxy, spill = keyed
    chat = {"model": "kimi-k2", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    latencies, statuses, spilled = [], [], []
    # A new connection for each request (no keep-alive): a connection slot must be free for
    # each; one client object, so the measure is the proxy's and not the TLS-less set-up's.
    fresh = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=5)
    with fresh, Flood(proxy) as flood:
        time.sleep(1.0)  # the flood is on: every socket has sent its head
        deadline = time.monotonic() + 6
        while len(latencies) < 200 and time.monotonic() < deadline:
            started = time.monotonic()
            response = fresh.post(f"{proxy.base_url}/chat/completions", json=chat, headers=auth)
            latencies.append(time.monotonic() - started)
            statuses.append(response.status_code)
            spilled += fds_into(proxy.process.pid, spill)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"during the flood: {len(latencies)} chats, p50 {latencies[len(latencies) // 2] * 1000:.1f}"
        f" ms, p99 {p99 * 1000:.1f} ms; flood sockets opened {flood.opened}, answered"
        f" {len(flood.statuses)}"
    )
    assert len(latencies) >= 50
    assert set(statuses) == {200}
    assert p99 < 0.1
    assert flood.opened > FLOOD  # the flood's sockets were answered and closed, and re-opened
    assert set(flood.statuses) == {401}
    assert spilled == [] and list(spill.iterdir()) == []


def test_a_bogus_keys_upload_is_401_and_closed_with_nothing_read_or_spilled(keyed, upstream):
    proxy, spill = keyed
    sock = connect(proxy)
    try:
        sock.sendall(flood_head("ck-bogus-000") + b"x" * 2_000_000)
        status, headers, body, _ = read_response(sock)
        try:
            closed = sock.recv(65536) == b""
        except ConnectionResetError:  # closed with the unread body still in flight
            closed = True
    finally:
        sock.close()
    assert status == 401 and closed
    assert b'"invalid_api_key"' in body
    assert headers["connection"] == "close"
    assert fds_into(proxy.process.pid, spill) == [] and list(spill.iterdir()) == []
