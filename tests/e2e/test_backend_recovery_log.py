"""A backend down at start-up: the warning names host:port (no aiohttp "ssl:default" for an
http:// URL), and its coming back is said once."""

from __future__ import annotations

import time

from tests.conftest import free_port, start_mock, start_proxy


def wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_backend_that_comes_back_gets_one_line(tmp_path):
    port = free_port()
    config = f"""
backends:
  late:
    base_url: http://127.0.0.1:{port}/v1
    keys: [{{id: late-key, key: "sk-late-000000000000"}}]
routes:
  - {{prefix: "", backend: late}}
"""
    proxy = start_proxy(config, tmp_path, extra_args=("--log-format", "text"))
    mock = None
    try:
        assert wait_for(lambda: "backend late: not answering" in proxy.log(), 10)
        assert f"cannot connect to 127.0.0.1:{port}" in proxy.log()
        assert "ssl:default" not in proxy.log()
        mock = start_mock("--port", str(port))
        assert wait_for(lambda: "backend late: answering again" in proxy.log(), 10)
        time.sleep(1)
        assert proxy.log().count("backend late: answering again") == 1
    finally:
        proxy.stop()
        if mock is not None:
            mock.process.terminate()
            mock.process.wait(timeout=5)
