"""The runtime's background loops survive anything and report every probe's outcome."""

from __future__ import annotations

import asyncio

from proxy.config import parse_config
from proxy.keys import KeyState
from proxy.runtime import build_runtime

CONFIG = """
backends:
  b:
    base_url: http://127.0.0.1:1/v1
    keys: [{id: k, key: sk-loops-000000000001}]
    key_probe_interval: 10ms
    discover_models: true
    discover_interval: 10ms
    breaker: {failures: 1, min_open: 10ms, max_open: 10ms}
"""


def test_the_invalid_key_probe_and_discovery_survive_an_exception_and_go_on():
    async def run() -> tuple[KeyState, tuple[str, ...], int]:
        runtime = build_runtime(parse_config(CONFIG, "t.yaml", {}))
        calls = 0

        async def flaky_list_models(key: str) -> tuple[int | str, list[str]]:
            nonlocal calls
            calls += 1
            if calls <= 4:
                raise RuntimeError("a bug somewhere below")
            return 200, ["m1"]

        async def flaky_check_key(auth: tuple[str, str]) -> tuple[int | str, bytes]:
            nonlocal calls
            calls += 1
            if calls <= 4:
                raise RuntimeError("a bug somewhere below")
            return 200, b""

        runtime.upstreams["b"].list_models = flaky_list_models  # type: ignore[method-assign]
        runtime.upstreams["b"].check_key = flaky_check_key  # type: ignore[method-assign]
        runtime.pools["b"].mark_invalid("k", "401")
        tasks = [
            asyncio.create_task(runtime._probe_invalid_keys("b")),
            asyncio.create_task(runtime._discover("b")),
        ]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if runtime.discovered.get("b") and runtime.pools["b"].state_of("k") is KeyState.OK:
                break
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return runtime.pools["b"].state_of("k"), runtime.discovered.get("b", ()), calls

    state, discovered, calls = asyncio.run(run())
    assert calls > 4  # the loops went on after the exceptions
    assert state is KeyState.OK
    assert discovered == ("m1",)


def test_a_cancelled_breaker_probe_frees_the_probe_slot():
    async def run() -> float:
        runtime = build_runtime(parse_config(CONFIG, "t.yaml", {}))
        breaker = runtime.breakers["b"]
        started = asyncio.Event()

        async def hanging_list_models(key: str) -> tuple[int | str, list[str]]:
            started.set()
            await asyncio.sleep(60)
            return 200, []

        async def hanging_check_key(auth: tuple[str, str]) -> tuple[int | str, bytes]:
            started.set()
            await asyncio.sleep(60)
            return 200, b""

        runtime.upstreams["b"].list_models = hanging_list_models  # type: ignore[method-assign]
        runtime.upstreams["b"].check_key = hanging_check_key  # type: ignore[method-assign]
        breaker.failure()  # open for 10 ms
        task = asyncio.create_task(runtime._probe_breaker("b"))
        await asyncio.wait_for(started.wait(), 5)  # the probe holds the slot...
        assert breaker.admit() > 0
        task.cancel()  # ...and a reload stops it half-way
        await asyncio.gather(task, return_exceptions=True)
        return breaker.admit()

    assert asyncio.run(run()) == 0  # the slot is free: the next request probes
