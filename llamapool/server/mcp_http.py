"""``/api/mcp/id/{id}``: MCP's Streamable HTTP transport in front of a relayed MCP server.

``POST`` carries the client's JSON-RPC messages; requests are answered as ``application/json``
when the MCP server's response is the first thing that comes back, otherwise as an SSE stream
(progress, server requests, then the response). ``GET`` opens the session's server-to-client
stream, ``DELETE`` ends the session. The pool's API key is checked by the middleware; an
endpoint whose relay was given ``--token`` also needs ``X-MCP-Token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from typing import Any

import orjson
from aiohttp import web

from llamapool.server.appkeys import MCP
from llamapool.server.mcp_sessions import (
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    McpBusyError,
    McpEndpoint,
    McpEndpoints,
    McpSession,
    Stream,
    rpc_error,
)

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
TOKEN_HEADER = "X-MCP-Token"
#: Versions of the handshake era (the relay keeps a session per client session).
PROTOCOL_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
#: A comment on an idle SSE stream this often keeps proxies from closing it.
KEEPALIVE = 15.0


def _error(status: int, code: int, message: str, request_id: Any = None) -> web.Response:
    return web.Response(
        status=status, body=rpc_error(request_id, code, message), content_type="application/json"
    )


def _endpoint(request: web.Request) -> tuple[McpEndpoints, McpEndpoint | web.Response]:
    endpoints = request.app[MCP]
    endpoint_id = request.match_info["id"]
    endpoint = endpoints.endpoints.get(endpoint_id)
    if endpoint is None:
        return endpoints, _error(404, SERVER_ERROR, f"no MCP endpoint {endpoint_id!r} is connected")
    if endpoint.token_sha256:
        given = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(given).hexdigest()
        if not hmac.compare_digest(digest, endpoint.token_sha256):
            return endpoints, _error(
                401, SERVER_ERROR, f"this MCP endpoint needs its token in {TOKEN_HEADER}"
            )
    return endpoints, endpoint


def _session(
    request: web.Request, endpoints: McpEndpoints, endpoint: McpEndpoint
) -> McpSession | web.Response:
    session_id = request.headers.get(SESSION_HEADER)
    if not session_id:
        return _error(400, INVALID_REQUEST, f"Bad Request: no {SESSION_HEADER} header")
    session = endpoints.session(session_id, endpoint.id)
    if session is None:
        return _error(404, SERVER_ERROR, "session not found: initialize a new one")
    version = request.headers.get(VERSION_HEADER)
    if version is not None and (
        version not in PROTOCOL_VERSIONS
        or (session.protocol_version and version != session.protocol_version)
    ):
        return _error(400, INVALID_REQUEST, f"Bad Request: unsupported {VERSION_HEADER} {version}")
    return session


async def post(request: web.Request) -> web.StreamResponse:
    """``POST /api/mcp/id/{id}``: JSON-RPC messages from the client."""
    endpoints, endpoint = _endpoint(request)
    if isinstance(endpoint, web.Response):
        return endpoint
    limit = endpoints.limits.max_message_bytes
    if (request.content_length or 0) > limit:
        return _error(413, INVALID_REQUEST, f"message larger than {limit} bytes")
    body = await request.read()
    if len(body) > limit:
        return _error(413, INVALID_REQUEST, f"message larger than {limit} bytes")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _error(400, PARSE_ERROR, "Parse error: the body is not JSON")
    batch = isinstance(parsed, list)
    messages: list[Any] = parsed if batch else [parsed]
    if not messages or not all(isinstance(m, dict) and m.get("jsonrpc") == "2.0" for m in messages):
        return _error(400, INVALID_REQUEST, "Invalid Request: expected JSON-RPC 2.0 messages")
    requests = [m for m in messages if "method" in m and "id" in m]
    initialize = [m for m in requests if m["method"] == "initialize"]
    if initialize:
        if batch or SESSION_HEADER in request.headers:
            return _error(400, INVALID_REQUEST, "initialize must be sent alone, without a session")
        try:
            session: McpSession | web.Response = endpoints.open_session(endpoint)
        except McpBusyError as exc:
            return _error(503, SERVER_ERROR, str(exc), initialize[0]["id"])
    else:
        session = _session(request, endpoints, endpoint)
    if isinstance(session, web.Response):
        return session
    stream = Stream(waiting=len(requests))
    for message in requests:
        problem = endpoints.start_call(session, message, stream)
        if problem:  # nothing of this POST is sent then
            for accepted in requests[: requests.index(message)]:
                endpoints.client_cancelled(session, accepted["id"])
            return _error(
                429 if "too many" in problem else 400, SERVER_ERROR, problem, message["id"]
            )
    endpoints.forward(session, body.decode())
    for message in messages:
        if message.get("method") == "notifications/cancelled":
            params = message.get("params")
            if isinstance(params, dict) and "requestId" in params:
                endpoints.client_cancelled(session, params["requestId"])
    if not requests:
        return web.Response(status=202)
    headers = {SESSION_HEADER: session.id} if initialize else {}
    try:
        first = await stream.queue.get()
        if initialize and (first is None or "error" in orjson.loads(first)):
            endpoints.close_session(session, "initialize failed", tell_relay=True)
            headers = {}
        if first is not None and not batch and stream.waiting <= 0:
            return web.Response(body=first, content_type="application/json", headers=headers)
        return await _sse(request, stream, headers, first=first, ended=first is None)
    finally:
        stream.detach()


async def get(request: web.Request) -> web.StreamResponse:
    """``GET /api/mcp/id/{id}``: the session's stream of server-initiated messages."""
    endpoints, endpoint = _endpoint(request)
    if isinstance(endpoint, web.Response):
        return endpoint
    session = _session(request, endpoints, endpoint)
    if isinstance(session, web.Response):
        return session
    stream = endpoints.open_get_stream(session)
    try:
        return await _sse(request, stream, {})
    finally:
        endpoints.get_stream_closed(session, stream)


async def delete(request: web.Request) -> web.StreamResponse:
    """``DELETE /api/mcp/id/{id}``: the client ends its session (the relay stops its calls)."""
    endpoints, endpoint = _endpoint(request)
    if isinstance(endpoint, web.Response):
        return endpoint
    session = _session(request, endpoints, endpoint)
    if isinstance(session, web.Response):
        return session
    endpoints.close_session(session, "the client ended the session", tell_relay=True)
    return web.Response(status=200)


async def _sse(
    request: web.Request,
    stream: Stream,
    headers: dict[str, str],
    *,
    first: bytes | None = None,
    ended: bool = False,
) -> web.StreamResponse:
    """Stream the messages of ``stream`` as SSE events until it ends (``first`` was already
    taken from its queue; ``ended``: so was its end)."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **headers,
        }
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        if first is not None:
            await response.write(b"event: message\ndata: " + first + b"\n\n")
        while not ended:
            try:
                data = await asyncio.wait_for(stream.queue.get(), KEEPALIVE)
            except asyncio.TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if data is None:
                break
            await response.write(b"event: message\ndata: " + data + b"\n\n")
        await response.write_eof()
    return response


def routes() -> list[web.RouteDef]:
    path = "/api/mcp/id/{id}"
    return [web.post(path, post), web.get(path, get), web.delete(path, delete)]
