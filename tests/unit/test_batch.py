"""Batch files: every line's model checked and its alias rewritten as the form streams,
whatever the chunk cuts; only rewritten lines change; memory bounded by one line."""

from __future__ import annotations

import asyncio
import hashlib

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import errors
from proxy.batch import BatchFilter, BatchLines
from proxy.errors import ProxyError
from proxy.routing import Target
from tests.unit.test_bodies import BOUNDARY, END, field, file_part, upload_of

ROUTES = {
    "cheap-mini": Target("cheap-mini", "cheap-mini", "openai", "cheap-mini"),
    "cheap": Target("cheap", "cheap-mini-2024", "openai", "cheap-mini-2024"),  # an alias
    "cheap-elsewhere": Target("cheap-elsewhere", "cheap-elsewhere", "other", "cheap-elsewhere"),
}


def resolve(model: str) -> Target:
    if model == "gpt-4o-expensive":
        raise errors.model_not_allowed("team-b", model)
    return ROUTES[model]


def line(number: int, model: str, url: str = "/v1/chat/completions") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {number} é"}]}
    request = {"custom_id": f"r{number}", "method": "POST", "url": url, "body": body}
    return orjson.dumps(request) + b"\n"


def form(lines: bytes, purpose_first: bool = True) -> bytes:
    purpose = field("purpose", b"batch")
    data = file_part("file", lines)
    return (purpose + data if purpose_first else data + purpose) + END


def run(body: bytes, cuts: list[int], max_line: int = 1 << 20) -> tuple[bytes, BatchLines]:
    lines = BatchLines(max_line, resolve, "openai")
    out = BatchFilter(BOUNDARY.encode(), lines)
    points = sorted({c for c in cuts if 0 < c < len(body)})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    sent = [out.feed(piece) for piece in pieces]
    sent.append(out.finish())
    return b"".join(sent), lines


def verdict(body: bytes, cuts: list[int]) -> tuple[str, bytes | str]:
    try:
        sent, lines = run(body, cuts)
    except ProxyError as err:
        return "refused", err.message
    return "sent", sent + str(lines.requests).encode()


GOOD = line(1, "cheap-mini") + line(2, "cheap") + b"\n" + line(3, "cheap-mini").rstrip(b"\n")
BAD = line(1, "cheap-mini") + line(2, "gpt-4o-expensive") + line(3, "cheap")


def test_an_alias_is_rewritten_and_every_other_byte_is_sent_as_it_came() -> None:
    sent, lines = run(form(GOOD), [])
    first, _second, blank, third = GOOD.split(b"\n")
    expected = form(
        first + b"\n" + line(2, "cheap-mini-2024") + blank + b"\n" + third
    )  # the alias's line re-serialised; the others, the blank one, the last without \n: same
    assert sent == expected
    assert lines.requests == 3
    assert lines.first_model == "cheap-mini"


def test_a_forbidden_model_is_refused_naming_its_line_and_model() -> None:
    with pytest.raises(ProxyError) as raised:
        run(form(BAD), [])
    assert raised.value.status == 400
    assert raised.value.code == "batch_line_refused"
    assert "Line 2 " in raised.value.message and "'gpt-4o-expensive'" in raised.value.message
    assert "may not use model" in raised.value.message


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([GOOD, BAD, line(1, "cheap") * 40]),
    st.lists(st.integers(min_value=0, max_value=6000), max_size=30),
)
def test_any_chunk_cuts_give_the_same_verdict_and_bytes_as_the_whole(
    lines: bytes, cuts: list[int]
) -> None:
    body = form(lines)
    assert verdict(body, cuts) == verdict(body, [])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3000), max_size=20))
def test_a_one_byte_at_a_time_cut_changes_nothing_either(cuts: list[int]) -> None:
    body = form(GOOD)
    assert verdict(body, list(range(len(body)))) == verdict(body, cuts)


def test_lines_routed_to_two_backends_are_refused() -> None:
    with pytest.raises(ProxyError) as raised:
        run(form(line(1, "cheap") + line(2, "cheap-elsewhere")), [])
    assert "Line 2 " in raised.value.message and "'other'" in raised.value.message


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (line(1, "cheap", url="/v1/files"), "url '/v1/files'"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}}\n', "POST"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n', "model"),
        (b"not json\n", "not JSON"),
        (b"[1]\n", "not a JSON object"),
    ],
)
def test_a_line_that_is_no_batch_request_is_refused_naming_it(bad: bytes, why: str) -> None:
    with pytest.raises(ProxyError) as raised:
        run(form(line(1, "cheap") + bad), [])
    assert raised.value.status == 400
    assert "line 2 " in raised.value.message and why in raised.value.message


def test_a_line_longer_than_the_limit_is_refused_holding_at_most_one_line() -> None:
    lines = BatchLines(1000, resolve, "openai")
    out = BatchFilter(BOUNDARY.encode(), lines)
    out.feed(field("purpose", b"batch") + file_part("file", b"")[:-2])  # the file begins
    with pytest.raises(ProxyError) as raised:
        for _ in range(100):
            out.feed(b"x" * 100)
            assert len(lines._line) <= 1000  # never more than one line held
    assert "line 1 of the batch file is longer than 1000 bytes" in raised.value.message


def test_a_batch_purpose_after_its_file_is_refused_and_another_purpose_is_not() -> None:
    with pytest.raises(ProxyError) as raised:
        run(form(GOOD, purpose_first=False), [])
    assert "comes after the file" in raised.value.message
    other = file_part("file", b"\x00\xff anything") + field("purpose", b"assistants") + END
    assert run(other, [7, 50])[0] == other  # not a batch: sent as it came, not read


def test_a_form_cut_inside_its_batch_file_is_refused() -> None:
    body = field("purpose", b"batch") + file_part("file", line(1, "cheap"))
    with pytest.raises(ProxyError) as raised:
        run(body, [])
    assert "ends inside its batch file" in raised.value.message


def test_a_peek_learns_the_first_model_and_holds_nothing_after_it() -> None:
    peek = BatchLines(1 << 20)
    body = form(line(1, "cheap") + b"x" * 100_000)  # the rest is no concern of a peek
    out = BatchFilter(BOUNDARY.encode(), peek)
    out.feed(body)
    assert peek.is_batch and peek.decided and peek.first_model == "cheap"
    assert len(peek._line) == 0


def upload_sent(body: bytes, cuts: list[int]) -> tuple[bytes, int | None]:
    async def go() -> tuple[bytes, int | None]:
        upload = upload_of(body, cuts)
        peek = BatchLines(1 << 20)
        await upload.read_head(BOUNDARY.encode(), True, peek)
        assert peek.first_model == "cheap-mini"
        lines = BatchLines(1 << 20, resolve, "openai")
        await upload.filter_with(BatchFilter(BOUNDARY.encode(), lines), may_change=True)
        length = upload.length_for(None)
        sent = b"".join([piece async for piece in upload.chunks(None)])
        upload.close()
        return sent, length

    return asyncio.run(go())


def test_an_upload_held_whole_is_checked_before_sending_and_keeps_an_exact_length() -> None:
    body = form(GOOD)
    sent, length = upload_sent(body, [100, 200])
    assert sent == run(body, [])[0] and length == len(sent)


def test_a_streamed_upload_is_checked_as_it_goes_and_sent_without_a_length() -> None:
    filler = b"".join(line(n, "cheap-mini") for n in range(3, 20_000))  # ~2 MB: past the head
    body = form(line(1, "cheap-mini") + line(2, "cheap") + filler)
    sent, length = upload_sent(body, list(range(0, len(body), 65536)))
    assert length is None  # the length may change: chunked
    assert sent == run(body, [])[0]
    assert hashlib.sha256(sent).digest() != hashlib.sha256(body).digest()  # line 2 rewritten


def test_a_refused_line_past_the_head_stops_the_upload_before_its_end() -> None:
    filler = b"".join(line(n, "cheap-mini") for n in range(1, 20_000))
    body = form(filler + line(20_000, "gpt-4o-expensive"))

    async def go() -> tuple[bytes, ProxyError]:
        upload = upload_of(body, list(range(0, len(body), 65536)))
        await upload.read_head(BOUNDARY.encode(), True, BatchLines(1 << 20))
        lines = BatchLines(1 << 20, resolve, "openai")
        await upload.filter_with(BatchFilter(BOUNDARY.encode(), lines), may_change=False)
        pieces: list[bytes] = []
        with pytest.raises(ProxyError) as raised:
            async for piece in upload.chunks(None):
                pieces.append(piece)
        upload.close()
        assert upload.failure is raised.value
        return b"".join(pieces), raised.value

    sent, err = asyncio.run(go())
    assert "Line 20000 " in err.message
    assert END not in sent and b"gpt-4o-expensive" not in sent  # never a whole form
