"""`make profile`: where a proxied request's CPU goes, in microseconds per request.

Starts the mock upstream and one proxy (bench/config.yaml: every feature on), drives chat
at c=16 with wrk while py-spy samples the proxy without stopping it (its Python frames;
BENCH_NATIVE=1 adds native ones, but stops the process at each sample, which inflates
system calls tenfold: 8 getpid() calls per request showed as 22 µs, measured 1.6), then
sorts every sample by the frame it was in (its leaf: self time) into the layers the README
names (the proxy's own code, the aiohttp client with multidict/yarl, the event loop,
uvicorn + httptools, orjson, metrics, logging, garbage collection, ...) and prints each
layer's share of the proxy's measured CPU per request, then the 25 costliest functions.

Environment: BENCH_SECONDS (default 10), BENCH_CONCURRENCY (one value, default 16),
BENCH_LOAD (chat | stream: 20 chunks, default chat), BENCH_RATE (py-spy samples/s, 250).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (
    CHAT,
    STREAM,
    bench_config,
    cpu_seconds,
    free_port,
    start,
    wait_until_up,
    wrk,
)

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "16"))
LOAD = os.environ.get("BENCH_LOAD", "chat")
RATE = int(os.environ.get("BENCH_RATE", "250"))
NATIVE = os.environ.get("BENCH_NATIVE") == "1"

# A leaf frame's layer: the first rule whose marker is in its file (or function) wins.
LAYERS = (
    ("garbage collection", ("<gc>", "gc_collect", "gcmodule", "_PyGC", "collect_generation")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("orjson", ("orjson",)),
    ("access log, logging", ("logging/", "proxy/access_log.py", "proxy/logfmt.py")),
    ("telemetry", ("opentelemetry",)),
    ("aiohttp client, multidict, yarl", ("aiohttp", "multidict", "yarl", "propcache")),
    ("uvicorn, httptools", ("uvicorn", "httptools")),
    ("starlette", ("starlette",)),
    ("event loop (asyncio, uvloop: its C loop shows as Runner.run)", ("asyncio", "uvloop")),
    ("the proxy's own code", ("proxy/",)),
    ("rate limits (limits)", ("limits/",)),
    ("ssl", ("ssl", "libssl", "libcrypto")),
    ("kernel, libc (sockets, epoll)", ("libc.so", "libc-", "libpthread", "epoll", "send", "recv")),
)


def layer_of(frame: str) -> str:
    """The layer of a frame ``function (file:line)`` (py-spy's raw format), by its file."""
    where = frame.rpartition(" (")[2]
    for name, markers in LAYERS:
        if any(marker in where or marker in frame for marker in markers):
            return name
    return "other (interpreter, other libraries)"


def main() -> int:
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        print("py-spy is not installed (make test installs the dev tools)", file=sys.stderr)
        return 1
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    mock_port, proxy_port = free_port(), free_port()
    mock = start(
        [sys.executable, "tests/mock_upstream.py", "--port", str(mock_port), "--no-record"]
    )
    env = {**os.environ, "BENCH_UPSTREAM": f"http://127.0.0.1:{mock_port}"}
    proxy_cmd = [sys.executable, "-m", "proxy", "serve", "--config", bench_config(None)]
    proxy = start([*proxy_cmd, "--port", str(proxy_port)], env=env)
    raw = Path(tempfile.mkdtemp()) / "profile.txt"
    try:
        wait_until_up(mock_port)
        wait_until_up(proxy_port)
        lua_dir = Path(tempfile.mkdtemp())
        url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        body = STREAM if LOAD == "stream" else CHAT
        wrk(url, body, 4, lua_dir)  # warm-up
        how = ["--native"] if NATIVE else ["--nonblocking"]
        recorder = subprocess.Popen(
            [
                spy, "record", "--pid", str(proxy.pid), *how, "--rate", str(RATE),
                "--duration", str(SECONDS + 2), "--format", "raw", "--output", str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attached
        before = cpu_seconds(proxy.pid)
        result = wrk(url, body, CONCURRENCY, lua_dir)
        cpu_us = (cpu_seconds(proxy.pid) - before) * 1e6 / max(result.requests, 1)
        _, complaint = recorder.communicate(timeout=SECONDS + 60)
        if not raw.exists():
            print(f"py-spy recorded nothing: {complaint.decode()[-500:]}", file=sys.stderr)
            return 1
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
        mock.terminate()
        mock.wait(timeout=10)
    report(raw, cpu_us, result.rps)
    return 0


def report(raw: Path, cpu_us: float, rps: float) -> None:
    layers: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        if "idle" in leaf or "epoll_wait" in leaf:
            continue  # waiting, not working (py-spy samples sleeping threads too)
        n = int(count)
        total += n
        layers[layer_of(leaf)] += n
        functions[leaf] += n
    print(f"# profile: {LOAD} c={CONCURRENCY}, {rps:,.0f} req/s, {cpu_us:.0f} µs CPU per request")
    print(f"# ({total} busy samples at {RATE}/s; µs = share of samples x CPU per request)")
    print()
    print("| layer | share | µs per request |")
    print("|---|---|---|")
    for name, n in layers.most_common():
        print(f"| {name} | {n / total:.1%} | {n / total * cpu_us:.1f} |")
    print()
    print("| function (self time) | µs per request |")
    print("|---|---|")
    for name, n in functions.most_common(25):
        print(f"| `{name[:110]}` | {n / total * cpu_us:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
