"""An https upstream with a private CA's certificate (a self-hosted vLLM, an internal
gateway): trusted through the backend's ``ca_file``, answers and streams pass; without it,
the proxy's 502 says why and what to set; a ``ca_file`` that cannot be loaded is refused
when the config is read, naming the field.

The certificate is made by ``openssl`` in the test (skipped, saying so, without it)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import MOCK, ProxyProcess, keep, read_listening_port, start_proxy
from tests.mock_upstream import self_signed_certificate

pytestmark = pytest.mark.e2e

CLIENT = "ck-tls-000000000000000000"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate can be made for the test")
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_port(certificate: tuple[Path, Path]) -> Iterator[int]:
    cert, key = certificate
    process = subprocess.Popen(
        [sys.executable, str(MOCK), "--port", "0", "--cert", str(cert), "--key", str(key)],
        stdout=subprocess.PIPE,
        text=True,
    )
    keep(process)
    yield read_listening_port(process, "https mock upstream")
    process.terminate()
    process.wait(timeout=5)


def config(port: int, ca_file: Path | None) -> str:
    trust = f"\n    ca_file: {ca_file}" if ca_file is not None else ""
    return f"""
backends:
  private:
    base_url: https://127.0.0.1:{port}/v1{trust}
    keys: [{{id: private-key, key: "sk-private-000000000000"}}]
clients:
  - {{id: team, key: "{CLIENT}"}}
routes:
  - {{prefix: "", backend: private}}
"""


@pytest.fixture
def trusting(https_port, certificate, tmp_path) -> Iterator[ProxyProcess]:
    process = start_proxy(config(https_port, certificate[0]), tmp_path)
    yield process
    process.stop()


def sdk(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=CLIENT, max_retries=0)


def test_a_private_ca_trusted_through_ca_file_answers_and_streams(trusting):
    client = sdk(trusting)
    answer = client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    chunks = client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_without_ca_file_the_502_says_the_certificate_is_refused_and_what_to_set(
    https_port, tmp_path
):
    proxy = start_proxy(config(https_port, None), tmp_path)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            sdk(proxy).chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.status_code == 502
        message = str(refused.value.body)
        assert "certificate" in message and "ca_file" in message
    finally:
        proxy.stop()


def test_a_ca_file_that_cannot_be_loaded_is_refused_at_start_naming_it(https_port, tmp_path):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n")
    path = tmp_path / "config.yaml"
    for ca_file, wanted in (
        (bad, "cannot load certificates"),
        (tmp_path / "nope.pem", "no such file"),
    ):
        path.write_text(config(https_port, ca_file))
        checked = subprocess.run(
            [sys.executable, "-m", "proxy", "check", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode != 0
        assert "ca_file" in checked.stdout + checked.stderr
        assert wanted in checked.stdout + checked.stderr
        assert "Traceback" not in checked.stderr


def test_a_reload_that_removes_ca_file_takes_the_trust_away_at_once(
    https_port, certificate, tmp_path
):
    proxy = start_proxy(config(https_port, certificate[0]), tmp_path)
    try:
        request = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
        assert sdk(proxy).chat.completions.create(**request).choices
        (tmp_path / "config.yaml").write_text(config(https_port, None))
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        status = 200
        while status == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                sdk(proxy).chat.completions.create(**request)
            except openai.APIStatusError as refused:
                status, body = refused.status_code, str(refused.body)
        assert status == 502 and "ca_file" in body
    finally:
        proxy.stop()
