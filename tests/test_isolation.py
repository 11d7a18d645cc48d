"""A client that reads slowly hurts only its own request: the other requests on its worker's
connection go on, and neither the server nor the worker buffers its answer without bound."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.server.exchange import Exchange
from llamapool.server.link import FLOW_WINDOW
from llamapool.testing import create_fake_ollama_app

from .conftest import (
    API_KEY,
    PoolServer,
    StartServer,
    StartWorker,
    wait_for,
)
from .resilience_helpers import (
    MODEL,
    STEP,
    chat,
    echo_of,
    go_worker,
    handle_of,
    link_of,
    post,
    runner_server,
)

#: One 1000-byte word echoed 20 000 times: a streamed answer of about 20 MB.
BIG = chat("x" * 1000, stream=True, max_tokens=20_000)


class SlowClient:
    """A raw HTTP client that sends its request and then reads nothing until told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read_all(self, timeout: float = STEP) -> bytes:
        """Everything up to the server closing the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)


@contextlib.asynccontextmanager
async def slow_client(url: str, body: bytes) -> AsyncIterator[SlowClient]:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    try:
        yield SlowClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def only_exchange(server: PoolServer, worker_id: str) -> Exchange:
    exchanges = list(link_of(server, worker_id).exchanges.values())
    assert 1 == len(exchanges)
    return exchanges[0]


async def test_a_slow_reader_does_not_stall_its_worker_and_its_buffer_stays_bounded(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A client that stops reading holds at most a window and stalls no other request."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    agent = await start_worker(
        pool_server, "ollama", backend_url=str(backend.make_url("")), max_concurrency=4
    )
    link = link_of(pool_server, agent.cfg.worker_id)

    async with slow_client(pool_server.url, orjson.dumps(BIG)):
        await wait_for(lambda: 1 == len(link.exchanges), what="the slow request to start")
        exchange = only_exchange(pool_server, agent.cfg.worker_id)
        await wait_for(
            lambda: any(job.credit <= 0 for job in agent.jobs.running.values()),
            timeout=STEP,
            what="the worker to run out of credit",
        )
        credit_left = [job.credit for job in agent.jobs.running.values()]
        answers = [
            await post(pool_server.url, chat(f"beside the slow one {i}", stream=i % 2 == 0))
            for i in range(6)
        ]
        buffered = exchange.buffered
        still_running = (1 == len(agent.jobs), 1 == handle_of(pool_server, agent).inflight)

    assert [echo_of(f"beside the slow one {i}") for i in range(6)] == [a.text for a in answers]
    assert [0] == credit_left  # it sent exactly its credit, not a backend read past it
    assert buffered <= FLOW_WINDOW
    assert (True, True) == still_running


async def test_a_go_worker_slow_reader_is_ended_when_its_buffer_overflows(
    start_server: StartServer,
) -> None:
    """With a Go worker a stalled client's request ends at the buffer limit; the worker cancels."""
    server = await start_server()
    async with (
        go_worker(server, max_concurrency=4) as worker,
        slow_client(server.url, orjson.dumps(BIG)) as client,
    ):
        slow = await worker.receive()
        rid = slow["request_id"]
        exchange = only_exchange(server, worker.worker_id)
        await worker.headers(rid)
        chunk = b"data: " + b"y" * (64 * 1024) + b"\n\n"
        for _ in range(60):  # ~4 MB: the client's socket is full, the buffer under its limit
            await worker.chunk(rid, chunk)

        # Another request on the same connection is served while the slow one is stuck.
        other = asyncio.create_task(post(server.url, chat("meanwhile", stream=False)))
        message = await worker.receive()
        await worker.headers(message["request_id"], "application/json")
        await worker.chunk(message["request_id"], b'{"ok": true}')
        await worker.send({"type": "http_proxy_response_end", "request_id": message["request_id"]})
        answer = await other

        peak = 0
        for _ in range(300):  # up to ~20 MB more, far past the 8 MB limit
            await worker.chunk(rid, chunk)
            peak = max(peak, exchange.buffered)
            if exchange.finished:
                break
        overflowed = exchange.finished
        cancel = await worker.receive()  # at once, though the client has still read nothing
        ended = await client.read_all()

    assert overflowed
    assert peak <= exchange.limit
    assert (200, {"ok": True}) == (answer.status, answer.json())
    assert {"type": "http_proxy_cancel", "request_id": rid} == cancel
    assert ended.rstrip().endswith(b"0")
    assert b'data: {"error":' in ended


@pytest.mark.parametrize("runner", ["test-server", "app-runner"])
async def test_a_client_that_stops_reading_is_still_bound_by_the_request_timeout(
    aiohttp_server: AiohttpServer,
    start_server: StartServer,
    start_worker: StartWorker,
    runner: str,
) -> None:
    """REQUEST_TIMEOUT ends a request whose client stopped reading, freeing its worker slot."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    async with contextlib.AsyncExitStack() as stack:
        if runner == "app-runner":
            server: PoolServer = await stack.enter_async_context(runner_server(request_timeout=1.0))
        else:
            server = await start_server(request_timeout=1.0)
        agent = await start_worker(server, "ollama", backend_url=str(backend.make_url("")))
        handle = handle_of(server, agent)

        async with slow_client(server.url, orjson.dumps(BIG)):
            await wait_for(lambda: 1 == len(agent.jobs), what="the slow request to start")
            await wait_for(
                lambda: (0, 0) == (len(agent.jobs), handle.inflight),
                timeout=1.0 + STEP,
                what="REQUEST_TIMEOUT to end the request of a client that reads nothing",
            )
        answer = await post(server.url, chat("after the stalled one", stream=False))

    assert (200, echo_of("after the stalled one")) == (answer.status, answer.text)
