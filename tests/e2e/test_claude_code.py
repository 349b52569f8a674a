"""The real Claude Code CLI through the proxy to a backend that speaks only Chat
Completions: `claude -p` reads a file with its Read tool (a tool loop over two turns,
streamed) and answers with what it read; the proxy counts the upstream's tokens.

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

CLIENT_KEY = "ck-claude-code-000000000"


def claude_cli() -> Path:
    return npm_cli("@anthropic-ai/claude-code", "2.1.197", "claude")  # pinned, as every install is


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("claude-work")
    (folder / "hello.txt").write_text("the secret word is PAPAYA\n")
    return folder


@pytest.fixture(scope="module")
def chat(work: Path) -> Iterator[ChatUpstream]:
    upstream = ChatUpstream(("Read", {"file_path": str(work / "hello.txt")}))
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def proxy(chat: ChatUpstream, tmp_path_factory) -> Iterator[ProxyProcess]:
    config = chat_only_config(chat, CLIENT_KEY)
    tmp = tmp_path_factory.mktemp("claude-proxy")
    process = start_proxy(config, tmp, extra_args=("--log-format", "json"))
    yield process
    process.stop()


def test_claude_code_runs_a_tool_loop_on_a_chat_only_backend(proxy, chat, work, tmp_path):
    binary = claude_cli()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),  # no user settings, no login
        "ANTHROPIC_BASE_URL": proxy.url,
        "ANTHROPIC_AUTH_TOKEN": CLIENT_KEY,
        "ANTHROPIC_MODEL": "kimi-k2",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "kimi-k2",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    prompt = f"Read {work / 'hello.txt'} and tell me the secret word."
    done = subprocess.run(
        [str(binary), "-p", prompt, "--allowedTools", "Read", "--output-format", "json"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["is_error"] is False
    assert "PAPAYA" in result["result"]  # what its Read tool returned, through the loop
    assert result["num_turns"] == 2
    turns = [r for r in chat.requests if r.get("tools")]
    assert len(turns) == 2 and all(r["stream"] is True for r in turns)
    assert turns[1]["messages"][-1]["role"] == "tool"
    assert "PAPAYA" in turns[1]["messages"][-1]["content"]
    # Each turn's usage is the upstream's, as Claude Code and the access log see it.
    assert result["usage"]["output_tokens"] == 2 * USAGE["completion_tokens"]
    deadline = time.monotonic() + 5  # the access log is written in batches
    while True:
        lines = [json.loads(x) for x in proxy.log().splitlines() if '"request_id"' in x]
        answered = [x for x in lines if x["path"].startswith("/v1/messages") and x["status"] == 200]
        if len(answered) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [x["completion_tokens"] for x in answered][-2:] == [8, 8]
