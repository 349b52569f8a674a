"""A real Prometheus scrapes a running proxy; every PromQL in the shipped dashboard returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import httpx
import pytest

from tests.conftest import ROOT, MockUpstream, ProxyProcess, free_port, start_proxy
from tests.e2e.test_observability import ADMIN, CLIENT, config

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_dashboard_is_importable_with_a_datasource_variable():
    board = json.loads(DASHBOARD.read_text())
    variable, *filters = board["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    assert [f["name"] for f in filters] == ["backend", "model", "client"]
    for name in ("backend", "model", "client"):  # every panel whose metric has the label
        for expr in dashboard_queries():
            if "llm_proxy_requests_total" in expr or "llm_proxy_cost_usd_total" in expr:
                assert f'{name}=~"${name}"' in expr, expr
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"])
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "request rate",
        "error rate",
        "latency",
        "first token",
        "overhead",
        "tokens",
        "streams",
        "throttled",
        "key",
        "breaker",
    ):
        assert topic in titles, topic


@pytest.fixture
def prometheus(tmp_path, upstream: MockUpstream):
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus is not installed and could not be (make test installs Debian's)")
    proxy = start_proxy(config(upstream), tmp_path)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: proxy\n    static_configs: [{{targets: ['127.0.0.1:{proxy.port}']}}]\n"
        # With clients: the main port's /metrics needs the admin key.
        f"    authorization: {{credentials: '{ADMIN}'}}\n"
    )
    process = subprocess.Popen(
        [
            exe,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready")
        wait_for_scraping(url)
        yield url, proxy
    finally:
        process.terminate()
        process.wait(timeout=10)
        proxy.stop()


def wait_for_scraping(url: str) -> None:
    """Prometheus applies new targets at most every 5 s: wait until ours is scraped."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        targets = httpx.get(f"{url}/api/v1/targets").json()["data"]["activeTargets"]
        if targets and targets[0]["health"] == "up":
            return
        time.sleep(0.25)
    pytest.fail(f"prometheus never scraped the proxy: {targets}")


def drive_traffic(proxy: ProxyProcess) -> None:
    headers = {"authorization": f"Bearer {CLIENT}"}
    url = f"{proxy.base_url}/chat/completions"
    for body in (
        {"model": "obs"},
        {"model": "obs", "stream": True, "stream_options": {"include_usage": True}},
        {"model": "obs-err", "mock": {"status": 500}},
        {"model": "obs-err"},  # throttled: reconnect
    ):
        httpx.post(url, json=body, headers=headers)


def test_every_dashboard_query_returns_data_from_a_real_scrape(prometheus):
    url, proxy = prometheus
    drive_traffic(proxy)
    time.sleep(2.5)  # a few scrapes, so rate() has two points
    drive_traffic(proxy)
    time.sleep(2.5)
    empty = []
    for expr in dashboard_queries():
        query = expr.replace("$__rate_interval", "1m")
        for name in ("backend", "model", "client"):  # each variable at its "All"
            query = query.replace(f"${name}", ".*")
        result = httpx.get(f"{url}/api/v1/query", params={"query": query}).json()
        assert result["status"] == "success", (expr, result)
        if not result["data"]["result"]:
            empty.append(expr)
    assert empty == []
    for name in ("backend", "model", "client"):  # the variables' values come from the scrape
        values = httpx.get(f"{url}/api/v1/label/{name}/values").json()["data"]
        assert values, name
