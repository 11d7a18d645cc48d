"""The worker: dial out to the server, register, heartbeat, probe the backend, serve requests.

One WebSocket carries every request (:mod:`llamapool.worker.jobs` runs them); a
:class:`~llamapool.dialout.Dialer` keeps it connected (backoff, heartbeats, dead links, close
codes). The worker keeps probing its backend, each check bounded by ``probe_interval``; it
dials as soon as the first check answered or :data:`FIRST_CHECK_GRACE` passed, so a backend
that is down or hangs never keeps it off the server:
while the backend is down it tells the server it cannot serve, and when the backend's models
change it says so. On drain it stops taking requests, lets those in flight finish, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
import structlog

from llamapool import protocol
from llamapool.build import build_info
from llamapool.config import WorkConfig
from llamapool.dialout import Dialer, DialSettings, Socket
from llamapool.errors import BackendError, LlamapoolError, PluginError, ProtocolError
from llamapool.plugin_api import Backend
from llamapool.protocol import (
    FEATURE_BINARY_FRAMES,
    FEATURE_MODELS_UPDATE,
    FEATURE_STATUS_UPDATE,
    FEATURES,
    FRAME_REQUEST_BODY,
    FRAME_RESPONSE_CHUNK,
    PROTOCOL_VERSION,
    STATUS_DRAINING,
    STATUS_NOT_READY,
    STATUS_READY,
    Cancel,
    Credit,
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
from llamapool.server.validate import MAX_MODEL, valid_model
from llamapool.urls import without_credentials
from llamapool.worker.jobs import Jobs
from llamapool.worker.metrics import WorkerMetrics

log = structlog.get_logger("llamapool.worker")
T = TypeVar("T")

#: Seconds the worker waits for its backend's first check before dialing anyway. A backend
#: that answers in time registers with its models (a Go server learns models only at
#: register); a slower one, or one that hangs, sends them later, when its check answers.
FIRST_CHECK_GRACE = 2.0


class Agent:
    """One worker process's link to the server: the :class:`~llamapool.dialout.Peer` of a
    dialer that keeps it connected."""

    role = "worker"

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
        #: Set while connected to a llamapool-py server that confirmed the registration.
        self.registered = asyncio.Event()
        self.connected = False
        self.dialer = Dialer(DialSettings.of(cfg), self)
        self._features: frozenset[str] = frozenset()
        self._awaiting_body: dict[str, ProxyRequest] = {}
        self._http: aiohttp.ClientSession | None = None
        #: The status last sent on this connection: only a change is sent again.
        self._status_sent = ""
        #: Set once the backend was checked (whatever the answer).
        self._checked = asyncio.Event()

    @property
    def last_heartbeat(self) -> float | None:
        """Unix time of the last heartbeat sent to the server."""
        return self.dialer.last_heartbeat

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
        try:
            await self.backend.start()
        except LlamapoolError:
            raise
        except Exception as exc:  # a bug of the plugin's: one line, not a traceback
            raise plugin_failed(self.backend_name, exc) from None
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )
        probe = asyncio.create_task(self._probe_forever())
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await _within(self._checked.wait(), FIRST_CHECK_GRACE)
            await self.dialer.run()
        finally:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            await self.jobs.cancel_all()
            await self._http.close()
            self._http = None
            await self.backend.close()

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
        await self.dialer.close(1001, "worker draining")
        return finished

    # --- Peer: the server connection --------------------------------------------------------

    async def on_connect(self, ws: Socket) -> None:
        self._features = frozenset()
        self._status_sent = ""
        self.connected = True
        self.metrics.connected_to_server.set(1)
        log.info("worker_connected", url=self.dialer.url, models=len(self.models))

    async def on_disconnect(self) -> None:
        self.connected = False
        self.metrics.connected_to_server.set(0)
        self.registered.clear()
        await self.jobs.cancel_all()
        self._awaiting_body.clear()

    def register(self) -> Register:
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

    async def on_text(self, text: str) -> None:
        """A request, credit, a cancel, or the answer to the register."""
        try:
            message = protocol.decode(text)
        except ProtocolError as exc:
            log.warning("server_message_ignored", reason=str(exc))
            return
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

    async def on_binary(self, frame: bytes) -> None:
        """The body of a request announced just before."""
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
        await self.dialer.send(message)

    async def send_chunk(self, request_id: str, chunk: bytes) -> None:
        ws = self.dialer.ws
        if ws is None:  # the connection is gone; cancel_all is about to stop this job
            return
        if FEATURE_BINARY_FRAMES in self._features:
            await ws.send_bytes(protocol.pack_frame(FRAME_RESPONSE_CHUNK, request_id, chunk))
        else:
            await ws.send_str(protocol.encode(ResponseChunk(request_id, chunk)))

    # --- the backend --------------------------------------------------------------------------

    async def probe(self) -> None:
        """Check the backend; tell the server when its health or its models changed.

        A check that has no answer within ``probe_interval`` counts as the backend down: a
        hung backend must not freeze the model list (the next check would wait behind it).
        """
        interval = self.cfg.probe_interval
        try:
            models = sorted(set(await _within(self.backend.list_models(self.http), interval)))
        except (BackendError, asyncio.TimeoutError) as exc:
            error = str(exc) or f"{self.backend.base_url} did not answer within {interval:g}s"
            await self._backend_down(without_credentials(error))
            return
        except Exception as exc:  # a bug of the plugin's: the backend counts as down, the
            error = f"the {self.backend_name} plugin failed: {type(exc).__name__}: {exc}"
            await self._backend_down(without_credentials(error), exc)  # worker lives on
            return
        was_up = self.backend_up
        self._set_backend(up=True)
        # An id the server would refuse (too long, with spaces) would get the whole worker
        # refused at every reconnect: it is left out, and said once per change of the list.
        servable = [m for m in models if valid_model(m)]
        if servable != self.models:
            if len(servable) < len(models):
                log.warning(
                    "backend_models_skipped",
                    count=len(models) - len(servable),
                    reason=f"not servable ids (at most {MAX_MODEL} printable characters)",
                )
            models = self.models = servable
            log.info("backend_models_changed", models=len(models))
            if self.dialer.ws is not None:
                await self._announce_models()
        if not was_up:
            log.info("backend_up", backend=self.backend_name, models=len(models))
            await self._send_status()

    async def _backend_down(self, error: str, exc: Exception | None = None) -> None:
        """Say so once (with the traceback of a plugin's bug), until the backend is back."""
        if self.backend_up or not self.last_error.startswith("backend"):
            log.error("backend_unreachable", backend=self.backend_name, error=error, exc_info=exc)
        self.last_error = f"backend: {error}"
        self._set_backend(up=False)
        await self._send_status()

    def _set_backend(self, *, up: bool) -> None:
        self.backend_up = up
        self.metrics.set_backend_up(up)

    async def _announce_models(self) -> None:
        if FEATURE_MODELS_UPDATE in self._features:
            await self.send(ModelsUpdate(self.models))
        else:  # a Go server learns models only at register: re-register
            await self.dialer.close(1000, "models changed")

    async def _send_status(self) -> None:
        """Tell the server whether the worker takes requests, when that changed: a backend
        that stays down is checked again and again, and is news once."""
        if FEATURE_STATUS_UPDATE not in self._features:
            return
        if self.draining:
            status = STATUS_DRAINING
        else:
            status = STATUS_READY if self.backend_up else STATUS_NOT_READY
        if status != self._status_sent:
            self._status_sent = status
            await self.send(StatusUpdate(status))

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            self._checked.set()
            await asyncio.sleep(self.cfg.probe_interval)


def plugin_failed(plugin: str, exc: Exception) -> PluginError:
    """A plugin's own bug at start, as one line (without the credentials it may quote)."""
    return PluginError(
        without_credentials(f"the {plugin} plugin failed to start: {type(exc).__name__}: {exc}")
    )


async def _within(awaitable: Awaitable[T], timeout: float) -> T:
    """What ``awaitable`` gives, or :class:`asyncio.TimeoutError` after ``timeout`` seconds.

    Not ``asyncio.wait_for``: before Python 3.12 it loses a cancel that comes as the awaitable
    finishes, and a worker told to stop would go on probing.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        task.cancel()  # nothing to do once it is done
    if not done:
        raise asyncio.TimeoutError
    return task.result()
