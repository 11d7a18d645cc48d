"""The server's side of an MCP relay's WebSocket: after a ``register`` with ``kind: "mcp"``,
the worker endpoint hands the socket here (see :func:`serve_relay`)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import WSMsgType, web

from llamapool import __version__, protocol
from llamapool.errors import ProtocolError
from llamapool.protocol import (
    CLOSE_INVALID_MESSAGES,
    CLOSE_POLICY,
    STATUS_DRAINING,
    Heartbeat,
    McpClose,
    McpMessage,
    Register,
    Registered,
    StatusUpdate,
)
from llamapool.server.appkeys import CONFIG, LOG_THROTTLE, MCP, WORKER_KEYS
from llamapool.server.keyfile import WorkerKey
from llamapool.server.mcp_sessions import McpEndpoints, McpRefusedError, Relay

log = structlog.get_logger("llamapool.server")

#: Endpoint ids: a URL path segment and a metric label, so plain and short.
MCP_ID = re.compile(r"^[A-Za-z0-9][\w.:@+=-]{0,127}$")
_SHA256 = re.compile(r"^([0-9a-f]{64})?$")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]{0,128}$")
#: A relay that sends this many messages that cannot be valid is disconnected.
_MAX_INVALID = 100


def check_relay(register: Register) -> str:
    """Why a relay's register is not acceptable, or ``""``."""
    if not MCP_ID.match(register.mcp_id):
        return "mcp_id must be 1 to 128 letters, digits or ._:@+=- (not starting with one of those)"
    if not _SHA256.match(register.mcp_token_sha256):
        return "mcp_token_sha256 must be 64 lowercase hex digits"
    if not 0 <= register.mcp_call_timeout <= 7 * 24 * 3600:
        return "mcp_call_timeout out of range"
    if not _PRINTABLE.match(register.worker_name):
        return "worker_name must be printable text of at most 128 characters"
    return ""


async def serve_relay(
    app: web.Application, ws: web.WebSocketResponse, register: Register, key: WorkerKey
) -> None:
    """A registered MCP relay: it serves its endpoint until its socket closes, or its worker
    key is revoked. It holds its key as a worker does, so it counts against the key's
    ``max_workers`` and a revoked key disconnects it at once."""
    endpoints, cfg = app[MCP], app[CONFIG]
    problem = check_relay(register)
    if problem:
        app[LOG_THROTTLE].log(log.warning, "mcp_relay_rejected", reason=problem)
        await ws.close(code=CLOSE_POLICY, message=problem.encode()[:120])
        return
    relay = Relay(
        id=uuid.uuid4().hex,
        name=register.worker_name or register.mcp_id,
        endpoint_id=register.mcp_id,
        max_sessions=max(1, register.max_concurrency),
        token_sha256=register.mcp_token_sha256,
        call_timeout=float(register.mcp_call_timeout),
        version=register.version,
    )
    worker_keys = app[WORKER_KEYS]
    grant = await worker_keys.hold(
        key,
        relay,
        ws,
        leave=lambda: endpoints.relay_left(relay),  # no new sessions or calls from then on
        throttle=app[LOG_THROTTLE],
        event="mcp_relay_rejected",
    )
    if grant is None:
        return
    try:
        endpoints.relay_joined(relay)
    except McpRefusedError as exc:
        worker_keys.release(grant)
        app[LOG_THROTTLE].log(log.warning, "mcp_relay_rejected", reason=str(exc))
        await ws.close(code=CLOSE_POLICY, message=str(exc).encode()[:120])
        return
    writer = asyncio.create_task(_write(ws, relay))
    try:
        await ws.send_str(protocol.encode(Registered(features=[], version=__version__)))
        await _read(ws, relay, endpoints, timeout=cfg.worker_timeout)
    finally:
        worker_keys.release(grant)
        endpoints.relay_left(relay)
        writer.cancel()
        await asyncio.gather(writer, *grant.closing, return_exceptions=True)


async def _write(ws: web.WebSocketResponse, relay: Relay) -> None:
    """Send what sessions give the relay, in order, until it leaves."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        while (message := await relay.outbox.get()) is not None:
            await ws.send_str(protocol.encode(message))


async def _read(
    ws: web.WebSocketResponse, relay: Relay, endpoints: McpEndpoints, *, timeout: float
) -> None:
    invalid = 0
    while True:
        try:
            msg = await ws.receive(timeout=timeout)
        except asyncio.TimeoutError:
            log.warning("mcp_relay_evicted", mcp_id=relay.endpoint_id, reason="no heartbeat")
            await ws.close(code=protocol.CLOSE_GOING_AWAY, message=b"heartbeat timeout")
            return
        if msg.type != WSMsgType.TEXT:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            invalid += 1
        else:
            try:
                message = protocol.decode(msg.data)
            except ProtocolError:
                message, invalid = None, invalid + 1
            match message:
                case McpMessage(session=session, data=data):
                    endpoints.from_relay(relay, session, data)
                case McpClose(session=session, reason=reason):
                    endpoints.relay_closed(relay, session, reason[:200])
                case StatusUpdate(status=status):
                    endpoints.set_draining(relay, status == STATUS_DRAINING)
                case Heartbeat() | None:
                    pass
                case _:
                    invalid += 1
        if invalid > _MAX_INVALID:
            await ws.close(code=CLOSE_INVALID_MESSAGES, message=b"too many invalid messages")
            return


async def expire_mcp_sessions(app: web.Application) -> AsyncIterator[None]:
    """Background task: end MCP sessions idle for longer than the limit."""
    endpoints = app[MCP]

    async def sweep() -> None:
        while True:
            await asyncio.sleep(min(60.0, endpoints.limits.session_idle / 4))
            endpoints.expire_idle()

    task = asyncio.create_task(sweep())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
