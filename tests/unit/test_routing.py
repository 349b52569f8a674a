from __future__ import annotations

from proxy.config import parse_config
from proxy.routing import Router

CONFIG = """
backends:
  moonshot:
    base_url: https://api.moonshot.ai/v1
    keys: [{id: kimi-main, key: x}]
    models: [kimi-k2-0711-preview, moonshot-v1-8k]
  openai:
    base_url: https://api.openai.com/v1
    keys: [{id: openai-main, key: y}]
    models: [gpt-4o-mini]
  local:
    base_url: http://localhost:11434/v1
    keys: [{id: local, key: z}]
    models: [llama3]
aliases:
  kimi-k2: kimi-k2-0711-preview
  best: kimi-k2
routes:
  - {prefix: "kimi-", backend: moonshot}
  - {prefix: "moonshot/", backend: moonshot, strip_prefix: true}
  - {prefix: "gpt-", backend: openai, key: openai-main}
"""


def router(text: str = CONFIG) -> Router:
    return Router(parse_config(text, "t.yaml", {}))


def test_alias_resolves_then_first_matching_prefix_routes():
    target = router().resolve("kimi-k2")
    assert (target.model, target.backend, target.upstream_model) == (
        "kimi-k2-0711-preview",
        "moonshot",
        "kimi-k2-0711-preview",
    )


def test_alias_chains_are_followed_to_the_end():
    assert router().resolve("best").upstream_model == "kimi-k2-0711-preview"


def test_strip_prefix_removes_the_routing_prefix_only():
    target = router().resolve("moonshot/kimi-k2-turbo-preview")
    assert target.backend == "moonshot"
    assert target.upstream_model == "kimi-k2-turbo-preview"
    assert router().resolve("moonshot/") is None  # a bare prefix names no model


def test_pinned_key_travels_with_the_target():
    assert router().resolve("gpt-4o").pinned_key == "openai-main"
    assert router().resolve("kimi-latest").pinned_key is None


def test_exact_listed_model_routes_when_no_prefix_matches():
    target = router().resolve("llama3")
    assert (target.backend, target.upstream_model) == ("local", "llama3")
    assert router().resolve("unknown-model") is None


def test_first_match_wins_over_later_routes():
    text = CONFIG.replace(
        '  - {prefix: "kimi-", backend: moonshot}',
        '  - {prefix: "kimi-k2", backend: openai}\n  - {prefix: "kimi-", backend: moonshot}',
    )
    assert router(text).resolve("kimi-k2-turbo").backend == "openai"
    assert router(text).resolve("kimi-latest").backend == "moonshot"


def test_model_list_has_aliases_and_listed_models_owned_by_their_backend():
    entries = {(e.id, e.owned_by) for e in router().models}
    assert ("kimi-k2", "moonshot") in entries
    assert ("best", "moonshot") in entries
    assert ("gpt-4o-mini", "openai") in entries
    assert ("llama3", "local") in entries
    assert len(entries) == len(router().models)  # one entry per id


def test_routable_summary_names_models_and_prefixes():
    summary = router().routable_summary()
    assert "kimi-k2" in summary and "'gpt-*'" in summary


def test_resolution_cache_is_bounded():
    r = router()
    for i in range(5000):
        r.resolve(f"random-{i}")
    assert len(r._cache) <= 4096
