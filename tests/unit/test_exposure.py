"""Closed by default: which addresses count as loopback, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Config, load_config
from proxy.exposure import is_loopback, refusal


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("proxy.example.com", False),
        ("", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _config(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "c.yaml"
    path.write_text(
        "backends:\n  b: {base_url: http://127.0.0.1:1/v1, keys: [{id: k, key: x}]}\n" + extra
    )
    return load_config(str(path))


def test_open_config_refused_off_loopback_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert refusal(config, "127.0.0.1") is None
    message = refusal(config, "0.0.0.0")
    assert message is not None
    assert "clients:" in message and "server.open: true" in message and "0.0.0.0" in message


def test_clients_or_explicit_open_may_listen_anywhere(tmp_path: Path) -> None:
    assert refusal(_config(tmp_path, "server: {open: true}\n"), "0.0.0.0") is None
    clients = "clients: [{id: app, key: sk-client-1}]\n"
    assert refusal(_config(tmp_path, clients), "0.0.0.0") is None
