"""Text fields of a ``multipart/form-data`` body, read in place.

Audio and image uploads name their model in a form field beside the file. The server holds
the body once (it relays it byte for byte, boundary and all); this finds the few small text
fields it needs by searching that buffer, without copying or decoding the file parts.
"""

from __future__ import annotations

from email.message import Message

#: A text field longer than this is not one the server reads (model ids are far shorter).
MAX_FIELD = 1024


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
        name = _field_name(body[start:head_end])
        if name in names and name not in found and end - head_end - 4 <= MAX_FIELD:
            found[name] = body[head_end + 4 : end].decode("utf-8", "replace")
        start = end + 2


def _field_name(head: bytes) -> str | None:
    """The ``name`` in a part's Content-Disposition; ``None`` for a file part."""
    for line in head.decode("latin-1").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        message = Message()
        message["Content-Disposition"] = value.strip()
        if message.get_param("filename", header="content-disposition") is not None:
            return None
        name = message.get_param("name", header="content-disposition")
        return name if isinstance(name, str) else None
    return None
