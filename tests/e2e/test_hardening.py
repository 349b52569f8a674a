"""Issue 10's request-path invariants, as a client and an operator see them.

One client cannot hurt another (key poisoning, headers, paths); what arrives is bounded
(model ids, upstream bodies); no secret leaves the process; no upstream byte makes a 500.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    KEY_A,
    KEY_B,
    KEYS_ENV,
    MockUpstream,
    ProxyProcess,
    mock_config,
    rss_kb,
    start_proxy,
)

ADMIN_KEY = "adm-test-0123456789abcdef"


def post(proxy: ProxyProcess, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    path = kwargs.pop("path", "/v1/chat/completions")
    return httpx.post(proxy.url + path, json=body, timeout=10, **kwargs)


def chat(model: str = "kimi-k2", **mock: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if mock:
        body["mock"] = mock
    return body


def raw_request(proxy: ProxyProcess, request: bytes) -> bytes:
    """Send bytes as they are (no client normalises the path); read until the close."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def admin_config(upstream: MockUpstream, server_extra: str = "", **overrides: str) -> str:
    text = mock_config(upstream, **overrides)
    return text.replace(
        "server:\n  routing_headers: true",
        f"server:\n  routing_headers: true\n  admin_key: {ADMIN_KEY}\n{server_extra}",
    )


def guarded_config(upstream: MockUpstream) -> str:
    """An admin key, a 1 MiB response cap, a 1 s key cooldown cap, a 1 s idle timeout."""
    text = admin_config(upstream, "  max_response_size: 1MiB\n", read_timeout="10")
    text = text.replace(
        "models: [kimi-k2-0711-preview, gpt-4o-mini]",
        "models: [kimi-k2-0711-preview, gpt-4o-mini]\n    max_cooldown: 1s",
    )
    return text.replace(
        "timeout: {connect: 2, read: 10}", "timeout: {connect: 2, first_byte: 10, idle: 1}"
    )


@pytest.fixture(scope="module")
def guarded(mock_upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory):
    """Shared by the tests that leave no key out of rotation; text access log."""
    tmp = tmp_path_factory.mktemp("guarded")
    proxy = start_proxy(guarded_config(mock_upstream), tmp, KEYS_ENV, ("--log-format", "text"))
    yield proxy
    proxy.stop()


@pytest.fixture
def fresh(upstream: MockUpstream, tmp_path: Path):
    """A proxy of its own, for tests that take keys out of rotation on purpose."""
    proxy = start_proxy(guarded_config(upstream), tmp_path, KEYS_ENV)
    yield proxy
    proxy.stop()


# ------------------------------------------------------------------ one client, not all


def test_a_403_about_a_model_reaches_that_client_and_takes_no_key_out(proxy, upstream):
    error = {
        "message": "Project proj_x does not have access to model gpt-5",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    refused = post(proxy, chat("kimi-k2", status=403, error=error))
    assert refused.status_code == 403
    assert refused.json() == {"error": error}  # the upstream's answer, unchanged
    assert len(upstream.requests()) == 1  # not retried on the other key
    for _ in range(4):  # both keys still in rotation for everybody
        assert post(proxy, chat()).status_code == 200
    keys = [r["key"] for r in upstream.requests()[1:]]
    assert sorted(set(keys)) == sorted({KEY_A, KEY_B})


def test_a_403_that_says_the_key_is_invalid_is_retried_once_then_answered_503(fresh, upstream):
    error = {"message": "revoked", "type": "invalid_request_error", "code": "api_key_revoked"}
    answer = post(fresh, chat("kimi-k2", status=403, error=error))
    # Both keys tried (the mock refuses both the same way), then the proxy says so itself.
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "no_usable_key"
    assert len(upstream.requests()) == 2


def admin_keys(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    page = httpx.get(proxy.url + "/admin/status", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return {k["id"]: k for k in page.json()["backends"]["mock"]["keys"]}


def test_a_missing_scope_401_for_one_client_changes_no_key(fresh, upstream):
    """Issue 19: a restricted key's 401 missing_scope on one client's POST /v1/batches took
    both keys out (the retry burnt the second) and every other client got 503."""
    error = {
        "message": "You have insufficient permissions for this operation. Missing scopes: "
        "api.batch.write.",
        "type": "invalid_request_error",
        "param": None,
        "code": "missing_scope",
    }
    refused = post(fresh, chat(status=401, error=error))
    assert refused.status_code == 401 and refused.json() == {"error": error}  # unchanged
    assert len(upstream.requests()) == 1  # no retry on the second key
    time.sleep(0.3)  # a probe, had one started, would have been answered
    assert all(admin_keys(fresh)[k]["state"] == "ok" for k in ("key-a", "key-b"))
    others = [post(fresh, chat()) for _ in range(4)]
    assert [r.status_code for r in others] == [200] * 4
    assert {r["key"] for r in upstream.requests()[1:]} == {KEY_A, KEY_B}  # both serve
    gets = [r for r in upstream.requests(probes=True) if r["method"] == "GET"]
    assert len([r for r in gets if r["key"] in (KEY_A, KEY_B)]) <= 1  # the start-up check only


def test_a_revoked_key_is_out_once_a_probe_confirms_it_and_admin_names_it(fresh, upstream):
    upstream.configure(invalid_keys=[KEY_A])  # revoked: every request with it is refused
    answers = [post(fresh, chat()) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200]  # retried once on the other key
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and admin_keys(fresh)["key-a"]["state"] != "invalid":
        time.sleep(0.05)
    keys = admin_keys(fresh)
    assert keys["key-a"]["state"] == "invalid" and keys["key-b"]["state"] == "ok"
    assert "confirmed by GET /models (401)" in keys["key-a"]["last_error"]
    upstream.reset()
    for _ in range(3):  # out of rotation: only key-b is sent
        assert post(fresh, chat()).status_code == 200
    assert {r["key"] for r in upstream.requests()} == {KEY_B}


def test_client_organization_project_and_forwarding_headers_do_not_cross(proxy, upstream):
    headers = {
        "OpenAI-Organization": "org-evil",
        "OpenAI-Project": "proj-evil",
        "X-Forwarded-For": "10.9.9.9",
        "X-Stainless-Lang": "python",
        "X-Extra": "not on the allow-list",
    }
    assert post(proxy, chat(), headers=headers).status_code == 200
    seen = upstream.requests()[0]["headers"]
    assert "openai-organization" not in seen
    assert "openai-project" not in seen
    assert "x-forwarded-for" not in seen
    assert "x-extra" not in seen
    assert seen["x-stainless-lang"] == "python"  # the SDK's own metadata crosses


def test_a_compressed_body_is_refused_not_forwarded(proxy, upstream):
    answer = post(proxy, chat(), headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 415
    assert answer.json()["error"]["code"] == "unsupported_content_encoding"
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/organization/invites",  # the admin API: never with the operator's key
        "/v1/projects/proj_1/roles",
        "/v1/chat/completions/",  # empty segments are nobody's path
        "/v1/files//file-1",
        "/v1/chatter",  # below no allowed path, though it starts like one
    ],
)
def test_only_known_api_paths_are_forwarded(proxy, upstream, path):
    answer = post(proxy, chat(), path=path)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "unknown_url"
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/v1/../v1/chat/completions",
        b"/v1/chat/../chat/completions",
        b"/v1/%2e%2e/admin",
        b"/v1/chat%2fcompletions",
        b"/v1/chat/..%2Fcompletions",
        # Decoded once by the server: none may mean something else in the upstream URL.
        b"/v1/files/%252e%252e/%252e%252e/organization/invites",  # %2e%2e upstream
        b"/v1/files/file-1%3Fpurpose=x",  # a query of the client's making
        b"/v1/files/x%23y",  # a fragment: the upstream would get /v1/files/x
        b"/v1/files/a%20b",  # a space in the upstream's request line
        b"/v1/files/a%0d%0ax-evil:%201",
        b"/v1/files/%00",  # was a 500
    ],
)
def test_dot_segments_and_encoded_slashes_are_refused(proxy, upstream, raw_path):
    body = b'{"model": "kimi-k2", "messages": []}'
    request = (
        b"POST " + raw_path + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )
    answer = raw_request(proxy, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"invalid_path"' in answer
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "types",
    [
        (b"text/plain", b"application/json"),  # the proxy saw no model, the upstream one
        (b"multipart/form-data; boundary=a", b"multipart/form-data; boundary=b"),
    ],
)
def test_two_content_types_are_refused_not_read_one_way_here_and_another_upstream(
    proxy, upstream, types
):
    body = b'{"model": "kimi-k2", "messages": []}'
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        + b"".join(b"content-type: " + value + b"\r\n" for value in types)
        + b"content-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )
    answer = raw_request(proxy, request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"invalid_content_type"' in answer
    assert upstream.requests() == []


# ------------------------------------------------------------------ bounded, whatever arrives


@pytest.mark.parametrize("model", ["m" * 257, "gpt-4\r\nx-evil: 1", "kimi\x00", "kimi\x7f"])
def test_long_or_control_character_model_ids_are_refused_before_routing(proxy, upstream, model):
    answer = post(proxy, chat(model))
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_model"
    assert upstream.requests() == []


def test_a_flood_of_distinct_one_megabyte_model_ids_does_not_grow_memory(proxy, upstream):
    def flood(count: int, tag: str) -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(count):
                body = b'{"model": "%s%06d"}' % (tag.encode() * (1 << 20), i)
                answer = client.post(proxy.base_url + "/chat/completions", content=body)
                assert answer.status_code == 400

    flood(20, "w")  # warm up the allocator
    before = rss_kb(proxy.process.pid)
    flood(200, "m")
    grown_mb = (rss_kb(proxy.process.pid) - before) / 1024
    assert grown_mb < 30, f"RSS grew by {grown_mb:.0f} MB"


def test_a_huge_upstream_answer_is_refused_not_buffered(guarded, upstream):
    answer = post(guarded, chat(pad_bytes=3 * 1024 * 1024))
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_response_too_large"
    assert post(guarded, chat(pad_bytes=1000)).status_code == 200  # below the cap: relayed


def test_the_first_silence_after_the_head_is_bounded_by_idle_not_first_byte(guarded, upstream):
    # The head and the first event arrive in one read; then the upstream goes silent.
    started = time.monotonic()
    body = chat(stall_after=1, glue_head=True)
    body["stream"] = True
    with httpx.stream("POST", guarded.base_url + "/chat/completions", json=body, timeout=30) as r:
        text = b"".join(r.iter_bytes())
    elapsed = time.monotonic() - started
    assert b'"code":"upstream_timeout"' in text
    assert elapsed < 5, f"took {elapsed:.1f} s: bounded by first_byte (10 s), not idle (1 s)"


# ------------------------------------------------------------------ no secret leaves


def test_an_upstream_that_echoes_the_key_leaks_it_nowhere(fresh, upstream):
    passed = post(fresh, chat(status=400, echo_key=True))  # a 4xx relayed as it is...
    assert passed.status_code == 400
    assert "sk-…1111" in passed.text or "sk-…2222" in passed.text  # ...but fingerprinted
    answer = post(fresh, chat(status=401, echo_key=True))
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "no_usable_key"
    admin = httpx.get(fresh.url + "/admin/status", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200
    time.sleep(0.2)  # the access log is written in batches
    for text in (answer.text, passed.text, admin.text, fresh.log()):
        assert KEY_A not in text and KEY_B not in text
        assert KEY_A[5:] not in text  # nor a part of it
    # The keys answer GET /models: the confirming probe keeps them (issue 19), so /admin
    # holds no reason; the secret is nowhere either way.
    keys = admin.json()["backends"]["mock"]["keys"]
    assert {k["state"] for k in keys} == {"ok"}


# ------------------------------------------------------------------ no upstream byte → 500


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_never_followed(proxy, upstream, status):
    elsewhere = f"{upstream.url}/elsewhere/v1/chat/completions"
    answer = post(proxy, chat(status=status, headers={"location": elsewhere}))
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_redirect"
    assert [r["path"] for r in upstream.requests()] == ["/v1/chat/completions"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e308", "99999999", "Wed, 21 Oct"])
def test_hostile_retry_after_values_cool_a_key_down_for_at_most_max_cooldown(
    guarded, upstream, value
):
    limited = post(guarded, chat(status=429, headers={"retry-after": value}))
    assert limited.status_code == 429  # both keys limited: the upstream's answer relayed
    after = post(guarded, chat())
    assert after.status_code in (200, 429)
    if after.status_code == 429:
        assert after.json()["error"]["code"] == "upstream_rate_limited"
        assert int(after.headers["retry-after"]) == 1  # max_cooldown: 1s
    admin = httpx.get(
        guarded.url + "/admin/status", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert admin.status_code == 200
    for key in admin.json()["backends"]["mock"]["keys"]:
        assert (key["cooldown_seconds"] or 0) <= 1
    time.sleep(1.1)  # the cooldown leaves by time alone
    assert post(guarded, chat()).status_code == 200


def test_a_responses_stream_that_breaks_ends_with_an_error_event_the_sdk_raises(proxy, upstream):
    body = {"model": "kimi-k2", "input": "hi", "stream": True, "mock": {"drop_after": 2}}
    with httpx.stream("POST", proxy.base_url + "/responses", json=body, timeout=10) as r:
        text = b"".join(r.iter_bytes())
    assert text.endswith(b"\n\n")
    last = text.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: {")
    assert b'"type":"error"' in last and b'"sequence_number":2' in last
    client = openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
    stream = client.responses.create(
        model="kimi-k2", input="hi", stream=True, extra_body={"mock": {"drop_after": 2}}
    )
    with pytest.raises(openai.APIError, match="closed the stream"):
        for _ in stream:
            pass


def test_a_forged_log_line_in_the_path_is_escaped(guarded, upstream):
    request = (
        b"POST /v1/chat%0A2026-01-01T00:00:00.000Z%20access%20FORGED HTTP/1.1\r\n"
        b"host: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    )
    assert raw_request(guarded, request).startswith(b"HTTP/1.1 404")
    time.sleep(0.2)
    lines = guarded.log().splitlines()
    assert not any(line.startswith("2026-01-01T00:00:00.000Z access FORGED") for line in lines)
    assert any("/v1/chat\\n2026-01-01" in line for line in lines)


@pytest.mark.parametrize(
    ("path", "allow"), [("/v1/models", "GET, HEAD"), ("/v1/models/kimi-k2", "GET, DELETE")]
)
def test_posting_to_the_model_list_is_an_openai_shaped_405(proxy, upstream, path, allow):
    answer = post(proxy, chat(), path=path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allow
    assert answer.json()["error"]["code"] == "method_not_allowed"
    assert upstream.requests() == []


def test_ready_counts_only_backends_seen_answering(upstream, tmp_path):
    dead_port = socket.socket()
    dead_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    text = f"""
backends:
  local:   # a dummy key for a local server that is not running
    base_url: http://127.0.0.1:{dead_port.getsockname()[1]}/v1
    keys: [{{id: local, key: ollama}}]
  mock:
    base_url: {upstream.url}/v1
    keys: [{{id: bad, key: "sk-refused-0000000000000"}}]
routes: [{{prefix: "", backend: local}}]
"""
    upstream.configure(invalid_keys=["sk-refused-0000000000000"])
    proxy = start_proxy(text, tmp_path)
    try:
        time.sleep(1.0)  # the start-up checks have answered by now
        ready = httpx.get(proxy.url + "/ready")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "backends": []}
        assert "backend local: not answering (" in proxy.log()
        assert "key bad taken out of rotation" in proxy.log()  # refused at start, not later
    finally:
        proxy.stop()
        dead_port.close()
    good = text.replace('key: "sk-refused-0000000000000"', f'key: "{KEY_A}"')
    proxy = start_proxy(good, tmp_path)
    try:
        deadline = time.monotonic() + 3
        while httpx.get(proxy.url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        assert httpx.get(proxy.url + "/ready").json() == {"ready": True, "backends": ["mock"]}
    finally:
        proxy.stop()


@pytest.mark.parametrize("status", [101, 600, 989])
def test_an_upstream_status_that_is_not_a_final_http_status_is_a_502(proxy, upstream, status):
    answer = post(proxy, chat(status=status))
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_bad_response"


def test_upstream_headers_with_control_bytes_or_secrets_are_not_passed_on(fresh, upstream):
    headers = {"openai-processing-ms": "1\x01", "x-ratelimit-limit-requests": KEY_A}
    answer = post(fresh, chat(headers=headers))
    assert answer.status_code == 200
    assert "openai-processing-ms" not in answer.headers  # unsendable: dropped
    assert answer.headers["x-ratelimit-limit-requests"] == "sk-…1111"


def test_a_request_the_parser_cannot_read_gets_an_openai_shaped_400(proxy):
    answer = raw_request(proxy, b"FOO /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"code":"invalid_http"' in answer


def test_a_trailing_slash_is_a_404_not_a_redirect(proxy):
    answer = httpx.get(proxy.url + "/health/")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "unknown_url"


def test_an_informational_answer_then_silence_times_out_instead_of_hanging(upstream, tmp_path):
    text = guarded_config(upstream).replace("first_byte: 10", "first_byte: 1")
    proxy = start_proxy(text, tmp_path, KEYS_ENV)
    try:
        started = time.monotonic()
        answer = post(proxy, chat(status=199))  # a 1xx, then nothing aiohttp can use
        assert answer.status_code == 504
        assert answer.json()["error"]["code"] == "upstream_timeout"
        assert time.monotonic() - started < 5  # connect (2 s) + first byte (1 s), not never
    finally:
        proxy.stop()


@pytest.mark.serial  # three processes start within a deadline
def test_workers_shut_down_when_their_supervisor_is_killed(upstream, tmp_path):
    proxy = start_proxy(mock_config(upstream), tmp_path, KEYS_ENV, ("--workers", "2"))
    supervisor = proxy.process.pid
    children_file = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    deadline = time.monotonic() + 10
    while len(children_file.read_text().split()) < 3:  # both workers and the tracker
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)
    workers = [int(pid) for pid in children_file.read_text().split()]
    proxy.process.kill()  # SIGKILL: no chance to stop its workers
    proxy.process.wait(timeout=5)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers are still running"
        time.sleep(0.1)
    assert proxy.log().count("Finished server process") >= 2  # each shut down gracefully
