"""Translations between wires: a client's dialect spoken to a backend that speaks another.

One module per pair, each pure (no I/O): a request body to a request body, an upstream
answer (JSON, or stream events as they come) to the client's, an upstream error to the
client's error shape. What cannot be translated is refused by name (``Untranslatable``),
never dropped. ``messages_chat``: Anthropic Messages to Chat Completions.
"""

from __future__ import annotations


class Untranslatable(ValueError):
    """A request field (or value) the pair cannot carry: the client hears which, as a 400."""

    def __init__(self, param: str, why: str) -> None:
        super().__init__(why)
        self.param = param
        self.why = why
