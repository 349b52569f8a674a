"""1,000 concurrent slow streams through one proxy worker (part of `make bench`).

Each stream sends one chunk every 100 ms for 10 s. Checks: every stream's bytes equal the
upstream's, zero errors, and the proxy's peak resident memory (target: <= 150 MB).
Bounded: the whole run stops after 60 s.

``BENCH_STREAMS=10000``: each stream holds two of the proxy's fds and one of the load
generator's and the mock's, so the open-file limit is raised (its hard limit too, which
needs root) before the processes start; they inherit it. The streams open over
``BENCH_RAMP`` seconds (default: 1 s per 2,000), as clients do: 10,000 connects in the
same millisecond overflow the kernel's accept queues (``somaxconn``) and measure the SYN
retry timer, not the proxy.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import start_mock, start_proxy

STREAMS = int(os.environ.get("BENCH_STREAMS", "1000"))
RAMP = float(os.environ.get("BENCH_RAMP", str(STREAMS / 2000)))


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError) as exc:  # raising the hard limit needs CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(f"note: open files stay at {hard} ({exc}): fewer streams than asked may fit")


BODY = {"model": "slow", "stream": True, "mock": {"chunks": 100, "chunk_delay": 0.1}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(proxy_url: str, mock_url: str, pid: int) -> dict:
    headers = {"authorization": "Bearer sk-bench"}
    timeout = aiohttp.ClientTimeout(total=50)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async with session.post(f"{mock_url}/v1/chat/completions", json=BODY, headers=headers) as r:
            expected = await r.read()
        peak = rss_mb(pid)
        errors: list[str] = []
        done = 0

        async def one() -> None:
            nonlocal done
            try:
                async with session.post(
                    f"{proxy_url}/v1/chat/completions", json=BODY, headers=headers
                ) as response:
                    data = await response.read()
                if data == expected:
                    done += 1
                else:
                    errors.append(f"status {response.status}, {len(data)} of {len(expected)} bytes")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:120])

        started = time.monotonic()
        tasks = []
        for i in range(STREAMS):
            tasks.append(asyncio.create_task(one()))
            if RAMP and i % 100 == 99:
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(RAMP / STREAMS * 100)
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.25)
        return {
            "seconds": time.monotonic() - started,
            "ok": done,
            "errors": errors,
            "peak_rss_mb": peak,
            "bytes": len(expected),
        }


def main() -> int:
    raise_open_files(2 * STREAMS + 2048)
    mock = start_mock("--no-record")
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    config = f"""
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: bench, key: sk-bench-000000000001}}]
routes: [{{prefix: "", backend: mock}}]
server: {{max_connections: {STREAMS + 100}}}
"""
    proxy = start_proxy(config, tmp, extra_args=("--log-level", "warning"))
    try:
        idle = rss_mb(proxy.process.pid)
        result = asyncio.run(asyncio.wait_for(run(proxy.url, mock.url, proxy.process.pid), 60))
    finally:
        proxy.stop()
        mock.process.terminate()
    print(f"{STREAMS} concurrent slow streams (100 chunks, one every 100 ms) through one worker:")
    print(
        f"  {result['ok']} complete and byte-identical ({result['bytes']} bytes each), "
        f"{len(result['errors'])} errors, in {result['seconds']:.1f} s"
    )
    print(f"  proxy RSS: idle {idle:.0f} MB, peak {result['peak_rss_mb']:.0f} MB")
    for error in result["errors"][:5]:
        print(f"    {error}")
    return 0 if not result["errors"] and result["ok"] == STREAMS else 1


if __name__ == "__main__":
    sys.exit(main())
