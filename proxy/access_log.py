"""The one log line per request: who asked for what, and which backend and key served it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("proxy.access")


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str
    request_id: str = ""
    model: str | None = None
    upstream_model: str | None = None
    backend: str | None = None
    key: str | None = None  # the key *id*; the secret never reaches a record
    status: int = 0
    stream: bool = False
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)


def log_request(record: RequestRecord) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    duration_ms = (time.perf_counter() - record.started) * 1000
    logger.info(
        "%s %s status=%d duration_ms=%.1f request_id=%s model=%s upstream_model=%s "
        "backend=%s key=%s stream=%s error=%s",
        record.method,
        record.path,
        record.status,
        duration_ms,
        record.request_id,
        record.model or "-",
        record.upstream_model or "-",
        record.backend or "-",
        record.key or "-",
        "true" if record.stream else "false",
        record.error or "-",
    )
