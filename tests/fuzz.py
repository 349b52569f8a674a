"""Fuzz a running proxy from outside and check the invariants of issue 10.

Run: ``python -m tests.fuzz --seconds 120 --seed 1`` (``make fuzz``); the test suite runs a
short version (``tests/e2e/test_fuzz_short.py``). Exit 0 when no invariant broke, 1 otherwise.

What it throws, from one seeded generator (bounded in time and count, 127.0.0.1 only):
- client side, through raw sockets (so nothing is cleaned up by a client library): random
  JSON and non-JSON bodies, model ids (huge, unicode, control characters, not strings),
  paths (dot segments, ``%2e%2e``, ``%2f``, ``//``, very long), methods, headers
  (Content-Encoding, OpenAI-Organization, Authorization variants, huge and many headers),
  slow heads and bodies, clients that leave mid-request and mid-stream;
- upstream side, through ``tests/hostile_upstream.py`` steered per request: random statuses
  (3xx with Location included), hostile Retry-After values, bodies and headers that echo the
  key, truncated JSON, garbage, streams cut mid-event, silent and never-ending streams,
  content-length lies, oversized bodies and headers, malformed status lines; the key and
  breaker probes (``GET /models``) get hostile answers too during the run;
- config files: broken and hostile YAML (deep nesting, anchor bombs, non-UTF-8 bytes, nan
  and huge numbers, secrets in bad values) written to the running proxy's file for hot
  reload, and given to ``python -m proxy check --config F``.

Invariants checked (each break is reported once per kind, with a reproduction):
- the proxy never dies; every answer comes within the configured timeouts; its status is
  documented (or the upstream's own, passed through); errors the proxy makes are OpenAI
  JSON; never a 500 ``internal_error`` or a traceback; a chat stream that fails ends with
  an error event, not silently;
- no configured secret (upstream keys, client keys, admin key; raw or URL-encoded) in any
  response, the log, ``/metrics`` or ``/admin/status``;
- ``/health`` answers 200 throughout; after the hostile phase ``/ready`` is 200 again and
  every breaker closed and every key ok within a few seconds; no upstream work outlives its
  client; no redirect is ever followed;
- resident memory after the run within ``--rss-mb`` of its value after warm-up;
- ``/metrics`` label values never come from what a client sent; the series count is bounded;
- text log: one line per event (every line starts with a timestamp: nothing forged, no
  multi-line tracebacks); ``--log-format json``: every line is a JSON object;
- ``proxy check`` on any file exits 0, 1 or 2 in bounded time without a traceback;
- after a bad file, the good one written back is in force (``/admin/status`` sha256).

Reproductions, each against a fresh proxy with the fuzz config and the hostile upstream:
``--replay FILE`` (a case the run saved), ``--plan '{"status": 989}'`` (one chat request whose
upstream answer is that plan, see ``tests/hostile_upstream.py``), ``--raw 'FOO / HTTP/1.1\r\n
Host: x\r\n\r\n'`` (raw request bytes). Each prints the answer, the log and the breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import orjson

from tests.soak import rss_mb

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ROOT / "tests" / "hostile_upstream.py"

# Secrets: the '+', '/' and '=' make the URL-encoded form differ from the raw one.
SECRETS_ENV = {
    "FUZZ_UPSTREAM_KEY_A": "sk-fuzzUPSTREAM-a1b2c3d4e5f6g7h8",
    "FUZZ_UPSTREAM_KEY_B": "sk-fuzz+UP/stream=b9c8d7e6f5e4",
    "FUZZ_CLIENT_KEY": "sk-fuzzCLIENT-4d3c2b1a0f9e8d7c",
    "FUZZ_CLIENT_KEY_2": "sk-fuzzLIMITED-77aa88bb99cc00dd",
    "FUZZ_WITNESS_KEY": "sk-fuzzWITNESS-1f2e3d4c5b6a7988",
    "FUZZ_ADMIN_KEY": "fuzz-ADMIN-5e6f7a8b9c0d1e2f3a4b",
}
SECRETS = tuple(SECRETS_ENV.values())
SECRET_FORMS = tuple(
    sorted({s for v in SECRETS for s in (v, urllib.parse.quote(v, safe=""))}, key=len)
)
CLIENT_KEY = SECRETS_ENV["FUZZ_CLIENT_KEY"]
ADMIN_KEY = SECRETS_ENV["FUZZ_ADMIN_KEY"]
FORGED = "FORGED-LINE"  # in every injected newline's continuation: a log line starting so is forged

# Statuses the proxy itself answers with (README "Errors", the front door's 405/408/431).
PROXY_STATUSES = frozenset({200, 400, 401, 403, 404, 405, 408, 413, 415, 429, 431, 502, 503, 504})
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}

HEADER_TIMEOUT = 2.0  # server.header_timeout in the fuzz config
BODY_TIMEOUT = 3.0  # server.body_timeout
CASE_TIMEOUT = 15.0  # a response (any) must complete within this: twice the longest plan
SLACK = 5.0  # on a shared 2-core machine a timer can fire seconds late: not a break
MAX_READ = 4 * 1024 * 1024


# The second client identity: a well-behaved client whose plain requests, sent all through
# the run, must be answered 200 whatever the fuzzing clients (the other identities) do to
# their own requests. It shares the hostile backend with them: its keys, its breaker, its
# connection pool and its key health are the ones the fuzzers attack.
WITNESS_BACKEND = "hostile"
WITNESS_MODEL = "w-witness"
WITNESS_EVERY = 0.1


def fuzz_config(upstream_url: str, generation: int) -> str:
    """The good config: one backend (two keys) on the hostile upstream, short timeouts, an
    admin key. One backend only, so /ready says whether *it* recovered."""
    return f"""# fuzz config, generation {generation}
server:
  routing_headers: true
  max_body_size: 1MiB
  max_response_size: 1MiB
  admin_key: "${{FUZZ_ADMIN_KEY}}"
  config_poll_interval: 0.5
  header_timeout: {HEADER_TIMEOUT}
  body_timeout: {BODY_TIMEOUT}
throttle:
  reconnect: {{base: 0.2, max: 1}}
clients:
  - {{id: fuzz-client, key: "${{FUZZ_CLIENT_KEY}}"}}
  - {{id: fuzz-limited, key: "${{FUZZ_CLIENT_KEY_2}}", rate_limit: 20/second, models: ["h-*"]}}
  - {{id: fuzz-witness, key: "${{FUZZ_WITNESS_KEY}}", models: ["{WITNESS_MODEL}"]}}
backends:
  hostile:
    base_url: {upstream_url}/v1
    keys:
      - {{id: hostile-a, key: "${{FUZZ_UPSTREAM_KEY_A}}"}}
      - {{id: hostile-b, key: "${{FUZZ_UPSTREAM_KEY_B}}"}}
    models: [h-listed]
    timeout: {{connect: 1, first_byte: 3, idle: 2}}
    breaker: {{failures: 5, min_open: 0.5, max_open: 2}}
    key_probe_interval: 1
    max_cooldown: 3
aliases:
  fz-alias: h-aliased
routes:
  - {{prefix: "{WITNESS_MODEL}", backend: {WITNESS_BACKEND}}}
  - {{prefix: "h-", backend: hostile}}
  - {{prefix: "calm-", backend: hostile}}
"""


# ====================================================================== generators

HOSTILE_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings")
ODD_PATHS = (
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/organization/invites",
    "/v1/models",
    "/v1/models/h-listed",
    "/v1/models/",
    "/v1/../admin/status",
    "/v1/%2e%2e/admin/status",
    "/v1/chat%2fcompletions",
    "/v1/..%2fadmin/status",
    "/v1//chat/completions",
    "//v1/chat/completions",
    "/v1/chat/completions/",
    "/v1/./chat/completions",
    "/v1/chat/completions/..",
    "/v1/chat/completions%0A" + FORGED + "%20x",
    "/v1/chat/completions%0d%0a" + FORGED,
    "/v1/%ff%fe",
    "/v1/chat/completions?x=%00%0a" + FORGED,
    "/v1/chat\\completions",
    "/health",
    "/health/",
    "/ready",
    "/metrics",
    "/admin/status",
    "/admin/status/",
    "/",
    "*",
    "http://evil.example/v1/chat/completions",
)
METHODS = ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "PROPFIND", "post")
STATUSES = (
    *(100, 101, 103, 199, 200, 201, 202, 204, 206, 226, 299),
    *(300, 301, 302, 303, 304, 305, 307, 308, 399),
    *(400, 401, 402, 403, 404, 405, 408, 409, 410, 413, 415, 418, 422, 429, 431, 451, 499),
    *(500, 501, 502, 503, 504, 507, 511, 599),
)
RETRY_AFTER_VALUES = (
    "nan", "NaN", "inf", "-inf", "Infinity", "1e308", "1e999", "99999999", "99999999999999999999",
    "-5", "-0", "0", "0.0001", "abc", "", " ", "1,2", "0x10", "3600", "2", "1" * 400,
    "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
)  # fmt: skip
ERROR_CODES = (
    "invalid_api_key", "account_deactivated", "model_not_found", "insufficient_quota",
    "rate_limit_exceeded", "invalid_authentication", None, 5, "",
)  # fmt: skip


def sse(obj: Any) -> str:
    return "data: " + orjson.dumps(obj).decode("latin-1") + "\n\n"


def chunk_event(text: str) -> str:
    return sse(
        {
            "id": "chatcmpl-h",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "h",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
    )


CHAT_JSON = orjson.dumps(
    {
        "id": "chatcmpl-h",
        "object": "chat.completion",
        "created": 1,
        "model": "h",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).decode()


class Gen:
    """Every random choice of a run, from one seeded generator."""

    def __init__(self, seed: int, sent_strings: set[str] | None = None) -> None:
        self.rng = random.Random(seed)
        # Model ids sent (shared by all generators of a run): never a metrics label value.
        self.sent_strings: set[str] = set() if sent_strings is None else sent_strings

    def pick(self, weighted: dict[str, float]) -> str:
        return self.rng.choices(list(weighted), weights=list(weighted.values()))[0]

    def text(self, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789-_./") -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def unicode(self, n: int) -> str:
        ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x590, 0x6FF), (0x2000, 0x206F), (0x1F300, 0x1F64F)]
        out = []
        for _ in range(n):
            lo, hi = self.rng.choice(ranges)
            out.append(chr(self.rng.randint(lo, hi)))
        return "".join(out)

    # ---------------------------------------------------------------- model ids

    def model(self) -> Any:
        kind = self.pick(
            {
                "hostile": 40,
                "calm": 8,
                "alias": 3,
                "listed": 2,
                "ascii": 6,
                "unicode": 5,
                "control": 6,
                "long": 4,
                "not_string": 4,
            }
        )
        rng = self.rng
        model: Any
        if kind == "hostile":
            model = "h-" + self.text(rng.randint(1, 12))
        elif kind == "calm":
            model = "calm-" + self.text(rng.randint(1, 8))
        elif kind == "alias":
            model = "fz-alias"
        elif kind == "listed":
            model = "h-listed"
        elif kind == "ascii":
            model = "Z9" + self.text(rng.randint(0, 40), "".join(map(chr, range(0x20, 0x7F))))
        elif kind == "unicode":
            model = rng.choice(["h-", "", "Z"]) + self.unicode(rng.randint(1, 30))
        elif kind == "control":
            bad = rng.choice(["\r\n", "\n", "\r", "\x00", "\x7f", "\x1b[31m", "\t", "\u2028"])
            model = rng.choice(["h-a", "calm-b", "Zx"]) + bad + FORGED + " status=200"
        elif kind == "long":
            model = rng.choice(["h-", "Z"]) + "m" * rng.choice([255, 257, 300, 10_000, 100_000])
        else:
            model = rng.choice([5, 1.5, None, [], {}, True, "", " ", ["h-a"], {"id": "h-a"}])
        if isinstance(model, str) and len(model) < 300:
            self.sent_strings.add(model)
        return model

    # ---------------------------------------------------------------- bodies

    def json_body(self, model: Any, path: str, plan: dict[str, Any] | None) -> bytes:
        rng = self.rng
        body: dict[str, Any] = {}
        if rng.random() > 0.03:
            body["model"] = model
        if path.endswith("/responses"):
            body["input"] = "hello"
        elif path.endswith("/embeddings"):
            body["input"] = ["hello"]
        elif path.endswith("/completions") and "chat" not in path:
            body["prompt"] = "hello"
        else:
            body["messages"] = [{"role": "user", "content": self.unicode(rng.randint(0, 20))}]
        if rng.random() < 0.4:
            body["stream"] = rng.choice([True, True, True, False, "true", 1, None])
        if rng.random() < 0.2:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.15:
            extra = {"temperature": 1e308, "n": 2**62, "user": "u" * 1000, "tools": [{}] * 50}
            name = rng.choice(list(extra))
            body[name] = extra[name]
        if plan is not None:
            body["hostile"] = plan
        return orjson.dumps(body)

    def raw_body(self, model: Any) -> bytes:
        rng = self.rng
        m = orjson.dumps(model if isinstance(model, str) else "h-x").decode()
        kind = rng.choice(
            [
                "random_bytes",
                "truncated",
                "array",
                "scalar",
                "deep",
                "huge",
                "dup_keys",
                "surrogate",
                "bad_utf8",
                "bom",
                "empty",
                "big_number",
            ]
        )
        if kind == "random_bytes":
            return rng.randbytes(rng.randint(1, 2000))
        if kind == "truncated":
            full = b'{"model": ' + m.encode() + b', "messages": [{"role": "user"}]}'
            return full[: rng.randint(1, len(full) - 1)]
        if kind == "array":
            return b"[" + m.encode() + b"]"
        if kind == "scalar":
            return rng.choice([b"null", b"1", b'"x"', b"true", b"1e999"])
        if kind == "deep":
            depth = rng.choice([100, 1000, 100_000])
            return b'{"model": "h-a", "x": ' + b"[" * depth + b"]" * depth + b"}"
        if kind == "huge":
            return b'{"model": "h-a", "pad": "' + b"x" * (1024 * 1024 + 10) + b'"}'
        if kind == "dup_keys":
            return b'{"model": "h-a", "model": ' + m.encode() + b"}"
        if kind == "surrogate":
            return b'{"model": "h-\\ud800"}'
        if kind == "bad_utf8":
            return b'{"model": "h-\xff\xfe"}'
        if kind == "bom":
            return b"\xef\xbb\xbf" + b'{"model": "calm-bom"}'
        if kind == "big_number":
            return b'{"model": "h-a", "max_tokens": ' + b"9" * 5000 + b"}"
        return b""

    # ---------------------------------------------------------------- upstream plans

    def plan(self, stream: bool) -> dict[str, Any]:
        kind = self.pick(
            {
                "ok": 6,
                "status": 14,
                "redirect": 6,
                "retry_after": 10,
                "echo": 10,
                "truncated_json": 5,
                "garbage": 6,
                "stream_cut": 8,
                "stream_hang": 4,
                "trickle": 2,
                "no_head": 3,
                "reset": 3,
                "length_lie": 5,
                "huge": 3,
                "weird_headers": 8,
                "status_line": 4,
            }
        )
        plan: dict[str, Any] = getattr(self, f"plan_{kind}")(stream)
        plan["kind"] = kind
        return plan

    def error_json(self, status: int) -> str:
        rng = self.rng
        error = {
            "message": rng.choice(["boom", "Please try again after 1e308 seconds", "x" * 3000]),
            "type": rng.choice(["server_error", "invalid_request_error", None]),
            "code": rng.choice(ERROR_CODES),
        }
        return orjson.dumps({"error": error, "status": status}).decode()

    def plan_ok(self, stream: bool) -> dict[str, Any]:
        if stream:
            parts = [[chunk_event("a"), 0], [chunk_event("b"), 0], ["data: [DONE]\n\n", 0]]
            return {
                "status": 200,
                "headers": [["content-type", "text/event-stream"]],
                "framing": "chunked",
                "parts": parts,
            }
        return {
            "status": 200,
            "headers": [["content-type", "application/json"]],
            "parts": [[CHAT_JSON, 0]],
        }

    def plan_status(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        status = rng.choice(STATUSES) if rng.random() < 0.8 else rng.randint(100, 999)
        body = rng.choice(
            [self.error_json(status), "<html><body>Bad Gateway</body></html>", "", "null", "[]"]
        )
        ctype = rng.choice(["application/json", "text/html", "text/plain", "text/event-stream"])
        return {
            "status": status,
            "headers": [["content-type", ctype]],
            "parts": [[body, 0]],
            "framing": rng.choice(["length", "length", "chunked", "close"]),
        }

    def plan_redirect(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        status = rng.choice([301, 302, 303, 307, 308, 300, 304])
        location = rng.choice(
            [
                "{SELF}/redirected/v1/chat/completions",
                "/redirected/v1/chat/completions",
                "http://127.0.0.1:1/v1/chat/completions",
                "https://evil.example/steal",
                "",
                "javascript:alert(1)",
                "//evil.example/x",
            ]
        )
        return {
            "status": status,
            "headers": [["location", location], ["content-type", "application/json"]],
            "parts": [[rng.choice(['{"ok": true}', ""]), 0]],
        }

    def plan_retry_after(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        status = rng.choice([429, 429, 429, 503, 500, 200])
        headers = [["content-type", "application/json"]]
        if rng.random() < 0.8:
            headers.append(["retry-after", rng.choice(RETRY_AFTER_VALUES)])
        if rng.random() < 0.5:
            headers.append(["retry-after-ms", rng.choice(RETRY_AFTER_VALUES)])
        if rng.random() < 0.3:
            headers.append(["x-ratelimit-reset-requests", rng.choice(RETRY_AFTER_VALUES) + "s"])
        wait = rng.choice(["1e308", "nan", "inf", "99999999999", "-3", "2"])
        message = f"Rate limit reached. Please try again after {wait} seconds."
        error = {"message": message, "type": "rate_limit_reached_error", "code": None}
        return {
            "status": status,
            "headers": headers,
            "parts": [[orjson.dumps({"error": error}).decode(), 0]],
        }

    def plan_echo(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        status = rng.choice([200, 400, 401, 403, 404, 429, 500])
        token = rng.choice(["{AUTH}", "{KEY}", "{KEY_URL}"])
        headers = [
            [
                "content-type",
                "text/event-stream" if stream and status == 200 else "application/json",
            ],
            [
                rng.choice(
                    ["x-request-id", "x-echo", "openai-organization", "x-ratelimit-limit-requests"]
                ),
                token,
            ],
        ]
        message = f"Incorrect API key provided: {token}. You can find your key at ..."
        if stream and status == 200:
            parts = [[chunk_event(token), 0], [sse({"error": {"message": message}}), 0]]
            return {"status": 200, "headers": headers, "framing": "chunked", "parts": parts}
        code = rng.choice(["invalid_api_key", "model_not_found", None])
        body = orjson.dumps({"error": {"message": message, "type": "x", "code": code}}).decode()
        return {"status": status, "headers": headers, "parts": [[body, 0]]}

    def plan_truncated_json(self, stream: bool) -> dict[str, Any]:
        cut = CHAT_JSON[: self.rng.randint(1, len(CHAT_JSON) - 1)]
        return {
            "status": 200,
            "headers": [["content-type", "application/json"]],
            "parts": [[cut, 0]],
        }

    def plan_garbage(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        data = "".join(chr(b) for b in rng.randbytes(rng.randint(0, 3000)))
        ctype = rng.choice(
            ["application/json", "text/event-stream", "application/octet-stream", ""]
        )
        headers = [["content-type", ctype]] if ctype else []
        framing = rng.choice(["length", "chunked", "close"])
        return {
            "status": rng.choice([200, 200, 500]),
            "headers": headers,
            "parts": [[data, 0]],
            "framing": framing,
        }

    def plan_stream_cut(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        events = [chunk_event(f"t{i}") for i in range(rng.randint(0, 4))]
        tail = rng.choice(
            [
                chunk_event("cut")[: rng.randint(1, 30)],  # cut mid-event
                "data: {not json}\n\n",
                "event: error\n",
                "",
                "data: [DONE]",  # no blank line after it
                "garbage\x00\x01\xff\n\n",
            ]
        )
        parts = [[e, rng.choice([0, 0, 0.05])] for e in events] + [[tail, 0]]
        return {
            "status": 200,
            "headers": [["content-type", "text/event-stream"]],
            "framing": rng.choice(["chunked", "chunked", "close"]),
            "parts": parts,
            "after": rng.choice(["abort", "end", "abort"]),
        }

    def plan_stream_hang(self, stream: bool) -> dict[str, Any]:
        events = [[chunk_event("t"), 0] for _ in range(self.rng.randint(0, 3))]
        return {
            "status": 200,
            "headers": [["content-type", "text/event-stream"]],
            "framing": "chunked",
            "parts": events,
            "after": "hang",
        }

    def plan_trickle(self, stream: bool) -> dict[str, Any]:
        return {
            "status": 200,
            "headers": [["content-type", "text/event-stream"]],
            "framing": "chunked",
            "parts": [[chunk_event("t"), 0]],
            "after": "trickle",
        }

    def plan_no_head(self, stream: bool) -> dict[str, Any]:
        return {"before_head": "hang"}

    def plan_reset(self, stream: bool) -> dict[str, Any]:
        return {"before_head": "abort", "head_delay": self.rng.choice([0, 0.1, 0.5])}

    def plan_length_lie(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        declared = rng.choice(
            ["1000000000000", str(2**63), str(2**64 + 1), "-1", "abc", "10, 20", "", "5000", "1"]
        )
        return {
            "status": rng.choice([200, 500]),
            "headers": [["content-type", "application/json"]],
            "framing": "lie",
            "declared": declared,
            "parts": [[CHAT_JSON, 0]],
            "after": rng.choice(["end", "hang", "abort"]),
        }

    def plan_huge(self, stream: bool) -> dict[str, Any]:
        size = self.rng.choice([500_000, 1024 * 1024 + 1, 3 * 1024 * 1024])
        return {
            "status": 200,
            "headers": [
                ["content-type", self.rng.choice(["application/json", "text/event-stream"])]
            ],
            "framing": self.rng.choice(["length", "chunked"]),
            "parts": [['{"pad": "', 0]],
            "pad": size,
        }

    def plan_weird_headers(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        candidates = [
            ["x-long", "v" * rng.choice([4000, 8000, 9000, 70_000])],
            [
                "x-request-id",
                rng.choice(["\xe9\xff\xfe", "a" * 5000, "id with spaces", "\x01\x7f"]),
            ],
            ["x-ratelimit-remaining-requests", "\xff" * 10],
            ["content-type", "application/json; charset=\xff"],
            ["content-encoding", rng.choice(["gzip", "br", "deflate", "x-unknown"])],
            ["transfer-encoding", "gzip"],
            ["set-cookie", "session=abc; Path=/"],
            ["x-a!#$%&'*+.^_`|~", "token chars"],
            ["", "empty name"],
            ["x-empty", ""],
            ["x-spaces", "   padded   "],
            ["connection", "upgrade"],
            ["openai-processing-ms", "-1e308"],
        ]
        headers = [["content-type", "application/json"]]
        headers += rng.sample(candidates, rng.randint(1, 4))
        if rng.random() < 0.2:
            headers += [[f"x-many-{i}", "v"] for i in range(rng.choice([100, 500]))]
        return {
            "status": rng.choice([200, 400, 500]),
            "headers": headers,
            "parts": [[CHAT_JSON, 0]],
        }

    def plan_status_line(self, stream: bool) -> dict[str, Any]:
        line = self.rng.choice(
            [
                "HTTP/1.1 200",
                "HTTP/1.0 200 OK",
                "HTTP/2 200",
                "HTTP/1.1 2000 OK",
                "HTTP/1.1 -1 X",
                "ICY 200 OK",
                "garbage",
                "HTTP/1.1 200 \xff\xfe",
                "",
            ]
        )
        return {
            "status_line": line,
            "headers": [["content-type", "application/json"]],
            "parts": [[CHAT_JSON, 0]],
        }

    def models_plan(self) -> dict[str, Any] | None:
        """What the key and breaker probes (GET .../models) get for a while."""
        kind = self.rng.choice(["status", "garbage", "no_head", "reset", "echo", "redirect", None])
        if kind is None:
            return None
        plan: dict[str, Any] = getattr(self, f"plan_{kind}")(False)
        return plan

    # ---------------------------------------------------------------- requests

    def case(self) -> Case:
        rng = self.rng
        method = "POST" if rng.random() < 0.85 else rng.choice(METHODS)
        path = rng.choice(HOSTILE_PATHS) if rng.random() < 0.82 else rng.choice(ODD_PATHS)
        if rng.random() < 0.03:
            path = "/v1/" + "a" * rng.choice([2000, 8000, 70_000])
        model = self.model()
        plan = None
        routed = isinstance(model, str) and (model.startswith("h-") or model == "fz-alias")
        body_is_json = rng.random() < 0.88
        if routed and body_is_json and path in HOSTILE_PATHS and rng.random() < 0.85:
            plan = self.plan(stream=rng.random() < 0.5)
        body = self.json_body(model, path, plan) if body_is_json else self.raw_body(model)
        streamed_plan = plan is not None and "event-stream" in str(plan.get("headers"))
        if streamed_plan and body_is_json:
            # Ask for a stream when the answer is one, so the stream invariants are exercised.
            loaded = orjson.loads(body)
            loaded["stream"] = True
            body = orjson.dumps(loaded)
        headers = self.headers(body)
        send = self.pick(
            {"all": 88, "slow_head": 2, "stall_body": 2, "partial_close": 3, "split": 5}
        )
        read = self.pick({"all": 90, "head_then_close": 4, "first_chunk_then_close": 6})
        if plan is not None and plan.get("after") == "trickle":
            read = "first_chunk_then_close"  # a never-ending stream: the client leaves
        chunked = any(k.lower() == "transfer-encoding" for k, _ in headers)
        return Case(
            method=method,
            target=path,
            headers=headers,
            body=body.decode("latin-1"),
            chunked=chunked,
            send=send,
            read=read,
            plan_status=_plan_status(plan),
            plan_kind=plan.get("kind") if plan else None,
            plan_broken=_plan_broken(plan),
        )

    def headers(self, body: bytes) -> list[list[str]]:
        rng = self.rng
        headers = [["Host", "127.0.0.1"]]
        if rng.random() < 0.9:
            headers.append(
                [
                    "Content-Type",
                    rng.choice(
                        ["application/json"] * 6
                        + ["text/plain", "", "application/json; charset=latin-1"]
                    ),
                ]
            )
        auth = self.pick(
            {
                "good": 80,
                "limited": 5,
                "none": 3,
                "lower": 1,
                "spaces": 1,
                "basic": 1,
                "admin": 1,
                "upstream": 2,
                "long": 1,
                "double": 2,
                "junk": 1,
            }
        )
        values = {
            "good": [f"Bearer {CLIENT_KEY}"],
            "limited": [f"Bearer {SECRETS_ENV['FUZZ_CLIENT_KEY_2']}"],
            "none": [],
            "lower": [f"bearer {CLIENT_KEY}"],
            "spaces": [f"Bearer   {CLIENT_KEY}   "],
            "basic": ["Basic " + base64.b64encode(f"{CLIENT_KEY}:".encode()).decode()],
            "admin": [f"Bearer {ADMIN_KEY}"],
            "upstream": [f"Bearer {SECRETS_ENV['FUZZ_UPSTREAM_KEY_A']}"],
            "long": ["Bearer " + "k" * 20_000],
            "double": [f"Bearer {CLIENT_KEY}", "Bearer sk-other"],
            "junk": ["\x01\x02 \xff"],
        }[auth]
        headers += [["Authorization", v] for v in values]
        extras = {
            "content-encoding": [
                "Content-Encoding",
                rng.choice(["gzip", "br", "identity", "gzip, br", "x" * 100, ""]),
            ],
            "org": ["OpenAI-Organization", "org-" + self.text(12)],
            "project": ["OpenAI-Project", "proj_" + self.text(12)],
            "request-id": [
                "X-Request-Id",
                rng.choice(["ok-id-1", "x" * 300, "a b", "\x01" + FORGED, "é"]),
            ],
            "xff": [
                "X-Forwarded-For",
                rng.choice(["1.2.3.4", "::1, 10.0.0.1", "garbage", "1.2.3.4, " * 200]),
            ],
            "accept-encoding": ["Accept-Encoding", "gzip, deflate, br"],
            "expect": ["Expect", "100-continue"],
            "big": ["X-Big", "b" * rng.choice([1000, 30_000, 60_000, 70_000])],
            "connection": ["Connection", rng.choice(["close", "keep-alive", "upgrade", "te"])],
            "upgrade": ["Upgrade", "websocket"],
            "ctl": ["X-Ctl", "a\x01b\x7fc\x00d"],
            "high": ["X-High", "\xe9\xff\xfe"],
            "cookie": ["Cookie", "a=b"],
            "te": ["Transfer-Encoding", "chunked"],
            "te-bad": ["Transfer-Encoding", rng.choice(["gzip", "chunked, chunked", "x"])],
            "stainless": ["X-Stainless-Retry-Count", "1"],
        }
        for name in rng.sample(list(extras), rng.choice([0, 0, 0, 1, 1, 2, 3])):
            headers.append(extras[name])
        if rng.random() < 0.02:
            headers += [[f"X-Many-{i}", "v"] for i in range(rng.choice([100, 1000]))]
        if not any(k.lower() == "transfer-encoding" for k, _ in headers):
            declared = str(len(body))
            if rng.random() < 0.03:
                declared = rng.choice([str(len(body) + 100), "0", "-1", "abc", str(2**64), "1, 2"])
            if rng.random() > 0.02:
                headers.append(["Content-Length", declared])
        return headers

    # ---------------------------------------------------------------- config files

    def config_file(self, good: str) -> tuple[str, bytes]:
        """A hostile config file, and what kind of damage it has."""
        kind, data = self._config_file(good)
        return kind, data

    def _config_file(self, good: str) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.choice(
            [
                "value",
                "value",
                "value",
                "deep",
                "bomb",
                "non_utf8",
                "truncate",
                "flip",
                "dup",
                "tag",
                "secret",
                "env",
                "empty",
                "tabs",
                "storage",
                "big",
            ]
        )
        lines = good.splitlines()
        if kind == "value":
            values = [
                ".nan", ".inf", "-.inf", "-1", "0", "1e308", "1e999", "99999999999999999999999",
                "nan", "'1e308s'", "'-5s'", "''", "null", "[]", "{}", "true", "'a\\r\\nb'",
                "'\\0'", "'${FUZZ_UPSTREAM_KEY_A}'", "'${A:-${B}}'", "'${'",
                "'${FUZZ_CLIENT_KEY}x'",
                "!!binary aGVsbG8=", "'" + "x" * 100_000 + "'", "&a [*a]", "'999999d'",
            ]  # fmt: skip
            targets = [i for i, line in enumerate(lines) if re.search(r":\s*\S", line)]
            i = rng.choice(targets)
            line = lines[i]
            if "id:" in line or "prefix:" in line:
                # A secret written into a name is the operator publishing it, not a leak.
                values = [v for v in values if "${FUZZ" not in v]
            if "{" in line and rng.random() < 0.5:  # inside a flow mapping
                lines[i] = re.sub(r"(:\s*)([^,}\]]+)", r"\g<1>" + rng.choice(values), line, count=1)
            else:
                lines[i] = re.sub(r":\s.*$", ": " + rng.choice(values), line)
            return kind, "\n".join(lines).encode()
        if kind == "deep":
            depth = rng.choice([1000, 20_000, 100_000])
            opener = rng.choice(["[", "{a: ", "- "])
            if opener == "- ":
                return kind, "\n".join(" " * i + "-" for i in range(min(depth, 5000))).encode()
            closer = "]" if opener == "[" else "}"
            return kind, (good + "\nextra: " + opener * depth + closer * depth + "\n").encode()
        if kind == "bomb":
            levels = rng.choice([5, 7, 9])
            bomb = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
            for j in range(1, levels):
                bomb.append(f"a{j}: &a{j} [" + ",".join([f"*a{j - 1}"] * 9) + "]")
            where = rng.choice(["top", "aliases", "models"])
            text = "\n".join(bomb)
            if where == "top":
                return kind, (text + "\n" + good).encode()
            good_text = good.replace("  fz-alias: h-aliased", f"  fz-alias: *a{levels - 1}")
            if where == "models":
                good_text = good.replace("models: [h-listed]", f"models: *a{levels - 1}")
            return kind, (
                "x-bomb:\n" + "\n".join("  " + b for b in bomb) + "\n" + good_text
            ).encode()
        if kind == "non_utf8":
            i = rng.randrange(len(good))
            return kind, good[:i].encode() + rng.choice(
                [b"\xff", b"\xfe\xfe", b"\xc3", b"\x80\x80"]
            ) + good[i:].encode()
        if kind == "truncate":
            return kind, good[: rng.randrange(len(good))].encode()
        if kind == "flip":
            data = bytearray(good.encode())
            for _ in range(rng.randint(1, 5)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            return kind, bytes(data)
        if kind == "dup":
            return kind, (good + "\nserver:\n  port: 1\nbackends: {}\n").encode()
        if kind == "tag":
            return kind, (good + "\nx: !!python/object/apply:os.system ['echo pwned']\n").encode()
        if kind == "secret":  # a secret interpolated into values that must be refused
            place = rng.choice(
                [
                    "rate_limit: ${FUZZ_UPSTREAM_KEY_A}",
                    "key_probe_interval: ${FUZZ_UPSTREAM_KEY_B}",
                    "max_cooldown: '${FUZZ_ADMIN_KEY}'",
                ]
            )
            return kind, good.replace("    max_cooldown: 3", "    " + place).encode()
        if kind == "env":
            return kind, good.replace(
                '"${FUZZ_UPSTREAM_KEY_A}"',
                rng.choice(['"${A:-${B}}"', '"${FUZZ_UPSTREAM_KEY_A"', '"$${X}"', '"${1BAD}"']),
            ).encode()
        if kind == "empty":
            return kind, rng.choice([b"", b"---\n", b"---\n---\n", b"null", b"[]", b"\x00"])
        if kind == "tabs":
            return kind, good.replace("  ", "\t").encode()
        if kind == "storage":
            uri = rng.choice(
                [
                    "redis://[::1",
                    "redis://:${FUZZ_ADMIN_KEY}@127.0.0.1:1",
                    "redis://127.0.0.1:99999",
                    "redis://h:p@/x?password=${FUZZ_UPSTREAM_KEY_A}",
                    "memory://x",
                    "mongodb://x",
                ]
            )
            return kind, (good + f"\nstorage: '{uri}'\n").encode()
        return kind, (good + "\n# " + "c" * (2 * 1024 * 1024) + "\n").encode()  # big


def _plan_broken(plan: dict[str, Any] | None) -> bool:
    """The upstream's answer visibly breaks off: a silence, or a cut inside a framed body
    (a cut of a close-delimited body looks like its end, to anyone)."""
    if plan is None:
        return False
    after = str(plan.get("after", "end"))
    framing = str(plan.get("framing", "length"))
    return after == "hang" or (after == "abort" and framing != "close")


def _plan_status(plan: dict[str, Any] | None) -> int | None:
    """The status the upstream answers with, when the proxy may pass it through."""
    if plan is None or plan.get("before_head") or plan.get("status_line") is not None:
        return None
    status = plan.get("status", 200)
    if not isinstance(status, int) or not 200 <= status <= 599 or 300 <= status <= 399:
        return None
    return status


# ====================================================================== one case on the wire


@dataclass
class Case:
    method: str
    target: str
    headers: list[list[str]]
    body: str  # latin-1 text of the raw bytes
    chunked: bool = False
    send: str = "all"  # all | split | slow_head | stall_body | partial_close
    read: str = "all"  # all | head_then_close | first_chunk_then_close
    plan_status: int | None = None  # the upstream's status, when passing it through is right
    plan_kind: str | None = None
    plan_broken: bool = False  # the upstream's answer ends in a cut or a silence
    started: float = 0.0

    def head_bytes(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1"] + [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def body_bytes(self) -> bytes:
        body = self.body.encode("latin-1")
        if self.chunked:
            return (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
        return body

    def summary(self, limit: int = 240) -> str:
        head = self.head_bytes()
        raw = head + self.body_bytes()[:limit]
        text = repr(raw[:limit])
        more = len(head) + len(self.body_bytes()) - limit
        return (
            text
            + (f" ...(+{more} bytes)" if more > 0 else "")
            + f" send={self.send} read={self.read}"
        )


@dataclass
class Result:
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # a whole response was read
    timed_out: bool = False
    error: str | None = None
    seconds: float = 0.0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class _ResponseReader:
    """httptools callbacks collecting one response (after any 1xx)."""

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.result = Result()
        self.parser = httptools.HttpResponseParser(self)
        self.head_done = asyncio.Event()
        self.done = asyncio.Event()
        self.first_body = asyncio.Event()
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._size = 0

    def on_message_begin(self) -> None:
        self._headers, self._body, self._size = [], [], 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return
        self.result.status = status
        self.result.headers = self._headers
        self.head_done.set()
        if self.head_only:
            self.result.complete = True
            self.done.set()

    def on_body(self, body: bytes) -> None:
        if self._size < MAX_READ:
            self._body.append(body)
            self._size += len(body)
        self.first_body.set()

    def on_message_complete(self) -> None:
        if self.result.status is None:  # a 1xx finished: the real answer follows
            return
        self.result.body = b"".join(self._body)
        self.result.complete = True
        self.done.set()

    def feed(self, data: bytes) -> None:
        if self.done.is_set():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc, httptools.HttpParserUpgrade) or "Upgrade" in str(exc):
                # A 101 answer (the parser pauses there): seen as its status, nothing follows.
                self.result.status = self.parser.get_status_code()
                self.result.headers = self._headers
                self.result.complete = True
            else:
                self.result.error = f"unparsable response: {exc}"
            self.done.set()

    def eof(self) -> None:
        if not self.done.is_set():
            if self.result.status is not None:
                self.result.body = b"".join(self._body)
                with contextlib.suppress(httptools.HttpParserError):
                    self.parser.feed_data(b"")  # a close-delimited body ends here
            self.done.set()


def case_timeout(case: Case) -> float:
    if case.send == "slow_head":
        return HEADER_TIMEOUT + SLACK + 1
    if case.send == "stall_body":
        return BODY_TIMEOUT + SLACK + 1
    return CASE_TIMEOUT


async def send_case(port: int, case: Case, timeout: float | None = None) -> Result:
    timeout = timeout or case_timeout(case)
    started = time.monotonic()
    reader = _ResponseReader(head_only=case.method == "HEAD")
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError) as exc:
        return Result(error=f"connect failed: {exc!r}")

    async def pump() -> None:
        while True:
            try:
                data = await r.read(65536)
            except (OSError, ConnectionError):  # a reset ends the answer like a close
                data = b""
            if not data:
                reader.eof()
                return
            reader.feed(data)

    pumping = asyncio.ensure_future(pump())
    write_error = None
    try:
        try:
            await asyncio.wait_for(_write(w, case, reader), timeout)
        except (OSError, ConnectionError) as exc:
            # The server hung up before taking the whole request (e.g. an early 413): its
            # answer may still be in flight, or lost with the reset.
            write_error = f"reset while sending: {type(exc).__name__}"
        if case.send == "partial_close":
            return Result(complete=True, seconds=time.monotonic() - started)
        wanted = {"all": reader.done, "head_then_close": reader.head_done}.get(case.read)
        if wanted is None:  # first chunk then close, or the whole answer if it is short
            body_or_done = [
                asyncio.ensure_future(reader.first_body.wait()),
                asyncio.ensure_future(reader.done.wait()),
            ]
            remaining = max(0.1, timeout - (time.monotonic() - started))
            _, pending = await asyncio.wait(
                body_or_done, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for p in pending:
                p.cancel()
            if not (reader.first_body.is_set() or reader.done.is_set()):
                raise TimeoutError
        else:
            remaining = max(0.1, timeout - (time.monotonic() - started))
            await asyncio.wait_for(wanted.wait(), remaining)
        if case.read != "all" and not reader.done.is_set():
            reader.result.error = "left on purpose"  # mid-answer
    except TimeoutError:
        reader.result.timed_out = True
    except (OSError, ConnectionError) as exc:
        reader.result.error = f"{type(exc).__name__}: {exc}"
    finally:
        pumping.cancel()
        w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.wait_closed(), 1)
    reader.result.seconds = time.monotonic() - started
    if reader.result.status is None and write_error is not None:
        reader.result.error = write_error
    if reader.done.is_set() and reader.result.status is None and reader.result.error is None:
        reader.result.error = "connection closed without a response"
    return reader.result


async def _write(w: asyncio.StreamWriter, case: Case, reader: _ResponseReader) -> None:
    head, body = case.head_bytes(), case.body_bytes()
    if case.send == "slow_head":  # slowloris: part of the head, then nothing
        w.write(head[: max(1, len(head) // 3)])
        await w.drain()
        return
    if case.send == "stall_body":  # the whole head, a little body, then nothing
        w.write(head + body[:5])
        await w.drain()
        return
    if case.send == "partial_close":
        w.write(head + body[: len(body) // 2])
        await w.drain()
        await asyncio.sleep(0.05)
        return
    if case.send == "split":  # byte boundaries the server must cope with
        data = head + body
        for i in range(0, len(data), 7 if len(data) < 2000 else 4096):
            if reader.done.is_set():
                return
            w.write(data[i : i + (7 if len(data) < 2000 else 4096)])
            await w.drain()
        return
    w.write(head + body)
    with contextlib.suppress(ConnectionError):
        await w.drain()


# ====================================================================== checks


def leaked_secrets(data: bytes | str) -> list[str]:
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return [s for s in SECRET_FORMS if s in text]


def is_openai_error(body: bytes) -> bool:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("error"), dict)
        and set(doc["error"]) >= OPENAI_ERROR_FIELDS
    )


def last_event(body: bytes) -> bytes:
    events = [e for e in re.split(rb"\r?\n\r?\n", body) if e.strip()]
    return events[-1] if events else b""


def check_case(case: Case, result: Result, in_config_window: bool) -> list[tuple[str, str]]:
    """(invariant, signature) for each break this one exchange shows."""
    problems: list[tuple[str, str]] = []
    status = result.status
    slow = case.send in ("slow_head", "stall_body")
    if slow:
        # 408, or a plain close, once the head or body timeout has passed; not a hold for ever.
        bound = (HEADER_TIMEOUT if case.send == "slow_head" else BODY_TIMEOUT) + SLACK
        if result.timed_out or result.seconds > bound:
            what = "slow head" if case.send == "slow_head" else "stalled body"
            limit = "header_timeout" if case.send == "slow_head" else "body_timeout"
            problems.append(
                ("hang", f"{what} held past server.{limit} + {SLACK:.0f} s (no 408, no close)")
            )
            return problems
        if result.status is None:
            return problems  # closed without a status: allowed for a request never finished
    if result.timed_out:
        if not in_config_window:
            problems.append(
                (
                    "hang",
                    f"no answer within {CASE_TIMEOUT:.0f} s "
                    f"(plan {case.plan_kind}, read {case.read})",
                )
            )
        return problems
    left = case.read != "all" or case.send == "partial_close"
    reset_early = (result.error or "").startswith("reset while sending")
    if result.error and not left and status is None and well_formed(case) and not reset_early:
        problems.append(("no response", f"{result.error} (plan {case.plan_kind})"))
        return problems
    if status is None:
        return problems
    for name, value in result.headers:
        if leaked_secrets(value):
            problems.append(("secret in response", f"header {name} (plan {case.plan_kind})"))
    if leaked_secrets(result.body):
        problems.append(("secret in response", f"body, status {status} (plan {case.plan_kind})"))
    model_header = result.header("x-proxy-model")
    if model_header is not None and len(model_header) > 300:
        problems.append(("unbounded echo", f"x-proxy-model of {len(model_header)} bytes"))
    if status not in PROXY_STATUSES and status != case.plan_status:
        problems.append(("undocumented status", f"{status} (plan {case.plan_kind})"))
    if b"Traceback (most recent call last)" in result.body:
        problems.append(("traceback in response", f"status {status}"))
    readiness = case.target.split("?")[0] == "/ready" and status == 503  # its own document
    if status >= 400 and not left and case.method != "HEAD" and not readiness:
        if is_openai_error(result.body):
            error = orjson.loads(result.body)["error"]
            if error.get("code") == "internal_error" or (status == 500 and case.plan_status != 500):
                problems.append(
                    ("internal error", f"500 {error.get('code')} (plan {case.plan_kind})")
                )
        elif status != case.plan_status and result.complete:
            ctype = result.header("content-type") or "-"
            problems.append(("error not OpenAI-shaped", f"{status} {ctype} {result.body[:40]!r}"))
    ctype = result.header("content-type") or ""
    if status == 200 and ctype.startswith("text/event-stream") and result.complete and not left:
        path = case.target.split("?")[0]
        tail = last_event(result.body)
        done_path = path in ("/v1/chat/completions", "/v1/completions")
        if (
            done_path
            and case.plan_kind
            and tail.strip() != b"data: [DONE]"
            and b"error" not in tail
        ):
            problems.append(
                (
                    "stream ended silently",
                    f"{path} plan {case.plan_kind}: last event {tail[:80]!r}",
                )
            )
        # A Responses stream has no [DONE]: only a cut or a silence must end in an error event.
        if path == "/v1/responses" and case.plan_broken and b"error" not in tail:
            problems.append(
                (
                    "stream ended silently",
                    f"{path} plan {case.plan_kind}: last event {tail[:80]!r}",
                )
            )
    return problems


KNOWN_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")


def well_formed(case: Case) -> bool:
    """A request any HTTP/1.1 server must answer (with an error, maybe); for anything else
    (unknown method, control bytes, bad framing) closing the connection is a fair answer."""
    if case.method not in KNOWN_METHODS or not case.target.startswith("/"):
        return False
    for _, value in case.headers:
        if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in value):
            return False
    te = [v for k, v in case.headers if k.lower() == "transfer-encoding"]
    cl = [v for k, v in case.headers if k.lower() == "content-length"]
    if te:
        return te == ["chunked"] and not cl
    if not cl:
        return not case.body
    return cl == [str(len(case.body.encode("latin-1")))]


def _outcome(case: Case, result: Result) -> str:
    if result.timed_out:
        return "timeout"
    if result.status is not None:
        return "left mid-answer" if result.error == "left on purpose" else "answered"
    if case.send == "partial_close":
        return "left mid-request"
    if not well_formed(case):
        return "malformed request, closed"
    return "closed without status"


def _path_class(target: str) -> str:
    if len(target) > 60:
        return target[:20] + f"...({len(target)} chars)"
    return target


def check_proxy_output(kind: str, text: str) -> list[tuple[str, str]]:
    problems = [
        ("secret in " + kind, f"{s[:6]}... (raw or URL-encoded)") for s in leaked_secrets(text)
    ]
    return problems


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_series(text: str) -> list[tuple[str, dict[str, str]]]:
    series = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        labels = dict(_LABEL.findall(rest.rpartition("}")[0])) if rest else {}
        series.append((name.split()[0], labels))
    return series


_LOGGER = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+):")
_LINE_START = re.compile(
    r"^(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d|INFO:|WARNING:|ERROR:|DEBUG:|CRITICAL:)"
)


def check_log(text: str, log_format: str) -> list[tuple[str, str, str]]:
    """(invariant, signature, example line) for the proxy's whole output."""
    problems: list[tuple[str, str, str]] = []
    for s in leaked_secrets(text):
        line = next(x for x in text.split("\n") if s in x)
        problems.append(("secret in log", s[:8] + "...", line[:300]))
    lines = text.split("\n")  # not splitlines(): U+2028 or \x85 inside a line is no new line
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if "Traceback (most recent call last)" in line:
            # One break per traceback, named by its last line (the exception).
            j = i
            while j < len(lines) and not _is_event_start(lines[j], "any"):
                j += 1
            last = next((x for x in reversed(lines[i:j]) if x.strip()), None)
            last = last or _exception_of_json_line(line)
            problems.append(("traceback in log", _log_signature(last, 60), last.strip()[:300]))
            i = j
            continue
        if _is_event_start(line, log_format):
            continue
        if log_format == "json":
            logger = _LOGGER.match(line)
            what = f"plain {logger[1]} line from {logger[2]}" if logger else _log_signature(line)
            problems.append(("log line not JSON", what, line[:300]))
        else:
            what = "forged line" if line.lstrip().startswith(FORGED) else "line without a timestamp"
            problems.append(
                ("log: one line per event", f"{what}: {_log_signature(line)}", line[:300])
            )
    return problems


def _exception_of_json_line(line: str) -> str:
    """The exception (last line of the traceback) inside a JSON log line."""
    try:
        doc = json.loads(line)
    except ValueError:
        doc = None
    text = str(doc.get("exception") or line) if isinstance(doc, dict) else line
    return next((x for x in reversed(text.split("\n")) if x.strip()), line)


def _is_event_start(line: str, log_format: str) -> bool:
    """A line that begins an event: a JSON object (json), a timestamp (text), either (any)."""
    if log_format != "json" and _LINE_START.match(line):
        return True
    if log_format == "text" or not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _log_signature(line: str, length: int = 40) -> str:
    return re.sub(r"\d+", "N", line.strip()[:length])


# ====================================================================== the run


@dataclass
class Break:
    invariant: str
    signature: str
    count: int
    repro: str
    example: str = ""


@dataclass
class Report:
    seconds: float = 0.0
    cases: int = 0
    witness_cases: int = 0  # the other client identity's requests, all to be served
    statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # answered, left, closed, timeout
    plan_kinds: Counter[str] = field(default_factory=Counter)
    reloads: int = 0
    checks: int = 0
    restarts: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    max_series: int = 0
    breaker_open_seen: int = 0  # scrapes that saw the breaker not closed
    storm_took_ready: bool = False  # the final storm made /ready 503: its recovery is tested
    breaks: dict[tuple[str, str], Break] = field(default_factory=dict)

    def add(
        self,
        invariant: str,
        signature: str,
        repro: str | Callable[[], str],
        example: str = "",
        size: int = 0,
    ) -> None:
        """One more instance of a break; the smallest reproduction is kept (and only it is
        written to disk: ``repro`` may be a callable that saves the case)."""
        key = (invariant, signature)
        found = self.breaks.get(key)
        if found is not None:
            found.count += 1
            if size >= self._sizes.get(key, 0):
                return
        text = repro() if callable(repro) else repro
        if found is None:
            self.breaks[key] = Break(invariant, signature, 1, text, example)
        else:
            found.repro, found.example = text, example
        self._sizes[key] = size

    def __post_init__(self) -> None:
        self._sizes: dict[tuple[str, str], int] = {}

    @property
    def ok(self) -> bool:
        return not self.breaks

    def render(self) -> str:
        lines = [
            f"fuzz: {self.cases} requests in {self.seconds:.1f} s, {self.reloads} hot reloads of "
            f"hostile files, {self.checks} `proxy check` runs, {self.restarts} proxy restarts",
            f"  outcomes: {dict(sorted(self.outcomes.items()))}; the other client identity"
            f" (witness): {self.witness_cases} requests",
            f"  statuses: {dict(sorted(self.statuses.items()))}",
            f"  upstream plans: {dict(sorted(self.plan_kinds.items()))}",
            f"  proxy RSS {self.rss_start_mb:.1f} MB after warm-up, "
            f"{self.rss_end_mb:.1f} MB at the end; /metrics series at most {self.max_series}; "
            f"breaker seen not closed in {self.breaker_open_seen} scrapes; /ready 503 after the "
            f"final storm: {self.storm_took_ready}",
            f"  invariant breaks: {len(self.breaks)}",
        ]
        for b in sorted(self.breaks.values(), key=lambda b: (b.invariant, b.signature)):
            lines.append(f"  BREAK [{b.invariant}] {b.signature} (x{b.count})")
            lines.append(f"      repro: {b.repro}")
            if b.example:
                lines.append(f"      seen: {b.example}")
        lines.append("  result: " + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


def start_hostile() -> tuple[subprocess.Popen[str], str]:
    from tests.conftest import keep, read_listening_port

    process = subprocess.Popen(
        [sys.executable, str(HOSTILE), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    keep(process)
    return process, f"http://127.0.0.1:{read_listening_port(process, 'hostile upstream')}"


class Fuzz:
    def __init__(
        self,
        seconds: float,
        seed: int,
        concurrency: int,
        log_format: str,
        out: Path,
        rss_bound_mb: float,
        config_every: float,
        check_every: float,
    ) -> None:
        self.seconds = seconds
        self.seed = seed
        self.concurrency = concurrency
        self.log_format = log_format
        self.out = out
        self.rss_bound_mb = rss_bound_mb
        self.config_every = config_every
        self.check_every = check_every
        # One generator per stream of choices, so each stream replays alike for one seed
        # whatever the timing: worker i, the probes' answers, reloaded files, checked files.
        self.sent_strings: set[str] = set()
        self.gens = [Gen(seed * 1000 + i, self.sent_strings) for i in range(concurrency)]
        self.probe_gen = Gen(seed * 1000 + 997)
        self.reload_gen = Gen(seed * 1000 + 998)
        self.check_gen = Gen(seed * 1000 + 999)
        self.report = Report()
        self.windows: list[tuple[float, float]] = []  # hostile config possibly in force
        self.window_open: float | None = None
        self.generation = 0
        self.saved = 0
        self.log_paths: list[Path] = []
        self.in_flight: dict[int, Case] = {}
        self.last_bad_config: Path | None = None
        self.up = asyncio.Event()  # cleared while the proxy is being restarted
        self.up.set()
        self._rss_tasks: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------ processes

    def start(self) -> None:
        from tests.conftest import start_proxy

        self.hostile, self.upstream_url = start_hostile()
        self.tmp = Path(tempfile.mkdtemp(prefix="fuzz-proxy-"))
        self.good = fuzz_config(self.upstream_url, 0)
        self.proxy = start_proxy(
            self.good, self.tmp, SECRETS_ENV, ("--log-format", self.log_format)
        )
        self.config_path = self.tmp / "config.yaml"
        self.log_paths.append(self.proxy.log_path)

    def restart_proxy(self) -> None:
        from tests.conftest import start_proxy

        self.report.restarts += 1
        self.good = fuzz_config(self.upstream_url, self.next_generation())
        self.proxy = start_proxy(
            self.good, self.tmp, SECRETS_ENV, ("--log-format", self.log_format)
        )
        self.log_paths.append(self.proxy.log_path)

    def stop(self) -> None:
        self.proxy.stop()
        self.hostile.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.hostile.wait(timeout=5)

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def save(self, name: str, data: bytes) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.saved += 1
        suffix = ".json" if name == "case" else ".yaml"
        path = self.out / f"{name}-{self.log_format}-{self.saved}{suffix}"
        path.write_bytes(data)
        return path

    def case_repro(self, case: Case) -> str:
        path = self.save("case", json.dumps(asdict(case)).encode())
        return f"python -m tests.fuzz --replay {path}   # {case.summary(160)}"

    # ------------------------------------------------------------ tasks

    async def worker(self, gen: Gen, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.up.wait()
            case = gen.case()
            case.started = time.monotonic()
            token = id(case)
            self.in_flight[token] = case
            proxy = self.proxy
            try:
                result = await send_case(proxy.port, case)
            finally:
                self.in_flight.pop(token, None)
            if proxy is not self.proxy or proxy.process.poll() is not None:
                continue  # the proxy died or was restarted under this request: reported apart
            self.report.cases += 1
            self.report.outcomes[_outcome(case, result)] += 1
            if case.plan_kind:
                self.report.plan_kinds[case.plan_kind] += 1
            if result.status is not None:
                self.report.statuses[result.status] += 1
            window = self.in_window(case.started, time.monotonic())
            size = len(case.body) + len(case.head_bytes())
            problems = check_case(case, result, window)
            example = f"status={result.status} error={result.error} body={result.body[:160]!r}"
            for invariant, signature in problems:
                self.report.add(invariant, signature, self.repro_of(case), example, size)

    async def witness(self, stop: asyncio.Event) -> None:
        """The other client identity: its plain requests, among the fuzzer's, get what
        they would get alone (200 and the upstream's answer); a reload window or a
        restart of the proxy excuses a miss, nothing the fuzzing client sends does."""
        case = witness_case()
        while not stop.is_set():
            await self.up.wait()
            proxy, started = self.proxy, time.monotonic()
            result = await send_case(proxy.port, case, timeout=5)
            if proxy is not self.proxy or proxy.process.poll() is not None:
                continue
            self.report.witness_cases += 1
            ok = result.status == 200 and b'"chat.completion"' in result.body
            if not ok and not self.in_window(started, time.monotonic()):
                self.report.add(
                    "one client cannot change what another gets",
                    f"the witness client got {result.status} {result.error or ''}".strip(),
                    self.repro_of(case),
                    f"status={result.status} body={result.body[:160]!r}",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WITNESS_EVERY)

    def repro_of(self, case: Case) -> Callable[[], str]:
        return lambda: self.case_repro(case)

    async def restart(self, stop_first: bool) -> None:
        self.up.clear()
        try:
            if stop_first:
                await asyncio.to_thread(self.proxy.stop)
            await asyncio.to_thread(self.restart_proxy)
        finally:
            self.up.set()
        # Memory is compared within one process: a new one gets a new baseline.
        self.report.rss_start_mb = 0.0
        self._rss_tasks.add(asyncio.ensure_future(self.warm_rss(time.monotonic() + 3)))

    def in_window(self, start: float, end: float) -> bool:
        if self.window_open is not None and end >= self.window_open:
            return True
        return any(start <= b and end >= a for a, b in self.windows)

    async def monitor(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        health_failures = 0
        tick = 0
        while not stop.is_set():
            tick += 1
            if self.proxy.process.poll() is not None:
                await self.proxy_died()
                continue
            await self.up.wait()
            proxy = self.proxy
            try:
                async with session.get(
                    f"{self.proxy.url}/health", timeout=aiohttp.ClientTimeout(total=5)
                ) as r:
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if proxy is not self.proxy or proxy.process.poll() is not None:
                continue  # restarted or died meanwhile: the monitor's next turn sees it
            health_failures = 0 if ok else health_failures + 1
            # Twice in a row: not one slow moment on a busy machine.
            if health_failures == 2 and self.proxy.process.poll() is None:
                self.report.add(
                    "/health answers 200 throughout",
                    "no 200 twice in a row (5 s timeout)",
                    f"during the run with seed {self.seed}",
                )
            if tick % 3 == 0:
                await self.scrape(session)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def proxy_died(self) -> None:
        code = self.proxy.process.returncode
        tail = "\n".join(self.proxy.log().splitlines()[-5:])
        suspects = [self.case_repro(c) for c in list(self.in_flight.values())[:3]]
        repro = "; ".join(suspects) or "(no request in flight)"
        if self.last_bad_config is not None and self.window_open is not None:
            repro = f"hot reload of {self.last_bad_config} (cp it over the config file)"
        self.report.add("proxy never dies", f"exit code {code}", repro, tail[-300:])
        await self.restart(stop_first=False)

    async def scrape(self, session: aiohttp.ClientSession) -> None:
        """/metrics and /admin/status: no secret, bounded, never a 500."""
        timeout = aiohttp.ClientTimeout(total=10)
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        try:
            async with session.get(
                f"{self.proxy.url}/metrics", headers=headers, timeout=timeout
            ) as r:
                metrics_text = await r.text()
                metrics_status = r.status
            async with session.get(
                f"{self.proxy.url}/admin/status", headers=headers, timeout=timeout
            ) as r:
                admin_text = await r.text()
                admin_status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            if self.proxy.process.poll() is None and not self.in_window(
                time.monotonic(), time.monotonic()
            ):
                self.report.add(
                    "/metrics and /admin/status answer",
                    type(exc).__name__,
                    f"GET /metrics, /admin/status during the run (seed {self.seed})",
                )
            return
        if metrics_status != 200:
            self.report.add(
                "/metrics answers 200",
                str(metrics_status),
                "GET /metrics during the run",
                metrics_text[:200],
            )
        # 404 when a (valid) hostile config in force has no admin key; never a 500.
        if admin_status not in (200, 401, 404):
            self.report.add(
                "/admin/status never fails",
                str(admin_status),
                f"GET /admin/status during the run (seed {self.seed})",
                admin_text[:200],
            )
        for invariant, signature in check_proxy_output("/metrics", metrics_text):
            self.report.add(invariant, signature, "GET /metrics after the hostile requests", "")
        for invariant, signature in check_proxy_output("/admin/status", admin_text):
            self.report.add(
                invariant, signature, "GET /admin/status after the hostile requests", ""
            )
        self.check_metric_labels(metrics_text)
        if admin_status == 200 and '"state":"closed"' not in admin_text.replace(" ", ""):
            self.report.breaker_open_seen += 1

    def check_metric_labels(self, text: str) -> None:
        series = metric_series(text)
        self.report.max_series = max(self.report.max_series, len(series))
        if len(series) > 20_000:
            self.report.add(
                "/metrics series bounded", f"{len(series)} series", "GET /metrics after the run"
            )
        known = {"h-listed", "fz-alias", "h-aliased"}
        for name, labels in series:
            if name.startswith(("python_", "process_")):
                continue  # the runtime's own collectors: fixed labels (a model "2" is not gc's)
            for label, value in labels.items():
                if value in self.sent_strings and value not in known:
                    self.report.add(
                        "/metrics labels only from config",
                        f"{name}{{{label}}} took a client's model id",
                        "GET /metrics after POST /v1/chat/completions with an unrouted model id",
                        f"{label}={value[:80]!r}",
                    )

    async def hostile_probes(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Every few seconds the probes' GET /models gets a different hostile answer."""
        while not stop.is_set():
            plan = self.probe_gen.models_plan()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await session.post(f"{self.upstream_url}/_hostile/models", json={"plan": plan})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 3.0)

    async def reload_loop(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config_every)
            if stop.is_set():
                return
            kind, bad = self.reload_gen.config_file(self.good)
            proxy = self.proxy
            self.window_open = time.monotonic()
            self.last_bad_config = self.save("reload", bad)
            await asyncio.to_thread(_write_atomically, self.config_path, bad)
            self.report.reloads += 1
            await asyncio.sleep(1.2)  # the proxy polls every 0.5 s: it has seen the file
            if not await self.restore_good(session):
                self.report.add(
                    "good config picked up after a bad one",
                    f"after a '{kind}' file the next valid one is not loaded within 8 s",
                    f"write {self.last_bad_config} over the config file of a running proxy, "
                    "wait 1 s, write a valid one back: it is never loaded",
                )
                # A proxy whose watcher died would hide every later reload finding.
                await self.restart(stop_first=True)
            elif proxy is self.proxy and proxy.process.poll() is None:
                self.last_bad_config.unlink(missing_ok=True)  # survived: nothing to reproduce
            assert self.window_open is not None
            self.windows.append((self.window_open, time.monotonic() + 0.5))
            self.window_open = None

    async def restore_good(self, session: aiohttp.ClientSession) -> bool:
        """Write the good config (a new generation, so a new sha) and wait until it is in force."""
        self.good = fuzz_config(self.upstream_url, self.next_generation())
        await asyncio.to_thread(_write_atomically, self.config_path, self.good.encode())
        wanted = hashlib.sha256(self.good.encode()).hexdigest()
        deadline = time.monotonic() + 8
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        while time.monotonic() < deadline:
            if self.proxy.process.poll() is not None:
                return True  # the monitor reports the death; a restart loads the good file
            try:
                async with session.get(
                    f"{self.proxy.url}/admin/status",
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=3),
                ) as r:
                    if (
                        r.status == 200
                        and (await r.json()).get("config", {}).get("sha256") == wanted
                    ):
                        return True
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.25)
        return False

    async def check_loop(self, stop: asyncio.Event) -> None:
        """``proxy check`` on hostile files: exit 0/1/2, bounded time, no traceback, no secret."""
        while not stop.is_set():
            kind, data = self.check_gen.config_file(self.good)
            path = self.save("check", data)
            args = [sys.executable, "-m", "proxy", "check", "--config", str(path)]
            if self.check_gen.rng.random() < 0.3:
                args.append("--json")
            started = time.monotonic()
            code, output = await asyncio.to_thread(_run_check, args)
            self.report.checks += 1
            elapsed = time.monotonic() - started
            repro = (
                f"python {' '.join(args[1:])}   # a '{kind}' file: exit {code} in {elapsed:.1f} s"
            )
            kept = False
            if code not in (0, 1, 2):
                self.report.add(
                    "proxy check exits 0, 1 or 2",
                    f"exit {code} ({kind} file)",
                    repro,
                    output[-200:],
                )
                kept = True
            if "Traceback (most recent call last)" in output:
                last = output.strip().splitlines()[-1][:120]
                self.report.add(
                    "proxy check prints no traceback", re.sub(r"\d+", "N", last[:60]), repro, last
                )
                kept = True
            for s in leaked_secrets(output):
                where = next((x for x in output.split("\n") if s in x), "")
                self.report.add(
                    "secret in proxy check output", f"{s[:8]}... ({kind} file)", repro, where[:300]
                )
                kept = True
            if not kept:
                path.unlink(missing_ok=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_every)

    # ------------------------------------------------------------ the whole run

    async def run(self) -> Report:
        started = time.monotonic()
        deadline = started + self.seconds
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            background = [
                asyncio.ensure_future(self.monitor(session, stop)),
                asyncio.ensure_future(self.hostile_probes(session, stop)),
                asyncio.ensure_future(self.reload_loop(session, stop)),
                asyncio.ensure_future(self.check_loop(stop)),
                asyncio.ensure_future(self.witness(stop)),
            ]
            warm = asyncio.ensure_future(self.warm_rss(started + min(5.0, self.seconds * 0.2)))
            await asyncio.gather(*(self.worker(gen, deadline) for gen in self.gens))
            stop.set()
            await asyncio.gather(*background, warm)
            await self.storm(session)
            await self.calm_down(session)
            await self.scrape(session)
        self.report.seconds = time.monotonic() - started
        return self.report

    async def warm_rss(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        if not self.report.rss_start_mb:
            self.report.rss_start_mb = rss_mb(self.proxy.process.pid)

    async def storm(self, session: aiohttp.ClientSession) -> None:
        """End the hostile phase with the backend down for sure (keys refused, connections
        reset, 500s; the probes refused too), so that recovering by time is really tested."""
        refused: dict[str, Any] = {"status": 401, "headers": [["content-type", "application/json"]]}
        refused["parts"] = [['{"error": {"message": "bad key", "code": "invalid_api_key"}}', 0]]
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await session.post(f"{self.upstream_url}/_hostile/models", json={"plan": refused})
        plans: list[dict[str, Any]] = [{"before_head": "abort"}, {"status": 500}, refused]
        keys = [CLIENT_KEY, SECRETS_ENV["FUZZ_CLIENT_KEY_2"]]
        for i in range(15):
            body = orjson.dumps({"model": f"h-storm-{i % 3}", "hostile": plans[i % 3]})
            headers = [
                ["Host", "127.0.0.1"],
                ["Authorization", f"Bearer {keys[i % 2]}"],
                ["Content-Type", "application/json"],
                ["Content-Length", str(len(body))],
            ]
            case = Case("POST", "/v1/chat/completions", headers, body.decode("latin-1"))
            await send_case(self.proxy.port, case, timeout=10)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{self.proxy.url}/ready") as r:
                self.report.storm_took_ready = r.status != 200

    async def calm_down(self, session: aiohttp.ClientSession) -> None:
        """After the hostile phase: everything returns to normal by time alone."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await session.post(f"{self.upstream_url}/_hostile/models", json={"plan": None})
        if self.proxy.process.poll() is not None:
            await self.proxy_died()
        if not await self.restore_good(session):
            self.report.add(
                "good config picked up after a bad one",
                "at the end of the run",
                f"seed {self.seed}",
            )
        calm_at = time.monotonic()
        ready, states = await self.wait_ready(session, calm_at + 20)
        if not ready:
            self.report.add(
                "/ready recovers after the hostile phase",
                "/ready not 200 within 20 s",
                "make the hostile backend fail (5 upstream 500s in a row), then send nothing: "
                "/ready stays 503",
                states,
            )
        elif states:
            self.report.add(
                "every state leaves by time",
                "breaker or key not back to closed/ok within 20 s",
                "make the hostile backend fail, then send nothing and watch /admin/status",
                states,
            )
        await self.check_upstream_work(session)
        self.report.rss_end_mb = rss_mb(self.proxy.process.pid)
        if (
            self.report.rss_start_mb
            and self.report.rss_end_mb - self.report.rss_start_mb > self.rss_bound_mb
        ):
            self.report.add(
                "RSS bounded",
                f"+{self.report.rss_end_mb - self.report.rss_start_mb:.0f} MB "
                f"(bound {self.rss_bound_mb:.0f})",
                f"python -m tests.fuzz --seconds {self.seconds:.0f} --seed {self.seed}",
            )

    async def wait_ready(self, session: aiohttp.ClientSession, deadline: float) -> tuple[bool, str]:
        """Until /ready is 200 and /admin/status shows every breaker closed and key ok."""
        ready, states = False, ""
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        timeout = aiohttp.ClientTimeout(total=3)
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{self.proxy.url}/ready", timeout=timeout) as r:
                    ready = r.status == 200
                async with session.get(
                    f"{self.proxy.url}/admin/status", headers=headers, timeout=timeout
                ) as r:
                    doc = await r.json() if r.status == 200 else {}
                states = ", ".join(
                    f"{name}: breaker {b.get('breaker', {}).get('state')}, keys "
                    + "/".join(str(k.get("state")) for k in b.get("keys", []))
                    for name, b in doc.get("backends", {}).items()
                    if b.get("breaker", {}).get("state") != "closed"
                    or any(k.get("state") != "ok" for k in b.get("keys", []))
                )
                if ready and not states:
                    return True, ""
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(0.5)
        return ready, states

    async def check_upstream_work(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 10
        stats: dict[str, int] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"{self.upstream_url}/_hostile/stats") as r:
                    stats = await r.json()
            if stats.get("plays_active", 1) == 0:
                break
            await asyncio.sleep(0.5)
        if stats.get("plays_active", 0):
            self.report.add(
                "no upstream work outlives its client",
                f"{stats['plays_active']} upstream answers still being read 10 s after the "
                "last client left",
                f"python -m tests.fuzz --seconds {self.seconds:.0f} --seed {self.seed}",
            )
        if stats.get("redirect_hits", 0):
            self.report.add(
                "redirects are never followed",
                f"{stats['redirect_hits']} requests reached the redirect target",
                "an upstream 307 with Location: /redirected/...: the proxy went there",
            )

    def check_logs(self) -> None:
        for path in self.log_paths:
            with contextlib.suppress(OSError):
                text = path.read_bytes().decode("utf-8", "replace")
                for invariant, signature, example in check_log(text, self.log_format):
                    self.report.add(invariant, signature, f"see {path}", example)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _run_check(args: list[str]) -> tuple[int | str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")} | SECRETS_ENV
    try:
        done = subprocess.run(args, capture_output=True, timeout=30, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "timeout (30 s)", ""
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    return done.returncode, output


def run_fuzz(
    seconds: float,
    seed: int = 1,
    concurrency: int = 8,
    log_format: str = "both",
    out: Path | None = None,
    rss_bound_mb: float = 50.0,
    config_every: float = 2.5,
    check_every: float = 3.0,
) -> Report:
    """Fuzz for ``seconds`` (split between text and JSON logs with ``both``)."""
    formats = ["text", "json"] if log_format == "both" else [log_format]
    out = out or Path(tempfile.mkdtemp(prefix=f"fuzz-{seed}-"))
    total = Report()
    for i, fmt in enumerate(formats):
        fuzz = Fuzz(
            seconds / len(formats),
            seed + i,
            concurrency,
            fmt,
            out,
            rss_bound_mb,
            config_every,
            check_every,
        )
        fuzz.start()
        try:
            report = asyncio.run(fuzz.run())
        finally:
            fuzz.stop()
        fuzz.check_logs()
        _merge(total, report)
    return total


def _merge(total: Report, part: Report) -> None:
    total.seconds += part.seconds
    total.cases += part.cases
    total.witness_cases += part.witness_cases
    total.statuses.update(part.statuses)
    total.outcomes.update(part.outcomes)
    total.plan_kinds.update(part.plan_kinds)
    total.reloads += part.reloads
    total.checks += part.checks
    total.restarts += part.restarts
    total.rss_start_mb = max(total.rss_start_mb, part.rss_start_mb)
    total.rss_end_mb = max(total.rss_end_mb, part.rss_end_mb)
    total.max_series = max(total.max_series, part.max_series)
    total.breaker_open_seen += part.breaker_open_seen
    total.storm_took_ready = total.storm_took_ready or part.storm_took_ready
    for key, b in part.breaks.items():
        if key in total.breaks:
            total.breaks[key].count += b.count
        else:
            total.breaks[key] = b


def witness_case() -> Case:
    """The witness client's request: a plain chat the upstream answers 200."""
    plan = Gen(0).plan_ok(False)
    body = orjson.dumps(
        {"model": WITNESS_MODEL, "messages": [{"role": "user", "content": "hi"}], "hostile": plan}
    ).decode("latin-1")
    headers = [
        ["Host", "127.0.0.1"],
        ["Authorization", f"Bearer {SECRETS_ENV['FUZZ_WITNESS_KEY']}"],
        ["Content-Type", "application/json"],
        ["Content-Length", str(len(body))],
    ]
    return Case("POST", "/v1/chat/completions", headers, body, plan_status=200, plan_kind="ok")


def plan_case(plan: dict[str, Any]) -> Case:
    """A plain chat request whose upstream answer is ``plan`` (``--plan``)."""
    body = orjson.dumps({"model": "h-repro", "stream": True, "hostile": plan}).decode("latin-1")
    headers = [
        ["Host", "127.0.0.1"],
        ["Authorization", f"Bearer {CLIENT_KEY}"],
        ["Content-Type", "application/json"],
        ["Content-Length", str(len(body))],
    ]
    return Case(
        "POST",
        "/v1/chat/completions",
        headers,
        body,
        plan_status=_plan_status(plan),
        plan_kind="repro",
        plan_broken=_plan_broken(plan),
    )


def raw_case(raw: str) -> Case:
    """A request given as raw text with ``\r\n`` escapes (``--raw``)."""
    data = raw.encode("latin-1").decode("unicode_escape")
    head, _, body = data.partition("\r\n\r\n")
    line, *fields = head.split("\r\n")
    method, target = [*line.split(" "), "", ""][:2]
    headers = [list(f.split(": ", 1)) if ": " in f else [f, ""] for f in fields]
    return Case(method, target, headers, body)


def replay(case: Case) -> int:
    """Send one case to a fresh proxy (the fuzz config) and print what came back."""
    from tests.conftest import start_proxy

    hostile, upstream_url = start_hostile()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-replay-"))
    proxy = start_proxy(fuzz_config(upstream_url, 0), tmp, SECRETS_ENV, ("--log-format", "text"))
    try:
        result = asyncio.run(send_case(proxy.port, case))
        time.sleep(0.3)
        print(f"request: {case.summary(400)}")
        print(
            f"status: {result.status}  error: {result.error}  "
            f"timed out: {result.timed_out}  in {result.seconds:.2f} s"
        )
        for k, v in result.headers:
            print(f"  {k}: {v[:200]}")
        print(f"body: {result.body[:1000]!r}")
        problems = check_case(case, result, in_config_window=False)
        log_text = proxy.log()
        problems += [(i, f"{sig}: {ex[:120]}") for i, sig, ex in check_log(log_text, "text")]
        print("log:\n" + log_text[-2000:])
        for invariant, signature in problems:
            print(f"BREAK [{invariant}] {signature}")
        print("no invariant broke" if not problems else f"{len(problems)} invariant(s) broke")
        return 1 if problems else 0
    finally:
        proxy.stop()
        hostile.terminate()
        hostile.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description="Fuzz a running proxy and check the invariants.")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--log-format", choices=["text", "json", "both"], default="both")
    parser.add_argument("--out", type=Path, help="where failing cases and files are saved")
    parser.add_argument("--rss-mb", type=float, default=50.0, help="allowed RSS growth")
    parser.add_argument("--replay", type=Path, help="send one saved case and show the answer")
    parser.add_argument("--plan", help="send one chat request whose upstream answer is this plan")
    parser.add_argument("--raw", help="send these raw request bytes (\\r\\n escapes)")
    args = parser.parse_args()
    if args.replay:
        return replay(Case(**json.loads(args.replay.read_text())))
    if args.plan:
        return replay(plan_case(json.loads(args.plan)))
    if args.raw:
        return replay(raw_case(args.raw))
    report = run_fuzz(
        args.seconds, args.seed, args.concurrency, args.log_format, args.out, args.rss_mb
    )
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
