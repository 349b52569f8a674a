"""Scrubbing secrets out of whatever the proxy writes or passes on.

An upstream may echo the key it was sent (in a 401's message, say); that text then flows
into the client's response, the log line that takes the key out of rotation, /admin and
``proxy check --online``. Every configured key value, and its percent-encoded form, is
replaced with its fingerprint (``sk-…a1b2``) before it leaves the process.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, urlsplit, urlunsplit

from proxy.config import Config, fingerprint

# Shorter values are placeholders (``ollama``), not secrets, and replacing them would
# mangle ordinary text.
_MIN_SECRET_LENGTH = 12


class Redactor:
    __slots__ = ("_pairs", "_text_pairs")

    def __init__(self, secrets: Iterable[str]) -> None:
        pairs: dict[bytes, bytes] = {}
        for secret in secrets:
            if len(secret) < _MIN_SECRET_LENGTH:
                continue
            shown = fingerprint(secret).encode()
            for variant in {secret, quote(secret, safe="")}:
                pairs[variant.encode()] = shown
        # Longest first: a key that contains another is replaced whole.
        self._pairs = sorted(pairs.items(), key=lambda p: -len(p[0]))
        self._text_pairs = [(a.decode(), b.decode()) for a, b in self._pairs]

    @classmethod
    def for_config(cls, config: Config) -> Redactor:
        secrets = [k.value for b in config.backends.values() for k in b.keys]
        secrets += [c.key for c in config.clients]
        secrets.append(config.server.admin_key)
        return cls(s for s in secrets if s)

    def bytes(self, data: bytes) -> bytes:
        # ``in`` is a C memmem: one linear scan per secret, no regex.
        for secret, shown in self._pairs:
            if secret in data:
                data = data.replace(secret, shown)
        return data

    def text(self, text: str) -> str:
        for secret, shown in self._text_pairs:
            if secret in text:
                text = text.replace(secret, shown)
        return text


NO_SECRETS = Redactor(())
_PASSWORD_PARAMS = ("password", "pass", "pwd")


def url_without_password(url: str) -> str:
    """``redis://user:pw@host/0?password=x`` → ``redis://user:***@host/0?password=***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    secret_query = any(
        item.partition("=")[0].lower() in _PASSWORD_PARAMS for item in parts.query.split("&")
    )
    if parts.password is None and not secret_query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    query = "&".join(
        f"{name}=***" if name.lower() in _PASSWORD_PARAMS else f"{name}={value}"
        for name, _, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
