"""The one log line per request: who asked for what, and which backend and key served it.

Lines are formatted directly (text or JSON) and written to stderr in batches, every 50 ms:
going through ``logging`` (a LogRecord and one flushed write per line) cost about 0.14 ms
of CPU per request, a third of the proxy's whole budget.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

import orjson

from proxy.context import RequestContext
from proxy.logfmt import field_value
from proxy.usage import TokenCounts

FLUSH_INTERVAL = 0.05


def escaped(text: str | None) -> str:
    """A field for the text line, control characters escaped and quoted when it holds a
    space, a quote or ``=``: a client cannot forge a second log line with ``%0A`` in its
    path, nor add ``status=200`` to this one with a space (pre-auth)."""
    return field_value(text) if text else "-"


class AccessLog:
    def __init__(self, out: TextIO | None = None, fmt: str = "text", enabled: bool = True) -> None:
        self.out = out or sys.stderr
        self.enabled = enabled
        self._format = self._json if fmt == "json" else self._text
        self._pending: list[str] = []
        self._flush_scheduled = False
        self._second = -1
        self._stamp = ""

    def write(self, record: RequestContext) -> None:
        if not self.enabled:
            return
        self._pending.append(self._format(record))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
            except RuntimeError:  # no loop (tests, shutdown): write at once
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            lines, self._pending = self._pending, []
            try:
                self.out.write("".join(lines))
                self.out.flush()
            except (OSError, ValueError):  # stderr closed: never take a request down with it
                pass

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a request
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def _text(self, r: RequestContext) -> str:
        duration_ms = (time.perf_counter() - r.started) * 1000
        return (
            f"{self._timestamp()} access {r.method} {escaped(r.path)} status={r.status} "
            f"client={escaped(r.client)} duration_ms={duration_ms:.1f} "
            f"request_id={escaped(r.request_id)} "
            f"upstream_request_id={escaped(r.upstream_request_id)} model={escaped(r.model)} "
            f"upstream_model={escaped(r.upstream_model)} backend={r.backend or '-'} "
            f"key={r.key or '-'} attempts={r.attempts} deployment={escaped(r.deployment)} "
            f"stream={'true' if r.stream else 'false'} "
            f"ttft_ms={_ms(r.ttft)} {_text_tokens(r.tokens)}{_PARTIAL[r.tokens_partial]} "
            f"cost_usd={_usd(r.cost)} "
            f"throttled={r.throttle_reason or '-'} "
            f"error={escaped(r.error or r.upstream_error)}"
            f"{'' if r.upstream_wire is None else ' upstream_wire=' + r.upstream_wire}\n"
        )

    def _json(self, r: RequestContext) -> str:
        line = {
            "time": self._timestamp(),
            "request_id": r.request_id,
            "client": r.client,
            "upstream_request_id": r.upstream_request_id,
            "method": r.method,
            "path": r.path,
            "model": r.model,
            "upstream_model": r.upstream_model,
            "backend": r.backend,
            "key": r.key,
            "attempts": r.attempts,
            "deployment": r.deployment,
            "status": r.status,
            "duration_ms": round((time.perf_counter() - r.started) * 1000, 2),
            "stream": r.stream,
            "ttft_ms": round(r.ttft * 1000, 2) if r.ttft is not None else None,
            "prompt_tokens": r.tokens.prompt,
            "completion_tokens": r.tokens.completion,
            "cached_tokens": r.tokens.cached,
            "reasoning_tokens": r.tokens.reasoning,
            "cost_usd": round(r.cost, 8) if r.cost is not None else None,
            "throttled": r.throttle_reason,
            "error": r.error or r.upstream_error,
        }
        if r.tokens.cache_creation or r.tokens.cache_read:  # Anthropic's, only where they are
            line["cache_creation_tokens"] = r.tokens.cache_creation
            line["cache_read_tokens"] = r.tokens.cache_read
        if r.upstream_wire is not None:  # translated: the client's wire was not the upstream's
            line["upstream_wire"] = r.upstream_wire
        if r.tokens_partial:  # a cut stream: what was known, the completion maybe estimated
            line["tokens_partial"] = True
        return orjson.dumps(line).decode() + "\n"


# Only on the lines of a cut stream, whose counts are what was known (an estimate, maybe).
_PARTIAL = {False: "", True: " tokens=partial"}


def _text_tokens(t: TokenCounts) -> str:
    """The four OpenAI counts always (fixed columns for whoever greps them), Anthropic's
    two cache counts only on the lines that have them."""
    text = (
        f"prompt_tokens={t.prompt} completion_tokens={t.completion} "
        f"cached_tokens={t.cached} reasoning_tokens={t.reasoning}"
    )
    if t.cache_creation or t.cache_read:
        text += f" cache_creation_tokens={t.cache_creation} cache_read_tokens={t.cache_read}"
    return text


def _usd(cost: float | None) -> str:
    return f"{cost:.8f}".rstrip("0").rstrip(".") if cost is not None else "-"


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.1f}" if seconds is not None else "-"
