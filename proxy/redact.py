"""Scrubbing secrets out of whatever the proxy writes or passes on.

An upstream may echo the key it was sent (in a 401's message, say); that text then flows
into the client's response, the log line that takes the key out of rotation, /admin and
``proxy check --online``. Every configured key value, and its percent-encoded form, is
replaced with its fingerprint (``sk-…a1b2``) before it leaves the process.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from proxy.config import Config

# Shorter values are placeholders (``ollama``), not secrets, and replacing them would
# mangle ordinary text.
_MIN_SECRET_LENGTH = 12


def fingerprint(secret: str) -> str:
    """``sk-…a1b2``: enough to tell keys apart, never enough to use one."""
    if not secret:
        return "(missing)"
    if len(secret) < 12:
        return "…"  # too short to show any of it safely
    head = secret[:3] if secret[2] == "-" else secret[:2]
    return f"{head}…{secret[-4:]}"


class Redactor:
    __slots__ = ("_alphabet", "_pairs", "_text_pairs")

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
        self._alphabet = frozenset(b for secret in pairs for b in secret)
        self._text_pairs = [(a.decode(), b.decode()) for a, b in self._pairs]

    @classmethod
    def for_config(cls, config: Config) -> Redactor:
        secrets = [k.value for b in config.backends.values() for k in b.keys]
        secrets += [c.key for c in config.clients]
        secrets.append(config.server.admin_key)
        return cls(s for s in secrets if s)

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def stream_chunk(self, data: bytes) -> tuple[bytes, bytes]:
        """A stream chunk scrubbed, and the bytes to hold back: the longest end of it that
        could be the start of a secret the next chunk completes. A chunk that ends like
        SSE does (a newline, which no secret holds) is held back not at all."""
        if self.found_in(data):
            data = self.bytes(data)
        if not data or data[-1] not in self._alphabet:
            return data, b""
        keep = 0
        for secret, _ in self._pairs:
            for length in range(min(len(secret) - 1, len(data)), keep, -1):
                if data.endswith(secret[:length]):
                    keep = length
                    break
        return (data[:-keep], data[-keep:]) if keep else (data, b"")

    def found_in(self, data: bytes) -> bool:
        return any(secret in data for secret, _ in self._pairs)

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


# userinfo in a URL: keep a user name, never a password (``redis://user:pw@host``,
# ``redis://:pw@host``); a bare ``token@`` could be a password too: hidden whole.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")
_SECRET_PARAMS = re.compile(
    r"(?P<name>[?&;](?:password|passwd|pass|pwd|secret|token|key|auth)=)[^&#;]*", re.IGNORECASE
)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``: in the userinfo and in the query."""

    def userinfo(match: re.Match[str]) -> str:
        info = match["userinfo"]
        user, colon, _ = info.rpartition(":") if ":" in info else ("", "", info)
        shown = f"{user}:***" if colon else "***"
        return f"{match['scheme']}{shown}@"

    return _SECRET_PARAMS.sub(r"\g<name>***", _USERINFO.sub(userinfo, url))
