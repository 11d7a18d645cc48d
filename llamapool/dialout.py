"""Dialing out to the server: the connection loop a worker and an MCP relay share.

Both sit on a private machine and reach the server through one outbound WebSocket, so both
need the same things from it. Reconnect forever, with capped exponential backoff and jitter
(reset after a connection that lasted); given the URLs of several servers (a cluster), each
attempt after a failed one or a dropped link goes to the next URL, round-robin. Bound the
handshake and notice a server gone silent (WebSocket pings: a black-holed path closes nothing
by itself). Send a heartbeat every ``heartbeat_interval``. And read a close the way the server
means it: only a refused key (1008 ``unauthorized``) ends the loop, with an error; a refused
register, an id in use, a full key, misbehaviour or a shutdown are all worth another try.

What travels over the socket is the :class:`Peer`'s business; the :class:`Dialer` owns the
socket's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
import attrs
import structlog

from llamapool import protocol
from llamapool.errors import ConfigError
from llamapool.protocol import (
    CLOSE_ID_IN_USE,
    CLOSE_KEY_FULL,
    CLOSE_POLICY,
    REASON_UNAUTHORIZED,
    Heartbeat,
    Message,
    Register,
)
from llamapool.tls import client_context
from llamapool.urls import without_credentials

log = structlog.get_logger("llamapool")

_MAX_MESSAGE = 64 * 1024 * 1024
_CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
#: A connection that lasted this long resets the reconnect backoff.
_STABLE = 30.0
#: Closes that refuse this peer for now, but may let it in later: logged as errors.
_REFUSED = (CLOSE_POLICY, CLOSE_ID_IN_USE, CLOSE_KEY_FULL)

Socket = aiohttp.ClientWebSocketResponse[bool]


class Peer(Protocol):
    """The side of a dial-out connection that knows what the messages mean."""

    #: ``worker`` or ``relay``: for log events and errors.
    role: str
    #: Set once the peer is draining: the connection that ends is the last one.
    draining: bool
    #: What went wrong last, for ``/status``; the dialer writes connection troubles here.
    last_error: str

    def register(self) -> Register:
        """The register message, made afresh for each connection."""
        ...

    async def on_connect(self, ws: Socket) -> None:
        """The register is sent; messages may follow."""
        ...

    async def on_text(self, text: str) -> None:
        """One text (JSON) message from the server."""
        ...

    async def on_binary(self, data: bytes) -> None:
        """One binary message (frame) from the server."""
        ...

    async def on_disconnect(self) -> None:
        """The connection ended: stop what depended on it."""
        ...


@attrs.frozen(kw_only=True)
class DialSettings:
    """Where and how to dial (the fields both commands' configs share)."""

    #: The servers' URLs, tried in turn.
    server_url: tuple[str, ...]
    server_timeout: float
    heartbeat_interval: float
    reconnect_max: float
    ca_file: str = ""
    tls_insecure: bool = False

    @classmethod
    def of(cls, config: object) -> DialSettings:
        """The dial settings of a command's config (``WorkConfig``, ``McpConfig``)."""
        return cls(**{f.name: getattr(config, f.name) for f in attrs.fields(cls)})


class Dialer:
    """Keeps one peer connected to the server."""

    def __init__(self, settings: DialSettings, peer: Peer) -> None:
        self.settings = settings
        self.peer = peer
        #: The URL being dialed, or connected to, as logs and ``/status`` show it (without
        #: the credentials it may hold).
        self.url = without_credentials(settings.server_url[0])
        #: The live socket, while connected.
        self.ws: Socket | None = None
        #: Unix time of the last heartbeat sent.
        self.last_heartbeat: float | None = None
        self._tls = client_context(ca_file=settings.ca_file, insecure=settings.tls_insecure)

    async def run(self) -> None:
        """Dial until the peer drains or the task is cancelled; :class:`ConfigError` when the
        server refuses the key.

        Every attempt after a failed one or a dropped link dials the next server URL, so a
        worker given a cluster's servers finds one that is up; the backoff is the same as for
        one URL, so a cluster that is down is not hammered."""
        s = self.settings
        # The whole handshake is bounded, up to the server's 101 (aiohttp lifts the read
        # bound once the socket is a WebSocket): a black-holed server never answers a SYN, and
        # one that accepts and then says nothing would hold the worker forever, never trying
        # the next URL.
        bound = s.server_timeout
        timeout = aiohttp.ClientTimeout(total=None, connect=bound, sock_read=bound)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            attempt = 0
            for url in itertools.cycle(s.server_url):
                self.url = without_credentials(url)
                started = time.monotonic()
                try:
                    await self._connection(http, url)
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    error = self._unreachable(exc)
                    self.peer.last_error = f"server unreachable: {error}"
                    log.warning("server_unreachable", url=self.url, error=error)
                if self.peer.draining:
                    return
                if time.monotonic() - started > _STABLE:
                    attempt = 0
                delay = min(s.reconnect_max, 0.5 * 2**attempt)
                attempt += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def send(self, message: Message) -> None:
        """Send a message if connected (best effort: the socket may be going)."""
        ws = self.ws
        if ws is None or ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(protocol.encode(message))

    async def close(self, code: int, reason: str) -> None:
        """Close the live connection (drain, a change the server learns only at register)."""
        if self.ws is not None:
            await self.ws.close(code=code, message=reason.encode())

    async def _connection(self, http: aiohttp.ClientSession, url: str) -> None:
        s = self.settings
        if s.tls_insecure and url.startswith(("wss:", "https:")):
            log.warning("tls_verification_disabled", url=self.url)
        # aiohttp pings after two thirds of the timeout without a message and gives the pong
        # the last third: a server gone silent is noticed within server_timeout.
        async with http.ws_connect(
            url,
            max_msg_size=_MAX_MESSAGE,
            autoping=True,
            heartbeat=s.server_timeout * 2 / 3,
            ssl=self._tls,
        ) as ws:
            self.ws = ws
            await ws.send_str(protocol.encode(self.peer.register()))
            beating = asyncio.create_task(self._heartbeats(ws))
            try:
                await self.peer.on_connect(ws)
                reason = await self._receive(ws)
            finally:
                self.ws = None
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
                await self.peer.on_disconnect()
            self._closed(ws.close_code, reason)

    def _unreachable(self, exc: BaseException) -> str:
        """What went wrong dialing, in words: no object reprs (aiohttp's own message names
        the SSL context it was given, even for ws://) and no credentials."""
        match exc:
            case asyncio.TimeoutError():
                return f"no answer within {self.settings.server_timeout:g}s"
            case aiohttp.ClientConnectorError(os_error=error):  # TLS errors included
                reason = error.strerror or str(error) or type(exc).__name__
                return f"cannot connect to {exc.host}:{exc.port}: {reason}"
            case aiohttp.WSServerHandshakeError():
                return f"the server answered the WebSocket handshake with HTTP {exc.status}"
        return without_credentials(str(exc) or type(exc).__name__)

    def _closed(self, code: int | None, reason: str) -> None:
        role = self.peer.role
        if code == CLOSE_POLICY and reason == REASON_UNAUTHORIZED:
            raise ConfigError(f"the server rejected this {role}: {reason}")
        if reason:
            self.peer.last_error = f"the server closed the connection ({code}): {reason}"
        if code in _REFUSED:
            log.error(f"{role}_refused", url=self.url, code=code, reason=reason)
        else:
            log.warning("server_disconnected", url=self.url, code=code, reason=reason)

    async def _heartbeats(self, ws: Socket) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not ws.closed:
                await ws.send_str(protocol.encode(Heartbeat(ts=int(time.time()))))
                self.last_heartbeat = time.time()
                await asyncio.sleep(self.settings.heartbeat_interval)

    async def _receive(self, ws: Socket) -> str:
        """Hand every message to the peer until the socket closes; the close reason."""
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.ERROR:  # e.g. no pong: the link is dead
                return str(msg.data)
            if msg.type in _CLOSED:
                return str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
            if msg.type == aiohttp.WSMsgType.TEXT:
                await self.peer.on_text(str(msg.data))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await self.peer.on_binary(bytes(msg.data))


@contextlib.asynccontextmanager
async def draining_on_signals(
    running: asyncio.Future[None], drain: Callable[[], Awaitable[object]], *, timeout: float
) -> AsyncIterator[None]:
    """While the block runs, SIGINT and SIGTERM stop ``running`` the way a dial-out peer
    stops: the first drains (``drain()``, then stop), a second stops at once, and with a
    drain ``timeout`` of 0 the first already does."""
    draining: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        await drain()
        running.cancel()

    def on_signal() -> None:
        if draining or timeout == 0:
            running.cancel()
        else:
            draining.append(asyncio.ensure_future(drain_then_stop()))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for task in draining:
            task.cancel()
