"""Cross-cutting request handling: request ids, the access log, JSON errors, client keys
and their limits."""

from __future__ import annotations

import itertools
import re
import secrets
import time

import structlog
from aiohttp import web

from llamapool.server.appkeys import CONFIG, KEYS, LOG_THROTTLE, STATE
from llamapool.server.http_errors import Flavor, error_response, flavor_for
from llamapool.server.keyfile import OPEN, Caller, ClientKey
from llamapool.server.keys import CALLER, USAGE, caller_of
from llamapool.server.limits import estimate_tokens, retry_after
from llamapool.server.relay import REQUEST_ID, REQUEST_ID_OF, Handler
from llamapool.server.routes import BY_PATH

log = structlog.get_logger("llamapool.server")

_VALID_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")
#: Request ids this process makes: 32 hex digits, a random half for the process and a count
#: (unique without a system call per request, unlike a UUID4).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNT = itertools.count(1)
#: Routes under these prefixes need ``Authorization: Bearer <API_KEY>`` (or ``x-api-key``)
#: when keys are set.
PROTECTED = ("/v1/", "/api/")
#: ... except these, open on Ollama itself, which clients probe before sending a key.
OPEN_PATHS = frozenset({"/api/version"})
#: A request may ask for a lower priority than its key's within the key's share.
PRIORITY = "X-Priority"


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Keep the client's ``X-Request-Id`` (or make one), log with it, and send it back."""
    given = request.headers.get(REQUEST_ID, "")
    request_id = given if _VALID_ID.match(given) else f"{_ID_PREFIX}{next(_ID_COUNT):016x}"
    request[REQUEST_ID_OF] = request_id
    # Each request runs in a task of its own (aiohttp), so what is bound here ends with it.
    structlog.contextvars.bind_contextvars(request_id=request_id)
    return await handler(request)  # type: ignore[no-any-return]


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or not, names its request (one
    returned unprepared too: it is prepared after the middlewares, and still has its id)."""
    request_id = request.get(REQUEST_ID_OF)
    if request_id and REQUEST_ID not in response.headers:
        response.headers[REQUEST_ID] = request_id


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON in its API's shape; an unexpected failure never shows a traceback."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(
            flavor_for(request.path), exc.status, _explain(request, exc), headers=headers
        )
    except web.RequestPayloadError:  # e.g. a body not in its declared Content-Encoding
        return error_response(
            flavor_for(request.path),
            400,
            "request body could not be decoded",
            code="invalid_request",
        )
    except Exception as exc:
        # A bug of ours, but one a client may trigger over and over: one traceback per kind
        # of failure and interval.
        request.app[LOG_THROTTLE].log(
            log.exception, "request_failed", reason=type(exc).__name__, path=request.path
        )
        return error_response(
            flavor_for(request.path), 500, "internal error", code="internal_error"
        )


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One ``http_request`` line per request: method, path (never the query, which may hold a
    key), status, duration, bytes sent, client address and key name (never the key)."""
    if not request.app[CONFIG].access_log:
        return await handler(request)  # type: ignore[no-any-return]
    started = time.monotonic()
    status, size = 499, 0  # unless an answer is returned: the client left (nginx's 499)
    try:
        response: web.StreamResponse = await handler(request)
        status, size = response.status, _size(response)
        return response
    except web.HTTPException as exc:  # a redirect, raised past json_errors
        status, size = exc.status, len(exc.text or "")
        raise
    finally:
        caller = caller_of(request)
        log.info(
            "http_request",
            method=request.method,
            path=request.path,
            status=status,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            bytes=size,
            remote=request.remote,
            client=caller.name if caller is not None else None,
        )


def _size(response: web.StreamResponse) -> int:
    """Body bytes sent, or about to be sent for an answer not yet prepared."""
    if response.prepared:
        return _body_sent(response)
    if isinstance(response, web.Response) and isinstance(response.body, (bytes, bytearray)):
        return len(response.body)
    return response.content_length or 0


@web.middleware
async def client_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check the API key on the API routes (``/healthz`` and the worker socket stay open),
    name the caller in the request and the logs, and hold model requests to its limits."""
    app = request.app
    cfg, keys = app[CONFIG], app[KEYS]
    path = request.path
    protected = (
        (path.startswith(PROTECTED) and path not in OPEN_PATHS)
        or path == "/rerank"  # the one model route outside /v1 (vLLM's spelling)
        or (cfg.metrics_require_key and path == "/metrics")
    )
    if not protected:
        return await handler(request)  # type: ignore[no-any-return]
    key = OPEN
    if keys.required:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        found = keys.authenticate(token.strip())
        if found is None or found.disabled or found.expired():
            app[STATE].rejected("unauthorized")
            if found is not None:  # the access log names it
                request[CALLER] = Caller(found, found.priority)
            return error_response(
                flavor_for(path),
                401,
                _refused(found),
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = found
    request[CALLER] = Caller(key, _priority(request, key))
    structlog.contextvars.bind_contextvars(client=key.name)  # for the request's own task
    route = BY_PATH.get(path) if request.method == "POST" else None
    if route is None:
        return await handler(request)  # type: ignore[no-any-return]
    return await _limited(request, handler, route.flavor)


def _refused(key: ClientKey | None) -> str:
    if key is None:
        return "missing or invalid API key (send Authorization: Bearer <API_KEY>)"
    return f"API key {key.name!r} is {'disabled' if key.disabled else 'expired'}"


def _priority(request: web.Request, key: ClientKey) -> int:
    """The key's priority, or the lower one its request asks for with ``X-Priority``."""
    asked = request.headers.get(PRIORITY, "").strip()
    try:
        return min(int(asked), key.priority) if asked else key.priority
    except ValueError:
        return key.priority


async def _limited(request: web.Request, handler: Handler, flavor: Flavor) -> web.StreamResponse:
    """A model request, counted against its key's limits and charged its tokens at the end."""
    keys, caller = request.app[KEYS], request[CALLER]
    usage, refusal = keys.admit(caller.key)
    if refusal is not None:
        request.app[STATE].rejected("key_limit")
        log.info("request_limited", limit=refusal.limit, path=request.path)
        return error_response(
            flavor,
            429,
            refusal.message,
            code=refusal.code,
            headers={"Retry-After": retry_after(refusal.retry_after)},
        )
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        keys.finished(usage, *_tokens(request, response))


def _tokens(request: web.Request, response: web.StreamResponse | None) -> tuple[int, int]:
    """Tokens to charge: those the response reported, or an estimate from the bytes when it
    reported none; nothing when no worker took the request."""
    if USAGE not in request:
        return 0, 0
    usage = request[USAGE]
    if usage is not None:
        return usage.tokens_in, usage.tokens_out
    sent = _body_sent(response) if response is not None and response.prepared else 0
    return estimate_tokens(request.content_length or 0), estimate_tokens(sent)


def _body_sent(response: web.StreamResponse) -> int:
    """Bytes of a prepared response's body: what went out less the status line and headers
    (a chunked body's framing, a few bytes a chunk, stays in)."""
    headers = response.headers
    head = len(f"HTTP/1.1 {response.status} {response.reason}\r\n\r\n") + 4 * len(headers)
    head += sum(map(len, headers.keys())) + sum(map(len, headers.values()))
    return max(0, response.body_length - head)


async def rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: OpenAI's ``x-ratelimit-*`` headers on every answer to a key
    with request or token limits (the pool's count wins over a backend's own)."""
    caller = caller_of(request)
    if caller is not None and (caller.key.rpm or caller.key.tpm):
        response.headers.update(request.app[KEYS].usage_of(caller.key).headers())


def _explain(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    if exc.status == 413:
        return f"request body is larger than the limit of {request.app[CONFIG].max_body_size} bytes"
    return exc.reason
