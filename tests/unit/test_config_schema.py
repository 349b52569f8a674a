"""The JSON Schema and the reference table come from the one definition, and stay in step."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.config import json_schema
from proxy.schema import reference_table, schema_text

ROOT = Path(__file__).resolve().parent.parent.parent


def test_committed_schema_is_what_proxy_schema_prints():
    committed = (ROOT / "config.schema.json").read_text()
    assert committed == schema_text(), "stale: run `proxy schema > config.schema.json`"


def test_committed_reference_table_is_what_proxy_schema_markdown_prints():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == reference_table(), (
        "stale: run `proxy schema --markdown > docs/config-reference.md`"
    )


def test_shipped_config_names_the_schema_for_editors():
    first = (ROOT / "config.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./config.schema.json"


@pytest.mark.parametrize("name", ["config.yaml", "bench/config.yaml"])
def test_shipped_configs_are_valid_against_the_schema(name):
    jsonschema.validate(yaml.safe_load((ROOT / name).read_text()), json_schema())


@pytest.mark.parametrize(
    ("change", "flagged"),
    [
        (("read: 600}", "raed: 600}"), "'raed' was unexpected"),
        (("port: 8080", "port: 80800"), "80800 is greater than the maximum of 65535"),
        (("routing_headers: true", "routing_headers: 1"), "1 is not of type 'boolean'"),
    ],
)
def test_an_editor_flags_a_typo_or_a_bad_value(change, flagged):
    text = (ROOT / "config.yaml").read_text().replace(*change)
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(yaml.safe_load(text), json_schema())
    assert flagged in info.value.message


def test_every_field_has_a_description_and_units_are_documented():
    schema = json_schema()
    sections = [schema, *schema["$defs"].values()]
    for section in sections:
        for name, field in section.get("properties", {}).items():
            assert field.get("description"), name
    table = reference_table()
    assert "| `backends.<name>.timeout.read` | duration (`30`, `500ms`, `5m`) | `600.0` |" in table
    assert "| `server.max_body_size` | size (`1048576`, `10MiB`) | `10485760` |" in table
    assert json.loads(schema_text()) == schema
