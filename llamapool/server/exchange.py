"""One proxied request as the worker link sees it: the events a worker sends for it.

The link's reader pushes events (headers, body chunks, end) without ever awaiting, so one slow
client cannot stall the reader that serves every other request of that worker. The request
handler pulls them with a deadline. Waiting costs one future per wait, and none while events
are already queued.
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
        "limit",
        "on_overflow",
        "request_id",
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

    def push(self, event: Event) -> None:
        if self.finished:
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


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
