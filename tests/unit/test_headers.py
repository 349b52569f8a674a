from __future__ import annotations

from proxy.headers import forwarded_request_headers, kept_response_headers


def test_client_credentials_and_hop_by_hop_headers_never_go_upstream():
    client = [
        (b"authorization", b"Bearer client-secret"),
        (b"x-api-key", b"client-secret-2"),
        (b"connection", b"keep-alive"),
        (b"host", b"proxy:8080"),
        (b"content-length", b"12"),
        (b"accept", b"application/json"),
        (b"openai-beta", b"assistants=v2"),
        (b"x-request-id", b"abc"),
        (b"user-agent", b"OpenAI/Python 1.0"),
    ]
    headers = forwarded_request_headers(
        client, {"x-extra": "1"}, ("authorization", "Bearer sk-upstream")
    )
    assert headers == {
        "accept": "application/json",
        "openai-beta": "assistants=v2",
        "x-request-id": "abc",
        "user-agent": "OpenAI/Python 1.0",
        "x-extra": "1",
        "authorization": "Bearer sk-upstream",
    }


def test_response_keeps_only_what_clients_read():
    upstream = [
        (b"Content-Type", b"application/json"),
        (b"X-Request-Id", b"req_1"),
        (b"openai-processing-ms", b"12"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"retry-after", b"3"),
        (b"Set-Cookie", b"__cf=1"),
        (b"Server", b"cloudflare"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
    ]
    assert kept_response_headers(upstream) == [
        (b"content-type", b"application/json"),
        (b"x-request-id", b"req_1"),
        (b"openai-processing-ms", b"12"),
        (b"x-ratelimit-remaining-requests", b"99"),
        (b"retry-after", b"3"),
    ]
