"""One client request, proxied through a worker and streamed back unchanged.

The body is parsed once, to find the model and whether the client asked for a stream; the
response is never parsed here: each chunk the worker sends is written to the client as it
arrives.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import attrs
import orjson
import structlog
from aiohttp import web

from llamapool.errors import RoutingError
from llamapool.headers import CLIENT_ONLY, RECOMPUTED, forwardable
from llamapool.protocol import ProxyRequest, ResponseHeaders
from llamapool.server.appkeys import CONFIG, POOL, STATE
from llamapool.server.exchange import Broken, Ended, Event, Exchange
from llamapool.server.http_errors import Flavor, error_response
from llamapool.server.pool import WorkerHandle, fallback_names
from llamapool.server.state import CANCELLED, ERROR, SUCCESS
from llamapool.server.usage import Usage, UsageScanner

log = structlog.get_logger("llamapool.server")

REQUEST_ID = "X-Request-Id"

Handler = Any  # aiohttp handler: Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The client's body can not be routed; the message says why."""


def parse_body(body: bytes, *, stream_default: bool) -> tuple[str, bool]:
    """The ``model`` and ``stream`` of a request body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string")
    stream = data.get("stream", stream_default)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    return model, stream


def proxy_route(flavor: Flavor, *, stream_default: bool) -> Handler:
    """A handler that relays a model request (OpenAI streams only when asked; Ollama unless
    told not to)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            model, stream = parse_body(body, stream_default=stream_default)
        except BadRequest as exc:
            return error_response(flavor, 400, str(exc), code="invalid_request")
        return await relay(request, flavor=flavor, body=body, model=model, stream=stream)

    return handler


@attrs.define
class _Trace:
    """What happened to one request: for its log line, the state API and the metrics."""

    status: int = 0
    outcome: str = ERROR
    error: str = ""
    first_byte: float | None = None
    usage: Usage | None = None


async def relay(
    request: web.Request, *, flavor: Flavor, body: bytes, model: str, stream: bool
) -> web.StreamResponse:
    """Send one request to the least-busy worker serving ``model`` and relay its answer."""
    app = request.app
    pool, state = app[POOL], app[STATE]
    started = time.monotonic()
    try:
        worker = pool.acquire(model, request.path)
    except RoutingError as exc:
        state.rejected(exc.reason)
        log.info("request_rejected", model=model, path=request.path, reason=exc.reason)
        return error_response(flavor, exc.status, str(exc), code=exc.code)

    served = next((n for n in fallback_names(model) if n in worker.models), model)
    state.request_started(worker)
    trace = _Trace()
    try:
        return await _exchange(
            request, worker, body=body, stream=stream, flavor=flavor, trace=trace
        )
    except asyncio.CancelledError:
        trace.outcome = CANCELLED
        raise
    finally:
        pool.release(worker)
        duration = time.monotonic() - started
        ttfb = trace.first_byte - started if trace.first_byte is not None else None
        state.request_finished(
            worker,
            served,
            outcome=trace.outcome,
            duration=duration,
            ttfb=ttfb,
            usage=trace.usage,
            error=trace.error,
        )
        log.info(
            "request_done",
            model=served,
            path=request.path,
            worker_id=worker.id,
            worker_name=worker.name,
            status=trace.status,
            outcome=trace.outcome,
            duration_ms=round(duration * 1000, 1),
            ttfb_ms=round(ttfb * 1000, 1) if ttfb is not None else None,
            tokens_in=trace.usage.tokens_in if trace.usage else None,
            tokens_out=trace.usage.tokens_out if trace.usage else None,
        )


async def _exchange(
    request: web.Request,
    worker: WorkerHandle,
    *,
    body: bytes,
    stream: bool,
    flavor: Flavor,
    trace: _Trace,
) -> web.StreamResponse:
    """One attempt on one worker: send the request, wait for its headers, stream it back."""
    link = worker.link
    wire_id = uuid.uuid4().hex
    exchange = link.open(wire_id)
    deadline = asyncio.get_running_loop().time() + request.app[CONFIG].request_timeout
    headers = forwardable(request.headers.items(), CLIENT_ONLY)
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        headers[REQUEST_ID] = str(request_id)
    outgoing = ProxyRequest(
        request_id=wire_id, method=request.method, path=request.path, headers=headers, stream=stream
    )
    try:
        try:
            await link.send_request(outgoing, body)
        except (ConnectionError, RuntimeError):
            return _error(trace, flavor, 502, "the worker disconnected", "worker_gone")
        try:
            first = await exchange.next(deadline)
        except TimeoutError:
            return _error(trace, flavor, 504, "the worker did not answer in time", "timeout")
        if not isinstance(first, ResponseHeaders):
            return _error(trace, flavor, 502, _failure(first), "worker_error")
        trace.status, trace.first_byte = first.status, time.monotonic()
        return await _stream_back(request, first, exchange, deadline, trace)
    finally:
        if not exchange.finished:
            await link.cancel(wire_id)
        link.forget(wire_id)


def _error(trace: _Trace, flavor: Flavor, status: int, message: str, code: str) -> web.Response:
    trace.status, trace.outcome, trace.error = status, ERROR, message
    return error_response(flavor, status, message, code=code)


async def _stream_back(
    request: web.Request,
    first: ResponseHeaders,
    exchange: Exchange,
    deadline: float,
    trace: _Trace,
) -> web.StreamResponse:
    """Send the worker's status and headers, then each chunk the moment it arrives.

    Chunks are written as they are; the usage scanner only reads them.
    """
    response = web.StreamResponse(
        status=first.status, headers=forwardable(first.headers.items(), RECOMPUTED)
    )
    scanner = UsageScanner()
    try:
        await response.prepare(request)
        event: Event
        while True:
            try:
                event = await exchange.next(deadline)
            except TimeoutError:
                event = Broken("the request took longer than REQUEST_TIMEOUT")
            if not isinstance(event, (bytes, memoryview)):
                break
            scanner.feed(event)
            await response.write(event)
        trace.usage = scanner.usage()
        if isinstance(event, Ended) and event.error is None:
            await response.write_eof()
            trace.outcome = SUCCESS if first.status < 400 else ERROR
            if first.status >= 400:
                trace.error = f"backend answered HTTP {first.status}"
        else:
            trace.error = _failure(event)
            await _end_with_error(request, response, trace.error)
    except ConnectionResetError:  # the client left; the caller cancels the worker's job
        trace.outcome = CANCELLED
        log.info("client_disconnected", path=request.path)
    return response


def _failure(event: Event) -> str:
    if isinstance(event, Ended) and event.error is not None:
        return f"worker error: {event.error.message}"
    if isinstance(event, Broken):
        return event.reason
    return "the worker sent an unexpected message"


async def _end_with_error(request: web.Request, response: web.StreamResponse, message: str) -> None:
    """End a response whose headers are already sent, in a way its client will notice.

    Streams get an error in their own framing (an SSE event, an NDJSON line) and a clean end;
    other bodies are cut off, so no client mistakes half an answer for a whole one.
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
    elif request.transport is not None:
        request.transport.abort()
