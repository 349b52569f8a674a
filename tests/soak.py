"""A bounded soak: mixed traffic through one proxy process, then the books must balance.

`make soak` runs 20,000 requests at concurrency 64; the test suite runs a short version.
Mix: plain and streamed chat, upstream 500s and 429s, client disconnects mid-stream, and
the throttled answers those provoke. Checks: every request not abandoned on purpose got a
complete answer (a 2xx, or an OpenAI error body); no stream is left open
(`llm_proxy_streams_active` back to 0); resident memory after the run is within 20 MB of
its value after the first 1,000 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.conftest import start_mock, start_proxy

CLIENT = "sk-soak-client-00000000000001"
ADMIN = "adm-soak-000000000000000002"


def soak_config(mock_url: str) -> str:
    return f"""
server: {{admin_key: "{ADMIN}"}}
throttle: {{reconnect: {{base: 0.2s, max: 2s}}}}
clients: [{{id: soak, key: "{CLIENT}"}}]
backends:
  mock:
    base_url: {mock_url}/v1
    keys:
      - {{id: soak-a, key: "sk-soak-aaaaaaaaaaaaaaaa"}}
      - {{id: soak-b, key: "sk-soak-bbbbbbbbbbbbbbbb"}}
    breaker: {{failures: 1000}}
aliases: {{soak: soak-model}}
routes: [{{prefix: "", backend: mock}}]
"""


@dataclass
class Report:
    sent: int = 0
    answered: dict[int, int] = field(default_factory=dict)
    abandoned: int = 0  # disconnects on purpose
    lost: list[str] = field(default_factory=list)  # anything else: must stay empty
    rss_after_1000_mb: float = 0.0
    rss_end_mb: float = 0.0
    streams_active_end: float = -1
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and self.streams_active_end == 0
            and self.rss_end_mb - self.rss_after_1000_mb <= 20
        )


def kind_of(i: int) -> str:
    return ("chat", "stream", "chat", "stream", "error", "disconnect", "chat", "limited")[i % 8]


def body_for(i: int) -> dict:
    kind = kind_of(i)
    if kind == "chat":
        return {"model": "soak", "messages": [{"role": "user", "content": "hi"}]}
    if kind == "stream":
        return {
            "model": "soak",
            "stream": True,
            "stream_options": {"include_usage": True},
            "mock": {"chunks": 10},
        }
    if kind == "error":  # many models, so the reconnect throttle sees several streams of them
        return {"model": f"soak-err-{i % 16}", "mock": {"status": 500}}
    if kind == "limited":
        return {
            "model": f"soak-429-{i % 16}",
            "mock": {"status": 429, "headers": {"retry-after": "0"}},
        }
    return {"model": "soak", "stream": True, "mock": {"chunks": 40, "chunk_delay": 0.01}}


async def one(session: aiohttp.ClientSession, url: str, i: int, report: Report) -> None:
    body = body_for(i)
    headers = {"authorization": f"Bearer {CLIENT}"}
    try:
        async with session.post(url, json=body, headers=headers) as response:
            if kind_of(i) == "disconnect":
                await response.content.readany()
                response.close()  # the client goes away mid-stream
                report.abandoned += 1
                return
            data = await response.read()
            report.answered[response.status] = report.answered.get(response.status, 0) + 1
            if response.status == 200 and body.get("stream"):
                if not data.endswith(b"data: [DONE]\n\n"):
                    report.lost.append(f"#{i}: stream without [DONE]: {data[-80:]!r}")
            elif response.status >= 400:
                error = json.loads(data).get("error", {})
                if not {"message", "type", "param", "code"} <= set(error):
                    report.lost.append(f"#{i}: {response.status} without an OpenAI error body")
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        report.lost.append(f"#{i}: {type(exc).__name__}: {exc}")


def rss_mb(pid: int) -> float:
    """Resident memory in MB; 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def drive(
    proxy_url: str, pid: int, requests: int, concurrency: int, deadline: float
) -> Report:
    report = Report()
    url = f"{proxy_url}/v1/chat/completions"
    counter = itertools.count()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= requests:
                    return
                report.sent += 1
                await one(session, url, i, report)
                if i == 1000:
                    report.rss_after_1000_mb = rss_mb(pid)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await asyncio.sleep(0.5)  # let cancelled upstream calls and the access log settle
        report.rss_end_mb = rss_mb(pid)
        admin = {"authorization": f"Bearer {ADMIN}"}
        async with session.get(f"{proxy_url}/metrics", headers=admin) as response:
            for line in (await response.text()).splitlines():
                if line.startswith("llm_proxy_streams_active{"):
                    report.streams_active_end = max(report.streams_active_end, 0) + float(
                        line.split()[-1]
                    )
    if not report.rss_after_1000_mb:
        report.rss_after_1000_mb = report.rss_end_mb
    return report


def run_soak(requests: int, concurrency: int = 64, max_seconds: float = 240) -> Report:
    mock = start_mock("--no-record")
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    proxy = start_proxy(soak_config(mock.url), tmp, extra_args=("--log-level", "warning"))
    started = time.monotonic()
    try:
        report = asyncio.run(
            drive(proxy.url, proxy.process.pid, requests, concurrency, started + max_seconds)
        )
    finally:
        proxy.stop()
        mock.process.terminate()
        mock.process.wait(timeout=10)
    report.seconds = time.monotonic() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=240)
    args = parser.parse_args()
    report = run_soak(args.requests, args.concurrency, args.max_seconds)
    print(
        f"soak: {report.sent} requests in {report.seconds:.1f} s at concurrency {args.concurrency}"
    )
    print(f"  answered by status: {dict(sorted(report.answered.items()))}")
    print(f"  abandoned on purpose (client disconnects): {report.abandoned}")
    print(f"  lost: {len(report.lost)}")
    for line in report.lost[:10]:
        print(f"    {line}")
    print(f"  llm_proxy_streams_active at the end: {report.streams_active_end:g}")
    print(
        f"  proxy RSS: {report.rss_after_1000_mb:.1f} MB after 1,000 requests, "
        f"{report.rss_end_mb:.1f} MB at the end "
        f"({report.rss_end_mb - report.rss_after_1000_mb:+.1f} MB)"
    )
    print("  result:", "OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
