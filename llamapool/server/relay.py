"""One client request, proxied through a worker and streamed back unchanged.

The body is parsed once, to find the model and whether the client asked for a stream. The
request goes to the least-busy worker serving the model, waiting in line when all are busy.
If that worker fails before sending anything back (it disconnected, or could not reach its
backend), the request is tried again on another worker, a bounded number of times: the
client never sees the failure. Once bytes have reached the client, a failure ends the
response instead (see :mod:`llamapool.server.stream`).

A Responses API request that follows up a stored response (``previous_response_id``) is pinned
to the worker that produced it (see :mod:`llamapool.server.affinity`): it is never queued for,
nor retried on, another worker.

:func:`ask_worker` is the pool's own request to one given worker, for an answer it builds from
its workers' (``/api/ps``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
import structlog
from aiohttp import web

from llamapool.errors import RoutingError, WorkersBusyError
from llamapool.headers import CLIENT_ONLY, forwardable
from llamapool.protocol import ProxyRequest, ResponseHeaders, with_model
from llamapool.server.affinity import RESPONSES_PATH, Holder, ResponseAffinity, ResponseIdScanner
from llamapool.server.appkeys import CONFIG, POOL, SCHEDULER, STATE
from llamapool.server.exchange import Busy, Ended, Exchange
from llamapool.server.http_errors import Flavor, error_response, flavor_for
from llamapool.server.keys import caller_of, record_usage
from llamapool.server.multipart import FormError, form_fields
from llamapool.server.pool import Pool, WorkerHandle, fallback_names
from llamapool.server.queue_events import QUEUED, SSE_FLAVORS, QueueReporter
from llamapool.server.routes import BY_PATH, Body, ModelRoute
from llamapool.server.state import CANCELLED, ERROR
from llamapool.server.stream import Deadlines, Trace, failure, stream_back
from llamapool.server.validate import MAX_MODEL

log = structlog.get_logger("llamapool.server")

REQUEST_ID = "X-Request-Id"
#: The request's id (the client's ``X-Request-Id``, or one the server made), as the
#: request_ids middleware chose it: what the worker and the response carry.
REQUEST_ID_OF = web.RequestKey("llamapool_request_id", str)

Handler = Any  # aiohttp handler: Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The client's body can not be routed; the message says why."""


#: Answers a model request the pool serves itself when no worker serves the path for it.
Fallback = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def parse_body(
    body: bytes, *, stream_default: bool, model_fields: tuple[str, ...] = ("model",)
) -> tuple[str, bool, dict[str, Any]]:
    """The ``model`` and ``stream`` of a JSON request body, and the body decoded."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = next((data[f] for f in model_fields if f in data), None)
    if not isinstance(model, str) or not model:
        raise BadRequest(f"{model_fields[0]!r} is required and must be a non-empty string")
    _check_length(model, model_fields[0])
    stream = data.get("stream")
    if stream is None:  # absent, or null: OpenAI's schema and Ollama take null as the default
        stream = stream_default
    elif not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    return model, stream, data


def _check_length(model: str, field: str) -> None:
    """No worker may serve a longer name (``validate.MAX_MODEL``), and a client's name goes
    into log lines and error messages: refused, not looked up."""
    if len(model) > MAX_MODEL:
        raise BadRequest(f"{field!r} must be at most {MAX_MODEL} characters")


def parse_form(body: bytes, content_type: str, *, stream_default: bool) -> tuple[str, bool]:
    """The ``model`` and ``stream`` fields of a ``multipart/form-data`` body."""
    try:
        fields = form_fields(body, content_type, _FORM_FIELDS)
    except FormError as exc:
        raise BadRequest(str(exc)) from None
    model = fields.get("model", "").strip()
    if not model:
        raise BadRequest("the form field 'model' is required and must not be empty")
    _check_length(model, "model")
    stream = fields.get("stream", "").strip().lower()
    if stream not in ("", "true", "false"):
        raise BadRequest("the form field 'stream' must be true or false")
    return model, stream_default if not stream else stream == "true"


_FORM_FIELDS = frozenset({"model", "stream"})

#: Answers that report a count, not tokens consumed: no usage is accounted for them.
_NO_USAGE = frozenset({"/v1/messages/count_tokens"})

#: Which worker holds each stored Responses API response (see ``affinity``).
AFFINITY = web.AppKey("response_affinity", ResponseAffinity)


@attrs.frozen
class Pin:
    """A request only one worker can serve: the one holding ``response_id``."""

    worker: WorkerHandle
    response_id: str
    #: The model the response was made with.
    model: str
    #: The API path the worker must serve.
    path: str = RESPONSES_PATH


def previous_response_id(data: dict[str, Any]) -> str:
    """The ``previous_response_id`` of a Responses API request body ("" when none)."""
    previous = data.get("previous_response_id")
    if previous is None:
        return ""
    if not isinstance(previous, str) or not previous:
        raise BadRequest("'previous_response_id' must be a non-empty string")
    return previous


def model_handler(route: ModelRoute, *, otherwise: Fallback | None = None) -> Handler:
    """The handler of one row of the route table: find the model, then relay the request.

    With ``otherwise``, a model no worker serves at this path (though some serve it elsewhere)
    is answered by ``otherwise`` instead.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()  # the size limit is client_max_size
        previous = ""
        try:
            if route.body is Body.MULTIPART:
                model, stream = parse_form(
                    body,
                    request.headers.get("Content-Type", ""),
                    stream_default=route.stream_default,
                )
            else:
                model, stream, data = parse_body(
                    body, stream_default=route.stream_default, model_fields=route.model_fields
                )
                if route.path == RESPONSES_PATH:
                    previous = previous_response_id(data)
        except BadRequest as exc:
            return error_response(route.flavor, 400, str(exc), code="invalid_request")
        if otherwise is not None and not _served_at(request.app[POOL], model, request.path):
            return await otherwise(request, model)
        pin: Pin | None = None
        if previous:
            found = await find_pin(request.app, previous, model=model)
            if isinstance(found, web.Response):
                return found
            pin = found
        return await relay(
            request,
            flavor=route.flavor,
            body=body,
            model=model,
            stream=stream,
            rewritable=route.body is Body.JSON,
            pin=pin,
            usage=route.path not in _NO_USAGE,
            remember=route.path == RESPONSES_PATH,
        )

    return handler


def pin_for(
    app: web.Application, response_id: str, *, model: str | None = None
) -> Pin | web.Response | None:
    """The worker holding a stored response, an OpenAI-shaped 404 when it left the pool (or
    does not serve ``model``), or ``None`` when the pool never saw (or forgot) the id."""
    affinity = app.get(AFFINITY)
    holder = affinity.holder(response_id) if affinity is not None else None
    if holder is None:
        return None
    worker = app[POOL].get(holder.worker_id)
    if worker is None:
        why = f"the worker that stored it ({holder.worker_id}) has left the pool"
    elif model is not None and not any(n in worker.models for n in fallback_names(model)):
        why = f"the worker that stored it does not serve model {model!r}"
    else:
        return Pin(worker, response_id, holder.model)
    log.info("response_pin_failed", response_id=response_id, worker_id=holder.worker_id)
    return not_found(response_id, why, previous=model is not None)


async def find_pin(
    app: web.Application, response_id: str, *, model: str | None = None
) -> Pin | web.Response | None:
    """:func:`pin_for`, asking the cluster when this server never saw the id (a follow-up
    may reach any server of a cluster)."""
    found = pin_for(app, response_id, model=model)
    affinity = app.get(AFFINITY)
    if found is not None or affinity is None or affinity.lookup is None:
        return found
    holder = await affinity.lookup(response_id)
    if holder is None:
        return None
    affinity.remember(response_id, holder, share=False)
    return pin_for(app, response_id, model=model)


def not_found(response_id: str, why: str, *, previous: bool) -> web.Response:
    """OpenAI's 404 for a response id; ``previous``: named in ``previous_response_id``."""
    if previous:
        message = f"Previous response with id {response_id!r} not found: {why}."
        param, code = "previous_response_id", "previous_response_not_found"
    else:
        message = f"Response with id {response_id!r} not found: {why}."
        param, code = None, "response_not_found"
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return web.Response(
        status=404, body=orjson.dumps({"error": error}), content_type="application/json"
    )


def _served_at(pool: Pool, model: str, path: str) -> bool:
    """Whether a worker that can take requests serves ``model`` (or an alias) at ``path``."""
    names = fallback_names(model)
    return any(
        w.routable and (w.paths is None or path in w.paths) and any(n in w.models for n in names)
        for w in pool
    )


class _Retry(Exception):
    """The worker failed before sending anything: the request may go to another worker."""


class _Busy(_Retry):
    """The worker turned out to be full (another server of the cluster holds it and said so):
    the request waits for a worker again, without counting an attempt."""


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
    pin: Pin | None = None,
    usage: bool = True,
    remember: bool = False,
    path: str = "",
) -> web.StreamResponse:
    """Serve one model request through the pool.

    ``rewritable`` says the body is JSON whose ``model`` may be replaced when the request is
    routed through an alias; a multipart body is relayed exactly as the client sent it.
    With ``pin``, only that worker may serve the request: it is not queued for when busy (503)
    nor retried elsewhere. ``usage=False`` accounts no tokens; ``remember`` records which worker
    produced a Responses API answer. ``path`` is the path the worker gets (default: the
    request's path).
    """
    cfg = request.app[CONFIG]
    shows_queue = cfg.queue_position_events and stream and pin is None
    reporter = QueueReporter(request, flavor) if shows_queue and flavor in SSE_FLAVORS else None
    response = await _relay(
        request,
        flavor=flavor,
        body=body,
        model=model,
        stream=stream,
        rewritable=rewritable,
        pin=pin,
        usage=usage,
        remember=remember,
        path=path,
        reporter=reporter,
    )
    return response if reporter is None else await reporter.answer(response)


async def _relay(
    request: web.Request,
    *,
    flavor: Flavor,
    body: bytes,
    model: str,
    stream: bool,
    rewritable: bool,
    pin: Pin | None,
    usage: bool,
    remember: bool,
    path: str,
    reporter: QueueReporter | None,
) -> web.StreamResponse:
    app = request.app
    cfg, scheduler, state = app[CONFIG], app[SCHEDULER], app[STATE]
    now = asyncio.get_running_loop().time()
    deadlines = Deadlines(end=now + cfg.request_timeout, idle=cfg.idle_timeout)
    reason = ""
    tried: list[WorkerHandle] = []
    attempt = 0
    while attempt < (1 if pin else cfg.max_attempts):
        attempt += 1
        try:
            if pin is not None:
                worker = app[POOL].acquire_worker(pin.worker, pin.path)
            else:
                try:
                    worker = await scheduler.acquire(
                        model,
                        request.path,
                        exclude=tried,
                        key=caller_of(request),
                        on_wait=reporter,
                    )
                finally:
                    if reporter is not None:
                        await reporter.stop()
        except RoutingError as exc:
            if attempt > 1:  # the workers that had it are gone: say what happened to them
                break
            state.rejected(exc.reason)
            log.info("request_rejected", model=model, path=request.path, reason=exc.reason)
            if pin is not None and exc.status == 404:
                return not_found(pin.response_id, str(exc), previous=request.path == RESPONSES_PATH)
            busy = exc.status == 429 or (pin is not None and exc.status == 503)
            headers = {"Retry-After": "1"} if busy else None
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
                usage=usage,
                remember=remember,
                path=path or request.path,
            )
        except _Busy as exc:
            reason = str(exc)
            if asyncio.get_running_loop().time() >= deadlines.end:
                break
            attempt -= 1  # it never started: wait for a worker again, here
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
    usage: bool,
    remember: bool,
    path: str,
    forwarded: bool = False,
) -> web.StreamResponse:
    """One try on one worker, accounted for in the state, the metrics and one log line.

    ``forwarded``: another server of the cluster sent the request for this server's worker;
    that server counts it in its client-facing totals, this one in the worker's.
    """
    scheduler, state = request.app[SCHEDULER], request.app[STATE]
    served = next((n for n in fallback_names(model) if n in worker.models), model)
    override = ""
    if worker.server:  # the worker's own server resolves the alias, as it would for a client
        override = model
    elif served != model and rewritable:  # an alias: ask the backend for the name it knows
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
    ids = ResponseIdScanner() if remember else None
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
            usage=usage,
            ids=ids,
            path=path,
        )
    except asyncio.CancelledError:
        trace.outcome = CANCELLED
        raise
    finally:
        scheduler.release(worker)
        if usage:  # the key's tokens: reported, or estimated from the bytes (keys.py)
            record_usage(request, trace.usage)
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
            forwarded=forwarded,
        )
        affinity = request.app.get(AFFINITY)
        if ids is not None and ids.response_id and affinity is not None and trace.status < 400:
            affinity.remember(ids.response_id, Holder(worker.id, served))
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
    usage: bool,
    ids: ResponseIdScanner | None,
    path: str,
) -> web.StreamResponse:
    """Send the request, wait for the response headers, then stream the response back."""
    link = worker.link
    exchange = link.open()
    wire_id = exchange.request_id
    headers = forwardable(request.headers.items(), CLIENT_ONLY)
    request_id = request.get(REQUEST_ID_OF)
    if request_id:
        headers[REQUEST_ID] = request_id
    outgoing = ProxyRequest(
        request_id=wire_id,
        method=request.method,
        path=path,
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
        if isinstance(first, Busy):
            trace.error = failure(first)
            raise _Busy(trace.error)
        if not isinstance(first, ResponseHeaders):
            trace.error = failure(first)
            if isinstance(first, Ended) and first.error is None:
                trace.status = 502
                return error_response(flavor, 502, trace.error, code="worker_error")
            raise _Retry(trace.error)
        if first.status >= 400 and QUEUED in request:  # the stream's 200 is sent already
            trace.status, trace.outcome = first.status, ERROR
            trace.error = f"backend answered HTTP {first.status}"
            return web.Response(status=first.status, body=await _error_body(exchange, deadlines))
        return await stream_back(
            request,
            first,
            exchange,
            link,
            window=link.window,
            deadlines=deadlines,
            trace=trace,
            usage=usage,
            response_id=ids,
        )
    finally:
        if not exchange.worker_ended:
            await link.cancel(wire_id)
        link.forget(wire_id)


async def _error_body(exchange: Exchange, deadlines: Deadlines, limit: int = 64 * 1024) -> bytes:
    """A backend's error body, whole (bounded), to be sent as one event of a stream."""
    body = bytearray()
    with contextlib.suppress(TimeoutError):
        while len(body) < limit:
            event = await exchange.next(deadlines.next_wait(asyncio.get_running_loop().time()))
            if not isinstance(event, (bytes, memoryview)):
                break
            body += event
    return bytes(body[:limit]).strip() or b"{}"


class AskFailed(Exception):
    """A worker could not answer a request the pool made of it; the message says why."""


async def ask_worker(
    app: web.Application, worker: WorkerHandle, path: str, *, deadline: float, limit: int
) -> bytes:
    """``GET path`` on one given worker, for an answer the pool builds from its workers' own
    (``/api/ps``): the whole body of a 2xx answer, or :class:`AskFailed`.

    The request takes a slot on the worker, as a client's does, but is never queued nor
    retried: a worker that is full, draining, or does not serve ``path`` is not asked. It
    fails once the loop's clock passes ``deadline`` or the body passes ``limit`` bytes, which
    is held to the link's flow window: the first credit suffices, none is ever granted.
    """
    if worker.link.window:
        limit = min(limit, worker.link.window)
    try:
        app[POOL].acquire_worker(worker, path)
    except RoutingError as exc:
        raise AskFailed(str(exc)) from None
    link = worker.link
    exchange = link.open()
    wire_id = exchange.request_id
    headers = {"Accept": "application/json"}
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id:
        headers[REQUEST_ID] = str(request_id)
    try:
        try:
            await link.send_request(
                ProxyRequest(request_id=wire_id, method="GET", path=path, headers=headers), b""
            )
        except (ConnectionError, RuntimeError):
            raise AskFailed("the worker disconnected") from None
        status, body = 0, bytearray()
        while True:
            try:
                event = await exchange.next(deadline)
            except TimeoutError:
                raise AskFailed("the worker did not answer in time") from None
            if isinstance(event, ResponseHeaders):
                status = event.status
            elif isinstance(event, (bytes, memoryview)):
                body += event
                if len(body) > limit:
                    raise AskFailed(f"the answer is larger than {limit} bytes")
                if link.window:
                    link.grant_soon(wire_id, len(event))
            elif isinstance(event, Ended) and event.error is None:
                break
            else:
                raise AskFailed(failure(event))
        if not 200 <= status <= 299:
            raise AskFailed(f"the backend answered HTTP {status}")
        return bytes(body)
    finally:
        if not exchange.worker_ended:
            await link.cancel(wire_id)
        link.forget(wire_id)
        app[SCHEDULER].release(worker)


class NotStarted(Exception):
    """A request another server sent could not start on the worker; ``busy`` when only
    because the worker is full."""

    def __init__(self, reason: str, *, busy: bool) -> None:
        super().__init__(reason)
        self.busy = busy


async def relay_forwarded(
    request: web.Request, worker: WorkerHandle, *, path: str, model: str, stream: bool
) -> web.StreamResponse:
    """Serve a request another server of the cluster sent for one of this server's workers:
    on that worker only, and now or never (:class:`NotStarted`): the sending server queues
    and retries, since it holds the client. ``path`` is the public path with its query; a
    request that names no ``model`` is one the pool makes of a worker (``/api/ps``, a stored
    response), relayed as the local one would be.
    """
    app = request.app
    route_path = path.partition("?")[0]
    route = BY_PATH.get(route_path)
    try:
        app[POOL].acquire_worker(worker, route_path if route is not None else None)
    except RoutingError as exc:
        raise NotStarted(str(exc), busy=isinstance(exc, WorkersBusyError)) from None
    cfg = app[CONFIG]
    now = asyncio.get_running_loop().time()
    deadlines = Deadlines(end=now + cfg.request_timeout, idle=cfg.idle_timeout)
    flavor = route.flavor if route is not None else flavor_for(route_path)
    try:
        body = await request.read()
        if not model:
            try:
                return await _exchange(
                    request,
                    worker,
                    body=body,
                    stream=stream,
                    model="",
                    flavor=flavor,
                    deadlines=deadlines,
                    trace=Trace(),
                    usage=False,
                    ids=None,
                    path=path,
                )
            finally:
                app[SCHEDULER].release(worker)
        return await _attempt(
            request,
            worker,
            model=model,
            body=body,
            stream=stream,
            flavor=flavor,
            deadlines=deadlines,
            attempt=1,
            rewritable=route is not None and route.body is Body.JSON,
            usage=route is None or route.path not in _NO_USAGE,
            remember=False,
            path=path,
            forwarded=True,
        )
    except _Retry as exc:
        raise NotStarted(str(exc), busy=isinstance(exc, _Busy)) from None
