"""`proxy check` and `proxy serve` as a user runs them: exit codes and what they print."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import (
    KEYS_ENV,
    ROOT,
    STARTUP_DEADLINE,
    free_port,
    mock_config,
    start_proxy,
)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=30,
    )


def test_check_prints_the_resolved_routing_table_and_exits_0():
    result = run(
        "check", "--config", "config.yaml", env={"MOONSHOT_API_KEY": "sk-moonshot-abcd1234"}
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "config.yaml: valid" in out
    assert "moonshot  https://api.moonshot.ai/v1" in out
    assert "key kimi-main: set (sk-…1234)" in out
    assert "key openai-main: MISSING: set OPENAI_API_KEY" in out
    assert "kimi-k2 -> kimi-k2-0711-preview  (moonshot as kimi-k2-0711-preview)" in out
    assert "'moonshot/*' -> moonshot  (prefix stripped)" in out
    assert "'gpt-*' -> openai  (key openai-main)" in out
    assert "sk-moonshot-abcd1234" not in out


def test_check_of_an_invalid_file_exits_2_with_file_place_and_reason(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "backends:\n  a: {base_url: 'http://x/v1', keys: []}\n"
        "routes:\n  - {prefix: '', backend: b}\n"
    )
    result = run("check", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {bad}:4: routes[0].backend: unknown backend 'b' (known: a)"
    )
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_invalid_file_the_same_way(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  a: {base_url: 'not a url'}\n")
    result = run("serve", "--config", str(bad), "--port", "1")
    assert result.returncode == 2
    assert "backends.a.base_url: bad URL 'not a url'" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_of_a_missing_file_exits_2(tmp_path):
    result = run("check", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read file" in result.stderr


def test_shipped_config_starts_with_no_keys_and_names_the_missing_variables(tmp_path):
    proxy = start_proxy((ROOT / "config.yaml").read_text(), tmp_path)
    try:
        c = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        try:
            c.chat.completions.create(model="kimi-k2", messages=[])
            raise AssertionError("expected a 503")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503
            assert "MOONSHOT_API_KEY" in exc.message
        log = proxy.log()
        assert "backend openai" in log and "set OPENAI_API_KEY" in log
        assert "backend moonshot" in log and "set MOONSHOT_API_KEY" in log
    finally:
        proxy.stop()


def test_serve_with_two_workers_answers_on_one_port(mock_upstream, tmp_path):
    proxy = start_proxy(mock_config(mock_upstream), tmp_path, KEYS_ENV, ("--workers", "2"))
    try:
        for _ in range(6):
            response = httpx.post(f"{proxy.base_url}/chat/completions", json={"model": "kimi-k2"})
            assert response.status_code == 200
    finally:
        proxy.stop()
    assert proxy.process.returncode == 0
    assert (
        "2 workers with storage memory://: rate limits and reconnect backoff are counted "
        "per worker" in proxy.log()
    )


def test_serve_refuses_an_admin_port_equal_to_the_main_port(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "server: {admin_port: 18999}\n"
        "backends:\n  a: {base_url: 'http://127.0.0.1:9/v1', keys: [{id: k, key: sk-x}]}\n"
        "routes:\n  - {prefix: '', backend: a}\n"
    )
    result = run("serve", "--config", str(config), "--port", "18999", "--log-format", "text")
    assert result.returncode == 2
    assert "server.admin_port 18999 is the main port too" in result.stderr


def test_serve_admin_port_flag_moves_the_internal_endpoints(mock_upstream, tmp_path):
    admin_port = free_port()
    proxy = start_proxy(
        mock_config(mock_upstream), tmp_path, KEYS_ENV, ("--admin-port", str(admin_port))
    )
    try:
        assert httpx.get(f"{proxy.url}/metrics").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{admin_port}/metrics").status_code == 200
    finally:
        proxy.stop()
    assert f"internal endpoints (/metrics, /admin/*) on http://127.0.0.1:{admin_port}" in (
        proxy.log()
    )


def test_serve_with_json_logs_reports_an_invalid_config_as_json(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  a: {base_url: 'not a url'}\n")
    result = run("serve", "--config", str(bad), "--log-format", "json")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error"
    assert "backends.a.base_url: bad URL 'not a url'" in entry["message"]


def start_with_open_files(tmp_path, soft: int, hard: int) -> str:
    """Start `proxy serve` under the given RLIMIT_NOFILE; return its start-up log."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "backends:\n  a: {base_url: 'http://127.0.0.1:9/v1', keys: [{id: k, key: sk-x}]}\n"
        "routes:\n  - {prefix: '', backend: a}\n"
    )
    port = free_port()
    log_path = tmp_path / "serve.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)],
            stderr=log_file,
            cwd=ROOT,
            preexec_fn=limit,
        )
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while "Application startup complete" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
    return log_path.read_text()


def test_serve_raises_the_open_file_limit_to_the_hard_limit(tmp_path):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 8192:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to show")
    log = start_with_open_files(tmp_path, 1024, 8192)
    assert "at most 2048 connections per process" in log
    assert "open-file limit 8192" in log


def test_serve_keeps_the_connection_cap_under_what_the_open_files_allow(tmp_path):
    log = start_with_open_files(tmp_path, 600, 600)
    # (600 - 256 spare - 64 probe slots) / 2 descriptors per proxied connection
    assert "server.max_connections 2048 is more than 600 open files allow" in log
    assert "at most 140 connections per process" in log
