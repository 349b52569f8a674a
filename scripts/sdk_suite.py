"""SDK conformance suite: the openai-python SDK's own API tests, directly and through the proxy.

    make sdk-suite            (or: .venv/bin/python scripts/sdk_suite.py)

Runs `tests/api_resources` of a pinned openai-python checkout (sync and async clients) against
a Prism mock of the SDK's bundled OpenAPI spec, once directly and once through `proxy serve`
with a catch-all config, and compares the outcomes test by test. Exit 0 when every test that
passes directly also passes through the proxy (organization admin endpoints excluded), 1 when
some do not, 2 when the suite itself could not run.

Everything downloaded lives in .cache/sdk-suite/ (the SDK checkout, its venv, Prism); the
full lists go to .cache/sdk-suite/report.txt and the spec's endpoint table to paths.txt.

Environment:
  OPENAI_PYTHON_SRC     an openai-python checkout or git dir to use instead of cloning
  SDK_SUITE_WORKERS     pytest-xdist workers per run (default 2; 0 = no xdist)
  SDK_SUITE_TIMEOUT     seconds per pytest run (default 360)
  SDK_SUITE_K           a pytest -k expression, to run a subset while iterating
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "sdk-suite"
SDK_DIR = CACHE / "openai-python"
SDK_VENV = CACHE / "venv"
PRISM_DIR = CACHE / "prism"
PRISM_BIN = PRISM_DIR / "node_modules" / ".bin" / "prism"
PROXY_BIN = REPO / ".venv" / "bin" / "proxy"

# openai-python v3.3.1-30-ge43b4224 (2026-08-21): 6,187 tests in tests/api_resources.
SDK_REPO_URL = "https://github.com/openai/openai-python"
SDK_COMMIT = "e43b422412a9e96c9cc5192c61fffbe2d7e04836"
# Where a session's fetch tool leaves a mirror of the repository (a bare git dir).
SDK_MIRROR = Path("/work/.mirror/openai+openai-python/repo")
SPEC_IN_SDK = Path("api_reference/openapi.transformed.yml")
PRISM_PACKAGE = "@stoplight/prism-cli@5.14.2"
SDK_TEST_DEPS = [
    "pytest>=9",
    "pytest-asyncio>=1.4",
    "pytest-xdist>=3.6",
    "inline-snapshot>=0.28",
    "dirty-equals",
    "rich",
]

WORKERS = int(os.environ.get("SDK_SUITE_WORKERS", "2"))
RUN_TIMEOUT = float(os.environ.get("SDK_SUITE_TIMEOUT", "360"))
SUBSET = os.environ.get("SDK_SUITE_K", "")
DUMMY_KEY = "sk-sdk-suite-dummy"  # Prism checks that a bearer is present, not its value
EXAMPLES_PER_GROUP = 2


def log(message: str) -> None:
    print(f"[sdk-suite {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class SuiteError(Exception):
    """The suite could not run (set-up, mock or proxy); exit 2 with this message."""


# --- set-up: SDK checkout, its venv, Prism ---------------------------------------------------


def run_quiet(args: list[str], what: str, cwd: Path | None = None, timeout: float = 900) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SuiteError(f"{what} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def export_from_git_dir(git_dir: Path, into: Path) -> str:
    """Writes the pinned commit (or HEAD if the git dir lacks it) of git_dir into `into`."""
    has_pin = (
        subprocess.run(
            ["git", "--git-dir", str(git_dir), "cat-file", "-e", f"{SDK_COMMIT}^{{commit}}"],
            capture_output=True,
        ).returncode
        == 0
    )
    commit = SDK_COMMIT if has_pin else "HEAD"
    if not has_pin:
        log(f"warning: {git_dir} lacks the pinned commit {SDK_COMMIT[:10]}; using its HEAD")
    into.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "--git-dir", str(git_dir), "archive", commit], stdout=subprocess.PIPE
    )
    untar = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout)
    if archive.wait() != 0 or untar.returncode != 0:
        raise SuiteError(f"could not export {commit} from {git_dir}")
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), "rev-parse", commit], capture_output=True, text=True
    ).stdout.strip()


def clone_pinned(into: Path) -> str:
    """A depth-1 fetch of exactly the pinned commit from GitHub."""
    into.mkdir(parents=True)
    for args in (
        ["git", "init", "-q"],
        ["git", "fetch", "-q", "--depth", "1", SDK_REPO_URL, SDK_COMMIT],
        ["git", "checkout", "-q", "FETCH_HEAD"],
    ):
        run_quiet(args, " ".join(args[:2]), cwd=into, timeout=300)
    return SDK_COMMIT


def git_dir_of(source: Path) -> Path | None:
    if (source / ".git").exists():
        return source / ".git"
    if (source / "HEAD").is_file() and (source / "objects").is_dir():
        return source
    return None


def ensure_sdk_checkout() -> str:
    """The SDK sources in .cache/sdk-suite/openai-python; returns the commit they are."""
    marker = SDK_DIR / ".sdk-suite-commit"
    source = os.environ.get("OPENAI_PYTHON_SRC")
    wanted = f"src:{source}" if source else f"pin:{SDK_COMMIT}"
    if marker.exists() and marker.read_text().split("\n")[0] == wanted:
        return marker.read_text().split("\n")[1]
    shutil.rmtree(SDK_DIR, ignore_errors=True)
    if source:
        git_dir = git_dir_of(Path(source))
        if git_dir is not None:
            commit = export_from_git_dir(git_dir, SDK_DIR)
        else:  # a plain directory: copy it as it is
            shutil.copytree(source, SDK_DIR)
            commit = "unknown (plain directory)"
    else:
        try:
            log(f"cloning {SDK_REPO_URL} at {SDK_COMMIT[:10]}")
            commit = clone_pinned(SDK_DIR)
        except (SuiteError, subprocess.TimeoutExpired) as error:
            shutil.rmtree(SDK_DIR, ignore_errors=True)
            if git_dir_of(SDK_MIRROR) is None:
                raise SuiteError(
                    f"cannot clone {SDK_REPO_URL} ({str(error).splitlines()[0]}) and no mirror "
                    f"at {SDK_MIRROR}: set OPENAI_PYTHON_SRC to a checkout or git dir"
                ) from error
            log(f"clone failed; using the mirror {SDK_MIRROR}")
            commit = export_from_git_dir(SDK_MIRROR, SDK_DIR)
    if not (SDK_DIR / "tests" / "api_resources").is_dir():
        raise SuiteError(f"{SDK_DIR} has no tests/api_resources: not an openai-python checkout")
    marker.write_text(f"{wanted}\n{commit}\n")
    return commit


def ensure_sdk_venv() -> None:
    stamp = SDK_VENV / ".sdk-suite-installed"
    wanted = (SDK_DIR / ".sdk-suite-commit").read_text() + "\n".join(SDK_TEST_DEPS)
    if stamp.exists() and stamp.read_text() == wanted:
        return
    log("installing the SDK and its test tools into .cache/sdk-suite/venv")
    shutil.rmtree(SDK_VENV, ignore_errors=True)
    run_quiet([sys.executable, "-m", "venv", str(SDK_VENV)], "venv")
    pip = [str(SDK_VENV / "bin" / "pip"), "install", "--quiet"]
    run_quiet([*pip, "--upgrade", "pip"], "pip upgrade")
    run_quiet([*pip, "-e", f"{SDK_DIR}[aiohttp]", *SDK_TEST_DEPS], "pip install (SDK + tests)")
    stamp.write_text(wanted)


def ensure_prism() -> None:
    stamp = PRISM_DIR / ".sdk-suite-installed"
    if PRISM_BIN.exists() and stamp.exists() and stamp.read_text() == PRISM_PACKAGE:
        return
    if shutil.which("npm") is None:
        raise SuiteError("npm not found: Prism needs node >= 18 and npm")
    log(f"installing {PRISM_PACKAGE} into .cache/sdk-suite/prism")
    PRISM_DIR.mkdir(parents=True, exist_ok=True)
    run_quiet(
        ["npm", "install", "--prefix", str(PRISM_DIR), "--no-audit", "--no-fund", PRISM_PACKAGE],
        "npm install prism",
    )
    stamp.write_text(PRISM_PACKAGE)


def spec_path() -> Path:
    """The spec the SDK's own mock script uses (its bundled transformed spec)."""
    bundled = SDK_DIR / SPEC_IN_SDK
    if bundled.is_file():
        return bundled
    for stats in (".stats.yml", ".castiron.stats.yml"):  # older SDKs name only a URL
        stats_file = SDK_DIR / stats
        if stats_file.is_file():
            url = (yaml.safe_load(stats_file.read_text()) or {}).get("openapi_spec_url")
            if url:
                cached = CACHE / "openapi.yml"
                if not cached.exists():
                    log(f"downloading the spec {url}")
                    urllib.request.urlretrieve(url, cached)
                return cached
    raise SuiteError(f"no OpenAPI spec in {SDK_DIR} ({SPEC_IN_SDK} or a .stats.yml URL)")


# --- processes: Prism and the proxy -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextlib.contextmanager
def started(name: str, args: list[str], log_path: Path) -> Iterator[Service]:
    """A child in its own process group, stopped (TERM, then KILL) whatever happens."""
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield Service(name, process, log_path)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until_answering(service: Service, url: str, timeout: float) -> None:
    """Until `url` gives any HTTP answer (Prism: 401/404 are fine; it is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            tail = service.log_path.read_text(errors="replace")[-2000:]
            raise SuiteError(f"{service.name} exited ({service.process.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise SuiteError(f"{service.name} did not answer {url} within {timeout:.0f} s")


def proxy_config_fields() -> set[str]:
    schema = json.loads(
        subprocess.run([str(PROXY_BIN), "schema"], capture_output=True, check=True).stdout
    )
    return set(schema.get("properties", {}))


def write_proxy_config(path: Path, prism_port: int, proxy_port: int) -> None:
    """A catch-all config: every model to Prism with a dummy key, nothing else in the way.

    Prism serves the spec's paths without the server URL's /v1, so the backend's base_url
    has none. The reconnect throttle and the breaker are out of the way so that each test's
    outcome is its own, not the trace of an earlier test's failures.
    """
    config: dict[str, Any] = {
        "storage": "memory://",
        "server": {"host": "127.0.0.1", "port": proxy_port, "config_poll_interval": 0},
        "backends": {
            "prism": {
                "base_url": f"http://127.0.0.1:{prism_port}",
                "keys": [{"id": "dummy", "key": DUMMY_KEY}],
                "breaker": {"failures": 1_000_000},
            }
        },
        "routes": [{"prefix": "", "backend": "prism"}],
        "throttle": {"reconnect": {"enabled": False}},
    }
    # issue 12's model-less requests: only once the config knows the field.
    if "default_backend" in proxy_config_fields():
        config["default_backend"] = "prism"
    path.write_text(yaml.safe_dump(config, sort_keys=False))


# --- the SDK's tests ---------------------------------------------------------------------------


@dataclass
class TestResult:
    id: str
    outcome: str  # passed | failed | skipped | error
    message: str
    requests: list[dict[str, Any]]


@dataclass
class Run:
    label: str
    results: dict[str, TestResult] = field(default_factory=dict)
    seconds: float = 0.0
    timed_out: bool = False
    exit_code: int = 0

    def counts(self) -> Counter[str]:
        return Counter(result.outcome for result in self.results.values())


def read_results(label: str) -> dict[str, TestResult]:
    results_path = CACHE / f"results-{label}.jsonl"
    results: dict[str, TestResult] = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            entry = json.loads(line)
            results[entry["id"]] = TestResult(**entry)
    return results


def run_sdk_tests(label: str, base_url: str) -> Run:
    results_path = CACHE / f"results-{label}.jsonl"
    results_path.unlink(missing_ok=True)
    args = [
        str(SDK_VENV / "bin" / "pytest"),
        "tests/api_resources",
        "-p",
        "no:cacheprovider",
        "-p",
        "sdk_suite_probe",
        "-q",
        "-o",
        # The SDK's own addopts say -n auto. A one-line traceback and no log capture (the
        # SDK logs at DEBUG) make a failing test as cheap as a passing one.
        "addopts=--tb=line",
        "-p",
        "no:logging",
        *(["-n", str(WORKERS)] if WORKERS > 0 else []),
        *(["-k", SUBSET] if SUBSET else []),
    ]
    env = {
        **os.environ,
        "TEST_API_BASE_URL": base_url,
        "SDK_SUITE_RESULTS": str(results_path),
        "PYTHONPATH": str(REPO / "scripts"),
        "DEFER_PYDANTIC_BUILD": "false",
    }
    run = Run(label)
    log(f"run '{label}': TEST_API_BASE_URL={base_url}")
    started_at = time.monotonic()
    with open(CACHE / f"pytest-{label}.log", "wb") as log_file:
        process = subprocess.Popen(
            args,
            cwd=SDK_DIR,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            run.exit_code = process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest then closes its session and the results file.
            run.timed_out = True
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                stop(process)
        finally:
            stop(process)
    run.seconds = time.monotonic() - started_at
    run.results = read_results(label)
    if not run.results:
        tail = (CACHE / f"pytest-{label}.log").read_text(errors="replace")[-3000:]
        why = f"timed out after {RUN_TIMEOUT:.0f} s" if run.timed_out else f"exit {run.exit_code}"
        raise SuiteError(f"run '{label}' recorded no test ({why}):\n{tail}")
    log(f"run '{label}': {len(run.results)} tests in {run.seconds:.0f} s")
    return run


# --- analysis ------------------------------------------------------------------------------


def api_path(path: str) -> str:
    """The path after /v1, whichever side the request was seen on."""
    return path[3:] if path.startswith("/v1/") else path


ADMIN: list[SpecEndpoint] = []  # filled from the spec in main()


def is_excluded(result: TestResult) -> bool:
    """Organization admin endpoints (admin key), which the proxy keeps from the operator's key.

    /organization/... and the spec's other admin-key operations (/projects/{id}/roles...).
    """
    return "/api_resources/admin/" in result.id or any(
        api_path(request["path"]).startswith("/organization")
        or any(endpoint.pattern.match(api_path(request["path"])) for endpoint in ADMIN)
        for request in result.requests
    )


ERROR_CODE = re.compile(r"Error code: (\d{3}) - (.*)", re.S)
BODY_FIELD = r"""['"]{name}['"]:\s*['"]([^'"]*)['"]"""


def failure_cause(result: TestResult) -> str:
    """`404 unknown_url`, `400 missing_model`, `405 plain-text`, or the exception's type."""
    match = ERROR_CODE.search(result.message)
    if match:
        status, body = match.groups()
        for name in ("code", "type"):
            found = re.search(BODY_FIELD.format(name=name), body)
            if found and found.group(1):
                return f"{status} {found.group(1)}"
        return f"{status} {'plain-text' if not body.lstrip().startswith('{') else 'no code'}"
    first_line = result.message.strip().splitlines()[0] if result.message.strip() else "?"
    exception = re.search(r"([\w.]+(?:Error|Exception|Timeout|Warning))\b", first_line)
    status = result.requests[-1]["status"] if result.requests else None
    return (exception.group(1) if exception else first_line[:60]) + (
        f" (HTTP {status})" if status else ""
    )


def request_kind(result: TestResult) -> str:
    """`GET`, `POST json`, `POST multipart`, `POST no body` ... of the test's last request."""
    if not result.requests:
        return "no request"
    request = result.requests[-1]
    method = str(request["method"])
    if request["content_type"] == "multipart/form-data":
        return f"{method} multipart"
    # The SDK sends a JSON content type with no body on DELETEs and body-less POSTs.
    without_body = not request["content_type"] or not request["length"]
    if method in ("GET", "HEAD", "DELETE") and without_body:
        return method
    if without_body:
        return f"{method} no body"
    return f"{method} {request['content_type'].split('/')[-1]}"


@dataclass
class SpecEndpoint:
    template: str
    pattern: re.Pattern[str]


def spec_endpoints(spec: dict[str, Any]) -> list[SpecEndpoint]:
    endpoints = []
    for template in spec.get("paths", {}):
        regex = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        endpoints.append(SpecEndpoint(template, re.compile(f"^{regex}$")))
    # Literal segments before parameters: /files/search before /files/{id}.
    endpoints.sort(key=lambda endpoint: endpoint.template.count("{"))
    return endpoints


def endpoint_of(result: TestResult, endpoints: list[SpecEndpoint]) -> str:
    if not result.requests:
        return "(none)"
    request = result.requests[-1]
    path = api_path(request["path"])
    for endpoint in endpoints:
        if endpoint.pattern.match(path):
            return f"{request['method']} {endpoint.template}"
    return f"{request['method']} {path}"


# --- the spec's endpoint table ------------------------------------------------------------------

HTTP_METHODS = ("get", "post", "put", "patch", "delete")
ADMIN_SECURITY = "AdminApiKeyAuth"  # the spec's scheme for the organization admin key


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path template, operation) for every operation of the spec."""
    for template, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if method in HTTP_METHODS and isinstance(operation, dict):
                yield method.upper(), template, operation


def prefix_of(template: str) -> str:
    """`/files/{file_id}/content` -> `/files`; spec variants such as `?beta=true` dropped."""
    return "/" + template.split("?")[0].strip("/").split("/")[0]


def is_admin_operation(operation: dict[str, Any]) -> bool:
    return any(ADMIN_SECURITY in scheme for scheme in operation.get("security") or [])


def admin_endpoints(spec: dict[str, Any]) -> list[SpecEndpoint]:
    """Endpoints called with the admin key: /organization/... and /projects/{id}/roles..."""
    templates = {t for _, t, op in operations(spec) if is_admin_operation(op)}
    return [e for e in spec_endpoints(spec) if e.template in templates]


def resolve(spec: dict[str, Any], schema: Any, depth: int = 0) -> dict[str, Any]:
    while isinstance(schema, dict) and "$ref" in schema and depth < 20:
        node: Any = spec
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        schema, depth = node, depth + 1
    return schema if isinstance(schema, dict) else {}


def model_field(spec: dict[str, Any], schema: Any, depth: int = 0) -> str:
    """`required`, `optional` or `none`: does a request body carry a `model` field?"""
    schema = resolve(spec, schema)
    if depth > 6 or not schema:
        return "none"
    if "model" in schema.get("properties", {}):
        return "required" if "model" in schema.get("required", []) else "optional"
    parts = [model_field(spec, sub, depth + 1) for sub in schema.get("allOf", [])]
    if "required" in parts:
        return "required"
    variants = [
        model_field(spec, sub, depth + 1)
        for sub in schema.get("anyOf", []) + schema.get("oneOf", [])
    ]
    if variants and all(v == "required" for v in variants):
        return "required"
    return "optional" if "optional" in parts + variants or "required" in variants else "none"


def request_shape(spec: dict[str, Any], operation: dict[str, Any]) -> str:
    body = resolve(spec, operation.get("requestBody"))
    content = body.get("content", {})
    if not content:
        return "no body"
    kind = "multipart" if "multipart/form-data" in content else "json"
    schema = (content.get("multipart/form-data") or content.get("application/json") or {}).get(
        "schema"
    )
    return f"{kind}, model {model_field(spec, schema)}"


def response_shape(spec: dict[str, Any], operation: dict[str, Any]) -> list[str]:
    """The 2xx content types that are not plain JSON objects: binary, text, SSE, unspecified."""
    shapes = []
    for status, response in operation.get("responses", {}).items():
        if not str(status).startswith("2"):
            continue
        content = resolve(spec, response).get("content", {})
        if not content:
            shapes.append(f"{status} no content type in the spec")
        for content_type, media in content.items():
            schema = resolve(spec, (media or {}).get("schema"))
            if content_type != "application/json":
                shapes.append(content_type)
            elif schema.get("type") == "string":  # file bytes described as a JSON string
                shapes.append("application/json but a string (raw bytes)")
    return sorted(set(shapes))


def describe_spec(spec: dict[str, Any]) -> list[str]:
    """Per top-level prefix: methods; every operation with its request and response shape."""
    order = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    methods: dict[str, set[str]] = defaultdict(set)
    paths: dict[str, set[str]] = defaultdict(set)
    admin_prefixes: set[str] = set()
    lines_multipart, lines_binary, lines_sse, lines_all = [], [], [], []
    for method, template, operation in operations(spec):
        prefix = prefix_of(template)
        methods[prefix].add(method)
        paths[prefix].add(template.split("?")[0])
        admin = is_admin_operation(operation)
        if admin:
            admin_prefixes.add(prefix)
        line = f"{method} {template}"
        shape = request_shape(spec, operation) if method != "GET" else ""
        responses = response_shape(spec, operation)
        if shape.startswith("multipart"):
            lines_multipart.append(f"{line}  ({shape})")
        if "text/event-stream" in responses:
            lines_sse.append(line)
        binary = [r for r in responses if r != "text/event-stream"]
        if binary:
            lines_binary.append(f"{line}  -> {'; '.join(binary)}")
        notes = [n for n in (shape, "ADMIN KEY" if admin else "") if n]
        lines_all.append(f"{line}" + (f"  [{', '.join(notes)}]" if notes else ""))
    lines = ["# top-level prefixes after /v1 (distinct paths): methods; * = admin-key operations"]
    for prefix in sorted(methods):
        used = " ".join(m for m in order if m in methods[prefix])
        star = " *" if prefix in admin_prefixes else ""
        lines.append(f"{prefix} ({len(paths[prefix])}): {used}{star}")
    lines += ["", "# multipart/form-data requests", *lines_multipart]
    lines += ["", "# 2xx responses that are not a JSON object (relay as bytes)", *lines_binary]
    lines += ["", "# responses that may be SSE streams (text/event-stream)", *lines_sse]
    lines += ["", "# every operation [request body, model field; ADMIN KEY]", *lines_all]
    return lines


# --- the report --------------------------------------------------------------------------------


@dataclass
class Comparison:
    regressions: dict[str, list[TestResult]]  # cause [kind] -> tests failing only via proxy
    excluded: list[TestResult]  # admin tests that pass directly and fail via the proxy
    fixed: list[TestResult]  # fail directly, pass through the proxy
    missing: list[str]  # passed directly, never ran via the proxy (timeout)


def compare(direct: Run, proxied: Run) -> Comparison:
    regressions: dict[str, list[TestResult]] = defaultdict(list)
    excluded: list[TestResult] = []
    fixed: list[TestResult] = []
    missing: list[str] = []
    for test_id, before in direct.results.items():
        after = proxied.results.get(test_id)
        if after is None:
            if before.outcome == "passed":
                missing.append(test_id)
            continue
        if before.outcome == "passed" and after.outcome in ("failed", "error"):
            if is_excluded(before):
                excluded.append(after)
            else:
                regressions[f"{failure_cause(after)} [{request_kind(after)}]"].append(after)
        elif before.outcome in ("failed", "error") and after.outcome == "passed":
            fixed.append(after)
    return Comparison(dict(regressions), excluded, fixed, missing)


def count_line(run: Run) -> str:
    counts = run.counts()
    reached = sum(1 for result in run.results.values() if result.requests)
    note = "  TIMED OUT (partial)" if run.timed_out else ""
    return (
        f"{run.label:>8}: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['error']} errors "
        f"({len(run.results)} tests, {reached} sent a request; {run.seconds:.0f} s){note}"
    )


def summary_lines(
    direct: Run, proxied: Run, comparison: Comparison, endpoints: list[SpecEndpoint]
) -> list[str]:
    reached_passing = [r for r in direct.results.values() if r.outcome == "passed" and r.requests]
    counted = [r for r in reached_passing if not is_excluded(r)]
    regressed = sum(len(tests) for tests in comparison.regressions.values())
    proxied_ok = sum(
        1
        for r in counted
        if (after := proxied.results.get(r.id)) is not None and after.outcome == "passed"
    )
    lines = [
        count_line(direct),
        count_line(proxied),
        "",
        f"Tests that reach the mock and pass directly: {len(reached_passing)} "
        f"({len(reached_passing) - len(counted)} of them organization admin, excluded).",
        f"Of the other {len(counted)}: {proxied_ok} pass through the proxy, "
        f"{regressed} fail through it only"
        + (f", {len(comparison.missing)} never ran (timeout)" if comparison.missing else "")
        + ".",
        f"Admin tests failing through the proxy (excluded): {len(comparison.excluded)} "
        f"({by_prefix(comparison.excluded)}).",
    ]
    if comparison.fixed:
        lines.append(f"Fail directly but pass through the proxy: {len(comparison.fixed)}.")
    if not comparison.regressions:
        return lines
    every = [test for tests in comparison.regressions.values() for test in tests]
    lines += ["", f"Pass directly, fail through the proxy, by prefix: {by_prefix(every)}."]
    lines += ["", "Pass directly, fail through the proxy, by cause [last request]:"]
    for cause, tests in sorted(comparison.regressions.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(tests):5d}  {cause}")
        per_endpoint: dict[str, list[TestResult]] = defaultdict(list)
        for test in tests:
            per_endpoint[endpoint_of(test, endpoints)].append(test)
        ranked = sorted(per_endpoint.items(), key=lambda kv: -len(kv[1]))
        top = ", ".join(f"{e} ({len(t)})" for e, t in ranked[:3])
        more = len(ranked) - 3
        lines.append(f"         endpoints: {top}{f', +{more} more' if more > 0 else ''}")
        # Examples from different endpoints: one id per endpoint says more than two.
        for _, endpoint_tests in ranked[:EXAMPLES_PER_GROUP]:
            lines.append(f"         e.g. {endpoint_tests[0].id}")
    return lines


def by_prefix(tests: list[TestResult]) -> str:
    """`/files 120, /responses 80, ...`: the top-level prefix of each test's last request."""
    counts = Counter(
        prefix_of(api_path(test.requests[-1]["path"])) if test.requests else "(none)"
        for test in tests
    )
    return ", ".join(f"{prefix} {n}" for prefix, n in counts.most_common()) or "none"


def full_report(
    direct: Run, proxied: Run, comparison: Comparison, endpoints: list[SpecEndpoint]
) -> list[str]:
    lines = ["# every test that passes directly and fails through the proxy, by cause"]
    for cause, tests in sorted(comparison.regressions.items(), key=lambda kv: -len(kv[1])):
        lines += ["", f"## {cause}: {len(tests)}"]
        by_endpoint: dict[str, list[TestResult]] = defaultdict(list)
        for test in tests:
            by_endpoint[endpoint_of(test, endpoints)].append(test)
        for endpoint, endpoint_tests in sorted(by_endpoint.items()):
            lines.append(f"### {endpoint}: {len(endpoint_tests)}")
            lines += [f"{test.id}" for test in endpoint_tests]
        example = tests[0].message.strip().splitlines()
        lines += ["message of the first:", *(f"    {line}" for line in example[:4])]
    lines += ["", f"# organization admin (excluded): {len(comparison.excluded)}"]
    lines += [f"{test.id}  <- {failure_cause(test)}" for test in comparison.excluded]
    lines += ["", f"# fail directly, pass through the proxy: {len(comparison.fixed)}"]
    lines += [test.id for test in comparison.fixed]
    lines += ["", f"# passed directly, not run through the proxy: {len(comparison.missing)}"]
    lines += comparison.missing
    failing_direct = [r for r in direct.results.values() if r.outcome in ("failed", "error")]
    lines += ["", f"# fail directly (not counted): {len(failing_direct)}"]
    lines += [f"{r.id}  <- {failure_cause(r)}" for r in failing_direct]
    return lines


def load_spec() -> tuple[Path, dict[str, Any]]:
    spec_file = spec_path()
    spec = yaml.load(spec_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    ADMIN[:] = admin_endpoints(spec)
    (CACHE / "paths.txt").write_text("\n".join(describe_spec(spec)) + "\n")
    return spec_file, spec


def run_both(spec_file: Path) -> tuple[Run, Run]:
    """Prism up; the SDK's tests directly; the proxy up; the tests through it; both stopped."""
    prism_port, proxy_port = free_port(), free_port()
    config_path = CACHE / "proxy-config.yaml"
    write_proxy_config(config_path, prism_port, proxy_port)
    prism_args = [str(PRISM_BIN), "mock", str(spec_file), "-h", "127.0.0.1", "-p", str(prism_port)]
    proxy_args = [
        *(str(PROXY_BIN), "serve", "--config", str(config_path)),
        *("--port", str(proxy_port), "--log-level", "warning"),
    ]
    with started("prism", prism_args, CACHE / "prism.log") as prism:
        wait_until_answering(prism, f"http://127.0.0.1:{prism_port}/models", timeout=180)
        direct = run_sdk_tests("direct", f"http://127.0.0.1:{prism_port}")
        with started("proxy", proxy_args, CACHE / "proxy.log") as proxy:
            wait_until_answering(proxy, f"http://127.0.0.1:{proxy_port}/health", timeout=60)
            proxied = run_sdk_tests("proxy", f"http://127.0.0.1:{proxy_port}/v1")
    return direct, proxied


def main(argv: list[str]) -> int:
    overall = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    if not PROXY_BIN.exists():
        raise SuiteError(f"{PROXY_BIN} missing: run `make .venv/.installed` first")
    commit = ensure_sdk_checkout()
    if "--paths-only" in argv:  # the spec's endpoint table, no test run
        load_spec()
        print((CACHE / "paths.txt").read_text(), end="")
        return 0
    ensure_sdk_venv()
    ensure_prism()
    spec_file, spec = load_spec()
    log(f"openai-python {commit[:12]}, spec {spec_file.relative_to(REPO)}")
    if "--report-only" in argv:  # analyse the last run's results again
        direct, proxied = Run("direct", read_results("direct")), Run("proxy", read_results("proxy"))
        if not direct.results or not proxied.results:
            raise SuiteError("--report-only: no results of an earlier run in .cache/sdk-suite/")
    else:
        direct, proxied = run_both(spec_file)
    endpoints = spec_endpoints(spec)
    comparison = compare(direct, proxied)
    summary = summary_lines(direct, proxied, comparison, endpoints)
    header = [
        f"openai-python {commit} tests/api_resources, Prism {PRISM_PACKAGE.rsplit('@', 1)[1]}, "
        f"{WORKERS} xdist workers" + (f", -k {SUBSET!r}" if SUBSET else ""),
        "",
    ]
    report = header + summary + ["", ""] + full_report(direct, proxied, comparison, endpoints)
    (CACHE / "report.txt").write_text("\n".join(report) + "\n")
    print("\n".join(header + summary))
    print(
        f"\nFull lists: {(CACHE / 'report.txt').relative_to(REPO)}; spec endpoints: "
        f"{(CACHE / 'paths.txt').relative_to(REPO)}; total {time.monotonic() - overall:.0f} s"
    )
    if direct.timed_out or proxied.timed_out:
        print("A run hit its timeout: the comparison is partial.")
        return 2
    return 1 if comparison.regressions or comparison.missing else 0


def on_signal(signum: int, _frame: object) -> None:
    # Turn TERM/HUP into an exception so the `with started(...)` blocks stop the children.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        sys.exit(main(sys.argv[1:]))
    except SuiteError as error:
        print(f"sdk-suite: {error}", file=sys.stderr)
        sys.exit(2)
