from __future__ import annotations

import pytest

from proxy.config import ConfigError, fingerprint, load_config, parse_config

BASE = """
backends:
  moonshot:
    base_url: https://api.moonshot.ai/v1/
    keys:
      - {id: kimi-main, key: "${MOONSHOT_API_KEY}"}
      - {id: kimi-spare, key: "${MOONSHOT_API_KEY_2:-}"}
    models: [kimi-k2-0711-preview]
    timeout: {connect: 5, read: 600}
  openai:
    base_url: https://api.openai.com/v1
    keys: [{id: openai-main, key: "${OPENAI_API_KEY}"}]
aliases:
  kimi-k2: kimi-k2-0711-preview
routes:
  - {prefix: "kimi-", backend: moonshot}
  - {prefix: "gpt-", backend: openai, key: openai-main}
"""


def parse(text: str, **env: str):
    return parse_config(text, "test.yaml", env)


def error_of(text: str, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, **env)
    return info.value


def line_of(text: str, snippet: str) -> int:
    """The 1-based line of the last ``snippet`` in ``text``: where the error must point."""
    return text[: text.rindex(snippet)].count("\n") + 1


def test_valid_file_becomes_frozen_dataclasses_with_env_values():
    config = parse(BASE, MOONSHOT_API_KEY="sk-moon-123456789012", OPENAI_API_KEY="sk-oa")
    moonshot = config.backends["moonshot"]
    assert moonshot.base_url == "https://api.moonshot.ai/v1"  # trailing slash dropped
    assert [k.id for k in moonshot.keys] == ["kimi-main", "kimi-spare"]
    assert moonshot.keys[0].value == "sk-moon-123456789012"
    assert moonshot.keys[0].env_vars == ("MOONSHOT_API_KEY",)
    assert moonshot.keys[1].present is False  # ${VAR:-} with nothing set: missing, not an error
    assert moonshot.timeout.read == 600.0
    assert config.routes[1].key == "openai-main"
    assert config.server.port == 8080
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_unset_variable_leaves_key_missing_and_secret_out_of_repr():
    config = parse(BASE, MOONSHOT_API_KEY="sk-moon-secret-000000")
    assert config.backends["openai"].keys[0].present is False
    assert "sk-moon-secret" not in repr(config)


def test_default_value_is_used_when_variable_is_unset_or_empty():
    text = BASE.replace("https://api.openai.com/v1", "${OA_URL:-http://localhost:11434/v1}")
    assert parse(text).backends["openai"].base_url == "http://localhost:11434/v1"
    assert parse(text, OA_URL="").backends["openai"].base_url == "http://localhost:11434/v1"
    assert parse(text, OA_URL="http://h:1/v1").backends["openai"].base_url == "http://h:1/v1"


@pytest.mark.parametrize(
    ("change", "place", "message"),
    [
        (
            ("backend: openai, key", "backend: opena, key"),
            "routes[1].backend",
            "unknown backend 'opena'",
        ),
        (
            ("kimi-spare", "kimi-main"),
            "backends.moonshot.keys[1].id",
            "duplicate key id 'kimi-main'",
        ),
        (("https://api.openai.com/v1", "ftp://x"), "backends.openai.base_url", "bad URL"),
        (("key: openai-main}", "key: nope}"), "routes[1].key", "unknown key id 'nope'"),
        (
            ("timeout: {connect: 5", "timeout: {conect: 5"),
            "backends.moonshot.timeout.conect",
            "unknown field",
        ),
        (
            ("timeout: {connect: 5", "timeout: {connect: -1"),
            "backends.moonshot.timeout.connect",
            "greater than 0",
        ),
        (("routes:", "routs:"), "routs", "unknown field"),
        (
            ("models: [kimi-k2-0711-preview]", "models: kimi"),
            "backends.moonshot.models",
            "expected a list",
        ),
    ],
)
def test_each_validation_error_names_file_place_and_problem(change, place, message):
    err = error_of(BASE.replace(*change))
    assert err.file == "test.yaml"
    assert err.place == place
    assert message in err.message
    assert str(err).startswith(f"test.yaml:{err.line}: {place}: ")
    assert err.line == line_of(BASE.replace(*change), change[1])


def test_alias_cycle_is_refused_with_the_chain():
    text = BASE.replace("kimi-k2: kimi-k2-0711-preview", "a: b\n  b: c\n  c: a")
    err = error_of(text)
    assert err.place == "aliases.a"
    assert "alias cycle: a -> b -> c -> a" in err.message


def test_missing_backends_and_bad_yaml_are_errors_not_tracebacks():
    assert error_of("aliases: {}\n").place == "backends"
    err = error_of("backends: [unclosed\n")
    assert "invalid YAML" in err.message and err.line == 2 and err.place == ""


def test_server_section_sizes_and_ports():
    config = parse(BASE + "server: {port: 9000, max_body_size: 2MiB, routing_headers: false}\n")
    assert config.server.port == 9000
    assert config.server.max_body_size == 2 * 1024 * 1024
    assert config.server.routing_headers is False
    assert error_of(BASE + "server: {port: 70000}\n").place == "server.port"


def test_authorization_cannot_be_set_as_an_extra_header():
    text = BASE.replace("timeout: {connect: 5, read: 600}", "headers: {Authorization: x}")
    assert error_of(text).place == "backends.moonshot.headers.Authorization"


def test_load_config_reports_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.yaml"))
    assert "cannot read file" in info.value.message


def test_shipped_config_is_valid_without_any_key_set():
    config = load_config("config.yaml", environ={})
    assert {"openai", "moonshot", "anthropic", "ollama"} <= set(config.backends)
    assert config.backends["moonshot"].base_url == "https://api.moonshot.ai/v1"
    assert not any(k.present for k in config.backends["openai"].keys)


def test_fingerprint_shows_only_prefix_and_last_four():
    assert fingerprint("sk-abcdefghijklmnop1234") == "sk-…1234"
    assert fingerprint("short") == "…"
    assert fingerprint("") == "(missing)"
