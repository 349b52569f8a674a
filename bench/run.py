"""`make bench`: the same load against the mock upstream directly and through the proxy.

Starts the mock upstream, one proxy process (access log on, as in production) and the
minimal proxy (``bench/minimal_proxy.py``: the floor), drives all three with wrk (chat, and
streams of 20 and 500 chunks, at c=1/16/64, each run bounded in time), reads each proxy's
CPU time from /proc, and measures stream first byte with an upstream that waits 50 ms
before its first chunk. Prints one Markdown table: ``vs minimal`` is our requests per
second over the minimal proxy's; CPU per chunk is for the 500-chunk streams.

Environment: BENCH_SECONDS (per run, default 5), BENCH_CONCURRENCY (default "1,16,64"),
BENCH_MODEL (default "bench"; "bench-pool" goes through a pool of three deployments),
BENCH_TELEMETRY=1 (traces and GenAI metrics on, exported to an OTLP sink in this process),
BENCH_LOADS (rows to run, e.g. "chat"; default all), BENCH_NO_EXTRAS=1 (no first-byte,
RSS and two-worker figures), BENCH_TLS=1 (the upstream over https with a self-signed
certificate both proxies are told to trust: the proxy through its backends' ``ca_file``).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' mock upstream and its certificate helper
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_CONCURRENCY", "1,16,64").split(",")]
CLK_TCK = os.sysconf("SC_CLK_TCK")

TELEMETRY = os.environ.get("BENCH_TELEMETRY") == "1"
TLS = os.environ.get("BENCH_TLS") == "1"
MODEL = os.environ.get("BENCH_MODEL", "bench")  # bench-pool: three deployments, weighted
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
STREAM = {
    **CHAT,
    "stream": True,
    "stream_options": {"include_usage": True},
    "mock": {"chunks": 20},
}
LONG_STREAM = {**STREAM, "mock": {"chunks": 500}}
LOADS = (("chat", CHAT, 1), ("stream 20 chunks", STREAM, 20), ("stream 500", LONG_STREAM, 500))
# BENCH_LOADS=chat (or "chat,stream 500"...): only these rows, for quick A/B runs.
WANTED = os.environ.get("BENCH_LOADS")
if WANTED:
    LOADS = tuple(load for load in LOADS if load[0] in WANTED.split(","))


def otlp_sink() -> str:
    """A collector that takes every export and answers 200 (its CPU is not the proxy's)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def bench_config(ca_file: Path | None) -> str:
    """bench/config.yaml, with telemetry on when BENCH_TELEMETRY=1, and the backends told
    to trust ``ca_file`` (BENCH_TLS=1)."""
    if not TELEMETRY and ca_file is None:
        return "bench/config.yaml"
    text = (ROOT / "bench" / "config.yaml").read_text()
    if ca_file is not None:
        line = 'base_url: "${BENCH_UPSTREAM}/v1"'
        text = text.replace(line, f"{line}\n    ca_file: {ca_file}")
    if TELEMETRY:
        text += f"\ntelemetry: {{otlp_endpoint: {otlp_sink()!r}}}\n"
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(text)
    return str(path)


def certificate() -> tuple[Path, Path]:
    from tests.mock_upstream import self_signed_certificate  # (bench/ runs from the root)

    return self_signed_certificate(Path(tempfile.mkdtemp()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None):
    out = log.open("wb") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_until_up(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        return float("nan")  # wrk printed no figure (e.g. -nan when nothing succeeded)
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3.6e6}[unit]


def wrk(
    url: str, body: dict, concurrency: int, lua_dir: Path, headers: dict[str, str] | None = None
) -> WrkResult:
    script = lua_dir / f"body-{abs(hash(json.dumps([body, headers])))}.lua"
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Authorization"] = "Bearer sk-bench-client"\n' + extra
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{SECONDS}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=SECONDS + 30,
    ).stdout
    if "50%" not in out or "requests in" not in out:
        print(f"wrk printed no result for {url} at c={concurrency}:\n{out}", file=sys.stderr)
        raise RuntimeError("wrk printed no result")
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return WrkResult(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        requests=requests,
        p50_ms=_ms(re.search(r"50%\s+(\S+)", out)[1]),  # type: ignore[index]
        p99_ms=_ms(re.search(r"99%\s+(\S+)", out)[1]),  # type: ignore[index]
        errors=errors,
    )


async def first_byte_ms(url: str, model: str, n: int = 40) -> float:
    """p50 time to the first body byte of a stream whose upstream waits 50 ms first."""
    body = {
        "model": model,
        "stream": True,
        "messages": [],
        "mock": {"first_chunk_delay": 0.05, "chunks": 3},
    }
    data = json.dumps(body).encode()
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-bench-client\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    samples = []
    reader, writer = await asyncio.open_connection(host, int(port))  # kept alive, as SDKs do
    for _ in range(n):
        start = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"expected a stream, got {head[:80]!r}")
        await reader.readuntil(b"\r\n")  # the first chunk's size line: its data is here
        samples.append((time.perf_counter() - start) * 1000)
        await reader.readuntil(b"\r\n0\r\n\r\n")  # the rest of the stream
    writer.close()
    await writer.wait_closed()
    return statistics.median(samples)


def main() -> int:
    if subprocess.run(["which", "wrk"], capture_output=True).returncode != 0:
        print("wrk is not installed: run bench/install-wrk.sh", file=sys.stderr)
        return 1
    mock_port, proxy_port, minimal_port = free_port(), free_port(), free_port()
    scheme, tls_args, ca_file = "http", list[str](), None
    if TLS:
        cert, key = certificate()
        scheme, tls_args, ca_file = "https", ["--cert", str(cert), "--key", str(key)], cert
    mock = start(
        [
            sys.executable,
            "tests/mock_upstream.py",
            "--port",
            str(mock_port),
            "--no-record",
            *tls_args,
        ]
    )
    upstream = f"{scheme}://127.0.0.1:{mock_port}"
    env = {**os.environ, "BENCH_UPSTREAM": upstream}
    log = Path(tempfile.mkdtemp()) / "proxy.log"
    proxy_cmd = [sys.executable, "-m", "proxy", "serve", "--config", bench_config(ca_file)]
    proxy = start([*proxy_cmd, "--port", str(proxy_port)], env=env, log=log)
    minimal_env = {**env, "MINIMAL_PORT": str(minimal_port)}
    if ca_file is not None:
        minimal_env["BENCH_CA_FILE"] = str(ca_file)
    minimal = start([sys.executable, "bench/minimal_proxy.py"], env=minimal_env, log=log)
    try:
        wait_until_up(mock_port)
        wait_until_up(proxy_port)
        wait_until_up(minimal_port)
        time.sleep(0.5)
        idle_rss = rss_mb(proxy.pid)
        lua_dir = Path(tempfile.mkdtemp())
        direct = f"{upstream}/v1/chat/completions"
        through = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        floor = f"http://127.0.0.1:{minimal_port}/v1/chat/completions"
        print(
            f"# bench: {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, "
            f"{SECONDS}s per run, wrk -t1{', telemetry on' if TELEMETRY else ''}"
            f"{', upstream over TLS' if TLS else ''}"
        )
        print()
        print(
            "| load | c | direct RPS | minimal RPS | proxy RPS | vs minimal | "
            "proxy p50/p99 ms | minimal CPU ms/req | proxy CPU ms/req | proxy CPU µs/chunk "
            "| errors |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, body, chunks in LOADS:
            direct_body = {**body, "model": "bench-model"}
            wrk(through, body, 4, lua_dir)  # warm-up: connection pools, caches
            wrk(floor, direct_body, 4, lua_dir)
            for c in CONCURRENCY:
                d = wrk(direct, direct_body, c, lua_dir)
                m, m_cpu = measured(minimal.pid, floor, direct_body, c, lua_dir)
                p, cpu = measured(proxy.pid, through, body, c, lua_dir)
                per_chunk = f"{cpu * 1000 / chunks:.2f}" if chunks > 1 else ""
                print(
                    f"| {name} | {c} | {d.rps:,.0f} | {m.rps:,.0f} | {p.rps:,.0f} | "
                    f"{p.rps / m.rps:.2f}x | {p.p50_ms:.2f} / {p.p99_ms:.2f} | {m_cpu:.3f} | "
                    f"{cpu:.3f} | {per_chunk} | {p.errors + m.errors} |",
                    flush=True,
                )
        if os.environ.get("BENCH_NO_EXTRAS") == "1":
            mock.terminate()
            mock.wait(timeout=10)
            return 0
        one_worker = wrk(through, CHAT, 64, lua_dir).rps
        minimal_fb = asyncio.run(first_byte_ms(floor, "bench-model"))
        proxy_fb = asyncio.run(first_byte_ms(through, "bench"))
        # (wrk speaks TLS; this probe does not: over TLS, the minimal proxy is the baseline)
        direct_fb = minimal_fb if TLS else asyncio.run(first_byte_ms(direct, "bench-model"))
        print()
        print(
            f"stream first byte, upstream waits 50 ms: direct p50 {direct_fb:.2f} ms"
            f"{' (the minimal proxy)' if TLS else ''}, minimal proxy {minimal_fb:.2f} ms, "
            f"proxy {proxy_fb:.2f} ms: added {proxy_fb - direct_fb:.2f} ms"
        )
        print(f"proxy RSS: idle {idle_rss:.0f} MB, after load {rss_mb(proxy.pid):.0f} MB")
    finally:
        for process in (proxy, minimal):
            process.terminate()
            process.wait(timeout=10)
    try:
        port2 = free_port()
        two = start([*proxy_cmd, "--port", str(port2), "--workers", "2"], env=env, log=log)
        wait_until_up(port2)
        time.sleep(1.5)
        url2 = f"http://127.0.0.1:{port2}/v1/chat/completions"
        wrk(url2, CHAT, 8, lua_dir)  # warm-up
        two_workers = wrk(url2, CHAT, 64, lua_dir).rps
        print(
            f"chat c=64, --workers 2: {two_workers:,.0f} RPS vs {one_worker:,.0f} with one "
            f"worker ({two_workers / one_worker:.2f}x; wrk and the mock share the same 2 cores)"
        )
        two.terminate()
        two.wait(timeout=15)
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    return 0


def measured(pid: int, url: str, body: dict, c: int, lua_dir: Path) -> tuple[WrkResult, float]:
    """One wrk run against the process ``pid`` serves, and its CPU ms per request."""
    before = cpu_seconds(pid)
    result = wrk(url, body, c, lua_dir)
    return result, (cpu_seconds(pid) - before) * 1000 / max(result.requests, 1)


if __name__ == "__main__":
    sys.exit(main())
