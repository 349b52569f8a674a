"""Who is asking: client keys, the models each client may use, and the client's address.

With ``clients:`` configured, every request needs a client key, read the way the request's
dialect carries it (``Authorization: Bearer``; for Anthropic's wire ``x-api-key`` too).
Keys are compared by their SHA-256 digest in a dict: the time taken does not depend on how
much of a guessed key is right. Without clients the proxy is open, and a client is its IP.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from proxy.config import Config
from proxy.dialects import DEFAULT, Dialect
from proxy.errors import invalid_client_key, model_not_allowed

log = logging.getLogger("proxy")


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    digest: bytes
    models: re.Pattern[str] | None  # None: every model
    shared_objects: bool = False  # `objects: shared`: sees every client's objects


class ClientAuth:
    def __init__(self, config: Config) -> None:
        self.open = not config.clients
        self._by_digest: dict[bytes, Client] = {}
        for c in config.clients:
            if not c.key:
                continue  # reported at start-up; nobody can authenticate as this client
            digest = _digest(c.key)
            pattern = _globs(c.models) if c.models else None
            self._by_digest[digest] = Client(c.id, digest, pattern, c.objects == "shared")
        self._missing = [c for c in config.clients if not c.key]
        self._trusted = [
            ipaddress.ip_network(n, strict=False) for n in config.server.trusted_proxies
        ]

    def report(self) -> None:
        if self.open:
            log.warning(
                "no clients configured: the proxy is OPEN, anyone who reaches it uses your "
                "keys; add a `clients:` section to require client keys"
            )
        for c in self._missing:
            hint = f"set {' or '.join(c.env_vars)}" if c.env_vars else "its key is empty"
            log.warning("client %s cannot authenticate: %s", c.id, hint)

    def authenticate(
        self, headers: Iterable[tuple[bytes, bytes]], dialect: Dialect = DEFAULT
    ) -> Client | None:
        """The client the request's key belongs to; None when the proxy is open."""
        if self.open:
            return None
        token = dialect.client_key(headers)
        if token is None:
            raise invalid_client_key(f"Missing client API key: {dialect.key_hint}.")
        digest = _digest(token)
        client = self._by_digest.get(digest)
        if client is None or not hmac.compare_digest(client.digest, digest):
            raise invalid_client_key("Incorrect client API key provided.")
        return client

    def check_model(self, client: Client | None, requested: str, resolved: str) -> None:
        if client is None or client.models is None:
            return
        if client.models.match(requested) or client.models.match(resolved):
            return
        raise model_not_allowed(client.id, requested)

    def address(self, scope: MutableMapping[str, Any]) -> str:
        """The client's IP; X-Forwarded-For is believed only from a trusted proxy."""
        peer = scope.get("client")
        ip = peer[0] if peer else "unknown"
        if not self._trusted or not self._is_trusted(ip):
            return ip
        # Every X-Forwarded-For line, in order: a balancer may add its own line after the
        # client's (forged) one, and the nearest hops are at the end.
        forwarded = ",".join(
            value.decode("latin-1") for key, value in scope["headers"] if key == b"x-forwarded-for"
        )
        # Walk from the nearest hop back; the first address we do not trust is the client.
        # A hop that is not an address ends the walk: whoever wrote it is not to be believed.
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            try:
                address = ipaddress.ip_address(hop)
            except ValueError:
                return ip
            if not any(address in network for network in self._trusted):
                return str(address)
            ip = str(address)
        return ip

    def _is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
