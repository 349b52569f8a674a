"""`proxy serve` is closed by default off loopback, a reload cannot open it, a port in use
is named, and a reload is one INFO line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT, MockUpstream, free_port, start_proxy

CLIENT_KEY = "sk-client-closed-0001"


def config(mock: MockUpstream, clients: bool = True, alias: str = "kimi-k2-0711-preview") -> str:
    section = f'clients: [{{id: app, key: "{CLIENT_KEY}"}}]\n' if clients else ""
    return f"""
server: {{config_poll_interval: 0.2}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: key-a, key: "sk-closed-aaaaaaaaaaaa"}}]
aliases:
  kimi-k2: {alias}
routes:
  - {{prefix: "kimi-", backend: mock}}
{section}"""


def serve(config_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", config_path, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_no_clients_off_loopback_is_refused_with_how_to_fix(upstream, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(config(upstream, clients=False))
    result = serve(str(path), "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "clients:" in result.stderr and "server.open: true" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_open_true_serves_off_loopback_on_purpose(upstream, tmp_path):
    text = config(upstream, clients=False).replace("server: {", "server: {open: true, ")
    proxy = start_proxy(text, tmp_path, extra_args=("--host", "0.0.0.0"))
    try:
        assert httpx.get(f"{proxy.url}/health").status_code == 200
    finally:
        proxy.stop()


def wait_for(check, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_reload_that_drops_clients_off_loopback_is_refused(upstream, tmp_path):
    proxy = start_proxy(config(upstream), tmp_path, extra_args=("--host", "0.0.0.0"))
    path = tmp_path / "config.yaml"
    chat = f"{proxy.base_url}/chat/completions"
    try:
        path.write_text(config(upstream, clients=False))
        assert wait_for(lambda: "config reload (file changed) failed" in proxy.log())
        assert "refusing to listen on 0.0.0.0" in proxy.log()
        # The closed config stays in force: no key, no answer.
        assert httpx.post(chat, json={"model": "kimi-k2"}).status_code == 401
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        assert httpx.post(chat, json={"model": "kimi-k2"}, headers=auth).status_code == 200
    finally:
        proxy.stop()


def test_a_reload_is_one_info_line(upstream, tmp_path):
    proxy = start_proxy(config(upstream), tmp_path, extra_args=("--log-format", "text"))
    path = tmp_path / "config.yaml"
    try:
        before = len(proxy.log().splitlines())
        path.write_text(config(upstream, alias="kimi-k2-turbo-preview"))
        assert wait_for(lambda: "config reloaded" in proxy.log())
        time.sleep(0.5)  # anything the reload would log after its line
        new = [line for line in proxy.log().splitlines()[before:] if "proxy" in line]
        reload_lines = [line for line in new if "config reloaded" in line]
        assert len(reload_lines) == 1, new
        assert "INFO" in reload_lines[0] and "WARNING" not in reload_lines[0]
        assert "mock 1 key" in reload_lines[0] and "1 client" in reload_lines[0]
        assert not [line for line in new if "backend mock:" in line], new
    finally:
        proxy.stop()


def test_a_port_in_use_is_named_without_a_traceback(upstream, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(config(upstream))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(str(path), "--port", str(port), "--log-format", "text")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1 port {port}: already in use" in output
    assert "Traceback" not in output


def test_with_clients_and_an_admin_port_metrics_are_only_there(upstream, tmp_path):
    admin_port = free_port()
    proxy = start_proxy(config(upstream), tmp_path, extra_args=("--admin-port", str(admin_port)))
    try:
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        assert httpx.get(f"{proxy.url}/metrics", headers=auth).status_code == 404
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics")
        assert metrics.status_code == 200 and "llm_proxy_" in metrics.text
    finally:
        proxy.stop()
