"""YAML file → ``${ENV}`` interpolation → validation → frozen dataclasses.

The config file is the single source of truth: no provider or model list lives in code.
Every problem is reported as ``ConfigError(file, place, message)``, e.g.
``config.yaml: routes[2].backend: unknown backend 'opena' (known: moonshot, openai)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import limits
import yaml

from proxy.rewrite import NO_RULES, RewriteRules


class ConfigError(Exception):
    def __init__(self, file: str, place: str, message: str) -> None:
        self.file = file
        self.place = place
        self.message = message
        where = f"{file}: {place}" if place else file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class KeyConfig:
    id: str
    value: str = field(repr=False)  # the secret: never printed, logged or returned
    env_vars: tuple[str, ...] = ()  # the variables the value was read from, for "set X" hints

    @property
    def present(self) -> bool:
        return bool(self.value)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    read: float = 600.0  # the default for both of the next two
    first_byte: float | None = None  # request sent → response head; None: `read`
    idle: float | None = None  # longest silent gap inside a response; None: `read`

    @property
    def first_byte_seconds(self) -> float:
        return self.first_byte if self.first_byte is not None else self.read

    @property
    def idle_seconds(self) -> float:
        return self.idle if self.idle is not None else self.read


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # consecutive connect errors / 5xx / timeouts that open the circuit
    min_open: float = 1.0  # the first open period; doubles while the backend keeps failing
    max_open: float = 60.0


@dataclass(frozen=True)
class BackendConfig:
    name: str
    base_url: str  # without a trailing slash
    keys: tuple[KeyConfig, ...]
    models: tuple[str, ...] = ()
    timeout: Timeouts = Timeouts()
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    rate_limit: str | None = None  # outbound limit, e.g. "500/minute" (the limits library)
    breaker: BreakerConfig = BreakerConfig()
    key_probe_interval: float = 300.0  # how often an invalid key is tried again
    request_rewrite: RewriteRules = NO_RULES  # the provider's quirks, as data
    no_retry_errors: frozenset[str] = frozenset()  # upstream error types/codes never worth a retry
    discover_models: bool = False  # list the backend's own /models in GET /v1/models
    discover_interval: float = 600.0
    max_cooldown: float = 300.0  # cap on a key's cooldown, whatever retry-after the upstream sends

    def key(self, key_id: str) -> KeyConfig | None:
        return next((k for k in self.keys if k.id == key_id), None)


@dataclass(frozen=True)
class FallbackConfig:
    backend: str
    model: str | None = None  # the id to send there; None: the same upstream id


@dataclass(frozen=True)
class RouteConfig:
    prefix: str
    backend: str
    strip_prefix: bool = False
    key: str | None = None  # pin one key id of the backend
    fallback: tuple[FallbackConfig, ...] = ()  # tried in order when the backend fails first
    request_rewrite: RewriteRules = NO_RULES  # applied after the backend's own rules


@dataclass(frozen=True)
class ClientConfig:
    id: str
    key: str = field(repr=False)
    env_vars: tuple[str, ...] = ()
    rate_limit: str | None = None  # e.g. "600/minute"
    models: tuple[str, ...] = ()  # glob patterns; empty: every model


@dataclass(frozen=True)
class ReconnectConfig:
    enabled: bool = True
    base: float = 1.0
    max: float = 60.0
    after: int = 3  # failures in a row (client, model) before the first wait: SDK retries pass
    min_failure_ratio: float = 0.5  # ...and only while most recent requests fail


RATE_LIMIT_STRATEGIES = ("moving-window", "sliding-window-counter", "fixed-window")


@dataclass(frozen=True)
class ThrottleConfig:
    reconnect: ReconnectConfig = ReconnectConfig()
    # moving-window is exact but keeps one entry per request in the window (in memory, each
    # request costs O(limit)); sliding-window-counter is O(1): better for limits in thousands.
    rate_limit_strategy: str = "moving-window"


# The OpenAI inference endpoints that take a JSON body with a model: only these are
# forwarded, so a client cannot reach a provider's admin API with the operator's key.
DEFAULT_FORWARD_PATHS = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/moderations",
    "/images/generations",
    "/audio/speech",
)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    routing_headers: bool = True  # x-proxy-backend / x-proxy-key / x-proxy-model on responses
    max_body_size: int = 10 * 1024 * 1024
    trusted_proxies: tuple[str, ...] = ()  # addresses/CIDRs whose X-Forwarded-For is believed
    admin_key: str = field(default="", repr=False)  # Bearer for /admin/status; empty: no admin
    config_poll_interval: float = 1.0  # seconds between checks of the file; 0: SIGHUP only
    admin_port: int | None = None  # /metrics and /admin/* on their own listener; None: main port
    max_header_size: int = 64 * 1024  # request line + headers; 431 beyond
    header_timeout: float = 10.0  # connection open (or previous response) -> headers in; 408
    body_timeout: float = 60.0  # headers in -> whole body in; 408
    max_connections: int = 2048  # open client connections; beyond, only /health and /ready
    max_response_size: int = 64 * 1024 * 1024  # non-streamed upstream bodies; 502 beyond
    forward_paths: tuple[str, ...] = DEFAULT_FORWARD_PATHS  # POST paths after /v1 forwarded


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    backends: Mapping[str, BackendConfig]
    aliases: Mapping[str, str]
    routes: tuple[RouteConfig, ...]
    clients: tuple[ClientConfig, ...] = ()
    throttle: ThrottleConfig = ThrottleConfig()
    storage: str = "memory://"  # or redis://host:port: shared by replicas
    digest: str = ""  # sha256 of the file's text, to tell which version is in force


def fingerprint(secret: str) -> str:
    """``sk-…a1b2``: enough to tell keys apart, never enough to use one."""
    if not secret:
        return "(missing)"
    if len(secret) < 12:
        return "…"  # too short to show any of it safely
    head = secret[:3] if secret[2] == "-" else secret[:2]
    return f"{head}…{secret[-4:]}"


# ---------------------------------------------------------------- loading


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate ``path``; raise ``ConfigError`` on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror or exc}") from None
    return parse_config(text, path, os.environ if environ is None else environ)


def parse_config(text: str, path: str, environ: Mapping[str, str]) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, place, f"invalid YAML: {problem}") from None
    config = _Validator(path, environ).config(raw if raw is not None else {})
    return dataclasses.replace(config, digest=hashlib.sha256(text.encode()).hexdigest())


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Validator:
    """Walks the raw YAML tree once, building dataclasses and naming the place of every error."""

    def __init__(self, path: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.environ = environ

    def fail(self, place: str, message: str) -> ConfigError:
        return ConfigError(self.path, place, message)

    # -- generic readers

    def mapping(self, value: Any, place: str, allowed: frozenset[str] | None) -> dict[str, Any]:
        """``value`` as a dict; with ``allowed``, any other field is an error."""
        if not isinstance(value, dict):
            raise self.fail(place or "(top level)", f"expected a mapping, got {_kind(value)}")
        for name in value if allowed is not None else ():
            if name not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.fail(_join(place, str(name)), f"unknown field (known: {known})")
        return value

    def string(self, value: Any, place: str, *, allow_empty: bool = False) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.fail(place, f"expected a string, got {_kind(value)}")
        text = self.interpolate(str(value), place)
        if not text and not allow_empty:
            raise self.fail(place, "must not be empty")
        return text

    def boolean(self, value: Any, place: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(place, f"expected true or false, got {_kind(value)}")
        return value

    def number(self, value: Any, place: str, *, minimum: float = 0.0) -> float:
        if isinstance(value, str):
            value = self.interpolate(value, place)
            match = _DURATION.match(value)
            if not match:
                raise self.fail(
                    place, f"expected seconds or a duration like '500ms', got {value!r}"
                )
            value = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(place, f"expected a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise self.fail(place, f"expected a finite number, got {value!r}")
        if value < minimum:
            raise self.fail(place, f"must be at least {minimum}")
        return float(value)

    def size(self, value: Any, place: str) -> int:
        if isinstance(value, str):
            match = _SIZE.match(self.interpolate(value, place))
            if not match:
                raise self.fail(place, f"expected a size like '10MiB', got {value!r}")
            value = int(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(place, "expected a positive number of bytes")
        return value

    def string_list(self, value: Any, place: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(place, f"expected a list, got {_kind(value)}")
        return tuple(self.string(v, f"{place}[{i}]") for i, v in enumerate(value))

    def interpolate(self, text: str, place: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            value = self.environ.get(name, "")
            if value == "" and default is not None:
                return default
            return value

        if "${" not in text:
            return text
        result = _ENV_REF.sub(replace, text)
        if "${" in result:
            raise self.fail(place, f"malformed ${{VAR}} reference in {text!r}")
        return result

    # -- sections

    def config(self, raw: Any) -> Config:
        sections = {"server", "backends", "aliases", "routes", "clients", "throttle", "storage"}
        top = self.mapping(raw, "", frozenset(sections))
        backends = self.backends(top.get("backends"))
        aliases = self.aliases(top.get("aliases") or {})
        routes = tuple(self.routes(top.get("routes") or [], backends))
        return Config(
            path=self.path,
            server=self.server(top.get("server") or {}),
            backends=MappingProxyType(backends),
            aliases=MappingProxyType(aliases),
            routes=routes,
            clients=self.clients(top.get("clients") or []),
            throttle=self.throttle(top.get("throttle") or {}),
            storage=self.storage(top.get("storage", "memory://")),
        )

    def storage(self, raw: Any) -> str:
        uri = self.string(raw, "storage")
        if not uri.startswith(("memory://", "redis://", "rediss://")):
            raise self.fail("storage", f"expected memory:// or redis://host:port, got {uri!r}")
        return uri

    def rate_limit(self, raw: Any, place: str) -> str | None:
        if raw is None:
            return None
        text = self.string(raw, place)
        try:
            limits.parse_many(text)
        except ValueError:
            raise self.fail(place, f"expected a rate like '600/minute', got {text!r}") from None
        return text

    def clients(self, raw: Any) -> tuple[ClientConfig, ...]:
        if not isinstance(raw, list):
            raise self.fail("clients", f"expected a list of clients, got {_kind(raw)}")
        clients: list[ClientConfig] = []
        for i, item in enumerate(raw):
            place = f"clients[{i}]"
            fields = frozenset({"id", "key", "rate_limit", "models"})
            entry = self.mapping(item, place, fields)
            for required in ("id", "key"):
                if required not in entry:
                    raise self.fail(f"{place}.{required}", "is required")
            client_id = self.string(entry["id"], f"{place}.id")
            if any(c.id == client_id for c in clients):
                raise self.fail(f"{place}.id", f"duplicate client id '{client_id}'")
            raw_key = entry["key"]
            clients.append(
                ClientConfig(
                    id=client_id,
                    key=self.string(raw_key, f"{place}.key", allow_empty=True).strip(),
                    env_vars=tuple(m[1] for m in _ENV_REF.finditer(str(raw_key))),
                    rate_limit=self.rate_limit(entry.get("rate_limit"), f"{place}.rate_limit"),
                    models=self.string_list(entry.get("models", []), f"{place}.models"),
                )
            )
        return tuple(clients)

    def throttle(self, raw: Any) -> ThrottleConfig:
        section = self.mapping(raw, "throttle", frozenset({"reconnect", "rate_limit_strategy"}))
        strategy = self.string(
            section.get("rate_limit_strategy", "moving-window"), "throttle.rate_limit_strategy"
        )
        if strategy not in RATE_LIMIT_STRATEGIES:
            known = ", ".join(RATE_LIMIT_STRATEGIES)
            raise self.fail("throttle.rate_limit_strategy", f"expected one of {known}")
        place = "throttle.reconnect"
        fields = frozenset({"enabled", "base", "max", "after", "min_failure_ratio"})
        reconnect = self.mapping(section.get("reconnect") or {}, place, fields)
        defaults = ReconnectConfig()
        after = reconnect.get("after", defaults.after)
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise self.fail(f"{place}.after", "expected a whole number of at least 1")
        ratio = self.number(
            reconnect.get("min_failure_ratio", defaults.min_failure_ratio),
            f"{place}.min_failure_ratio",
        )
        if ratio > 1:
            raise self.fail(f"{place}.min_failure_ratio", "expected a number from 0 to 1")
        result = ReconnectConfig(
            enabled=self.boolean(reconnect.get("enabled", True), f"{place}.enabled"),
            base=self.positive(reconnect.get("base", defaults.base), f"{place}.base"),
            max=self.positive(reconnect.get("max", defaults.max), f"{place}.max"),
            after=after,
            min_failure_ratio=ratio,
        )
        if result.max < result.base:
            raise self.fail(f"{place}.max", "must not be smaller than base")
        return ThrottleConfig(reconnect=result, rate_limit_strategy=strategy)

    def server(self, raw: Any) -> ServerConfig:
        fields = frozenset(
            {"host", "port", "routing_headers", "max_body_size", "trusted_proxies", "admin_key"}
            | {"config_poll_interval", "admin_port", "max_header_size", "header_timeout"}
            | {"body_timeout", "max_connections", "max_response_size", "forward_paths"}
        )
        section = self.mapping(raw, "server", fields)
        defaults = ServerConfig()
        port = self.port(section.get("port", defaults.port), "server.port")
        admin_port = section.get("admin_port")
        if admin_port is not None:
            admin_port = self.port(admin_port, "server.admin_port")
            if admin_port == port:
                raise self.fail("server.admin_port", "must differ from server.port")
        max_connections = section.get("max_connections", defaults.max_connections)
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise self.fail("server.max_connections", "expected a whole number of at least 1")
        forward_paths = self.string_list(
            section.get("forward_paths", list(defaults.forward_paths)), "server.forward_paths"
        )
        for i, path in enumerate(forward_paths):
            if not path.startswith("/") or ".." in path or "%" in path:
                raise self.fail(
                    f"server.forward_paths[{i}]",
                    f"expected a path like '/chat/completions', got {path!r}",
                )
        return ServerConfig(
            host=self.string(section.get("host", defaults.host), "server.host"),
            port=port,
            admin_port=admin_port,
            max_header_size=self.size(
                section.get("max_header_size", defaults.max_header_size), "server.max_header_size"
            ),
            header_timeout=self.positive(
                section.get("header_timeout", defaults.header_timeout), "server.header_timeout"
            ),
            body_timeout=self.positive(
                section.get("body_timeout", defaults.body_timeout), "server.body_timeout"
            ),
            max_connections=max_connections,
            max_response_size=self.size(
                section.get("max_response_size", defaults.max_response_size),
                "server.max_response_size",
            ),
            forward_paths=tuple(p.rstrip("/") for p in forward_paths),
            routing_headers=self.boolean(
                section.get("routing_headers", True), "server.routing_headers"
            ),
            max_body_size=self.size(
                section.get("max_body_size", defaults.max_body_size), "server.max_body_size"
            ),
            trusted_proxies=self.networks(
                section.get("trusted_proxies", []), "server.trusted_proxies"
            ),
            admin_key=self.string(
                section.get("admin_key", ""), "server.admin_key", allow_empty=True
            ).strip(),
            config_poll_interval=self.number(
                section.get("config_poll_interval", 1.0), "server.config_poll_interval"
            ),
        )

    def port(self, raw: Any, place: str) -> int:
        if isinstance(raw, str):
            raw = self.interpolate(raw, place)
            raw = int(raw) if raw.isdigit() else raw
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw < 65536:
            raise self.fail(place, f"expected a port number 1-65535, got {raw!r}")
        return raw

    def networks(self, raw: Any, place: str) -> tuple[str, ...]:
        entries = self.string_list(raw, place)
        for i, entry in enumerate(entries):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise self.fail(f"{place}[{i}]", f"not an IP address or CIDR: {entry!r}") from None
        return entries

    def backends(self, raw: Any) -> dict[str, BackendConfig]:
        if raw is None:
            raise self.fail("backends", "at least one backend is required")
        if not isinstance(raw, dict) or not raw:
            raise self.fail("backends", "expected a mapping of backend names to settings")
        return {str(name): self.backend(str(name), value) for name, value in raw.items()}

    def backend(self, name: str, raw: Any) -> BackendConfig:
        place = f"backends.{name}"
        fields = frozenset(
            {"base_url", "keys", "models", "timeout", "headers", "rate_limit", "breaker"}
            | {"key_probe_interval", "request_rewrite", "no_retry_errors"}
            | {"discover_models", "discover_interval", "max_cooldown"}
        )
        section = self.mapping(raw, place, fields)
        if "base_url" not in section:
            raise self.fail(f"{place}.base_url", "is required")
        return BackendConfig(
            name=name,
            base_url=self.base_url(section["base_url"], f"{place}.base_url"),
            keys=self.keys(section.get("keys", []), f"{place}.keys"),
            models=self.string_list(section.get("models", []), f"{place}.models"),
            timeout=self.timeouts(section.get("timeout") or {}, f"{place}.timeout"),
            headers=MappingProxyType(
                self.headers(section.get("headers") or {}, f"{place}.headers")
            ),
            rate_limit=self.rate_limit(section.get("rate_limit"), f"{place}.rate_limit"),
            breaker=self.breaker(section.get("breaker") or {}, f"{place}.breaker"),
            key_probe_interval=self.positive(
                section.get("key_probe_interval", 300.0), f"{place}.key_probe_interval"
            ),
            request_rewrite=self.rewrite(
                section.get("request_rewrite"), f"{place}.request_rewrite"
            ),
            no_retry_errors=frozenset(
                self.string_list(section.get("no_retry_errors", []), f"{place}.no_retry_errors")
            ),
            discover_models=self.boolean(
                section.get("discover_models", False), f"{place}.discover_models"
            ),
            discover_interval=self.positive(
                section.get("discover_interval", 600.0), f"{place}.discover_interval"
            ),
            max_cooldown=self.positive(section.get("max_cooldown", 300.0), f"{place}.max_cooldown"),
        )

    def rewrite(self, raw: Any, place: str) -> RewriteRules:
        if raw is None:
            return NO_RULES
        section = self.mapping(raw, place, frozenset({"rename", "clamp", "drop", "set"}))
        rename = self.mapping(section.get("rename") or {}, f"{place}.rename", None)
        clamp = self.mapping(section.get("clamp") or {}, f"{place}.clamp", None)
        bounds = []
        for name, pair in clamp.items():
            where = f"{place}.clamp.{name}"
            if not isinstance(pair, list) or len(pair) != 2:
                raise self.fail(where, "expected [low, high]")
            low, high = (self.number(v, where, minimum=float("-inf")) for v in pair)
            if low > high:
                raise self.fail(where, "low must not be above high")
            bounds.append((str(name), low, high))
        values = self.mapping(section.get("set") or {}, f"{place}.set", None)
        for name in values:
            if name == "model":
                raise self.fail(f"{place}.set.model", "the model is set by routing")
        return RewriteRules(
            rename=tuple(
                (str(a), self.string(b, f"{place}.rename.{a}")) for a, b in rename.items()
            ),
            clamp=tuple(bounds),
            drop=self.string_list(section.get("drop", []), f"{place}.drop"),
            set=tuple((str(k), v) for k, v in values.items()),
        )

    def breaker(self, raw: Any, place: str) -> BreakerConfig:
        section = self.mapping(raw, place, frozenset({"failures", "min_open", "max_open"}))
        defaults = BreakerConfig()
        failures = section.get("failures", defaults.failures)
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise self.fail(f"{place}.failures", "expected a whole number of at least 1")
        return BreakerConfig(
            failures=failures,
            min_open=self.positive(section.get("min_open", defaults.min_open), f"{place}.min_open"),
            max_open=self.positive(section.get("max_open", defaults.max_open), f"{place}.max_open"),
        )

    def base_url(self, raw: Any, place: str) -> str:
        url = self.string(raw, place, allow_empty=True)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(place, f"bad URL {url!r}: expected http(s)://host[:port]/path")
        if parts.query or parts.fragment:
            raise self.fail(place, f"bad URL {url!r}: no query or fragment allowed")
        return url.rstrip("/")

    def keys(self, raw: Any, place: str) -> tuple[KeyConfig, ...]:
        if not isinstance(raw, list):
            raise self.fail(place, f"expected a list of {{id, key}}, got {_kind(raw)}")
        keys: list[KeyConfig] = []
        seen: set[str] = set()
        for i, item in enumerate(raw):
            item_place = f"{place}[{i}]"
            entry = self.mapping(item, item_place, frozenset({"id", "key"}))
            if "id" not in entry:
                raise self.fail(f"{item_place}.id", "is required")
            key_id = self.string(entry["id"], f"{item_place}.id")
            if key_id in seen:
                raise self.fail(f"{item_place}.id", f"duplicate key id '{key_id}'")
            seen.add(key_id)
            raw_value = entry.get("key", "")
            env_vars = tuple(m[1] for m in _ENV_REF.finditer(str(raw_value)))
            # An empty key is "missing" (reported at start-up, 503 on use), not an error.
            value = self.string(raw_value, f"{item_place}.key", allow_empty=True).strip()
            keys.append(KeyConfig(id=key_id, value=value, env_vars=env_vars))
        return tuple(keys)

    def timeouts(self, raw: Any, place: str) -> Timeouts:
        section = self.mapping(raw, place, frozenset({"connect", "read", "first_byte", "idle"}))
        defaults = Timeouts()
        optional = {
            name: self.positive(section[name], f"{place}.{name}")
            for name in ("first_byte", "idle")
            if section.get(name) is not None
        }
        return Timeouts(
            connect=self.positive(section.get("connect", defaults.connect), f"{place}.connect"),
            read=self.positive(section.get("read", defaults.read), f"{place}.read"),
            **optional,
        )

    def positive(self, raw: Any, place: str) -> float:
        value = self.number(raw, place)
        if value <= 0:
            raise self.fail(place, "must be greater than 0")
        return value

    def headers(self, raw: Any, place: str) -> dict[str, str]:
        if not isinstance(raw, dict):
            raise self.fail(
                place, f"expected a mapping of header names to values, got {_kind(raw)}"
            )
        result = {}
        for name, value in raw.items():
            header = str(name).strip().lower()
            if header in ("authorization", "host", "content-length"):
                raise self.fail(_join(place, str(name)), "is set by the proxy itself")
            result[header] = self.string(value, _join(place, str(name)), allow_empty=True)
        return result

    def aliases(self, raw: Any) -> dict[str, str]:
        if not isinstance(raw, dict):
            raise self.fail("aliases", f"expected a mapping of alias to model id, got {_kind(raw)}")
        aliases = {
            str(name): self.string(target, _join("aliases", str(name)))
            for name, target in raw.items()
        }
        for name in aliases:
            chain = [name]
            while chain[-1] in aliases:
                chain.append(aliases[chain[-1]])
                if chain[-1] in chain[:-1]:
                    cycle = " -> ".join(chain)
                    raise self.fail(_join("aliases", name), f"alias cycle: {cycle}")
        return aliases

    def routes(self, raw: Any, backends: Mapping[str, BackendConfig]) -> list[RouteConfig]:
        if not isinstance(raw, list):
            raise self.fail("routes", f"expected a list of routes, got {_kind(raw)}")
        routes = []
        for i, item in enumerate(raw):
            place = f"routes[{i}]"
            fields = frozenset(
                {"prefix", "backend", "strip_prefix", "key", "fallback", "request_rewrite"}
            )
            entry = self.mapping(item, place, fields)
            for required in ("prefix", "backend"):
                if required not in entry:
                    raise self.fail(f"{place}.{required}", "is required")
            backend = self.string(entry["backend"], f"{place}.backend")
            if backend not in backends:
                known = ", ".join(backends)
                raise self.fail(f"{place}.backend", f"unknown backend '{backend}' (known: {known})")
            key = entry.get("key")
            if key is not None:
                key = self.string(key, f"{place}.key")
                if backends[backend].key(key) is None:
                    known = ", ".join(k.id for k in backends[backend].keys) or "none"
                    message = f"unknown key id '{key}' for backend '{backend}' (known: {known})"
                    raise self.fail(f"{place}.key", message)
            routes.append(
                RouteConfig(
                    prefix=self.string(entry["prefix"], f"{place}.prefix", allow_empty=True),
                    backend=backend,
                    strip_prefix=self.boolean(
                        entry.get("strip_prefix", False), f"{place}.strip_prefix"
                    ),
                    key=key,
                    fallback=self.fallbacks(
                        entry.get("fallback", []), f"{place}.fallback", backends
                    ),
                    request_rewrite=self.rewrite(
                        entry.get("request_rewrite"), f"{place}.request_rewrite"
                    ),
                )
            )
        return routes

    def fallbacks(
        self, raw: Any, place: str, backends: Mapping[str, BackendConfig]
    ) -> tuple[FallbackConfig, ...]:
        if not isinstance(raw, list):
            raise self.fail(place, f"expected a list of {{backend, model}}, got {_kind(raw)}")
        result = []
        for i, item in enumerate(raw):
            entry = self.mapping(item, f"{place}[{i}]", frozenset({"backend", "model"}))
            if "backend" not in entry:
                raise self.fail(f"{place}[{i}].backend", "is required")
            backend = self.string(entry["backend"], f"{place}[{i}].backend")
            if backend not in backends:
                known = ", ".join(backends)
                message = f"unknown backend '{backend}' (known: {known})"
                raise self.fail(f"{place}[{i}].backend", message)
            model = entry.get("model")
            model = self.string(model, f"{place}[{i}].model") if model is not None else None
            result.append(FallbackConfig(backend=backend, model=model))
        return tuple(result)


def _join(place: str, name: str) -> str:
    return f"{place}.{name}" if place else name


def _kind(value: Any) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", bool: "a boolean"}
    if value is None:
        return "nothing"
    return names.get(type(value), f"{type(value).__name__} {value!r}")
