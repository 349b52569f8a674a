"""Closed by default: a proxy without ``clients:`` listens only on loopback.

Anyone who reaches an open proxy spends the operator's upstream keys, so ``proxy serve``
refuses a non-loopback bind when the config has no client keys, unless the config says
``server.open: true`` on purpose. A config reload is held to the same rule: a reload that
would turn a closed listener open is refused and the config in force stays.
"""

from __future__ import annotations

import ipaddress

from proxy.config import Config

BIND_HOST_ENV = "PROXY_BIND_HOST"  # the address `serve` bound, for the reload check

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the name localhost; anything else (0.0.0.0, ::, a LAN address,
    another name) can be reached from elsewhere."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def refusal(config: Config, host: str) -> str | None:
    """Why ``config`` must not be served on ``host``; None when it may."""
    if config.clients or config.server.open or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host}: the config ({config.path}) has no `clients:`, so "
        "anyone who reaches this address would use your upstream keys. Add client keys, e.g.\n"
        "  clients:\n"
        '    - {id: my-app, key: "${MY_APP_KEY}"}\n'
        "and send them as 'Authorization: Bearer <key>'; or listen on 127.0.0.1; or set "
        "`server.open: true` to serve without client keys on purpose (behind your own auth)."
    )
