"""What choosing a deployment costs per request: ``failover.candidates`` (health of each
deployment, the strategy's order, session affinity) on a real runtime with a pool of three,
for each strategy, with and without a session key. No I/O: the figure is pure CPU.

    .venv/bin/python bench/choosing.py
"""

from __future__ import annotations

import timeit

from proxy.config import parse_config
from proxy.context import RequestContext
from proxy.failover import candidates
from proxy.runtime import build_runtime

CONFIG = """
backends:
  a: {{base_url: "http://127.0.0.1:1/v1", keys: [{{id: a1, key: sk-a1}}, {{id: a2, key: sk-a2}}]}}
  b: {{base_url: "http://127.0.0.1:2/v1", keys: [{{id: b1, key: sk-b1}}]}}
  c: {{base_url: "http://127.0.0.1:3/v1", keys: [{{id: c1, key: sk-c1}}]}}
routes:
  - prefix: kimi
    strategy: {strategy}
    deployments:
      - {{backend: a, model: kimi-a, weight: 3}}
      - {{backend: b, model: kimi-b, weight: 1}}
      - {{backend: c, model: kimi-c}}
"""


def per_call_us(strategy: str, session: str | None, n: int = 50_000) -> float:
    runtime = build_runtime(parse_config(CONFIG.format(strategy=strategy), "bench.yaml", {}))
    target = runtime.router.resolve("kimi")
    assert target is not None and target.pool is not None
    ctx = RequestContext("POST", "/v1/chat/completions")
    ctx.session = session
    return (
        min(timeit.repeat(lambda: candidates(runtime, target, ctx), number=n, repeat=5)) / n * 1e6
    )


def main() -> None:
    print("strategy     no session   session")
    for strategy in ("weighted", "least-busy", "latency"):
        plain = per_call_us(strategy, None)
        sticky = per_call_us(strategy, "prompt-cache-key-0123456789")
        print(f"{strategy:<12} {plain:8.2f} µs {sticky:8.2f} µs")


if __name__ == "__main__":
    main()
