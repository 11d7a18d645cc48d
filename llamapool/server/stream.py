"""Relaying one response to its client, chunk by chunk, as the worker sends it.

Chunks are written as they arrive and never parsed or copied; the usage scanner only reads
them. With a flow-controlled worker, credit is given back as the client consumes the bytes,
so a slow client slows only its own worker job and the server holds at most a window per
request.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import attrs
import orjson
import structlog
from aiohttp import web

from llamapool.headers import RECOMPUTED, allowed_response_headers, forwardable
from llamapool.protocol import ResponseHeaders
from llamapool.server.affinity import ResponseIdScanner
from llamapool.server.exchange import Broken, Ended, Event, Exchange
from llamapool.server.http_errors import error_response, flavor_for
from llamapool.server.pool import Link
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

    def next_wait(self) -> float:
        return min(self.end, asyncio.get_running_loop().time() + self.idle)

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
    headers = allowed_response_headers(
        forwardable(check_headers(first.headers).items(), RECOMPUTED)
    )
    response = web.StreamResponse(status=first.status, headers=headers)
    scanner = UsageScanner() if usage else None
    consumed = 0
    written = False
    # A write waits while the client's socket is full: REQUEST_TIMEOUT must bound that too.
    stalled = asyncio.get_running_loop().call_at(deadlines.end + STALL_GRACE, _cut_off, request)
    try:
        await response.prepare(request)
        event: Event
        while True:
            try:
                event = await exchange.next(deadlines.next_wait())
            except TimeoutError:
                event = Broken(deadlines.why())
            if not isinstance(event, (bytes, memoryview)):
                break
            if scanner is not None:
                scanner.feed(event)
            if response_id is not None:
                response_id.feed(event)
            await response.write(event)  # waits while the client's socket is full
            written = True
            if window:
                consumed += len(event)
                if consumed >= window // 2:
                    await link.grant(exchange.request_id, consumed)
                    consumed = 0
        trace.usage = scanner.usage() if scanner is not None else None
        if isinstance(event, Ended) and event.error is None:
            await response.write_eof()
            trace.outcome = SUCCESS if first.status < 400 else ERROR
            if first.status >= 400:
                trace.error = f"backend answered HTTP {first.status}"
        else:
            trace.error = failure(event)
            await _end_with_error(request, response, trace.error, written=written)
    except ConnectionResetError:  # the client left; the caller cancels the worker's job
        trace.outcome = CANCELLED
        log.info("client_disconnected", path=request.path)
    finally:
        stalled.cancel()
    return response


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
