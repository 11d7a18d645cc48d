"""A loopback TCP proxy that breaks the way networks break, for the tests' links.

It forwards ``127.0.0.1:<port>`` to a target port, and a test can make its path fail:
- :meth:`TcpProxy.cut` resets every open connection (both sides see it at once), and with
  ``until_mended`` also hangs up on new ones until :meth:`TcpProxy.mend`;
- :meth:`TcpProxy.pause` black-holes the connections open now: nothing passes, nothing
  closes, no FIN, no RST, as when a NAT mapping expires or a laptop changes networks. Later
  connections are forwarded normally (the new path), so a peer that notices gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        #: Connections accepted so far.
        self.connections = 0
        self._refusing = False
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._live: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self, *, until_mended: bool = False) -> int:
        """Reset every open connection; with ``until_mended``, refuse new ones too. Returns
        how many were open."""
        self._refusing = self._refusing or until_mended
        pairs = list(self._pairs)
        for down, up in pairs:
            down.transport.abort()
            up.transport.abort()
        return len(pairs)

    def mend(self) -> None:
        """Let new connections through again."""
        self._refusing = False

    def pause(self) -> None:
        """Stop forwarding on every connection open now; they stay open, silent."""
        for live in self._live:
            live.clear()
        self._live = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        live = asyncio.Event()
        live.set()
        self._live.append(live)
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pipes = [
            asyncio.ensure_future(_pipe(reader, up_writer, live)),
            asyncio.ensure_future(_pipe(up_reader, writer, live)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes)
        finally:
            self._tasks.difference_update(pipes)
            self._pairs.discard(pair)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, live: asyncio.Event
) -> None:
    try:
        while data := await reader.read(65536):
            # A paused path holds what it read forever: nothing passes, nothing closes.
            await live.wait()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    """A :class:`TcpProxy` for the block."""
    proxy = TcpProxy(target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
