"""``proxy check --online``: try every key and every configured model id against the backends.

For every backend and key: ``GET {base_url}/models`` (concurrently, short timeouts), and for
a backend with an Anthropic endpoint ``GET {anthropic_base_url}/v1/models`` too, the key sent
the way that endpoint wants it. Each key is ok (with its model count), invalid (401/403,
with a hint where one is known), unreachable, or answered some other status (a 404 from an
Anthropic endpoint only means it lists no models: a warning). Every alias target and every
model listed under a backend is then looked up in what that backend serves (its OpenAI
side's list); a missing id comes with the closest real ids.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from proxy.config import BackendConfig, Config, KeyConfig
from proxy.dialects import DEFAULT, DIALECTS, Dialect
from proxy.redact import Redactor
from proxy.routing import Router
from proxy.upstream import tls_context

TIMEOUT = httpx.Timeout(8.0, connect=4.0)
_BODY_LIMIT = 16 * 1024 * 1024

# Hints for a refused key, by the backend's host: data, not code paths. The classic: a key
# from one of Moonshot's two platforms used against the other platform's API.
KEY_HINTS: tuple[tuple[str, str], ...] = (
    (
        r"(^|\.)api\.moonshot\.cn$",
        "keys from platform.moonshot.ai work only with https://api.moonshot.ai/v1; "
        "this backend points at api.moonshot.cn",
    ),
    (
        r"(^|\.)api\.moonshot\.ai$",
        "keys from platform.moonshot.cn work only with https://api.moonshot.cn/v1; "
        "this backend points at api.moonshot.ai",
    ),
    (r"(^|\.)api\.openai\.com$", "create or check the key at platform.openai.com/api-keys"),
    (r"(^|\.)api\.anthropic\.com$", "Anthropic keys start with sk-ant- (console.anthropic.com)"),
)
_HINTS = tuple((re.compile(pattern), hint) for pattern, hint in KEY_HINTS)


@dataclass
class Finding:
    backend: str
    level: str  # ok | warning | error
    subject: str  # "key kimi-main", "model kimi-k2-0711"
    message: str
    hint: str | None = None


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(f.level == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.level == "warning" for f in self.findings)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.errors == 0,
            "errors": self.errors,
            "warnings": self.warnings,
            "findings": [asdict(f) for f in self.findings],
        }


@dataclass
class _KeyResult:
    key: KeyConfig
    dialect: Dialect = DEFAULT
    status: int | None = None
    models: list[str] = field(default_factory=list)
    error: str | None = None
    message: str = ""


async def check_online(config: Config) -> Report:
    redactor = Redactor.for_config(config)
    # One client per set of trusted roots (the system's; each backend's own ca_file).
    clients = {
        backend.ca_file: httpx.AsyncClient(
            timeout=TIMEOUT, follow_redirects=False, verify=tls_context(backend)
        )
        for backend in config.backends.values()
    }
    try:
        jobs = [
            _probe(clients[backend.ca_file], backend, key, redactor, dialect)
            for backend in config.backends.values()
            for dialect in DIALECTS.values()
            if dialect.speaks(backend)
            for key in backend.keys
            if key.present
        ]
        results = await asyncio.gather(*jobs)
    finally:
        for client in clients.values():
            await client.aclose()
    by_backend: dict[str, list[_KeyResult]] = {}
    for backend_name, result in results:
        by_backend.setdefault(backend_name, []).append(result)
    report = Report()
    wanted = _wanted_models(config)
    for name, backend in config.backends.items():
        results_here = by_backend.get(name, [])
        report.findings += _key_findings(backend, results_here)
        served = sorted({m for r in results_here if r.dialect is DEFAULT for m in r.models})
        report.findings += _model_findings(name, wanted.get(name, {}), served, results_here)
    return report


async def _probe(
    client: httpx.AsyncClient,
    backend: BackendConfig,
    key: KeyConfig,
    redactor: Redactor,
    dialect: Dialect = DEFAULT,
) -> tuple[str, _KeyResult]:
    result = _KeyResult(key, dialect)
    name, value = dialect.upstream_auth(backend, key.value)
    headers = {**backend.headers, **dialect.models_headers(), name: value}
    try:
        status, data = await _get_capped(client, f"{dialect.base_url(backend)}/models", headers)
    except httpx.TimeoutException:
        result.error = "timed out"
    except httpx.HTTPError as exc:
        result.error = f"unreachable ({type(exc).__name__})"
    else:
        result.status = status
        try:
            body = json.loads(redactor.bytes(data)) if data else None
        except ValueError:
            body = None
        if 300 <= status < 400:
            result.message = "redirected (redirects are not followed: check base_url)"
        elif status == 200 and isinstance(body, dict):
            result.models = [
                str(m["id"]) for m in body.get("data") or () if isinstance(m, dict) and "id" in m
            ]
        elif isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message") or body["error"].get("type") or "")
            result.message = message[:300]
    return backend.name, result


async def _get_capped(
    client: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    """GET ``url``: the status and at most ``_BODY_LIMIT`` bytes of the body (a model list;
    a hostile or broken upstream cannot make the check eat memory)."""
    async with client.stream("GET", url, headers=headers) as response:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > _BODY_LIMIT:
                return response.status_code, b""
            chunks.append(chunk)
        return response.status_code, b"".join(chunks)


def _key_findings(backend: BackendConfig, results: list[_KeyResult]) -> list[Finding]:
    findings = []
    checked = {r.key.id for r in results}
    for key in backend.keys:
        if key.id not in checked:
            hint = f"set {' or '.join(key.env_vars)}" if key.env_vars else "the key is empty"
            findings.append(Finding(backend.name, "warning", f"key {key.id}", "not set", hint))
    for r in results:
        subject = f"key {r.key.id}"
        url = backend.base_url
        if r.dialect is not DEFAULT:
            subject += f" ({r.dialect.name} endpoint)"
            url = r.dialect.base_url(backend)
        if r.error is not None:
            findings.append(Finding(backend.name, "error", subject, r.error))
        elif r.status == 200:
            findings.append(Finding(backend.name, "ok", subject, f"ok, {len(r.models)} models"))
        elif r.status in (401, 403):
            message = f"{r.status}: invalid" + (f" ({r.message})" if r.message else "")
            findings.append(Finding(backend.name, "error", subject, message, _key_hint(url)))
        elif r.status == 404 and r.dialect is not DEFAULT:
            message = f"lists no models at {url}/models (404): the key is not checked there"
            findings.append(Finding(backend.name, "warning", subject, message))
        else:
            message = f"answered {r.status}" + (f" ({r.message})" if r.message else "")
            findings.append(Finding(backend.name, "error", subject, message))
    if not results and backend.keys:
        findings.append(
            Finding(backend.name, "error", "backend", "no key is set: it cannot serve requests")
        )
    return findings


def _model_findings(
    backend: str, wanted: dict[str, str], served: list[str], results: list[_KeyResult]
) -> list[Finding]:
    if not wanted:
        return []
    if not any(r.status == 200 for r in results):
        return [Finding(backend, "warning", "models", "not checked: no key could list the models")]
    findings = []
    served_set = set(served)
    for model, why in wanted.items():
        if model in served_set:
            findings.append(Finding(backend, "ok", f"model {model}", f"served ({why})"))
            continue
        close = difflib.get_close_matches(model, served, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else None
        message = f"is not served by {backend} ({why})"
        findings.append(Finding(backend, "error", f"model {model}", message, hint))
    return findings


def _wanted_models(config: Config) -> dict[str, dict[str, str]]:
    """backend -> {upstream model id: why it is expected}."""
    router = Router(config)
    wanted: dict[str, dict[str, str]] = {}
    for name, backend in config.backends.items():
        for model in backend.models:
            wanted.setdefault(name, {})[model] = "listed under models"
    for alias in config.aliases:
        target = router.resolve(alias)
        if target is not None:
            wanted.setdefault(target.backend, {}).setdefault(
                target.upstream_model, f"target of alias {alias}"
            )
    for i, route in enumerate(config.routes):
        for d in route.deployments:  # each deployment's own id, on its own backend
            if d.model is not None:
                wanted.setdefault(d.backend, {}).setdefault(
                    d.model, f"deployment of routes[{i}] '{route.prefix}*'"
                )
    return wanted


def _key_hint(base_url: str) -> str | None:
    host = httpx.URL(base_url).host
    return next((hint for pattern, hint in _HINTS if pattern.search(host)), None)


def print_report(report: Report, out: Any) -> None:
    current = None
    marks = {"ok": "ok   ", "warning": "WARN ", "error": "ERROR"}
    for finding in report.findings:
        if finding.backend != current:
            current = finding.backend
            out.write(f"\n{current}\n")
        line = f"  {marks[finding.level]} {finding.subject}: {finding.message}"
        if finding.hint:
            line += f" -> {finding.hint}"
        out.write(line + "\n")
    verdict = "all is well" if report.errors == 0 else "something is wrong"
    out.write(f"\nsummary: {report.errors} errors, {report.warnings} warnings: {verdict}\n")
