"""The SSE streams of one MCP session and their replay buffer (``Last-Event-ID``).

Each stream of a session (a POST answered as SSE, or a GET stream) has a number, and its
events have ids ``<stream>-<seq>`` (``seq`` counts from 1), unique within the session as the
specification asks and naming the stream they belong to. The session keeps its newest events,
of all its streams together, up to a count and a size (always the newest one, whatever its
size), so a client whose connection dropped can ``GET`` with ``Last-Event-ID`` and receive what
followed on that stream and nothing from another. A stream whose next event is no longer held
cannot be resumed: the client is told so rather than given a gap.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

#: An SSE event: its id and its data (one JSON-RPC message).
Event = tuple[str, bytes]
#: One connection's share of a stream: its events, then ``None`` when the stream ends.
Connection = asyncio.Queue[Event | None]

_EVENT_ID = re.compile(r"([0-9]{1,9})-([0-9]{1,18})")


class Stream:
    """What one response (a POST's SSE answer, or the GET stream) carries to the client.

    A stream outlives its HTTP connection: what is put while no connection is attached is
    held in the session's replay buffer only, and the calls it carries keep running (a dropped
    connection is not a cancellation).
    """

    def __init__(
        self, streams: SessionStreams, number: int, *, waiting: int, listening: bool
    ) -> None:
        self._streams = streams
        self.number = number
        #: Requests it carries that still wait for their response.
        self.waiting = waiting
        #: The session's GET stream (server-initiated messages), not a POST's answer.
        self.listening = listening
        self.seq = 0
        self.ended = False
        self.buffered = 0
        self.connection: Connection | None = asyncio.Queue()

    @property
    def detached(self) -> bool:
        return self.connection is None

    def put(self, data: bytes) -> None:
        self.seq += 1
        self._streams.record(self, self.seq, data)
        if self.connection is not None:
            self.connection.put_nowait((self.event_id(self.seq), data))

    def answered(self) -> None:
        """One of the requests it carries got its response (or will get none)."""
        self.waiting -= 1
        if self.waiting <= 0:
            self.end()

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.connection is not None:
            self.connection.put_nowait(None)
        self._streams.check(self)

    def detach(self, connection: Connection) -> None:
        """``connection`` (the HTTP response) is over; a newer one may have taken its place."""
        if self.connection is connection:
            self.connection = None

    def event_id(self, seq: int) -> str:
        return f"{self.number}-{seq}"


class SessionStreams:
    """The streams of one session and the newest events they carried.

    Holds at most ``max_events`` events and ``max_bytes`` of their data, but always the
    newest event; older ones are dropped first.
    """

    def __init__(self, *, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: Streams that can still be resumed or still carry calls, by number.
        self.streams: dict[int, Stream] = {}
        self._last = 0
        self._events: deque[tuple[Stream, int, bytes]] = deque()
        self._bytes = 0
        #: Per stream number, the highest ``seq`` dropped from the buffer.
        self._dropped: dict[int, int] = {}

    def open(self, *, waiting: int = 0, listening: bool = False) -> Stream:
        self._last += 1
        stream = self.streams[self._last] = Stream(
            self, self._last, waiting=waiting, listening=listening
        )
        return stream

    def record(self, stream: Stream, seq: int, data: bytes) -> None:
        self._events.append((stream, seq, data))
        self._bytes += len(data)
        stream.buffered += 1
        while len(self._events) > 1 and (
            len(self._events) > self.max_events or self._bytes > self.max_bytes
        ):
            old, old_seq, old_data = self._events.popleft()
            self._bytes -= len(old_data)
            old.buffered -= 1
            self._dropped[old.number] = old_seq
            self.check(old)

    def check(self, stream: Stream) -> None:
        """Forget ``stream`` once it has ended and none of its events are held."""
        if stream.ended and not stream.buffered:
            self.streams.pop(stream.number, None)
            self._dropped.pop(stream.number, None)

    def forget(self, stream: Stream) -> None:
        """``stream`` was answered in full as ``application/json``: nothing to resume."""
        kept = [event for event in self._events if event[0] is not stream]
        self._bytes -= sum(len(data) for s, _, data in self._events if s is stream)
        self._events = deque(kept)
        stream.buffered = 0
        stream.ended = True
        self.check(stream)

    def resume(self, last_event_id: str) -> tuple[Stream, Connection] | None:
        """A new connection for the stream of ``last_event_id`` with the events after it, or
        ``None`` when that is no stream of this session or its next event is no longer held.

        An older connection of the stream ends.
        """
        match = _EVENT_ID.fullmatch(last_event_id)
        if match is None:
            return None
        number, after = int(match[1]), int(match[2])
        stream = self.streams.get(number)
        if stream is None or after > stream.seq or self._dropped.get(number, 0) > after:
            return None
        if stream.connection is not None:
            stream.connection.put_nowait(None)
        connection: Connection = asyncio.Queue()
        for each, seq, data in self._events:
            if each is stream and seq > after:
                connection.put_nowait((stream.event_id(seq), data))
        if stream.ended:
            connection.put_nowait(None)
        stream.connection = connection
        return stream, connection
