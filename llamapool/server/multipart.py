"""Text fields of a ``multipart/form-data`` body, read in place.

Audio and image uploads name their model in a form field beside the file. The server holds
the body once (it relays it byte for byte, boundary and all); this finds the few small text
fields it needs by searching that buffer, without copying or decoding the file parts.
"""

from __future__ import annotations

import re
from email.message import Message

#: A text field longer than this is not one the server reads (model ids are far shorter).
MAX_FIELD = 1024
#: A form may have this many parts (Go's ``mime/multipart`` default) with this many bytes of
#: part headers in all: a client decides both, and they are read on the event loop (the
#: bounds hold the worst form to a few milliseconds there).
MAX_PARTS = 1000
MAX_PART_HEADERS = 256 * 1024

#: One parameter of a Content-Disposition (``; name="model"``): a token, then a token or a
#: quoted string. Read with one linear scan; the standard library's ``Message.get_param``
#: takes time quadratic in the header's length.
_PARAM = re.compile(
    rb""";[ \t]*([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*=[ \t]*("(?:[^"\\\r\n]|\\.)*"|[^;\r\n]*)"""
)
_DISPOSITION = re.compile(rb"^content-disposition[ \t]*:", re.IGNORECASE | re.MULTILINE)


class FormError(ValueError):
    """The body is not the multipart form its Content-Type announces."""


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type header."""
    message = Message()
    message["Content-Type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise FormError("the body must be multipart/form-data")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:
        raise FormError("the multipart Content-Type has no valid boundary")
    return boundary.encode("latin-1", "replace")


def form_fields(body: bytes, content_type: str, names: frozenset[str]) -> dict[str, str]:
    """The values of the text fields in ``names`` (the first of each), as UTF-8 text."""
    delimiter = b"--" + boundary_of(content_type)
    found: dict[str, str] = {}
    parts = heads = 0
    start = body.find(delimiter)
    if start < 0:
        raise FormError("the multipart body does not contain its boundary")
    while True:
        start += len(delimiter)
        if body.startswith(b"--", start):  # the closing delimiter
            return found
        head_end = body.find(b"\r\n\r\n", start)
        if head_end < 0:
            raise FormError("a multipart part has no end of headers")
        end = body.find(b"\r\n" + delimiter, head_end)
        if end < 0:
            raise FormError("the multipart body is not closed by its boundary")
        parts, heads = parts + 1, heads + head_end - start
        if parts > MAX_PARTS:
            raise FormError(f"the multipart form has more than {MAX_PARTS} parts")
        if heads > MAX_PART_HEADERS:
            raise FormError(
                f"the multipart form's part headers are longer than {MAX_PART_HEADERS} bytes"
            )
        name = _field_name(body[start:head_end])
        if name in names and name not in found and end - head_end - 4 <= MAX_FIELD:
            found[name] = body[head_end + 4 : end].decode("utf-8", "replace")
        start = end + 2


def _field_name(head: bytes) -> str | None:
    """The ``name`` in a part's Content-Disposition; ``None`` for a file part (one with a
    ``filename`` or an RFC 2231 ``filename*``)."""
    found = _DISPOSITION.search(head)
    if found is None:
        return None
    line_end = head.find(b"\r\n", found.end())
    line = head[found.end() : line_end if line_end >= 0 else len(head)]
    name: str | None = None
    for key, value in _PARAM.findall(line):
        key = key.lower()
        if key in (b"filename", b"filename*"):
            return None
        if key == b"name" and name is None:
            name = _unquoted(value).decode("latin-1")
    return name


def _unquoted(value: bytes) -> bytes:
    """A parameter's value: a quoted string without its quotes and escapes, or a token."""
    value = value.strip()
    if len(value) >= 2 and value.startswith(b'"') and value.endswith(b'"'):
        return re.sub(rb"\\(.)", rb"\1", value[1:-1])
    return value
