"""The server's side of one worker's WebSocket: send requests, route what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import attrs
import structlog
from aiohttp import web

from llamapool import protocol
from llamapool.errors import ProtocolError
from llamapool.protocol import (
    CLOSE_GOING_AWAY,
    FRAME_REQUEST_BODY,
    FRAME_RESPONSE_CHUNK,
    Cancel,
    Credit,
    ProxyRequest,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
)
from llamapool.server.exchange import Broken, Ended, Exchange

log = structlog.get_logger("llamapool.server")

#: Messages that could never be valid, tolerated per :data:`INVALID_WINDOW` seconds before
#: the worker is disconnected: a rate, so a long-lived worker never adds up to it by chance.
MAX_INVALID = 100
INVALID_WINDOW = 60.0
#: Response bytes a flow-controlled worker may send ahead of what the client has read.
FLOW_WINDOW = 1024 * 1024
#: Response bytes held for a slow client of a worker without flow control (a Go worker).
UNCONTROLLED_BUFFER = 8 * 1024 * 1024
#: With binary frames, a request body up to this size still rides in the request message:
#: one frame and one write instead of two cost less than the base64 of a few KiB (every
#: llamapool-py worker takes either).
INLINE_BODY = 16 * 1024


class WorkerLink:
    """Requests in flight on one worker connection, by wire request id.

    Wire ids are this link's sequence numbers (``"1"``, ``"2"``, ...), so telling a late
    message from garbage costs no memory: a message for a request that is no longer in flight
    is *late* when its id is one this link once sent (the worker had not yet seen the cancel,
    or finished as the client left), which is harmless and expected; any other id could
    never have been valid.
    """

    def __init__(self, ws: web.WebSocketResponse, *, binary: bool, flow: bool = False) -> None:
        self.ws = ws
        self.binary = binary
        #: The worker honours per-request credit (it sends at most what was granted).
        self.flow = flow
        self.exchanges: dict[str, Exchange] = {}
        #: Messages that could never be valid (too many per window and the worker is closed).
        self.invalid = 0
        #: Messages for requests this link sent but that are no longer in flight (harmless).
        self.late = 0
        #: Well-formed messages of a type this server does not know (ignored, counted).
        self.unknown = 0
        self._issued = 0
        self._window_start = 0.0
        self._window_invalid = 0
        self._closing: asyncio.Task[bool] | None = None
        #: Sends in flight that nobody awaits (cancels, credit), kept from the GC.
        self._cancelling: set[asyncio.Future[None]] = set()

    def open(self) -> Exchange:
        """A new request on this link, under the next wire id."""
        self._issued += 1
        request_id = str(self._issued)
        # A llamapool worker stays within its window; the limit leaves room for a peer that
        # overshoots it by a chunk (one backend read, sent whole).
        limit = 2 * FLOW_WINDOW + 1024 * 1024 if self.flow else UNCONTROLLED_BUFFER
        exchange = self.exchanges[request_id] = Exchange(
            request_id, limit=limit, on_overflow=self._overflowed
        )
        return exchange

    @property
    def ignored(self) -> int:
        """Every message dropped without effect: invalid, late or of an unknown type."""
        return self.invalid + self.late + self.unknown

    @property
    def misbehaving(self) -> bool:
        """More invalid messages in the current window than a working peer ever sends."""
        return self._window_invalid > MAX_INVALID

    def count_invalid(self) -> None:
        """One message that could never be valid (malformed, or a request never sent)."""
        now = time.monotonic()
        if now - self._window_start > INVALID_WINDOW:
            self._window_start, self._window_invalid = now, 0
        self._window_invalid += 1
        self.invalid += 1

    def _stray(self, request_id: str) -> None:
        """A message for a request not in flight: late if this link ever sent its id."""
        if (
            request_id.isascii()
            and request_id.isdigit()
            and not request_id.startswith("0")
            and len(request_id) <= 20
            and int(request_id) <= self._issued
        ):
            self.late += 1
        else:
            self.count_invalid()

    def _overflowed(self, request_id: str) -> None:
        """A stalled client's buffer is full: stop the worker now (the relay ends the response
        whenever the client reads again, or REQUEST_TIMEOUT does)."""
        self._background(self.cancel(request_id))

    @property
    def window(self) -> int:
        """The credit a new request starts with (0: no flow control)."""
        return FLOW_WINDOW if self.flow else 0

    def grant_soon(self, request_id: str, amount: int) -> None:
        """Let the worker send ``amount`` more bytes of a response. Sent from a task of its
        own: the caller may be this link's reader itself (a chunk written straight through),
        which must never wait on the socket. Once per half window, so rare."""
        self._background(self._send_credit(request_id, amount))

    async def _send_credit(self, request_id: str, amount: int) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(protocol.encode(Credit(request_id, amount)))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    def forget(self, request_id: str) -> None:
        self.exchanges.pop(request_id, None)

    async def send_request(self, request: ProxyRequest, body: bytes) -> None:
        """Send a request; with binary frames a body past :data:`INLINE_BODY` follows raw,
        never base64."""
        if self.binary and len(body) > INLINE_BODY:
            request = attrs.evolve(request, window=self.window, body_len=len(body))
            await self.ws.send_str(protocol.encode(request))
            await self.ws.send_bytes(
                protocol.pack_frame(FRAME_REQUEST_BODY, request.request_id, body)
            )
        else:
            request = attrs.evolve(request, window=self.window, body=body)
            await self.ws.send_str(protocol.encode(request))

    async def cancel(self, request_id: str) -> None:
        """Tell the worker to abort a request (best effort: the socket may be gone)."""
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(protocol.encode(Cancel(request_id)))

    def dispatch(self, message: ResponseHeaders | ResponseChunk | ResponseEnd) -> None:
        """Route a response message to its request (one for a request no longer in flight is
        dropped: see :meth:`_stray`)."""
        exchange = self.exchanges.get(message.request_id)
        if exchange is None:
            self._stray(message.request_id)
            return
        match message:
            case ResponseHeaders():
                exchange.push(message)
            case ResponseChunk(data=data):
                exchange.push(data)
            case ResponseEnd(error=error):
                exchange.push(Ended(error))

    def dispatch_frame(self, frame: bytes) -> None:
        """Route a binary response chunk to its request."""
        try:
            kind, request_id, payload = protocol.unpack_frame(frame)
        except ProtocolError:
            self.count_invalid()
            return
        if kind != FRAME_RESPONSE_CHUNK:
            self.count_invalid()
            return
        exchange = self.exchanges.get(request_id)
        if exchange is None:
            self._stray(request_id)
            return
        exchange.push(payload)

    def break_all(self, reason: str) -> None:
        """End every request in flight: the worker is gone."""
        for exchange in self.exchanges.values():
            exchange.push(Broken(reason))
        self.exchanges.clear()

    def close_soon(self, reason: str, *, code: int = CLOSE_GOING_AWAY) -> None:
        """Close the socket without waiting (eviction, replacement, shutdown, misbehaviour)."""
        if self._closing is None and not self.ws.closed:
            self._closing = asyncio.ensure_future(
                self.ws.close(code=code, message=reason.encode()[:120])
            )
