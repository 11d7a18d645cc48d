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
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from llamapool.errors import RoutingError
from llamapool.headers import CLIENT_ONLY, forwardable
from llamapool.protocol import ProxyRequest, ResponseHeaders, with_model
from llamapool.server.appkeys import CONFIG, POOL, SCHEDULER, STATE
from llamapool.server.exchange import Ended
from llamapool.server.http_errors import Flavor, error_response
from llamapool.server.multipart import FormError, form_fields
from llamapool.server.pool import Pool, WorkerHandle, fallback_names
from llamapool.server.routes import Body, ModelRoute
from llamapool.server.state import CANCELLED
from llamapool.server.stream import Deadlines, Trace, failure, stream_back

log = structlog.get_logger("llamapool.server")

REQUEST_ID = "X-Request-Id"

Handler = Any  # aiohttp handler: Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The client's body can not be routed; the message says why."""


#: Answers a model request the pool serves itself when no worker serves the path for it.
Fallback = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def parse_body(
    body: bytes, *, stream_default: bool, model_fields: tuple[str, ...] = ("model",)
) -> tuple[str, bool]:
    """The ``model`` and ``stream`` of a JSON request body."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = next((data[f] for f in model_fields if f in data), None)
    if not isinstance(model, str) or not model:
        raise BadRequest(f"{model_fields[0]!r} is required and must be a non-empty string")
    stream = data.get("stream", stream_default)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    return model, stream


def parse_form(body: bytes, content_type: str, *, stream_default: bool) -> tuple[str, bool]:
    """The ``model`` and ``stream`` fields of a ``multipart/form-data`` body."""
    try:
        fields = form_fields(body, content_type, _FORM_FIELDS)
    except FormError as exc:
        raise BadRequest(str(exc)) from None
    model = fields.get("model", "").strip()
    if not model:
        raise BadRequest("the form field 'model' is required and must not be empty")
    stream = fields.get("stream", "").strip().lower()
    if stream not in ("", "true", "false"):
        raise BadRequest("the form field 'stream' must be true or false")
    return model, stream_default if not stream else stream == "true"


_FORM_FIELDS = frozenset({"model", "stream"})


def model_handler(route: ModelRoute, *, otherwise: Fallback | None = None) -> Handler:
    """The handler of one row of the route table: find the model, then relay the request.

    With ``otherwise``, a model no worker serves at this path (though some serve it elsewhere)
    is answered by ``otherwise`` instead.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # the size limit is client_max_size
        try:
            if route.body is Body.MULTIPART:
                model, stream = parse_form(
                    body,
                    request.headers.get("Content-Type", ""),
                    stream_default=route.stream_default,
                )
            else:
                model, stream = parse_body(
                    body, stream_default=route.stream_default, model_fields=route.model_fields
                )
        except BadRequest as exc:
            return error_response(route.flavor, 400, str(exc), code="invalid_request")
        if otherwise is not None and not _served_at(request.app[POOL], model, request.path):
            return await otherwise(request, model)
        return await relay(
            request,
            flavor=route.flavor,
            body=body,
            model=model,
            stream=stream,
            rewritable=route.body is Body.JSON,
        )

    return handler


def _served_at(pool: Pool, model: str, path: str) -> bool:
    """Whether a worker that can take requests serves ``model`` (or an alias) at ``path``."""
    names = fallback_names(model)
    return any(
        w.routable and (w.paths is None or path in w.paths) and any(n in w.models for n in names)
        for w in pool
    )


class _Retry(Exception):
    """The worker failed before sending anything: the request may go to another worker."""


#: Requests in flight by the model name their worker serves (what ``/api/ps`` lists).
MODELS_IN_FLIGHT: web.AppKey[Counter[str]] = web.AppKey("models_in_flight")


async def relay(
    request: web.Request,
    *,
    flavor: Flavor,
    body: bytes,
    model: str,
    stream: bool,
    rewritable: bool = True,
) -> web.StreamResponse:
    """Serve one model request through the pool.

    ``rewritable`` says the body is JSON whose ``model`` may be replaced when the request is
    routed through an alias; a multipart body is relayed exactly as the client sent it.
    """
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
                rewritable=rewritable,
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
    rewritable: bool,
) -> web.StreamResponse:
    """One try on one worker, accounted for in the state, the metrics and one log line."""
    scheduler, state = request.app[SCHEDULER], request.app[STATE]
    served = next((n for n in fallback_names(model) if n in worker.models), model)
    override = ""
    if served != model and rewritable:  # an alias: ask the backend for the name it knows
        if worker.protocol:
            override = served  # the worker puts it into the body
        else:
            body = with_model(body, served)  # a Go worker would not: do it here
    started = time.monotonic()
    state.request_started(worker)
    in_flight = request.app.get(MODELS_IN_FLIGHT)
    if in_flight is not None:
        in_flight[served] += 1
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
        if in_flight is not None:
            in_flight[served] -= 1
            if in_flight[served] <= 0:
                del in_flight[served]
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
    exchange = link.open()
    wire_id = exchange.request_id
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
        # 1xx belong to one hop and a 3xx would redirect the client from the pool's origin.
        if isinstance(first, ResponseHeaders) and not (
            200 <= first.status <= 599 and not 300 <= first.status <= 399
        ):
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
