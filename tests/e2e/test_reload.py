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


HOSTILE_FILES = {
    "a byte that is not UTF-8": lambda good: good.encode() + b"# \xff\xfe\n",
    "20,000-level nesting": lambda good: (good + "x: " + "[" * 20_000 + "]" * 20_000).encode(),
    "a storage URI that cannot be used": lambda good: (
        'storage: "redis://:bad:port"\n' + good
    ).encode(),
}


def test_the_watcher_survives_any_file_and_picks_up_the_next_valid_one(upstream, tmp_path):
    proxy = start_proxy(config(upstream), tmp_path)
    path = tmp_path / "config.yaml"
    failure = 'llm_proxy_config_reloads_total{result="failure"}'
    try:
        for count, (what, make) in enumerate(HOSTILE_FILES.items(), start=1):
            path.write_bytes(make(config(upstream, alias="kimi-k2-turbo-preview")))
            assert wait_for(lambda n=count: metric(proxy, failure) == n), what
            # The config in force stays, and the event loop was never held up.
            started = time.perf_counter()
            assert post(proxy, "kimi-k2").json()["model"] == "kimi-k2-0711-preview", what
            assert time.perf_counter() - started < 0.5, what
        log = proxy.log()
        assert "not UTF-8 text" in log
        assert "maximum nesting depth" in log
        assert "storage: unusable Redis URL" in log
        assert log.count("config reload (file changed) failed; the config in force stays") == 3
        # SIGHUP goes through the same guarded path: counted, the process lives on.
        proxy.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: metric(proxy, failure) == 4)
        assert "config reload (SIGHUP) failed; the config in force stays" in proxy.log()
        assert proxy.process.poll() is None
        # A valid file is picked up again.
        path.write_text(config(upstream, alias="kimi-k2-turbo-preview"))
        assert wait_for(lambda: post(proxy, "kimi-k2").json()["model"] == "kimi-k2-turbo-preview")
        assert metric(proxy, 'llm_proxy_config_reloads_total{result="success"}') == 1
    finally:
        proxy.stop()


def test_a_reload_applies_new_breaker_bounds_to_the_breaker_it_keeps(upstream, tmp_path):
    breaker = "    breaker: {failures: 1, min_open: 30s, max_open: 30s}\n"
    first = config(upstream).replace("    keys:\n", breaker + "    keys:\n", 1)
    proxy = start_proxy(first, tmp_path)
    path = tmp_path / "config.yaml"
    try:
        body = {"model": "kimi-k2", "mock": {"status": 500}}
        assert httpx.post(f"{proxy.base_url}/chat/completions", json=body).status_code == 500
        refused = post(proxy, "kimi-k2")
        assert refused.json()["error"]["code"] == "backend_unavailable"
        assert float(refused.headers["retry-after"]) > 20  # open for 30 s
        # A new max_open of 1 s applies to the circuit that is open now (the model's: its
        # 5xx): it ends by time, and the next request probes and closes it.
        path.write_text(first.replace("min_open: 30s, max_open: 30s", "min_open: 1s, max_open: 1s"))
        assert wait_for(
            lambda: metric(proxy, 'llm_proxy_config_reloads_total{result="success"}') == 1
        )
        started = time.monotonic()
        assert wait_for(lambda: post(proxy, "kimi-k2").status_code == 200, seconds=4)
        assert time.monotonic() - started < 2.5
    finally:
        proxy.stop()
