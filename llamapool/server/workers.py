"""The worker WebSocket endpoint: register, then route messages until the worker leaves."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import structlog
from aiohttp import WSMessage, WSMsgType, web

from llamapool import __version__, protocol
from llamapool.config import ServeConfig
from llamapool.errors import ProtocolError, WorkerIdInUseError
from llamapool.log import Throttle
from llamapool.protocol import (
    CLOSE_ID_IN_USE,
    CLOSE_INVALID_MESSAGES,
    CLOSE_POLICY,
    FEATURE_BINARY_FRAMES,
    FEATURE_FLOW_CONTROL,
    FEATURES,
    REASON_UNAUTHORIZED,
    Heartbeat,
    ModelsUpdate,
    Register,
    Registered,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    StatusUpdate,
)
from llamapool.server.appkeys import CONFIG, LOG_THROTTLE, REGISTRY, SOCKETS, WORKER_KEYS
from llamapool.server.inbox import InboxWebSocket
from llamapool.server.keyfile import WorkerKey
from llamapool.server.link import WorkerLink
from llamapool.server.mcp_relays import serve_relay
from llamapool.server.pool import WorkerHandle
from llamapool.server.registry import Registry
from llamapool.server.validate import MAX_REGISTER_BYTES, Invalid, check_models, check_register
from llamapool.server.worker_keys import WorkerKeyStore

log = structlog.get_logger("llamapool.server")

#: Room for protocol overhead on top of the largest body a frame may carry.
_FRAME_SLACK = 1024 * 1024


async def worker_socket(request: web.Request) -> web.WebSocketResponse:
    """``GET {WS_PATH}``: one worker's connection for as long as it stays.

    A connection counts against ``max_workers`` from the moment it opens, so sockets that
    never register cannot pile up either.
    """
    cfg, sockets = request.app[CONFIG], request.app[SOCKETS]
    throttle = request.app[LOG_THROTTLE]
    if len(sockets) >= cfg.max_workers:
        throttle.log(log.warning, "worker_rejected", reason="too_many_workers")
        raise web.HTTPServiceUnavailable(reason="too many workers are connected")
    ws = InboxWebSocket(max_msg_size=cfg.max_body_size + _FRAME_SLACK)
    await ws.prepare(request)
    sockets.add(ws)
    try:
        admitted = await _admit(ws, cfg, request.app[WORKER_KEYS], throttle)
        if admitted is not None:
            register, key = admitted
            if register.kind == "mcp":  # an MCP relay, not a worker
                await serve_relay(request.app, ws, register, key)
            else:
                await _session(request.app, ws, register, key)
    finally:
        sockets.discard(ws)
    return ws


async def _admit(
    ws: web.WebSocketResponse, cfg: ServeConfig, keys: WorkerKeyStore, throttle: Throttle
) -> tuple[Register, WorkerKey] | None:
    """The worker's register message and its key, if both and its strings are acceptable;
    otherwise the socket is closed with 1008 and a reason (logged once per reason and interval:
    anyone can open worker sockets). A disabled or expired key is refused like a wrong one."""
    register = await _receive_register(ws, cfg.register_timeout, throttle)
    if register is None:
        return None
    key = keys.authenticate(register.key)
    if key is None:
        throttle.log(log.warning, "worker_rejected", reason="bad_worker_key")
        await ws.close(code=CLOSE_POLICY, message=REASON_UNAUTHORIZED.encode())
        return None
    try:
        return check_register(register, max_models=cfg.max_models_per_worker), key
    except Invalid as exc:
        throttle.log(log.warning, "worker_rejected", reason=str(exc))
        await ws.close(code=CLOSE_POLICY, message=str(exc).encode()[:120])
        return None


async def _session(
    app: web.Application, ws: InboxWebSocket, register: Register, key: WorkerKey
) -> None:
    """A registered worker: in the pool until its socket closes, or its key is revoked."""
    features = sorted(set(register.features) & set(FEATURES))
    link = WorkerLink(
        ws,
        binary=FEATURE_BINARY_FRAMES in features,
        flow=FEATURE_FLOW_CONTROL in features,
    )
    worker = WorkerHandle(
        id=register.worker_id or uuid.uuid4().hex,
        name=register.worker_name or register.worker_id or "worker",
        models=frozenset(register.models),
        max_concurrency=max(1, register.max_concurrency),
        paths=frozenset(register.paths) if register.paths else None,
        link=link,
        version=register.version,
        build_sha=register.build_sha,
        build_date=register.build_date,
        backend=register.backend,
        protocol=register.protocol,
        instance=register.instance,
    )
    registry, worker_keys = app[REGISTRY], app[WORKER_KEYS]
    grant = await worker_keys.hold(
        key,
        worker,
        ws,
        leave=lambda: registry.leave(worker),  # no new requests from then on
        throttle=app[LOG_THROTTLE],
        event="worker_rejected",
    )
    if grant is None:
        return
    try:
        replaced = registry.join(worker)
    except WorkerIdInUseError:
        worker_keys.release(grant)
        reason = f"worker id {worker.id!r} is in use by another connected worker"
        app[LOG_THROTTLE].log(log.warning, "worker_rejected", reason="worker_id_in_use")
        await ws.close(code=CLOSE_ID_IN_USE, message=reason.encode()[:120])
        return
    if replaced is not None:
        replaced.link.close_soon("replaced by a new connection")
    if register.protocol:  # a llamapool-py worker: say which extensions we will use
        await ws.send_str(protocol.encode(Registered(features=features, version=__version__)))
    log.info(
        "worker_registered",
        worker_id=worker.id,
        worker_name=worker.name,
        credential=key.name,
        models=len(worker.models),
        max_concurrency=worker.max_concurrency,
        backend=worker.backend or "unknown",
        features=features,
    )
    try:
        max_models = app[CONFIG].max_models_per_worker
        await _serve(ws, worker, link, registry, max_models=max_models)
    finally:
        worker_keys.release(grant)
        registry.leave(worker)
        registry.state.metrics.worker_messages_ignored.inc(link.ignored)
        link.break_all("worker disconnected")
        log.info("worker_disconnected", worker_id=worker.id, worker_name=worker.name)


async def _receive_register(
    ws: web.WebSocketResponse, timeout: float, throttle: Throttle
) -> Register | None:
    """The first message, which must be a valid ``register``; closes with 1008 otherwise."""
    try:
        msg = await ws.receive(timeout=timeout)
    except asyncio.TimeoutError:
        reason = "no register message in time"
    else:
        reason = "first message must be a register message"
        if msg.type == WSMsgType.TEXT and len(msg.data) > MAX_REGISTER_BYTES:
            reason = "register message too large"
        elif msg.type == WSMsgType.TEXT:
            try:
                message = protocol.decode(msg.data)
            except ProtocolError as exc:
                reason = str(exc)
            else:
                if isinstance(message, Register):
                    return message
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return None
    throttle.log(log.warning, "worker_rejected", reason=reason)
    await ws.close(code=CLOSE_POLICY, message=reason.encode()[:120])
    return None


async def _serve(
    ws: InboxWebSocket,
    worker: WorkerHandle,
    link: WorkerLink,
    registry: Registry,
    *,
    max_models: int,
) -> None:
    """Route the worker's messages until it leaves. They are handled as they are parsed (see
    :mod:`.inbox`); this task takes the rest: close, ping, and what queued behind them."""

    def handle(msg: WSMessage) -> None:
        worker.last_heartbeat = time.monotonic()  # any message proves the worker alive
        if msg.type == WSMsgType.BINARY:
            link.dispatch_frame(msg.data)
        elif msg.type == WSMsgType.TEXT:
            _on_text(msg.data, worker, link, registry, max_models=max_models)
        if link.misbehaving:  # receive() returns once the close starts
            ws.deliver_to(None)
            link.close_soon("too many invalid messages", code=CLOSE_INVALID_MESSAGES)

    ws.deliver_to(handle)
    try:
        while not ws.closed:
            msg = await ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            handle(msg)
    finally:
        ws.deliver_to(None)
    if link.misbehaving:
        log.warning("worker_disconnected_for_invalid_messages", worker_id=worker.id)


def _on_text(
    text: str,
    worker: WorkerHandle,
    link: WorkerLink,
    registry: Registry,
    *,
    max_models: int,
) -> None:
    """One JSON message from a registered worker."""
    try:
        message = protocol.decode(text)
    except ProtocolError as exc:
        link.count_invalid()
        log.debug("worker_message_invalid", worker_id=worker.id, reason=str(exc))
        return
    match message:
        case ResponseHeaders() | ResponseChunk() | ResponseEnd():
            link.dispatch(message)
        case ModelsUpdate(models=models):
            try:
                models = check_models(models, max_models=max_models)
            except Invalid as exc:
                link.count_invalid()
                log.warning("worker_models_rejected", worker_id=worker.id, reason=str(exc))
                return
            registry.set_models(worker, models)
            log.info("worker_models_updated", worker_id=worker.id, models=len(models))
        case StatusUpdate(status=status):
            registry.set_status(worker, status)
        case Heartbeat():
            registry.state.changed()
        case None:  # a type we do not know: an extension of a newer peer, not garbage
            link.unknown += 1
        case _:  # a message only a server sends: never valid from a worker
            link.count_invalid()


async def evict_silent_workers(app: web.Application) -> AsyncIterator[None]:
    """Background task: close the connection of a worker silent for ``worker_timeout``
    (workers connected here: another server of a cluster watches its own)."""
    cfg, registry = app[CONFIG], app[REGISTRY]

    async def sweep() -> None:
        while True:
            await asyncio.sleep(min(1.0, cfg.worker_timeout / 3))
            now = time.monotonic()
            for worker in registry.pool:
                if not worker.server and now - worker.last_heartbeat > cfg.worker_timeout:
                    log.warning("worker_evicted", worker_id=worker.id, reason="no heartbeat")
                    registry.leave(worker)
                    worker.link.close_soon("heartbeat timeout")

    task = asyncio.create_task(sweep())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
