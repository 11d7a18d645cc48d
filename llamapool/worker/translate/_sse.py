"""An incremental parser for server-sent events, for streams cut into chunks anywhere."""

from __future__ import annotations

import re

_EOL = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Turn the bytes of an event stream into the ``data`` of each event, chunk by chunk.

    Lines may end in CRLF, LF or CR (a CR at the end of a chunk is held back in case an LF
    follows). Comments, ``event:``, ``id:`` and ``retry:`` lines are skipped: OpenAI streams
    carry everything in ``data``.
    """

    __slots__ = ("_data", "_rest")

    def __init__(self) -> None:
        self._rest = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that ``chunk`` completes, in order."""
        buffer = self._rest + chunk if self._rest else chunk
        end = len(buffer)
        if buffer.endswith(b"\r"):
            end -= 1  # maybe half of a CRLF
        events: list[bytes] = []
        start = 0
        for match in _EOL.finditer(buffer, 0, end):
            self._line(buffer[start : match.start()], events)
            start = match.end()
        self._rest = buffer[start:]
        return events

    def close(self) -> list[bytes]:
        """The data of an event the stream left unterminated (lenient: the spec drops it)."""
        events: list[bytes] = []
        rest, self._rest = self._rest.rstrip(b"\r"), b""
        if rest:
            self._line(rest, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if not line:
            if self._data:
                events.append(b"\n".join(self._data))
                self._data = []
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            self._data.append(b"")
