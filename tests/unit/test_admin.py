from __future__ import annotations

import dataclasses
import json
import math

import pytest

from proxy.admin import status
from proxy.config import parse_config
from proxy.redact import redact_url
from proxy.runtime import build_runtime

CONFIG = """
backends:
  b:
    base_url: "http://127.0.0.1:1/v1"
    keys: [{id: k1, key: sk-admin-test-1}, {id: k2, key: sk-admin-test-2}]
"""


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw-secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw-secret@host", "redis://:***@host"),
        ("redis://pw-secret@host", "redis://***@host"),
        ("redis://host:6379/0?password=pw-secret&db=1", "redis://host:6379/0?password=***&db=1"),
        ("rediss://u:pw-secret@h/0?ssl_cert_reqs=none", "rediss://u:***@h/0?ssl_cert_reqs=none"),
        ("memory://", "memory://"),
    ],
)
def test_passwords_in_urls_are_redacted(url, shown):
    assert redact_url(url) == shown


def test_the_status_page_is_valid_json_whatever_the_state_holds():
    runtime = build_runtime(parse_config(CONFIG, "t.yaml", {}))
    # The config refuses credentials in a base_url; the page must hide them all the same.
    backend = dataclasses.replace(
        runtime.config.backends["b"], base_url="http://user:base-secret@127.0.0.1:1/v1"
    )
    config = dataclasses.replace(
        runtime.config,
        backends={"b": backend},
        storage="redis://admin:pw-secret@redis:6379/0?password=pw-secret2",
    )
    runtime = dataclasses.replace(runtime, config=config)
    pool, breaker = runtime.pools["b"], runtime.breakers["b"]
    # Whatever got into the state (it cannot any more: this is the last line of defence).
    pool.health["k1"].last_used = math.nan
    pool.health["k2"].last_used = math.inf
    pool.cool_down("k2", 5, "429")
    pool.health["k2"].cooldown_until = math.nan
    breaker.force_open(5)
    breaker.open_until = math.inf

    page = status(runtime)
    text = json.dumps(page, allow_nan=False)  # what the JSON response does: raises on nan
    assert "pw-secret" not in text and "base-secret" not in text
    assert "sk-admin-test" not in text
    assert page["storage"] == "redis://admin:***@redis:6379/0?password=***"
    assert page["backends"]["b"]["base_url"] == "http://user:***@127.0.0.1:1/v1"
    assert page["backends"]["b"]["breaker"]["state"] in ("closed", "open", "half_open")
    assert [k["state"] for k in page["backends"]["b"]["keys"]] == ["ok", "cooldown"]
