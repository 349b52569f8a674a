"""Model id → backend, upstream model id and (optionally) a pinned key.

Resolution order: alias (followed to its end), then the first route whose prefix matches,
then a backend that lists the exact id under ``models``. A request without a model (files,
batches, a retrieve by id) goes by its path: the first ``paths:`` rule whose prefix holds
it, else ``default_backend``. A target carries the request's dialect: for a dialect other
than the default, fallbacks that do not speak it are left out and no rewrite rules apply (its
bodies pass through as sent, model id aside). Everything is precomputed from the config at
start-up; a lookup is a dict hit or a short loop of ``startswith``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proxy.balance import Affinity, Strategy
from proxy.dialects import DEFAULT, Dialect
from proxy.dialects.translate import Translation, pick, reaches
from proxy.rewrite import NO_RULES, RewriteRules

if TYPE_CHECKING:  # the config is read, never imported at run time: it checks its aliases here
    from proxy.config import Config, RouteConfig

_CACHE_LIMIT = 4096  # client-sent ids are unbounded: never let the cache grow with them
MAX_MODEL_LENGTH = 256
DEFAULT_ATTEMPTS = 3  # a request routed by a backend's model list, or without a model
NO_MODEL = "-"  # the model label of requests that name none
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def usable_model_id(model: str) -> bool:
    """Short enough for a header and a cache entry, and no control characters (CR/LF would
    break a header): for ids from clients and from a backend's own model list alike."""
    return len(model) <= MAX_MODEL_LENGTH and _CONTROL.search(model) is None


@dataclass(frozen=True, slots=True)
class Target:
    requested: str  # what the client sent
    model: str  # after alias resolution: the id routes match on, and the metrics label
    backend: str
    upstream_model: str  # what the backend receives (prefix stripped where the route says)
    pinned_key: str | None = None
    fallbacks: tuple[Target, ...] = ()  # tried in order when this backend fails first
    label: str = ""  # the metrics label: a model id from the config, or the route's pattern
    rewrite: RewriteRules = NO_RULES  # the backend's rules, then the route's
    dialect: Dialect = DEFAULT  # the wire the client speaks, and the backend is spoken to in
    pool: Pool | None = None  # the route's deployments (this target is the first); None: one
    max_attempts: int = DEFAULT_ATTEMPTS  # upstream attempts of a request, all causes together
    affinity: Affinity = Affinity.SESSION  # which conversation stays on one deployment and key
    deployment: str = ""  # a pool member's name (metrics, /admin); "" outside a pool
    # The backend does not speak ``dialect`` but is spoken to through this translation.
    translation: Translation | None = None


@dataclass(frozen=True, slots=True)
class Pool:
    """A route's deployments, balanced: each a ``Target`` of its own (backend, model id,
    key pin, rewrite rules), with its weight and its name (for metrics and /admin)."""

    route: str  # the route's pattern, e.g. "kimi-k2*"
    members: tuple[Target, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: Strategy


@dataclass(frozen=True)
class ModelEntry:
    id: str
    owned_by: str  # the backend name


class Router:
    def __init__(self, config: Config) -> None:
        self._aliases = {name: _follow(config.aliases, name) for name in config.aliases}
        self._routes: tuple[RouteConfig, ...] = config.routes
        self._rules = {name: b.request_rewrite for name, b in config.backends.items()}
        self._listed: dict[str, str] = {}
        for backend in config.backends.values():
            for model in backend.models:
                self._listed.setdefault(model, backend.name)
        # Ids the config names: only these become metric labels, as themselves.
        self._known = set(self._aliases.values()) | set(self._listed)
        self._known |= {f.model for r in self._routes for f in r.fallback if f.model}
        self._backends = config.backends
        # Whether any model id may be sent changed (an alias, a stripped prefix, rewrite
        # rules): a batch file streamed past its head is then sent without a length.
        self.renames = (
            bool(self._aliases)
            or any(r.strip_prefix or r.request_rewrite for r in self._routes)
            or any(self._rules.values())
        )
        self._cache: dict[str, Target | None] = {}
        self._other_caches: dict[str, dict[str, Target | None]] = {}  # other dialects
        self.models = self._model_list()
        self.listed = frozenset(entry.id for entry in self.models)
        self._paths = tuple(
            (rule.prefix, _model_less(rule.backend, rule.key)) for rule in config.paths
        )
        default = config.default_backend
        self._default = _model_less(default, None) if default is not None else None

    def resolve(self, requested: str, dialect: Dialect = DEFAULT, wire: str = "") -> Target | None:
        """The target for ``requested``, or None when nothing routes it; ``wire`` is the
        request's (``translate.client_wire``): a translation is chosen per wire."""
        native = dialect is DEFAULT and not wire
        cache = self._cache if native else self._wire_cache(dialect, wire)
        try:
            return cache[requested]
        except KeyError:
            pass
        target = self._resolve(requested)
        if target is not None and not native:
            target = self._in_dialect(target, dialect, wire)
        if len(cache) < _CACHE_LIMIT:
            cache[requested] = target
        return target

    def _wire_cache(self, dialect: Dialect, wire: str) -> dict[str, Target | None]:
        return self._other_caches.setdefault(f"{dialect.name}/{wire}", {})

    def _in_dialect(self, target: Target, dialect: Dialect, wire: str) -> Target:
        """``target`` for a request in ``dialect``: to a backend that speaks it, passed
        through as sent (no rewrite rules: they are written for OpenAI bodies); to one
        that can be reached through a translation, translated (its rules then apply to
        the translated body); deployments and fallbacks reached neither way left out."""
        fallbacks = tuple(
            spoken
            for f in target.fallbacks
            if (spoken := self._spoken_in(f, dialect, wire)) is not None
        )
        pool = target.pool
        if pool is not None:
            kept = [
                (replace(spoken, pool=None, fallbacks=()), n, w)
                for m, n, w in zip(pool.members, pool.names, pool.weights, strict=True)
                if (spoken := self._spoken_in(m, dialect, wire)) is not None
            ]
            if kept:
                members = tuple(m for m, _, _ in kept)
                names = tuple(n for _, n, _ in kept)
                weights = tuple(w for _, _, w in kept)
                pool = replace(pool, members=members, names=names, weights=weights)
                first = members[0]
                return replace(
                    first,
                    fallbacks=fallbacks,
                    pool=pool if len(kept) > 1 else None,
                    max_attempts=target.max_attempts,
                    affinity=target.affinity,
                )
            pool = None
        spoken = self._spoken_in(target, dialect, wire)
        if spoken is None:  # answered as not spoken (forward.routed_model)
            spoken = replace(target, dialect=dialect, rewrite=NO_RULES)
        return replace(spoken, fallbacks=fallbacks, pool=pool)

    def _spoken_in(self, target: Target, dialect: Dialect, wire: str) -> Target | None:
        backend = self._backends[target.backend]
        translation = pick(dialect, backend, wire)
        if translation is not None:
            return replace(target, dialect=dialect, translation=translation)
        if dialect is DEFAULT:
            return target  # OpenAI's wire, spoken as it is (its rewrite rules apply)
        if dialect.speaks(backend):
            return replace(target, dialect=dialect, rewrite=NO_RULES)
        return None

    def speakers(self, dialect: Dialect) -> list[str]:
        """The backends that speak ``dialect`` (or are reached through a translation), for
        the message of an error."""
        return [name for name, backend in self._backends.items() if reaches(dialect, backend)]

    def _resolve(self, requested: str) -> Target | None:
        model = self._aliases.get(requested, requested)
        for route in self._routes:
            if model.startswith(route.prefix):
                upstream = model[len(route.prefix) :] if route.strip_prefix else model
                if not upstream:
                    continue  # "moonshot/" alone names no model
                label = model if model in self._known else f"{route.prefix}*"
                fallbacks = tuple(
                    Target(
                        requested,
                        model,
                        f.backend,
                        f.model or upstream,
                        label=f.model if f.model in self._known else label,
                        rewrite=self._rules[f.backend],
                    )
                    for f in route.fallback
                )
                members = tuple(
                    Target(
                        requested,
                        model,
                        d.backend,
                        d.model or upstream,
                        d.key,
                        label=label,
                        rewrite=self._rules[d.backend].merged(route.request_rewrite),
                        deployment=d.name if len(route.deployments) > 1 else "",
                    )
                    for d in route.deployments
                )
                first = replace(
                    members[0],
                    fallbacks=fallbacks,
                    max_attempts=route.max_attempts,
                    affinity=Affinity(route.affinity),
                )
                if len(members) == 1:
                    return first
                pool = Pool(
                    f"{route.prefix}*",
                    members,
                    tuple(d.name for d in route.deployments),
                    tuple(d.weight for d in route.deployments),
                    Strategy(route.strategy),
                )
                return replace(first, pool=pool)
        backend = self._listed.get(model)
        if backend is not None:
            return Target(
                requested, model, backend, model, label=model, rewrite=self._rules[backend]
            )
        return None

    def resolve_path(self, path: str) -> Target | None:
        """The target of a request without a model, by its path after ``/v1``."""
        return self.path_rule(path) or self._default

    def path_rule(self, path: str) -> Target | None:
        """The target of the first ``paths:`` rule that holds ``path``: the operator said
        requests there carry no model (an upload's form is then not searched for one)."""
        for prefix, target in self._paths:
            if path == prefix or path.startswith(prefix + "/"):
                return target
        return None

    def routable_summary(self) -> str:
        """What a client may ask for, for the message of a 404."""
        names = [entry.id for entry in self.models]
        prefixes = [f"'{r.prefix}*'" for r in self._routes if r.prefix]
        parts = []
        if names:
            parts.append("models " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        if prefixes:
            parts.append("ids starting with " + ", ".join(prefixes))
        return "; ".join(parts) if parts else "nothing (no routes configured)"

    def _model_list(self) -> tuple[ModelEntry, ...]:
        """Aliases first, then each backend's listed models; one entry per id."""
        entries: dict[str, ModelEntry] = {}
        for alias in self._aliases:
            target = self._resolve(alias)
            if target is not None:
                entries.setdefault(alias, ModelEntry(alias, target.backend))
        for model, backend in self._listed.items():
            entries.setdefault(model, ModelEntry(model, backend))
        return tuple(entries.values())


def _model_less(backend: str, key: str | None) -> Target:
    """A target for requests that carry no model: sent as they are (a backend's rewrite
    rules are about inference bodies), no fallbacks (an object lives on one backend)."""
    return Target("", "", backend, "", key, label=NO_MODEL)


def _follow(aliases: Mapping[str, str], name: str) -> str:
    """The end of an alias chain (the config already refused cycles)."""
    seen = {name}
    model = aliases[name]
    while model in aliases and model not in seen:
        seen.add(model)
        model = aliases[model]
    return model
