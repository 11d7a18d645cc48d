"""A kit for the key, limit and fair-queue tests: keys files, a raw worker that holds requests
until the test answers them (or answers each at once), and clients that send as one key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import structlog
from aiohttp import WSMsgType
from structlog.testing import LogCapture

from llamapool.protocol import (
    ProxyRequest,
    Register,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    decode,
    encode,
)
from llamapool.server.appkeys import SCHEDULER

from .conftest import WORKER_KEY, PoolServer, wait_for

MODEL = "m"
#: What a raw worker answers: usage of 50 tokens in and 50 out.
USAGE_BODY = orjson.dumps(
    {
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 50, "total_tokens": 100},
    }
)


#: Two keys for the fair-queue tests: ``batch``, whose weight the test sets, and ``chat``.
FAIR_KEYS = """\
keys:
  - name: batch
    key: sk-batch-0123456789
    weight: {batch}
  - name: chat
    key: sk-chat-0123456789
"""
BATCH, CHAT = "sk-batch-0123456789", "sk-chat-0123456789"


def fair_keys(path: Path, *, batch_weight: int = 1) -> Path:
    """The :data:`FAIR_KEYS` file, with ``batch`` of weight ``batch_weight``."""
    return write_keys(path, FAIR_KEYS.format(batch=batch_weight))


@contextlib.contextmanager
def captured_events() -> Iterator[list[dict[str, Any]]]:
    """Log events as structlog would emit them, with the request's context variables merged
    in (``structlog.testing.capture_logs`` leaves those out)."""
    capture = LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(**old)


def write_keys(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def chat(content: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk(server: PoolServer, key: str) -> openai.AsyncOpenAI:
    """The official client as one key, without its own retries (a 429 must show)."""
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


class RawWorker:
    """A Go-style worker on a raw WebSocket: each request waits until the test answers it,
    unless ``auto`` is set, which answers every request at once with ``body``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool], body: bytes) -> None:
        self.ws = ws
        self.body = body
        self.auto = False
        self.received: list[ProxyRequest] = []
        self._pending: asyncio.Queue[ProxyRequest] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            message = decode(msg.data)
            if isinstance(message, ProxyRequest):
                self.received.append(message)
                if self.auto:
                    await self.answer(message)
                else:
                    self._pending.put_nowait(message)

    def contents(self) -> list[str]:
        """The user message of every request received, in order."""
        return [orjson.loads(r.body)["messages"][0]["content"] for r in self.received]

    async def next(self) -> ProxyRequest:
        return await asyncio.wait_for(self._pending.get(), 10)

    async def answer(self, request: ProxyRequest, body: bytes | None = None) -> None:
        request_id = request.request_id
        headers = {"Content-Type": "application/json"}
        await self.ws.send_str(encode(ResponseHeaders(request_id, 200, headers)))
        await self.ws.send_str(
            encode(ResponseChunk(request_id, self.body if body is None else body))
        )
        await self.ws.send_str(encode(ResponseEnd(request_id)))

    async def answer_next(self) -> str:
        """Answer the next request; its user message."""
        request = await self.next()
        await self.answer(request)
        return str(orjson.loads(request.body)["messages"][0]["content"])

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def raw_worker(
    server: PoolServer,
    *,
    body: bytes = USAGE_BODY,
    auto: bool = False,
    max_concurrency: int = 1,
    models: tuple[str, ...] = (MODEL,),
    worker_id: str = "raw-1",
) -> AsyncIterator[RawWorker]:
    """A registered raw worker serving ``models``; closed when the block ends."""
    register = Register(
        worker_id=worker_id,
        worker_name=worker_id,
        worker_key=WORKER_KEY,
        models=list(models),
        max_concurrency=max_concurrency,
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(encode(register))
        await wait_for(lambda: server.pool.get(worker_id) is not None, what=worker_id)
        worker = RawWorker(ws, body)
        worker.auto = auto
        try:
            yield worker
        finally:
            await worker.close()


async def until_queued(server: PoolServer, count: int) -> None:
    scheduler = server.server.app[SCHEDULER]
    await wait_for(lambda: count == len(scheduler), what=f"{count} queued requests")


async def post(
    http: aiohttp.ClientSession,
    server: PoolServer,
    key: str,
    body: dict[str, Any],
    *,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """POST as ``key``; the status, the headers and the JSON body."""
    async with http.post(
        server.url + path, json=body, headers={**bearer(key), **(headers or {})}
    ) as resp:
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())
