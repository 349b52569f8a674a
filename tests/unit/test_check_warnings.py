"""Offline `proxy check` warns about what is valid but likely a mistake."""

from __future__ import annotations

import io
from pathlib import Path

from proxy.check import print_table
from proxy.config import load_config

CONFIG = """
backends:
  moonshot:
    base_url: http://127.0.0.1:1/v1
    keys:
      - {id: from-env, key: "${CHECK_TEST_KEY}"}
      - {id: literal, key: sk-written-in-the-file-0001}
    models: [kimi-k2-0711-preview]
clients:
  - {id: env-client, key: "${CHECK_TEST_CLIENT}"}
  - {id: plain-client, key: sk-client-in-the-file-0001}
aliases:
  kimi-k2: kimi-k2-0711-preview
  kimi-typo: kimi-k2-0711-previw
routes:
  - {prefix: "kimi-", backend: moonshot}
"""


def table(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = io.StringIO()
    print_table(load_config(str(path), {"CHECK_TEST_KEY": "sk-env", "CHECK_TEST_CLIENT": "c"}), out)
    return out.getvalue()


def test_an_alias_to_a_model_its_backend_does_not_list_is_warned(tmp_path):
    text = table(tmp_path, CONFIG)
    assert "warning: alias kimi-typo -> kimi-k2-0711-previw: backend moonshot does not list" in text
    assert "warning: alias kimi-k2 " not in text


def test_keys_written_in_plain_text_are_warned_never_shown(tmp_path):
    text = table(tmp_path, CONFIG)
    assert "warning: backends.moonshot.keys literal: written in the file in plain text" in text
    assert "warning: clients plain-client: key written in the file in plain text" in text
    assert "from-env:" not in text.split("warnings:")[1] and "env-client" not in text
    assert "sk-written-in-the-file" not in text and "sk-client-in-the-file" not in text


def test_metrics_out_of_reach_with_clients_is_warned(tmp_path):
    assert "warning: /metrics is not served: with clients: it needs" in table(tmp_path, CONFIG)
    for server in ("server: {admin_port: 9091}\n", "server: {admin_key: adm}\n"):
        assert "/metrics is not served" not in table(tmp_path, server + CONFIG)


def test_a_clean_config_has_no_warnings(tmp_path):
    clean = "server: {admin_port: 9091}\n" + CONFIG.replace(
        "      - {id: literal, key: sk-written-in-the-file-0001}\n", ""
    )
    clean = clean.replace("  - {id: plain-client, key: sk-client-in-the-file-0001}\n", "")
    clean = clean.replace("  kimi-typo: kimi-k2-0711-previw\n", "")
    assert "warnings:" not in table(tmp_path, clean)


POOL = """
backends:
  moonshot: {base_url: "http://127.0.0.1:1/v1", keys: [{id: m1, key: "${CHECK_TEST_KEY}"}]}
  groq:
    base_url: http://127.0.0.1:2/v1
    keys: [{id: g1, key: "${CHECK_TEST_KEY}"}, {id: g2, key: "${CHECK_TEST_KEY}"}]
routes:
  - prefix: kimi-k2
    deployments:
      - {backend: moonshot, model: kimi-k2-0711-preview, weight: 3}
      - {backend: groq, model: moonshotai/kimi-k2-instruct, key: g2}
    strategy: latency
    max_attempts: 2
    fallback: [{backend: moonshot, model: kimi-latest}]
aliases:
  k2: kimi-k2
"""


def test_check_shows_each_pool_its_deployments_and_an_alias_onto_it(tmp_path: Path) -> None:
    shown = table(tmp_path, POOL)
    assert (
        "  0. 'kimi-k2*' -> pool (latency, at most 2 attempts, affinity session)"
        "  (fallback moonshot as kimi-latest)\n"
        "       - moonshot as kimi-k2-0711-preview (weight 3)\n"
        "       - groq as moonshotai/kimi-k2-instruct (weight 1, key g2)\n"
    ) in shown
    assert (
        "  k2 -> kimi-k2  (pool of 2: moonshot as kimi-k2-0711-preview,"
        " groq as moonshotai/kimi-k2-instruct)\n"
    ) in shown
