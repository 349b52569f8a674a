"""`make bench-peers`: the same load, in the same run, against LiteLLM and Portkey.

Installs each peer into a throw-away folder under bench/.peers (LiteLLM from PyPI in its own
venv, Portkey's gateway from npm), configures both to the same mock upstream as our proxy,
and prints one table: chat and 20-chunk streams at c=16, RPS, p50/p99, CPU ms per request
(the whole process tree, from /proc) and RSS. A peer that cannot be installed is reported
and skipped. Versions are pinned to the ones measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import CHAT, STREAM, free_port, start, wait_until_up, wrk

LITELLM_VERSION = os.environ.get("LITELLM_VERSION", "1.108.7")
PORTKEY_VERSION = os.environ.get("PORTKEY_VERSION", "1.15.2")
PEERS = Path(__file__).resolve().parent / ".peers"
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            stats[int(entry.name)] = fields
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier += children
    ticks = sum(int(stats[p][11]) + int(stats[p][12]) for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(root: int) -> float:
    total = 0
    for pid in [root, *_children(root)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(root: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == root:
                found.append(int(entry.name))
                found += _children(int(entry.name))
    return found


def install_litellm() -> Path | None:
    venv = PEERS / f"litellm-{LITELLM_VERSION}"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        result = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            print(f"  could not install LiteLLM: {result.stderr.strip()[-300:]}")
            return None
    return exe


def install_portkey() -> Path | None:
    folder = PEERS / f"portkey-{PORTKEY_VERSION}"
    script = folder / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not script.exists():
        print(f"installing @portkey-ai/gateway@{PORTKEY_VERSION} into {folder} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                "npm",
                "install",
                "--silent",
                "--prefix",
                str(folder),
                f"@portkey-ai/gateway@{PORTKEY_VERSION}",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not script.exists():
            print(f"  could not install Portkey: {result.stderr.strip()[-300:]}")
            return None
    return script


def measure(
    name: str, pid: int, url: str, lua_dir: Path, extra: dict[str, str], model: str, rows: list[str]
) -> None:
    for load, body in (("chat", CHAT), ("stream 20 chunks", STREAM)):
        body = {**body, "model": model}
        try:
            wrk(url, body, 4, lua_dir, extra)  # warm-up
            before = tree_cpu_seconds(pid)
            result = wrk(url, body, 16, lua_dir, extra)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rows.append(f"| {name} | {load} | failed: wrk printed no result ({exc}) | | | | |")
            print(rows[-1], flush=True)
            continue
        cpu_ms = (tree_cpu_seconds(pid) - before) * 1000 / max(result.requests, 1)
        rows.append(
            f"| {name} | {load} | {result.rps:,.0f} | {result.p50_ms:.2f} / "
            f"{result.p99_ms:.2f} | {cpu_ms:.2f} | {tree_rss_mb(pid):.0f} | {result.errors} |"
        )
        print(rows[-1], flush=True)


def _up(port: int, timeout: float, log: Path) -> bool:
    try:
        wait_until_up(port, timeout=timeout)
        return True
    except RuntimeError:
        print(f"  could not start (see {log}):")
        print("    " + "\n    ".join(log.read_text().strip().splitlines()[-3:]))
        return False


def main() -> int:
    mock_port = free_port()
    mock = start(
        [sys.executable, "tests/mock_upstream.py", "--port", str(mock_port), "--no-record"]
    )
    upstream = f"http://127.0.0.1:{mock_port}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    lua_dir = tmp
    processes = [mock]
    rows: list[str] = []
    today = time.strftime("%Y-%m-%d")
    print(f"# bench-peers: {os.cpu_count()} cores, {today}, {SECONDS}s per run, c=16\n")
    print("| target | load | RPS | p50 / p99 ms | CPU ms/req | RSS MB | errors |")
    print("|---|---|---|---|---|---|---|")
    try:
        wait_until_up(mock_port)
        measure(
            "direct (mock)",
            mock.pid,
            f"{upstream}/v1/chat/completions",
            lua_dir,
            {},
            "bench-model",
            rows,
        )

        port = free_port()
        env = {**os.environ, "BENCH_UPSTREAM": upstream}
        ours = start(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                "bench/config.yaml",
                "--port",
                str(port),
            ],
            env=env,
            log=tmp / "ours.log",
        )
        processes.append(ours)
        wait_until_up(port)
        time.sleep(1)
        measure(
            "this proxy (1 worker)",
            ours.pid,
            f"http://127.0.0.1:{port}/v1/chat/completions",
            lua_dir,
            {},
            "bench",
            rows,
        )
        ours.terminate()

        litellm = install_litellm()
        if litellm is not None:
            port = free_port()
            config = tmp / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n"
                f"      model: openai/bench-model\n      api_base: {upstream}/v1\n"
                "      api_key: sk-bench\n"
            )
            # The master key is the bearer wrk already sends; LiteLLM refuses to start without one.
            litellm_env = {**os.environ, "LITELLM_MASTER_KEY": "sk-bench-client"}
            peer = start(
                [str(litellm), "--config", str(config), "--port", str(port), "--num_workers", "1"],
                env=litellm_env,
                log=tmp / "litellm.log",
            )
            processes.append(peer)
            if not _up(port, 180, tmp / "litellm.log"):
                peer.terminate()
                litellm = None
        if litellm is not None:
            time.sleep(3)
            measure(
                f"LiteLLM {LITELLM_VERSION} (1 worker)",
                peer.pid,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                lua_dir,
                {},
                "bench",
                rows,
            )
            peer.terminate()

        portkey = install_portkey()
        if portkey is not None:
            port = free_port()
            peer = start(
                ["node", str(portkey), f"--port={port}", "--headless"],
                env={**os.environ, "NODE_ENV": "production"},
                log=tmp / "portkey.log",
            )
            processes.append(peer)
            if not _up(port, 60, tmp / "portkey.log"):
                portkey = None
        if portkey is not None:
            time.sleep(1)
            headers = {"x-portkey-provider": "openai", "x-portkey-custom-host": f"{upstream}/v1"}
            measure(
                f"Portkey {PORTKEY_VERSION} (Node)",
                peer.pid,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                lua_dir,
                headers,
                "bench-model",
                rows,
            )
            peer.terminate()
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
