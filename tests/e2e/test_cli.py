"""`proxy check` and `proxy serve` as a user runs them: exit codes and what they print."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai

from tests.conftest import KEYS_ENV, ROOT, mock_config, start_proxy


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
