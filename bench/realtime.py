"""Realtime relay throughput: text frames through one WebSocket session.

One client session sends text events (``BENCH_AUDIO_BYTES`` of base64 audio each, 24 by
default) as fast as a window of ``WINDOW`` frames in flight allows; the fake Realtime
upstream echoes each one, so every echo is two frames relayed by the proxy (client →
upstream, upstream → client). Runs ``SECONDS`` (default 3) against the upstream directly,
then through the proxy; prints frames/s and the proxy's CPU time per relayed frame (from
/proc). Bounded: each run stops at its deadline.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import start_proxy  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
WINDOW = int(os.environ.get("BENCH_WINDOW", "64"))
AUDIO = int(os.environ.get("BENCH_AUDIO_BYTES", "24"))  # base64 characters per event
FRAME = '{"type":"input_audio_buffer.append","audio":"' + "A" * AUDIO + '"}'
CLIENT_KEY = "sk-bench-realtime-client-0001"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def echo_run(url: str, headers: dict[str, str]) -> int:
    """Echoes completed within ``SECONDS``, with at most ``WINDOW`` frames in flight."""
    async with connect(url, additional_headers=headers, max_size=None, compression=None) as ws:
        await ws.recv()  # session.created
        window = asyncio.Semaphore(WINDOW)
        deadline = time.monotonic() + SECONDS
        echoes = 0

        async def sender() -> None:
            while time.monotonic() < deadline:
                await window.acquire()
                await ws.send(FRAME)

        async def receiver() -> None:
            nonlocal echoes
            while True:
                await ws.recv()
                echoes += 1
                window.release()

        tasks = [asyncio.ensure_future(sender()), asyncio.ensure_future(receiver())]
        await asyncio.sleep(SECONDS)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return echoes


def main() -> None:
    upstream = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "realtime_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert upstream.stdout is not None
    port = int(upstream.stdout.readline().split()[1])
    config = f"""
clients: [{{id: bench, key: "{CLIENT_KEY}"}}]
backends:
  rt:
    base_url: http://127.0.0.1:{port}/v1
    keys: [{{id: main, key: "sk-bench-upstream-000000001"}}]
    models: [gpt-realtime]
"""
    with tempfile.TemporaryDirectory() as tmp:
        proxy = start_proxy(config, Path(tmp))
        try:
            direct = asyncio.run(
                echo_run(
                    f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime",
                    {"Authorization": "Bearer sk-bench-upstream-000000001"},
                )
            )
            before = cpu_seconds(proxy.process.pid)
            proxied = asyncio.run(
                echo_run(
                    f"ws://127.0.0.1:{proxy.port}/v1/realtime?model=gpt-realtime",
                    {"Authorization": f"Bearer {CLIENT_KEY}"},
                )
            )
            cpu = cpu_seconds(proxy.process.pid) - before
        finally:
            proxy.stop()
            upstream.terminate()
            upstream.wait(timeout=5)
    relayed = 2 * proxied
    print(
        f"# realtime relay, {SECONDS:g} s per run, window {WINDOW}, {len(FRAME)}-byte text frames"
    )
    print(f"direct echoes/s: {direct / SECONDS:,.0f}")
    print(f"proxied echoes/s: {proxied / SECONDS:,.0f} ({relayed / SECONDS:,.0f} frames/s relayed)")
    print(f"proxy CPU: {cpu:.2f} s = {cpu / max(relayed, 1) * 1e6:.1f} us per relayed frame")


if __name__ == "__main__":
    main()
