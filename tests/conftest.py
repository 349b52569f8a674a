"""Fixtures that start real processes on 127.0.0.1 (the mock upstream, the proxy, Redis),
and the suite's markers: every test that starts a process is ``e2e``, so
``pytest -m "not e2e"`` runs the in-process tests only, in seconds.

The suite runs under pytest-xdist (``make test``): each worker is its own pytest session,
so the session fixtures (mock upstream, proxy, redis-server) are per worker, and the ports
each worker takes come from its own block (``free_port``).
"""

from __future__ import annotations

import itertools
import os
import random
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
STARTUP_DEADLINE = 60.0  # seconds a started process may take to answer


def rss_kb(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


# Ports for the processes the tests start come from below the kernel's ephemeral range
# (32768-60999 here; see /proc/sys/net/ipv4/ip_local_port_range), one block per xdist
# worker. A port the kernel hands out for port 0 is free when asked but, until the new
# process binds it, may be taken as the local port of any outgoing connection (the suite
# makes thousands): a flake. Ports below the range are never handed out that way, and
# workers never offer each other the same one.
_PORT_BASE = 20_000
_PORT_BLOCK = 1_000


def _worker_index() -> int:
    """0 for gw0 (or no xdist), 1 for gw1, ..."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0


def _port_candidates() -> Iterator[int]:
    """This worker's block, from a random start: another suite running at the same time
    (another checkout) rarely walks the same ports in step."""
    first = _PORT_BASE + (_worker_index() % 12) * _PORT_BLOCK
    start = random.SystemRandom().randrange(_PORT_BLOCK)
    ports = itertools.cycle(range(_PORT_BLOCK))
    return (first + (start + offset) % _PORT_BLOCK for offset in ports)


_ports = _port_candidates()


def free_port() -> int:
    """A port nothing listens on now (a plain bind, no SO_REUSEADDR: a port with
    connections still in TIME_WAIT is passed over too)."""
    for _ in range(_PORT_BLOCK):
        port = next(_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in this worker's block of {_PORT_BLOCK}")


# ---------------------------------------------------------------- markers

E2E_DIR = ROOT / "tests" / "e2e"
# Fixtures that start a process: a test using one is e2e wherever it lives.
PROCESS_FIXTURES = frozenset({"mock_upstream", "upstream", "proxy", "redis_server"})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under ``-m "not e2e"`` tests/e2e/ is not even imported: every test there is e2e,
    and importing its modules (the openai SDK among them) took longer than running the
    in-process tests."""
    only_in_process = config.getoption("markexpr", "").replace(" ", "") == "note2e"
    if only_in_process and collection_path.is_relative_to(E2E_DIR):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that starts processes ``e2e``: those under tests/e2e/ and those
    using a process fixture (the rest mark themselves with ``@pytest.mark.e2e``)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.path.is_relative_to(E2E_DIR) or fixtures & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.e2e)


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
        settings = {
            "invalid_keys": [],
            "limited_keys": {},
            "models": ["mock-model"],
            "by_model": {},
        }
        httpx.post(f"{self.url}/_mock/config", json=settings)

    def configure(self, **settings: Any) -> None:
        httpx.post(f"{self.url}/_mock/config", json=settings).raise_for_status()


# Every process the fixtures start, held until the session ends: a test that fails before
# it stops its proxy would otherwise drop a running Popen, and its ResourceWarning (an error
# here) would surface in whichever test the garbage collector happened to run in.
_started: list[subprocess.Popen[Any]] = []


def keep(process: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
    """``process``, stopped at the end of the session if nothing stopped it before."""
    _started.append(process)
    return process


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for process in _started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
    _started.clear()


def read_listening_port(process: subprocess.Popen[str], what: str) -> int:
    """The port from the ``LISTENING <port>`` line a test server prints first; its stdout
    is closed after that line (nothing else is ever printed there)."""
    assert process.stdout is not None
    with process.stdout:
        line = process.stdout.readline()
    if not line.startswith("LISTENING"):
        process.kill()
        process.wait(timeout=10)
        raise RuntimeError(f"{what} did not start: {line!r}")
    return int(line.split()[1])


def start_mock(*args: str) -> MockUpstream:
    process = subprocess.Popen(
        [sys.executable, str(MOCK), "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    keep(process)
    return MockUpstream(read_listening_port(process, "mock upstream"), process)


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
    keep(process)
    proxy = ProxyProcess(port, process, log_path)
    # A bound for a proxy that never comes up, not a speed test: on a loaded machine (the
    # suite's own parallel workers, other jobs) --workers 2 has taken over 15 s.
    deadline = time.monotonic() + STARTUP_DEADLINE
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
    process = keep(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
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


class ResourceUpstream:
    """``tests/resource_upstream.py``: a fake upstream keeping each object under the key
    that made it (files, batches, responses...)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "resource_upstream.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        keep(self.process)
        self.url = f"http://127.0.0.1:{read_listening_port(self.process, 'resource upstream')}"

    def requests(self) -> list[dict[str, Any]]:
        return [
            r
            for r in httpx.get(f"{self.url}/_mock/requests").json()
            if not r["path"].endswith("/models")
        ]

    def forget(self) -> None:
        httpx.delete(f"{self.url}/_mock/requests")


@pytest.fixture(scope="module")
def resources() -> Iterator[ResourceUpstream]:
    """One resource upstream per test module that asks for it."""
    upstream = ResourceUpstream()
    yield upstream
    upstream.process.terminate()
    upstream.process.wait(timeout=5)


@pytest.fixture(scope="module")
def fake_anthropic() -> Iterator[str]:
    """The fake Anthropic Messages upstream (tests/anthropic_upstream.py), by its URL."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "anthropic_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    keep(process)
    yield f"http://127.0.0.1:{read_listening_port(process, 'fake Anthropic upstream')}"
    process.terminate()
    process.wait(timeout=5)


CLI_CACHE = Path.home() / ".cache" / "llm-proxy-tests"  # outside the clone: installed once


def npm_cli(package: str, version: str, binary: str) -> Path:
    """An agent CLI from npm at a pinned version, installed once into ``CLI_CACHE``; the
    test is skipped, saying why, without npm or the registry."""
    folder = CLI_CACHE / f"{package.rpartition('/')[2]}-{version}"
    found = folder / "node_modules" / ".bin" / binary
    if found.exists():
        return found
    if shutil.which("npm") is None:
        pytest.skip(f"npm is not installed: {package} cannot be installed")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(folder),
                f"{package}@{version}",
                "--no-audit",
                "--no-fund",
            ],
            capture_output=True,
            timeout=180,
            check=True,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"could not install {package}@{version} from npm: {exc}")
    return found
