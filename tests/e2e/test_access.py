"""Who may see what: internal endpoints on the admin listener, /v1/models behind client
keys, and a log that is JSON on every line when asked for."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import MockUpstream, ProxyProcess, free_port, start_proxy

UPSTREAM_KEY = "sk-access-aaaaaaaaaaaaaaaa0001"
ALICE = "sk-alice-000000000000000000a1"
BOB = "sk-bob-0000000000000000000b2"
ADMIN = "adm-access-00000000000000099"


def config(mock: MockUpstream, admin_port: int | None) -> str:
    admin = f", admin_port: {admin_port}" if admin_port is not None else ""
    return f"""
server: {{admin_key: "{ADMIN}"{admin}}}
clients:
  - {{id: alice, key: "{ALICE}", models: ["kimi-*"]}}
  - {{id: bob, key: "{BOB}"}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys: [{{id: main, key: "{UPSTREAM_KEY}"}}]
    models: [kimi-k2-0711-preview, gpt-4o-mini]
aliases:
  kimi-k2: kimi-k2-0711-preview
  fast: kimi-k2
  quick: gpt-4o-mini
routes:
  - {{prefix: "kimi-", backend: mock}}
  - {{prefix: "gpt-", backend: mock}}
"""


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def split(
    mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory, admin_port: int
) -> Iterator[ProxyProcess]:
    """A proxy with its internal endpoints on a second listener; JSON logs."""
    tmp = tmp_path_factory.mktemp("split")
    proxy = start_proxy(config(mock_upstream, admin_port), tmp, extra_args=("--log-format", "json"))
    yield proxy
    proxy.stop()


# ---------------------------------------------------------------- admin listener


def test_internal_endpoints_are_absent_on_the_main_port(split):
    for path in ("/metrics", "/admin/status"):
        response = httpx.get(split.url + path, headers=bearer(ADMIN))
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "unknown_url"
    assert httpx.get(f"{split.url}/health").status_code == 200


def test_internal_endpoints_answer_on_the_admin_port_and_nothing_else_does(split, admin_port):
    admin = f"http://127.0.0.1:{admin_port}"
    metrics = httpx.get(f"{admin}/metrics")
    assert metrics.status_code == 200
    assert "llm_proxy_requests_total" in metrics.text or "llm_proxy_" in metrics.text
    status = httpx.get(f"{admin}/admin/status", headers=bearer(ADMIN))
    assert status.status_code == 200 and "mock" in status.json()["backends"]
    assert httpx.get(f"{admin}/admin/status").status_code == 401  # the admin key still counts
    assert httpx.get(f"{admin}/health").status_code == 200
    assert httpx.get(f"{admin}/ready").status_code == 200
    forwarded = httpx.post(
        f"{admin}/v1/chat/completions",
        json={"model": "kimi-k2", "messages": []},
        headers=bearer(BOB),
    )
    assert forwarded.status_code == 404  # the API is not served on the internal listener
    assert forwarded.json()["error"]["code"] == "unknown_url"


def test_without_admin_port_the_internal_endpoints_stay_on_the_main_port(mock_upstream, tmp_path):
    proxy = start_proxy(config(mock_upstream, None), tmp_path)
    try:
        # With clients: the main port's metrics are the operator's, behind the admin key.
        assert httpx.get(f"{proxy.url}/metrics").status_code == 401
        assert httpx.get(f"{proxy.url}/metrics", headers=bearer("wrong")).status_code == 401
        metrics = httpx.get(f"{proxy.url}/metrics", headers=bearer(ADMIN))
        assert metrics.status_code == 200 and "llm_proxy_requests_total" in metrics.text
        assert httpx.get(f"{proxy.url}/admin/status", headers=bearer(ADMIN)).status_code == 200
    finally:
        proxy.stop()


def test_admin_port_with_two_workers(mock_upstream, tmp_path):
    admin_port = free_port()
    proxy = start_proxy(
        config(mock_upstream, admin_port),
        tmp_path,
        extra_args=("--workers", "2", "--log-format", "json"),
    )
    try:
        admin = f"http://127.0.0.1:{admin_port}"
        for _ in range(4):  # whichever worker takes the connection
            assert httpx.get(f"{proxy.url}/metrics").status_code == 404
            assert httpx.get(f"{admin}/metrics").status_code == 200
            models = httpx.get(f"{proxy.base_url}/models", headers=bearer(BOB))
            assert models.status_code == 200
    finally:
        proxy.stop()
    assert_every_line_is_json(proxy.log_path)


# ---------------------------------------------------------------- /v1/models


def test_models_need_a_client_key(split):
    for path in ("/models", "/models/kimi-k2"):
        for headers in ({}, bearer("sk-not-a-client-key-000000")):
            response = httpx.get(split.base_url + path, headers=headers)
            assert response.status_code == 401, (path, headers)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["code"] == "invalid_api_key"
            assert response.headers["x-should-retry"] == "false"


def test_models_list_only_what_the_client_may_use(split):
    def ids(key: str) -> set[str]:
        response = httpx.get(f"{split.base_url}/models", headers=bearer(key))
        assert response.status_code == 200
        return {m["id"] for m in response.json()["data"]}

    everything = {"kimi-k2", "fast", "quick", "kimi-k2-0711-preview", "gpt-4o-mini"}
    assert ids(BOB) == everything
    # Alice may use kimi-*: the aliases that resolve to a kimi model count too.
    assert ids(ALICE) == {"kimi-k2", "fast", "kimi-k2-0711-preview"}
    hidden = httpx.get(f"{split.base_url}/models/gpt-4o-mini", headers=bearer(ALICE))
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
    shown = httpx.get(f"{split.base_url}/models/fast", headers=bearer(ALICE))
    assert shown.status_code == 200 and shown.json()["id"] == "fast"


def test_other_methods_on_models_get_an_openai_shaped_405(split):
    for method in ("PUT", "PATCH", "POST"):
        response = httpx.request(method, f"{split.base_url}/models/kimi-k2", headers=bearer(BOB))
        assert response.status_code == 405, method
        assert response.headers["content-type"] == "application/json"
        assert response.headers["allow"] == "GET, DELETE"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "method_not_allowed"
    assert httpx.delete(f"{split.url}/health").status_code == 405


# ---------------------------------------------------------------- logs


def assert_every_line_is_json(log_path: Path) -> list[dict[str, object]]:
    lines = log_path.read_text().splitlines()
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def test_with_json_format_every_line_the_process_writes_is_json(mock_upstream, tmp_path):
    config_text = config(mock_upstream, None)
    proxy = start_proxy(config_text, tmp_path, extra_args=("--log-format", "json"))
    try:
        httpx.get(f"{proxy.base_url}/models")  # 401
        httpx.get(f"{proxy.url}/v1/%0Aforged%20line")  # a CR/LF in the path
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"NOT HTTP\x00\r\n\r\n")  # uvicorn's own warning, then 400
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        # A reload that fails (an invalid file) and one that succeeds.
        path = tmp_path / "config.yaml"
        path.write_text("backends: [\n")
        time.sleep(1.5)
        path.write_text(config_text + "\n# changed\n")
        time.sleep(1.5)
    finally:
        proxy.stop()
    lines = assert_every_line_is_json(proxy.log_path)
    messages = " ".join(str(line.get("message", "")) for line in lines)
    assert "Application startup complete" in messages  # uvicorn's own lines
    assert "Invalid HTTP request received" in messages
    assert "front door" in messages  # the proxy's start-up lines
    assert any(line.get("logger") == "proxy.reload" for line in lines)  # reload lines
    assert "Finished server process" in messages  # and the shutdown


def test_text_format_keeps_its_layout(mock_upstream, tmp_path):
    proxy = start_proxy(config(mock_upstream, None), tmp_path, extra_args=("--log-format", "text"))
    proxy.stop()
    startup = [line for line in proxy.log().splitlines() if "front door:" in line]
    assert len(startup) == 1
    assert " INFO proxy.server: front door: at most " in startup[0]
