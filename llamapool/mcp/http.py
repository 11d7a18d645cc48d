"""The Streamable HTTP transport: one upstream MCP session (``Mcp-Session-Id``) per channel.

``initialize`` is POSTed and answered before anything else is sent (it names the session);
after it every message is POSTed in a task of its own, so a long tool call answered as one
JSON body does not hold up a cancellation or another call. After ``initialize`` a GET
stream carries what the server initiates outside of any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import structlog

from llamapool.errors import McpUpstreamError
from llamapool.urls import url_for_logs

log = structlog.get_logger("llamapool.mcp")

SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
_ACCEPT = "application/json, text/event-stream"


class SseDecoder:
    """Server-sent events from a byte stream."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        """The ``data`` of each ``message`` event completed by ``chunk``."""
        for event, data in self.events(chunk):
            if event == "message":
                yield data

    def events(self, chunk: bytes) -> Iterator[tuple[str, str]]:
        """The type and ``data`` of each event with data completed by ``chunk``."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if self._data:
                    event = self._event.decode(errors="replace") or "message"
                    yield event, b"\n".join(self._data).decode(errors="replace")
                self._data, self._event = [], b""
                continue
            name, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value


class HttpTransport:
    """What the HTTP transports share: the server's URL, the headers and TLS settings to
    reach it with, the message size limit, and one keep-alive client session for them all."""

    def __init__(
        self,
        url: str,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        tls: ssl.SSLContext | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.url = url
        #: ``url`` as logs and clients may see it (no userinfo, no query).
        self.shown_url = url_for_logs(url)
        self.headers = dict(headers)
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class StreamableHttpTransport(HttpTransport):
    """Opens sessions with the MCP server at ``url``."""

    name = "streamable_http"

    async def open(self) -> HttpChannel:
        return HttpChannel(self)


class InboxChannel:
    """What the HTTP channels share: the server's messages arrive on a queue, read by
    :meth:`receive`; ``None`` there means the session ended, ``reason`` says why."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self.reason = ""
        self._closed = False

    async def receive(self) -> str | None:
        return await self.inbox.get()

    def ended(self) -> str:
        return self.reason or "the MCP server ended the session"


class HttpChannel(InboxChannel):
    """One upstream session."""

    def __init__(self, transport: StreamableHttpTransport) -> None:
        super().__init__()
        self.t = transport
        self.session_id = ""
        self.protocol_version = ""
        self._tasks: set[asyncio.Task[None]] = set()

    def _headers(self) -> dict[str, str]:
        headers = {**self.t.headers, "Accept": _ACCEPT}
        if self.session_id:
            headers[SESSION_HEADER] = self.session_id
        if self.protocol_version:
            headers[VERSION_HEADER] = self.protocol_version
        return headers

    async def send(self, data: str) -> None:
        if self._closed:
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        requests = [
            m
            for m in (message if isinstance(message, list) else [message])
            if isinstance(m, dict) and "method" in m and "id" in m
        ]
        if any(m["method"] == "initialize" for m in requests):
            await self._post(data, requests)
        else:
            self._spawn(self._post(data, requests))

    async def _post(self, data: str, requests: list[dict[str, Any]]) -> None:
        headers = {**self._headers(), "Content-Type": "application/json"}
        try:
            response = await self.t.http.post(
                self.t.url, data=data.encode(), headers=headers, ssl=self.t.tls or True
            )
        except (aiohttp.ClientError, OSError) as exc:
            if any(m["method"] == "initialize" for m in requests):
                raise McpUpstreamError(f"cannot reach {self.t.shown_url}: {exc}") from None
            self._fail(requests, f"the MCP server is unreachable: {exc}")
            return
        if SESSION_HEADER in response.headers and not self.session_id:
            self.session_id = response.headers[SESSION_HEADER]
        await self._read_answer(response, requests)

    async def _read_answer(
        self, response: aiohttp.ClientResponse, requests: list[dict[str, Any]]
    ) -> None:
        async with response:
            if response.status == 404 and self.session_id:
                self._end("the MCP server ended the session")
                return
            if response.status >= 400:
                self._fail(requests, f"the MCP server answered HTTP {response.status}")
                return
            kind = response.content_type
            if kind == "application/json":
                body = await response.content.read(self.t.max_message_bytes + 1)
                if len(body) > self.t.max_message_bytes:
                    self._fail(requests, "the MCP server's answer is too large")
                    return
                text = body.decode(errors="replace")
                self._learn_version(text, requests)
                self.inbox.put_nowait(text)
            elif kind == "text/event-stream":
                await self._read_events(response, requests)

    async def _read_events(
        self, response: aiohttp.ClientResponse, requests: list[dict[str, Any]]
    ) -> None:
        decoder = SseDecoder()
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async for chunk in response.content.iter_any():
                for data in decoder.feed(chunk):
                    self._learn_version(data, requests)
                    self.inbox.put_nowait(data)

    def _learn_version(self, text: str, requests: list[dict[str, Any]]) -> None:
        if self.protocol_version or not any(m["method"] == "initialize" for m in requests):
            return
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            version = orjson.loads(text)["result"]["protocolVersion"]
            if isinstance(version, str):
                self.protocol_version = version
                self._spawn(self._listen())

    async def _listen(self) -> None:
        """The GET stream of server-initiated messages (a server may offer none: 405)."""
        await asyncio.sleep(0)  # let the initialize response go first
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with self.t.http.get(
                self.t.url, headers=self._headers(), ssl=self.t.tls or True
            ) as response:
                if response.status == 200 and response.content_type == "text/event-stream":
                    await self._read_events(response, [])

    def _fail(self, requests: list[dict[str, Any]], message: str) -> None:
        for request in requests:
            error = {"code": -32000, "message": message}
            self.inbox.put_nowait(
                orjson.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}).decode()
            )

    def _end(self, reason: str) -> None:
        self.reason = reason
        self.inbox.put_nowait(None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session_id:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with self.t.http.delete(
                    self.t.url,
                    headers=self._headers(),
                    ssl=self.t.tls or True,
                    timeout=aiohttp.ClientTimeout(total=5),
                ):
                    pass
        self.inbox.put_nowait(None)
