"""Relaying one response to its client, chunk by chunk, as the worker sends it.

Chunks are written as they arrive and never parsed or copied; the usage scanner only reads
them. With a flow-controlled worker, credit is given back as the client consumes the bytes,
so a slow client slows only its own worker job and the server holds at most a window per
request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import cast

import attrs
import orjson
import structlog
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from llamapool.headers import allowed_response_headers
from llamapool.protocol import ResponseHeaders
from llamapool.server.affinity import ResponseIdScanner
from llamapool.server.appkeys import ENDS
from llamapool.server.exchange import Broken, Ended, Event, Exchange
from llamapool.server.http_errors import error_response, flavor_for
from llamapool.server.pool import Link
from llamapool.server.queue_events import QUEUED
from llamapool.server.state import CANCELLED, ERROR, SUCCESS
from llamapool.server.usage import Usage, UsageScanner
from llamapool.server.validate import check_headers

log = structlog.get_logger("llamapool.server")

#: Seconds past REQUEST_TIMEOUT after which a response still stuck writing to a client that
#: stopped reading is cut off (a client that reads gets the timeout as an error event before).
STALL_GRACE = 1.0


@attrs.define
class Trace:
    """What happened to one request: for its log line, the state API and the metrics."""

    status: int = 0
    outcome: str = ERROR
    error: str = ""
    first_byte: float | None = None
    usage: Usage | None = None


@attrs.frozen
class Deadlines:
    """The loop times a request must end by, and how long a stream may stay silent."""

    end: float
    idle: float

    def next_wait(self, since: float) -> float:
        """When to stop waiting for a worker last heard from at loop time ``since``."""
        return min(self.end, since + self.idle)

    def why(self) -> str:
        if asyncio.get_running_loop().time() >= self.end:
            return "the request took longer than REQUEST_TIMEOUT"
        return f"the worker sent nothing for {self.idle:g}s (IDLE_TIMEOUT)"


async def stream_back(
    request: web.Request,
    first: ResponseHeaders,
    exchange: Exchange,
    link: Link,
    *,
    window: int,
    deadlines: Deadlines,
    trace: Trace,
    usage: bool = True,
    response_id: ResponseIdScanner | None = None,
) -> web.StreamResponse:
    """Send the worker's status and headers, then each chunk the moment it arrives.

    ``usage=False`` skips the usage scan (an answer that reports counts, not consumption, like
    Anthropic's ``count_tokens``); ``response_id`` reads a Responses API answer's id.
    """
    trace.status, trace.first_byte = first.status, time.monotonic()
    headers = check_headers(allowed_response_headers(first.headers))
    # A stream that waited in line was given its 200 already (see .queue_events).
    response = (
        request[QUEUED]
        if QUEUED in request
        else web.StreamResponse(status=first.status, headers=headers)
    )
    body = _Body(exchange, link, window, UsageScanner() if usage else None, response_id)
    ends = request.app[ENDS]
    loop = asyncio.get_running_loop()
    # A write waits while the client's socket is full: REQUEST_TIMEOUT must bound that too.
    stalled = loop.call_at(deadlines.end + STALL_GRACE, _cut_off, request)
    try:
        if not response.prepared:
            # With more of the answer here already, the headers leave with it, in one write
            # (aiohttp's private switch; otherwise they leave at once, as a stream's client
            # expects, and an aiohttp without the switch always sends them at once).
            with contextlib.suppress(AttributeError):
                response._send_headers_immediately = not exchange.pending
            await response.prepare(request)
        event: Event
        heard = loop.time()  # when the worker was last heard from
        while True:
            try:
                event = await exchange.next(deadlines.next_wait(heard))
            except TimeoutError:
                if exchange.last_sunk > heard and loop.time() < deadlines.end:
                    heard = exchange.last_sunk  # chunks went straight through meanwhile
                    continue
                event = Broken(deadlines.why())
            heard = loop.time()
            if not isinstance(event, (bytes, memoryview)):
                await ends.turn()
                break
            chunks = [event, *exchange.queued_chunks()]
            end = exchange.clean_end()
            if end is not None:  # the rest of the answer is here: body and end in one write
                event = end
                await ends.turn()
                await body.write(response, chunks, last=True)
                break
            await body.write(response, chunks)
            body.arm(request, response)
        exchange.sink = None
        trace.usage = body.usage()
        if isinstance(event, Ended) and event.error is None:
            await response.write_eof()
            trace.outcome = SUCCESS if first.status < 400 else ERROR
            if first.status >= 400:
                trace.error = f"backend answered HTTP {first.status}"
        else:
            trace.error = failure(event)
            await _end_with_error(request, response, trace.error, written=body.written)
    except ConnectionResetError:  # the client left; the caller cancels the worker's job
        trace.outcome = CANCELLED
        log.info("client_disconnected", path=request.path)
    finally:
        exchange.sink = None
        stalled.cancel()
    return response


class _Body:
    """The body of one response on its way to the client: scanned for usage (and a Responses
    id), credited back to a flow-controlled worker, and written either by the handler or,
    while the client keeps up, straight from the worker's reader (see :mod:`.exchange`)."""

    __slots__ = (
        "_consumed",
        "_exchange",
        "_link",
        "_response_id",
        "_scanner",
        "_window",
        "written",
    )

    def __init__(
        self,
        exchange: Exchange,
        link: Link,
        window: int,
        scanner: UsageScanner | None,
        response_id: ResponseIdScanner | None,
    ) -> None:
        self._exchange = exchange
        self._link = link
        self._window = window
        self._scanner = scanner
        self._response_id = response_id
        self._consumed = 0
        self.written = False

    def usage(self) -> Usage | None:
        return self._scanner.usage() if self._scanner is not None else None

    def _read(self, chunk: bytes | memoryview) -> None:
        """What every chunk goes through, whichever path writes it."""
        if self._scanner is not None:
            self._scanner.feed(chunk)
        if self._response_id is not None:
            self._response_id.feed(chunk)

    def _credit(self, size: int) -> None:
        """``size`` more bytes are with the client's socket: the worker may send as many more."""
        if self._window:
            self._consumed += size
            if self._consumed >= self._window // 2:
                self._link.grant_soon(self._exchange.request_id, self._consumed)
                self._consumed = 0

    async def write(
        self, response: web.StreamResponse, chunks: list[bytes | memoryview], *, last: bool = False
    ) -> None:
        """The handler's path: several queued chunks leave in one write (with the end of the
        response if they are the ``last``); they are credited once written (the write waits
        while the client's socket is full)."""
        for chunk in chunks:
            self._read(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if last:
            await response.write_eof(bytes(data))
        else:
            await response.write(data)
        self.written = True
        self._credit(len(data))

    def arm(self, request: web.Request, response: web.StreamResponse) -> None:
        """Let the next chunks go straight to the client's socket while it keeps up.

        The headers have left with the first chunk by now. Only a plain body qualifies: no
        compression (the pool never compresses; this is a guard). The writer is aiohttp's
        private one (its byte count feeds the access log); an aiohttp without it, or without
        its compression flag, gets no straight path, not an error.
        """
        if self._exchange.sink is not None:
            return
        writer = getattr(response, "_payload_writer", None)
        protocol = request.protocol
        transport = request.transport
        plain = getattr(writer, "_compress", True) is None
        if not isinstance(writer, StreamWriter) or transport is None or not plain:
            return
        chunked = writer.chunked
        exchange = self._exchange
        loop = asyncio.get_running_loop()

        def sink(chunk: bytes | memoryview) -> bool:
            if protocol.writing_paused or transport.is_closing():
                return False  # queue it: the handler writes it once the client drains
            self._read(chunk)
            size = len(chunk)
            self._credit(size)
            if chunked:
                data = b"".join((b"%x\r\n" % size, chunk, b"\r\n"))
                transport.write(data)
                writer.output_size += len(data)
            else:
                transport.write(chunk)
                writer.output_size += size
            exchange.last_sunk = loop.time()
            return True

        exchange.sink = sink


def _cut_off(request: web.Request) -> None:
    """The request outlived REQUEST_TIMEOUT stuck on a client that reads nothing: drop it."""
    if request.transport is not None:
        log.warning("client_cut_off", path=request.path, reason="stopped reading")
        request.transport.abort()


def failure(event: Event) -> str:
    if isinstance(event, Ended) and event.error is not None:
        return f"worker error: {event.error.message}"
    if isinstance(event, Broken):
        return event.reason
    return "the worker sent an unexpected message"


async def _end_with_error(
    request: web.Request, response: web.StreamResponse, message: str, *, written: bool
) -> None:
    """End a response whose headers are already sent, in a way its client will notice.

    Streams get an error in their own framing (an SSE event, an NDJSON line) and a clean end;
    an error status with no body yet (a Go worker refusing while it drains) gets an error body,
    as the Go server answers it; other bodies are cut off, so no client mistakes half an answer
    for a whole one.
    """
    log.warning("relay_failed_midstream", reason=message)
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/event-stream"):
        error = {"error": {"message": message, "type": "server_error", "code": "worker_error"}}
        await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
        await response.write_eof()
    elif "ndjson" in content_type:
        await response.write(orjson.dumps({"error": message}) + b"\n")
        await response.write_eof()
    elif not written and response.status >= 400:
        body = error_response(flavor_for(request.path), response.status, message).body
        await response.write(cast(bytes, body))
        await response.write_eof()
    elif request.transport is not None:
        request.transport.abort()
