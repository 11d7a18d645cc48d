"""The worker: dial out to the server, register, heartbeat, probe the backend, serve requests.

One WebSocket carries every request (:mod:`llamapool.worker.jobs` runs them). The worker
reconnects forever with capped exponential backoff and jitter, and keeps probing its backend:
while the backend is down it tells the server it cannot serve, and when the backend's models
change it says so. On drain it stops taking requests, lets those in flight finish, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time

import aiohttp
import structlog

from llamapool import protocol
from llamapool.build import build_info
from llamapool.config import WorkConfig
from llamapool.errors import BackendError, ConfigError, ProtocolError
from llamapool.plugin_api import Backend
from llamapool.protocol import (
    CLOSE_ID_IN_USE,
    CLOSE_POLICY,
    FEATURE_BINARY_FRAMES,
    FEATURE_MODELS_UPDATE,
    FEATURE_STATUS_UPDATE,
    FEATURES,
    FRAME_REQUEST_BODY,
    FRAME_RESPONSE_CHUNK,
    PROTOCOL_VERSION,
    REASON_UNAUTHORIZED,
    STATUS_DRAINING,
    STATUS_NOT_READY,
    STATUS_READY,
    Cancel,
    Credit,
    Heartbeat,
    Message,
    ModelsUpdate,
    ProxyRequest,
    Register,
    Registered,
    ResponseChunk,
    ResponseEnd,
    StatusUpdate,
    WireError,
)
from llamapool.tls import client_context
from llamapool.worker.jobs import Jobs
from llamapool.worker.metrics import WorkerMetrics

log = structlog.get_logger("llamapool.worker")

_MAX_MESSAGE = 64 * 1024 * 1024
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
#: A connection that lasted this long resets the reconnect backoff.
_STABLE = 30.0


class Agent:
    """One worker process's link to the server."""

    def __init__(self, cfg: WorkConfig, backend: Backend, *, backend_name: str = "") -> None:
        self.cfg = cfg
        self.backend = backend
        self.backend_name = backend_name or type(backend).__name__
        self.build = build_info()
        #: Proves to the server that a re-registration comes from this very process.
        self.instance = secrets.token_urlsafe(24)
        self.metrics = WorkerMetrics(self.build, max_concurrency=cfg.max_concurrency)
        self.jobs = Jobs(backend, lambda: self.http, self.metrics)
        self.models: list[str] = []
        self.backend_up = False
        self.draining = False
        self.last_error = ""
        self.last_heartbeat: float | None = None
        #: Set while connected to a llamapool-py server that confirmed the registration.
        self.registered = asyncio.Event()
        self.connected = False
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._features: frozenset[str] = frozenset()
        self._awaiting_body: dict[str, ProxyRequest] = {}
        self._http: aiohttp.ClientSession | None = None
        self._tls = client_context(ca_file=cfg.ca_file, insecure=cfg.tls_insecure)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The keep-alive session every backend call goes through."""
        if self._http is None:
            raise RuntimeError("the agent is not running")
        return self._http

    @property
    def state(self) -> str:
        """One word for ``/status``: draining, connected, not_ready, or connecting."""
        if self.draining:
            return "draining"
        if not self.connected:
            return "connecting"
        return "connected" if self.backend_up else "not_ready"

    async def run(self) -> None:
        """Serve until cancelled (or drained), reconnecting with backoff and jitter."""
        await self.backend.start()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )
        probe = asyncio.create_task(self._probe_forever())
        try:
            await self.probe()
            # The handshake is bounded too: a black-holed server never answers a SYN.
            timeout = aiohttp.ClientTimeout(total=None, connect=self.cfg.server_timeout)
            async with aiohttp.ClientSession(timeout=timeout) as server_http:
                attempt = 0
                while True:
                    started = time.monotonic()
                    try:
                        await self._connection(server_http)
                    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                        self.last_error = f"server unreachable: {exc}"
                        log.warning("server_unreachable", url=self.cfg.server_url, error=str(exc))
                    if self._drained():
                        break
                    if time.monotonic() - started > _STABLE:
                        attempt = 0
                    delay = min(self.cfg.reconnect_max, 0.5 * 2**attempt)
                    attempt += 1
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await self.jobs.cancel_all()
            await self._http.close()
            self._http = None
            await self.backend.close()

    def _drained(self) -> bool:
        return self.draining

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, let those in flight finish, then disconnect.

        ``timeout`` 0 stops at once, -1 waits as long as it takes. Returns whether every
        request finished.
        """
        self.draining = True
        log.info("worker_draining", jobs=len(self.jobs), timeout=timeout)
        await self._send_status()
        finished = await self.jobs.wait_idle(None if timeout < 0 else timeout)
        if not finished:
            log.warning("drain_timeout", jobs=len(self.jobs))
        ws = self._ws
        if ws is not None:
            await ws.close(code=1001, message=b"worker draining")
        return finished

    # --- the server connection ----------------------------------------------------------------

    async def _connection(self, server_http: aiohttp.ClientSession) -> None:
        if self.cfg.tls_insecure and self.cfg.server_url.startswith(("wss:", "https:")):
            log.warning("tls_verification_disabled", url=self.cfg.server_url)
        # aiohttp pings after two thirds of the timeout without a message and gives the pong
        # the last third: a server gone silent is noticed within server_timeout.
        async with server_http.ws_connect(
            self.cfg.server_url,
            max_msg_size=_MAX_MESSAGE,
            autoping=True,
            heartbeat=self.cfg.server_timeout * 2 / 3,
            ssl=self._tls,
        ) as ws:
            self._ws, self._features = ws, frozenset()
            await ws.send_str(protocol.encode(self._register()))
            heartbeat = asyncio.create_task(self._heartbeats(ws))
            self.connected = True
            self.metrics.connected_to_server.set(1)
            log.info("worker_connected", url=self.cfg.server_url, models=len(self.models))
            try:
                reason = await self._receive(ws)
            finally:
                self.connected = False
                self.metrics.connected_to_server.set(0)
                self.registered.clear()
                heartbeat.cancel()
                await self.jobs.cancel_all()
                self._awaiting_body.clear()
                self._ws = None
            code = ws.close_code
            if code == CLOSE_POLICY and reason == REASON_UNAUTHORIZED:
                raise ConfigError(f"the server rejected this worker: {reason}")
            if reason:
                self.last_error = f"the server closed the connection ({code}): {reason}"
            if code in (CLOSE_POLICY, CLOSE_ID_IN_USE):  # refused, but may be let in later
                log.error("worker_refused", code=code, reason=reason)
            else:
                log.warning("server_disconnected", code=code, reason=reason)

    def _register(self) -> Register:
        return Register(
            worker_id=self.cfg.worker_id,
            worker_name=self.cfg.worker_name,
            worker_key=self.cfg.worker_key,
            models=self.models,
            max_concurrency=self.cfg.max_concurrency,
            version=self.build.version,
            build_sha=self.build.sha,
            build_date=self.build.date,
            backend=self.backend_name,
            protocol=PROTOCOL_VERSION,
            features=list(FEATURES),
            paths=sorted(self.jobs.paths),
            instance=self.instance,
        )

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await ws.send_str(protocol.encode(Heartbeat(ts=int(time.time()))))
                self.last_heartbeat = time.time()
                await asyncio.sleep(self.cfg.heartbeat_interval)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> str:
        """Handle server messages until the socket closes; returns the close reason."""
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.ERROR:  # e.g. no pong: the link is dead
                return str(msg.data)
            if msg.type in _CLOSED:
                return str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
            if msg.type == aiohttp.WSMsgType.BINARY:
                await self._on_frame(msg.data)
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
                    await self._start(message, message.body)
                case Credit(request_id=request_id, bytes=amount):
                    self.jobs.grant(request_id, amount)
                case Cancel(request_id=request_id):
                    self._awaiting_body.pop(request_id, None)
                    self.jobs.cancel(request_id)
                case Registered(features=features):
                    self._features = frozenset(features) & frozenset(FEATURES)
                    log.info("worker_registered", features=sorted(self._features))
                    await self._send_status()
                    self.registered.set()
                case _:
                    pass

    async def _on_frame(self, frame: bytes) -> None:
        try:
            kind, request_id, payload = protocol.unpack_frame(frame)
        except ProtocolError as exc:
            log.warning("server_frame_ignored", reason=str(exc))
            return
        request = self._awaiting_body.pop(request_id, None)
        if kind == FRAME_REQUEST_BODY and request is not None:
            await self._start(request, bytes(payload))

    async def _start(self, request: ProxyRequest, body: bytes) -> None:
        if self.draining:  # the server stops routing here at once; this one crossed it
            error = WireError(code="draining", message="the worker is draining")
            await self.send(ResponseEnd(request.request_id, error))
            return
        self.jobs.start(request, body, self)

    # --- Outbox: what jobs send -------------------------------------------------------------

    async def send(self, message: Message) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(protocol.encode(message))

    async def send_chunk(self, request_id: str, chunk: bytes) -> None:
        ws = self._ws
        if ws is None:  # the connection is gone; cancel_all is about to stop this job
            return
        if FEATURE_BINARY_FRAMES in self._features:
            await ws.send_bytes(protocol.pack_frame(FRAME_RESPONSE_CHUNK, request_id, chunk))
        else:
            await ws.send_str(protocol.encode(ResponseChunk(request_id, chunk)))

    # --- the backend --------------------------------------------------------------------------

    async def probe(self) -> None:
        """Check the backend; tell the server when its health or its models changed."""
        try:
            models = sorted(set(await self.backend.list_models(self.http)))
        except BackendError as exc:
            if self.backend_up or not self.last_error.startswith("backend"):
                log.error("backend_unreachable", backend=self.backend_name, error=str(exc))
            self.last_error = f"backend: {exc}"
            self._set_backend(up=False)
            await self._send_status()
            return
        was_up = self.backend_up
        self._set_backend(up=True)
        if models != self.models:
            self.models = models
            log.info("backend_models_changed", models=len(models))
            if self._ws is not None:
                await self._announce_models()
        if not was_up:
            log.info("backend_up", backend=self.backend_name, models=len(models))
            await self._send_status()

    def _set_backend(self, *, up: bool) -> None:
        self.backend_up = up
        self.metrics.set_backend_up(up)

    async def _announce_models(self) -> None:
        if FEATURE_MODELS_UPDATE in self._features:
            await self.send(ModelsUpdate(self.models))
        elif self._ws is not None:  # a Go server learns models only at register: re-register
            await self._ws.close(code=1000, message=b"models changed")

    async def _send_status(self) -> None:
        if FEATURE_STATUS_UPDATE not in self._features:
            return
        if self.draining:
            status = STATUS_DRAINING
        else:
            status = STATUS_READY if self.backend_up else STATUS_NOT_READY
        await self.send(StatusUpdate(status))

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.probe_interval)
            await self.probe()
