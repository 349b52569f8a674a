"""The config file's one definition: YAML → ``${ENV}`` → validation → frozen dataclasses.

The dataclasses below declare the file's shape (types, units, defaults, limits, a line of
description per field); validation, ``config.schema.json`` and the reference table (``proxy
schema [--markdown]``) come from them. pydantic validates at start-up and reload only: the
rest of the proxy reads plain frozen dataclasses. Every problem of a file is reported at
once as ``file:line: place: message``, e.g. ``config.yaml:23: routes[2].backend: unknown
backend 'opena' (known: moonshot, openai)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import math
import os
import re
import ssl
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, get_args
from urllib.parse import urlsplit

import limits
import pydantic
from annotated_types import Ge, Gt, Le, MinLen
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic.json_schema import SkipJsonSchema

from proxy.config_yaml import MAX_CHARS, Document, Env, Path, YamlRefused, read_yaml
from proxy.redact import fingerprint, redact_url
from proxy.rewrite import NO_RULES, RewriteRules
from proxy.routing import Router


class Problem(NamedTuple):
    file: str
    line: int | None
    place: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return ": ".join(part for part in (where, self.place, self.message) if part)


class ConfigError(Exception):
    """Every problem of a file; ``file``, ``line``, ``place`` and ``message`` are the first's."""

    def __init__(self, file: str, place: str, message: str, line: int | None = None) -> None:
        self.problems: tuple[Problem, ...] = (Problem(file, line, place, message),)
        self.file, self.line, self.place, self.message = file, line, place, message
        super().__init__(str(self.problems[0]))

    def __str__(self) -> str:
        return "\n".join(map(str, self.problems))


def _text(value: Any) -> Any:
    """Numbers are text where text is expected (a key id `1`); an ``Env`` becomes a plain str."""
    plain = isinstance(value, int | float | Env) and not isinstance(value, bool)
    return str(value) if plain else value


def _check(test: Callable[[Any], object], message: str) -> AfterValidator:
    """Refuse a value ``test`` is false for (or raises ValueError); ``message`` may show it."""

    def check(value: Any) -> Any:
        try:
            ok = test(value)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(message.format(value))
        return value

    return AfterValidator(check)


def _units(pattern: str, units: dict[str, float], kind: str, schema: dict[str, Any]) -> Any:
    """``5m``, ``10MiB``: a number with a unit; the pattern goes into the JSON Schema too."""

    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {kind}, got a boolean")
        if not isinstance(value, str):
            return value
        if not (match := re.match(pattern, value)):
            raise ValueError(f"expected {kind}, got {value!r}")
        number = float(match[1]) * units[(match[2] or "").lower()]
        return int(number) if number.is_integer() else number

    text = {"type": "string", "pattern": pattern}
    return (BeforeValidator(parse), pydantic.WithJsonSchema({"anyOf": [schema, text]}))


_DURATION = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$"
_SIZE = r"^\s*(\d+)\s*([bB]|[kKmMgG][iI]?[bB])?\s*$"
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
_BYTES = {"": 1, "b": 1, "kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30}
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CR/LF split a header line; tab may stay
_NO_CONTROL = _check(lambda v: not _CONTROL.search(v), "must not contain control characters")
_DURATION_TEXT = "seconds or a duration like '500ms', '5m'"

Text = Annotated[str, BeforeValidator(_text), MinLen(1)]
AnyText = Annotated[str, BeforeValidator(_text)]
Secret = Annotated[str, BeforeValidator(_text), AfterValidator(str.strip), _NO_CONTROL]
Bool = Annotated[bool, pydantic.Strict()]
Whole = Annotated[int, pydantic.Strict(), Ge(1)]
Number = Annotated[float, pydantic.Strict()]
Seconds = Annotated[
    float, *_units(_DURATION, _SECONDS, _DURATION_TEXT, {"type": "number", "minimum": 0})
]
Positive = Annotated[Seconds, Gt(0)]
Size = Annotated[
    int,
    *_units(_SIZE, _BYTES, "a size like '10MiB'", {"type": "integer", "exclusiveMinimum": 0}),
    pydantic.Strict(),
    Gt(0),
]
Port = Annotated[
    int,
    BeforeValidator(lambda v: int(v) if isinstance(v, str) and v.isdigit() else v),  # ${PORT}
    pydantic.Strict(),
    Ge(1),
    Le(65535),
    pydantic.WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65535}),
]
Rate = Annotated[Text, _check(limits.parse_many, "expected a rate like '600/minute', got {!r}")]


def _ca_file(path: str) -> str:
    """A PEM bundle the backend's certificate is checked against: it must load now, not
    at the first request."""
    try:
        # A regular file only: opening a FIFO (or a device) would block the load for ever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"not a regular file: {path}")
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load certificates from {path}: {exc}") from None
    return path


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or _CONTROL.search(url):
        raise ValueError(f"bad URL {url!r}: expected http(s)://host[:port]/path")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no user:password@ in a URL: put credentials under keys or headers")
    if parts.query or parts.fragment:
        raise ValueError(f"bad URL {url!r}: no query or fragment allowed")
    return url.rstrip("/")


_network = partial(ipaddress.ip_network, strict=False)
Network = Annotated[Text, _check(_network, "not an IP address or CIDR: {!r}")]
ForwardPath = Annotated[
    Text,
    _check(lambda p: p.startswith("/") and ".." not in p and "%" not in p, "bad path {!r}"),
    AfterValidator(lambda p: p.rstrip("/")),
]
_STORES = ("memory://", "redis://", "rediss://")


def _storage(uri: str) -> str:
    """memory://, or a Redis URL that can be used (never shown with its password)."""
    if not uri.startswith(_STORES):
        raise ValueError(f"expected memory:// or redis://host:port, got {redact_url(uri)!r}")
    if not uri.startswith("memory://"):
        from redis.connection import parse_url  # only where Redis is used

        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018  (reading it validates it: a number, 0-65535)
            parse_url(uri)  # type: ignore[no-untyped-call]  # redis-py reads db and options
        except ValueError as exc:
            raise ValueError(f"unusable Redis URL {redact_url(uri)!r}: {exc}") from None
        if not parts.hostname and not parts.path:
            raise ValueError(f"no host in {redact_url(uri)!r}")
    return uri


Storage = Annotated[Text, AfterValidator(_storage)]
Bounds = Annotated[
    tuple[Number, Number], _check(lambda pair: pair[0] <= pair[1], "low must not be above high")
]
_FROZEN = AfterValidator(MappingProxyType)
_NONE = partial(MappingProxyType, {})  # an empty mapping nobody can change


def _plain(value: Any) -> Any:
    """Values as orjson takes them: no ``Env`` (a str subclass) left anywhere inside."""
    if isinstance(value, list | dict):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        plain = {k: _plain(v) for k, v in items}
        return plain if isinstance(value, dict) else list(plain.values())
    return str(value) if isinstance(value, Env) else value


_Plain = Annotated[Any, BeforeValidator(_plain)]
SetField = Annotated[str, _check(lambda k: k != "model", "the model is set by routing")]


def doc(text: str) -> Any:
    """A field's one-line description: into the JSON Schema and the reference table."""
    return Field(description=text)


_RESERVED = ("authorization", "host", "content-length")  # the proxy sets these itself
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 9110 token: no space, colon, CR or LF
HeaderName = Annotated[
    str,
    AfterValidator(lambda name: name.strip().lower()),
    _check(lambda header: header not in _RESERVED, "is set by the proxy itself"),
    _check(_TOKEN.fullmatch, "not a valid header name (letters, digits and -)"),
]
Headers = Annotated[Mapping[HeaderName, Annotated[AnyText, _NO_CONTROL]], _FROZEN]


@dataclass(frozen=True)
class _Section:
    """What every section shares: unknown fields and nan/inf refused, nulls are defaults."""

    __pydantic_config__ = pydantic.ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        """``key:`` with nothing after it means the default; ``env_vars`` are never read."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}
        if "env_vars" in cls.__dataclass_fields__:  # where the key came from, for hints
            data["env_vars"] = getattr(data.get("key"), "names", ())
        return data


@dataclass(frozen=True)
class _RewriteSpec(_Section):
    rename: Annotated[dict[str, Text], doc("field: new name")] = field(default_factory=dict)
    clamp: Annotated[dict[str, Bounds], doc("field: [low, high]")] = field(default_factory=dict)
    drop: Annotated[tuple[Text, ...], doc("fields removed from the body")] = ()
    set: Annotated[dict[SetField, _Plain], doc("field: value sent")] = field(default_factory=dict)

    def rules(self) -> RewriteRules:
        clamp = tuple((name, low, high) for name, (low, high) in self.clamp.items())
        return RewriteRules(tuple(self.rename.items()), clamp, self.drop, tuple(self.set.items()))


if TYPE_CHECKING:  # what the rest of the proxy sees; the file holds a _RewriteSpec
    Rewrite = RewriteRules
else:
    Rewrite = Annotated[_RewriteSpec, AfterValidator(_RewriteSpec.rules)]


@dataclass(frozen=True)
class KeyConfig(_Section):
    id: Annotated[Text, doc("the key's name in logs, metrics and route pins")]
    value: Annotated[Secret, Field(alias="key", description="the secret; empty: missing")] = field(
        default="", repr=False
    )
    env_vars: SkipJsonSchema[tuple[str, ...]] = ()  # the variables the value was read from

    @property
    def present(self) -> bool:
        return bool(self.value)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value)


@dataclass(frozen=True)
class Timeouts(_Section):
    connect: Annotated[Positive, doc("seconds to open the connection")] = 5.0
    read: Annotated[Positive, doc("the default for first_byte and idle")] = 600.0
    first_byte: Annotated[Positive | None, doc("request sent -> response head")] = None
    idle: Annotated[Positive | None, doc("longest silent gap inside a response")] = None

    @property
    def first_byte_seconds(self) -> float:
        return self.first_byte if self.first_byte is not None else self.read

    @property
    def idle_seconds(self) -> float:
        return self.idle if self.idle is not None else self.read


@dataclass(frozen=True)
class BreakerConfig(_Section):
    failures: Annotated[Whole, doc("consecutive failures that open the circuit")] = 5
    min_open: Annotated[Positive, doc("the first open period; doubles while failing")] = 1.0
    max_open: Annotated[Positive, doc("the longest open period")] = 60.0


AnthropicAuth = Literal["x-api-key", "bearer"]
_NO_V1 = "expected the SDK's base URL, without /v1 (the proxy appends /v1/messages), got {!r}"


@dataclass(frozen=True)
class BackendConfig(_Section):
    name: SkipJsonSchema[str]  # its key under `backends:`
    base_url: Annotated[Text, AfterValidator(_base_url), doc("http(s)://host[:port]/path")]
    keys: Annotated[tuple[KeyConfig, ...], doc("upstream keys, used in turn")] = ()
    models: Annotated[tuple[Text, ...], doc("model ids served (routed as they are)")] = ()
    timeout: Annotated[Timeouts, doc("upstream timeouts")] = Timeouts()
    headers: Annotated[Headers, doc("extra headers sent upstream")] = field(default_factory=_NONE)
    ca_file: Annotated[
        Text | None,
        AfterValidator(_ca_file),
        doc("PEM certificates trusted for this backend's https (besides the system's)"),
    ] = None
    rate_limit: Annotated[Rate | None, doc("outbound limit, e.g. 500/minute")] = None
    breaker: Annotated[BreakerConfig, doc("circuit breaker")] = BreakerConfig()
    key_probe_interval: Annotated[Positive, doc("how often an invalid key is retried")] = 300.0
    request_rewrite: Annotated[Rewrite, doc("the provider's quirks, as data")] = NO_RULES
    no_retry_errors: Annotated[frozenset[Text], doc("error types never retried")] = frozenset()
    discover_models: Annotated[Bool, doc("list the backend's own /models too")] = False
    discover_interval: Annotated[Positive, doc("seconds between /models refreshes")] = 600.0
    max_cooldown: Annotated[Positive, doc("cap on a key's cooldown (retry-after)")] = 300.0
    inject_stream_usage: Annotated[
        Bool, doc("ask for usage on streamed chat (stream_options.include_usage)")
    ] = True
    anthropic_base_url: Annotated[
        Text | None,
        AfterValidator(_base_url),
        _check(lambda u: not u.endswith("/v1"), _NO_V1),
        doc("Anthropic Messages endpoint (the SDK's base URL, without /v1); none: not spoken"),
    ] = None
    anthropic_auth: Annotated[
        AnthropicAuth, BeforeValidator(_text), doc("how the key goes to anthropic_base_url")
    ] = "x-api-key"
    provider: Annotated[
        Text | None, doc("gen_ai.provider.name in traces; none: known by its host, or its name")
    ] = None
    chat_wire: Annotated[
        Literal["chat"] | None,
        doc(
            "the wire base_url's chat speaks; chat: Messages and Responses requests are translated"
        ),
    ] = None
    reasoning_effort: Annotated[
        Bool, doc("takes reasoning_effort (a translated request's thinking budget goes there)")
    ] = False

    def key(self, key_id: str) -> KeyConfig | None:
        return next((k for k in self.keys if k.id == key_id), None)


@dataclass(frozen=True)
class FallbackConfig(_Section):
    backend: Annotated[Text, doc("the backend tried next")]
    model: Annotated[Text | None, doc("the id sent there; default: the same id")] = None


Weight = Annotated[float, pydantic.Strict(), Ge(0.001), Le(1_000_000)]  # an int too, not a bool
MAX_ATTEMPTS = 10  # upstream attempts of one request, at most, whatever a route says


@dataclass(frozen=True)
class DeploymentConfig(_Section):
    backend: Annotated[Text, doc("a backend serving the route's models")]
    model: Annotated[Text | None, doc("the id sent there; default: the id as routed")] = None
    weight: Annotated[Weight, doc("share of the traffic, relative to the others")] = 1.0
    key: Annotated[Text | None, doc("pin one key id of the backend")] = None

    @property
    def name(self) -> str:
        """How metrics, logs and /admin name it: bounded by the config."""
        return f"{self.backend}/{self.model}" if self.model else self.backend


@dataclass(frozen=True)
class RouteConfig(_Section):
    prefix: Annotated[AnyText, doc('model ids starting with this ("" matches all)')]
    backend: Annotated[Text | None, doc("the backend that serves them (or deployments:)")] = None
    strip_prefix: Annotated[Bool, doc("send the id without the prefix")] = False
    key: Annotated[Text | None, doc("pin one key id of the backend")] = None
    deployments: Annotated[
        tuple[DeploymentConfig, ...], doc("backends serving them, balanced (or backend:)")
    ] = ()
    strategy: Annotated[
        Literal["weighted", "least-busy", "latency"], doc("how a deployment is chosen")
    ] = "weighted"
    max_attempts: Annotated[
        int,
        pydantic.Strict(),
        Ge(1),
        Le(MAX_ATTEMPTS),
        doc("upstream attempts per request, all causes together (keys, deployments, fallbacks)"),
    ] = 3
    affinity: Annotated[
        Literal["session", "client", "none"],
        doc("keep a conversation on one deployment and key (its prompt cache)"),
    ] = "session"
    fallback: Annotated[tuple[FallbackConfig, ...], doc("tried in order on failure")] = ()
    request_rewrite: Annotated[Rewrite, doc("applied after the backend's rules")] = NO_RULES

    @pydantic.model_validator(mode="after")
    def _one_pool(self) -> RouteConfig:
        """``backend:`` is a pool of one; ``deployments:`` names several. Exactly one."""
        if (self.backend is None) == (not self.deployments):
            raise ValueError("give either backend: or deployments:, not both or neither")
        if self.backend is not None:
            one = DeploymentConfig(self.backend, None, 1.0, self.key)
            object.__setattr__(self, "deployments", (one,))
        else:
            names = [d.name for d in self.deployments]
            twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if twice is not None:
                raise ValueError(f"deployment '{twice}' is listed twice")
            object.__setattr__(self, "backend", self.deployments[0].backend)
        return self

    @property
    def first_backend(self) -> str:
        return self.deployments[0].backend


@dataclass(frozen=True)
class PathRule(_Section):
    prefix: Annotated[ForwardPath, doc("the path after /v1, and all below it")]
    backend: Annotated[Text, doc("the backend requests without a model go to")]
    key: Annotated[Text | None, doc("pin one key id of the backend")] = None


@dataclass(frozen=True)
class ObjectsConfig(_Section):
    ttl: Annotated[Positive, doc("seconds an object id stays bound to its backend and key")] = (
        30 * 86400.0
    )
    max_entries: Annotated[Whole, doc("ids remembered per process (memory storage)")] = 100_000
    max_entries_per_client: Annotated[
        Whole, doc("ids remembered per client (memory storage): none evicts another's")
    ] = 20_000
    unknown: Annotated[
        Literal["refuse", "allow"],
        doc("a client naming an id with no record: 404 (refuse) or sent on (allow)"),
    ] = "refuse"
    conversation_bytes: Annotated[
        Size, doc("memory for translated Responses conversations the proxy keeps, per process")
    ] = 64 * 2**20
    conversation_bytes_per_client: Annotated[
        Size, doc("one client's share of it: none evicts another's")
    ] = 16 * 2**20
    conversation_ttl: Annotated[Positive, doc("seconds a kept conversation lasts")] = 86400.0


Usd = Annotated[float, pydantic.Strict(False), Ge(0), Le(1_000_000)]


@dataclass(frozen=True)
class PriceConfig(_Section):
    input: Annotated[Usd, doc("USD per million input tokens")]
    output: Annotated[Usd, doc("USD per million output tokens")]
    cached_input: Annotated[Usd | None, doc("read from the prompt cache; default: input")] = None
    cache_write_5m: Annotated[Usd | None, doc("written to the cache; default: input")] = None
    cache_write_1h: Annotated[Usd | None, doc("written for an hour; default: cache_write_5m")] = (
        None
    )
    reasoning: Annotated[Usd | None, doc("reasoning output; default: output")] = None


@dataclass(frozen=True)
class BudgetConfig(_Section):
    per: Annotated[Literal["day", "week", "month"], doc("the window (UTC calendar)")]
    usd: Annotated[Usd | None, doc("spend allowed per window")] = None
    tokens: Annotated[
        int | None, pydantic.Strict(), Ge(1), doc("tokens allowed per window (or usd:)")
    ] = None

    @pydantic.model_validator(mode="after")
    def _one_meter(self) -> BudgetConfig:
        if (self.usd is None) == (self.tokens is None):
            raise ValueError("give either usd: or tokens:, not both or neither")
        return self


@dataclass(frozen=True)
class SpendConfig(_Section):
    default_max_tokens: Annotated[
        Whole, doc("output reserved for a request naming no max_tokens, against budgets")
    ] = 4096
    reservation_timeout: Annotated[
        Positive, doc("a reservation whose request never settled is released after this")
    ] = 900.0


@dataclass(frozen=True)
class TelemetryConfig(_Section):
    otlp_endpoint: Annotated[
        Text | None,
        AfterValidator(_base_url),
        doc("OTLP/HTTP collector, e.g. http://127.0.0.1:4318; none: no traces (needs [otel])"),
    ] = None
    service_name: Annotated[Text, doc("the service.name of spans and metrics")] = "llm-proxy"
    sample_ratio: Annotated[
        Number, Ge(0), Le(1), doc("share of new traces kept (a client's sampled one always is)")
    ] = 1.0
    metrics: Annotated[Bool, doc("export the GenAI metrics too")] = True
    trust_client_trace: Annotated[
        Bool, doc("continue a client's traceparent (false: a new trace, linked to it)")
    ] = True


@dataclass(frozen=True)
class ClientConfig(_Section):
    id: Annotated[Text, doc("the client's name in logs and metrics")]
    key: Annotated[Secret, doc('its Bearer key, e.g. "${TEAM_A_KEY}"')] = field(repr=False)
    env_vars: SkipJsonSchema[tuple[str, ...]] = ()
    rate_limit: Annotated[Rate | None, doc("e.g. 600/minute")] = None
    models: Annotated[tuple[Text, ...], doc("glob patterns allowed; empty: every model")] = ()
    objects: Annotated[
        Literal["own", "shared"], doc("own: sees only its objects; shared: sees every one")
    ] = "own"
    budget: Annotated[BudgetConfig | None, doc("spend or tokens per day, week or month")] = None
    tpm: Annotated[
        int | None, pydantic.Strict(), Ge(1), doc("tokens per minute, streams included")
    ] = None


@dataclass(frozen=True)
class ReconnectConfig(_Section):
    enabled: Annotated[Bool, doc("slow down clients whose requests keep failing")] = True
    base: Annotated[Positive, doc("the first wait")] = 1.0
    max: Annotated[Positive, doc("the longest wait")] = 60.0
    after: Annotated[Whole, doc("failures in a row (client, model) before a wait")] = 3
    min_failure_ratio: Annotated[Number, Ge(0), Le(1), doc("...while this share fails")] = 0.5


Strategy = Literal["moving-window", "sliding-window-counter", "fixed-window"]
RATE_LIMIT_STRATEGIES: tuple[str, ...] = get_args(Strategy)


@dataclass(frozen=True)
class ThrottleConfig(_Section):
    reconnect: Annotated[ReconnectConfig, doc("reconnect backoff")] = ReconnectConfig()
    # moving-window is exact but keeps one entry per request in the window (in memory, each
    # request costs O(limit)); sliding-window-counter is O(1): better for limits in thousands.
    rate_limit_strategy: Annotated[
        Strategy, BeforeValidator(_text), doc("how rates are counted")
    ] = "moving-window"


# The OpenAI API's resources, by the first segment after /v1: a path is forwarded when it is
# one of these or below one. Left out: /organization and /projects, the admin API, which a
# client must never reach with the operator's key.
DEFAULT_FORWARD_PATHS = (
    "/chat",
    "/completions",
    "/embeddings",
    "/responses",
    "/moderations",
    "/images",
    "/audio",
    "/files",
    "/uploads",
    "/batches",
    "/vector_stores",
    "/fine_tuning",
    "/conversations",
    "/containers",
    "/evals",
    "/models",
    "/realtime",
    "/videos",
    "/skills",
    "/chatkit",
    "/assistants",
    "/threads",
    "/content_provenance_checks",
)


@dataclass(frozen=True)
class ServerConfig(_Section):
    host: Annotated[Text, doc("listen address")] = "127.0.0.1"
    open: Annotated[
        Bool, doc("serve without `clients:` on a non-loopback address (refused otherwise)")
    ] = False
    port: Annotated[Port, doc("listen port")] = 8080
    routing_headers: Annotated[Bool, doc("x-proxy-backend/-key/-model on responses")] = True
    max_body_size: Annotated[Size, doc("request bodies; 413 beyond")] = 10 * 2**20
    max_buffered_bodies: Annotated[
        Size, doc("all request bodies being read at once, per process; 503 beyond")
    ] = 128 * 2**20
    trusted_proxies: Annotated[tuple[Network, ...], doc("whose X-Forwarded-For counts")] = ()
    admin_key: Annotated[Secret, doc("Bearer for /admin/*")] = field(default="", repr=False)
    config_poll_interval: Annotated[Seconds, doc("file checks; 0: SIGHUP only")] = 1.0
    admin_port: Annotated[Port | None, doc("/metrics and /admin/* on their own port")] = None
    max_header_size: Annotated[Size, doc("request line + headers; 431 beyond")] = 64 * 2**10
    header_timeout: Annotated[Positive, doc("connection open -> headers in; 408")] = 10.0
    body_timeout: Annotated[Positive, doc("headers in -> whole body in; 408")] = 60.0
    upload_deadline: Annotated[
        Positive, doc("headers in -> whole streamed upload in, however it trickles; 408")
    ] = 3600.0
    max_uploads_per_client: Annotated[
        Whole, doc("streamed uploads one client key sends at once; 429 beyond")
    ] = 8
    max_connections: Annotated[Whole, doc("beyond, only /health and /ready answer")] = 2048
    # 30 s: a non-streamed answer or a short stream finishes in it, and with a 5 s preStop
    # and a 10 s margin the pod's grace period (45 s) stays near Kubernetes' default; a
    # long stream is ended with its dialect's error event, never cut silently. Capped at
    # an hour: a rollout must end.
    drain_timeout: Annotated[
        Positive, Le(3600), doc("SIGTERM -> requests in flight may finish; then ended")
    ] = 30.0
    max_response_size: Annotated[Size, doc("non-streamed bodies; 502 beyond")] = 64 * 2**20
    max_upload_size: Annotated[Size, doc("streamed (multipart, binary) request bodies; 413")] = (
        512 * 2**20
    )
    max_spilled_bodies: Annotated[
        Size, doc("upload heads held on disk at once, per process; 503 beyond")
    ] = 2 * 2**30
    forward_paths: Annotated[
        tuple[ForwardPath, ...], doc("paths after /v1 forwarded, with all below them")
    ] = DEFAULT_FORWARD_PATHS
    # After a streaming client leaves, the upstream is read on (and dropped) this long and
    # this far to collect the usage event; capped so a gone client cannot hold a stream.
    usage_grace: Annotated[
        Seconds, Le(30), doc("after a stream's client left: read on for its usage (s)")
    ] = 2.0
    usage_grace_bytes: Annotated[
        Size, Le(16 * 2**20), doc("after a stream's client left: read on at most this much")
    ] = 2**20


@dataclass(frozen=True)
class Config(_Section):
    path: SkipJsonSchema[str]  # these two come from the caller, not the file
    backends: Annotated[Mapping[str, BackendConfig], MinLen(1), _FROZEN, doc("providers by name")]
    server: Annotated[ServerConfig, doc("the listener")] = ServerConfig()
    aliases: Annotated[Mapping[str, Text], _FROZEN, doc("alias: model id")] = field(
        default_factory=_NONE
    )
    routes: Annotated[tuple[RouteConfig, ...], doc("first match wins")] = ()
    paths: Annotated[tuple[PathRule, ...], doc("requests without a model: first match")] = ()
    default_backend: Annotated[Text | None, doc("any other request without a model")] = None
    objects: Annotated[ObjectsConfig, doc("files, responses, ... stay where made")] = (
        ObjectsConfig()
    )
    clients: Annotated[tuple[ClientConfig, ...], doc("client keys; none: open proxy")] = ()
    pricing: Annotated[
        Mapping[str, PriceConfig],
        _FROZEN,
        doc("model id or glob: prices over the shipped table (USD per million tokens)"),
    ] = field(default_factory=_NONE)
    spend: Annotated[SpendConfig, doc("budgets' reservations")] = SpendConfig()
    telemetry: Annotated[TelemetryConfig, doc("OpenTelemetry traces and GenAI metrics")] = (
        TelemetryConfig()
    )
    session_headers: Annotated[
        tuple[Annotated[Text, _NO_CONTROL], ...],
        doc("request headers naming a conversation, for affinity (read, never forwarded)"),
    ] = ("x-claude-code-session-id", "session-id", "thread-id")
    throttle: Annotated[ThrottleConfig, doc("backoff and rate counting")] = ThrottleConfig()
    storage: Annotated[Storage, doc("memory:// or redis://host:port (shared)")] = "memory://"
    digest: SkipJsonSchema[str] = ""  # sha256 of the file's text: which version is in force


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate ``path``; raise ``ConfigError`` with every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CHARS + 1)  # never more than read_yaml accepts
        if len(data) > MAX_CHARS:
            raise ConfigError(path, "", f"file too large: over {MAX_CHARS // 1024} KiB")
        text = data.decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        raise ConfigError(path, "", message, line) from None
    return parse_config(text, path, os.environ if environ is None else environ)


def parse_config(text: str, path: str, environ: Mapping[str, str]) -> Config:
    try:
        doc = read_yaml(text, environ)
    except YamlRefused as exc:
        raise ConfigError(path, "", exc.message, exc.line) from None
    problems = [*doc.problems, *((doc.line_of(p), p, m) for p, m in _cross_checks(doc.data))]
    config = None
    try:
        config = _adapter().validate_python(_named(doc.data, path, text))
    except pydantic.ValidationError as exc:  # not again where the reader found a problem
        more = (_problem(error, doc) for error in exc.errors(include_url=False))
        problems += [p for p in more if p[1] not in {place for _, place, _ in doc.problems}]
    if config is not None and not problems:
        problems += [(doc.line_of(p), p, m) for p, m in _built_checks(config)]
    if config is None or problems:
        problems.sort(key=lambda p: (p[0] or 0, _place(p[1])))
        error = ConfigError(path, "", "")
        error.problems = tuple(Problem(path, ln, _place(p), _redact(m)) for ln, p, m in problems)
        _, error.line, error.place, error.message = error.problems[0]
        raise error
    return config


def _named(data: Any, path: str, text: str) -> Any:
    """Each backend learns its name, the config its file and digest: none of them is written."""
    if not isinstance(data, dict):
        return data
    named = {**data, "path": path, "digest": hashlib.sha256(text.encode()).hexdigest()}
    if isinstance(backends := data.get("backends"), dict):
        named["backends"] = {
            k: {**v, "name": k} if isinstance(v, dict) else v for k, v in backends.items()
        }
    return named


@cache
def _adapter() -> pydantic.TypeAdapter[Config]:
    return pydantic.TypeAdapter(Config)


@cache
def json_schema() -> dict[str, Any]:
    """The JSON Schema of the file (for editors: yaml-language-server). Do not modify it."""
    schema = _tidy(_adapter().json_schema())
    head = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "llm-proxy config"}
    return {**head, **schema}


def _tidy(node: Any) -> Any:
    """Without pydantic's generated titles and whole-section defaults: noise in an editor."""
    if isinstance(node, dict) and "$ref" in node:
        node = {k: v for k, v in node.items() if k != "default"}
    if isinstance(node, dict):
        return {k: _tidy(v) for k, v in node.items() if k != "title"}
    return [_tidy(n) for n in node] if isinstance(node, list) else node


def _cross_checks(raw: Any) -> Iterator[tuple[Path, str]]:
    """What one field cannot know: references between sections, duplicates, alias cycles."""
    top = _dict(raw)
    backends = _dict(top.get("backends"))
    key_ids: dict[str, list[str]] = {}
    for name, backend in backends.items():
        ids = [_scalar(_dict(k).get("id")) or "" for k in _list(_dict(backend).get("keys"))]
        for i, key_id in enumerate(ids):
            if key_id and key_id in ids[:i]:
                yield ("backends", name, "keys", i, "id"), f"duplicate key id '{key_id}'"
        key_ids[name] = ids
    known = ", ".join(backends) or "none"
    for i, route in enumerate(map(_dict, _list(top.get("routes")))):
        if route.get("backend") is not None:
            yield from _backend_and_key(("routes", i), route, key_ids)
        for j, deployment in enumerate(map(_dict, _list(route.get("deployments")))):
            yield from _backend_and_key(("routes", i, "deployments", j), deployment, key_ids)
        for j, step in enumerate(_list(route.get("fallback"))):
            if (other := _scalar(_dict(step).get("backend"))) is not None and other not in backends:
                message = f"unknown backend '{other}' (known: {known})"
                yield ("routes", i, "fallback", j, "backend"), message
    for i, rule in enumerate(map(_dict, _list(top.get("paths")))):
        yield from _backend_and_key(("paths", i), rule, key_ids)
    default = _scalar(top.get("default_backend"))
    if default is not None and default not in backends:
        yield ("default_backend",), f"unknown backend '{default}' (known: {known})"
    seen: dict[str | None, int] = {}
    for i, client in enumerate(map(_dict, _list(top.get("clients")))):
        for what in ("id", "key"):
            value = _scalar(client.get(what))
            value = value.strip() if what == "key" and value else value
            if value and seen.setdefault(f"{what}:{value}", i) != i:
                shown = f"client id '{value}'" if what == "id" else "key"  # a key is never shown
                message = f"duplicate {shown}: the same as clients[{seen[f'{what}:{value}']}]"
                yield ("clients", i, what), message
    aliases = {k: str(v) for k, v in _dict(top.get("aliases")).items() if _scalar(v) is not None}
    for name in aliases:
        chain = [name]
        while chain[-1] in aliases and chain[-1] not in chain[:-1]:
            chain.append(aliases[chain[-1]])
        if chain[-1] in chain[:-1]:
            yield ("aliases", name), f"alias cycle: {' -> '.join(chain)}"


def _backend_and_key(
    place: Path, rule: dict[str, Any], key_ids: dict[str, list[str]]
) -> Iterator[tuple[Path, str]]:
    """A rule's ``backend`` must exist, and its ``key`` (when pinned) be one of its keys."""
    backend, key = _scalar(rule.get("backend")), _scalar(rule.get("key"))
    if backend is not None and backend not in key_ids:
        known = ", ".join(key_ids) or "none"
        yield (*place, "backend"), f"unknown backend '{backend}' (known: {known})"
    elif key is not None and backend is not None and key not in key_ids[backend]:
        have = ", ".join(dict.fromkeys(key_ids[backend])) or "none"
        yield (*place, "key"), f"unknown key id '{key}' for backend '{backend}' (known: {have})"


def _built_checks(config: Config) -> Iterator[tuple[Path, str]]:
    """Checks of values only known once parsed (durations, routing)."""
    if config.server.admin_port == config.server.port:
        yield ("server", "admin_port"), "must differ from server.port"
    if config.throttle.reconnect.max < config.throttle.reconnect.base:
        yield ("throttle", "reconnect", "max"), "must not be smaller than base"
    if config.telemetry.otlp_endpoint is not None and not _otel_installed():
        message = "needs OpenTelemetry, which is not installed: pip install 'llm-proxy[otel]'"
        yield ("telemetry", "otlp_endpoint"), message
    router = Router(config)
    for alias, target in config.aliases.items():
        if router.resolve(alias) is None:
            message = f"'{target}' routes nowhere: no route matches, no backend lists it"
            yield ("aliases", alias), message


def _otel_installed() -> bool:
    """The SDK and its OTLP/HTTP exporter can be imported (looked up, not imported)."""
    try:
        for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"):
            if importlib.util.find_spec(module) is None:
                return False
    except (ImportError, ValueError):  # a parent package missing, or blocked
        return False
    return True


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _scalar(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool | dict | list) else str(value)


_MESSAGES = {
    "missing": "is required",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "too_short": "expected at least {min_length} values",
    "too_long": "expected at most {max_length} values",
    "literal_error": "expected one of {expected}",
    "finite_number": "expected a finite number, got {got}",
}
_EXPECTED = {"string": "a string", "bool": "true or false", "int": "a whole number"}
_EXPECTED |= {"float": "a number", "dict": "a mapping", "dataclass": "a mapping"}


def _problem(error: Any, doc: Document) -> tuple[int | None, Path, str]:
    kind, ctx = error["type"], error.get("ctx") or {}
    place, value = _locate(error["loc"], doc.data, kind == "missing")
    if kind == "value_error":
        message = str(ctx["error"])
    elif kind in ("extra_forbidden", "unexpected_keyword_argument"):
        message = _unknown_field(place)
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        what = _EXPECTED.get(kind.rsplit("_", 1)[0], "a list")
        message = f"expected {what}, got {_kind(value)}"
    elif kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        message = "must not be empty"
    else:
        message = _MESSAGES.get(kind, error["msg"]).format(got=_kind(value), **ctx)
    if isinstance(value, Env):  # show what the file says, never the environment's value
        if (shown := repr(str(value))) in message:
            message = message.replace(shown, repr(value.raw))
        elif value:
            message = message.replace(value, value.raw)
        message += f" ({' and '.join(value.unset)} not set)" if value.unset else ""
    return doc.line_of(place), place, message


def _locate(loc: tuple[Any, ...], data: Any, missing: bool) -> tuple[Path, Any]:
    """The place in the file of a pydantic ``loc`` (which also names union members)."""
    place: list[str | int] = []
    for i, part in enumerate(loc):
        if part in (data if isinstance(data, dict) else range(len(_list(data)))):
            data = data[part]
        elif missing and i == len(loc) - 1:
            data = None
        else:
            continue
        place.append(part)
    return tuple(place), data


def _unknown_field(place: Path) -> str:
    node, schema = json_schema(), json_schema()
    for part in (*place[:-1], None):
        while "$ref" in node or "anyOf" in node:
            node = schema["$defs"][node["$ref"][8:]] if "$ref" in node else node["anyOf"][0]
        if part is not None:
            key = "items" if isinstance(part, int) else "additionalProperties"
            node = node.get("properties", {}).get(part) or node.get(key) or {}
    known = sorted(node.get("properties", {}))
    import difflib  # only ever needed for a broken file

    name = str(place[-1])
    guess = difflib.get_close_matches(name, known, n=1) or [k for k in known if name in k][:1]
    hint = f", did you mean '{guess[0]}'?" if guess else ""
    return f"unknown field{hint} (known: {', '.join(known)})"


def _place(place: Path) -> str:
    text = ""
    for part in place:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _redact(message: str) -> str:
    """No password of a URL in a message: ``user:***@``, ``password=***``."""
    message = re.sub(r"(//[^/\s:@]*:)[^@\s/]*@", r"\1***@", message)
    return re.sub(r"(password=)[^&\s'\"]*", r"\1***", message)


def _kind(value: Any) -> str:
    names = {type(None): "nothing", dict: "a mapping", list: "a list", bool: "a boolean"}
    if isinstance(value, Env) or type(value) in names:
        return repr(value.raw) if isinstance(value, Env) else names[type(value)]
    finite = not isinstance(value, float) or math.isfinite(value)
    return f"{type(value).__name__} {value!r}" if finite else str(value)
