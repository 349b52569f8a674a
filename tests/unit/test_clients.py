from __future__ import annotations

import pytest

from proxy.clients import ClientAuth
from proxy.config import parse_config
from proxy.errors import ProxyError

CONFIG = """
server: {trusted_proxies: [10.0.0.0/8, 127.0.0.1]}
backends:
  b: {base_url: "http://x/v1", keys: [{id: k, key: v}]}
clients:
  - {id: team-a, key: sk-team-a-secret, models: ["kimi-*", "gpt-4o*"]}
  - {id: team-b, key: "${TEAM_B_KEY}"}
"""


def auth(text: str = CONFIG) -> ClientAuth:
    return ClientAuth(parse_config(text, "t.yaml", {}))


def headers(value: str | None) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", value.encode())] if value is not None else []


def test_valid_key_identifies_the_client():
    assert auth().authenticate(headers("Bearer sk-team-a-secret")).id == "team-a"


@pytest.mark.parametrize(
    "value", [None, "Bearer", "Basic sk-team-a-secret", "Bearer sk-team-a-secreT", "Bearer "]
)
def test_missing_or_wrong_keys_are_401(value):
    with pytest.raises(ProxyError) as info:
        auth().authenticate(headers(value))
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")


def test_a_client_whose_key_is_unset_cannot_authenticate_with_an_empty_key():
    with pytest.raises(ProxyError):
        auth().authenticate(headers("Bearer "))


def test_model_globs_match_the_requested_or_the_resolved_id():
    a = auth()
    client = a.authenticate(headers("Bearer sk-team-a-secret"))
    a.check_model(client, "kimi-k2", "kimi-k2-0711-preview")
    a.check_model(client, "fast", "kimi-k2-0711-preview")  # an alias for an allowed model
    with pytest.raises(ProxyError) as info:
        a.check_model(client, "claude", "claude-sonnet")
    assert (info.value.status, info.value.code) == (403, "model_not_allowed")


def test_without_clients_the_proxy_is_open():
    open_auth = auth("backends:\n  b: {base_url: 'http://x/v1', keys: []}\n")
    assert open_auth.open and open_auth.authenticate(headers(None)) is None


def scope(peer: str, forwarded: str | None = None) -> dict:
    hs = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return {"client": (peer, 1234), "headers": hs}


def test_forwarded_for_is_believed_only_from_trusted_proxies():
    a = auth()
    assert a.address(scope("203.0.113.9", "1.2.3.4")) == "203.0.113.9"  # not trusted: ignored
    assert a.address(scope("10.1.2.3", "1.2.3.4")) == "1.2.3.4"
    # Spoofed hops in front of the real client are skipped: the first untrusted from the right.
    assert a.address(scope("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.7")) == "1.2.3.4"
    assert a.address(scope("10.1.2.3")) == "10.1.2.3"
