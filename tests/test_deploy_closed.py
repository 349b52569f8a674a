"""The shipped deployments are closed: client keys from the environment, the balancer
trusted, internal endpoints on the admin port, nothing published beyond this machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from proxy.config import Config, parse_config
from proxy.exposure import refusal

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENV = {"PROXY_CLIENT_KEY": "sk-client-test-0001", "PROXY_STORAGE": "redis://redis:6379"}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_config_path() -> Path:
    [mount] = [v for v in compose()["services"]["proxy"]["volumes"] if "/etc/proxy/" in v]
    return DEPLOY / mount.split(":")[0]


def configmap_text() -> str:
    [configmap] = [
        d for d in yaml.safe_load_all((DEPLOY / "kubernetes/configmap.yaml").read_text()) if d
    ]
    return configmap["data"]["config.yaml"]


def assert_closed(config: Config) -> None:
    [client] = config.clients
    assert client.env_vars == ("PROXY_CLIENT_KEY",)  # from the environment, not the file
    assert config.server.trusted_proxies
    assert config.server.admin_port is not None
    assert not config.server.open
    assert refusal(config, "0.0.0.0") is None


def test_compose_mounts_a_closed_config_that_proxy_check_accepts():
    path = compose_config_path()
    assert path == DEPLOY / "config.yaml"
    config = parse_config(path.read_text(), str(path), ENV)
    assert_closed(config)
    command = compose()["services"]["proxy"]["command"]
    assert int(command[command.index("--admin-port") + 1]) == config.server.admin_port
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PATH": "/usr/bin", **ENV},
    )
    assert result.returncode == 0, result.stderr


def test_compose_publishes_only_on_this_machine():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    env_example = (DEPLOY / ".env.example").read_text()
    assert "PROXY_CLIENT_KEY=" in env_example


def test_kubernetes_config_is_closed_without_a_catch_all_route(tmp_path):
    config = parse_config(configmap_text(), "configmap", ENV)
    assert_closed(config)
    assert all(route.prefix for route in config.routes)
    secret = yaml.safe_load((DEPLOY / "kubernetes/secret.yaml").read_text())
    assert "PROXY_CLIENT_KEY" in secret["stringData"]
    path = tmp_path / "config.yaml"
    path.write_text(configmap_text())
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={"PATH": "/usr/bin", **ENV},
    )
    assert result.returncode == 0, result.stderr


def test_the_image_default_refuses_the_open_bundled_config_and_takes_a_closed_one():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY config.yaml /etc/proxy/config.yaml" in dockerfile
    assert '"--host", "0.0.0.0"' in dockerfile
    bundled = parse_config((ROOT / "config.yaml").read_text(), "config.yaml", {})
    message = refusal(bundled, "0.0.0.0")
    assert message is not None and "clients:" in message
    assert refusal(bundled, bundled.server.host) is None  # make run: loopback, open
    closed = parse_config((DEPLOY / "config.yaml").read_text(), "deploy/config.yaml", ENV)
    assert refusal(closed, "0.0.0.0") is None
