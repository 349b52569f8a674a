"""Batches through the proxy with the real openai SDK: a batch file's lines are requests
the upstream runs later with the proxy's key, so each line's model is checked against the
client's globs and routed (its alias rewritten) as a single request would be, and a batch
costs its lines against the client's rate limit."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import ProxyProcess, ResourceUpstream, rss_kb, start_proxy
from tests.e2e.test_resources import KEY_1, _peak_rss

TEAM_A = "team-a-key-0123456789"
TEAM_B = "team-b-key-0123456789"


def config(upstream: ResourceUpstream, team_b_limit: str, unknown: str = "refuse") -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
objects: {{unknown: {unknown}}}
clients:
  - {{id: team-a, key: "{TEAM_A}"}}
  - {{id: team-b, key: "{TEAM_B}", models: ["cheap-*"], rate_limit: "{team_b_limit}"}}
backends:
  openai:
    base_url: {upstream.url}/v1
    keys: [{{id: one, key: "{KEY_1}"}}]
aliases:
  cheap-fast: gpt-4o-mini-2024-07-18
routes:
  - {{prefix: "", backend: openai}}
default_backend: openai
"""


@pytest.fixture(scope="module")
def proxy(
    resources: ResourceUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(config(resources, "5/minute"), tmp_path_factory.mktemp("batch"))
    yield process
    process.stop()


def sdk(proxy: ProxyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


def line(number: int, model: str) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"question {number}"}]}
    request = {"custom_id": f"q{number}", "method": "POST", "url": "/v1/chat/completions"}
    return orjson.dumps({**request, "body": body}) + b"\n"


def upstream_files(resources: ResourceUpstream) -> list[dict[str, Any]]:
    answer = httpx.get(f"{resources.url}/v1/files", headers={"authorization": f"Bearer {KEY_1}"})
    return list(answer.json()["data"])


def file_uploads(resources: ResourceUpstream) -> list[dict[str, Any]]:
    return [r for r in resources.requests() if r["path"] == "/v1/files" and r["method"] == "POST"]


def test_a_forbidden_model_on_any_line_is_refused_naming_the_line_and_nothing_is_made(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    resources.forget()
    before = len(upstream_files(resources))
    data = line(1, "cheap-mini") + line(2, "cheap-fast") + line(3, "gpt-4o-expensive")
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(proxy, TEAM_B).files.create(file=("in.jsonl", data), purpose="batch")
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["code"] == "batch_line_refused"
    assert error["param"] == "file"
    assert "Line 3 " in error["message"] and "'gpt-4o-expensive'" in error["message"]
    assert file_uploads(resources) == []  # held whole, checked before a byte went upstream
    assert len(upstream_files(resources)) == before
    # team-a may use every model: the same file is its to upload.
    assert sdk(proxy, TEAM_A).files.create(file=("in.jsonl", data), purpose="batch").id


def test_a_refused_line_past_what_the_proxy_holds_cuts_the_upload_and_no_file_is_made(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    resources.forget()
    before = len(upstream_files(resources))
    filler = b"".join(line(n, "cheap-mini") for n in range(1, 30_000))  # ~3 MB: streamed
    data = filler + line(30_000, "gpt-4o-expensive")
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(proxy, TEAM_B).files.create(file=("big.jsonl", data), purpose="batch")
    error = raised.value.body
    assert isinstance(error, dict)
    assert "Line 30000 " in error["message"] and "'gpt-4o-expensive'" in error["message"]
    assert len(upstream_files(resources)) == before  # the upstream never had a whole form
    log = proxy.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log


def test_an_alias_on_a_line_reaches_the_upstream_as_its_real_id_and_nothing_else_changes(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    resources.forget()
    first, second, third = line(1, "cheap-mini"), line(2, "cheap-fast"), line(3, "cheap-mini")
    made = sdk(proxy, TEAM_B).files.create(
        file=("in.jsonl", first + second + third), purpose="batch"
    )
    (seen,) = file_uploads(resources)
    got = seen["lines"]
    assert [orjson.loads(got[n])["body"]["model"] for n in range(3)] == [
        "cheap-mini",
        "gpt-4o-mini-2024-07-18",
        "cheap-mini",
    ]
    digest = hashlib.sha256
    assert digest(got[0].encode("latin-1") + b"\n").digest() == digest(first).digest()
    assert digest(got[2].encode("latin-1") + b"\n").digest() == digest(third).digest()
    resent = orjson.loads(got[1])
    original = orjson.loads(second)
    assert resent["body"] | {"model": "cheap-fast"} == original["body"]
    assert {k: v for k, v in resent.items() if k != "body"} == {
        k: v for k, v in original.items() if k != "body"
    }
    assert made.bytes == seen["size"]  # the exact length was sent: the upstream read it all


def test_a_batch_costs_its_lines_against_the_clients_rate_limit(
    resources: ResourceUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(config(resources, "5/minute"), tmp_path)
    try:
        team_b = sdk(proxy, TEAM_B)
        ten = b"".join(line(n, "cheap-mini") for n in range(1, 11))
        file = team_b.files.create(file=("ten.jsonl", ten), purpose="batch")  # 1 of 5
        with pytest.raises(openai.BadRequestError) as raised:  # 10 > 5: never fits
            team_b.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert isinstance(raised.value.body, dict)
        assert raised.value.body["code"] == "batch_exceeds_rate_limit"
        assert "10 requests" in raised.value.body["message"]
        three = b"".join(line(n, "cheap-mini") for n in range(1, 4))
        small = team_b.files.create(file=("three.jsonl", three), purpose="batch")  # 2 of 5
        batch = team_b.batches.create(  # 3 more: 5 of 5
            input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.input_file_id == small.id
        with pytest.raises(openai.RateLimitError) as limited:  # 3 more do not fit
            team_b.batches.create(
                input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert limited.value.response.status_code == 429
        assert float(limited.value.response.headers["retry-after"]) > 0
        assert isinstance(limited.value.body, dict)
        assert limited.value.body["code"] == "rate_limit_exceeded"
        batch_posts = [r for r in resources.requests() if r["path"] == "/v1/batches"]
        assert len(batch_posts) == 1  # the refused ones never reached the upstream
    finally:
        proxy.stop()


def test_a_restricted_client_cannot_run_a_batch_of_a_file_the_proxy_did_not_check(
    proxy: ProxyProcess, resources: ResourceUpstream, tmp_path: Path
) -> None:
    direct = httpx.post(
        f"{resources.url}/v1/files",
        headers={"authorization": f"Bearer {KEY_1}"},
        files={"file": ("x.jsonl", line(1, "gpt-4o-expensive"))},
        data={"purpose": "batch"},
    ).json()

    def create(on: ProxyProcess) -> None:
        sdk(on, TEAM_B).batches.create(
            input_file_id=direct["id"], endpoint="/v1/chat/completions", completion_window="24h"
        )

    # By default an id the proxy has no record of is nobody's to name: 404 first.
    with pytest.raises(openai.NotFoundError):
        create(proxy)
    # An operator who lets unrecorded ids through still gets no unchecked batch run.
    allowing = start_proxy(config(resources, "5/minute", unknown="allow"), tmp_path)
    try:
        with pytest.raises(openai.BadRequestError) as raised:
            create(allowing)
        assert isinstance(raised.value.body, dict)
        assert raised.value.body["code"] == "unchecked_batch_file"
    finally:
        allowing.stop()


def test_a_batch_purpose_sent_after_its_file_is_refused(proxy: ProxyProcess) -> None:
    boundary = "xx"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n'
    ).encode() + line(1, "cheap-mini")
    body += f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'.encode()
    body += f"batch\r\n--{boundary}--\r\n".encode()
    answer = httpx.post(
        f"{proxy.base_url}/files",
        content=body,
        headers={
            "content-type": f"multipart/form-data; boundary={boundary}",
            "authorization": f"Bearer {TEAM_A}",
        },
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_batch_file"
    assert "comes after the file" in answer.json()["error"]["message"]


@pytest.mark.serial  # RSS of one process under a 100 MB transfer: alone, not beside others
def test_a_100_mb_batch_file_streams_with_flat_memory_and_every_line_rewritten(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    resources.forget()
    padding = "x" * 2000
    lines = 50_000  # OpenAI's most per batch file
    file_size = [0]

    def upload() -> Iterator[bytes]:
        yield b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
        for start in range(0, lines, 500):
            piece = b"".join(
                orjson.dumps(
                    {
                        "custom_id": f"q{n}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": "cheap-fast",
                            "messages": [{"role": "user", "content": padding}],
                        },
                    }
                )
                + b"\n"
                for n in range(start, start + 500)
            )
            file_size[0] += len(piece)
            yield piece
        yield b"\r\n--xx--\r\n"

    pid = proxy.process.pid
    before = rss_kb(pid)
    peak = [before]
    stop = threading.Event()
    watcher = threading.Thread(target=_peak_rss, args=(pid, stop, peak))
    watcher.start()
    started = time.monotonic()
    try:
        answer = httpx.post(
            f"{proxy.base_url}/files",
            content=upload(),
            headers={
                "content-type": "multipart/form-data; boundary=xx",
                "authorization": f"Bearer {TEAM_A}",
            },
            timeout=120,
        )
    finally:
        stop.set()
        watcher.join()
    took = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    (seen,) = file_uploads(resources)
    renamed = len("gpt-4o-mini-2024-07-18") - len("cheap-fast")
    assert seen["size"] == answer.json()["bytes"] == file_size[0] + lines * renamed  # each line
    assert (peak[0] - before) < 30 * 1024, (before, peak[0])
    print(f"100 MB batch file: {took:.1f} s, RSS +{(peak[0] - before) // 1024} MiB")
