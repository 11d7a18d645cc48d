"""The relay: dial out to the server, register an MCP endpoint, carry sessions both ways.

Like a worker it reconnects forever with capped exponential backoff and jitter, heartbeats,
and drains on request: it takes no new session, lets the calls in flight finish, then leaves.
Each session the server opens gets a :class:`~llamapool.mcp.transport.Channel` of its own;
when the link to the server drops, every session ends (the server has ended them too).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import time
from typing import Any

import aiohttp
import orjson
import structlog

from llamapool import protocol
from llamapool.build import build_info
from llamapool.errors import ConfigError, McpUpstreamError, ProtocolError
from llamapool.mcp.config import McpConfig
from llamapool.mcp.transport import Channel, Transport
from llamapool.protocol import (
    CLOSE_POLICY,
    PROTOCOL_VERSION,
    REASON_UNAUTHORIZED,
    STATUS_DRAINING,
    Heartbeat,
    McpClose,
    McpMessage,
    McpOpen,
    Message,
    Register,
    Registered,
    StatusUpdate,
)
from llamapool.tls import client_context

log = structlog.get_logger("llamapool.mcp")

_MAX_MESSAGE = 64 * 1024 * 1024
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
_STABLE = 30.0


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
        relay = self.relay
        try:
            self.channel = await relay.transport.open()
        except McpUpstreamError as exc:
            log.error("mcp_session_refused", session=self.id[:8], error=str(exc))
            await relay.send(McpClose(self.id, str(exc)))
            return
        upstream = asyncio.create_task(self._from_upstream(self.channel))
        try:
            while (data := await self.inbox.get()) is not None:
                self._track(data, incoming=False)
                await self.channel.send(data)
            await self._cancel_calls(self.channel, self.closing)
        finally:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
            await self.channel.close()
            relay.sessions.pop(self.id, None)
            relay.idle_changed()

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
    """One ``llamapool mcp`` process's link to the server."""

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
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._tls = client_context(ca_file=cfg.ca_file, insecure=cfg.tls_insecure)

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
        timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.server_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                attempt = 0
                while True:
                    started = time.monotonic()
                    try:
                        await self._connection(http)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        log.warning("server_unreachable", url=self.cfg.server_url, error=str(exc))
                    if self._drained():
                        break
                    if time.monotonic() - started > _STABLE:
                        attempt = 0
                    delay = min(self.cfg.reconnect_max, 0.5 * 2**attempt)
                    attempt += 1
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            await self._end_sessions("the relay stopped")
            await self.transport.close()

    def _drained(self) -> bool:
        return self.draining

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
        ws = self._ws
        if ws is not None:
            await ws.close(code=1001, message=b"relay draining")
        return finished

    async def send(self, message: Message) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(protocol.encode(message))

    def _register(self) -> Register:
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

    async def _connection(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect(
            self.cfg.server_url,
            max_msg_size=_MAX_MESSAGE,
            heartbeat=self.cfg.server_timeout * 2 / 3,
            ssl=self._tls,
        ) as ws:
            self._ws = ws
            await ws.send_str(protocol.encode(self._register()))
            heartbeat = asyncio.create_task(self._heartbeats(ws))
            try:
                reason = await self._receive(ws)
            finally:
                self._ws = None
                self.registered.clear()
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
                await self._end_sessions("the link to the server dropped")
            code = ws.close_code
            if code == CLOSE_POLICY and reason == REASON_UNAUTHORIZED:
                raise ConfigError(f"the server rejected this relay: {reason}")
            if code == CLOSE_POLICY:
                log.error("relay_refused", code=code, reason=reason)
            else:
                log.warning("server_disconnected", code=code, reason=reason)

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await ws.send_str(protocol.encode(Heartbeat(ts=int(time.time()))))
                await asyncio.sleep(self.cfg.heartbeat_interval)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> str:
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.ERROR:
                return str(msg.data)
            if msg.type in _CLOSED:
                return str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                message = protocol.decode(msg.data)
            except ProtocolError as exc:
                log.warning("server_message_ignored", reason=str(exc))
                continue
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
                        url=self.cfg.server_url,
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
