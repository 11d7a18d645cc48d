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

import orjson
import structlog
from aiohttp import web

from llamapool.errors import RoutingError
from llamapool.headers import CLIENT_ONLY, RECOMPUTED, forwardable
from llamapool.protocol import ProxyRequest, ResponseHeaders
from llamapool.server.appkeys import CONFIG, POOL
from llamapool.server.exchange import Broken, Ended, Event, Exchange
from llamapool.server.http_errors import Flavor, error_response

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


async def relay(
    request: web.Request, *, flavor: Flavor, body: bytes, model: str, stream: bool
) -> web.StreamResponse:
    pool, cfg = request.app[POOL], request.app[CONFIG]
    path = request.path
    started = time.monotonic()
    try:
        worker = pool.acquire(model, path)
    except RoutingError as exc:
        log.info("request_rejected", model=model, path=path, reason=exc.code)
        return error_response(flavor, exc.status, str(exc), code=exc.code)

    link = worker.link
    wire_id = uuid.uuid4().hex
    exchange = link.open(wire_id)
    deadline = asyncio.get_running_loop().time() + cfg.request_timeout
    headers = forwardable(request.headers.items(), CLIENT_ONLY)
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        headers[REQUEST_ID] = str(request_id)
    outgoing = ProxyRequest(
        request_id=wire_id, method=request.method, path=path, headers=headers, stream=stream
    )
    status, first_byte = 0, 0.0
    try:
        try:
            await link.send_request(outgoing, body)
        except (ConnectionError, RuntimeError):
            status = 502
            return error_response(flavor, 502, "the worker disconnected", code="worker_gone")
        try:
            first = await exchange.next(deadline)
        except TimeoutError:
            status = 504
            return error_response(flavor, 504, "the worker did not answer in time", code="timeout")
        if not isinstance(first, ResponseHeaders):
            status = 502
            return error_response(flavor, 502, _failure(first), code="worker_error")
        status, first_byte = first.status, time.monotonic()
        return await _stream_back(request, first, exchange, deadline)
    finally:
        if not exchange.finished:
            await link.cancel(wire_id)
        link.forget(wire_id)
        pool.release(worker)
        log.info(
            "request_done",
            model=model,
            path=path,
            worker_id=worker.id,
            status=status,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            ttfb_ms=round((first_byte - started) * 1000, 1) if first_byte else None,
        )


async def _stream_back(
    request: web.Request, first: ResponseHeaders, exchange: Exchange, deadline: float
) -> web.StreamResponse:
    """Send the worker's status and headers, then each chunk the moment it arrives."""
    response = web.StreamResponse(
        status=first.status, headers=forwardable(first.headers.items(), RECOMPUTED)
    )
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
            await response.write(event)
        if isinstance(event, Ended) and event.error is None:
            await response.write_eof()
        else:
            await _end_with_error(request, response, _failure(event))
    except ConnectionResetError:  # the client left; the caller cancels the worker's job
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
