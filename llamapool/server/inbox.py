"""A WebSocket whose data messages are handled the moment they are parsed.

aiohttp parses a connection's frames in its protocol's ``data_received`` and queues each
message for a task that awaits ``receive()``. For a worker carrying thousands of streams that
is, per response chunk, a queue append, a future set, a task wake-up and a ``receive()`` call,
all to reach a handler that itself never waits (it hands each message to its request without
awaiting; see :mod:`.exchange`). :class:`InboxWebSocket` lets such a handler take text and
binary messages straight from the parser instead; close, ping and pong still go through
``receive()``, where aiohttp handles them.

Order is kept: a message is handled directly only while nothing is queued ahead of it, and the
receiving task hands messages to the same handler.

This relies on aiohttp's private parser and queue as aiohttp 3.14.4 and later 3.14 releases lay
them out (Cython or pure Python). Any other aiohttp, older or newer, gets an ordinary socket,
every message through ``receive()``, until its layout is checked (see :data:`SUPPORTED`): a
private method copied from one release must not run on another that changed it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import WSMessage, WSMsgType, web

Handler = Callable[[WSMessage], None]

_DIRECT = (WSMsgType.TEXT, WSMsgType.BINARY)

#: The aiohttp release series whose private WebSocket layout :meth:`InboxWebSocket._post_start`
#: copies (checked with 3.14.5, its C parser and its pure Python one).
CHECKED_SERIES = frozenset({"3.14"})
#: Whether the installed aiohttp is of a checked series and keeps the response's parser
#: (``_parser``, from 3.14.4 on; 3.14.0 to 3.14.3 do not): data messages can skip the queue.
SUPPORTED = ".".join(aiohttp.__version__.split(".")[:2]) in CHECKED_SERIES and hasattr(
    web.WebSocketResponse, "_parser"
)

_Queue: Any = None  # another aiohttp: no direct handling
if SUPPORTED:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE

    class _Queue(WebSocketDataQueue):  # type: ignore[no-redef]
        """aiohttp's message queue, which hands data messages to ``handler`` when it can."""

        __slots__ = ("handler",)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.handler: Handler | None = None

        def feed_data(self, data: Any, size: int) -> None:
            handler = self.handler
            if handler is not None and not self._buffer and data[0] in _DIRECT:
                handler(data)
            else:
                super().feed_data(data, size)


class InboxWebSocket(web.WebSocketResponse):
    """A server-side WebSocket that can hand its data messages to a handler as they arrive."""

    def _post_start(self, request: Any, protocol: str | None, writer: Any) -> None:
        """aiohttp 3.14's own, with the message queue swapped for one that can hand messages
        over (another version's layout: aiohttp's own, unchanged)."""
        needed = ("_decode_text", "_max_msg_size", "_compress", "_reset_heartbeat", "_parser")
        if _Queue is None or not all(hasattr(self, name) for name in needed):
            super()._post_start(request, protocol, writer)
            return
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        queue = _Queue(request._protocol, DEFAULT_CHUNK_SIZE, loop=self._loop)
        self._reader = queue
        self._parser = WebSocketReader(
            queue,
            self._max_msg_size,
            compress=bool(self._compress),
            decode_text=self._decode_text,
        )
        on_data = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(self._parser, data_received_cb=on_data)
        request.protocol.keep_alive(False)

    @property
    def delivering(self) -> bool:
        """Whether data messages go straight to a handler now."""
        return getattr(self._reader, "handler", None) is not None

    def deliver_to(self, handler: Handler | None) -> bool:
        """From now on, hand text and binary messages to ``handler`` as they are parsed
        (``None``: queue them for ``receive()`` again). ``False``: this socket cannot."""
        queue = self._reader
        if _Queue is None or not isinstance(queue, _Queue):
            return False
        queue.handler = handler
        return True
