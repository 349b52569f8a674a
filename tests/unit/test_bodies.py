"""Uploads: the form's model found however the bytes are cut, only its value changed, every
other byte (file parts, boundary) sent as it came; bounded whatever the client sends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import bodies
from proxy.bodies import BodyBudget, SpillBudget, Upload, form_boundary
from proxy.errors import ProxyError

BOUNDARY = "----formBoundary7MA4YWxk"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def field(name: str, value: bytes) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
    )


def file_part(name: str, data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="a.wav"\r\n'
    return head.encode() + b"Content-Type: audio/wav\r\n\r\n" + data + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


def receiver(body: bytes, cuts: list[int]) -> bodies.Receive:
    """An ASGI receive giving ``body`` cut at ``cuts``."""
    points = sorted({c for c in cuts if 0 < c < len(body)})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    queue: Iterator[bytes] = iter(pieces)
    remaining = [len(pieces)]

    async def receive() -> dict[str, object]:
        chunk = next(queue, b"")
        remaining[0] -= 1
        return {"type": "http.request", "body": chunk, "more_body": remaining[0] > 0}

    return receive


def upload_of(body: bytes, cuts: list[int], limit: int = 10**9) -> Upload:
    headers = [(b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode())]
    return Upload(receiver(body, cuts), headers, limit, 10**9, 10**10)


async def sent(upload: Upload, model: str | None) -> bytes:
    return b"".join([piece async for piece in upload.chunks(model)])


forms = st.tuples(
    st.lists(st.binary(max_size=300), max_size=3),  # fields before the model
    st.binary(max_size=3000).filter(lambda b: BOUNDARY.encode() not in b),  # the file
    st.booleans(),  # the file before the model
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789.", min_size=1, max_size=40),
)


@settings(max_examples=150, deadline=None)
@given(
    form=forms,
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    new=st.sampled_from(["x", "whisper-1-long-name"]),
)
def test_the_model_is_found_and_only_its_value_changes_however_the_body_is_cut(
    form: tuple[list[bytes], bytes, bool, str], cuts: list[int], new: str
) -> None:
    extras, data, file_first, model = form
    parts = [field(f"f{i}", value.replace(b"\r\n--", b"")) for i, value in enumerate(extras)]
    model_part, the_file = field("model", model.encode()), file_part("file", data)
    body = b"".join(
        [*parts, *((the_file, model_part) if file_first else (model_part, the_file)), END]
    )

    async def run() -> None:
        upload = upload_of(body, cuts)
        await upload.read_head(form_boundary([(b"content-type", CONTENT_TYPE)]), False)
        assert upload.model == model
        expected = body.replace(model_part, field("model", new.encode()), 1)
        out = await sent(upload, new)
        assert out == expected
        assert upload.length_for(new) == len(expected)
        upload.close()

    asyncio.run(run())
    assert BodyBudget.held == 0 and SpillBudget.held == 0


def test_a_small_upload_is_held_whole_and_can_be_sent_twice() -> None:
    body = field("model", b"whisper") + file_part("file", b"abc" * 100) + END

    async def run() -> None:
        upload = upload_of(body, [10, 200])
        await upload.read_head(BOUNDARY.encode(), False)
        assert await sent(upload, "w-1") == await sent(upload, "w-1")
        assert upload.replayable
        upload.close()

    asyncio.run(run())


def test_a_big_upload_is_sent_once_from_the_client_and_never_held_whole() -> None:
    data = b"\x01" * (3 * bodies.SPILL)
    body = field("model", b"whisper") + file_part("file", data) + END

    async def run() -> None:
        upload = upload_of(body, list(range(0, len(body), 65536)))
        await upload.read_head(BOUNDARY.encode(), False)
        assert upload.model == "whisper" and not upload.complete
        assert upload._head.size <= bodies.SPILL + 65536  # the head, not the file
        out = await sent(upload, None)
        assert out == body and not upload.replayable
        upload.close()

    asyncio.run(run())


def test_on_a_path_without_a_model_the_form_is_sent_from_its_first_file() -> None:
    body = field("purpose", b"batch") + file_part("file", b"\x02" * (2 * bodies.SPILL)) + END

    async def run() -> None:
        upload = upload_of(body, list(range(0, len(body), 65536)))
        await upload.read_head(BOUNDARY.encode(), model_optional=True)
        assert upload.model is None
        assert SpillBudget.held == 0  # nothing went to disk
        assert await sent(upload, None) == body
        upload.close()

    asyncio.run(run())


def test_a_file_before_the_model_spills_to_disk_within_the_processs_budget() -> None:
    big = file_part("file", b"\x03" * (2 * bodies.SPILL))
    body = big + field("model", b"whisper") + END

    async def run() -> None:
        headers = [(b"content-type", CONTENT_TYPE)]
        small = Upload(
            receiver(body, list(range(0, len(body), 65536))), headers, 10**9, 10**9, bodies.SPILL
        )
        with pytest.raises(ProxyError) as refused:
            await small.read_head(BOUNDARY.encode(), False)
        assert refused.value.status == 503
        assert SpillBudget.held == 0  # released with the refusal

    asyncio.run(run())


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (f"--{BOUNDARY}\r\n".encode() + b"X" * 20_000, "invalid_form"),  # endless part headers
        (field("model", b"m" * 2000) + END, "invalid_model"),
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'.encode()
            + b"m" * 5000,
            "invalid_model",
        ),
        (field("model", b"\xff\xfe") + END, "invalid_model"),
        (field("model", b"a\r\nb") + END, "invalid_model"),
        (f"--{BOUNDARY}XX".encode(), "invalid_form"),
    ],
)
def test_hostile_forms_get_a_400_and_hold_nothing(body: bytes, code: str) -> None:
    async def run() -> None:
        upload = upload_of(body, list(range(0, len(body), 1000)))
        with pytest.raises(ProxyError) as refused:
            await upload.read_head(BOUNDARY.encode(), False)
        assert (refused.value.status, refused.value.code) == (400, code)

    asyncio.run(run())
    assert BodyBudget.held == 0 and SpillBudget.held == 0


def test_an_upload_over_its_limit_is_413_as_it_arrives() -> None:
    body = field("model", b"whisper") + file_part("file", b"\x04" * 500_000) + END

    async def run() -> None:
        headers = [(b"content-type", CONTENT_TYPE)]  # no length: counted as it comes
        upload = Upload(
            receiver(body, list(range(0, len(body), 4096))), headers, 100_000, 10**9, 10**9
        )
        with pytest.raises(ProxyError) as refused:
            await upload.read_head(BOUNDARY.encode(), False)
            await sent(upload, None)
        assert refused.value.status == 413
        upload.close()

    asyncio.run(run())


def test_a_form_without_a_boundary_is_400() -> None:
    with pytest.raises(ProxyError) as refused:
        form_boundary([(b"content-type", b"multipart/form-data")])
    assert refused.value.code == "invalid_form"
    assert form_boundary([(b"content-type", b'multipart/form-data; boundary="a b"')]) == b"a b"
    assert form_boundary([(b"content-type", b"application/octet-stream")]) is None


def part(disposition: bytes, value: bytes) -> bytes:
    return f"--{BOUNDARY}\r\n".encode() + disposition + b"\r\n\r\n" + value + b"\r\n"


@pytest.mark.parametrize(
    "body",
    [
        # A model the proxy checks, then one the upstream (last wins) would use.
        field("model", b"cheap") + file_part("file", b"x") + field("model", b"dear") + END,
        # Names the proxy did not read as the model field, a parser upstream does.
        part(b'Content-Disposition: form-data; name="x"; name="model"', b"dear") + END,
        part(b'Content-Disposition: form-data; name="model"; name="x"', b"dear") + END,
        part(b"Content-Disposition: form-data; name*=utf-8''model", b"dear") + END,
        part(b'Content-Disposition: form-data; name="x"\r\nContent-Disposition: form-data', b"")
        + END,
        part(b'Content-Disposition: form-data; name="model"; x="a', b"dear") + END,
        part(b'Content-Disposition: form-data;\r\n name="model"', b"dear") + END,  # folded
        part(b'Content-Disposition : form-data; name="model"', b"dear") + END,
        part(
            b'Content-Disposition: form-data; name="model"\r\nContent-Transfer-Encoding: base64',
            b"Z3B0LTRv",  # gpt-4o, once python-multipart has decoded it
        )
        + END,
    ],
)
def test_a_form_the_upstream_could_read_another_model_from_is_refused(body: bytes) -> None:
    async def run() -> None:
        upload = upload_of(body, [7, 100])
        with pytest.raises(ProxyError) as refused:
            await upload.read_head(BOUNDARY.encode(), False)
        assert (refused.value.status, refused.value.code) == (400, "invalid_form")

    asyncio.run(run())
    assert BodyBudget.held == 0 and SpillBudget.held == 0


@pytest.mark.parametrize(
    "disposition",
    [
        b"Content-Disposition: form-data; name=model",  # unquoted: python-multipart reads it
        b'Content-Disposition: form-data; name="model"; x="; filename=y"',  # not a file
        b'content-disposition:form-data;name="model"',
    ],
)
def test_every_spelling_of_the_model_field_is_found(disposition: bytes) -> None:
    body = part(disposition, b"whisper") + file_part("file", b"abc") + END

    async def run() -> None:
        upload = upload_of(body, [3, 50])
        await upload.read_head(BOUNDARY.encode(), False)
        assert upload.model == "whisper"
        upload.close()

    asyncio.run(run())


def test_a_second_model_field_past_the_head_cuts_the_upload() -> None:
    data = b"\x05" * (2 * bodies.SPILL)
    body = field("model", b"cheap") + file_part("file", data) + field("model", b"dear") + END

    async def run() -> None:
        upload = upload_of(body, list(range(0, len(body), 65536)))
        await upload.read_head(BOUNDARY.encode(), False)
        assert upload.model == "cheap" and not upload.complete
        with pytest.raises(ProxyError) as refused:
            await sent(upload, None)
        assert refused.value.code == "invalid_form" and upload.failure is refused.value
        upload.close()

    asyncio.run(run())
    assert BodyBudget.held == 0 and SpillBudget.held == 0


def test_spaces_after_a_boundary_are_transport_padding() -> None:
    body = field("model", b"whisper").replace(
        BOUNDARY.encode() + b"\r\n", BOUNDARY.encode() + b" \t\r\n"
    )
    body += file_part("file", b"abc") + END

    async def run() -> None:
        upload = upload_of(body, [5])
        await upload.read_head(BOUNDARY.encode(), False)
        assert upload.model == "whisper"
        assert await sent(upload, "w-2") == body.replace(b"whisper", b"w-2")
        upload.close()

    asyncio.run(run())


def test_a_form_of_countless_tiny_parts_is_refused_past_the_part_limit() -> None:
    tiny = b"".join(field(f"f{i}", b"v") for i in range(bodies.MAX_FORM_PARTS))
    at_limit = tiny + END
    over = tiny + field("model", b"whisper") + END

    async def run() -> None:
        upload = upload_of(at_limit, [4096])
        await upload.read_head(BOUNDARY.encode(), True)
        assert upload.model is None and upload.complete
        upload.close()
        upload = upload_of(over, list(range(0, len(over), 4096)))
        with pytest.raises(ProxyError) as refused:
            await upload.read_head(BOUNDARY.encode(), False)
        assert (refused.value.status, refused.value.code) == (400, "invalid_form")
        assert "1000 parts" in refused.value.message

    asyncio.run(run())
    assert BodyBudget.held == 0 and SpillBudget.held == 0


@pytest.mark.parametrize(
    ("content_type", "boundary"),
    [
        (b"multipart/form-data; boundary=XyZ", b"XyZ"),
        (b'multipart/form-data; boundary="a b"', b"a b"),
        (b"Multipart/Form-Data;BOUNDARY=q; charset=utf-8;", b"q"),
        # The boundary a parser upstream reads, not one inside another parameter's quotes.
        (b'multipart/form-data; charset="; boundary=AAA"; boundary=BBB', b"BBB"),
        (b"multipart/form-data; boundary=AAA; boundary=BBB", None),  # which one? refused
        (b'multipart/form-data; boundary="AAA', None),
        (b"multipart/form-data; boundary=" + b"x" * 71, None),
    ],
)
def test_the_boundary_is_read_as_the_upstream_reads_it(
    content_type: bytes, boundary: bytes | None
) -> None:
    headers = [(b"content-type", content_type)]
    if boundary is not None:
        assert form_boundary(headers) == boundary
        return
    with pytest.raises(ProxyError) as refused:
        form_boundary(headers)
    assert refused.value.code == "invalid_form"
