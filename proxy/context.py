"""One request's context: everything the proxy learns about a request while it runs.

Modelled on envoy's ``StreamInfo``: one object per request (HTTP or Realtime), made when the
request arrives, written as it goes through its steps and read at its end by the access log,
the metrics and the reconnect throttle. It is the only mutable per-request state.

Steps write through the methods below, named for what happened (``routed``,
``attempt_failed``, ``responded``...); everyone reads the attributes. Nothing else assigns
them: what a request's log line and metrics say can be traced to these few methods.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from proxy.dialects import DEFAULT, Dialect
from proxy.throttle import Outcome
from proxy.usage import NO_TOKENS, TokenCounts

if TYPE_CHECKING:
    from proxy.balance import DeploymentStats
    from proxy.batch_spend import FileEstimate
    from proxy.routing import Target
    from proxy.spend import Reservation
    from proxy.telemetry import RequestTrace


def outcome_of(status: int) -> Outcome:
    """What the reconnect throttle learns from an answer's status."""
    if status < 400:
        return Outcome.SUCCESS
    if status == 429 or status >= 500:
        return Outcome.FAILURE
    return Outcome.NEUTRAL


ANONYMOUS = "anonymous"  # the client label of an open proxy's requests


class RequestContext:
    """What one request has done so far: enough to answer an error, log it and learn from it."""

    __slots__ = (
        "attempt_errors",
        "attempt_limit",
        "attempts",
        "backend",
        "batch",
        "client",
        "client_gone",
        "client_label",
        "cost",
        "deployment",
        "deployment_since",
        "deployment_stats",
        "dialect",
        "error",
        "finished",
        "key",
        "limit_headers",
        "method",
        "model",
        "model_label",
        "outcome",
        "overhead",
        "path",
        "request_id",
        "reservation",
        "response_started",
        "sent_at",
        "session",
        "started",
        "status",
        "stream",
        "streaming",
        "target",
        "throttle_reason",
        "tokens",
        "tokens_partial",
        "trace",
        "ttft",
        "upstream_error",
        "upstream_model",
        "upstream_request_id",
        "upstream_wire",
    )

    def __init__(
        self,
        method: str,
        path: str,
        request_id: str = "",
        dialect: Dialect = DEFAULT,
        stream: bool = False,
    ) -> None:
        self.started = time.perf_counter()
        self.method = method
        self.path = path
        self.request_id = request_id  # the client's X-Request-Id, or one the proxy made
        self.dialect = dialect  # the wire the client speaks: its errors, the endpoint label
        self.stream = stream
        self.upstream_request_id: str | None = None  # the provider's, for its support desk
        self.model: str | None = None  # as the client named it
        self.upstream_model: str | None = None
        self.upstream_wire: str | None = None  # a translated request: the wire sent upstream
        self.model_label = "unrouted"  # for metrics
        self.backend: str | None = None  # the backend last tried
        self.key: str | None = None  # the key *id* last tried; the secret never reaches here
        self.client: str | None = None  # client key id, or address when the proxy is open
        self.client_label = ANONYMOUS  # for metrics: the client id, never an address
        # reconnect | client_rate_limit | backend_rate_limit | circuit_open
        self.throttle_reason: str | None = None
        # connect | timeout | redirect | bad_status | status_4xx | status_429 | status_5xx | ...
        self.upstream_error: str | None = None
        self.attempt_errors: list[tuple[str, str, str]] = []  # backend, key, kind
        self.attempts = 0  # upstream calls made (all causes: keys, deployments, fallbacks)
        self.attempt_limit = 0  # no further call once ``attempts`` reaches it
        self.session: str | None = None  # the conversation, for affinity (never logged)
        self.deployment: str | None = None  # the pool deployment answering, by name
        self.deployment_stats: DeploymentStats | None = None  # its in-flight count is ours
        self.deployment_since = 0.0  # perf_counter when the call to it began
        self.status = 0
        self.error: str | None = None
        self.sent_at: float | None = None  # perf_counter when the first upstream call began
        self.ttft: float | None = None  # seconds to the upstream's first data (streams)
        self.overhead: float | None = None  # seconds the proxy itself added
        self.tokens: TokenCounts = NO_TOKENS  # from the upstream's usage
        self.cost: float | None = None  # USD, from tokens and the price table; None: unpriced
        self.reservation: Reservation | None = None  # against the client's budget and tpm
        self.batch: FileEstimate | None = None  # a batch file's estimate (batch_spend.py)
        # A client with limits: its x-ratelimit-*-tokens (none: not limited, the upstream's).
        self.limit_headers: list[tuple[bytes, bytes]] | None = None
        # Set once the request counts for the reconnect throttle (admitted), with what the
        # throttle learns from it.
        self.target: Target | None = None
        self.outcome = Outcome.NEUTRAL
        self.response_started = False  # a status went out: errors can only end the body now
        self.finished = False  # the work is over: a disconnect no longer cancels anything
        self.client_gone = False  # the client disconnected while the work ran
        self.tokens_partial = False  # counts known of a cut stream, completion estimated
        self.streaming = False  # a stream is being relayed: a disconnect gets the grace
        self.trace: RequestTrace | None = None  # its spans, when telemetry is on

    # ------------------------------------------------------------ who, what, where

    def authenticated(self, client_id: str) -> None:
        self.client = self.client_label = client_id

    def anonymous(self, address: str | None) -> None:
        """An open proxy: the client is known by its address (never a metrics label)."""
        self.client = address

    def requested(self, model: str | None, stream: bool) -> None:
        self.model = model or None
        self.stream = stream

    def routed(self, target: Target) -> None:
        """The backend about to be tried (the route's, or a fallback's)."""
        self.backend = target.backend
        self.upstream_model = target.upstream_model or None
        self.model_label = target.label
        translation = target.translation
        self.upstream_wire = translation.wire if translation is not None else None

    def throttled(self, reason: str) -> None:
        self.throttle_reason = reason

    def admitted(self, target: Target) -> None:
        """From here on, what happens counts for the reconnect throttle of ``target``."""
        self.target = target

    # ------------------------------------------------------------ upstream attempts

    def key_chosen(self, key_id: str) -> None:
        self.key = key_id

    def attempt_started(self) -> None:
        """An upstream call begins: the first one marks where the proxy's own time ends."""
        self.attempts += 1
        if self.sent_at is None:
            self.sent_at = time.perf_counter()

    @property
    def attempts_left(self) -> bool:
        return self.attempts < self.attempt_limit

    def attempt_failed(self, backend: str, key_id: str, kind: str) -> None:
        self.upstream_error = kind
        self.attempt_errors.append((backend, key_id, kind))
        if self.trace is not None:
            self.trace.attempt_failed(kind)

    def upstream_broke(self, backend: str, key_id: str, kind: str) -> None:
        """An answer under way broke (cut, stalled): the request failed, and the backend."""
        self.error = kind
        self.attempt_failed(backend, key_id, kind)
        self.outcome = Outcome.FAILURE

    def session_broke(self, backend: str, key_id: str) -> None:
        """A Realtime session the upstream ended abnormally."""
        self.attempt_errors.append((backend, key_id, "stream_broken"))
        self.outcome = Outcome.FAILURE
        if self.trace is not None:
            self.trace.attempt_failed("stream_broken")

    def upstream_identified(self, request_id: str) -> None:
        """The provider's request id, for its support desk."""
        self.upstream_request_id = request_id

    # ------------------------------------------------------------ the answer

    def responded(self, status: int) -> None:
        """The status the client gets from an upstream's answer, and what it teaches."""
        self.status = status
        self.outcome = outcome_of(status)

    def refused(self, status: int, code: str | None) -> None:
        """The request ends with the proxy's error ``status``/``code``. It is a failure for
        the reconnect throttle only when an upstream call of this request failed (no
        answer, a 5xx, a 429). A refusal the proxy made without one (circuit open, every
        key cooling down) already carries its Retry-After and costs the upstream nothing:
        counting it would lock a client out past that wait, for a state others caused.
        No usable key is the operator's to fix (and x-should-retry: false): no storm."""
        upstream_failed = bool(self.attempt_errors) and code != "no_usable_key"
        if upstream_failed and (status == 429 or status >= 500):
            self.outcome = Outcome.FAILURE

    def judged(self, outcome: Outcome) -> None:
        """What the reconnect throttle learns, when the status alone does not say it."""
        self.outcome = outcome

    def head_sent(self) -> None:
        self.response_started = True

    def first_data(self, at: float) -> None:
        self.ttft = at - self.started

    def counted(self, tokens: TokenCounts, partial: bool = False) -> None:
        self.tokens = tokens
        self.tokens_partial = partial

    def added_tokens(self, prompt: int, completion: int) -> None:
        """A Realtime session's tokens, added as each response ends."""
        tokens = self.tokens
        self.tokens = tokens._replace(
            prompt=tokens.prompt + prompt, completion=tokens.completion + completion
        )

    def overhead_measured(self, outbound: float) -> None:
        """Request in → upstream call, plus upstream data in → client data out."""
        if self.sent_at is not None:
            self.overhead = (self.sent_at - self.started) + outbound

    def failed(self, code: str, status: int = 0) -> None:
        """The request ended in an error (``status``, when one is still to be answered)."""
        self.error = code
        if status:
            self.status = status

    # ------------------------------------------------------------ the client

    def work_done(self) -> None:
        self.finished = True

    def disconnected(self) -> None:
        """The client left while the work ran: the work is cancelled."""
        self.client_gone = True

    def left_after_end(self) -> None:
        """The client left, and the proxy read the upstream's answer to its end anyway
        (its usage counted in full): the status stays the upstream's."""
        self.error = "client_left_after_end"
        self.outcome = Outcome.NEUTRAL

    def client_left(self) -> None:
        """The request ends because its client left: nothing to learn from it."""
        self.status = self.status or 499
        self.error = "client_disconnected"
        self.outcome = Outcome.NEUTRAL
