"""The relay: dial out to the server, register an MCP endpoint, carry sessions both ways.

Like a worker it stays connected through a :class:`~llamapool.dialout.Dialer` (backoff,
heartbeats, dead-link detection, close codes), and drains on request: it takes no new
session, lets the calls in flight finish, then leaves.
Each session the server opens gets a :class:`~llamapool.mcp.transport.Channel` of its own;
when the link to the server drops, every session ends (the server has ended them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from typing import Any

import orjson
import structlog

from llamapool import protocol
from llamapool.build import build_info
from llamapool.dialout import Dialer, DialSettings, Socket
from llamapool.errors import McpUpstreamError, ProtocolError
from llamapool.mcp.config import McpConfig
from llamapool.mcp.transport import Channel, Transport
from llamapool.protocol import (
    PROTOCOL_VERSION,
    STATUS_DRAINING,
    McpClose,
    McpMessage,
    McpOpen,
    Message,
    Register,
    Registered,
    StatusUpdate,
)
from llamapool.urls import url_for_logs

log = structlog.get_logger("llamapool.mcp")


class RelaySession:
    """One client session: its channel to the MCP server and the calls in flight on it."""

    def __init__(self, relay: McpRelay, session_id: str) -> None:
        self.relay = relay
        self.id = session_id
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        #: JSON-RPC ids (as JSON) of client requests the MCP server has not answered yet.
        self.calls: dict[bytes, Any] = {}
        self.channel: Channel | None = None
        self.closing = ""
        self.task = asyncio.create_task(self._run())

    def close(self, reason: str) -> None:
        """The server ended the session: cancel its calls, then stop the channel."""
        if not self.closing:
            self.closing = reason
            self.inbox.put_nowait(None)

    async def _run(self) -> None:
        try:
            self.channel = await self.relay.transport.open()
            await self._relay(self.channel)
        except McpUpstreamError as exc:  # at open, or at a Streamable HTTP initialize
            self.closing = self.closing or str(exc)
            log.error("mcp_session_refused", session=self.id[:8], error=str(exc))
            self.calls.clear()
            await self.relay.send(McpClose(self.id, str(exc)))
        finally:
            self.relay.sessions.pop(self.id, None)
            self.relay.idle_changed()

    async def _relay(self, channel: Channel) -> None:
        """Carry the client's messages to the MCP server (and its own back) until either ends."""
        upstream = asyncio.create_task(self._from_upstream(channel))
        try:
            while (data := await self.inbox.get()) is not None:
                self._track(data, incoming=False)
                await channel.send(data)
            await self._cancel_calls(channel, self.closing)
        finally:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
            await channel.close()

    async def _from_upstream(self, channel: Channel) -> None:
        while (data := await channel.receive()) is not None:
            self._track(data, incoming=True)
            await self.relay.send(McpMessage(self.id, data))
        if not self.closing:  # the MCP server went away on its own
            reason = channel.ended()
            self.closing = reason
            await self.relay.send(McpClose(self.id, reason))
            self.inbox.put_nowait(None)

    def _track(self, data: str, *, incoming: bool) -> None:
        """Follow which client requests are in flight (from the client: requests start
        calls; from the MCP server: responses end them)."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        for each in message if isinstance(message, list) else [message]:
            if not isinstance(each, dict) or "id" not in each:
                continue
            key = orjson.dumps(each["id"])
            if incoming and "method" not in each:
                self.calls.pop(key, None)
            elif not incoming and "method" in each:
                self.calls[key] = each["id"]
        cancelled = isinstance(message, dict) and message.get("method") == "notifications/cancelled"
        if not incoming and cancelled:
            params = message.get("params")
            if isinstance(params, dict):
                self.calls.pop(orjson.dumps(params.get("requestId")), None)
        self.relay.idle_changed()

    async def _cancel_calls(self, channel: Channel, reason: str) -> None:
        """Tell the MCP server the calls still running are cancelled (the session ended)."""
        for request_id in list(self.calls.values()):
            cancel = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": request_id, "reason": reason or "session ended"},
            }
            await channel.send(orjson.dumps(cancel).decode())
        self.calls.clear()


class McpRelay:
    """One ``llamapool mcp`` process's link to the server: the
    :class:`~llamapool.dialout.Peer` of a dialer that keeps it connected."""

    role = "relay"

    def __init__(self, cfg: McpConfig, transport: Transport) -> None:
        self.cfg = cfg
        self.transport = transport
        self.build = build_info()
        self.instance = secrets.token_urlsafe(24)
        self.sessions: dict[str, RelaySession] = {}
        self.draining = False
        self.registered = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_error = ""
        self.dialer = Dialer(DialSettings.of(cfg), self)

    @property
    def calls(self) -> int:
        return sum(len(s.calls) for s in self.sessions.values())

    def idle_changed(self) -> None:
        if self.calls:
            self.idle.clear()
        else:
            self.idle.set()

    async def run(self) -> None:
        """Serve until cancelled (or drained), reconnecting with backoff and jitter."""
        try:
            await self.dialer.run()
        finally:
            await self._end_sessions("the relay stopped")
            await self.transport.close()

    async def drain(self, timeout: float) -> bool:
        """Take no new session, let calls in flight finish (``timeout`` -1: as long as it
        takes), then leave. Returns whether every call finished."""
        self.draining = True
        log.info("relay_draining", calls=self.calls, timeout=timeout)
        await self.send(StatusUpdate(STATUS_DRAINING))
        finished = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), None if timeout < 0 else timeout)
        if self.calls:
            finished = False
            log.warning("drain_timeout", calls=self.calls)
        await self.dialer.close(1001, "relay draining")
        return finished

    async def send(self, message: Message) -> None:
        await self.dialer.send(message)

    def register(self) -> Register:
        token = self.cfg.token
        return Register(
            worker_name=self.cfg.name,
            worker_key=self.cfg.worker_key,
            max_concurrency=self.cfg.max_sessions,
            version=self.build.version,
            build_sha=self.build.sha,
            build_date=self.build.date,
            backend=self.transport.name,
            protocol=PROTOCOL_VERSION,
            instance=self.instance,
            kind="mcp",
            mcp_id=self.cfg.mcp_id,
            mcp_token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else "",
            mcp_call_timeout=round(self.cfg.call_timeout),
        )

    # --- Peer: the server connection --------------------------------------------------------

    async def on_connect(self, ws: Socket) -> None:
        pass

    async def on_disconnect(self) -> None:
        self.registered.clear()
        await self._end_sessions("the link to the server dropped")

    async def on_binary(self, data: bytes) -> None:
        pass  # the relay protocol is JSON only

    async def on_text(self, text: str) -> None:
        """A session opened, a message for one, a session closed, the register's answer."""
        try:
            message = protocol.decode(text)
        except ProtocolError as exc:
            log.warning("server_message_ignored", reason=str(exc))
            return
        match message:
            case McpOpen(session=session_id):
                await self._open(session_id)
            case McpMessage(session=session_id, data=data):
                session = self.sessions.get(session_id)
                if session is not None and not session.closing:
                    session.inbox.put_nowait(data)
            case McpClose(session=session_id, reason=reason):
                session = self.sessions.get(session_id)
                if session is not None:
                    session.close(reason)
            case Registered():
                log.info(
                    "relay_registered",
                    mcp_id=self.cfg.mcp_id,
                    transport=self.transport.name,
                    url=url_for_logs(self.dialer.url),
                )
                self.registered.set()
            case _:
                pass

    async def _open(self, session_id: str) -> None:
        if self.draining or len(self.sessions) >= self.cfg.max_sessions:
            reason = "the relay is draining" if self.draining else "the relay is at its limit"
            await self.send(McpClose(session_id, reason))
            return
        self.sessions[session_id] = RelaySession(self, session_id)
        log.info("mcp_session_opened", session=session_id[:8], sessions=len(self.sessions))

    async def _end_sessions(self, reason: str) -> None:
        sessions = list(self.sessions.values())
        for session in sessions:
            session.close(reason)
        await asyncio.gather(*(s.task for s in sessions), return_exceptions=True)
        self.sessions.clear()
        self.idle_changed()
