"""Broken config files as a user meets them: `proxy check` / `proxy serve` exit 2 with one clean
line per problem, never a traceback, and files built to hurt the process are refused fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Runs the CLI in a child that reports its own peak memory on its last stderr line.
MEASURED = (
    "import resource, sys\n"
    "from proxy.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run(*args: str) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """The finished process, its peak memory in KiB and its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    elapsed = time.perf_counter() - started
    *lines, peak = result.stderr.splitlines()
    result.stderr = "\n".join(lines)
    return result, int(peak), elapsed


@pytest.fixture(scope="module")
def baseline() -> tuple[int, float]:
    """Peak memory and time of checking the shipped config: what any run costs."""
    result, peak, elapsed = run("check", "--config", "config.yaml")
    assert result.returncode == 0, result.stderr
    return peak, elapsed


def write(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def bomb() -> str:
    levels = "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    return 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + levels


@pytest.mark.serial  # its time is compared with a baseline run
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (bomb(), ":5: more than 50000 values once aliases are expanded"),
        ("a: &x\n  b: [*x]\n", ":1: an alias refers to a value that contains it"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", ":1: nested deeper than 32 levels"),
        (
            "a: " + "[" * 10**5 + "]" * 10**5 + "\n",
            ":1: invalid YAML: exceeded maximum nesting depth",
        ),
        (b"backends:\n  a: {base_url: '\xff\xfe'}\n", ":2: not UTF-8 text: byte 0xff at offset 27"),
        ("# " + "x" * (2 * 1024 * 1024), ": file too large: over 1024 KiB"),
    ],
    ids=[
        "billion-laughs",
        "recursion",
        "deep-nesting",
        "very-deep-nesting",
        "not-utf8",
        "too-large",
    ],
)
@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_file_built_to_hurt_is_refused_fast_in_little_memory(
    tmp_path, baseline, command, content, message
):
    path = write(tmp_path, content)
    result, peak, elapsed = run(command, "--config", path)
    assert result.returncode == 2
    said = result.stderr
    if command == "serve":  # not on a terminal: serve's log lines are JSON
        said = json.loads(said)["message"]
    assert said == f"error: {path}{message}"
    assert result.stdout == ""
    base_peak, base_elapsed = baseline
    assert peak - base_peak < 50 * 1024  # KiB
    assert elapsed < base_elapsed + 1.0


def test_every_problem_is_printed_one_per_line_and_as_json(tmp_path):
    path = write(
        tmp_path,
        "backends:\n"
        "  a: {base_url: 'http://a/v1', timeout: {read: .nan}}\n"
        "  a: {base_url: 'http://b/v1'}\n"
        "routes:\n"
        "  - {prefix: x, backend: b, strip: true}\n",
    )
    result, _, _ = run("check", "--config", path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {path}:2: backends.a.timeout.read: expected a finite number, got nan",
        f"error: {path}:3: backends.a: duplicate key 'a' (first at line 2)",
        f"error: {path}:5: routes[0].backend: unknown backend 'b' (known: a)",
        f"error: {path}:5: routes[0].strip: unknown field, did you mean 'strip_prefix'? "
        "(known: affinity, backend, deployments, fallback, key, max_attempts, prefix, "
        "request_rewrite, strategy, strip_prefix)",
    ]
    result, _, _ = run("check", "--json", "--config", path)
    report = json.loads(result.stdout)
    assert report["valid"] is False
    assert [(e["line"], e["place"]) for e in report["errors"]] == [
        (2, "backends.a.timeout.read"),
        (3, "backends.a"),
        (5, "routes[0].backend"),
        (5, "routes[0].strip"),
    ]
    assert report["error"] == report["errors"][0]


def test_proxy_schema_prints_the_committed_schema():
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "schema"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0
    assert result.stdout == (ROOT / "config.schema.json").read_text()
