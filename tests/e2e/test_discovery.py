"""Model discovery: a backend's own /models in GET /v1/models, and did-you-mean on its 404s."""

from __future__ import annotations

import time

import httpx
import openai

from tests.conftest import start_proxy

SERVED = ["kimi-k2-0711-preview", "kimi-k2-turbo-preview", "moonshot-v1-8k"]


def test_discovered_models_are_listed_and_a_404_gets_a_hint(upstream, tmp_path):
    upstream.configure(models=SERVED)
    proxy = start_proxy(
        f"""
throttle: {{reconnect: {{enabled: false}}}}
backends:
  moonshot:
    base_url: {upstream.url}/v1
    keys: [{{id: m, key: sk-discover-000000001}}]
    discover_models: true
    discover_interval: 60
aliases: {{kimi-k2: kimi-k2-0711-preview}}
routes: [{{prefix: "", backend: moonshot}}]
""",
        tmp_path,
    )
    try:
        sdk = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(sdk.models.list().data) < 4:
            time.sleep(0.1)
        listed = {m.id: m.owned_by for m in sdk.models.list()}
        assert listed == {"kimi-k2": "moonshot", **dict.fromkeys(SERVED, "moonshot")}
        assert sdk.models.retrieve("moonshot-v1-8k").owned_by == "moonshot"

        # An id the discovered list lacks still goes through (the list can be stale)...
        error = {"message": "Not found the model kimi-k2-0711", "type": "resource_not_found_error"}
        response = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": "kimi-k2-0711", "mock": {"status": 404, "error": error}},
        )
        assert response.status_code == 404
        body = response.json()
        assert body["error"] == error  # the upstream's body stays recognisable
        assert body["proxy_hint"] == (
            "'kimi-k2-0711' is not served by moonshot; did you mean kimi-k2-0711-preview?"
        )
        # ...and a discovered id's 404 is left alone.
        ok = httpx.post(
            f"{proxy.base_url}/chat/completions",
            json={"model": "moonshot-v1-8k", "mock": {"status": 404, "error": error}},
        )
        assert "proxy_hint" not in ok.json()
    finally:
        proxy.stop()
