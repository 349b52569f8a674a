"""The Redis object store against a real redis-server: what replicas share, what garbage in
Redis does (nothing), and a Redis that is gone or hung (lookups miss fast, nothing raises)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from proxy.objects import (
    REDIS_PREFIX,
    Placement,
    RedisObjects,
    known_placements,
    make_object_store,
)
from proxy.throttle import make_storage
from tests.conftest import RedisServer, _spawn_redis, free_port

pytestmark = pytest.mark.e2e  # a real redis-server process

TTL = 30 * 24 * 3600.0


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be stopped or frozen."""
    server = RedisServer(free_port(), None)  # type: ignore[arg-type]
    server.process = _spawn_redis(server.port)
    yield server
    if server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def bare_store(url: str, ttl: float = TTL) -> RedisObjects:
    client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return RedisObjects(client, ttl)


def test_round_trip_shared_between_replicas_with_ttl(redis_server: RedisServer) -> None:
    async def run() -> tuple[Placement | None, Placement | None, Placement | None]:
        writer, reader = bare_store(redis_server.url), bare_store(redis_server.url)
        try:
            await writer.remember(["file-rt1", "resp_rt2"], "openai", "key-b")
            return (
                await reader.lookup(["nope", "resp_rt2"]),
                await reader.lookup(["file-rt1"]),
                await reader.lookup(["never-seen"]),
            )
        finally:
            await writer.client.aclose()
            await reader.client.aclose()

    assert asyncio.run(run()) == (
        Placement("openai", "key-b"),
        Placement("openai", "key-b"),
        None,
    )
    direct = redis.Redis.from_url(redis_server.url)
    assert direct.get(REDIS_PREFIX + "file-rt1") == b"openai\x1fkey-b"
    assert TTL - 5 < direct.ttl(REDIS_PREFIX + "file-rt1") <= TTL
    direct.close()


def test_through_the_throttle_storage(redis_server: RedisServer) -> None:
    """The factory over ``make_storage``'s Store: its pool and health-aware guard."""

    async def run() -> tuple[Placement | None, int]:
        storage = make_storage(redis_server.url)
        try:
            store = make_object_store(storage.redis, 60.0, guard=storage.call)
            await store.remember(["batch_thr"], "azure", "k1")
            return await store.lookup(["batch_thr"]), store.errors
        finally:
            await storage.close()

    assert asyncio.run(run()) == (Placement("azure", "k1"), 0)
    direct = redis.Redis.from_url(redis_server.url)
    assert 55 < direct.ttl(REDIS_PREFIX + "batch_thr") <= 60
    direct.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"no-separator",
        b"\x1fkey",
        b"backend\x1f",
        b"a\x1fb\x1fc\x1fd",  # backend, key, owner: three names at most
        b"a\nb\x1fk",
        b"\xff\xfe\x1f\x00",
        b"b" * 300 + b"\x1fk",
        b"x" * 100_000,
    ],
)
def test_garbage_in_redis_is_not_found(redis_server: RedisServer, garbage: bytes) -> None:
    direct = redis.Redis.from_url(redis_server.url)
    direct.set(REDIS_PREFIX + "file-garbage", garbage)
    direct.set(REDIS_PREFIX + "file-good", b"openai\x1fk2")
    direct.close()

    async def run() -> tuple[Placement | None, Placement | None]:
        store = bare_store(redis_server.url)
        try:
            return (
                await store.lookup(["file-garbage"]),
                await store.lookup(["file-garbage", "file-good"]),
            )
        finally:
            await store.client.aclose()

    assert asyncio.run(run()) == (None, Placement("openai", "k2"))


def test_placements_outside_the_config_are_not_found(redis_server: RedisServer) -> None:
    direct = redis.Redis.from_url(redis_server.url)
    direct.set(REDIS_PREFIX + "vs_removed", b"removed-backend\x1fk1")
    direct.set(REDIS_PREFIX + "vs_kept", b"openai\x1fk1")
    direct.close()
    known = known_placements({"openai": ["k1"]})

    async def run() -> tuple[Placement | None, Placement | None]:
        store = bare_store(redis_server.url)
        try:
            return (
                await store.lookup(["vs_removed"], known),
                await store.lookup(["vs_removed", "vs_kept"], known),
            )
        finally:
            await store.client.aclose()

    assert asyncio.run(run()) == (None, Placement("openai", "k1"))


def test_names_redis_cannot_hold_are_not_written(redis_server: RedisServer) -> None:
    async def run() -> Placement | None:
        store = bare_store(redis_server.url)
        try:
            await store.remember(["file-sep"], "open\x1fai", "k1")
            return await store.lookup(["file-sep"])
        finally:
            await store.client.aclose()

    assert asyncio.run(run()) is None


def _outage_run(url: str, guarded: bool) -> tuple[Placement | None, float, int]:
    async def run() -> tuple[Placement | None, float, int]:
        storage = make_storage(url) if guarded else None
        if storage is not None:
            store = make_object_store(storage.redis, TTL, guard=storage.call)
        else:
            store = bare_store(url)
        try:
            started = time.monotonic()
            await store.remember(["file-out"], "openai", "k1")
            found = await store.lookup(["file-out"])
            found = found or await store.lookup(["file-out", "resp_out"])
            return found, time.monotonic() - started, store.errors
        finally:
            if storage is not None:
                await storage.close()

    return asyncio.run(run())


@pytest.mark.parametrize("guarded", [False, True], ids=["bare-client", "throttle-storage"])
def test_redis_stopped_misses_fast(
    own_redis: RedisServer, guarded: bool, caplog: pytest.LogCaptureFixture
) -> None:
    own_redis.stop()
    with caplog.at_level(logging.ERROR, logger="proxy.objects"):
        found, took, failures = _outage_run(own_redis.url, guarded)
    assert found is None
    assert took < 1.0
    assert failures == 3  # a remember and two lookups, each failed open
    assert len([r for r in caplog.records if r.name == "proxy.objects"]) == 1  # once a minute


@pytest.mark.parametrize("guarded", [False, True], ids=["bare-client", "throttle-storage"])
def test_redis_hung_misses_within_a_second(own_redis: RedisServer, guarded: bool) -> None:
    process: subprocess.Popen[bytes] = own_redis.process
    os.kill(process.pid, signal.SIGSTOP)  # accepts connections (backlog), never answers
    try:
        started = time.monotonic()
        found, _, failures = _outage_run(own_redis.url, guarded)
        took = time.monotonic() - started
    finally:
        os.kill(process.pid, signal.SIGCONT)
    assert found is None
    assert failures >= 1
    assert took < 3 * 1.0  # three calls, each under a second


def test_owners_are_shared_between_replicas_and_the_first_owner_keeps_an_id(
    redis_server: RedisServer,
) -> None:
    from proxy.objects import Record

    async def run() -> tuple[dict[str, Record], dict[str, Record]]:
        one, two = bare_store(redis_server.url), bare_store(redis_server.url)
        try:
            await one.remember(["file-own1", "resp_own2"], "openai", "k1", "team-a")
            await two.remember(["file-own1"], "openai", "k2", "team-b")  # cannot take it
            await two.remember(["file-legacy"], "openai", "k1")  # open proxy: no owner
            return (
                await two.records(["file-own1", "resp_own2", "file-legacy", "file-none"]),
                await one.records([]),
            )
        finally:
            await one.client.aclose()
            await two.client.aclose()

    found, nothing = asyncio.run(run())
    assert found == {
        "file-own1": Record(Placement("openai", "k1"), "team-a"),
        "resp_own2": Record(Placement("openai", "k1"), "team-a"),
        "file-legacy": Record(Placement("openai", "k1"), None),
    }
    assert nothing == {}


def test_a_batch_files_line_count_rides_in_its_placement(redis_server: RedisServer) -> None:
    async def run() -> tuple[Placement | None, Placement | None]:
        store = bare_store(redis_server.url)
        try:
            await store.remember(["file-lines"], "openai", "key-b", lines=50_000)
            await store.remember(["file-plain"], "openai", "key-b")
            return await store.lookup(["file-lines"]), await store.lookup(["file-plain"])
        finally:
            await store.client.aclose()

    with_lines, plain = asyncio.run(run())
    assert with_lines is not None and with_lines.lines == 50_000
    assert plain is not None and plain.lines is None
    assert with_lines in known_placements({"openai": ["key-b"]})  # still where it lives
    direct = redis.Redis.from_url(redis_server.url)
    assert direct.get(REDIS_PREFIX + "file-lines") == b"openai\x1fkey-b\x1f\x1f50000"
    direct.set(REDIS_PREFIX + "file-bad-lines", b"openai\x1fkey-b\x1f\x1f-1")
    direct.close()

    async def garbage() -> Placement | None:
        store = bare_store(redis_server.url)
        try:
            return await store.lookup(["file-bad-lines"])
        finally:
            await store.client.aclose()

    assert asyncio.run(garbage()) is None


def test_long_non_ascii_names_read_back_as_written(redis_server: RedisServer) -> None:
    """Names are bounded in characters, not bytes: 256 'é' (512 bytes each) round-trip."""
    from proxy.objects import Record

    backend, key, owner = "é" * 256, "ü" * 256, "ß" * 256

    async def run() -> dict[str, Record]:
        store = bare_store(redis_server.url)
        try:
            await store.remember(["file-wide"], backend, key, owner, lines=123)
            return await store.records(["file-wide"])
        finally:
            await store.client.aclose()

    assert asyncio.run(run()) == {"file-wide": Record(Placement(backend, key, 123), owner)}
