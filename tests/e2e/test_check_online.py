"""`proxy check --online` against real mock upstreams: exact findings and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from proxy.online import _key_hint
from tests.conftest import ROOT, MockUpstream, free_port

GOOD = "sk-online-good-0000000001"
STALE = "sk-online-stale-000000002"
SERVED = ["kimi-k2-0711-preview", "kimi-k2-turbo-preview", "moonshot-v1-8k"]


def write_config(tmp_path, mock: MockUpstream, alias_target: str) -> str:
    path = tmp_path / "online.yaml"
    path.write_text(f"""
backends:
  moonshot:
    base_url: {mock.url}/v1
    keys:
      - {{id: good, key: "{GOOD}"}}
      - {{id: stale, key: "{STALE}"}}
      - {{id: unset, key: "${{ONLINE_UNSET_KEY}}"}}
    models: [kimi-k2-turbo-preview]
  gone:
    base_url: http://127.0.0.1:{free_port()}/v1
    keys: [{{id: gone-main, key: "sk-gone-00000000000003"}}]
aliases:
  kimi-k2: {alias_target}
routes:
  - {{prefix: "kimi-", backend: moonshot}}
""")
    return str(path)


def run_check(path: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", path, "--online", *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_findings_for_a_refused_key_an_unreachable_backend_and_a_wrong_model_id(upstream, tmp_path):
    upstream.configure(invalid_keys=[STALE], models=SERVED)
    result = run_check(write_config(tmp_path, upstream, "kimi-k2-0711"), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    found = {(f["backend"], f["subject"]): f for f in report["findings"]}
    assert found[("moonshot", "key good")]["message"] == "ok, 3 models"
    assert found[("moonshot", "key stale")]["level"] == "error"
    assert found[("moonshot", "key stale")]["message"] == "401: invalid (Invalid Authentication)"
    assert found[("moonshot", "key unset")]["level"] == "warning"
    assert found[("moonshot", "key unset")]["hint"] == "set ONLINE_UNSET_KEY"
    assert found[("gone", "key gone-main")]["message"].startswith("unreachable")
    wrong = found[("moonshot", "model kimi-k2-0711")]
    assert wrong["message"] == "is not served by moonshot (target of alias kimi-k2)"
    assert wrong["hint"] == "did you mean kimi-k2-0711-preview?"
    assert found[("moonshot", "model kimi-k2-turbo-preview")]["level"] == "ok"
    assert (report["errors"], report["warnings"]) == (3, 1)
    # Secrets never reach the report.
    assert GOOD not in result.stdout and STALE not in result.stdout


def test_human_output_is_one_line_per_finding_grouped_by_backend(upstream, tmp_path):
    upstream.configure(invalid_keys=[STALE], models=SERVED)
    result = run_check(write_config(tmp_path, upstream, "kimi-k2-0711"))
    assert result.returncode == 1
    out = result.stdout
    assert (
        "  ERROR model kimi-k2-0711: is not served by moonshot (target of alias kimi-k2)"
        " -> did you mean kimi-k2-0711-preview?" in out
    )
    assert "  ok    key good: ok, 3 models" in out
    assert "summary: 3 errors, 1 warnings: something is wrong" in out
    assert out.index("\nmoonshot\n") < out.index("\ngone\n")


def test_all_well_exits_0(upstream, tmp_path):
    upstream.configure(models=SERVED)
    path = write_config(tmp_path, upstream, "kimi-k2-0711-preview")
    text = Path(path).read_text()
    text = text.replace(f'      - {{id: stale, key: "{STALE}"}}\n', "")
    text = text.replace('      - {id: unset, key: "${ONLINE_UNSET_KEY}"}\n', "")
    text = text[: text.index("  gone:")] + text[text.index("aliases:") :]
    Path(path).write_text(text)
    result = run_check(path)
    assert result.returncode == 0, result.stdout
    assert "summary: 0 errors, 0 warnings: all is well" in result.stdout


def test_an_invalid_file_exits_2_also_with_json(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: {}\n")
    result = run_check(str(bad), "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["valid"] is False


def test_wrong_domain_hint_for_moonshot_keys_is_data():
    assert "platform.moonshot.ai work only with https://api.moonshot.ai/v1" in _key_hint(
        "https://api.moonshot.cn/v1"
    )
    assert _key_hint("http://127.0.0.1:9/v1") is None


def test_each_deployment_of_a_pool_is_checked_on_its_own_backend(upstream, tmp_path):
    """A pool's deployments send their own ids to their own backends: each is checked
    there, and a moved id gets the closest real one."""
    upstream.configure(models=SERVED)
    path = tmp_path / "pool.yaml"
    path.write_text(f"""
backends:
  moonshot:
    base_url: {upstream.url}/v1
    keys: [{{id: good, key: "{GOOD}"}}]
  mirror:
    base_url: {upstream.url}/v1
    keys: [{{id: good2, key: "{GOOD}"}}]
routes:
  - prefix: kimi-k2
    deployments:
      - {{backend: moonshot, model: kimi-k2-0711-preview}}
      - {{backend: mirror, model: kimi-k2-turbo}}
""")
    result = run_check(str(path), "--json")
    assert result.returncode == 1, result.stdout
    found = {(f["backend"], f["subject"]): f for f in json.loads(result.stdout)["findings"]}
    assert found[("moonshot", "model kimi-k2-0711-preview")]["level"] == "ok"
    wrong = found[("mirror", "model kimi-k2-turbo")]
    assert wrong["level"] == "error"
    assert wrong["message"] == "is not served by mirror (deployment of routes[0] 'kimi-k2*')"
    assert wrong["hint"] == "did you mean kimi-k2-turbo-preview?"
