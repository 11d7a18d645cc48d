"""How a request crosses to the server a worker is connected to, and how it comes back.

A worker connected to another server of the cluster sits in this server's pool like any
other, reached through a :class:`RemoteLink` instead of a WebSocket: the relay, the queue, the
retries and the flow control do not know the difference. The request crosses as one HTTP
request to the other server's :data:`RELAY_PATH` (kept alive and reused, so an answered
request costs no new connection): the client's method, headers and body unchanged, plus a
request token (see :mod:`.auth`) and a few ``X-Llamapool-*`` headers saying which worker, which
public path and model. That server takes a slot on that worker only if one is free *now*
(its pool is the one judge of its workers' limits), relays the request as it would a client's,
and streams the worker's response back as its own. So the response crosses as produced;
when the client leaves, this server closes the connection and the other one cancels the job;
credit flows as TCP backpressure (this side stops reading past a window the client has not
taken).

A server refuses a request it cannot start with :data:`REFUSED` (``busy``: the worker is full,
it goes back to the queue here; ``gone`` or ``retry``: it is tried on another worker), before
any byte, so failover keeps working across servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import attrs

from llamapool.headers import forwardable
from llamapool.protocol import ProxyRequest, ResponseHeaders
from llamapool.server.cluster.auth import ClusterAuth
from llamapool.server.exchange import Broken, Busy, Ended, Exchange
from llamapool.server.link import FLOW_WINDOW
from llamapool.tls import client_context

#: Where a server takes requests for its workers from the other servers.
RELAY_PATH = "/cluster/v1/relay"
#: The request token (see :class:`~.auth.ClusterAuth`).
AUTH = "X-Llamapool-Cluster-Auth"
#: The worker to serve the request on, its public API path (with query) and the model the
#: client asked for ("" for requests that name none).
WORKER = "X-Llamapool-Worker"
PATH = "X-Llamapool-Path"
MODEL = "X-Llamapool-Model"
STREAM = "X-Llamapool-Stream"
#: Set by a server on its own refusals only (never passed from a worker): why it could not
#: start the request.
REFUSED = "X-Llamapool-Refused"
REFUSED_BUSY, REFUSED_GONE, REFUSED_RETRY = "busy", "gone", "retry"
#: Seconds to connect to another server before trying elsewhere.
CONNECT_TIMEOUT = 3.0


@attrs.define(eq=False)
class Peer:
    """Another server of the cluster, as its signed announcement says."""

    id: str
    url: str
    #: Shared by every peer: one connection pool for the whole cluster.
    session: aiohttp.ClientSession = attrs.field(repr=False)
    auth: ClusterAuth = attrs.field(repr=False)
    #: This server's id (requests name where they come from).
    origin: str = ""
    #: Called for each request sent to it (the metrics count them).
    sent: Callable[[], None] = attrs.field(default=lambda: None, repr=False)
    #: The MCP endpoints it has relays of, and their state entries, as it last announced.
    mcp: frozenset[str] = frozenset()
    mcp_entries: list[dict[str, Any]] = attrs.Factory(list)

    def signed(self, headers: Mapping[str, str], **ours: str) -> dict[str, str]:
        """A client's headers for a request to this server: none of the client's own
        ``X-Llamapool-*`` (they mean something only between servers), then ``ours`` and this
        server's request token."""
        sent = {k: v for k, v in headers.items() if not k.lower().startswith("x-llamapool-")}
        sent.update(ours)
        sent[AUTH] = self.auth.token(self.origin)
        return sent


class _Flow:
    """Credit of one response crossing from a peer: bytes the client has not taken yet."""

    __slots__ = ("credit", "more")

    def __init__(self, window: int) -> None:
        self.credit = window
        self.more = asyncio.Event()

    def grant(self, amount: int) -> None:
        self.credit += amount
        self.more.set()


class RemoteLink:
    """A worker connected to another server, reached by HTTP through that server."""

    def __init__(self, peer: Peer, worker_id: str) -> None:
        self.peer = peer
        self.worker_id = worker_id
        self._issued = 0
        self._exchanges: dict[str, Exchange] = {}
        self._flows: dict[str, _Flow] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Called when the worker's server refuses a request because the worker is full.
        self.on_busy: Callable[[], None] = lambda: None

    @property
    def window(self) -> int:
        return FLOW_WINDOW

    @property
    def in_flight(self) -> int:
        return len(self._exchanges)

    def open(self) -> Exchange:
        self._issued += 1
        request_id = str(self._issued)
        exchange = self._exchanges[request_id] = Exchange(
            request_id, limit=2 * FLOW_WINDOW + 1024 * 1024, on_overflow=self._stop
        )
        self._flows[request_id] = _Flow(FLOW_WINDOW)
        return exchange

    def forget(self, request_id: str) -> None:
        self._exchanges.pop(request_id, None)
        self._flows.pop(request_id, None)
        self._stop(request_id)

    async def send_request(self, request: ProxyRequest, body: bytes) -> None:
        exchange = self._exchanges.get(request.request_id)
        flow = self._flows.get(request.request_id)
        if exchange is None or flow is None:
            raise ConnectionError("the request is no longer in flight")
        task = asyncio.ensure_future(self._cross(request, body, exchange, flow))
        self._tasks[request.request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.request_id, None))

    async def cancel(self, request_id: str) -> None:
        self._stop(request_id)

    def grant_soon(self, request_id: str, amount: int) -> None:
        flow = self._flows.get(request_id)
        if flow is not None:
            flow.grant(amount)

    def close_soon(self, reason: str) -> None:
        for request_id in list(self._tasks):
            self._stop(request_id)

    def _stop(self, request_id: str) -> None:
        """Close the request's connection: the other server cancels the worker's job."""
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def _cross(
        self, request: ProxyRequest, body: bytes, exchange: Exchange, flow: _Flow
    ) -> None:
        peer = self.peer
        peer.sent()
        headers = peer.signed(
            request.headers,
            **{
                WORKER: self.worker_id,
                PATH: request.path,
                MODEL: request.model,
                STREAM: "1" if request.stream else "0",
            },
        )
        try:
            async with peer.session.request(
                request.method, peer.url + RELAY_PATH, headers=headers, data=body
            ) as response:
                refused = response.headers.get(REFUSED)
                if refused is not None:
                    why = f"server {peer.id} could not start it: {refused}"
                    if refused == REFUSED_BUSY:
                        self.on_busy()
                        exchange.push(Busy(why))
                    else:
                        exchange.push(Broken(why))
                    return
                exchange.push(
                    ResponseHeaders(
                        request.request_id,
                        response.status,
                        forwardable(response.headers.items(), frozenset()),
                    )
                )
                async for chunk in response.content.iter_any():
                    exchange.push(chunk)
                    flow.credit -= len(chunk)
                    while flow.credit <= 0:
                        flow.more.clear()
                        await flow.more.wait()
                exchange.push(Ended())
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            exchange.push(Broken(f"server {peer.id} failed: {exc or type(exc).__name__}"))


def client_session(ca_file: str = "") -> aiohttp.ClientSession:
    """The one session a server reaches its peers with: connections kept and reused, no
    limit per peer (a server's own limits bound the requests), no body decoding; over TLS,
    certificates checked against ``ca_file`` (default: the system's CAs)."""
    tls = client_context(ca_file=ca_file, what="CLUSTER_CA_FILE") if ca_file else True
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True, ssl=tls),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )
