"""Command line: ``proxy serve`` and ``proxy check``. Exit 2 means the config is invalid."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_PROBLEMS = 1  # `check --online` found a key or model that does not work
EXIT_INVALID_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    if args.command == "schema":
        from proxy.schema import print_schema

        return print_schema(sys.stdout, markdown=args.markdown)
    try:
        config = load_config(args.config)
    except ConfigError as exc:  # every problem of the file, one per line
        if args.command == "check" and args.json:
            errors = [p._asdict() for p in exc.problems]
            print(json.dumps({"valid": False, "error": errors[0], "errors": errors}))
        else:
            print("\n".join(f"error: {p}" for p in exc.problems), file=sys.stderr)
        return EXIT_INVALID_CONFIG
    if args.command == "check":
        return check(config, args)
    return serve(config, args)


def check(config: Config, args: argparse.Namespace) -> int:
    from proxy.check import print_table

    if not args.online:
        if args.json:
            print(json.dumps({"valid": True, "config": config.path, "sha256": config.digest}))
        else:
            print_table(config, sys.stdout)
        return EXIT_OK
    from proxy.online import check_online, print_report

    report = asyncio.run(check_online(config))
    if args.json:
        print(json.dumps({"valid": True, **report.as_json()}, indent=2))
    else:
        print_table(config, sys.stdout)
        print_report(report, sys.stdout)
    return EXIT_OK if report.errors == 0 else EXIT_PROBLEMS


def serve(config: Config, args: argparse.Namespace) -> int:
    import uvicorn

    host = args.host or config.server.host
    port = args.port or config.server.port
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,  # the proxy writes its own line per request
        "server_header": False,
        "proxy_headers": False,  # never trust X-Forwarded-For blindly
        "log_config": _log_config(args.log_level),
        "timeout_graceful_shutdown": 30,
    }
    log_format = args.log_format or ("text" if sys.stderr.isatty() else "json")
    if args.workers > 1:
        from proxy.app import CONFIG_ENV, LOG_FORMAT_ENV

        if config.storage.startswith("memory://"):
            print(
                f"warning: {args.workers} workers with storage memory://: rate limits and "
                "reconnect backoff are counted per worker (set storage: redis://... to share)",
                file=sys.stderr,
            )
        os.environ[CONFIG_ENV] = os.path.abspath(args.config)
        os.environ[LOG_FORMAT_ENV] = log_format
        # Workers sum their metrics through files here; made fresh at every start.
        metrics_dir = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            uvicorn.run("proxy.app:create_app", factory=True, workers=args.workers, **options)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        from proxy.app import ProxyApp

        uvicorn.run(ProxyApp(config, log_format=log_format), **options)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description="OpenAI-compatible LLM proxy")
    parser.add_argument("--version", action="version", version=f"proxy {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.yaml", help="config file (config.yaml)")
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="access log format (default: text on a terminal, json otherwise)",
    )

    check = commands.add_parser("check", help="validate the config, print the routing table")
    check.add_argument("--config", default="config.yaml", help="config file (config.yaml)")
    check.add_argument(
        "--online", action="store_true", help="try every key and model id against the backends"
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")

    schema = commands.add_parser("schema", help="print the config file's JSON Schema")
    schema.add_argument("--markdown", action="store_true", help="the reference table instead")
    return parser


def _log_config(level: str) -> dict[str, Any]:
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
        },
        "loggers": {
            "proxy": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
        },
    }
