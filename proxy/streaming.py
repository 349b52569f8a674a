"""Relaying an upstream response to the ASGI client.

A stream is passed on chunk by chunk, exactly as received and as soon as received. When the
upstream dies or stalls mid-stream, the client gets one SSE error event in its dialect
(OpenAI's ``data: {"error": ...}``, Anthropic's ``event: error``) and the end of the
response, so SDKs raise instead of mistaking the failure for a clean end.

One exception to "exactly as received": when the proxy itself asked the upstream for usage
(``stream_options.include_usage``) and the client did not, the usage-only event that
request added is taken out (``strip_usage_event``), so the client gets the bytes it would
have got without the proxy's question. Only then are chunks framed into whole events.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from proxy.dialects import stream_error_event
from proxy.dialects.base import StreamKind as StreamKind
from proxy.drain import DRAINED, cancelled_by_drain
from proxy.redact import NO_SECRETS, Redactor
from proxy.usage import token_counts

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
# The event that completes a Messages stream: its ``event:`` line, or ``"type"`` key. Never
# the bare string ``"message_stop"``: a text delta whose text is exactly that word (a model
# writing about this API) holds it too. Model output is only ever inside JSON strings, where
# quotes are escaped and line ends cannot be: neither form below can be forged by it.
_STOP = re.compile(rb'"type": ?"message_stop"|[\r\n]event: ?message_stop[\r\n]')
_STOP_LONGEST = len(b'"type": "message_stop"')
# An upstream's own error event (a JSON string cannot hold a raw line end, so no text can
# forge it): the stream has ended, and told the SDK so already.
_ERROR_EVENT = re.compile(re.escape(b"\nevent: error"))
# The events that complete a Responses stream, by their ``"type"`` or ``event:`` line (model
# text is inside JSON strings, where neither form can be forged).
_RESPONSE_END = re.compile(
    rb'"type": ?"response\.(?:completed|failed|incomplete)"'
    rb"|[\r\n]event: ?response\.(?:completed|failed|incomplete)[\r\n]"
)
_RESPONSE_END_LONGEST = len(b'"type": "response.incomplete"')
# The text of a delta, for the estimate of a cut stream that reported no usage: chat's
# ``content``, Responses' ``delta``, Messages' ``text``. Bytes of JSON, escapes included:
# an estimate, marked as one. One key per kind: a pattern that starts with a long literal
# is searched at C speed (about 1 us a chunk), an alternation of keys is 5 times slower.
_STRING = rb'": ?"([^"\\]*(?:\\.[^"\\]*)*)"'
_TEXT = {kind: re.compile(b'"' + kind.text_key + _STRING) for kind in StreamKind}
CHARS_PER_TOKEN = 4  # the documented estimate: completion tokens = text bytes seen / 4


@dataclass(slots=True)
class RelayResult:
    error: str | None = None  # "stream_broken" or "timeout" when the upstream failed mid-way
    first_data_at: float | None = None  # perf_counter of the first data: event
    usage: dict[str, Any] | None = None  # the last usage the upstream reported
    text_bytes: int = 0  # bytes of delta text seen: the estimate when no usage came
    complete: bool = False  # the upstream ended the stream as its kind says a stream ends
    grace_cut: bool = False  # the client had left and the grace's byte budget ran out

    def estimated_completion(self) -> int:
        return self.text_bytes // CHARS_PER_TOKEN


# A usage object, not "usage":null (which every chunk may carry). One regex pass: as fast
# as one `in` for one spelling, where two `in` for two spellings took twice as long.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def usage_of(event_json: Any) -> dict[str, Any] | None:
    """The usage an event reports: top-level, else inside a choice (Moonshot's place for it).

    The caller keeps only the last one seen, so a provider that reports it in both places
    is counted once.
    """
    if not isinstance(event_json, dict):
        return None
    usage = event_json.get("usage")
    if isinstance(usage, dict):
        return usage
    response = event_json.get("response") or event_json.get("message")
    if isinstance(response, dict):  # Responses' response.completed, Messages' message_start
        inner = response.get("usage")
        if isinstance(inner, dict):
            return inner
    for choice in event_json.get("choices") or ():
        if isinstance(choice, dict):
            inner = choice.get("usage")
            if isinstance(inner, dict):
                return inner
    return None


def tokens(usage: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) from a usage object. Kept for older callers: new code takes
    every type with ``proxy.usage.token_counts``."""
    counts = token_counts(usage)
    return counts.prompt, counts.completion


# A line that carries usage can be long (a Responses ``response.completed`` repeats the
# whole output): one cut across chunks is held up to this much to be read whole.
MAX_USAGE_LINE = 4 << 20
_LINE_ENDS = (b"\n", b"\r")


class _UsageReader:
    """Reads usage from the ``data:`` lines that carry it, however the chunks cut them.

    Only reads: it sees every byte the upstream sent (before any is left out), and holds
    a copy of a line only while it is cut across chunks, which real upstreams rarely do.
    """

    __slots__ = ("_held", "_line", "_merge", "usage")

    def __init__(self, merge: bool = False) -> None:
        self._line: list[bytes] = []  # the start of a line the next chunk goes on with
        self._held = 0
        # Anthropic reports usage in two events (input in message_start, output in
        # message_delta): merged field by field, the larger count kept. Otherwise the last
        # usage seen wins (a provider that repeats it is counted once).
        self._merge = merge
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        if self._line:
            if b"\n" not in chunk and b"\r" not in chunk:  # the held line goes on and on
                self._hold(chunk)
                return
            chunk = self._line_goes_on(chunk)
        if chunk.endswith(_LINE_ENDS):  # nearly always: lines whole, nothing to hold
            if _USAGE_OBJECT.search(chunk) is not None:
                self._scan(chunk)
            return
        cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1  # a line is cut: held
        self._hold(chunk[cut:])
        if cut and _USAGE_OBJECT.search(chunk, 0, cut) is not None:
            self._scan(chunk[:cut])

    def finish(self) -> None:
        """The stream is over: a last line without its line end still says what it says."""
        if self._line:
            self.feed(b"\n")

    def _line_goes_on(self, chunk: bytes) -> bytes:
        """``chunk`` (which ends the held line) with that line's start put before it."""
        parts, held = self._line, self._held
        self._line = []
        self._held = 0
        if held <= MAX_USAGE_LINE:
            return b"".join([*parts, chunk])
        lf, cr = chunk.find(b"\n"), chunk.find(b"\r")  # given up: only what follows it
        return chunk[min(lf, cr) if lf >= 0 and cr >= 0 else max(lf, cr) :]

    def _hold(self, part: bytes) -> None:
        if not part:
            return
        self._held += len(part)
        if self._held > MAX_USAGE_LINE:  # given up: its end is not read as a line start
            self._line[:] = [b""]
        else:
            self._line.append(part)

    def _scan(self, data: bytes) -> None:
        for line in data.splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    found = usage_of(orjson.loads(line[5:]))
                except orjson.JSONDecodeError:
                    continue
                if found is not None:
                    self.usage = merged(self.usage, found) if self._merge else found


def merged(earlier: dict[str, Any] | None, later: dict[str, Any]) -> dict[str, Any]:
    """Two usage objects of one stream as one: per field the larger count (Anthropic's
    counts are cumulative), any other value from the later."""
    if earlier is None:
        return later
    both = {**earlier, **later}
    for name, value in earlier.items():
        other = later.get(name)
        if type(value) is int and type(other) is int and value > other:
            both[name] = value
    return both


# ---------------------------------------------------------------- the usage-only event

# Held bytes of one unfinished event while framing. Past this an event is passed on as it
# comes (unframed) until it ends: an upstream that never ends an event cannot grow memory.
MAX_HELD_EVENT = 1 << 20

# SSE: a line ends with CRLF, LF or CR; an event ends with an empty line. A CR at the very
# end of what has arrived may be half of a CRLF: the event is complete only once the next
# byte shows (or the stream has ended), or the client would see a stray LF as a blank line.
_LINE_END = rb"(?:\r\n|\n|\r(?!\n))"
_EVENT_END = re.compile(_LINE_END + rb"(?:\r\n|\n|\r(?=[^\n]))")
_EVENT_END_AT_EOF = re.compile(_LINE_END + rb"(?:\r\n|\n|\r(?!\n))")
_LF_EVENT_ENDS = (b"\n\n", b"\n\r\n")  # unambiguous whatever precedes them
_LINE = re.compile(rb"([^\r\n]*)(?:\r\n|\n|\r)")
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')  # cheap test before parsing
_TAIL = 3  # bytes of context kept for an event end split between chunks (\r\n + \r)


def _last_event_end(data: bytes, pattern: re.Pattern[bytes] = _EVENT_END) -> int:
    """The offset just past the last event end in ``data`` (which starts at a line
    boundary), or -1. An earlier real end than the last may be returned in contrived runs
    of blank lines: that only holds an empty event back a little longer."""
    if data.endswith(_LF_EVENT_ENDS):  # nearly every chunk of nearly every stream
        return len(data)
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
    end = max(lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1)
    if data.find(b"\r", max(end, 0)) < 0:  # any later end would need a CR
        return end
    for match in pattern.finditer(data, max(end - 2, 0)):
        end = max(end, match.end())
    return end


def _is_usage_only(data_lines: list[bytes]) -> bool:
    try:
        event = orjson.loads(b"\n".join(data_lines))
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(event, dict)
        and event.get("choices") == []
        and isinstance(event.get("usage"), dict)
    )


def without_usage_events(events: bytes) -> bytes:
    """``events`` (whole SSE events) minus each usage-only event: its lines and the blank
    line that ends it. An event with a field other than ``data`` (``event:``, ``id:``,
    ``retry:``) is never one: taking it out would change the client's state."""
    kept: list[bytes] = []
    kept_from = start = 0  # where the bytes still to keep begin; where this event began
    data: list[bytes] = []
    only_data = True
    for line in _LINE.finditer(events):
        content = line.group(1)
        if content:
            if content[0] == 0x3A:  # ":" a comment, part of whatever event it is in
                continue
            name, _, value = content.partition(b":")
            if name == b"data":
                data.append(value[1:] if value[:1] == b" " else value)
            else:
                only_data = False
            continue
        if data and only_data and _is_usage_only(data):
            kept.append(events[kept_from:start])
            kept_from = line.end()
        start = line.end()
        data = []
        only_data = True
    if not kept:
        return events
    kept.append(events[kept_from:])
    return b"".join(kept)


class _UsageEventStripper:
    """Frames a stream into whole events and leaves the usage-only ones out.

    Holds back only an unfinished trailing event (which no SSE client could act on yet),
    at most ``MAX_HELD_EVENT`` bytes of it.
    """

    __slots__ = ("_held", "_parts", "_seeking", "_tail")

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # the unfinished event (a list: no quadratic joins)
        self._held = 0
        self._tail = b""  # the last bytes held (or, seeking, passed on)
        self._seeking = False  # an over-long event passed on unframed: seeking its end

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to pass on now: every event ``chunk`` completes, usage-only ones out."""
        if self._seeking:
            return self._seek(chunk)
        window = self._tail + chunk if self._parts else chunk
        end = _last_event_end(window)
        if end < 0:
            self._hold(chunk)
            return self._overflow() if self._held > MAX_HELD_EVENT else b""
        if not self._parts and end == len(chunk):  # whole events, nothing held: no copy
            return self._events(chunk)
        buffered = b"".join([*self._parts, chunk]) if self._parts else chunk
        cut = len(buffered) - len(window) + end
        self._parts.clear()
        self._held = 0
        self._tail = b""
        out = self._events(buffered[:cut])
        if cut < len(buffered):
            self._hold(buffered[cut:])
            if self._held > MAX_HELD_EVENT:
                out += self._overflow()
        return out

    def finish(self) -> bytes:
        """At the end of the stream, what is still held: complete events (a final CR now
        ends a line for sure), usage-only ones out, then any unended rest as it came."""
        if not self._parts:
            return b""
        held = b"".join(self._parts)
        self._parts.clear()
        self._held = 0
        end = _last_event_end(held, _EVENT_END_AT_EOF)
        if end < 0:
            return held
        return self._events(held[:end]) + held[end:]

    def _events(self, events: bytes) -> bytes:
        if _EMPTY_CHOICES.search(events) is None:
            return events
        return without_usage_events(events)

    def _hold(self, data: bytes) -> None:
        self._parts.append(data)
        self._held += len(data)
        self._tail = (self._tail + data[-_TAIL:])[-_TAIL:]

    def _overflow(self) -> bytes:
        """An event past the cap is no usage event: pass it on as it comes until it ends."""
        out = b"".join(self._parts)
        self._parts.clear()
        self._held = 0
        self._seeking = True
        return out

    def _seek(self, chunk: bytes) -> bytes:
        window = self._tail + chunk
        for match in _EVENT_END.finditer(window):
            if match.end() >= len(self._tail):  # ends in this chunk (or at its start)
                cut = match.end() - len(self._tail)
                self._seeking = False
                self._tail = b""
                return chunk[:cut] + self.feed(chunk[cut:]) if cut < len(chunk) else chunk
        self._tail = window[-_TAIL:]
        return chunk


class TranslationBroken(aiohttp.ClientPayloadError):
    """The upstream's stream cannot be translated on; its message says why."""


class TranslatedStream:
    """An upstream's stream read through a translation (``translated``): what
    ``relay_stream`` relays is then the client's wire, counted and checked as such."""

    def __init__(self, response: aiohttp.ClientResponse, translator: StreamTranslator) -> None:
        self._response = response
        self._translator = translator

    @property
    def content(self) -> TranslatedStream:
        return self

    async def iter_any(self) -> AsyncIterator[bytes]:
        translator = self._translator
        async for chunk in self._response.content.iter_any():
            try:
                out = translator.feed(chunk)
            except ValueError as exc:  # the translation's StreamBroken: a broken stream
                raise TranslationBroken(str(exc)) from None
            if out:
                yield out
            if translator.done:  # [DONE]: the answer is whole, whatever the upstream does on
                break
        if translator.complete:  # else the client's end never comes: told it broke
            yield translator.end()

    def settle(self, result: RelayResult) -> None:
        """What the relay counts is the upstream's own usage (the client's events carry a
        copy made up as they went), or, without one, the text seen for the estimate."""
        translator = self._translator
        result.usage = translator.usage
        if translator.usage is None:
            result.text_bytes = translator.text_bytes


class StreamTranslator(Protocol):
    """Upstream stream bytes in, the client's wire out (``ValueError``: it cannot go on)."""

    @property
    def complete(self) -> bool: ...

    @property
    def done(self) -> bool: ...

    @property
    def usage(self) -> dict[str, Any] | None: ...

    @property
    def text_bytes(self) -> int: ...

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


def translated(response: aiohttp.ClientResponse, translator: StreamTranslator) -> TranslatedStream:
    return TranslatedStream(response, translator)


async def relay_stream(
    response: aiohttp.ClientResponse | TranslatedStream,
    send: Send,
    backend: str,
    kind: StreamKind = StreamKind.PLAIN,
    redactor: Redactor = NO_SECRETS,
    strip_usage_event: bool = False,
    result: RelayResult | None = None,
    gone: Callable[[], bool] | None = None,
    grace_bytes: int = 0,
) -> RelayResult:
    """Pass every chunk through untouched; end with an error event if the upstream fails.

    For chat and text completions a stream that ends cleanly but without ``data: [DONE]``
    was cut short too: the SDK would otherwise return a truncated answer as if complete.

    ``strip_usage_event``: the proxy added ``include_usage`` to the request and the client
    had not asked for it. Every usage-only event (``"choices": []`` with a ``usage``
    object) is then left out of what the client gets (its usage still counted); every
    other byte is passed on as received, whole events at a time.

    ``result``: filled in as the stream goes (usage, text seen), so a caller whose task is
    cancelled still has what was known. ``gone``: whether the client has left; from then on
    nothing is sent and at most ``grace_bytes`` more are read (for the usage event).
    """
    if result is None:
        result = RelayResult()
    stops_at_message_stop = kind.ends_with_stop_event
    stops_at_response_end = kind.ends_with_response_end
    finished = _Seen(_RESPONSE_END, _RESPONSE_END_LONGEST, b"\n")
    text_of = _TEXT[kind].findall
    after_gone = 0
    usage = _UsageReader(merge=kind.usage_in_parts)
    # An Anthropic stream is complete at message_stop, or over when the upstream sent its
    # own error event.
    stop = _Seen(_STOP, _STOP_LONGEST, b"\n")
    told = _Seen(_ERROR_EVENT, len(_ERROR_EVENT.pattern), b"\n")
    stripper = _UsageEventStripper() if strip_usage_event else None
    last = previous = b"\n\n"
    held = b""  # the start of a secret at the end of a chunk, until the next one shows
    failure: tuple[str, str, str] | None = None  # result.error, message, code
    try:
        async for chunk in response.content.iter_any():
            if redactor:  # an upstream echoing a key: never passed on, whole or split
                chunk, held = redactor.stream_chunk(held + chunk)
                if not chunk:
                    continue
            usage.feed(chunk)  # every byte the upstream sent, the event left out included
            result.usage = usage.usage  # known at once: a cancelled caller still has it
            if usage.usage is None:  # the estimate is needed only while no usage came
                result.text_bytes += sum(map(len, text_of(chunk)))
            if stops_at_response_end and not finished.seen:
                finished.feed(chunk)
            if gone is not None and gone():
                after_gone += len(chunk)
                if after_gone > grace_bytes:
                    result.grace_cut = True
                    break
                if stops_at_message_stop and not stop.seen:
                    stop.feed(chunk)
                continue  # nobody to send to: read on for the usage only
            if stripper is not None:
                chunk = stripper.feed(chunk)  # whole events only, minus the usage-only one
                if not chunk:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if stops_at_message_stop and not stop.seen:
                stop.feed(chunk)
                told.feed(chunk)
            previous, last = last, chunk
            if result.first_data_at is None and b"data:" in chunk:
                result.first_data_at = time.perf_counter()
    except (TimeoutError, aiohttp.SocketTimeoutError):
        message = f"Backend '{backend}' stopped sending mid-stream (read timeout)."
        failure = ("timeout", message, "upstream_timeout")
    except TranslationBroken as exc:
        # The upstream's own words (its error event's message): scrubbed like its bytes.
        why = redactor.text(str(exc))[:2000]
        message = f"Backend '{backend}' sent a stream that cannot be translated: {why}."
        failure = ("stream_broken", message, "upstream_stream_broken")
    except aiohttp.ClientError:
        message = f"Backend '{backend}' closed the stream before it was complete."
        failure = ("stream_broken", message, "upstream_stream_broken")
    except asyncio.CancelledError as exc:
        if not cancelled_by_drain(exc):
            raise
        # The drain's deadline (server.drain_timeout): told to the client, never a silent cut.
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        message = "The proxy is shutting down: the stream was ended; retry the request."
        failure = (DRAINED, message, "server_shutting_down")
    finally:
        if held:  # the redactor's last bytes: no secret's start after all, so read them too
            usage.feed(held)
        usage.finish()
        if stripper is not None:  # the stream is over: what it held is all there will be
            held = stripper.finish() + held
        result.usage = usage.usage  # however the stream ended, what it reported counts
        if isinstance(response, TranslatedStream):
            response.settle(result)
    if gone is not None and gone():
        result.complete = not result.grace_cut and failure is None
        return result  # nobody to tell how it ended
    if failure is not None and stops_at_message_stop and (stop.seen or stop.feed(held)):
        # message_stop went by: the answer is whole, however the upstream then left. An error
        # event after it would make the SDK raise on a complete message (and Claude Code pay
        # for it again).
        failure = None
    if failure is not None:
        result.error = failure[0]
        await send_stream_error(send, failure[1], failure[2], last, kind, held)
        return result
    if held:  # the stream ended: what was held back is not the start of a secret after all
        previous, last = last, held
    if kind.ends_with_done and b"[DONE]" not in previous[-16:] + last:
        result.error = "stream_broken"
        message = f"Backend '{backend}' ended the stream without [DONE]."
        await send_stream_error(send, message, "upstream_stream_broken", last, kind, held)
        return result
    if stops_at_response_end and not finished.seen and not finished.feed(held):
        result.error = "stream_broken"
        message = f"Backend '{backend}' ended the stream without response.completed."
        await send_stream_error(send, message, "upstream_stream_broken", last, kind, held)
        return result
    if stops_at_message_stop and not stop.seen and not stop.feed(held):
        if told.seen or told.feed(held):  # the upstream's error event ended it: relayed as is
            result.error = "stream_broken"
            await send({"type": "http.response.body", "body": held, "more_body": False})
            return result
        result.error = "stream_broken"
        message = f"Backend '{backend}' ended the stream without message_stop."
        await send_stream_error(send, message, "upstream_stream_broken", last, kind, held)
        return result
    result.complete = True
    await send({"type": "http.response.body", "body": held, "more_body": False})
    return result


async def send_stream_error(
    send: Send,
    message: str,
    code: str,
    last_chunk: bytes,
    kind: StreamKind = StreamKind.PLAIN,
    held: bytes = b"",
) -> None:
    """End the stream with one error event (after ``held``, bytes not yet passed on)."""
    # A half-sent event is closed first so the error is an event of its own.
    separator = held + (b"" if (held or last_chunk).endswith(_EVENT_ENDS) else b"\n\n")
    event = stream_error_event(kind, message, code, last_chunk)
    await send(
        {"type": "http.response.body", "body": separator + event + b"\n\n", "more_body": False}
    )


class _Seen:
    """Whether ``marker`` (at most ``longest`` bytes) has gone by in a stream, however the
    chunks cut it."""

    __slots__ = ("_keep", "_marker", "_tail", "seen")

    def __init__(self, marker: re.Pattern[bytes], longest: int, before: bytes = b"") -> None:
        self._marker = marker
        self._keep = longest - 1
        self._tail = before  # the last bytes seen, shorter than the marker
        self.seen = False

    def feed(self, chunk: bytes) -> bool:
        marker, keep = self._marker, self._keep
        if marker.search(chunk) or marker.search(self._tail + chunk[:keep]):
            self.seen = True
        self._tail = chunk[-keep:] if len(chunk) >= keep else (self._tail + chunk)[-keep:]
        return self.seen


class ResponseCut(Exception):
    """A relayed body ended early after its head was sent: the connection must be dropped
    so the client sees an incomplete response, not a short one that looks whole."""


async def relay_bytes(
    response: aiohttp.ClientResponse, send: Send, redactor: Redactor = NO_SECRETS
) -> str | None:
    """Pass a non-event body on chunk by chunk (``send`` waits while the client is slow:
    nothing piles up here). Returns why it broke off ("timeout", "body_broken",
    "secret_scrubbed"), or None.

    The upstream's Content-Length is relayed: a secret replaced by its fingerprint changes
    the body's length, so such a body is cut (the client sees it incomplete) rather than
    sent past or short of that length, which the server refuses with an exception."""
    declared = response.content_length
    sent = 0
    held = b""
    try:
        async for chunk in response.content.iter_chunked(_BYTES_CHUNK):
            if redactor:
                chunk, held = redactor.stream_chunk(held + chunk)
                if not chunk:
                    continue
            sent += len(chunk)
            if declared is not None and sent > declared:
                return "secret_scrubbed"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (TimeoutError, aiohttp.SocketTimeoutError):
        return "timeout"
    except aiohttp.ClientError:
        return "body_broken"
    if declared is not None and sent + len(held) != declared:
        return "secret_scrubbed"
    await send({"type": "http.response.body", "body": held, "more_body": False})
    return None


_BYTES_CHUNK = 256 * 1024
