"""The process's log lines (start-up, warnings, reloads, uvicorn's own): text or JSON.

With ``--log-format json`` every line on stderr is one JSON object, like the access log's
lines. In both formats a control character in a message (a CR/LF in a path, a model id,
an upstream's error text) is escaped, so no one can forge a log line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

# C0 and C1 controls, DEL, and the Unicode line separators some viewers break lines on.
_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_ESCAPES |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def escape_controls(text: str) -> str:
    """``text`` on one line: every control character written as an escape."""
    return text.translate(_ESCAPES)


# What would end a field or start another in a `key=value` line; a value holding one is quoted.
_NEEDS_QUOTES = frozenset(' "=\\')


def field_value(text: str) -> str:
    """``text`` as one field of a ``key=value`` line (logfmt): control characters escaped,
    and quoted (``"`` and ``\\`` escaped inside) when it holds a space, a quote, ``=`` or a
    backslash, so that a path or a model id cannot add fields to the line."""
    if _NEEDS_QUOTES.isdisjoint(text):
        return escape_controls(text)
    return '"' + escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _timestamp(created: float) -> str:
    # The access log's format, so both kinds of line sort and parse alike.
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int((created % 1) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``; a traceback's lines are indented, so that every line
    starting at column 0 is a real record, whatever an exception's message holds."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message`` (and
    ``exception`` with the traceback). JSON escapes control characters itself."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


class QuietServer(logging.Filter):
    """Drops uvicorn's lines that only repeat what the access log says: a relayed body the
    upstream cut short (the connection is dropped on purpose, no traceback needed), and the
    open/accepted/closed lines of each Realtime session."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "uvicorn.error":
            return True
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ == "ResponseCut":
            return False
        message = record.getMessage()
        if message in ("connection open", "connection closed"):
            return False
        return not (record.levelno == logging.INFO and "WebSocket " in message)


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the whole process: the proxy's loggers,
    uvicorn's, and the root (asyncio, aiohttp, warnings) all through one handler."""
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    handler = {"class": "logging.StreamHandler", "formatter": "proxy", "filters": ["quiet"]}
    own = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"proxy": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "filters": {"quiet": {"()": f"{QuietServer.__module__}.{QuietServer.__qualname__}"}},
        "handlers": {"stderr": handler},
        "loggers": {"proxy": own, "uvicorn": own, "uvicorn.error": {"level": level.upper()}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
