"""What object placement costs per request: ``named_ids`` + ``lookup`` (and ``created_ids``)
on typical payloads, in memory and, with ``--redis URL``, against a real Redis.

    .venv/bin/python bench/objects_cost.py [--redis redis://127.0.0.1:6379]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
import timeit
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from proxy.objects import MemoryObjects, ObjectStore, created_ids, named_ids, placement_for
from proxy.throttle import make_storage

CHAT = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "You are helpful."}]
    + [{"role": "user" if i % 2 else "assistant", "content": "hello " * 40} for i in range(10)],
    "temperature": 0.7,
    "stream": True,
}
SMALL = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
CHAINED = {"model": "gpt-4o", "input": "and then?", "previous_response_id": "resp_bench1"}
ANSWER = orjson.dumps(
    {"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"message": {"content": "x"}}]}
)


def per_call(fn: Callable[[], object], n: int = 200_000) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


async def per_await(make: Callable[[], Awaitable[object]], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            await make()
        best = min(best, (time.perf_counter() - started) / n * 1e6)
    return best


async def stores(store: ObjectStore, label: str, n: int) -> None:
    await store.remember(["resp_bench1"], "openai", "k1")
    for name, path, payload in (
        ("small chat, no id", "/chat/completions", SMALL),
        ("chat 11 messages, no id", "/chat/completions", CHAT),
        ("responses + previous_response_id", "/responses", CHAINED),
        ("GET /files/{id}/content", "/files/file-x1/content", None),
    ):
        us = await per_await(functools.partial(placement_for, store, path, payload), n)
        print(f"{label:7} placement_for  {name:34} {us:8.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis")
    args = parser.parse_args()
    for name, payload in (("small chat", SMALL), ("chat 11 messages", CHAT)):
        us = per_call(functools.partial(named_ids, "/chat/completions", payload))
        print(f"named_ids {name:27} {us:.2f} us")
    chat_answer: dict[str, Any] = dict(CHAT)
    us = per_call(lambda: created_ids("/chat/completions", "POST", 200, ANSWER, chat_answer))
    print(f"created_ids unstored chat answer   {us:.2f} us")
    asyncio.run(stores(MemoryObjects(), "memory", 50_000))
    if args.redis:

        async def redis_run() -> None:
            from proxy.objects import make_object_store

            storage = make_storage(args.redis)
            try:
                store = make_object_store(storage.redis, 60.0, guard=storage.call)
                await stores(store, "redis", 2_000)
                us = await per_await(lambda: store.remember(["file-b1"], "openai", "k1"), 2_000)
                print(f"redis   remember one id {us:8.2f} us")
            finally:
                await storage.close()

        asyncio.run(redis_run())


if __name__ == "__main__":
    main()
