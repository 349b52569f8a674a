"""Issue 11: every problem of a file at once, each as `file:line: place: message`; files that
would hurt the process are refused before anything is built; no message shows a secret."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ConfigError, parse_config
from proxy.config_yaml import Document

GOOD = """\
backends:
  openai:
    base_url: https://api.openai.com/v1
    keys:
      - {id: main, key: "${OPENAI_API_KEY}"}
routes:
  - {prefix: "gpt-", backend: openai}
"""


def problems(text: str, **env: str) -> list[str]:
    """Every line a user sees for ``text``, in order."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", env)
    assert str(info.value) == "\n".join(map(str, info.value.problems))
    return [str(p) for p in info.value.problems]


def test_every_problem_of_a_file_comes_out_in_one_run_in_line_order():
    text = """\
server:
  port: 70000
  hots: x
backends:
  openai:
    base_url: ftp://x
    timeout: {conect: 1, read: -2}
routes:
  - {prefix: "gpt-", backend: opena}
  - {prefix: "o-", backend: openai, strip_prefix: "yes"}
"""
    assert problems(text) == [
        "c.yaml:2: server.port: must be at most 65535",
        "c.yaml:3: server.hots: unknown field, did you mean 'host'? (known: admin_key, "
        "admin_port, body_timeout, config_poll_interval, drain_timeout, forward_paths, "
        "header_timeout, host, "
        "max_body_size, max_buffered_bodies, max_connections, max_header_size, max_response_size, "
        "max_spilled_bodies, max_upload_size, max_uploads_per_client, open, port, "
        "routing_headers, trusted_proxies, upload_deadline, usage_grace, usage_grace_bytes)",
        "c.yaml:6: backends.openai.base_url: bad URL 'ftp://x': expected http(s)://host[:port]/path",
        "c.yaml:7: backends.openai.timeout.conect: unknown field, did you mean 'connect'? "
        "(known: connect, first_byte, idle, read)",
        "c.yaml:7: backends.openai.timeout.read: must be greater than 0",
        "c.yaml:9: routes[0].backend: unknown backend 'opena' (known: openai)",
        "c.yaml:10: routes[1].strip_prefix: expected true or false, got str 'yes'",
    ]


def test_unknown_fields_are_all_reported_at_every_level():
    text = GOOD + "aliasses: {a: b}\n" + "throttle: {reconect: {}}\n"
    text = text.replace("keys:", "kyes: []\n    keys:")
    assert [p.split(":", 3)[2] for p in problems(text)] == [
        " backends.openai.kyes",
        " aliasses",
        " throttle.reconect",
    ]
    assert "did you mean 'aliases'?" in problems(text)[1]


def test_a_duplicate_mapping_key_is_an_error_naming_both_lines():
    text = GOOD.replace("    keys:", "    base_url: https://other/v1\n    keys:")
    assert problems(text) == [
        "c.yaml:4: backends.openai.base_url: duplicate key 'base_url' (first at line 3)"
    ]


def test_duplicate_client_keys_are_an_error_that_never_shows_the_key():
    text = GOOD + 'clients:\n  - {id: a, key: "${K1}"}\n  - {id: b, key: "sk-same-000000"}\n'
    assert problems(text, K1="sk-same-000000") == [
        "c.yaml:10: clients[1].key: duplicate key: the same as clients[0]"
    ]
    assert problems(text.replace("id: b", "id: a"), K1="x") == [
        "c.yaml:10: clients[1].id: duplicate client id 'a': the same as clients[0]"
    ]


def test_an_alias_that_routes_nowhere_is_an_error():
    text = GOOD + "aliases: {fast: llama-3}\n"
    assert problems(text) == [
        "c.yaml:8: aliases.fast: 'llama-3' routes nowhere: no route matches, no backend lists it"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (".nan", "expected a finite number, got nan"),
        (".inf", "expected a finite number, got inf"),
        ("-1", "must be greater than 0"),
        ("-5s", "expected seconds or a duration like '500ms', '5m', got '-5s'"),
        ("true", "expected seconds or a duration like '500ms', '5m', got a boolean"),
    ],
)
def test_durations_must_be_finite_and_positive(value, message):
    text = GOOD.replace("    keys:", f"    timeout: {{read: {value}}}\n    keys:")
    assert problems(text) == [f"c.yaml:4: backends.openai.timeout.read: {message}"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-5", "must be greater than 0"),
        ("0", "must be greater than 0"),
        ("1.5", "expected a whole number, got float 1.5"),
        (".inf", "expected a whole number, got inf"),
        ("10XB", "expected a size like '10MiB', got '10XB'"),
    ],
)
def test_sizes_must_be_positive_whole_numbers(value, message):
    assert problems(GOOD + f"server: {{max_body_size: {value}}}\n") == [
        f"c.yaml:8: server.max_body_size: {message}"
    ]


def test_control_characters_in_headers_and_keys_are_errors():
    text = GOOD.replace(
        '    keys:\n      - {id: main, key: "${OPENAI_API_KEY}"}',
        '    headers: {X-A: "a\\r\\nInjected: 1", "X B": v}\n'
        '    keys:\n      - {id: main, key: "sk-abc\\ndef"}',
    )
    assert problems(text) == [
        "c.yaml:4: backends.openai.headers.X B: not a valid header name (letters, digits and -)",
        "c.yaml:4: backends.openai.headers.X-A: must not contain control characters",
        "c.yaml:6: backends.openai.keys[0].key: must not contain control characters",
    ]


def test_credentials_in_a_base_url_are_an_error_that_never_shows_them():
    text = GOOD.replace("https://api.openai.com/v1", "https://user:hunter2@api.openai.com/v1")
    assert problems(text) == [
        "c.yaml:3: backends.openai.base_url: no user:password@ in a URL: "
        "put credentials under keys or headers"
    ]


def test_nested_defaults_are_expanded_and_a_malformed_reference_is_refused():
    text = GOOD.replace("https://api.openai.com/v1", "${A:-${B:-http://fallback/v1}}")
    assert parse_config(text, "c.yaml", {}).backends["openai"].base_url == "http://fallback/v1"
    config = parse_config(text, "c.yaml", {"B": "http://b/v1"})
    assert config.backends["openai"].base_url == "http://b/v1"
    assert parse_config(text, "c.yaml", {"A": "http://a/v1"}).backends["openai"].base_url == (
        "http://a/v1"
    )
    key = parse_config(GOOD, "c.yaml", {"OPENAI_API_KEY": "sk-${HOME}"}).backends["openai"].keys[0]
    assert key.value == "sk-${HOME}"  # a value from the environment is never expanded again
    nested = GOOD.replace('"${OPENAI_API_KEY}"', '"${OPENAI_API_KEY:-${OPENAI_KEY_FILE_VALUE}}"')
    assert parse_config(nested, "c.yaml", {}).backends["openai"].keys[0].env_vars == (
        "OPENAI_API_KEY",
        "OPENAI_KEY_FILE_VALUE",
    )
    bad = GOOD.replace("https://api.openai.com/v1", "${A:-http://x/v1")
    assert problems(bad) == [
        "c.yaml:3: backends.openai.base_url: malformed reference in '${A:-http://x/v1': "
        "expected ${VAR} or ${VAR:-default}"
    ]


def test_an_unset_variable_where_a_value_is_required_is_named():
    text = GOOD.replace("https://api.openai.com/v1", "${OPENAI_BASE_URL}")
    assert problems(text) == [
        "c.yaml:3: backends.openai.base_url: must not be empty (OPENAI_BASE_URL not set)"
    ]
    partial = GOOD.replace("https://api.openai.com/v1", "${UPSTREAM}/v1")
    assert problems(partial) == [
        "c.yaml:3: backends.openai.base_url: bad URL '${UPSTREAM}/v1': "
        "expected http(s)://host[:port]/path (UPSTREAM not set)"
    ]


def test_no_message_shows_a_value_from_the_environment_or_a_url_password():
    secret = "sk-live-0123456789abcdef"
    text = GOOD.replace("https://api.openai.com/v1", "${URL}") + 'storage: "${STORE}"\n'
    text += "clients:\n  - {id: c, key: x, rate_limit: '${RATE}'}\n"
    out = "\n".join(problems(text, URL=f"not a url {secret}", STORE=f"mem://{secret}", RATE=secret))
    assert secret not in out
    assert "bad URL '${URL}'" in out
    assert "got '${STORE}'" in out and "got '${RATE}'" in out
    literal = GOOD + "storage: 'mongo://admin:hunter2@db:1/?password=hunter3'\n"
    assert problems(literal) == [
        "c.yaml:8: storage: expected memory:// or redis://host:port, "
        "got 'mongo://admin:***@db:1/?password=***'"
    ]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param(
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True)
            ),
            5,
            "more than 50000 values once aliases are expanded",
            id="billion-laughs",
        ),
        pytest.param(
            "a: &x\n  b: *x\n", 1, "an alias refers to a value that contains it", id="recursion"
        ),
        pytest.param(
            "a: " + "[" * 40 + "]" * 40 + "\n", 1, "nested deeper than 32 levels", id="deep"
        ),
        pytest.param("a: *nowhere\n", 1, "invalid YAML: found undefined alias", id="unknown-alias"),
        pytest.param(
            "a: !!python/object:os.system x\n",
            1,
            "unsupported tag tag:yaml.org,2002:python/object:os.system",
            id="python-tag",
        ),
        pytest.param("a: 1\n---\nb: 2\n", 2, "invalid YAML: but found another document", id="docs"),
        pytest.param("x" * (1024 * 1024 + 1), None, "file too large: over 1024 KiB", id="size"),
    ],
)
def test_yaml_that_would_hurt_the_process_is_refused_quickly_and_in_little_memory(
    text, line, message
):
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", {})
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (info.value.line, info.value.message) == (line, message)
    assert len(info.value.problems) == 1
    assert elapsed < 1.0
    assert peak < 50 * 1024 * 1024


def test_anchors_aliases_and_merge_keys_within_bounds_still_work():
    text = """\
backends:
  a:
    base_url: http://a/v1
    timeout: &slow {connect: 2, read: 30}
  b:
    base_url: http://b/v1
    timeout: {<<: *slow, read: 5}
  c:
    base_url: http://c/v1
    timeout: *slow
"""
    config = parse_config(text, "c.yaml", {})
    assert [config.backends[n].timeout.read for n in "abc"] == [30.0, 5.0, 30.0]
    assert config.backends["b"].timeout.connect == 2.0


def test_no_value_read_through_a_variable_stays_a_str_subclass_in_the_config():
    """orjson refuses str subclasses: the request path must only ever see plain values."""
    import dataclasses

    import orjson

    from proxy.config_yaml import Env

    text = GOOD.replace(
        "    keys:", '    request_rewrite: {set: {user: "${U}", tags: ["${U}"]}}\n    keys:'
    )
    text += 'throttle: {rate_limit_strategy: "${S}"}\naliases: {x: "gpt-${U}"}\n'
    config = parse_config(text, "c.yaml", {"U": "u", "S": "fixed-window", "OPENAI_API_KEY": "k"})

    def walk(value):
        assert not isinstance(value, Env), value
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, dict | list | tuple | frozenset) or hasattr(value, "items"):
            for item in value.items() if hasattr(value, "items") else value:
                walk(item)

    walk(config)
    rules = config.backends["openai"].request_rewrite
    assert orjson.dumps(dict(rules.set)) == b'{"user":"u","tags":["u"]}'


def test_an_unusable_storage_url_is_refused_without_showing_its_password() -> None:
    text = 'storage: "redis://user:hunter2@h:port/0"\nbackends: {a: {base_url: "http://h/v1"}}\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml", {})
    assert str(caught.value) == (
        "c.yaml:1: storage: unusable Redis URL 'redis://user:***@h:port/0': "
        "Port could not be cast to integer value as 'port'"
    )
    assert "hunter2" not in str(caught.value)


_LITERAL = st.text(alphabet=st.characters(blacklist_characters="$"), max_size=12)
_ENV = st.dictionaries(st.sampled_from(["A", "B", "C"]), st.text(max_size=12), max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_LITERAL, st.sampled_from(["A", "B", "C"])), max_size=5), _ENV)
def test_interpolation_keeps_every_byte_of_the_text_and_of_the_values(parts, environ):
    # Issue 19: the expansion once marked values with \0n\0 in the text: a NUL in the file
    # or in a variable's value was taken for a marker (an IndexError, a traceback).
    text = "".join(literal + "${" + name + "}" for literal, name in parts)
    expected = "".join(literal + environ.get(name, "") for literal, name in parts)
    doc = Document(environ)
    assert doc.interpolate(text, ("v",), 1) == expected
    assert doc.problems == []


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(["$", "{", "}", ":", "-", "A", "\0", "0", "x"])), _ENV)
def test_interpolation_of_any_text_is_a_value_or_a_problem(text, environ):
    doc = Document(environ)
    result = doc.interpolate(text, ("v",), 1)
    if doc.problems:
        assert result == text and "malformed reference" in doc.problems[0][2]
    else:
        assert "${" not in result.replace(environ.get("A", ""), "") or "${" in str(environ)


def test_nul_bytes_in_a_value_are_a_problem_not_a_traceback():
    text = GOOD.replace('"${OPENAI_API_KEY}"', '"${OPENAI_API_KEY}\\x007\\x00"')
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.yaml", {"OPENAI_API_KEY": "sk-a\x000\x00"})
    assert [p.message for p in caught.value.problems] == ["must not contain control characters"]
    doc = Document({"V": "a\x000\x00"})
    assert doc.interpolate("${V}\x007\x00", ("v",), 1) == "a\x000\x00\x007\x00"


POOL = """\
backends:
  a: {base_url: "http://127.0.0.1:1/v1", keys: [{id: ka, key: sk-a-000000000}]}
  b: {base_url: "http://127.0.0.1:2/v1", keys: [{id: kb, key: sk-b-000000000}]}
routes:
  - prefix: kimi
%s
"""


@pytest.mark.parametrize(
    ("route", "place"),
    [
        ("    deployments: [{backend: a, weight: 0}]", "routes[0].deployments[0].weight"),
        ("    deployments: [{backend: a, weight: -1}]", "routes[0].deployments[0].weight"),
        ("    deployments: [{backend: a, weight: true}]", "routes[0].deployments[0].weight"),
        ("    deployments: [{backend: a, weight: 2000000}]", "routes[0].deployments[0].weight"),
        ("    deployments: [{backend: a}]\n    max_attempts: 0", "routes[0].max_attempts"),
        ("    deployments: [{backend: a}]\n    max_attempts: 1000", "routes[0].max_attempts"),
        ("    deployments: [{backend: a}]\n    max_attempts: 2.5", "routes[0].max_attempts"),
        ("    deployments: [{backend: a}]\n    strategy: random", "routes[0].strategy"),
        ("    deployments: [{backend: a}]\n    affinity: sticky", "routes[0].affinity"),
        ("    deployments: [{backend: nowhere}]", "routes[0].deployments[0]"),
        ("    deployments: [{backend: a, key: kb}]", "routes[0].deployments[0].key"),
        ("    deployments: []", "routes[0]"),
        ("    backend: a\n    deployments: [{backend: b}]", "routes[0]"),
        (
            "    deployments: [{backend: a, model: m}, {backend: a, model: m}]",
            "routes[0]",
        ),
    ],
)
def test_a_pool_out_of_range_is_refused_naming_its_place(route: str, place: str) -> None:
    found = problems(POOL % route)
    assert len(found) == 1, found
    assert f": {place}: " in found[0] or f": {place}.backend: " in found[0], found
    parse_config(
        POOL % "    deployments: [{backend: a, weight: 3}, {backend: b, key: kb}]", "c", {}
    )
