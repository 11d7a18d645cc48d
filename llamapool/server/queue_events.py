"""Queue position for streaming clients that wait (opt-in: ``QUEUE_POSITION_EVENTS``).

A chat UI whose request waits for a busy pool shows nothing but a spinner. With this on, a
streaming OpenAI or Anthropic request that has to wait gets its stream at once (200,
``text/event-stream``) and an SSE comment with its place in line every second
(``: queued position=3``); SSE clients skip comments, so strict clients are unaffected. Once a
worker takes the request, its answer follows on the same stream.

The status is sent before any worker has answered, so what would have been an error status
(the queue timed out, the backend refused the request) arrives as an error event in the
stream instead, in the API's own shape: ``data: {"error": ...}`` for OpenAI,
``event: error`` for Anthropic. Ollama's NDJSON streams have no comments: they are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

import structlog
from aiohttp import web

from llamapool.server.http_errors import Flavor

log = structlog.get_logger("llamapool.server")

#: The response a waiting stream was given; the relay answers on it once a worker is found.
QUEUED = web.RequestKey("llamapool_queued_stream", web.StreamResponse)
#: Seconds between two position comments.
INTERVAL = 1.0
#: Streams whose waiting can be shown: those whose stream is SSE.
SSE_FLAVORS = frozenset({Flavor.OPENAI, Flavor.ANTHROPIC})


class QueueReporter:
    """Tells one waiting stream its place in line until a worker takes it.

    Given to the scheduler as its ``on_wait`` callback: called only when the request has to
    wait, so a request served at once never sees any of this.
    """

    def __init__(self, request: web.Request, flavor: Flavor, *, interval: float = INTERVAL):
        self.request = request
        self.flavor = flavor
        self.interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __call__(self, position: Callable[[], int]) -> None:
        self._task = asyncio.create_task(self._report(position))

    async def _report(self, position: Callable[[], int]) -> None:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        with contextlib.suppress(ConnectionError):
            await response.prepare(self.request)
            self.request[QUEUED] = response
            while not self._stop.is_set():
                place = position()
                if place:
                    await response.write(b": queued position=%d\n\n" % place)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)

    async def stop(self) -> None:
        """The request left the queue: no more comments (a write under way finishes)."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def answer(self, response: web.StreamResponse) -> web.StreamResponse:
        """The relay's answer, on the stream the client already has if it waited: an error
        the relay returned (not sent yet) becomes an error event there."""
        if QUEUED not in self.request:
            return response
        sent = self.request[QUEUED]
        if response is sent or response.prepared:
            return response
        body = cast(web.Response, response).body
        data = body if isinstance(body, bytes) else b"{}"
        event = b"event: error\n" if self.flavor is Flavor.ANTHROPIC else b""
        with contextlib.suppress(ConnectionError):
            await sent.write(event + b"data: " + data + b"\n\n")
            await sent.write_eof()
        log.info("queued_stream_failed", status=response.status)
        return sent
