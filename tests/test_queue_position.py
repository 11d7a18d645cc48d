"""Queue position for streams (opt-in): a streaming client that waits sees its place in line.

With ``queue_position_events`` on, an OpenAI or Anthropic stream that has to wait gets its
stream at once and an SSE comment ``: queued position=N`` every second; the worker's answer
follows on the same stream. Errors that would have been a status arrive as an error event.
Off (the default), nothing changes: the client sees nothing until a worker answers.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from .conftest import PoolServer, StartServer, wait_for
from .resilience_helpers import STEP, chat, go_worker, until_queued

HOLD = {"type": "http_proxy_response_end"}


class Reader:
    """A streaming request whose bytes are collected as they arrive."""

    def __init__(self, server: PoolServer, prompt: str) -> None:
        self.body = b""
        self.status = 0
        self.task = asyncio.create_task(self._read(server, prompt))

    async def _read(self, server: PoolServer, prompt: str) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                server.url + "/v1/chat/completions",
                json=chat(prompt, stream=True),
                headers=server.auth,
            ) as resp,
        ):
            self.status = resp.status
            async for data in resp.content.iter_any():
                self.body += data

    async def until(self, text: bytes) -> None:
        await wait_for(lambda: text in self.body, timeout=STEP, what=f"{text!r} in the stream")


async def test_a_waiting_stream_sees_its_place_in_line_then_its_answer(
    start_server: StartServer,
) -> None:
    """Two streams wait behind a busy worker: each sees its place (1 and 2) as an SSE comment
    at once, and the first, once served, gets the worker's events after its comments."""
    server = await start_server(queue_position_events=True)
    async with go_worker(server, max_concurrency=1) as worker:
        first = Reader(server, "first")
        taken = await worker.receive()
        second, third = Reader(server, "second"), Reader(server, "third")
        await until_queued(server, 2)
        await second.until(b": queued position=1\n\n")
        await third.until(b": queued position=2\n\n")
        await worker.send({**HOLD, "request_id": taken["request_id"]})
        served = await worker.receive()
        await worker.headers(served["request_id"])
        await worker.chunk(served["request_id"], b'data: {"answer": 2}\n\n')
        await worker.send({**HOLD, "request_id": served["request_id"]})
        await asyncio.wait_for(second.task, STEP)
        for reader in (first, third):
            reader.task.cancel()
        await asyncio.gather(first.task, third.task, return_exceptions=True)

    comments, _, events = second.body.partition(b'data: {"answer": 2}')
    assert (200, b"\n\n") == (second.status, events)
    assert {b": queued position=1"} == set(filter(None, comments.split(b"\n\n")))


async def test_a_stream_that_waits_too_long_ends_with_an_error_event(
    start_server: StartServer,
) -> None:
    """Past QUEUE_TIMEOUT a waiting stream, already answered 200, ends with an error event in
    OpenAI's shape (queue_timeout) instead of a 503 status."""
    server = await start_server(queue_position_events=True, queue_timeout=0.5)
    async with go_worker(server, max_concurrency=1) as worker:
        first = Reader(server, "first")
        await worker.receive()
        waiting = Reader(server, "waiting")
        await asyncio.wait_for(waiting.task, STEP)
        first.task.cancel()
        await asyncio.gather(first.task, return_exceptions=True)

    comments, _, event = waiting.body.partition(b"data: ")
    error = orjson.loads(event)["error"]
    assert (200, "queue_timeout") == (waiting.status, error["code"])
    assert comments.startswith(b": queued position=1\n\n")


async def test_without_the_option_a_waiting_stream_gets_no_comment(
    start_server: StartServer,
) -> None:
    """Off by default: a stream that waited gets the worker's bytes and nothing else."""
    server = await start_server()
    async with go_worker(server, max_concurrency=1) as worker:
        first = Reader(server, "first")
        taken = await worker.receive()
        waiting = Reader(server, "waiting")
        await until_queued(server, 1)
        await worker.send({**HOLD, "request_id": taken["request_id"]})
        served = await worker.receive()
        await worker.headers(served["request_id"])
        await worker.chunk(served["request_id"], b"data: [DONE]\n\n")
        await worker.send({**HOLD, "request_id": served["request_id"]})
        await asyncio.wait_for(waiting.task, STEP)
        first.task.cancel()
        await asyncio.gather(first.task, return_exceptions=True)

    assert (200, b"data: [DONE]\n\n") == (waiting.status, waiting.body)
