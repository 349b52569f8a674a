"""A ``purpose: batch`` file, checked line by line as it streams to the upstream.

Each line of a batch file is a request the upstream will run later with the proxy's key:
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", ...}}``.
So each line's model is checked against the client's globs and routed as a single request
would be (its alias rewritten: the line is re-serialised only then), its ``url`` must be an
endpoint the Batch API runs, and all lines must route to one backend, where the file goes.
A refused line is a 400 naming the line and its model.

The file is read as it goes by (``BatchLines`` is a ``PartSink`` of the form's own parser):
only the current line is held, at most ``max_line`` bytes. A form whose file comes before its
``purpose`` cannot be checked before it is sent: when that purpose turns out to be batch, the
upload is cut before its end, so the upstream never has a whole form (and makes no file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy import errors, rewrite
from proxy.bodies import _FormScan, checked_model
from proxy.errors import ProxyError
from proxy.routing import Target

# The endpoints the Batch API runs (the openai SDK's `batches.create(endpoint=...)`).
BATCH_URLS = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)
_PURPOSE_LIMIT = 64  # bytes of a purpose field looked at; OpenAI's are a word

Resolve = Callable[[str], Target]  # a line's model → its target; raises ProxyError
# A checked line's target, body, size and url: added to the file's estimate (batch_spend.py).
Measure = Callable[[Target, dict[str, Any], int, str], None]


class BatchLines:
    """Reads a form's ``purpose`` and, when it is batch, the lines of its file parts.

    With ``resolve`` None it only peeks: it learns the purpose and the first line's model
    (to route the upload) and then stops holding anything. With ``resolve`` it checks every
    line, rewrites those whose model the route changes, counts them, and collects the bytes
    to send (``take``)."""

    def __init__(
        self,
        max_line: int,
        resolve: Resolve | None = None,
        backend: str = "",
        measure: Measure | None = None,
    ) -> None:
        self._max_line = max_line
        self._resolve = resolve
        self._measure = measure
        self._backend = backend  # where the file goes: every line must route there
        self._out: list[bytes] = []
        self._field: bytearray | None = None  # the purpose field's value, being read
        self._line = bytearray()  # the current line, up to its newline
        self._searched = 0  # bytes of ``_line`` known to hold no newline
        self._in_file = False  # inside a file part of a batch form
        self.purpose: bytes | None = None
        self.file_before_purpose = False
        self.first_model: str | None = None
        self.numbered = 0  # lines seen (blank ones too): a refusal names the line's number
        self.requests = 0  # lines that are requests: what the batch costs

    @property
    def is_batch(self) -> bool:
        return self.purpose is not None and self.purpose.strip().lower() == b"batch"

    @property
    def decided(self) -> bool:
        """Enough is known to route the upload (a peek's question)."""
        if self.first_model is not None or self.file_before_purpose:
            return True
        return self.purpose is not None and not self.is_batch

    def take(self) -> bytes:
        out, self._out = self._out, []
        return out[0] if len(out) == 1 else b"".join(out)

    # ------------------------------------------------------------ PartSink

    def raw(self, data: bytes) -> None:
        self._emit(data)

    def part_start(self, name: bytes | None, is_file: bool) -> None:
        if not is_file and name == b"purpose":
            if self.purpose is not None:
                raise _refused("the form gives its purpose twice")
            self._field = bytearray()
        elif is_file:
            if self.purpose is None:
                self.file_before_purpose = True
            self._in_file = self.is_batch

    def data(self, data: bytes) -> None:
        field = self._field
        if field is not None:
            field += data[: max(0, _PURPOSE_LIMIT - len(field))]
            self._emit(data)
        elif self._in_file:
            self._add(data)
        else:
            self._emit(data)

    def part_end(self) -> None:
        if self._field is not None:
            self.purpose, self._field = bytes(self._field), None
            if self.is_batch and self.file_before_purpose:
                raise _refused(
                    "its purpose is batch but comes after the file: send the purpose field "
                    "first (as the OpenAI SDKs do), so the file's lines can be checked"
                )
        elif self._in_file:
            if self._line:
                self._emit(self._check(bytes(self._line)))
            self._line, self._searched, self._in_file = bytearray(), 0, False

    def finish(self) -> None:
        """The form's last byte went by: a batch file still open was cut short."""
        if self._in_file:
            raise _refused("the form ends inside its batch file (no closing boundary)")

    # ------------------------------------------------------------ lines

    def _emit(self, data: bytes) -> None:
        if self._resolve is not None and data:
            self._out.append(data)

    def _add(self, data: bytes) -> None:
        line = self._line
        line += data
        start = 0
        while self._in_file:
            end = line.find(b"\n", start + self._searched)
            if end < 0:
                break
            self._searched = 0
            self._emit(self._check(bytes(line[start : end + 1])))
            start = end + 1
            if self._resolve is None and self.first_model is not None:
                self._in_file = False  # a peek is done: nothing more is held
        del line[:start]
        if not self._in_file:
            line.clear()
            return
        self._searched = len(line)
        if len(line) > self._max_line:
            raise _refused(
                f"line {self.numbered + 1} of the batch file is longer than {self._max_line} bytes"
            )

    def _check(self, line: bytes) -> bytes:
        """The line as it is sent: unchanged, or with its model's route applied."""
        self.numbered += 1
        text = line.rstrip(b"\r\n")
        if not text.strip():
            return line  # a blank line, as OpenAI's own parser treats it: not a request
        number = self.numbered
        request = _request(text, number)
        body: dict[str, Any] = request["body"]
        model: str = body["model"]
        self.requests += 1
        if self.first_model is None:
            self.first_model = model
        if self._resolve is None:
            return line
        try:
            target = self._resolve(model)
        except ProxyError as err:
            raise _line_refused(number, model, err.message) from None
        if self._backend and target.backend != self._backend:
            raise _line_refused(
                number,
                model,
                f"it routes to backend '{target.backend}', the file's first line to "
                f"'{self._backend}': a batch runs on one backend, so all its lines must "
                "route to the same one",
            )
        if self._measure is not None:
            self._measure(target, body, len(text), request["url"])
        return _rewritten(line, text, request, target)


def _request(text: bytes, number: int) -> dict[str, Any]:
    """The line as a batch request, or a 400 naming it."""
    try:
        request = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _refused(f"line {number} of the batch file is not JSON") from None
    if not isinstance(request, dict):
        raise _refused(f"line {number} of the batch file is not a JSON object")
    url = request.get("url")
    if not isinstance(url, str) or url not in BATCH_URLS:
        shown = url[:100] if isinstance(url, str) else url
        raise _refused(
            f"line {number} of the batch file has url {shown!r}: the Batch API runs "
            + ", ".join(sorted(BATCH_URLS))
        )
    if request.get("method") != "POST":
        raise _refused(f"line {number} of the batch file must have method POST")
    body = request.get("body")
    if not isinstance(body, dict):
        raise _refused(f"line {number} of the batch file has no JSON object as its body")
    try:
        checked_model(body.get("model"))
    except ProxyError as err:
        raise _refused(f"line {number} of the batch file: {err.message}") from None
    return request


def _rewritten(line: bytes, text: bytes, request: dict[str, Any], target: Target) -> bytes:
    body = dict(request["body"])
    changed = body["model"] != target.upstream_model
    body["model"] = target.upstream_model
    changed = rewrite.apply(target.rewrite, body) or changed
    if not changed:
        return line  # the bytes as the client wrote them
    return orjson.dumps({**request, "body": body}) + line[len(text) :]


class BatchFilter:
    """The bytes of a batch form as they go upstream: the form parsed once more, on the
    way out, with ``BatchLines`` checking (and rewriting) the file's lines."""

    def __init__(self, boundary: bytes, lines: BatchLines) -> None:
        self.lines = lines
        self._scan = _FormScan(boundary, lines)

    def feed(self, chunk: bytes) -> bytes:
        scan = self._scan
        if scan.ended:
            return chunk  # the epilogue, after the form's end
        scan.feed(chunk)
        out = self.lines.take()
        return out + scan.rest() if scan.ended else out

    def finish(self) -> bytes:
        """Whatever the parser still holds, once the client's last byte is in."""
        self.lines.finish()
        return self._scan.rest()


def _refused(why: str) -> ProxyError:
    return errors.bad_request(
        f"The batch file was refused: {why}.", param="file", code="invalid_batch_file"
    )


def _line_refused(number: int, model: str, why: str) -> ProxyError:
    return errors.bad_request(
        f"Line {number} of the batch file was refused (model '{model}'): {why}",
        param="file",
        code="batch_line_refused",
    )
