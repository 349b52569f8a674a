"""The runtime snapshot: everything a request needs, built once from one config.

A request takes the current snapshot at its start and uses only that, so a config reload
(a new snapshot, one reference swapped) never changes a request half-way.

A snapshot's own fields never change. What it learns while it serves (requests in flight,
discovered models, backends not yet seen answering, its background tasks) is in one
explicit holder, ``Runtime.state``; the objects it holds keep their own state (key health
in the pools, circuits in the breakers, both carried over to the next snapshot by
``build_runtime``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy import metrics
from proxy.attempt import probe
from proxy.balance import DeploymentStats
from proxy.batch_spend import BatchSpend
from proxy.breaker import PROBE_TIMEOUT, Breaker, ModelCircuits
from proxy.classify import Verdict
from proxy.clients import ClientAuth
from proxy.config import BackendConfig, Config
from proxy.context import ANONYMOUS
from proxy.conversations import Conversations
from proxy.dialects import Dialect
from proxy.keys import KeyPool, build_pools
from proxy.objects import (
    MemoryObjects,
    ObjectStore,
    Placement,
    known_placements,
    make_object_store,
)
from proxy.pricing import Prices
from proxy.redact import NO_SECRETS, Redactor
from proxy.routing import Router, usable_model_id
from proxy.shared import SYNC_INTERVAL, SharedState
from proxy.spend import Spend
from proxy.telemetry import Telemetry
from proxy.throttle import Store, Throttle, make_storage
from proxy.upstream import Upstream

log = logging.getLogger("proxy")

BREAKER_TICK = 1.0  # how often a closed circuit is looked at by its background probe
LOOP_RETRY = 5.0  # a background loop that failed unexpectedly tries again after this
VERIFY_MAX_WAIT = 60.0  # a backend not answering yet is asked again at least this often
MAX_DISCOVERED = 10_000  # model ids kept from one backend's list


@dataclass(slots=True)
class RuntimeState:
    """The only mutable part of a snapshot: what it learns while it serves."""

    in_flight: int = 0  # requests using this snapshot: its pools close after the last
    discovered: dict[str, tuple[str, ...]] = field(default_factory=dict)  # backend -> ids
    # Backends not yet seen answering (new ones, at start or after a reload): /ready does
    # not count them until their first GET /models comes back (a dummy key for a local
    # server that is not running must not make the proxy look ready).
    unverified: set[str] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # background work
    # Unverified backends already logged as not answering: their coming back is logged too.
    unanswering: set[str] = field(default_factory=set)
    # Confirming probes of refused keys: at most one per key (KeyPool.begin_confirm).
    confirming: set[asyncio.Task[None]] = field(default_factory=set)

    def verified(self, backend: str) -> None:
        """``backend`` answered (a request, or the start-up check): /ready counts it."""
        if self.unverified:
            self.unverified.discard(backend)
            if backend in self.unanswering:  # the warnings stop: say why, once
                self.unanswering.discard(backend)
                log.info("backend %s: answering again", backend)


@dataclass(frozen=True)
class Runtime:
    config: Config
    router: Router
    auth: ClientAuth
    throttle: Throttle
    pools: Mapping[str, KeyPool]
    breakers: Mapping[str, Breaker]
    upstreams: Mapping[str, Upstream]
    # Each backend's models' circuits (a 5xx is the model's); carried over with `breakers`.
    model_circuits: Mapping[str, ModelCircuits] = field(default_factory=dict)
    redactor: Redactor = NO_SECRETS  # every configured secret, scrubbed from what we write
    # Where each file, response, batch... was made: requests naming it go there.
    objects: ObjectStore = field(default_factory=MemoryObjects)
    # Translated Responses conversations, kept for previous_response_id (carried over).
    conversations: Conversations = field(default_factory=lambda: Conversations(0, 0, 1.0))
    placements: frozenset[Placement] = frozenset()  # the (backend, key) pairs that exist
    # What each route's deployments taught this process (in flight, latency), by name;
    # carried over a reload for the names that stay.
    deployments: Mapping[str, DeploymentStats] = field(default_factory=dict)
    # Lower-cased names of the headers naming a conversation -> their rank (first wins).
    session_headers: Mapping[bytes, int] = field(default_factory=dict)
    prices: Prices = field(default_factory=lambda: Prices({}))
    spend: Spend | None = None  # the clients' budgets and tpm (None: no client has any)
    batches: BatchSpend | None = None  # batches' estimates, charges and usage (batch_spend.py)
    telemetry: Telemetry | None = None  # OpenTelemetry's exporters (None: off)
    loaded_at: float = field(default_factory=time.time)
    state: RuntimeState = field(default_factory=RuntimeState)  # the one mutable part

    @property
    def discovered(self) -> Mapping[str, tuple[str, ...]]:
        """Each backend's own model list, as last fetched (read-only here)."""
        return self.state.discovered

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        tasks = self.state.tasks
        for name, backend in self.config.backends.items():
            if name in self.state.unverified:
                tasks.append(asyncio.create_task(self._verify(name)))
            tasks.append(asyncio.create_task(self._probe_invalid_keys(name)))
            tasks.append(asyncio.create_task(self._probe_breaker(name)))
            if backend.discover_models:
                tasks.append(asyncio.create_task(self._discover(name)))
        tasks.append(asyncio.create_task(self._refresh_gauges()))
        if self.throttle.storage.redis is not None:
            tasks.append(asyncio.create_task(self._share_state()))

    async def close(self) -> None:
        await self._stop_tasks()
        for upstream in self.upstreams.values():
            await upstream.close()
        await self.throttle.storage.close()
        if self.telemetry is not None:  # the last spans flushed, in bounded time
            await self.telemetry.close()

    async def retire(self, successor: Runtime) -> None:
        """After a reload: stop background work now; close pools the successor does not
        use once the last request that began on this snapshot has finished."""
        await self._stop_tasks()
        while self.state.in_flight > 0:
            await asyncio.sleep(0.5)
        reused = {id(u) for u in successor.upstreams.values()}
        for upstream in self.upstreams.values():
            if id(upstream) not in reused:
                await upstream.close()
        if self.throttle.storage is not successor.throttle.storage:
            await self.throttle.storage.close()
        if self.telemetry is not None and self.telemetry is not successor.telemetry:
            await self.telemetry.close()

    async def _stop_tasks(self) -> None:
        tasks = self.state.tasks
        tasks.extend(self.state.confirming)
        self.state.confirming.clear()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        tasks.clear()

    def suspect_key(self, backend: str, key_id: str, reason: str, dialect: Dialect) -> None:
        """The upstream refused ``key_id`` (``Verdict.KEY_REFUSED``): take it out only if a
        probe with that key alone, ``GET /models`` with the dialect's auth, is refused too.
        One probe per key at a time, with a deadline, one per ``CONFIRM_INTERVAL`` at most:
        a client cannot make the proxy hammer the upstream, nor take a key out by sending
        requests the upstream refuses for its own reasons."""
        pool = self.pools[backend]
        if not pool.begin_confirm(key_id):
            return
        task = asyncio.create_task(self._confirm_key(backend, key_id, reason, dialect))
        self.state.confirming.add(task)
        task.add_done_callback(self.state.confirming.discard)

    async def _confirm_key(self, backend: str, key_id: str, reason: str, dialect: Dialect) -> None:
        pool, upstream = self.pools[backend], self.upstreams[backend]
        key = next(k for k in pool.keys if k.id == key_id)
        try:
            answer = await probe(upstream, self.config.backends[backend], key, dialect)
            if answer.verdict is Verdict.KEY_REFUSED:
                pool.mark_invalid(key_id, f"{reason}; confirmed by GET /models ({answer.status})")
            else:  # it answers (or the check could not tell): the key stays
                log.info(
                    "backend %s: key %s refused once, but GET /models with it got %s: kept",
                    backend,
                    key_id,
                    answer.status,
                )
        except Exception:  # a bug must not leave the slot taken (it frees by time anyway)
            log.exception("backend %s: confirming probe of key %s failed", backend, key_id)
        finally:
            pool.end_confirm(key_id)

    async def _probe_invalid_keys(self, backend: str) -> None:
        """Every ``key_probe_interval``: try each invalid key on ``GET /models``."""
        pool, upstream = self.pools[backend], self.upstreams[backend]
        interval = self.config.backends[backend].key_probe_interval
        while True:
            await asyncio.sleep(interval)
            try:
                for key in pool.invalid_keys():
                    answer = await probe(upstream, self.config.backends[backend], key)
                    if answer.verdict is Verdict.OK:
                        pool.restore(key.id)
            except Exception:  # a bug must not end the probing for good
                log.exception("backend %s: invalid-key probe failed; trying again", backend)

    async def _probe_breaker(self, backend: str) -> None:
        """While the circuit is open: once the cooldown is over, take the probe slot and try
        ``GET /models``, so the circuit (and ``/ready``) recovers with no client traffic."""
        breaker, pool = self.breakers[backend], self.pools[backend]
        while True:
            try:
                # No usable key to probe with: a request (or a restored key) will do it.
                wait = breaker.admit() if breaker.is_open and pool.usable() else BREAKER_TICK
                if wait:
                    await asyncio.sleep(min(wait, BREAKER_TICK))
                    continue
                await self._probe_backend_once(backend)  # we hold the probe slot
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backend %s: circuit probe failed; trying again", backend)
                await asyncio.sleep(LOOP_RETRY)

    async def _probe_backend_once(self, backend: str) -> None:
        """One probe with the slot held: always reports an outcome, even when cancelled."""
        breaker, pool = self.breakers[backend], self.pools[backend]
        upstream = self.upstreams[backend]
        ticket = breaker.probe_ticket  # taken by the admit() just before this call
        verdict: bool | None = None
        try:
            usable = pool.usable()
            if not usable:
                return
            answer = await probe(upstream, self.config.backends[backend], usable[0])
            verdict = answer.backend_up  # a 401 is about the key, not the backend
            if not verdict:
                log.warning("backend %s: circuit probe GET /models got %s", backend, answer.status)
        finally:
            if verdict is None:
                breaker.release(ticket)
            elif verdict:
                breaker.probe_succeeded()
            else:
                breaker.failure(None, ticket)

    async def _verify(self, backend: str) -> None:
        """Until the backend has answered once (here, or to a request): ``GET /models``,
        1 s, 2 s, 4 s ... 60 s apart. A refused key is taken out on the way. The breaker is
        left to requests: this only decides whether /ready may count the backend."""
        pool, upstream = self.pools[backend], self.upstreams[backend]
        wait = 1.0
        while backend in self.state.unverified:
            try:
                usable = pool.usable()
                if usable:
                    key = usable[0]
                    answer = await probe(upstream, self.config.backends[backend], key)
                    if answer.verdict is Verdict.KEY_REFUSED:
                        reason = f"{answer.status} from upstream on GET /models"
                        pool.mark_invalid(key.id, reason)
                    if answer.backend_up:
                        self.state.verified(backend)
                        return
                    log.warning("backend %s: not answering (%s)", backend, answer.status)
                    self.state.unanswering.add(backend)
            except Exception:
                log.exception("backend %s: start-up check failed", backend)
            await asyncio.sleep(wait)
            wait = min(wait * 2, VERIFY_MAX_WAIT)

    def _sane_ids(self, ids: list[str]) -> tuple[str, ...]:
        """What a backend lists, as far as it can be shown: usable ids, secrets scrubbed
        (an upstream may echo the key), at most ``MAX_DISCOVERED`` of them."""
        usable = (self.redactor.text(i) for i in ids if usable_model_id(i))
        return tuple(itertools.islice(usable, MAX_DISCOVERED))

    async def _discover(self, backend: str) -> None:
        """At start and every ``discover_interval``: the backend's own model list."""
        pool, upstream = self.pools[backend], self.upstreams[backend]
        while True:
            try:
                for key in pool.usable()[:2]:  # a second key if the first one is refused
                    status, ids = await upstream.list_models(key.value)
                    if status == 200:
                        self.state.discovered[backend] = self._sane_ids(ids)
                        break
                    log.warning(
                        "backend %s: model discovery with key %s got %s", backend, key.id, status
                    )
            except Exception:
                log.exception("backend %s: model discovery failed; trying again", backend)
            await asyncio.sleep(self.config.backends[backend].discover_interval)

    async def _share_state(self) -> None:
        """Several replicas on one Redis: exchange key and breaker state twice a second."""
        store = self.throttle.storage
        assert store.redis is not None
        shared = SharedState(store.redis)
        while True:
            # Redis down or hung: local state goes on, and it is counted (in Store.call).
            await store.call(
                lambda: shared.sync(self.pools, self.breakers), None, self.throttle.storage_failed
            )
            await asyncio.sleep(SYNC_INTERVAL)

    async def _refresh_gauges(self) -> None:
        """Key and breaker gauges follow the state they report, once a second."""
        while True:
            self.publish_gauges()
            await asyncio.sleep(1.0)

    def publish_gauges(self) -> None:
        metrics.set_key_states(
            (name, key.id, usable)
            for name, pool in self.pools.items()
            for key, usable in pool.states()
        )
        metrics.set_circuit_states((name, b.is_open) for name, b in self.breakers.items())
        now = time.monotonic()
        metrics.set_deployment_states(
            (name, stats.take_selections(), stats.in_flight, stats.latency(now))
            for name, stats in self.deployments.items()
        )
        if self.throttle.storage_errors:
            metrics.STORAGE_ERRORS.inc(self.throttle.storage_errors)
            self.throttle.storage_errors = 0
        if self.objects.errors:
            metrics.STORAGE_ERRORS.inc(self.objects.errors)
            self.objects.errors = 0

    def summary(self) -> str:
        """The state of a new config in a few words, for the one reload line."""
        parts = []
        for name in self.config.backends:
            usable = len(self.pools[name].usable())
            parts.append(
                f"{name} {usable} key{'s' if usable != 1 else ''}"
                if usable
                else f"{name} NO usable key ({self.pools[name].missing_hint()})"
            )
        clients = len(self.config.clients)
        who = f"{clients} client{'s' if clients != 1 else ''}" if clients else "no clients (open)"
        return f"backends: {', '.join(parts)}; {who}"

    def report(self) -> None:
        """Say at start-up which backends can serve and which need a key set."""
        self.auth.report()
        for name, backend in self.config.backends.items():
            pool = self.pools[name]
            usable = pool.usable()
            if usable:
                ids = ", ".join(k.id for k in usable)
                log.info("backend %s: %s, usable keys: %s", name, backend.base_url, ids)
            else:
                log.warning(
                    "backend %s: %s, NO usable key (%s): requests routed here get 503",
                    name,
                    backend.base_url,
                    pool.missing_hint(),
                )


def build_runtime(config: Config, previous: Runtime | None = None) -> Runtime:
    """A snapshot for ``config``; after a reload, carrying over what is still true.

    Kept from ``previous``: connection pools of backends whose URL, timeouts and headers
    are unchanged; the health of every key whose id and value are unchanged (a key whose
    value changed starts fresh); breakers of backends whose URL is unchanged (the same
    ``Breaker`` objects, handed on explicitly below); the discovered models of backends
    that still discover; the throttle storage when its URI is unchanged (backoff and limits
    go on counting). Requests in flight and background tasks stay with their snapshot.
    """
    old = previous.config if previous is not None else None
    # What can fail is built first, so a failed reload leaves nothing half-changed.
    router, auth = Router(config), ClientAuth(config)
    reuse_storage = previous is not None and old is not None and old.storage == config.storage
    storage: Store = (
        previous.throttle.storage if previous and reuse_storage else make_storage(config.storage)
    )
    try:
        throttle = Throttle(config, storage)
    except Exception:
        if not reuse_storage:
            storage.abandon()
        raise
    objects = _object_store(config, storage, previous if reuse_storage else None)
    conversations = _conversations(config, previous)
    multi_tenant = len(config.clients) > 1  # one client's failures must not shut it for others
    pools = build_pools(config.backends, multi_tenant)
    upstreams: dict[str, Upstream] = {}
    breakers: dict[str, Breaker] = {}
    model_circuits: dict[str, ModelCircuits] = {}
    unverified: set[str] = set()
    for name, backend in config.backends.items():
        before = old.backends.get(name) if old is not None else None
        if previous is not None and before is not None:
            pools[name].adopt_health(previous.pools[name])
            if _same_connection(before, backend):
                upstreams[name] = previous.upstreams[name]
            if before.base_url == backend.base_url:  # its circuit, open or not, goes on
                breakers[name] = previous.breakers[name]
                breakers[name].reconfigure(backend.breaker)  # new bounds apply to its state
                breakers[name].probe_timeout = _probe_timeout(backend)
                breakers[name].multi_tenant = multi_tenant
                model_circuits[name] = previous.model_circuits[name]
                model_circuits[name].reconfigure(
                    backend.breaker, _probe_timeout(backend), multi_tenant
                )
        upstreams.setdefault(name, Upstream(backend))
        if name not in breakers:  # a new backend, or a new URL: seen answering from scratch
            timeout = _probe_timeout(backend)
            breakers[name] = Breaker(
                name, backend.breaker, probe_timeout=timeout, multi_tenant=multi_tenant
            )
            model_circuits[name] = ModelCircuits(name, backend.breaker, timeout, multi_tenant)
            unverified.add(name)
    discovered = {
        name: ids
        for name, ids in (previous.discovered.items() if previous is not None else ())
        if name in config.backends and config.backends[name].discover_models
    }
    before_stats = previous.deployments if previous is not None else {}
    now = time.monotonic()
    deployments = {
        d.name: before_stats.get(d.name) or DeploymentStats(now)
        for route in config.routes
        if len(route.deployments) > 1
        for d in route.deployments
    }
    prices = Prices({model: dataclasses.asdict(price) for model, price in config.pricing.items()})
    spend = Spend(config, storage.ledger, prices) if storage.ledger is not None else None
    return Runtime(
        config=config,
        telemetry=_telemetry(config, previous),
        prices=prices,
        spend=spend if spend is not None and spend.limits else None,
        batches=_batches(config, spend),
        deployments=deployments,
        session_headers={
            name.lower().encode("latin-1"): rank
            for rank, name in reversed(list(enumerate(config.session_headers)))
        },
        state=RuntimeState(discovered=discovered, unverified=unverified),
        router=router,
        auth=auth,
        throttle=throttle,
        pools=pools,
        breakers=breakers,
        model_circuits=model_circuits,
        upstreams=upstreams,
        redactor=Redactor.for_config(config),
        objects=objects,
        conversations=conversations,
        placements=known_placements(
            {name: [key.id for key in backend.keys] for name, backend in config.backends.items()}
        ),
    )


def _batches(config: Config, spend: Spend | None) -> BatchSpend | None:
    if spend is None:
        return None
    labels = frozenset(c.id for c in config.clients) | {ANONYMOUS}
    return BatchSpend(spend, config.objects.ttl, labels, frozenset(config.backends))


def _telemetry(config: Config, previous: Runtime | None) -> Telemetry | None:
    """The exporters: kept over a reload that leaves ``telemetry:`` as it was."""
    settings = config.telemetry
    if settings.otlp_endpoint is None:
        return None
    paths = config.server.forward_paths
    if (
        previous is not None
        and previous.config.telemetry == settings
        and previous.config.server.forward_paths == paths
    ):
        return previous.telemetry
    return Telemetry(settings, paths)


def _object_store(config: Config, storage: Store, previous: Runtime | None) -> ObjectStore:
    """The object placements live with the throttle's storage (Redis: shared by replicas;
    memory: kept across reloads while the storage is)."""
    settings = config.objects
    if previous is not None:
        previous.objects.reconfigure(
            settings.ttl, settings.max_entries, settings.max_entries_per_client
        )
        return previous.objects
    guard = storage.call if storage.redis is not None else None
    return make_object_store(
        storage.redis,
        settings.ttl,
        settings.max_entries,
        guard,
        max_per_client=settings.max_entries_per_client,
    )


def _conversations(config: Config, previous: Runtime | None) -> Conversations:
    """The kept conversations outlive a reload (a client's next turn must find its last)."""
    settings = config.objects
    share = min(settings.conversation_bytes_per_client, settings.conversation_bytes)
    chain = config.server.max_body_size  # continued, a chain is sent as one body
    if previous is not None:
        previous.conversations.reconfigure(
            settings.conversation_bytes, share, settings.conversation_ttl, chain
        )
        return previous.conversations
    return Conversations(
        settings.conversation_bytes, share, settings.conversation_ttl, max_chain_bytes=chain
    )


def _probe_timeout(backend: BackendConfig) -> float:
    """How long a half-open probe may go unreported before its slot is free again: as long
    as the backend may take to answer, bounded."""
    return min(backend.timeout.connect + backend.timeout.first_byte_seconds, PROBE_TIMEOUT)


def _same_connection(a: BackendConfig, b: BackendConfig) -> bool:
    # (ca_file too: trust removed by a reload must be gone at once, not at the restart)
    return (
        a.base_url == b.base_url
        and a.timeout == b.timeout
        and dict(a.headers) == dict(b.headers)
        and a.ca_file == b.ca_file
    )
