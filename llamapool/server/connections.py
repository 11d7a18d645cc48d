"""The HTTP connection layer: client connections counted at accept, deadlines for slow ones,
and quiet, bounded logs about hostile ones.

aiohttp reads request headers for as long as a client cares to send them, counts nothing
until a request is complete, and logs each malformed request with a traceback. Against a few
thousand connections that trickle a byte every few seconds (slowloris), that means: out of
file descriptors, no answer for anyone, and a disk filling with tracebacks.
:class:`ConnectionGuard` holds the count; :func:`make_runner` builds an ``AppRunner`` whose
connections report to it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import orjson
import structlog
from aiohttp import web
from aiohttp.http import WebSocketReader
from aiohttp.streams import StreamReader

from llamapool.config import ServeConfig
from llamapool.log import Throttle
from llamapool.server.appkeys import STATE
from llamapool.server.http_errors import error_response, flavor_for
from llamapool.server.resources import release_memory, unlink_transport

log = structlog.get_logger("llamapool.server")

#: Seconds a refused connection stays half-open so its client reads the 503 before the close.
REFUSAL_LINGER = 1.0
#: Refused connections lingering at once; past that, they are closed right after the 503.
MAX_LINGERING = 64
#: Closed connections after which freed memory is handed back (see ``release_memory``), and
#: the seconds to wait for the burst to end, and between two releases.
RELEASE_AFTER = 1000
RELEASE_DELAY = 1.0
RELEASE_INTERVAL = 30.0

_OVERLOADED_BODY = orjson.dumps(
    {
        "error": {
            "message": "the server has too many open connections; retry shortly",
            "type": "server_error",
            "code": "overloaded",
        }
    }
)
#: The whole answer to a connection over the cap, written before its request is even read.
OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n" % len(_OVERLOADED_BODY)
) + _OVERLOADED_BODY


def _nothing() -> None:
    pass


class ConnectionGuard:
    """The client connections of a server: how many are open, and which are waiting for
    request headers, oldest first.

    The cap on client connections holds at accept, because a connection costs a file
    descriptor and memory whether or not it ever completes a request. When it is reached,
    room is made by closing the connection that has waited longest for request headers: a new
    one that has not sent them yet (a slowloris is one of those), or an idle keep-alive one
    between requests. A connection whose request has arrived is never cut for a newcomer, so a
    normal client's complete request is still served; only when every connection is busy with
    a request is the newcomer refused, with a 503.

    A connection that becomes a worker WebSocket leaves the guard: workers are bounded by
    ``max_workers`` on their own.
    """

    def __init__(
        self,
        limit: int,
        *,
        on_refused: Callable[[], None] = _nothing,
        throttle: Throttle | None = None,
    ) -> None:
        self.limit = limit
        self._on_refused = on_refused
        #: One line per kind of trouble and interval: hostile peers cause it at will.
        self.throttle = throttle if throttle is not None else Throttle()
        self._open: set[GuardedRequestHandler] = set()
        #: Dicts keep insertion order: the first key has waited longest.
        self._waiting: dict[GuardedRequestHandler, None] = {}
        self._lingering: set[GuardedRequestHandler] = set()
        self._closed = 0
        self._release: asyncio.TimerHandle | None = None
        self._released_at = -RELEASE_INTERVAL

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._open)

    def is_waiting(self, conn: GuardedRequestHandler) -> bool:
        return conn in self._waiting

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """A connection was accepted: count it, closing the longest-waiting one to make room
        if needed. ``False``: no room, refuse it."""
        while len(self._open) >= self.limit and self._waiting:
            oldest = next(iter(self._waiting))
            self.closed(oldest)
            oldest.shed()
            self.throttle.log(log.warning, "connection_shed", reason="max_connections")
        if len(self._open) >= self.limit:
            self._on_refused()
            self.throttle.log(log.warning, "connection_refused", reason="max_connections")
            return False
        self._open.add(conn)
        self._waiting[conn] = None
        return True

    def lingers(self, conn: GuardedRequestHandler) -> bool:
        """A refused connection wants to stay half-open a moment; ``False``: too many do."""
        if len(self._lingering) >= MAX_LINGERING:
            return False
        self._lingering.add(conn)
        return True

    def headers_received(self, conn: GuardedRequestHandler) -> None:
        """A request's headers are complete: the connection is busy, not to be shed."""
        self._waiting.pop(conn, None)

    def response_sent(self, conn: GuardedRequestHandler) -> None:
        """The connection answered its requests and waits for the next one (or its close)."""
        if conn in self._open:
            self._waiting.pop(conn, None)
            self._waiting[conn] = None

    def became_worker(self, conn: GuardedRequestHandler) -> None:
        """The connection is a worker WebSocket now; ``max_workers`` bounds those."""
        self._open.discard(conn)
        self._waiting.pop(conn, None)

    def closed(self, conn: GuardedRequestHandler) -> None:
        """The connection is gone (idempotent)."""
        self._lingering.discard(conn)
        if conn in self._open:
            self._open.discard(conn)
            self._waiting.pop(conn, None)
            self._closed += 1
            if self._closed >= RELEASE_AFTER and self._release is None:
                loop = asyncio.get_running_loop()
                at = max(loop.time() + RELEASE_DELAY, self._released_at + RELEASE_INTERVAL)
                self._release = loop.call_at(at, self._release_memory)

    def _release_memory(self) -> None:
        self._release = None
        self._closed = 0
        self._released_at = asyncio.get_running_loop().time()
        release_memory()

    def stop(self) -> None:
        """The server stopped: no memory release is pending."""
        if self._release is not None:
            self._release.cancel()
            self._release = None


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, reporting to a :class:`ConnectionGuard`, with deadlines
    for request headers and bodies, and errors logged through the guard's throttle.

    The header deadline starts at accept, and on a kept-alive connection at the first byte of
    the next request (until then, ``keepalive_timeout`` bounds the wait). A body still coming
    when its headers end has ``body_timeout`` more to arrive whole: a handler reading it waits
    with no deadline of its own, and a connection busy with a request is never shed to make
    room, so without this a client could hold one forever by never finishing a body.
    """

    __slots__ = (
        "_body_deadline",
        "_body_timeout",
        "_deadline",
        "_guard",
        "_header_timeout",
        "_sock",
        "_ws_path",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        guard: ConnectionGuard,
        header_timeout: float,
        body_timeout: float,
        ws_path: str | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._ws_path = ws_path
        self._deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        #: The transport, also once aiohttp has let go of it, so a shed connection is closed
        #: at once even with unsent data (``abort``, not ``close``).
        self._sock: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sock = cast(asyncio.Transport, transport)
        if not self._guard.admit(self):
            self._refuse(self._sock)
            return
        super().connection_made(transport)
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        if self._payload_parser is not None or self._upgraded:
            super().data_received(data)
            return
        if data and self._deadline is None and self._guard.is_waiting(self):
            self._start_deadline()  # the first byte of a kept-alive connection's next request
        requests = self._request_count
        super().data_received(data)
        if requests != self._request_count:
            self._stop_deadline()
            self._guard.headers_received(self)
            # Only the last request parsed can have a body still coming: the parser reads
            # no request past an unfinished body.
            if self._messages and not self._messages[-1][1].is_eof():
                self._watch_body(self._messages[-1][1])

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """Called once per response, when it is sent."""
        super().log_access(request, response, time)
        if not self._messages:  # no complete request is queued behind it
            self._guard.response_sent(self)

    def set_parser(
        self, parser: WebSocketReader, data_received_cb: Callable[[], None] | None = None
    ) -> None:
        """Called when a WebSocket is accepted: a worker socket leaves the client count."""
        super().set_parser(parser, data_received_cb)
        request = self._current_request
        if request is not None and request.path == self._ws_path:
            self._guard.became_worker(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_deadline()
        self._stop_body_deadline()
        self._guard.closed(self)
        sock, self._sock = self._sock, None
        super().connection_lost(exc)
        if sock is not None:
            unlink_transport(sock)

    def shed(self) -> None:
        """Close now, to make room or past the header deadline; nothing is answered."""
        if self._sock is not None:
            self._sock.abort()
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (400), or a failure outside the application: a
        JSON error, and one log line per kind and interval, never with the request line (it
        may hold a key in its query string); a traceback only for a failure of ours (5xx)."""
        reason = type(exc).__name__ if exc is not None else HTTPStatus(status).phrase
        if status < 500:
            self._guard.throttle.log(log.warning, "bad_http_request", reason=reason, status=status)
        else:
            self._guard.throttle.log(
                log.error, "http_server_error", reason=reason, status=status, exc_info=exc
            )
        if request.writer.output_size > 0:  # as aiohttp's: the response started
            raise ConnectionError("the response has started, an error cannot be sent")
        text = "malformed HTTP request" if status == 400 else HTTPStatus(status).phrase
        code = "invalid_request" if status == 400 else None
        response = error_response(flavor_for(request.path), status, text, code=code)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other error reports (an exception escaping a handler, a handler without a
        response): a bug of ours, but one a client may trigger over and over."""
        exc = kw.get("exc_info")
        if isinstance(exc, web.RequestPayloadError):  # a body that did not decode: the client's
            reason = type(exc.__cause__ or exc).__name__
            self._guard.throttle.log(log.warning, "bad_http_request", reason=reason)
        elif isinstance(exc, BaseException):
            self._guard.throttle.log(
                log.error, "http_server_error", reason=type(exc).__name__, exc_info=exc
            )
        else:  # aiohttp's message is a constant format string; its arguments stay out
            reason = str(args[0])[:60] if args else "unknown"
            self._guard.throttle.log(log.error, "http_server_error", reason=reason)

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 without reading the request, and close; aiohttp never sees it."""
        self._manager = None  # connection_lost: nothing to tell aiohttp
        self._force_close = True  # data_received: ignore what the client sends
        transport.write(OVERLOADED)
        if transport.can_write_eof() and self._guard.lingers(self):
            # A close with the request unread would send a reset, which may destroy the 503
            # before the client reads it: let the client close first, or close in a moment.
            transport.write_eof()
            self._deadline = self._loop.call_later(REFUSAL_LINGER, transport.close)
        else:
            transport.close()

    def _start_deadline(self) -> None:
        self._deadline = self._loop.call_later(self._header_timeout, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._guard.is_waiting(self):
            self._guard.throttle.log(log.info, "slow_client_closed", reason="header_timeout")
            self._guard.closed(self)
            self.shed()

    def _watch_body(self, payload: StreamReader) -> None:
        self._stop_body_deadline()
        self._body_deadline = self._loop.call_later(self._body_timeout, self._body_too_slow)
        payload.on_eof(self._stop_body_deadline)

    def _stop_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _body_too_slow(self) -> None:
        self._body_deadline = None
        self._guard.throttle.log(log.info, "slow_client_closed", reason="body_timeout")
        self._guard.closed(self)
        self.shed()


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`GuardedRequestHandler` connections."""

    def __init__(
        self,
        plain: web.Server,
        *,
        guard: ConnectionGuard,
        header_timeout: float,
        body_timeout: float,
        ws_path: str | None,
    ) -> None:
        # The arguments aiohttp's Application put together for its own Server.
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self._guarded = functools.partial(
            GuardedRequestHandler,
            self,
            loop=self._loop,
            guard=guard,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            ws_path=ws_path,
            **self._kwargs,
        )

    def __call__(self) -> GuardedRequestHandler:
        return self._guarded()


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose connections report to a :class:`ConnectionGuard`."""

    __slots__ = ("_body_timeout", "_header_timeout", "_ws_path", "guard")

    def __init__(
        self,
        app: web.Application,
        *,
        guard: ConnectionGuard,
        header_timeout: float,
        body_timeout: float,
        ws_path: str | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._ws_path = ws_path

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain,
            guard=self.guard,
            header_timeout=self._header_timeout,
            body_timeout=self._body_timeout,
            ws_path=self._ws_path,
        )

    async def cleanup(self) -> None:
        await super().cleanup()
        self.guard.stop()


def make_runner(
    app: web.Application, cfg: ServeConfig, *, guard: ConnectionGuard | None = None
) -> GuardedRunner:
    """The runner ``llamapool serve`` serves ``app`` with: handler cancellation (a client that
    leaves cancels its request), no access log (the app logs each request), ``cfg``'s header,
    body (``request_timeout``) and keep-alive deadlines, and a guard (by default one of
    ``max_connections``, counting refusals in the app's rejections metric).
    """
    if guard is None:
        guard = ConnectionGuard(cfg.max_connections, on_refused=refusal_counter(app))
    return GuardedRunner(
        app,
        guard=guard,
        header_timeout=cfg.header_timeout,
        body_timeout=cfg.request_timeout,
        ws_path=cfg.ws_path,
        keepalive_timeout=cfg.keepalive_timeout,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=5,
    )


def refusal_counter(app: web.Application) -> Callable[[], None]:
    """Count a refused connection as an ``overloaded`` rejection, if ``app`` keeps the count."""
    state = app.get(STATE)
    return _nothing if state is None else functools.partial(state.rejected, "overloaded")
