"""The OpenAI API beyond chat, through the proxy with the real openai SDK: uploads routed by
their form's model, files and batches, Responses chained across a pool of two keys, audio
streamed as it is made, downloads relayed in pieces. The fake upstream keeps every object
under the key that created it, so a request sent with the wrong key fails as on OpenAI."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from orjson import loads as orjson_loads

from tests.conftest import (
    ProxyProcess,
    RedisServer,
    ResourceUpstream,
    rss_kb,
    start_proxy,
)

KEY_1 = "sk-res-1111111111111111aaaa"
KEY_2 = "sk-res-2222222222222222bbbb"


def config(upstream: ResourceUpstream, extra: str = "") -> str:
    return f"""
throttle: {{reconnect: {{enabled: false}}}}
{extra}
backends:
  openai:
    base_url: {upstream.url}/v1
    keys:
      - {{id: one, key: "{KEY_1}"}}
      - {{id: two, key: "{KEY_2}"}}
aliases:
  whisper: whisper-1
  speech: tts-1
routes:
  - {{prefix: "", backend: openai}}
paths:
  - {{prefix: /files, backend: openai, key: one}}
default_backend: openai
"""


@pytest.fixture(scope="module")
def proxy(
    resources: ResourceUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(config(resources), tmp_path_factory.mktemp("resources"))
    yield process
    process.stop()


@pytest.fixture
def client(proxy: ProxyProcess, resources: ResourceUpstream) -> openai.OpenAI:
    resources.forget()
    return openai.OpenAI(base_url=proxy.base_url, api_key="client-key", max_retries=0)


def test_a_transcription_is_routed_by_its_form_model_with_the_file_bytes_intact(
    client: openai.OpenAI, resources: ResourceUpstream
) -> None:
    audio = bytes(range(256)) * 4000  # 1 MB: more than the head the proxy holds
    answer = client.audio.transcriptions.with_raw_response.create(
        model="whisper", file=("clip.wav", audio)
    )
    assert answer.parse().text == f"{len(audio)} bytes heard"
    assert answer.headers["x-proxy-backend"] == "openai"
    assert answer.headers["x-proxy-model"] == "whisper-1"
    (seen,) = resources.requests()
    assert seen["model"] == "whisper-1"  # the alias's real id: only that field changed
    assert seen["sha256"] == hashlib.sha256(audio).hexdigest()
    assert seen["size"] == len(audio)


def test_a_form_with_its_file_before_its_model_is_still_routed_by_the_model(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    resources.forget()
    audio = b"\x00RIFF" * 300_000  # 1.5 MB before the model field: spilled, then sent
    files = {"file": ("clip.wav", audio, "audio/wav")}
    # httpx sends data fields first: build the form by hand, the file first.
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\n".encode()
        + files["file"][1]
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        f"whisper\r\n--{boundary}--\r\n".encode()
    )
    answer = httpx.post(
        f"{proxy.base_url}/audio/transcriptions",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert answer.status_code == 200, answer.text
    (seen,) = resources.requests()
    assert seen["model"] == "whisper-1"
    assert seen["order"] == ["file", "model"]
    assert seen["sha256"] == hashlib.sha256(audio).hexdigest()


def test_files_are_created_listed_read_and_deleted_with_the_path_rules_key(
    client: openai.OpenAI, resources: ResourceUpstream
) -> None:
    data = b'{"custom_id": "1"}\n' * 1000
    created = client.files.create(file=("batch.jsonl", data), purpose="user_data")
    assert created.bytes == len(data)
    assert [f.id for f in client.files.list()] == [created.id]
    assert client.files.retrieve(created.id).filename == "batch.jsonl"
    content = client.files.content(created.id).read()
    assert len(content) == 1000
    assert client.files.delete(created.id).deleted is True
    keys = {r["key"] for r in resources.requests()}
    assert keys == {KEY_1}  # `paths: /files → key one`, every time


def test_batches_are_created_retrieved_and_cancelled_with_the_key_that_owns_their_file(
    client: openai.OpenAI, resources: ResourceUpstream
) -> None:
    line = b'{"custom_id": "1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e"}}'
    file = client.files.create(file=("in.jsonl", line), purpose="batch")
    for _ in range(3):  # round robin would pick each key in turn: the file pins key one
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert client.batches.retrieve(batch.id).id == batch.id
        assert client.batches.cancel(batch.id).status == "cancelling"
    batch_calls = [r for r in resources.requests() if r["path"].startswith("/v1/batches")]
    assert len(batch_calls) == 9
    assert {r["key"] for r in batch_calls} == {KEY_1}


def test_a_response_chain_stays_on_the_key_that_made_each_response(
    client: openai.OpenAI, resources: ResourceUpstream
) -> None:
    previous = None
    for _ in range(6):
        response = client.responses.create(
            model="gpt-4.1", input="hi", previous_response_id=previous
        )
        assert client.responses.retrieve(response.id).id == response.id
        previous = response.id
    first_keys = {r["key"] for r in resources.requests() if r.get("previous", "") is None}
    assert len(first_keys) == 1
    # The chain's every later call went with the key of its first response.
    assert {r["key"] for r in resources.requests()} == first_keys
    # A new chain may start on the other key: round robin still applies to new objects.
    fresh = [client.responses.create(model="gpt-4.1", input="hi").model_extra for _ in range(2)]
    assert {f["key_seen"] for f in fresh if f} == {KEY_1[-4:], KEY_2[-4:]}


def test_retrieving_a_response_does_not_count_its_tokens_again(
    client: openai.OpenAI, proxy: ProxyProcess
) -> None:
    """The usage of a stored response (or a batch, polled) was spent once, when it was
    made: each retrieval showing it again must not add to the token counters."""
    response = client.responses.create(model="gpt-4.1", input="hi")
    for _ in range(3):
        assert client.responses.retrieve(response.id).usage is not None
    time.sleep(0.2)  # the access log is flushed every 50 ms
    tokens = {}
    for line in proxy.log().splitlines():
        if line.startswith("{") and f"/v1/responses/{response.id}" in line:
            tokens.setdefault("retrieve", []).append(orjson_loads(line)["prompt_tokens"])
        elif line.startswith("{") and '"path":"/v1/responses"' in line:
            tokens["create"] = [orjson_loads(line)["prompt_tokens"]]
    assert tokens["retrieve"] == [0, 0, 0]
    assert tokens["create"][-1] == 3


def test_replicas_sharing_redis_send_a_chain_to_the_key_that_made_it(
    resources: ResourceUpstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    text = config(resources, f"storage: {redis_server.url}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_proxy(text, tmp_path / "a")
    second = start_proxy(text, tmp_path / "b")
    try:
        made = openai.OpenAI(base_url=first.base_url, api_key="k", max_retries=0)
        other = openai.OpenAI(base_url=second.base_url, api_key="k", max_retries=0)
        for _ in range(4):  # each replica's round robin starts afresh: both keys get used
            response = made.responses.create(model="gpt-4.1", input="hi")
            followed = other.responses.create(
                model="gpt-4.1", input="more", previous_response_id=response.id
            )
            assert other.responses.retrieve(followed.id).previous_response_id == response.id
    finally:
        first.stop()
        second.stop()


@pytest.mark.serial  # reads a time window
def test_speech_is_streamed_to_the_client_as_the_upstream_makes_it(
    client: openai.OpenAI,
) -> None:
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(
        model="speech", voice="alloy", input="hello", extra_body={"pause": 1.5}
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        pieces = response.iter_bytes()
        first = next(pieces)
        first_at = time.monotonic() - started
        rest = b"".join(pieces)
    assert first.startswith(b"ID3")
    assert first_at < 1.0  # the upstream sent the rest 1.5 s later
    assert len(first) + len(rest) == 4 * (3 + 4096)


def test_a_fine_tuned_model_is_retrieved_and_deleted_on_the_backend_that_routes_it(
    client: openai.OpenAI, resources: ResourceUpstream
) -> None:
    model_id = "ft:gpt-4o-mini:acme::abc123"
    assert client.models.retrieve(model_id).owned_by == "me"
    assert client.models.delete(model_id).deleted is True
    seen = [(r["method"], r["path"]) for r in resources.requests()]
    assert seen == [("GET", f"/v1/models/{model_id}"), ("DELETE", f"/v1/models/{model_id}")]


def test_a_model_less_post_without_a_body_reaches_the_default_backend(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    resources.forget()
    answer = httpx.post(f"{proxy.base_url}/batches/batch_missing/cancel")
    assert answer.status_code == 404  # the upstream's own answer: it has no such batch
    assert answer.json()["error"]["message"] == "No such batch"
    assert answer.headers["x-proxy-backend"] == "openai"
    assert [r["path"] for r in resources.requests()] == ["/v1/batches/batch_missing/cancel"]


def test_without_paths_or_default_a_model_less_request_is_a_404_naming_the_fix(
    resources: ResourceUpstream, tmp_path: Path
) -> None:
    text = config(resources).replace("default_backend: openai", "")
    proxy = start_proxy(text, tmp_path)
    try:
        answer = httpx.get(f"{proxy.base_url}/vector_stores")
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert error["code"] == "no_route"
        assert "paths:" in error["message"] and "default_backend" in error["message"]
        assert "/vector_stores" in error["message"]
    finally:
        proxy.stop()


def test_an_upload_over_max_upload_size_is_413(resources: ResourceUpstream, tmp_path: Path) -> None:
    proxy = start_proxy(config(resources, "server: {max_upload_size: 1MiB}"), tmp_path)
    try:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.APIStatusError) as raised:
            client.files.create(file=("big.bin", b"x" * (2 * 1024 * 1024)), purpose="batch")
        assert raised.value.status_code == 413
        assert raised.value.body["code"] == "request_too_large"  # type: ignore[index]
    finally:
        proxy.stop()


def test_a_download_cut_by_the_upstream_is_cut_for_the_client_too(proxy: ProxyProcess) -> None:
    url = f"{proxy.base_url}/files/file-big/content?size=10000000&cut=1"
    # Never a short body that looks whole.
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", url, timeout=10) as download,
    ):
        for _ in download.iter_raw():
            pass
    time.sleep(0.2)
    log = proxy.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    line = next(line for line in log.splitlines() if "cut=1" in line or "file-big" in line)
    assert "body_broken" in line


@pytest.mark.serial  # reads a time window
def test_a_slow_steady_upload_outlives_body_timeout_and_a_silent_one_does_not(
    resources: ResourceUpstream, tmp_path: Path
) -> None:
    proxy = start_proxy(config(resources, "server: {body_timeout: 1}"), tmp_path)

    def upload(pause: float, pieces: int) -> Iterator[bytes]:
        yield b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
        for _ in range(pieces):
            time.sleep(pause)
            yield b"\x05" * 10_000
        yield b"\r\n--xx--\r\n"

    form = {"content-type": "multipart/form-data; boundary=xx"}
    try:
        steady = httpx.post(
            f"{proxy.base_url}/files", content=upload(0.3, 8), headers=form, timeout=10
        )
        assert steady.status_code == 200, steady.text  # 2.4 s in all, never 1 s silent
        assert steady.json()["bytes"] == 80_000
        silent = httpx.post(
            f"{proxy.base_url}/files", content=upload(1.6, 2), headers=form, timeout=10
        )
        assert silent.status_code == 408
    finally:
        proxy.stop()


def _peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kb(pid))
        time.sleep(0.02)


@pytest.mark.serial  # RSS of one process under a 300 MB transfer: alone, not beside others
def test_a_200_mb_upload_and_a_100_mb_download_keep_the_proxys_memory_flat(
    proxy: ProxyProcess, resources: ResourceUpstream
) -> None:
    pid = proxy.process.pid
    before = rss_kb(pid)
    peak = [before]
    stop = threading.Event()
    watcher = threading.Thread(target=_peak_rss, args=(pid, stop, peak))
    watcher.start()
    try:
        piece = bytes(range(256)) * 4096  # 1 MiB

        def upload() -> Iterator[bytes]:
            yield b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
            yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
            for _ in range(200):
                yield piece
            yield b"\r\n--xx--\r\n"

        answer = httpx.post(
            f"{proxy.base_url}/files",
            content=upload(),
            headers={"content-type": "multipart/form-data; boundary=xx"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["bytes"] == 200 * len(piece)
        upload_peak = peak[0]
        size = 100 * 1024 * 1024
        received = 0
        with httpx.stream(
            "GET", f"{proxy.base_url}/files/file-big/content?size={size}", timeout=60
        ) as download:
            assert download.headers["content-length"] == str(size)
            for chunk in download.iter_raw():
                received += len(chunk)
        assert received == size
    finally:
        stop.set()
        watcher.join()
    assert (upload_peak - before) < 30 * 1024, (before, upload_peak)
    assert (peak[0] - before) < 30 * 1024, (before, peak[0])
