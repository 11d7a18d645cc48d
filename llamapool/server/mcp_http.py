"""``/api/mcp/id/{id}``: MCP's Streamable HTTP transport in front of a relayed MCP server.

``POST`` carries the client's JSON-RPC messages; requests are answered as ``application/json``
when the MCP server's response is the first thing that comes back, otherwise as an SSE stream
(progress, server requests, then the response). ``GET`` opens the session's server-to-client
stream, or with ``Last-Event-ID`` resumes a stream whose connection dropped (events have ids;
see :mod:`llamapool.server.mcp_streams`); ``DELETE`` ends the session. The pool's API key is
checked by the middleware; an endpoint whose relay was given ``--token`` also needs
``X-MCP-Token``.
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
from llamapool.server.cluster.mcp_proxy import elsewhere, send_on
from llamapool.server.mcp_sessions import (
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_ERROR,
    McpBusyError,
    McpEndpoint,
    McpEndpoints,
    McpSession,
    rpc_error,
)
from llamapool.server.mcp_streams import Connection, Event

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
LAST_EVENT_ID = "Last-Event-ID"
#: From this version on, a GET stream starts with an event that has an id and no data, so a
#: client can resume it before anything was sent (older clients may not expect empty data).
PRIMING_VERSION = "2025-11-25"
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
    peer = elsewhere(request, request.headers.get(SESSION_HEADER, ""))
    if peer is not None:  # another server of the cluster holds the endpoint or the session
        return await send_on(request, peer)
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
    stream = session.streams.open(waiting=len(requests))
    connection = stream.connection
    assert connection is not None
    for message in requests:
        problem = endpoints.start_call(session, message, stream)
        if problem:  # nothing of this POST is sent then
            for accepted in requests[: requests.index(message)]:
                endpoints.client_cancelled(session, accepted["id"])
            session.streams.forget(stream)
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
        session.streams.forget(stream)
        return web.Response(status=202)
    headers = {SESSION_HEADER: session.id} if initialize else {}
    try:
        first = await connection.get()
        if initialize and (first is None or "error" in orjson.loads(first[1])):
            endpoints.close_session(session, "initialize failed", tell_relay=True)
            headers = {}
        if first is not None and not batch and stream.waiting <= 0:
            session.streams.forget(stream)
            return web.Response(body=first[1], content_type="application/json", headers=headers)
        return await _sse(request, connection, headers, first=first, ended=first is None)
    finally:
        endpoints.stream_closed(session, stream, connection)


async def get(request: web.Request) -> web.StreamResponse:
    """``GET /api/mcp/id/{id}``: the session's stream of server-initiated messages, or with
    ``Last-Event-ID`` the rest of a stream whose connection dropped."""
    peer = elsewhere(request, request.headers.get(SESSION_HEADER, ""))
    if peer is not None:  # another server of the cluster holds the endpoint or the session
        return await send_on(request, peer)
    endpoints, endpoint = _endpoint(request)
    if isinstance(endpoint, web.Response):
        return endpoint
    session = _session(request, endpoints, endpoint)
    if isinstance(session, web.Response):
        return session
    last_event_id = request.headers.get(LAST_EVENT_ID)
    prime = ""
    if last_event_id is None:
        stream, connection = endpoints.open_get_stream(session)
        if session.protocol_version >= PRIMING_VERSION:
            prime = stream.event_id(0)
    else:
        resumed = endpoints.resume_stream(session, last_event_id)
        if resumed is None:
            return _error(
                400,
                INVALID_REQUEST,
                f"cannot resume after event {last_event_id[:40]!r}: "
                "it is no event of this session, or what followed is no longer held",
            )
        stream, connection = resumed
    try:
        return await _sse(request, connection, {}, prime=prime)
    finally:
        endpoints.stream_closed(session, stream, connection)


async def delete(request: web.Request) -> web.StreamResponse:
    """``DELETE /api/mcp/id/{id}``: the client ends its session (the relay stops its calls)."""
    peer = elsewhere(request, request.headers.get(SESSION_HEADER, ""))
    if peer is not None:  # another server of the cluster holds the endpoint or the session
        return await send_on(request, peer)
    endpoints, endpoint = _endpoint(request)
    if isinstance(endpoint, web.Response):
        return endpoint
    session = _session(request, endpoints, endpoint)
    if isinstance(session, web.Response):
        return session
    endpoints.close_session(session, "the client ended the session", tell_relay=True)
    return web.Response(status=200)


def _event(event: Event) -> bytes:
    """One SSE event; a message's line breaks (JSON whitespace) become ``data:`` lines."""
    event_id, data = event
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\ndata: ")
    return b"id: " + event_id.encode() + b"\nevent: message\ndata: " + data + b"\n\n"


async def _sse(
    request: web.Request,
    connection: Connection,
    headers: dict[str, str],
    *,
    first: Event | None = None,
    ended: bool = False,
    prime: str = "",
) -> web.StreamResponse:
    """Stream the events of ``connection`` until its stream ends (``first`` was already taken
    from it; ``ended``: so was its end). ``prime``: an event id to send first, without data."""
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
        if prime:
            await response.write(b"id: " + prime.encode() + b"\nevent: message\ndata: \n\n")
        if first is not None:
            await response.write(_event(first))
        while not ended:
            try:
                event = await asyncio.wait_for(connection.get(), KEEPALIVE)
            except asyncio.TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if event is None:
                break
            await response.write(_event(event))
        await response.write_eof()
    return response


def routes() -> list[web.RouteDef]:
    path = "/api/mcp/id/{id}"
    return [web.post(path, post), web.get(path, get), web.delete(path, delete)]
