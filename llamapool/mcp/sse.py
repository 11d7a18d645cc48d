"""The older HTTP+SSE transport (protocol 2024-11-05): one GET stream per channel.

The relay GETs the server's SSE URL; the stream's first event, ``endpoint``, names the URL
(same origin) to POST each client message to, and every later ``message`` event is a message
from the server. Closing the stream ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urljoin, urlsplit

import aiohttp
import orjson
import structlog

from llamapool.errors import McpUpstreamError
from llamapool.mcp.http import HttpTransport, InboxChannel, SseDecoder
from llamapool.urls import url_for_logs

log = structlog.get_logger("llamapool.mcp")

#: How long the server may take to name its message endpoint.
ENDPOINT_TIMEOUT = 30.0
#: How long one POST of a message may take (the server answers ``202`` at once).
POST_TIMEOUT = 30.0


class SseTransport(HttpTransport):
    """Opens sessions with the HTTP+SSE MCP server whose stream is at ``url``."""

    name = "sse"

    async def open(self) -> SseChannel:
        channel = SseChannel(self)
        await channel.connect()
        return channel


class SseChannel(InboxChannel):
    """One session: the GET stream and the endpoint it named."""

    def __init__(self, transport: SseTransport) -> None:
        super().__init__()
        self.t = transport
        self.endpoint = ""
        self._named: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        headers = {**self.t.headers, "Accept": "text/event-stream"}
        try:
            response = await self.t.http.get(self.t.url, headers=headers, ssl=self.t.tls or True)
        except (aiohttp.ClientError, OSError) as exc:
            raise McpUpstreamError(f"cannot reach {self.t.shown_url}: {exc}") from None
        if response.status != 200 or response.content_type != "text/event-stream":
            response.release()
            raise McpUpstreamError(
                f"{self.t.shown_url} answered HTTP {response.status}, no SSE stream"
            )
        self._reader = asyncio.create_task(self._read(response))
        try:
            self.endpoint = await asyncio.wait_for(asyncio.shield(self._named), ENDPOINT_TIMEOUT)
        except (asyncio.TimeoutError, McpUpstreamError) as exc:
            await self.close()
            raise McpUpstreamError(
                str(exc) or f"{self.t.shown_url} named no message endpoint in {ENDPOINT_TIMEOUT:g}s"
            ) from None

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        decoder = SseDecoder()
        size = 0
        try:
            async with response:
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    for event, data in decoder.events(chunk):
                        size = 0
                        self._event(event, data)
                    if size > self.t.max_message_bytes:
                        self._end("the MCP server sent a message over the size limit")
                        return
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass
        self._end("the MCP server closed its SSE stream")

    def _event(self, event: str, data: str) -> None:
        if event == "endpoint" and not self._named.done():
            endpoint = urljoin(self.t.url, data.strip())
            same = urlsplit(endpoint)[:2] == urlsplit(self.t.url)[:2]
            if same:
                self._named.set_result(endpoint)
            else:
                self._named.set_exception(
                    McpUpstreamError(
                        f"the MCP server named another origin: {url_for_logs(endpoint)}"
                    )
                )
        elif event == "message" and self._named.done():
            self.inbox.put_nowait(data)

    def _end(self, reason: str) -> None:
        if not self._named.done():
            self._named.set_exception(McpUpstreamError(reason))
        if not self.reason:
            self.reason = reason
            self.inbox.put_nowait(None)

    async def send(self, data: str) -> None:
        if self._closed or self.reason:
            return
        headers = {**self.t.headers, "Content-Type": "application/json"}
        problem = ""
        try:
            async with self.t.http.post(
                self.endpoint,
                data=data.encode(),
                headers=headers,
                ssl=self.t.tls or True,
                timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT),
            ) as response:
                if response.status == 404:
                    self._end("the MCP server ended the session")
                elif response.status >= 400:
                    problem = f"the MCP server answered HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            problem = f"the MCP server is unreachable: {exc}"
        if problem:
            self._fail(data, problem)

    def _fail(self, data: str, message: str) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            sent = orjson.loads(data)
            for request in sent if isinstance(sent, list) else [sent]:
                if isinstance(request, dict) and "method" in request and "id" in request:
                    error = {"code": -32000, "message": message}
                    answer = {"jsonrpc": "2.0", "id": request["id"], "error": error}
                    self.inbox.put_nowait(orjson.dumps(answer).decode())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if not self._named.done():
            self._named.cancel()
        self.reason = self.reason or "the relay closed the session"
        self.inbox.put_nowait(None)
