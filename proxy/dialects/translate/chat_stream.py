"""Reading a Chat Completions stream, for every pair that translates from one: SSE framing
(an event split anywhere waits for its end), ``[DONE]``, the upstream's error events and
usage (in the chunk, or in the choice where Moonshot puts it), all bounded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import orjson


class StreamBroken(ValueError):
    """The chat stream cannot be translated on (an error event, or garbage)."""


MAX_EVENT = 1 << 20  # an SSE event longer than this (1 MiB) is no chat chunk
MAX_TOOL_CALLS = 256  # per answer: a stream's state stays bounded whatever it sends


def is_map(value: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict)


class ChatStreamReader:
    """Chat Completions stream bytes in, the client's events out, as they come.

    ``feed(chunk)`` returns the events the chunk completes; a subclass says what each chat
    chunk becomes (``on_chunk``, for the first choice) and how the answer ends (``end``).
    ``usage`` is the chat usage seen (for the proxy's own counts). Raises ``StreamBroken``
    on an upstream error event, an event that is not JSON, or one past 1 MiB."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        # The whole answer, once ended, for a pair whose answers the proxy keeps (Responses).
        self.final: dict[str, Any] | None = None
        self.done = False  # the chat stream's [DONE] came
        self._finish: Any = None  # the first choice's finish_reason, once it came
        self._started = False  # the client's answer was opened (``on_first``)
        self._output = 0  # text and argument characters seen: the estimate without usage
        self._pending: list[bytes] = []  # an event's start, until its end comes
        self._pending_size = 0
        self.call_ids: list[str] = []  # the answer's tool calls (their slots): each one's id
        self._sent_ids: list[Any] = []  # ... and the id the upstream sent for it
        self._slots: dict[int, int] = {}  # chat tool call position -> slot
        self._last_slot: int | None = None  # the slot the last tool delta went to

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""  # after [DONE]: nothing more is the answer's
        if self._pending:
            # An event under way: look for its end in the new bytes only (with the few
            # before them an end may straddle), so an event in many pieces costs one pass.
            window = self._pending[-1][-3:] + chunk
            if _EVENT_END.search(window) is None:
                self._pending.append(chunk)
                self._pending_size += len(chunk)
                if self._pending_size > MAX_EVENT:
                    raise StreamBroken("an upstream event past 1 MiB")
                return b""
            buffer = b"".join(self._pending) + chunk
            self._pending.clear()
        else:
            buffer = chunk
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(buffer):  # one pass: no copy per event
            data = _data_of(buffer[start : match.start()])
            start = match.end()
            if data is not None:
                out.append(self._on_data(data))
                if self.done:
                    return b"".join(out)
        rest = buffer[start:]
        self._pending_size = len(rest)
        if rest:
            self._pending.append(rest)
        if self._pending_size > MAX_EVENT:
            raise StreamBroken("an upstream event past 1 MiB")
        return b"".join(out)

    def end(self) -> bytes:
        """The closing events (after ``[DONE]``, or a clean end with a finish reason)."""
        raise NotImplementedError

    @property
    def complete(self) -> bool:
        """The chat stream ended as it should: ``[DONE]``, or at least a finish reason."""
        return self.done or self._finish is not None

    def _on_data(self, data: bytes) -> bytes:
        if data.strip() == b"[DONE]":
            self.done = True
            return b""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamBroken("an upstream event that is not JSON") from None
        if not is_map(chunk):
            return b""
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if is_map(error) else None
            raise StreamBroken(str(message or "the upstream failed mid-stream"))
        out = [self.on_first(chunk)] if not self._started else []
        if is_map(chunk.get("usage")):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not is_map(choice) or choice.get("index", 0) != 0:
                continue  # (n > 1: the first choice is the answer)
            if is_map(choice.get("usage")):  # Moonshot's place for it
                self.usage = choice["usage"]
            out.append(self.on_choice(choice))
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
        return b"".join(out)

    call_prefix = "call_"  # of the ids made for calls the upstream sent without one

    def slot_of(self, call: Mapping[str, Any]) -> tuple[int, bool]:
        """The answer's tool call (its slot, 0, 1, ...) a chat tool-call delta belongs to,
        and whether it begins it. Servers differ: some send no ``index`` (the open call
        goes on, or an id begins a new one), some reuse an index for a new id."""
        call_id = call.get("id")
        position = call.get("index")
        if not isinstance(position, int):
            position = self._last_slot_position(call_id)
        slot = self._slots.get(position)
        if slot is not None and call_id and call_id != self._sent_ids[slot]:
            slot = None  # a new id at a used index: another call
            position = -2 - len(self.call_ids)  # a position of our own, never a chat index
        new = slot is None
        if slot is None:
            if len(self.call_ids) >= MAX_TOOL_CALLS:
                raise StreamBroken(f"the upstream sent over {MAX_TOOL_CALLS} tool calls")
            slot = len(self.call_ids)
            given = str(call_id) if isinstance(call_id, str) and call_id else ""
            # Ids must tell the calls apart: the client matches each result to its call.
            if not given or given in self.call_ids or len(given) > 128:
                given = f"{self.call_prefix}{slot}"
            self.call_ids.append(given)
            self._sent_ids.append(call_id)
            self._slots[position] = slot
        self._last_slot = slot
        return slot, new

    def _last_slot_position(self, call_id: Any) -> int:
        if call_id is None and self._last_slot is not None:
            return next(p for p, s in self._slots.items() if s == self._last_slot)
        return -2 - len(self.call_ids)

    @property
    def text_bytes(self) -> int:
        """Characters of text and arguments seen: the estimate when no usage came."""
        return self._output

    def on_first(self, chunk: Mapping[str, Any]) -> bytes:
        """The events that open the client's answer, at the stream's first chunk (it sets
        ``_started``)."""
        raise NotImplementedError

    def on_choice(self, choice: Mapping[str, Any]) -> bytes:
        """The events one chunk's first choice (its ``delta``) makes."""
        raise NotImplementedError


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _data_of(raw: bytes) -> bytes | None:
    """The data of one SSE event (its ``data:`` lines joined), None for a comment."""
    lines = [
        line[5:].removeprefix(b" ")
        for line in raw.replace(b"\r\n", b"\n").split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None
