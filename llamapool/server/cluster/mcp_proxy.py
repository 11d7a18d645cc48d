"""MCP endpoints across the servers of a cluster: a request for an endpoint whose relays are
connected to another server, or for a session another server opened, is sent on to it.

The request goes as the client sent it (its API key and ``X-MCP-Token`` included: the servers
of a cluster share their keys) plus a request token, and the answer, JSON or an SSE stream,
streams back as it comes. The token also stops the other server from sending it on again.
Sessions carry the id of the server that opened them (``<server>.<random>``), so every later
request of a session reaches that server, whichever server the client reaches.
"""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from llamapool.headers import HOP_BY_HOP, RECOMPUTED, forwardable
from llamapool.server.cluster.endpoint import CLUSTER
from llamapool.server.cluster.peer import AUTH, Peer

log = structlog.get_logger("llamapool.server")

_DROP = HOP_BY_HOP | {"host", "content-length"}


def elsewhere(request: web.Request, session_id: str) -> Peer | None:
    """The other server an MCP request belongs to, or ``None`` to serve it here."""
    cluster = request.app.get(CLUSTER)
    if cluster is None or cluster.auth.origin(request.headers.get(AUTH, "")) is not None:
        return None  # no cluster, or sent on by another server already: serve it here
    return cluster.mcp_server(request.match_info["id"], session_id)


async def send_on(request: web.Request, peer: Peer) -> web.StreamResponse:
    """Send an MCP request on to ``peer`` and stream its answer back."""
    headers = peer.signed(forwardable(request.headers.items(), _DROP))
    body = await request.read()
    peer.sent()
    response: web.StreamResponse | None = None
    try:
        async with peer.session.request(
            request.method, peer.url + request.path_qs, headers=headers, data=body or None
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status, headers=forwardable(upstream.headers.items(), RECOMPUTED)
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, OSError) as exc:
        log.warning("mcp_send_on_failed", server=peer.id, error=str(exc) or type(exc).__name__)
        if response is not None and response.prepared:
            if request.transport is not None:
                request.transport.abort()  # cut, so the client knows the stream broke
            return response
        raise web.HTTPBadGateway(reason="the server holding the MCP endpoint failed") from None
