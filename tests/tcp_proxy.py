"""A loopback TCP proxy that can black-hole its connections, the way a dead network path does.

Pausing stops forwarding on every connection open at that moment, in both directions, without
closing anything: no FIN, no RST, the sockets just go quiet, as when a NAT mapping expires or a
laptop changes networks. Connections made after the pause are forwarded normally (the new
path), so a peer that notices and reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class PausableProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_port``; :meth:`pause` black-holes the
    connections open now."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._live: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        """Stop forwarding on every connection open now; they stay open, silent."""
        for live in self._live:
            live.clear()
        self._live = []

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        live = asyncio.Event()
        live.set()
        self._live.append(live)
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer, live)),
            asyncio.ensure_future(self._pipe(up_reader, writer, live)),
        ]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes)
        finally:
            self._tasks.difference_update(pipes)
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, live: asyncio.Event
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                # A paused path holds what it read forever: nothing passes, nothing closes.
                await live.wait()
                writer.write(data)
                await writer.drain()


@contextlib.asynccontextmanager
async def pausable_proxy(target_port: int) -> AsyncIterator[PausableProxy]:
    proxy = PausableProxy(target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
