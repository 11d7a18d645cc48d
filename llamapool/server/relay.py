"""One client request, proxied through a worker and streamed back unchanged.

The body is parsed once, to find the model and whether the client asked for a stream. The
request goes to the least-busy worker serving the model, waiting in line when all are busy.
If that worker fails before sending anything back (it disconnected, or could not reach its
backend), the request is tried again on another worker, a bounded number of times: the
client never sees the failure. Once bytes have reached the client, a failure ends the
response instead (see :mod:`llamapool.server.stream`).
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
from llamapool.headers import CLIENT_ONLY, forwardable
from llamapool.protocol import ProxyRequest, ResponseHeaders, with_model
from llamapool.server.appkeys import CONFIG, SCHEDULER, STATE
from llamapool.server.exchange import Ended
from llamapool.server.http_errors import Flavor, error_response
from llamapool.server.pool import WorkerHandle, fallback_names
from llamapool.server.state import CANCELLED
from llamapool.server.stream import Deadlines, Trace, failure, stream_back

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


class _Retry(Exception):
    """The worker failed before sending anything: the request may go to another worker."""


async def relay(
    request: web.Request, *, flavor: Flavor, body: bytes, model: str, stream: bool
) -> web.StreamResponse:
    """Serve one model request through the pool."""
    app = request.app
    cfg, scheduler, state = app[CONFIG], app[SCHEDULER], app[STATE]
    now = asyncio.get_running_loop().time()
    deadlines = Deadlines(end=now + cfg.request_timeout, idle=cfg.idle_timeout)
    reason = ""
    tried: list[WorkerHandle] = []
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            worker = await scheduler.acquire(model, request.path, exclude=tried)
        except RoutingError as exc:
            if attempt > 1:  # the workers that had it are gone: say what happened to them
                break
            state.rejected(exc.reason)
            log.info("request_rejected", model=model, path=request.path, reason=exc.reason)
            headers = {"Retry-After": "1"} if exc.status == 429 else None
            return error_response(flavor, exc.status, str(exc), code=exc.code, headers=headers)
        try:
            return await _attempt(
                request,
                worker,
                model=model,
                body=body,
                stream=stream,
                flavor=flavor,
                deadlines=deadlines,
                attempt=attempt,
            )
        except _Retry as exc:
            reason = str(exc)
            tried.append(worker)
    return error_response(
        flavor, 502, f"no worker could serve the request: {reason}", code="worker_error"
    )


async def _attempt(
    request: web.Request,
    worker: WorkerHandle,
    *,
    model: str,
    body: bytes,
    stream: bool,
    flavor: Flavor,
    deadlines: Deadlines,
    attempt: int,
) -> web.StreamResponse:
    """One try on one worker, accounted for in the state, the metrics and one log line."""
    scheduler, state = request.app[SCHEDULER], request.app[STATE]
    served = next((n for n in fallback_names(model) if n in worker.models), model)
    override = ""
    if served != model:  # an alias: the backend must be asked for the name it knows
        if worker.protocol:
            override = served  # the worker puts it into the body
        else:
            body = with_model(body, served)  # a Go worker would not: do it here
    started = time.monotonic()
    state.request_started(worker)
    trace = Trace()
    try:
        return await _exchange(
            request,
            worker,
            body=body,
            stream=stream,
            model=override,
            flavor=flavor,
            deadlines=deadlines,
            trace=trace,
        )
    except asyncio.CancelledError:
        trace.outcome = CANCELLED
        raise
    finally:
        scheduler.release(worker)
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
            attempt=attempt,
            status=trace.status,
            outcome=trace.outcome,
            error=trace.error or None,
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
    model: str,
    flavor: Flavor,
    deadlines: Deadlines,
    trace: Trace,
) -> web.StreamResponse:
    """Send the request, wait for the response headers, then stream the response back."""
    link = worker.link
    wire_id = uuid.uuid4().hex
    exchange = link.open(wire_id)
    headers = forwardable(request.headers.items(), CLIENT_ONLY)
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        headers[REQUEST_ID] = str(request_id)
    outgoing = ProxyRequest(
        request_id=wire_id,
        method=request.method,
        path=request.path,
        headers=headers,
        stream=stream,
        model=model,
    )
    try:
        try:
            await link.send_request(outgoing, body)
        except (ConnectionError, RuntimeError):
            trace.error = "the worker disconnected"
            raise _Retry(trace.error) from None
        try:
            # No idle limit before the headers: a runtime may answer a non-streamed request
            # only once it is done generating.
            first = await exchange.next(deadlines.end)
        except TimeoutError:
            trace.status, trace.error = 504, "the worker did not answer in time"
            return error_response(flavor, 504, trace.error, code="timeout")
        if isinstance(first, ResponseHeaders) and not 200 <= first.status <= 599:
            trace.status, trace.error = 502, f"the worker sent an invalid status {first.status}"
            return error_response(flavor, 502, trace.error, code="worker_error")
        if not isinstance(first, ResponseHeaders):
            trace.error = failure(first)
            if isinstance(first, Ended) and first.error is None:
                trace.status = 502
                return error_response(flavor, 502, trace.error, code="worker_error")
            raise _Retry(trace.error)
        return await stream_back(
            request,
            first,
            exchange,
            link,
            window=link.window,
            deadlines=deadlines,
            trace=trace,
        )
    finally:
        if not exchange.worker_ended:
            await link.cancel(wire_id)
        link.forget(wire_id)
