"""``proxy check``: validate a config file and print the routing table it resolves to."""

from __future__ import annotations

from typing import TextIO

from proxy.config import Config, KeyConfig
from proxy.routing import Router


def print_table(config: Config, out: TextIO) -> None:
    router = Router(config)
    out.write(f"{config.path}: valid\n\nbackends:\n")
    for name, backend in config.backends.items():
        out.write(f"  {name}  {backend.base_url}\n")
        if backend.anthropic_base_url:
            anthropic_url, auth = backend.anthropic_base_url, backend.anthropic_auth
            out.write(f"    anthropic messages: {anthropic_url}/v1/messages (key as {auth})\n")
        for key in backend.keys:
            out.write(f"    key {key.id}: {_key_state(key)}\n")
        if backend.models:
            out.write(f"    models: {', '.join(backend.models)}\n")
        for rule in backend.request_rewrite.describe():
            out.write(f"    rewrite: {rule}\n")
        if backend.no_retry_errors:
            out.write(f"    never retried: {', '.join(sorted(backend.no_retry_errors))}\n")
    out.write("\naliases:\n")
    if not config.aliases:
        out.write("  (none)\n")
    for alias in config.aliases:
        target = router.resolve(alias)
        members = target.pool.members if target and target.pool else (target,) if target else ()
        where = ", ".join(f"{t.backend} as {t.upstream_model}" for t in members) or "NOT ROUTED"
        if len(members) > 1:
            where = f"pool of {len(members)}: {where}"
        out.write(f"  {alias} -> {config.aliases[alias]}  ({where})\n")
    out.write("\nroutes (first match wins):\n")
    if not config.routes:
        out.write("  (none: only models listed under a backend are routed)\n")
    for i, route in enumerate(config.routes):
        extras = []
        if route.strip_prefix:
            extras.append("prefix stripped")
        if route.key:
            extras.append(f"key {route.key}")
        if route.fallback:
            extras.append(
                "fallback "
                + ", ".join(
                    f.backend + (f" as {f.model}" if f.model else "") for f in route.fallback
                )
            )
        extras += [f"rewrite: {rule}" for rule in route.request_rewrite.describe()]
        suffix = f"  ({', '.join(extras)})" if extras else ""
        if len(route.deployments) == 1:
            out.write(f"  {i}. '{route.prefix}*' -> {route.backend}{suffix}\n")
            continue
        head = f"{route.strategy}, at most {route.max_attempts} attempts, affinity {route.affinity}"
        out.write(f"  {i}. '{route.prefix}*' -> pool ({head}){suffix}\n")
        for d in route.deployments:
            pinned = f", key {d.key}" if d.key else ""
            sent = f" as {d.model}" if d.model else ""
            out.write(f"       - {d.backend}{sent} (weight {d.weight:g}{pinned})\n")
    out.write("\nrequests without a model (first match on the path after /v1):\n")
    for path_rule in config.paths:
        pinned = f"  (key {path_rule.key})" if path_rule.key else ""
        out.write(f"  {path_rule.prefix}[/...] -> {path_rule.backend}{pinned}\n")
    if config.default_backend is not None:
        out.write(f"  anything else -> {config.default_backend}\n")
    elif not config.paths:
        out.write("  (none: such requests get 404 no_route; add paths: or default_backend)\n")
    warnings = offline_warnings(config, router)
    if warnings:
        out.write("\nwarnings:\n")
        out.writelines(f"  warning: {w}\n" for w in warnings)


def offline_warnings(config: Config, router: Router) -> list[str]:
    """What is valid but likely a mistake: found without calling any backend."""
    warnings = []
    for alias, model in config.aliases.items():
        target = router.resolve(alias)
        models = config.backends[target.backend].models if target else ()
        if target and models and target.upstream_model not in models:
            warnings.append(
                f"alias {alias} -> {model}: backend {target.backend} does not list "
                f"{target.upstream_model!r} in its models ({', '.join(models)})"
            )
    for name, backend in config.backends.items():
        warnings += [
            f"backends.{name}.keys {key.id}: written in the file in plain text; "
            f'read it from the environment instead (key: "${{VAR}}")'
            for key in backend.keys
            if key.present and not key.env_vars
        ]
    warnings += [
        f"clients {client.id}: key written in the file in plain text; "
        f'read it from the environment instead (key: "${{VAR}}")'
        for client in config.clients
        if client.key and not client.env_vars
    ]
    server = config.server
    if config.clients and server.admin_port is None and not server.admin_key:
        warnings.append(
            "/metrics is not served: with clients: it needs server.admin_port or "
            "server.admin_key (the main port shows it only with the admin key)"
        )
    return warnings


def _key_state(key: KeyConfig) -> str:
    if key.present:
        return f"set ({key.fingerprint})"
    if key.env_vars:
        return f"MISSING: set {' or '.join(key.env_vars)}"
    return "MISSING: empty in the config"
