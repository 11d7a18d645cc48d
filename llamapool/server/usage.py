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
#: The two literal ends of every field name, found far faster than by the alternation, which
#: tries every byte.
_MARKERS = (b'_tokens"', b'eval_count"')
_MARKER_PATTERNS = tuple(re.compile(re.escape(marker)) for marker in _MARKERS)
#: Longer than any ``"field": number`` we look for, so a field split across chunks is found.
_OVERLAP = 64
#: A chunk up to this size is searched joined to the previous chunk's tail: one copy of a few
#: hundred bytes costs less than two searches (a token's SSE event is about 200 bytes).
_JOIN = 4096


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
        """Look at one chunk (a large one is searched in place, without a copy)."""
        if len(chunk) <= _JOIN:
            data = self._tail + chunk
            if _MARKERS[0] in data or _MARKERS[1] in data:
                self._scan(data)
            self._tail = data[-_OVERLAP:]
            return
        seam = self._tail + chunk[:_OVERLAP]
        if _marked(seam):
            self._scan(seam)
        if _marked(chunk):
            self._scan(chunk)
        self._tail = bytes(chunk[-_OVERLAP:])

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
    """Whether a large chunk holds a marker (regular expressions read a memoryview in place,
    where ``in`` would need a copy)."""
    return any(marker.search(data) for marker in _MARKER_PATTERNS)
