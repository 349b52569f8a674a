"""The real Codex CLI (``codex exec``, which speaks only the Responses API) through the
proxy to a backend that speaks only Chat Completions: a shell tool round trip (the scripted
upstream asks for ``cat hello.txt``; Codex runs it and sends its output back), then a
second turn of the same session (``codex exec resume``), counted as the upstream's usage.

The CLI comes from npm at a pinned version, installed once into a cache outside the clone
(~/.cache/llm-proxy-tests); without npm or the registry the test is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chat_upstream import USAGE, ChatUpstream, chat_only_config
from tests.conftest import ProxyProcess, npm_cli, start_proxy

pytestmark = pytest.mark.e2e

CLIENT_KEY = "ck-codex-cli-00000000000"


def codex_cli() -> Path:
    return npm_cli("@openai/codex", "0.171.0", "codex")  # pinned, as every install is


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("codex-work")
    (folder / "hello.txt").write_text("the secret word is MANGO\n")
    return folder


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatUpstream]:
    upstream = ChatUpstream(("exec_command", {"cmd": "cat hello.txt"}))
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def proxy(chat: ChatUpstream, tmp_path_factory) -> Iterator[ProxyProcess]:
    config = chat_only_config(chat, CLIENT_KEY, "aliases: {kimi-k2: chat-model}\n")
    tmp = tmp_path_factory.mktemp("codex-proxy")
    process = start_proxy(config, tmp, extra_args=("--log-format", "json"))
    yield process
    process.stop()


def codex_home(folder: Path, proxy: ProxyProcess) -> Path:
    """Codex's config: the proxy as a Responses provider; its built-in web search off (a
    chat backend has none: the proxy refuses it by name)."""
    home = folder / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f"""model = "kimi-k2"
model_provider = "proxy"
web_search = "disabled"

[model_providers.proxy]
name = "proxy"
base_url = "{proxy.url}/v1"
env_key = "PROXY_KEY"
wire_api = "responses"
"""
    )
    return home


def run_codex(binary: Path, home: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home.parent),
        "CODEX_HOME": str(home),
        "PROXY_KEY": CLIENT_KEY,
    }
    command = [str(binary), "exec", "--skip-git-repo-check", "--json", *args]
    # Its own sandbox needs user namespaces, which a CI container may lack: the command the
    # upstream asks for is the test's own `cat`.
    command[2:2] = ["--dangerously-bypass-approvals-and-sandbox"]
    return subprocess.run(
        command, cwd=work, env=env, capture_output=True, text=True, timeout=90, check=False
    )


def messages_of(output: str) -> list[str]:
    """The agent's messages in ``codex exec --json``'s event lines."""
    found = []
    for line in output.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        item = event.get("item") if isinstance(event, dict) else None
        if isinstance(item, dict) and item.get("type") == "agent_message":
            found.append(str(item.get("text", "")))
    return found


def test_codex_runs_a_shell_tool_round_trip_and_a_second_turn(proxy, chat, work, tmp_path):
    binary = codex_cli()
    home = codex_home(tmp_path, proxy)
    first = run_codex(binary, home, work, "Read hello.txt and tell me the secret word")
    assert first.returncode == 0, first.stderr[-2000:]
    said = messages_of(first.stdout)
    assert any("MANGO" in text for text in said), (said, first.stderr[-2000:])
    # The round trip as the upstream saw it: Codex's call, then its output as a tool turn.
    sent = [r for r in chat.requests if r["model"] == "chat-model"]
    last = sent[-1]["messages"]
    assert last[-1]["role"] == "tool" and "MANGO" in last[-1]["content"]
    call = last[-2]["tool_calls"][0]
    assert call["function"]["name"] == "exec_command"
    assert json.loads(call["function"]["arguments"])["cmd"] == "cat hello.txt"
    assert last[-1]["tool_call_id"] == call["id"]
    assert last[0]["role"] == "system"  # Codex's instructions, one system message first

    before = len(chat.requests)
    second = run_codex(binary, home, work, "resume", "--last", "Thanks, and now?")
    assert second.returncode == 0, second.stderr[-2000:]
    assert len(chat.requests) > before
    # (The scripted upstream calls its tool again: the turn's first request is the one
    # that ends with the new prompt.)
    turn = next(r for r in chat.requests[before:] if r["messages"][-1]["role"] == "user")
    assert "Thanks, and now?" in str(turn["messages"][-1]["content"])
    # The second turn carries the first (Codex sends it whole: store is false).
    assert any("MANGO" in str(m.get("content")) for m in turn["messages"][:-1])

    # Every turn counted as the upstream's usage, none as a client that left.
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(x) for x in proxy.log().splitlines() if '"request_id"' in x]
        turns = [x for x in lines if x.get("path") == "/v1/responses"]
        if len(turns) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(turns) >= 4, turns  # two turns of two requests (a call, then its output)
    for line in turns:
        assert line["status"] == 200 and line.get("error") is None, line
        assert line["prompt_tokens"] == USAGE["prompt_tokens"], line
        assert line["completion_tokens"] == USAGE["completion_tokens"], line
