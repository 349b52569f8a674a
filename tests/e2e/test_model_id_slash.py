"""`models.retrieve("moonshot/kimi-latest")`: the SDK sends the "/" as %2F; the proxy takes
it into the id for GET/DELETE /v1/models/{id} only, and refuses every other encoding."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import ProxyProcess, start_proxy


@pytest.fixture(scope="module")
def proxy(resources, tmp_path_factory) -> Iterator[ProxyProcess]:
    config = f"""
backends:
  moonshot:
    base_url: {resources.url}/v1
    keys: [{{id: one, key: "sk-slash-000000000001"}}]
routes:
  - {{prefix: "moonshot/", backend: moonshot, strip_prefix: true}}
  - {{prefix: "org/", backend: moonshot}}
"""
    process = start_proxy(config, tmp_path_factory.mktemp("slash"))
    yield process
    process.stop()


def test_the_sdk_retrieves_and_deletes_a_prefixed_id(proxy, resources):
    resources.forget()
    client = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    assert client.models.retrieve("moonshot/kimi-latest").id == "kimi-latest"
    assert client.models.delete("moonshot/kimi-latest").deleted is True
    # An id routed unstripped keeps its "/" inside one path segment upstream.
    client.models.retrieve("org/model-a")
    seen = [(r["method"], r["path"]) for r in resources.requests()]
    assert seen[:2] == [("GET", "/v1/models/kimi-latest"), ("DELETE", "/v1/models/kimi-latest")]
    assert seen[2][1].lower() in ("/v1/models/org%2fmodel-a", "/v1/models/org/model-a")


def raw_status(proxy: ProxyProcess, method: str, target: str) -> int:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        head = sock.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models/moonshot%2F%2e%2e%2Fsecret",
        "/v1/models/moonshot%2F..%2Ffiles",
        "/v1/models/a%3Fx",
        "/v1/models/a%23x",
        "/v1/models/a%5Cb",
    ],
)
def test_other_encodings_are_still_refused(proxy, target):
    assert raw_status(proxy, "GET", target) == 400


def test_an_encoded_slash_elsewhere_is_still_refused(proxy):
    assert raw_status(proxy, "GET", "/v1/files/a%2Fb") == 400
    assert raw_status(proxy, "POST", "/v1/models/moonshot%2Fkimi") in (400, 405)
