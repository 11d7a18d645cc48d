"""Cross-cutting request handling: request ids, client authentication, JSON errors."""

from __future__ import annotations

import re
import uuid

import structlog
from aiohttp import web

from llamapool.server.appkeys import CONFIG, STATE
from llamapool.server.http_errors import error_response, flavor_for
from llamapool.server.relay import REQUEST_ID, Handler
from llamapool.server.workers import key_matches

log = structlog.get_logger("llamapool.server")

_VALID_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")
#: Routes under these prefixes need ``Authorization: Bearer <API_KEY>`` (or ``x-api-key``)
#: when keys are set.
PROTECTED = ("/v1/", "/api/")
#: ... except these, open on Ollama itself, which clients probe before sending a key.
OPEN = frozenset({"/api/version"})


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Keep the client's ``X-Request-Id`` (or make one), log with it, and send it back."""
    given = request.headers.get(REQUEST_ID, "")
    request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response: web.StreamResponse = await handler(request)
    # A response returned unprepared is prepared after this middleware, outside the context.
    if not response.prepared and REQUEST_ID not in response.headers:
        response.headers[REQUEST_ID] = request_id
    return response


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or not, names its request."""
    bound = structlog.contextvars.get_contextvars().get("request_id")
    if bound and REQUEST_ID not in response.headers:
        response.headers[REQUEST_ID] = str(bound)


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
    except Exception:
        log.exception("request_failed", path=request.path)
        return error_response(
            flavor_for(request.path), 500, "internal error", code="internal_error"
        )


@web.middleware
async def client_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check the API key on the API routes; ``/healthz`` and the worker socket stay open."""
    cfg = request.app[CONFIG]
    keys = cfg.api_keys
    path = request.path
    protected = (
        (path.startswith(PROTECTED) and path not in OPEN)
        or path == "/rerank"  # the one model route outside /v1 (vLLM's spelling)
        or (cfg.metrics_require_key and path == "/metrics")
    )
    if keys and protected:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        if not key_matches(token.strip(), keys):
            request.app[STATE].rejected("unauthorized")
            return error_response(
                flavor_for(request.path),
                401,
                "missing or invalid API key (send Authorization: Bearer <API_KEY>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
    return await handler(request)  # type: ignore[no-any-return]


def _explain(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    if exc.status == 413:
        return f"request body is larger than the limit of {request.app[CONFIG].max_body_size} bytes"
    return exc.reason
