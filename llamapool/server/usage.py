"""Token counts read from responses as they stream past, without buffering or rewriting them.

Backends report usage in a few flat numeric fields:

- OpenAI's chat, completions and embeddings ``usage`` object (``prompt_tokens``,
  ``completion_tokens``), in a non-streamed body or in the last SSE event of a stream;
- the OpenAI Responses API's ``usage`` (``input_tokens``, ``output_tokens``), in a non-streamed
  body or in the ``response.completed`` event (``response.created`` carries ``"usage": null``);
- Anthropic's ``usage`` (``input_tokens``, ``output_tokens``), in a non-streamed body, or in a
  stream split over ``message_start`` (input, and an early output count) and ``message_delta``
  (the final output count);
- Ollama's ``prompt_eval_count`` / ``eval_count`` in its body or final ``done`` line.

A JSON key is always written with unescaped quotes, while the same text inside a string value
has its quotes escaped, so matching ``"name": number`` on the raw bytes finds exactly those
fields, wherever the chunk boundaries fall. Only chunks that contain a marker are searched.
A later value of a field replaces an earlier one: streams report their totals last.
Only the top-level counts are read: ``cached_tokens``, ``reasoning_tokens`` and Anthropic's
``cache_read_input_tokens`` are details of those counts, and their names do not match.
"""

from __future__ import annotations

import re

import attrs

_FIELDS = re.compile(
    rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens|prompt_eval_count|eval_count)"'
    rb"\s*:\s*(\d+)"
)
#: Two literal searches: far cheaper than one alternation, which tries every byte.
_MARKERS = (re.compile(rb'_tokens"'), re.compile(rb'eval_count"'))
#: Longer than any ``"field": number`` we look for, so a field split across chunks is found.
_OVERLAP = 64


@attrs.frozen
class Usage:
    tokens_in: int
    tokens_out: int


class UsageScanner:
    """Feed it every chunk of one response; ask :meth:`usage` at the end."""

    __slots__ = ("_fields", "_tail")

    def __init__(self) -> None:
        self._fields: dict[bytes, int] = {}
        self._tail = b""

    def feed(self, chunk: bytes | memoryview) -> None:
        """Look at one chunk (regular expressions read memoryviews without copying them)."""
        seam = self._tail + bytes(chunk[:_OVERLAP])
        if _marked(seam):
            self._scan(seam)
        if _marked(chunk):
            self._scan(chunk)
        self._tail = seam[-_OVERLAP:] if len(chunk) <= _OVERLAP else bytes(chunk[-_OVERLAP:])

    def _scan(self, data: bytes | memoryview) -> None:
        for name, value in _FIELDS.findall(data):
            self._fields[name] = int(value)  # later values win: streams report totals last

    def usage(self) -> Usage | None:
        """What the backend reported, or ``None`` when it reported nothing."""
        f = self._fields
        if b"prompt_tokens" in f or b"completion_tokens" in f:
            return Usage(f.get(b"prompt_tokens", 0), f.get(b"completion_tokens", 0))
        if b"input_tokens" in f or b"output_tokens" in f:  # Responses API, Anthropic
            return Usage(f.get(b"input_tokens", 0), f.get(b"output_tokens", 0))
        if b"prompt_eval_count" in f or b"eval_count" in f:
            return Usage(f.get(b"prompt_eval_count", 0), f.get(b"eval_count", 0))
        return None


def _marked(data: bytes | memoryview) -> bool:
    return any(marker.search(data) for marker in _MARKERS)
