"""Fixtures that start real processes on 127.0.0.1: the mock upstream and the proxy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
MOCK = ROOT / "tests" / "mock_upstream.py"
KEY_A = "sk-test-aaaaaaaaaaaaaaaa1111"
KEY_B = "sk-test-bbbbbbbbbbbbbbbb2222"
KEY_OTHER = "sk-test-cccccccccccccccc3333"


def rss_kb(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MockUpstream:
    port: int
    process: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, probes: bool = False) -> list[dict[str, Any]]:
        """What the mock received; without ``probes``, the proxy's own ``GET .../models``
        (start-up checks, key and circuit probes, discovery) are left out: they are never
        a client's request, and they come whenever their timers say."""
        received: list[dict[str, Any]] = httpx.get(f"{self.url}/_mock/requests").json()
        if probes:
            return received
        return [r for r in received if not (r["method"] == "GET" and r["path"].endswith("/models"))]

    def aborted(self) -> int:
        """How many timed answers the mock could not finish because its client went away."""
        return httpx.get(f"{self.url}/_mock/stats").json()["aborted"]

    def reset(self) -> None:
        httpx.delete(f"{self.url}/_mock/requests")
        settings = {"invalid_keys": [], "limited_keys": {}, "models": ["mock-model"]}
        httpx.post(f"{self.url}/_mock/config", json=settings)

    def configure(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_mock/config", json=settings).raise_for_status()


def start_mock(*args: str) -> MockUpstream:
    process = subprocess.Popen(
        [sys.executable, str(MOCK), "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("LISTENING"):
        process.kill()
        raise RuntimeError(f"mock upstream did not start: {line!r}")
    return MockUpstream(int(line.split()[1]), process)


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstream]:
    mock = start_mock()
    yield mock
    mock.process.terminate()
    mock.process.wait(timeout=5)


@pytest.fixture
def upstream(mock_upstream: MockUpstream) -> MockUpstream:
    """The shared mock upstream, with its request log and settings cleared."""
    mock_upstream.reset()
    return mock_upstream


@dataclass
class ProxyProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_proxy(
    config_text: str,
    tmp: Path,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> ProxyProcess:
    config = tmp / "config.yaml"
    config.write_text(config_text)
    port = free_port()
    log_path = tmp / f"proxy-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    full_env |= env or {}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
                *list(extra_args),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
    proxy = ProxyProcess(port, process, log_path)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}:\n{proxy.log()}")
        try:
            if httpx.get(f"{proxy.url}/health", timeout=0.5).status_code == 200:
                return proxy
        except httpx.HTTPError:
            time.sleep(0.05)
    proxy.stop()
    raise RuntimeError(f"proxy did not become healthy:\n{proxy.log()}")


def mock_config(mock: MockUpstream, **overrides: str) -> str:
    """A config with two keys on a `mock` backend, aliases, prefix routes and a key pin.

    The reconnect throttle is off unless ``reconnect="true"``: most tests fail on purpose.
    """
    text = f"""
server:
  routing_headers: true
throttle:
  reconnect: {{enabled: {overrides.get("reconnect", "false")}, base: 0.5, max: 4}}
{overrides.get("extra", "")}
backends:
  mock:
    base_url: {mock.url}/v1
    keys:
      - {{id: key-a, key: "${{TEST_KEY_A}}"}}
      - {{id: key-b, key: "${{TEST_KEY_B:-}}"}}
    models: [kimi-k2-0711-preview, gpt-4o-mini]
    timeout: {{connect: 2, read: {overrides.get("read_timeout", "5")}}}
  other:
    base_url: {mock.url}/other/v1
    keys: [{{id: other-main, key: "${{TEST_KEY_OTHER}}"}}]
  flaky:
    base_url: {mock.url}/v1
    keys: [{{id: flaky-main, key: "sk-flaky-000000000000"}}]
  unkeyed:
    base_url: {mock.url}/v1
    keys: [{{id: unkeyed-main, key: "${{UNSET_TEST_KEY}}"}}]
  dead:
    base_url: http://127.0.0.1:{free_port()}/v1
    keys: [{{id: dead-main, key: "sk-dead-0000000000000000"}}]
aliases:
  kimi-k2: kimi-k2-0711-preview
  fast: kimi-k2
routes:
  - {{prefix: "kimi-", backend: mock}}
  - {{prefix: "other/", backend: other, strip_prefix: true}}
  - {{prefix: "pinned-", backend: mock, key: key-b}}
  - {{prefix: "unkeyed-", backend: unkeyed}}
  - {{prefix: "flaky-", backend: flaky}}
  - {{prefix: "dead-", backend: dead}}
  - {{prefix: "gpt-", backend: mock}}
"""
    return text


KEYS_ENV = {"TEST_KEY_A": KEY_A, "TEST_KEY_B": KEY_B, "TEST_KEY_OTHER": KEY_OTHER}


@pytest.fixture(scope="session")
def proxy(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One proxy process in front of the shared mock upstream, for the whole session."""
    tmp = tmp_path_factory.mktemp("proxy")
    process = start_proxy(mock_config(mock_upstream), tmp, KEYS_ENV)
    yield process
    process.stop()


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def start(self) -> None:
        """(Re)start on the same port, empty."""
        self.process = _spawn_redis(self.port)


def _spawn_redis(port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    assert exe is not None
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 for the session; skipped, visibly, where none exists."""
    if shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server is not installed and could not be (make test installs it with "
            "apt-get): the Redis storage tests are skipped"
        )
    server = RedisServer(free_port(), None)  # type: ignore[arg-type]
    server.start()
    yield server
    server.stop()
