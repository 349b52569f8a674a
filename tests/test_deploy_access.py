"""The shipped deployments keep /metrics and /admin internal: nginx forwards only /v1/ and
/health, and every scraper (compose Prometheus, the ServiceMonitor) uses the admin port."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


def one(path: Path) -> dict:
    [document] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return document


def test_nginx_forwards_only_the_api_and_health():
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    blocks = dict(re.findall(r"location\s+([^{]+?)\s*\{(.*?)\n    \}", text, re.S))
    forwarded = {where for where, body in blocks.items() if "proxy_pass" in body}
    assert forwarded == {"/v1/", "= /health"}
    assert "return 404" in blocks["/"] and "proxy_pass" not in blocks["/"]
    assert "9091" not in text.split("upstream llm_proxy")[1].split("}")[0]


def test_compose_prometheus_scrapes_the_admin_port_that_compose_sets():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    command = compose["services"]["proxy"]["command"]
    admin_port = int(command[command.index("--admin-port") + 1])
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["port"] == admin_port
    assert "ports" not in compose["services"]["proxy"]  # nothing of the proxy is published


def test_kubernetes_scrapes_the_admin_port_and_the_api_service_does_not_expose_it():
    config = parse_config(one(K8S / "configmap.yaml")["data"]["config.yaml"], "configmap", {})
    [container] = one(K8S / "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port, "admin": config.server.admin_port}
    api = one(K8S / "service.yaml")
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"]
    internal = one(K8S / "service-internal.yaml")
    assert [p["targetPort"] for p in internal["spec"]["ports"]] == ["admin"]
    monitor = one(K8S / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == internal["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"] != api["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    # Probes stay on the API port: they check what clients use (and pass at the cap).
    assert container["readinessProbe"]["httpGet"]["port"] == "http"


@pytest.mark.e2e  # runs make
def test_make_run_takes_port_and_config_and_installs_no_test_tools():
    dry = subprocess.run(
        ["make", "-n", "-B", "run", "PORT=9123", "CONFIG=other.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout
    assert "proxy serve --config other.yaml --port 9123" in commands
    # Running installs the running lock only, every package checked against its hash.
    assert "--require-hashes -r requirements/run.txt" in commands
    assert "requirements/dev.txt" not in commands
    test = subprocess.run(
        ["make", "-n", "-B", "test"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert "--require-hashes -r requirements/dev.txt" in test.stdout
    assert "pytest" in test.stdout and "ruff check" in test.stdout
