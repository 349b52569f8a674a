"""One request's calls at one backend, HTTP and Realtime alike: which key, and what each
answer teaches the key pool.

``KeyTurns`` is the one owner of that decision. ``take()`` hands out the next usable key
(the pinned one, the session's in its rendezvous order, else round robin) and counts the
upstream call against the request's budget (``max_attempts``: every upstream call of a
request goes through here). ``refused()`` learns from an answer about the key itself: a
key the upstream refused is suspected (out of rotation once a probe with it alone agrees)
and a 429 cools the key down; either way one more key may be tried, once, while the budget
lasts and the body can be sent again. ``no_key()`` is what the client is told when no key
is left. ``sending()`` and ``answered()`` tell the request's trace about each call (its
span, the ``traceparent`` it carries). The callers send (an HTTP request, a WebSocket
handshake) and classify the answer (``classify``); they never pick keys or count attempts
themselves.

``probe()`` is the proxy's own call at a backend (the start-up check, a refused key's
confirmation, the invalid keys' re-probes, the circuit's probe): ``GET /models`` with one
key alone, classified as a request's answer is. What each caller does with the verdict is
its own; how the call is made and judged is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from yarl import URL

from proxy import errors
from proxy.breaker import Admission
from proxy.classify import Verdict, classify
from proxy.config import BackendConfig, KeyConfig
from proxy.context import RequestContext
from proxy.dialects import DEFAULT, Dialect
from proxy.errors import ProxyError
from proxy.keys import NoUsableKey
from proxy.routing import Target
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.runtime import Runtime

KEY_RETRIES = 1  # one more key after a refused or limited one: never a storm of them


class KeyTurns:
    """The keys one request tries at one backend, and what their answers taught."""

    __slots__ = ("_ctx", "_pool", "_runtime", "_target", "refused", "tried")

    def __init__(self, runtime: Runtime, target: Target, ctx: RequestContext) -> None:
        self._runtime, self._target, self._ctx = runtime, target, ctx
        self._pool = runtime.pools[target.backend]
        self.tried: list[str] = []
        self.refused: list[str] = []  # keys the upstream refused for this request

    def take(self) -> KeyConfig:
        """The next key, its upstream call counted; raises ``NoUsableKey``."""
        ctx = self._ctx
        key = self._pool.pick(self._target.pinned_key, self.tried, ctx.session, ctx.client)
        self.tried.append(key.id)
        ctx.key_chosen(key.id)
        ctx.attempt_started()
        return key

    def sending(self, headers: dict[str, str], url: URL) -> None:
        """The call with the key just taken is about to go: with telemetry on, its span
        begins and its ``traceparent`` goes into ``headers``."""
        ctx = self._ctx
        if ctx.trace is not None:
            backend = self._runtime.config.backends[self._target.backend]
            ctx.trace.attempt(headers, ctx.path, self._target, self.tried[-1], backend, url)

    def answered(self, status: int) -> None:
        """The upstream's status for that call (HTTP, or a Realtime handshake's)."""
        if self._ctx.trace is not None:
            self._ctx.trace.answered(status)

    def refused_key(
        self,
        key_id: str,
        verdict: Verdict,
        reason: str,
        dialect: Dialect,
        retry_after: float | None = None,
    ) -> None:
        """The upstream refused the key (``KEY_REFUSED``) or limited it (``KEY_LIMITED``)."""
        backend = self._target.backend
        if verdict is Verdict.KEY_LIMITED:
            self._ctx.attempt_failed(backend, key_id, "status_429")
            self._pool.cool_down(key_id, retry_after, reason, self._ctx.client)
        else:
            self._ctx.attempt_failed(backend, key_id, "status_4xx")
            self._runtime.suspect_key(backend, key_id, reason, dialect)  # out once confirmed
            self.refused.append(key_id)

    def another(self, replayable: bool = True) -> bool:
        """Whether one more key may be tried after a refused or limited one."""
        return len(self.tried) <= KEY_RETRIES and replayable and self._ctx.attempts_left

    def no_key(self, exc: NoUsableKey) -> ProxyError:
        """No (further) key could be picked: the proxy's keys refused → 503 naming them;
        else why (all cooling down, with the wait; none usable, with a hint)."""
        refused = self.refused_error()
        if refused is not None:
            return refused
        if exc.retry_after is not None:
            return errors.keys_cooling_down(exc.backend, exc.hint, exc.retry_after)
        return errors.no_usable_key(exc.backend, exc.hint)

    def refused_error(self) -> ProxyError | None:
        """503 naming the keys the upstream refused for this request, if it refused any:
        never the upstream's 401, which would blame the client's own key."""
        if not self.refused:
            return None
        return errors.keys_refused(self._target.backend, self.refused)


def report(
    admission: Admission, verdict: Verdict | None, client: str | None, answered_5xx: bool
) -> None:
    """What an attempt's circuits hear: exactly one outcome, so a half-open probe slot is
    never kept. A 5xx answer is the model's (``answered_5xx``); no answer, a broken status
    or a cut body the backend's; a 4xx or 429 says the backend is up; no verdict (the
    client left, a key cooling down, a redirect) frees what was taken. An OK is the
    caller's to report, once the answer is in (a body cut after a 200 head is a failure)."""
    if verdict is Verdict.BACKEND_FAILED and answered_5xx:
        admission.answered_5xx(client)
    elif verdict is Verdict.BACKEND_FAILED or verdict is Verdict.BAD_STATUS:
        admission.backend_failed(client)
    elif verdict is None or verdict is Verdict.REDIRECT:
        admission.released()
    elif verdict is not Verdict.OK:
        admission.answered()


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    status: int | str  # the upstream's status, or why none came
    verdict: Verdict | None  # ``classify``'s; None: no answer

    @property
    def backend_up(self) -> bool:
        """The backend answered as a server does (a refused key is about the key)."""
        return self.verdict not in (None, Verdict.BACKEND_FAILED, Verdict.BAD_STATUS)


async def probe(
    upstream: Upstream, backend: BackendConfig, key: KeyConfig, dialect: Dialect = DEFAULT
) -> ProbeAnswer:
    """``GET /models`` with ``key`` alone (in ``dialect``'s auth header), and its verdict."""
    status, body = await upstream.check_key(dialect.upstream_auth(backend, key.value))
    return ProbeAnswer(status, classify(status, body) if isinstance(status, int) else None)
