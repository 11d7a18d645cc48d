"""One proxied request as the worker link sees it: the events a worker sends for it.

The link's reader pushes events (headers, body chunks, end) without ever awaiting, so one slow
client cannot stall the reader that serves every other request of that worker. The request
handler pulls them with a deadline.

What one chunk costs decides how many streams a server carries, so the common case takes a
shorter path: while the handler waits with nothing queued and its client can take more, a
chunk goes straight from the reader to the client's socket through the handler's *sink*, with
no task wake-up, no future and no timer. The handler wakes only for what needs it: the end, a
failure, a deadline, or a client whose socket is full (then chunks queue, in order, and the
handler writes them, several queued chunks in one write).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

import attrs

from llamapool.protocol import ResponseHeaders, WireError


@attrs.frozen
class Ended:
    """The worker finished the request; ``error`` says why if it failed."""

    error: WireError | None = None


@attrs.frozen
class Broken:
    """The request can not go on: its worker left, or the server is shutting down."""

    reason: str


@attrs.frozen
class Busy(Broken):
    """The request did not start because its worker is full (another server of the cluster
    said so): it may wait for a worker again, here."""


Event: TypeAlias = ResponseHeaders | bytes | memoryview | Ended | Broken


class Exchange:
    """The response side of one request in flight on a worker.

    ``limit`` bounds the body bytes held for a client that reads slower than its worker
    sends (a peer without flow control); past it the request ends instead of growing memory,
    and ``on_overflow`` is called with the request id (so the worker is told to stop at once,
    not when the stalled client next reads).
    """

    __slots__ = (
        "_events",
        "_waiter",
        "buffered",
        "finished",
        "last_sunk",
        "limit",
        "on_overflow",
        "request_id",
        "sink",
        "worker_ended",
    )

    def __init__(
        self,
        request_id: str,
        *,
        limit: int,
        on_overflow: Callable[[str], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.limit = limit
        self.on_overflow = on_overflow
        self.buffered = 0
        #: Nothing more will come for this request.
        self.finished = False
        #: The worker itself ended the request (so it needs no cancel).
        self.worker_ended = False
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        #: Writes a body chunk straight to the client and answers ``True``, or answers
        #: ``False`` when it cannot now (the chunk then queues). Armed only while the handler
        #: waits with nothing queued, so chunks never overtake each other.
        self.sink: Callable[[bytes | memoryview], bool] | None = None
        #: Loop time of the last chunk that went through the sink (for the idle timeout).
        self.last_sunk = 0.0

    def push(self, event: Event) -> None:
        if self.finished:
            return
        if (
            self.sink is not None
            and self._waiter is not None
            and not self._events
            and isinstance(event, (bytes, memoryview))
            and self.sink(event)
        ):
            return
        if isinstance(event, (Ended, Broken)):
            self.finished = True
            self.worker_ended = isinstance(event, Ended)
        elif not isinstance(event, ResponseHeaders):
            self.buffered += len(event)
            if self.buffered > self.limit:
                self._events.clear()
                self.buffered = 0
                self.finished = True
                event = Broken("the client reads too slowly; the response buffer is full")
                if self.on_overflow is not None:
                    self.on_overflow(self.request_id)
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, deadline: float) -> Event:
        """The next event; :class:`TimeoutError` once the loop clock passes ``deadline``."""
        while not self._events:
            loop = asyncio.get_running_loop()
            if loop.time() >= deadline:
                raise TimeoutError
            self._waiter = waiter = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        event = self._events.popleft()
        if isinstance(event, (bytes, memoryview)):
            self.buffered -= len(event)
        return event

    @property
    def pending(self) -> bool:
        """Whether an event is queued (more of the answer is already here)."""
        return bool(self._events)

    def clean_end(self) -> Ended | None:
        """The worker's successful end, taken, if it is the next event: then the whole rest of
        the answer is here, and can leave in the same write as its last chunks."""
        events = self._events
        if events:
            event = events[0]
            if isinstance(event, Ended) and event.error is None:
                events.popleft()
                return event
        return None

    def queued_chunks(self) -> list[bytes | memoryview]:
        """The body chunks queued now, up to the next event of another kind (taken)."""
        events, chunks = self._events, []
        while events and isinstance(events[0], (bytes, memoryview)):
            chunk = events.popleft()
            assert isinstance(chunk, (bytes, memoryview))
            self.buffered -= len(chunk)
            chunks.append(chunk)
        return chunks


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
