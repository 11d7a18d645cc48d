"""The worker: dial out to the server, register, heartbeat, and serve proxied requests.

One WebSocket carries every request. Each request runs as its own task that replays it against
the backend through one keep-alive connection pool and streams the answer back as it comes.
A cancel from the server cancels that task, which closes the backend connection, so the backend
stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import aiohttp
import structlog

from llamapool import protocol
from llamapool.build import build_info
from llamapool.config import WorkConfig
from llamapool.errors import BackendError, ConfigError, ProtocolError
from llamapool.headers import CLIENT_ONLY, RECOMPUTED, forwardable
from llamapool.plugin_api import Backend
from llamapool.protocol import (
    FEATURE_BINARY_FRAMES,
    FEATURE_MODELS_UPDATE,
    FEATURES,
    FRAME_REQUEST_BODY,
    FRAME_RESPONSE_CHUNK,
    PROTOCOL_VERSION,
    Cancel,
    Heartbeat,
    ModelsUpdate,
    ProxyRequest,
    Register,
    Registered,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    WireError,
)

log = structlog.get_logger("llamapool.worker")

#: Request headers the worker never passes on: the client's side of the server, plus
#: Accept-Encoding, because the worker asks its backend for identity-encoded bytes.
_NOT_TO_BACKEND = CLIENT_ONLY | {"accept-encoding"}
_CLOSE_POLICY = 1008
_MAX_MESSAGE = 64 * 1024 * 1024
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class Agent:
    """One worker process's link to the server."""

    def __init__(self, cfg: WorkConfig, backend: Backend, *, backend_name: str = "") -> None:
        self.cfg = cfg
        self.backend = backend
        self.backend_name = backend_name or type(backend).__name__
        self.models: list[str] = []
        #: Set while connected to a llamapool-py server that confirmed the registration.
        self.registered = asyncio.Event()
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._features: frozenset[str] = frozenset()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._awaiting_body: dict[str, ProxyRequest] = {}
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The keep-alive session every backend call goes through."""
        if self._http is None:
            raise RuntimeError("the agent is not running")
        return self._http

    async def run(self) -> None:
        """Serve until cancelled, reconnecting with capped exponential backoff and jitter."""
        await self.backend.start()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )
        try:
            async with aiohttp.ClientSession() as server_http:
                attempt = 0
                while True:
                    started = time.monotonic()
                    try:
                        await self._connection(server_http)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        log.warning("server_unreachable", url=self.cfg.server_url, error=str(exc))
                    if time.monotonic() - started > 30:
                        attempt = 0
                    delay = min(self.cfg.reconnect_max, 0.5 * 2**attempt)
                    attempt += 1
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            await self._http.close()
            self._http = None
            await self.backend.close()

    async def _connection(self, server_http: aiohttp.ClientSession) -> None:
        self.models = await self._list_models()
        async with server_http.ws_connect(
            self.cfg.server_url, max_msg_size=_MAX_MESSAGE, autoping=True
        ) as ws:
            self._ws = ws
            self._features = frozenset()
            await ws.send_str(protocol.encode(self._register()))
            heartbeat = asyncio.create_task(self._heartbeats(ws))
            log.info("worker_connected", url=self.cfg.server_url, models=len(self.models))
            try:
                reason = await self._receive(ws)
            finally:
                self.registered.clear()
                heartbeat.cancel()
                await self._cancel_jobs()
                self._ws = None
            if ws.close_code == _CLOSE_POLICY:
                raise ConfigError(
                    f"the server rejected this worker: {reason or 'policy violation'}"
                )
            log.warning("server_disconnected", code=ws.close_code, reason=reason)

    def _register(self) -> Register:
        info = build_info()
        return Register(
            worker_id=self.cfg.worker_id,
            worker_name=self.cfg.worker_name,
            worker_key=self.cfg.worker_key,
            models=self.models,
            max_concurrency=self.cfg.max_concurrency,
            version=info.version,
            build_sha=info.sha,
            build_date=info.date,
            backend=self.backend_name,
            protocol=PROTOCOL_VERSION,
            features=list(FEATURES),
            paths=sorted(self.backend.paths),
        )

    async def _list_models(self) -> list[str]:
        try:
            return sorted(set(await self.backend.list_models(self.http)))
        except BackendError as exc:
            log.error("backend_unreachable", backend=self.backend_name, error=str(exc))
            return []

    async def refresh_models(self) -> bool:
        """Re-read the backend's models; tell the server if they changed and it listens."""
        models = await self._list_models()
        if models == self.models:
            return False
        self.models = models
        if self._ws is not None and FEATURE_MODELS_UPDATE in self._features:
            await self._send(ModelsUpdate(models))
        return True

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await asyncio.sleep(self.cfg.heartbeat_interval)
                await ws.send_str(protocol.encode(Heartbeat(ts=int(time.time()))))

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> str:
        """Handle server messages until the socket closes; returns the close reason."""
        while True:
            msg = await ws.receive()
            if msg.type in _CLOSED:
                return str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
            if msg.type == aiohttp.WSMsgType.BINARY:
                self._on_frame(msg.data)
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                message = protocol.decode(msg.data)
            except ProtocolError as exc:
                log.warning("server_message_ignored", reason=str(exc))
                continue
            match message:
                case ProxyRequest(body_len=n) if n and FEATURE_BINARY_FRAMES in self._features:
                    self._awaiting_body[message.request_id] = message
                case ProxyRequest():
                    self._start(message, message.body)
                case Cancel(request_id=request_id):
                    self._awaiting_body.pop(request_id, None)
                    job = self._jobs.get(request_id)
                    if job is not None:
                        job.cancel()
                case Registered(features=features):
                    self._features = frozenset(features) & frozenset(FEATURES)
                    log.info("worker_registered", features=sorted(self._features))
                    self.registered.set()
                case _:
                    pass

    def _on_frame(self, frame: bytes) -> None:
        try:
            kind, request_id, payload = protocol.unpack_frame(frame)
        except ProtocolError as exc:
            log.warning("server_frame_ignored", reason=str(exc))
            return
        request = self._awaiting_body.pop(request_id, None)
        if kind == FRAME_REQUEST_BODY and request is not None:
            self._start(request, bytes(payload))

    def _start(self, request: ProxyRequest, body: bytes) -> None:
        task = asyncio.create_task(self._serve(request, body))
        self._jobs[request.request_id] = task
        task.add_done_callback(lambda _: self._jobs.pop(request.request_id, None))

    async def _serve(self, request: ProxyRequest, body: bytes) -> None:
        """Replay one request against the backend and stream the answer back."""
        rid = request.request_id
        if request.path not in self.backend.paths:
            await self._fail(rid, "unsupported_path", f"backend cannot serve {request.path}")
            return
        headers = forwardable(request.headers.items(), _NOT_TO_BACKEND)
        headers.update(self.backend.auth_headers())
        headers["Accept-Encoding"] = "identity"
        try:
            url = self.backend.upstream_url(request.path)
            async with self.http.request(request.method, url, data=body, headers=headers) as resp:
                await self._send(
                    ResponseHeaders(rid, resp.status, forwardable(resp.headers.items(), RECOMPUTED))
                )
                async for chunk in resp.content.iter_any():
                    await self._send_chunk(rid, chunk)
        except (aiohttp.ClientError, TimeoutError, BackendError) as exc:
            log.warning("backend_request_failed", path=request.path, error=str(exc))
            await self._fail(rid, "backend_error", str(exc) or type(exc).__name__)
            return
        except Exception as exc:  # never leave the server waiting on a request
            log.exception("backend_request_crashed", path=request.path)
            await self._fail(rid, "worker_error", f"{type(exc).__name__}: {exc}")
            return
        await self._send(ResponseEnd(rid))

    async def _fail(self, request_id: str, code: str, message: str) -> None:
        await self._send(ResponseEnd(request_id, WireError(code=code, message=message)))

    async def _send_chunk(self, request_id: str, chunk: bytes) -> None:
        ws = self._ws
        if ws is None:  # the connection is gone; _cancel_jobs is about to stop this job
            return
        if FEATURE_BINARY_FRAMES in self._features:
            await ws.send_bytes(protocol.pack_frame(FRAME_RESPONSE_CHUNK, request_id, chunk))
        else:
            await ws.send_str(protocol.encode(ResponseChunk(request_id, chunk)))

    async def _send(self, message: Any) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(protocol.encode(message))

    async def _cancel_jobs(self) -> None:
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._awaiting_body.clear()
