"""Command line: ``proxy serve`` and ``proxy check``. Exit 2 means the config is invalid."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.config
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError, load_config

log = logging.getLogger("proxy")

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
        elif args.command == "serve" and _log_format(args) == "json":
            _configure_logging(_log_config(args.log_level, "json"))
            for problem in exc.problems:
                log.error("error: %s", problem)
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
    from proxy import server
    from proxy.app import ADMIN_PORT_ENV, with_admin_port
    from proxy.exposure import BIND_HOST_ENV, refusal

    host = args.host or config.server.host
    port = args.port or config.server.port
    refused = refusal(config, host)
    if refused is not None:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    os.environ[BIND_HOST_ENV] = host  # a reload is held to the same rule (workers too)
    if args.admin_port is not None:
        config = with_admin_port(config, args.admin_port)
        os.environ[ADMIN_PORT_ENV] = str(args.admin_port)  # for the workers' own load
    log_format = _log_format(args)
    log_config = _log_config(args.log_level, log_format)
    _configure_logging(log_config)
    if args.workers <= 1:
        from proxy.app import ProxyApp

        app = ProxyApp(config, log_format=log_format)
        return server.serve(
            config,
            app,
            host=host,
            port=port,
            workers=1,
            log_config=log_config,
            log_level=args.log_level,
        )
    from proxy.app import CONFIG_ENV, LOG_FORMAT_ENV, SUPERVISOR_ENV

    if config.storage.startswith("memory://"):
        log.warning(
            "%d workers with storage memory://: rate limits and reconnect backoff are "
            "counted per worker (set storage: redis://... to share)",
            args.workers,
        )
    os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    os.environ[LOG_FORMAT_ENV] = log_format
    # Workers sum their metrics through files here; made fresh at every start.
    metrics_dir = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return server.serve(
            config,
            "proxy.app:create_app",
            host=host,
            port=port,
            workers=args.workers,
            log_config=log_config,
            log_level=args.log_level,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _log_format(args: argparse.Namespace) -> str:
    fmt: str | None = getattr(args, "log_format", None)
    return fmt or ("text" if sys.stderr.isatty() else "json")


def _configure_logging(config: dict[str, Any]) -> None:
    """Before anything logs: uvicorn applies the same config again (in each worker too)."""
    logging.config.dictConfig(config)
    logging.captureWarnings(True)  # Python warnings become records, JSON ones included


MAX_WORKERS = 64  # one per core is the advice; past this a typo would fork the machine away


def _bounded_int(text: str, low: int, high: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected a {what} from {low} to {high}, got {value}")
    return value


def _port(text: str) -> int:
    return _bounded_int(text, 1, 65535, "port number")


def _workers(text: str) -> int:
    return _bounded_int(text, 1, MAX_WORKERS, "number of workers")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxy", description="OpenAI-compatible LLM proxy")
    parser.add_argument("--version", action="version", version=f"proxy {__version__}")
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="config.yaml", help="config file (config.yaml)")
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=_port, help="listen port (default: server.port)")
    serve.add_argument(
        "--admin-port",
        type=_port,
        help="serve /metrics and /admin/* only on this port (default: server.admin_port)",
    )
    serve.add_argument(
        "--workers", type=_workers, default=1, help=f"worker processes (1; at most {MAX_WORKERS})"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="format of every log line (default: text on a terminal, json otherwise)",
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


def _log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    from proxy.logfmt import log_config

    return log_config(level, fmt)
