"""Reading a form's model field: what the stdlib's header parser would read, in linear time,
with each part's headers bounded (a client decides their length, and they are read on the
event loop)."""

from __future__ import annotations

from email.message import Message

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamapool.server.multipart import MAX_PART_HEADERS, MAX_PARTS, FormError, form_fields

BOUNDARY = "b0und"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
NAMES = frozenset({"model", "stream"})


def form(*parts: tuple[str, str]) -> bytes:
    """A multipart body of (Content-Disposition value, content) parts."""
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n{content}\r\n".encode()
        for disposition, content in parts
    )
    return body + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(
    "disposition",
    [
        'form-data; name="model"',
        "form-data; name=model",
        'form-data;name="model"',
        'FORM-DATA; NAME="model"',
        'form-data; name = "model" ; other="x"',
        'form-data; other="a; name=\\"stream\\""; name="model"',
    ],
)
def test_a_text_fields_name_is_read_however_it_is_spelled(disposition: str) -> None:
    assert {"model": "llama3"} == form_fields(form((disposition, "llama3")), CONTENT_TYPE, NAMES)


@pytest.mark.parametrize(
    "disposition",
    [
        'form-data; name="model"; filename="a.wav"',
        "form-data; name=\"model\"; filename*=utf-8''a.wav",
        'form-data; filename="a.wav"; name="model"',
    ],
)
def test_a_file_part_is_never_read_as_a_field(disposition: str) -> None:
    assert {} == form_fields(form((disposition, "llama3")), CONTENT_TYPE, NAMES)


def test_the_first_of_each_field_counts() -> None:
    body = form(('form-data; name="model"', "first"), ('form-data; name="model"', "second"))

    assert {"model": "first"} == form_fields(body, CONTENT_TYPE, NAMES)


def test_part_headers_longer_than_the_bound_are_refused() -> None:
    """A 2 MiB Content-Disposition took the stdlib's parser 36 s on the event loop; headers
    past the bound, in one part or over many, are refused before they are read."""
    padding = "a=b; " * (MAX_PART_HEADERS // 5)
    one = form((f'form-data; {padding}name="model"', "llama3"))
    many = form(*[(f'form-data; {padding[:1000]}name="x"', "v")] * 300, ('name="model"', "m"))

    for body in (one, many):
        with pytest.raises(FormError, match="headers are longer than"):
            form_fields(body, CONTENT_TYPE, NAMES)


def test_a_form_of_too_many_parts_is_refused() -> None:
    body = form(*[('form-data; name="x"', "v")] * MAX_PARTS, ('form-data; name="model"', "m"))

    with pytest.raises(FormError, match=f"more than {MAX_PARTS} parts"):
        form_fields(body, CONTENT_TYPE, NAMES)


def test_forms_within_the_bounds_are_read() -> None:
    padding = "a=b; " * 1000
    parts = [(f'form-data; {padding}name="x"', "v")] * 10 + [('form-data; name="x"', "v")] * 980
    body = form(*parts, ('form-data; name="model"', "llama3"))

    assert {"model": "llama3"} == form_fields(body, CONTENT_TYPE, NAMES)


_TOKENS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.", min_size=1, max_size=8)
_QUOTED = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
    max_size=12,
).map(lambda text: f'"{text}"')
_PARAMS = st.lists(
    st.tuples(st.sampled_from(["name", "filename", "other", "NAME", "x"]), _TOKENS | _QUOTED),
    max_size=4,
)


@given(params=_PARAMS)
def test_the_name_read_is_the_one_the_stdlib_reads(params: list[tuple[str, str]]) -> None:
    """Over generated Content-Disposition headers, the linear reader finds the field the
    stdlib's parser finds (and, like it, none in a file part)."""
    disposition = "form-data" + "".join(f"; {key}={value}" for key, value in params)
    message = Message()
    message["Content-Disposition"] = disposition
    name = message.get_param("name", header="content-disposition")
    is_file = message.get_param("filename", header="content-disposition") is not None
    expected = {name: "v"} if isinstance(name, str) and name in NAMES and not is_file else {}

    assert expected == form_fields(form((disposition, "v")), CONTENT_TYPE, NAMES)
