"""MCP endpoints, their relays and their sessions: the one owner of all three (no aiohttp.web).

An endpoint is an id (``/api/mcp/id/{id}``) served by one or more relays. A client session
(``Mcp-Session-Id``) lives on one relay, which holds one upstream MCP session for it, so
JSON-RPC ids pass through unchanged: they are unique per client session, and so per upstream.
Every message from a relay is routed here: a response to the stream of the request that asked
for it, progress to the stream of its request, anything else the server initiates to the
session's GET stream (or, while none is open, to the newest open request stream, or a small
backlog).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import orjson
import structlog

from llamapool.protocol import McpClose, McpMessage, McpOpen, Message
from llamapool.server.mcp_streams import Connection, SessionStreams, Stream

log = structlog.get_logger("llamapool.server")

#: JSON-RPC error codes the pool answers with (MCP's SDKs use -32001 for a timeout).
SERVER_ERROR = -32000
REQUEST_TIMEOUT = -32001
INVALID_REQUEST = -32600
PARSE_ERROR = -32700

#: MCP methods that name a metric series; any other is counted as ``other``.
METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
    }
)


@attrs.frozen
class McpLimits:
    """Bounds on what MCP clients and relays may make the server hold."""

    #: Largest JSON-RPC message (or batch) in either direction.
    max_message_bytes: int = 4 * 1024 * 1024
    max_sessions_per_endpoint: int = 256
    #: Requests of one session waiting for their response.
    max_pending_per_session: int = 64
    #: Per call, when the relay names none; progress notifications restart the clock.
    call_timeout: float = 300.0
    #: The most a relay may ask for (``--call-timeout``).
    max_call_timeout: float = 3600.0
    #: At least this long for ``initialize``, whatever the call timeout: it waits for the relay
    #: to start its MCP server, which takes seconds (an ``npx`` package: more) and reports no
    #: progress.
    initialize_timeout: float = 60.0
    #: A session with no call in flight and no open stream for this long ends.
    session_idle: float = 1800.0
    #: Server-initiated messages held for a session with no open stream.
    max_backlog: int = 256
    #: Events a session keeps for clients resuming a stream with ``Last-Event-ID`` (count,
    #: and bytes of data; the newest event is always kept).
    replay_events: int = 512
    replay_bytes: int = 1024 * 1024


def rpc_error(request_id: Any, code: int, message: str) -> bytes:
    """A JSON-RPC error response."""
    return orjson.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    )


@attrs.define(eq=False)
class Call:
    """A client request waiting for the response of the MCP server."""

    id: Any
    method: str
    stream: Stream
    started: float
    progress_token: bytes | None = None
    timer: asyncio.TimerHandle | None = None


@attrs.define(eq=False)
class Relay:
    """One connected ``llamapool mcp`` process serving an endpoint."""

    id: str
    name: str
    endpoint_id: str
    max_sessions: int
    token_sha256: str
    call_timeout: float
    version: str = ""
    #: The name of the worker key it connected with.
    credential: str = "anonymous"
    draining: bool = False
    #: It has left (its key was revoked, or its socket closed): once only.
    gone: bool = False
    connected_at: float = attrs.Factory(time.time)
    sessions: set[McpSession] = attrs.Factory(set)
    outbox: asyncio.Queue[Message | None] = attrs.Factory(asyncio.Queue)

    def send(self, message: Message) -> None:
        self.outbox.put_nowait(message)

    @property
    def calls(self) -> int:
        return sum(len(s.calls) for s in self.sessions)


@attrs.define(eq=False)
class McpSession:
    """One client session, bound to one relay for its whole life."""

    id: str
    endpoint_id: str
    relay: Relay
    streams: SessionStreams
    last_active: float = attrs.Factory(time.monotonic)
    calls: dict[bytes, Call] = attrs.Factory(dict)
    #: The newest GET stream, attached to a connection or not.
    get_stream: Stream | None = None
    backlog: deque[bytes] = attrs.Factory(deque)
    protocol_version: str = ""
    closed: str = ""


@attrs.define(eq=False)
class McpEndpoint:
    id: str
    token_sha256: str
    relays: list[Relay] = attrs.Factory(list)


class McpBusyError(Exception):
    """No relay of the endpoint can take another session now."""


class McpRefusedError(Exception):
    """A relay may not serve this endpoint (its token differs from the connected relays')."""


#: Receives (endpoint, method, outcome, seconds) when a call ends.
CallObserver = Callable[[str, str, str, float], None]


class McpEndpoints:
    """Every endpoint, relay and session; tells relays and streams what happened."""

    def __init__(
        self,
        limits: McpLimits | None = None,
        *,
        on_change: Callable[[], None] = lambda: None,
        on_call: CallObserver = lambda *_: None,
    ) -> None:
        self.limits = limits or McpLimits()
        self.endpoints: dict[str, McpEndpoint] = {}
        self.sessions: dict[str, McpSession] = {}
        self._on_change = on_change
        self._on_call = on_call
        #: Put before every session id (in a cluster: this server's id and a dot).
        self.session_prefix = ""

    # --- relays ------------------------------------------------------------------------------

    def relay_joined(self, relay: Relay) -> None:
        """Raises :class:`McpRefusedError` when the endpoint's relays use another token."""
        endpoint = self.endpoints.get(relay.endpoint_id)
        if endpoint is None:
            endpoint = self.endpoints[relay.endpoint_id] = McpEndpoint(
                relay.endpoint_id, relay.token_sha256
            )
        elif endpoint.token_sha256 != relay.token_sha256:
            raise McpRefusedError("the endpoint's connected relays require another token")
        endpoint.relays.append(relay)
        log.info("mcp_relay_registered", mcp_id=relay.endpoint_id, relay=relay.name)
        self._on_change()

    def relay_left(self, relay: Relay, reason: str = "the MCP relay disconnected") -> None:
        if relay.gone:
            return
        relay.gone = True
        for session in list(relay.sessions):
            self.close_session(session, reason, tell_relay=False)
        endpoint = self.endpoints.get(relay.endpoint_id)
        if endpoint is not None and relay in endpoint.relays:
            endpoint.relays.remove(relay)
            if not endpoint.relays:
                del self.endpoints[endpoint.id]
        relay.outbox.put_nowait(None)
        log.info("mcp_relay_disconnected", mcp_id=relay.endpoint_id, relay=relay.name)
        self._on_change()

    def set_draining(self, relay: Relay, draining: bool) -> None:
        relay.draining = draining
        self._on_change()

    # --- sessions ----------------------------------------------------------------------------

    def open_session(self, endpoint: McpEndpoint) -> McpSession:
        """A new session on the least busy relay that takes one; raises :class:`McpBusyError`."""
        open_sessions = sum(len(r.sessions) for r in endpoint.relays)
        if open_sessions >= self.limits.max_sessions_per_endpoint:
            raise McpBusyError(
                f"MCP endpoint {endpoint.id!r} has its maximum of "
                f"{self.limits.max_sessions_per_endpoint} sessions"
            )
        candidates = [
            r for r in endpoint.relays if not r.draining and len(r.sessions) < r.max_sessions
        ]
        if not candidates:
            raise McpBusyError(f"every relay of MCP endpoint {endpoint.id!r} is busy or draining")
        relay = min(candidates, key=lambda r: (len(r.sessions), r.calls))
        streams = SessionStreams(
            max_events=self.limits.replay_events, max_bytes=self.limits.replay_bytes
        )
        session_id = self.session_prefix + secrets.token_urlsafe(24)
        session = McpSession(session_id, endpoint.id, relay, streams)
        self.sessions[session.id] = session
        relay.sessions.add(session)
        relay.send(McpOpen(session.id))
        self._on_change()
        return session

    def session(self, session_id: str, endpoint_id: str) -> McpSession | None:
        session = self.sessions.get(session_id)
        if session is None or session.endpoint_id != endpoint_id:
            return None
        return session

    def close_session(self, session: McpSession, reason: str, *, tell_relay: bool) -> None:
        """End ``session``: its calls fail with ``reason``, its streams end."""
        if session.closed:
            return
        session.closed = reason
        self.sessions.pop(session.id, None)
        session.relay.sessions.discard(session)
        if tell_relay:
            session.relay.send(McpClose(session.id, reason))
        for call in list(session.calls.values()):
            self._end_call(session, call, "relay_gone" if not tell_relay else "cancelled")
            call.stream.put(rpc_error(call.id, SERVER_ERROR, f"MCP session ended: {reason}"))
            call.stream.answered()
        if session.get_stream is not None:
            session.get_stream.end()
        log.info("mcp_session_closed", mcp_id=session.endpoint_id, reason=reason)
        self._on_change()

    def expire_idle(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for session in list(self.sessions.values()):
            listening = session.get_stream is not None and not session.get_stream.detached
            idle = not session.calls and not listening
            if idle and now - session.last_active > self.limits.session_idle:
                self.close_session(session, "the session expired", tell_relay=True)

    # --- client to relay ---------------------------------------------------------------------

    def start_call(self, session: McpSession, message: dict[str, Any], stream: Stream) -> str:
        """Track a client request; an error message (empty when accepted)."""
        key = orjson.dumps(message["id"])
        if key in session.calls:
            return "a request with this id is already in flight"
        if len(session.calls) >= self.limits.max_pending_per_session:
            return f"too many calls in flight (at most {self.limits.max_pending_per_session})"
        method = str(message.get("method"))
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        call = Call(
            message["id"],
            method,
            stream,
            time.monotonic(),
            progress_token=None if token is None else orjson.dumps(token),
        )
        session.calls[key] = call
        self._arm(session, call)
        self._on_change()
        return ""

    def forward(self, session: McpSession, data: str) -> None:
        session.last_active = time.monotonic()
        session.relay.send(McpMessage(session.id, data))

    def client_cancelled(self, session: McpSession, request_id: Any) -> None:
        """The client sent ``notifications/cancelled``: no response will come for its call."""
        call = session.calls.get(orjson.dumps(request_id))
        if call is not None:
            self._end_call(session, call, "cancelled")
            call.stream.answered()

    # --- relay to client ---------------------------------------------------------------------

    def from_relay(self, relay: Relay, session_id: str, data: str) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.relay is not relay:
            return  # a session that just ended
        if len(data) > self.limits.max_message_bytes:
            self.close_session(
                session, "the MCP server sent a message over the size limit", tell_relay=True
            )
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("mcp_message_invalid", mcp_id=session.endpoint_id, reason="not JSON")
            return
        if isinstance(message, list):
            for each in message:
                self._route(session, each, orjson.dumps(each))
        else:
            self._route(session, message, data.encode())

    def relay_closed(self, relay: Relay, session_id: str, reason: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and session.relay is relay:
            self.close_session(
                session, reason or "the MCP server ended the session", tell_relay=False
            )

    def _route(self, session: McpSession, message: Any, data: bytes) -> None:
        if not isinstance(message, dict):
            return
        session.last_active = time.monotonic()
        method = message.get("method")
        if method is None and "id" in message:  # a response
            call = session.calls.get(orjson.dumps(message["id"]))
            if call is None:
                return  # cancelled or timed out already
            if call.method == "initialize":
                result = message.get("result")
                if isinstance(result, dict) and isinstance(result.get("protocolVersion"), str):
                    session.protocol_version = result["protocolVersion"]
            self._end_call(session, call, "error" if "error" in message else "ok")
            call.stream.put(data)
            call.stream.answered()
            return
        if method == "notifications/progress":
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            key = orjson.dumps(token)
            for call in session.calls.values():
                if call.progress_token == key:
                    self._arm(session, call)  # progress: the tool is alive
                    call.stream.put(data)
                    return
        self._unrelated(session, data)

    def _unrelated(self, session: McpSession, data: bytes) -> None:
        if session.get_stream is not None and not session.get_stream.detached:
            session.get_stream.put(data)
            return
        for call in reversed(session.calls.values()):
            if not call.stream.detached:
                call.stream.put(data)
                return
        session.backlog.append(data)
        while len(session.backlog) > self.limits.max_backlog:
            session.backlog.popleft()

    def open_get_stream(self, session: McpSession) -> tuple[Stream, Connection]:
        """The session's server-to-client stream (ending an older one), backlog first."""
        if session.get_stream is not None:
            session.get_stream.end()
        stream = session.get_stream = session.streams.open(listening=True)
        while session.backlog:
            stream.put(session.backlog.popleft())
        assert stream.connection is not None
        return stream, stream.connection

    def resume_stream(
        self, session: McpSession, last_event_id: str
    ) -> tuple[Stream, Connection] | None:
        """A new connection for the stream that carried ``last_event_id``, replaying what
        followed it; ``None`` when it cannot be resumed without a gap."""
        resumed = session.streams.resume(last_event_id)
        if resumed is not None and resumed[0].listening and not resumed[0].ended:
            session.get_stream = resumed[0]
        session.last_active = time.monotonic()
        return resumed

    def stream_closed(self, session: McpSession, stream: Stream, connection: Connection) -> None:
        """The HTTP response carrying ``connection`` of ``stream`` is over."""
        stream.detach(connection)
        session.last_active = time.monotonic()

    # --- time --------------------------------------------------------------------------------

    def _arm(self, session: McpSession, call: Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
        timeout = session.relay.call_timeout or self.limits.call_timeout
        timeout = min(timeout, self.limits.max_call_timeout)
        if call.method == "initialize":
            timeout = max(timeout, self.limits.initialize_timeout)
        loop = asyncio.get_running_loop()
        call.timer = loop.call_later(timeout, self._timed_out, session, call, timeout)

    def _timed_out(self, session: McpSession, call: Call, timeout: float) -> None:
        if session.calls.get(orjson.dumps(call.id)) is not call:
            return
        self._end_call(session, call, "timeout")
        reason = f"the call took longer than {timeout:g}s"
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": call.id, "reason": reason},
        }
        session.relay.send(McpMessage(session.id, orjson.dumps(cancel).decode()))
        call.stream.put(rpc_error(call.id, REQUEST_TIMEOUT, f"MCP call timed out: {reason}"))
        call.stream.answered()

    def _end_call(self, session: McpSession, call: Call, outcome: str) -> None:
        session.calls.pop(orjson.dumps(call.id), None)
        if call.timer is not None:
            call.timer.cancel()
        method = call.method if call.method in METHODS else "other"
        self._on_call(session.endpoint_id, method, outcome, time.monotonic() - call.started)
        self._on_change()

    # --- visibility --------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """``mcp_endpoints`` of the state API."""
        return [
            {
                "id": endpoint.id,
                "token_required": bool(endpoint.token_sha256),
                "sessions": sum(len(r.sessions) for r in endpoint.relays),
                "calls_in_flight": sum(r.calls for r in endpoint.relays),
                "relays": [
                    {
                        "name": r.name,
                        "version": r.version,
                        "status": "draining" if r.draining else "ready",
                        "sessions": len(r.sessions),
                        "max_sessions": r.max_sessions,
                        "calls_in_flight": r.calls,
                        "connected_at": r.connected_at,
                    }
                    for r in endpoint.relays
                ],
            }
            for endpoint in sorted(self.endpoints.values(), key=lambda e: e.id)
        ]

    def __iter__(self) -> Iterator[McpEndpoint]:
        return iter(self.endpoints.values())
