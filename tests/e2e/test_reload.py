"""Hot reload of a running proxy process: by file change and by SIGHUP."""

from __future__ import annotations

import signal
import time

import httpx

from tests.conftest import MockUpstream, ProxyProcess, start_proxy

KEY_A = "sk-reload-aaaaaaaaaaaa0001"
KEY_A2 = "sk-reload-aaaaaaaaaaaa0002"
KEY_B = "sk-reload-bbbbbbbbbbbb0003"


def config(
    mock: MockUpstream,
    alias: str = "kimi-k2-0711-preview",
    key_a: str = KEY_A,
    extra_route: str = "",
    poll: str = "0.2",
) -> str:
    return f"""
server: {{config_poll_interval: {poll}}}
throttle: {{reconnect: {{enabled: false}}}}
backends:
  mock:
    base_url: {mock.url}/v1
    keys:
      - {{id: key-a, key: "{key_a}"}}
      - {{id: key-b, key: "{KEY_B}"}}
aliases:
  kimi-k2: {alias}
routes:
  - {{prefix: "kimi-", backend: mock}}
{extra_route}
"""


def post(proxy: ProxyProcess, model: str) -> httpx.Response:
    return httpx.post(f"{proxy.base_url}/chat/completions", json={"model": model}, timeout=10)


def wait_for(check, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def metric(proxy: ProxyProcess, line_start: str) -> float:
    for line in httpx.get(f"{proxy.url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return -1


def test_file_change_reloads_aliases_and_routes_while_a_stream_completes(upstream, tmp_path):
    proxy = start_proxy(config(upstream), tmp_path)
    path = tmp_path / "config.yaml"
    try:
        # A stream that runs across the reload: opened on the old config, read to the end after.
        body = {"model": "kimi-k2", "stream": True, "mock": {"chunks": 20, "chunk_delay": 0.1}}
        with httpx.stream(
            "POST", f"{proxy.base_url}/chat/completions", json=body, timeout=10
        ) as through:
            chunks = through.iter_raw()
            received = next(chunks)
            path.write_text(
                config(
                    upstream,
                    alias="kimi-k2-0905-preview",
                    extra_route='  - {prefix: "new-", backend: mock}',
                )
            )
            assert wait_for(
                lambda: post(proxy, "kimi-k2").json().get("model") == "kimi-k2-0905-preview"
            )
            assert post(proxy, "new-model").status_code == 200  # the new route
            received += b"".join(chunks)
        with httpx.stream(
            "POST",
            f"{upstream.url}/v1/chat/completions",
            headers={"authorization": "Bearer x"},
            json={**body, "model": "kimi-k2-0711-preview"},
        ) as direct:
            expected = direct.read()
        assert received == expected  # finished intact, on the config it began with
        assert metric(proxy, 'llm_proxy_config_reloads_total{result="success"}') == 1
    finally:
        proxy.stop()


def test_key_state_resets_for_changed_keys_and_stays_for_unchanged_ones(upstream, tmp_path):
    proxy = start_proxy(config(upstream), tmp_path)
    path = tmp_path / "config.yaml"
    try:
        upstream.configure(invalid_keys=[KEY_A, KEY_B])
        assert post(proxy, "kimi-k2").status_code == 503  # both keys tried, both refused
        assert post(proxy, "kimi-k2").status_code == 503  # both out of rotation
        upstream.configure(invalid_keys=[KEY_B])  # KEY_B is still bad; KEY_A2 will be good
        path.write_text(config(upstream, key_a=KEY_A2))
        assert wait_for(lambda: post(proxy, "kimi-k2").status_code == 200)
        upstream.reset()
        for _ in range(4):
            assert post(proxy, "kimi-k2").headers["x-proxy-key"] == "key-a"
        # key-a's new value started fresh; key-b kept its state and was never tried again.
        assert {r["key"] for r in upstream.requests() if r["method"] == "POST"} == {KEY_A2}
    finally:
        proxy.stop()


def test_a_broken_file_keeps_the_config_in_force_and_is_reported(upstream, tmp_path):
    proxy = start_proxy(config(upstream), tmp_path)
    path = tmp_path / "config.yaml"
    try:
        path.write_text(config(upstream).replace("backend: mock", "backend: nowhere"))
        assert wait_for(
            lambda: metric(proxy, 'llm_proxy_config_reloads_total{result="failure"}') == 1
        )
        response = post(proxy, "kimi-k2")
        assert response.status_code == 200
        assert response.json()["model"] == "kimi-k2-0711-preview"
        assert "config reload (file changed) failed; the config in force stays" in proxy.log()
        assert "routes[0].backend: unknown backend 'nowhere'" in proxy.log()
        # Fixing the file is picked up again.
        path.write_text(config(upstream, alias="kimi-k2-turbo-preview"))
        assert wait_for(lambda: post(proxy, "kimi-k2").json()["model"] == "kimi-k2-turbo-preview")
    finally:
        proxy.stop()


def test_sighup_reloads_when_polling_is_off(upstream, tmp_path):
    proxy = start_proxy(config(upstream, poll="0"), tmp_path)
    path = tmp_path / "config.yaml"
    try:
        path.write_text(config(upstream, alias="kimi-k2-turbo-preview", poll="0"))
        time.sleep(1.0)
        assert post(proxy, "kimi-k2").json()["model"] == "kimi-k2-0711-preview"  # not yet
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: post(proxy, "kimi-k2").json()["model"] == "kimi-k2-turbo-preview")
        assert proxy.process.poll() is None  # still the same process
    finally:
        proxy.stop()
