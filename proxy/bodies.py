"""The request body: read whole when it is JSON, streamed when it is an upload.

A JSON body (chat, embeddings, a batch to create) is small and read whole: its ``model`` is
in it, and a failed attempt can send it again with another key or to a fallback. An upload
(a multipart form, or any other content type) can be hundreds of MB: only its head is read
before routing, up to the form's ``model`` field (or its first file, when a ``paths:`` rule
says the path carries no model), and the rest flows from the client to the upstream as it
arrives. A head larger than ``SPILL`` goes to a temporary file, never all into memory. An
upload whose last byte came with its head (most audio clips) is held whole and can be sent
again, like JSON.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import IO, Any, ClassVar, Protocol

import orjson

from proxy import errors
from proxy.errors import ProxyError
from proxy.headers import header_value
from proxy.routing import MAX_MODEL_LENGTH, usable_model_id

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Headers = list[tuple[bytes, bytes]]

SPILL = 1024 * 1024  # an upload's head beyond this goes to a temporary file
_PIECE = 256 * 1024  # reads from that file
_PART_HEADERS_LIMIT = 16 * 1024
# Parts of one form: starlette's default (max_fields, max_files). SDK forms have a handful;
# 512 MiB of empty parts would otherwise cost a minute of the event loop's CPU to scan.
MAX_FORM_PARTS = 1000
_MODEL_FIELD_LIMIT = MAX_MODEL_LENGTH * 4  # UTF-8 bytes of the longest usable model id


class ClientGone(Exception):
    """The client disconnected before it had sent its whole request."""


class BodyBudget:
    """Bytes of request bodies held by all requests of this process at once: each body is
    bounded by ``max_body_size``, and this bounds their sum, whatever the connection count
    (40 clients each holding back the end of a 9 MiB body would hold 360 MB)."""

    held = 0


class UploadSlots:
    """Streamed uploads each client key is sending at once, in this process: one client
    cannot hold every upload (and its disk and memory budgets) for the others."""

    held: ClassVar[dict[str, int]] = {}

    @classmethod
    def take(cls, client: str, limit: int) -> bool:
        count = cls.held.get(client, 0)
        if count >= limit:
            return False
        cls.held[client] = count + 1
        return True

    @classmethod
    def give_back(cls, client: str) -> None:
        count = cls.held.pop(client, 1) - 1
        if count > 0:
            cls.held[client] = count


class SpillBudget:
    """Bytes of upload heads on disk for all requests of this process at once: each is
    bounded by ``max_upload_size``, this bounds their sum (``max_spilled_bodies``), so
    clients sending big files before their model cannot fill the disk."""

    held = 0


def media_type(headers: Headers) -> bytes:
    """The Content-Type without its parameters, lower-cased; empty when there is none."""
    content_type = header_value(headers, b"content-type")
    return b"" if content_type is None else content_type.split(b";", 1)[0].strip().lower()


FORM = b"multipart/form-data"  # streamed rather than read whole: files, audio, images
# Parsed as JSON, errors are 400s: JSON, or nothing said (SDKs and curl -d send JSON).
JSON_TYPES = (b"", b"application/json")


def is_upload(headers: Headers) -> bool:
    return media_type(headers) == FORM


def json_or_opaque(body: bytes) -> dict[str, Any]:
    """A body of another type (``application/sdp``, text) is sent as it came, routed by its
    path; but one that parses as a JSON object is read as one, so its model is checked and
    routed as any other's (an upstream may parse JSON whatever the header says)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return payload if isinstance(payload, dict) else {}


async def read_whole(scope: Message, receive: Receive, limit: int, budget: int) -> bytes:
    declared = header_value(scope["headers"], b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone  # nobody is waiting for an answer
            chunk = message.get("body", b"")
            size += len(chunk)
            BodyBudget.held += len(chunk)
            if size > limit:
                raise errors.body_too_large(limit)
            if BodyBudget.held > budget:
                raise errors.server_busy("request bodies being received")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        BodyBudget.held -= size  # parsed right after, or refused: no longer held here


def parse_payload(body: bytes) -> dict[str, Any]:
    if not body:
        return {}  # a GET, a DELETE, a POST that cancels: nothing to parse
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.bad_request(
            "We could not parse the JSON body of your request: expected a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise errors.bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


def checked_model(model: object) -> str:
    """A model id from a client, refused before routing when it could hurt: too long for a
    header or a cache entry, or holding control characters (CR/LF would break headers)."""
    if not isinstance(model, str) or not model:
        raise errors.bad_request(
            "The model parameter must be a non-empty string.", param="model", code="invalid_model"
        )
    if not usable_model_id(model):
        raise errors.bad_request(
            f"The model parameter must be at most {MAX_MODEL_LENGTH} characters, with no "
            "control characters.",
            param="model",
            code="invalid_model",
        )
    return model


# ---------------------------------------------------------------- uploads


class Upload:
    """A body relayed as it arrives: its head (read before routing, with the form's model),
    then the rest straight from the client. Sent once, unless it was all in the head."""

    def __init__(
        self,
        receive: Receive,
        headers: Headers,
        limit: int,
        budget: int,
        disk_budget: int,
        deadline: float = 3600.0,
    ) -> None:
        self._receive = receive
        # However slowly it trickles (each gap within body_timeout), it ends by then.
        self._deadline_s = deadline
        self._deadline = time.monotonic() + deadline
        self._limit = limit
        self._budget = budget
        self._head = _Head(disk_budget)
        self._scan: _FormScan | None = None  # the whole form is scanned, not only the head
        self._counted = 0  # bytes of the head counted in the process's body budget
        self.declared = _content_length(headers, limit)
        self.model: str | None = None
        self._span: tuple[int, int] | None = None  # where the model's value is in the head
        self.received = 0
        self.complete = False  # the client's last byte is in
        self.started = False  # bytes of it went upstream
        self.failure: ProxyError | ClientGone | None = None  # why sending it stopped
        self.done = asyncio.Event()  # set with the last byte: disconnects may be watched
        self.boundary: bytes | None = None
        self.peek: Peek | None = None  # what read the head besides the form's parser
        # A batch file's lines are checked on the way out (``proxy.batch``): the filter,
        # or, for an upload held whole, the checked bytes ready to send.
        self._filter: OutFilter | None = None
        self._may_change = False  # the filter may change the length: sent chunked
        self._prepared: bytes | None = None

    @property
    def replayable(self) -> bool:
        """Can be sent (again) to another key or backend: nothing sent yet, or all held."""
        return not self.started or self._head.whole

    async def read_head(
        self, boundary: bytes | None, model_optional: bool, peek: Peek | None = None
    ) -> None:
        """Read up to the form's model (or its first file, when the path can route without
        one; or its end; with ``peek``, until it has decided too), then on while the head
        stays small: a small upload is held whole."""
        self.boundary, self.peek = boundary, peek
        scan = self._scan = _FormScan(boundary, peek) if boundary is not None else None
        try:
            while not self.complete:
                if scan is not None and (
                    not scan.decided(model_optional)
                    or (peek is not None and not peek.decided and not scan.ended)
                ):
                    chunk = await self._next()
                    self._feed(chunk)
                    if scan.model is not None and self.model is None:
                        self.model, self._span = checked_model(scan.model), scan.span
                elif self._head.size < SPILL:
                    chunk = await self._next()
                    self._feed(chunk)
                else:
                    break
                await self._head.add(chunk)
                self._count(len(chunk))
        except BaseException:
            self.close()
            raise
        self._head.whole = self.complete

    def length_for(self, model: str | None) -> int | None:
        """The Content-Length sent upstream: the client's, changed by the model's length."""
        if self._prepared is not None:
            return len(self._prepared)
        if self.declared is None or self._may_change:
            return None
        replacement = self._replacement(model)
        if not replacement:
            return self.declared
        assert self._span is not None
        return self.declared + len(replacement) - (self._span[1] - self._span[0])

    async def chunks(self, model: str | None) -> AsyncIterator[bytes]:
        """The body as sent upstream: the head (the model field's value replaced by
        ``model``), then the rest as the client sends it."""
        self.started = True
        if self._prepared is not None:
            yield self._prepared
            return
        out = self._filter
        try:
            async for piece in self._head.pieces(self._span, self._replacement(model)):
                piece = piece if out is None else out.feed(piece)
                if piece:  # never an empty chunk: chunked encoding would read its end
                    yield piece
            self._release_budget()
            while not self.complete:
                chunk = await self._next()
                self._feed(chunk)  # a second model field is refused, even past the head
                chunk = chunk if out is None else out.feed(chunk)
                if chunk:
                    yield chunk
            tail = b"" if out is None else out.finish()
        except (ProxyError, ClientGone) as exc:
            # Raised before the last byte went: the upstream never has the whole body.
            self.failure = exc
            raise
        if tail:
            yield tail

    async def filter_with(self, out: OutFilter, may_change: bool) -> None:
        """Send the body through ``out`` (a batch file's line check). An upload held whole
        is checked now, before anything is sent, and keeps its exact length; one still
        arriving is checked as it goes, sent chunked when ``out`` may change its length."""
        if not self._head.whole:
            self._filter, self._may_change = out, may_change
            return
        pieces = [out.feed(piece) async for piece in self._head.pieces(self._span, b"")]
        pieces.append(out.finish())
        self._prepared = b"".join(pieces)

    def close(self) -> None:
        self._release_budget()
        self._head.close()

    def _feed(self, chunk: bytes) -> None:
        """Every byte of a form goes through the scanner: the proxy routes (and checks the
        client's models) by the form's one model field, so a form the upstream could read
        another model from (a second ``model`` field, two names for one part) is refused,
        before the upload is sent or by cutting it."""
        if self._scan is not None and not self._scan.ended:
            self._scan.feed(chunk)

    def _replacement(self, model: str | None) -> bytes:
        if self._span is None or model is None or model == self.model:
            return b""
        return model.encode()

    async def _next(self) -> bytes:
        left = self._deadline - time.monotonic()
        try:
            message = await asyncio.wait_for(self._receive(), max(left, 0.0))
        except TimeoutError:
            raise errors.upload_deadline(self._deadline_s) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self._limit:
            raise errors.body_too_large(self._limit)
        if not message.get("more_body", False):
            self.complete = True
            self.done.set()
        return chunk

    def _count(self, size: int) -> None:
        """Bytes held in memory for this request count in the process's budget."""
        if self._head.in_memory:
            self._counted += size
            BodyBudget.held += size
            if BodyBudget.held > self._budget:
                raise errors.server_busy("request bodies being received")
        else:
            self._release_budget()

    def _release_budget(self) -> None:
        BodyBudget.held -= self._counted
        self._counted = 0


def _content_length(headers: Headers, limit: int) -> int | None:
    declared = header_value(headers, b"content-length")
    if declared is None or not declared.isdigit():
        return None
    length = int(declared)
    if length > limit:
        raise errors.body_too_large(limit)
    return length


class _Head:
    """The bytes of an upload read before it is sent: in memory up to ``SPILL``, then in a
    temporary file (written from a thread: the event loop never waits on the disk)."""

    def __init__(self, disk_budget: int) -> None:
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self._disk_budget = disk_budget
        self._on_disk = 0  # bytes counted in SpillBudget
        self.size = 0
        self.whole = False  # the upload's every byte: it may be sent again

    @property
    def in_memory(self) -> bool:
        return self._file is None

    async def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and len(self._memory) + len(chunk) <= SPILL:
            self._memory += chunk
            return
        spilled = len(chunk) + (len(self._memory) if self._file is None else 0)
        SpillBudget.held += spilled
        self._on_disk += spilled
        if SpillBudget.held > self._disk_budget:
            raise errors.server_busy("uploads held before their model")
        if self._file is None:
            self._file = await asyncio.to_thread(tempfile.TemporaryFile)
            await asyncio.to_thread(self._file.write, bytes(self._memory))
            self._memory = bytearray()
        await asyncio.to_thread(self._file.write, chunk)

    async def pieces(self, span: tuple[int, int] | None, value: bytes) -> AsyncIterator[bytes]:
        """The held bytes, with ``span`` replaced by ``value`` when there is one."""
        cut = span if span is not None and value else None
        if self._file is None:
            data = bytes(self._memory)
            yield data if cut is None else data[: cut[0]] + value + data[cut[1] :]
            return
        for start, end in ((0, cut[0]), (cut[1], self.size)) if cut else ((0, self.size),):
            async for piece in self._read(start, end):
                yield piece
            if cut is not None and start == 0:
                yield value

    async def _read(self, start: int, end: int) -> AsyncIterator[bytes]:
        assert self._file is not None
        file = self._file
        await asyncio.to_thread(file.seek, start)
        while start < end:
            piece = await asyncio.to_thread(file.read, min(_PIECE, end - start))
            if not piece:
                return
            start += len(piece)
            yield piece

    def close(self) -> None:
        SpillBudget.held -= self._on_disk
        self._on_disk = 0
        if self._file is not None:
            self._file.close()
            self._file = None


def form_boundary(headers: Headers) -> bytes | None:
    """The boundary of a ``multipart/form-data`` body; None for any other type."""
    content_type = header_value(headers, b"content-type") or b""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    # Read as a parser upstream reads it: `; charset="; boundary=a"; boundary=b` has the
    # boundary b, and a second boundary parameter is refused (which one would it use?).
    boundaries = [v for k, v in _header_params(content_type) if k == b"boundary"]
    if len(boundaries) != 1 or not _BOUNDARY.fullmatch(boundaries[0]):
        raise errors.bad_request(
            "multipart/form-data needs one boundary parameter of 1 to 70 characters.",
            code="invalid_form",
        )
    return boundaries[0]


_BOUNDARY = re.compile(rb"[^\r\n]{1,70}")
_DISPOSITION = re.compile(rb"^content-disposition:(.*)$", re.IGNORECASE | re.MULTILINE)
# One parameter of a Content-Disposition: `; key=token` or `; key="quoted \" string"`.
_PARAM = re.compile(rb';[ \t]*([^\s=;"]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^\s;"]*)[ \t]*')
_TRANSFER_ENCODING = re.compile(rb"^content-transfer-encoding:(.*)$", re.IGNORECASE | re.MULTILINE)
_PLAIN = (b"7bit", b"8bit", b"binary")
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:")
_MEDIA_TYPE = re.compile(rb"[ \t]*[A-Za-z0-9!#$&^_.+/-]+[ \t]*")
_ESCAPE = re.compile(rb"\\(.)")


class OutFilter(Protocol):
    """Bytes of a body in, the bytes to send out (``proxy.batch.BatchFilter``)."""

    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class PartSink(Protocol):
    """Told every byte a ``_FormScan`` consumed, in order, split by meaning: a form's
    structure (boundaries, part headers) and each part's value. A batch file's lines are
    checked (and rewritten) this way, by the same parser that checks the form."""

    def raw(self, data: bytes) -> None: ...
    def part_start(self, name: bytes | None, is_file: bool) -> None: ...
    def data(self, data: bytes) -> None: ...
    def part_end(self) -> None: ...


class Peek(PartSink, Protocol):
    """A sink that says when it has seen enough of the head (a batch file's first line)."""

    @property
    def decided(self) -> bool: ...


class _FormScan:
    """Finds a multipart form's ``model`` field as the bytes come in, and notes its first
    file part. Holds back only what a decision needs: a part's headers, the model's value
    and the last few bytes that may begin a boundary."""

    def __init__(self, boundary: bytes, sink: PartSink | None = None) -> None:
        self._sink = sink
        self._data_end = 0  # where the last "data" step's value ended in its buffer
        self._part: tuple[bytes | None, bool] = (None, False)  # the part's name, is a file
        self._first = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._state = "preamble"
        self._buffer = b""
        self._offset = 0  # where ``_buffer`` starts in the body
        self._in_model = False
        self._parts = 0
        self.model: str | None = None
        self.span: tuple[int, int] | None = None
        self.file_seen = False
        self.ended = False

    def decided(self, model_optional: bool) -> bool:
        """Enough is known to route: the model, the end, or a file with no model before it
        when a ``paths:`` rule says the path needs none (SDKs send fields first, files last;
        curl sends them as typed, often the file first: elsewhere the model is looked for
        past the file, which is then held, spilled to disk)."""
        return self.model is not None or self.ended or (self.file_seen and model_optional)

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer + chunk
        at = 0
        while not self.ended:
            state = self._state
            moved = self._step(buffer, at)
            if moved is None:
                break
            if self._sink is not None:
                self._tell(self._sink, state, buffer, at, moved)
            at = moved
        self._offset += at
        self._buffer = buffer[at:]

    def rest(self) -> bytes:
        """The bytes fed but not consumed (after the form's end: its epilogue), handed
        over once."""
        rest, self._buffer = self._buffer, b""
        return rest

    def _tell(self, sink: PartSink, state: str, buffer: bytes, at: int, moved: int) -> None:
        if state != "data":
            sink.raw(buffer[at:moved])
            if state == "headers":
                sink.part_start(*self._part)
            return
        end = self._data_end
        sink.data(buffer[at:end])
        if end < moved:  # the delimiter: the part is over
            sink.part_end()
            sink.raw(buffer[end:moved])

    def _step(self, buffer: bytes, at: int) -> int | None:
        """One state's work from ``at``; the new position, or None when more bytes are
        needed (with ``_buffer`` kept bounded)."""
        if self._state == "preamble":
            found = buffer.find(self._first, at)
            if found < 0:
                return self._wait(buffer, at, len(self._first) - 1)
            self._state = "after_boundary"
            return found + len(self._first)
        if self._state == "after_boundary":
            if len(buffer) - at < 2:
                return None
            if buffer[at : at + 2] == b"--":
                self.ended = True
                return at + 2
            padded = at
            while padded < len(buffer) and buffer[padded] in b" \t":
                padded += 1  # RFC 2046's transport padding: spaces before the line end
            if padded > at + 64:
                raise _bad_form("a boundary is followed by too many spaces")
            if len(buffer) - padded < 2:
                return None
            if buffer[padded : padded + 2] != b"\r\n":
                raise _bad_form("a boundary is not followed by a line end")
            self._state = "headers"
            return padded + 2
        if self._state == "headers":
            end = buffer.find(b"\r\n\r\n", at)
            if end < 0:
                if len(buffer) - at > _PART_HEADERS_LIMIT:
                    raise _bad_form("a part's headers are too long")
                return None
            self._start_part(buffer[at:end])
            self._state = "data"
            return end + 4
        found = buffer.find(self._delimiter, at)  # "data": the part's value
        if found < 0:
            if self._in_model:
                if len(buffer) - at > _MODEL_FIELD_LIMIT:
                    raise _bad_model()
                return None
            skip = self._wait(buffer, at, len(self._delimiter) - 1)
            self._data_end = at if skip is None else skip
            return skip
        self._data_end = found
        if self._in_model:
            self._end_model(buffer[at:found], self._offset + at)
        self._state = "after_boundary"
        return found + len(self._delimiter)

    def _wait(self, buffer: bytes, at: int, keep: int) -> int | None:
        """Skip what cannot hold the awaited marker; keep the last ``keep`` bytes."""
        skip = max(at, len(buffer) - keep)
        return skip if skip > at else None

    def _start_part(self, headers: bytes) -> None:
        self._parts += 1
        if self._parts > MAX_FORM_PARTS:
            raise _bad_form(f"it has more than {MAX_FORM_PARTS} parts")
        if any(_HEADER_LINE.match(line) is None for line in headers.split(b"\r\n")):
            # A folded line or `Name :` that a lenient parser upstream reads as a header
            # (`name="model"` on a continuation line) and this scan would not.
            raise _bad_form("a part has a header line that is not `Name: value`")
        dispositions = _DISPOSITION.findall(headers)
        if len(dispositions) > 1:
            raise _bad_form("a part has two Content-Disposition headers")
        params = _header_params(dispositions[0]) if dispositions else []
        names = [value for key, value in params if key in (b"name", b"name*")]
        if len(names) > 1 or any(key == b"name*" for key, _ in params):
            raise _bad_form("a part's name is not one plain name parameter")
        is_file = any(key in (b"filename", b"filename*") for key, _ in params)
        self.file_seen = self.file_seen or is_file
        self._part = (names[0] if names else None, is_file)
        is_model = not is_file and names == [b"model"]
        if is_model and (self.model is not None or self._in_model):
            raise _bad_form("the model field is given twice")
        encoding = _TRANSFER_ENCODING.search(headers)
        if is_model and encoding is not None and encoding.group(1).strip().lower() not in _PLAIN:
            # python-multipart decodes base64 and quoted-printable parts: the upstream
            # would read another model than the one checked here.
            raise _bad_form("the model field has a Content-Transfer-Encoding")
        self._in_model = is_model

    def _end_model(self, value: bytes, start: int) -> None:
        self._in_model = False
        try:
            self.model = value.decode()
        except UnicodeDecodeError:
            raise _bad_model() from None
        self.span = (start, start + len(value))


def _header_params(line: bytes) -> list[tuple[bytes, bytes]]:
    """A Content-Disposition's or Content-Type's parameters (keys lowercased, quotes and
    escapes taken off), as a multipart parser upstream reads them; 400 for a line that is
    not only those: a form the proxy and the upstream could read differently is not sent."""
    start = _MEDIA_TYPE.match(line)
    at = start.end() if start else 0
    params: list[tuple[bytes, bytes]] = []
    end = len(line.rstrip(b" \t\r;"))  # a trailing `;` is harmless
    while at < end:
        param = _PARAM.match(line, at)
        if param is None:
            raise _bad_form("a Content-Disposition or Content-Type header cannot be read")
        value = param.group(2)
        if value.startswith(b'"'):
            value = _ESCAPE.sub(rb"\1", value[1:-1])
        params.append((param.group(1).lower(), value))
        at = param.end()
    return params


def _bad_form(why: str) -> ProxyError:
    return errors.bad_request(f"The multipart body is malformed: {why}.", code="invalid_form")


def _bad_model() -> ProxyError:
    return errors.bad_request(
        f"The model field must be at most {MAX_MODEL_LENGTH} characters.",
        param="model",
        code="invalid_model",
    )
