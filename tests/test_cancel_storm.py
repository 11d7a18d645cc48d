"""Clients that stop early never cost a worker.

Every chat UI's stop button and every impatient script closes a stream mid-answer, or before
the answer starts. The worker has often sent a few more chunks by the time it reads the
server's cancel; those late chunks are expected and harmless. Hundreds of such clients in a
row leave the same worker connection serving, with nothing counted against it.
"""

from __future__ import annotations

import asyncio

import orjson
from pytest_aiohttp import AiohttpServer

from llamapool.server.appkeys import STATE
from llamapool.server.link import WorkerLink
from llamapool.testing import create_fake_ollama_app

from .conftest import API_KEY, PoolServer, StartWorker, wait_for
from .resilience_helpers import MODEL, chat, echo_of, post

#: Concurrent clients, and how many times each stops a stream early.
CLIENTS = 64
ROUNDS = 8
#: A prompt long enough to be still streaming when its client leaves.
PROMPT = " ".join(f"word{i}" for i in range(200))


def raw_request(server: PoolServer, *, stream: bool) -> bytes:
    body = orjson.dumps(chat(PROMPT, stream=stream))
    host = server.url.removeprefix("http://")
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def stop_mid_stream(server: PoolServer) -> bool:
    """Start a stream, read until its first event arrives, then hang up; whether it had."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw_request(server, stream=True))
        received = b""
        while b"data: " not in received:
            data = await asyncio.wait_for(reader.read(65536), 5)
            if not data:
                return False
            received += data
        return True
    finally:
        writer.close()


async def stop_before_headers(server: PoolServer) -> None:
    """Send a whole request and hang up at once, before any answer can come."""
    host, port = server.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw_request(server, stream=True))
    await writer.drain()
    writer.close()


async def test_hundreds_of_clients_stopping_early_leave_the_worker_serving(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """512 streams stopped mid-answer by 64 concurrent clients, and 64 stopped before their
    answer began, leave the very same worker connection in the pool, with late messages
    counted as late and none as invalid; the next client is served."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=0.002))
    agent = await start_worker(
        pool_server,
        "ollama",
        backend_url=f"http://127.0.0.1:{backend.port}",
        max_concurrency=CLIENTS,
    )
    handle = pool_server.pool.get(agent.cfg.worker_id)
    assert handle is not None
    assert isinstance(handle.link, WorkerLink)
    link = handle.link

    started = 0
    for _ in range(ROUNDS):
        results = await asyncio.gather(*(stop_mid_stream(pool_server) for _ in range(CLIENTS)))
        started += sum(results)
    await asyncio.gather(*(stop_before_headers(pool_server) for _ in range(CLIENTS)))
    state = pool_server.server.app[STATE]
    await wait_for(lambda: 0 == state.jobs_inflight_total, what="every request to end")
    await wait_for(lambda: 0 == len(agent.jobs), what="the worker's jobs to stop")
    answer = await post(pool_server.url, chat("still there?", stream=False))

    assert CLIENTS * ROUNDS == started
    assert handle is pool_server.pool.get(agent.cfg.worker_id)
    assert (True, 0) == (agent.connected, link.invalid)
    assert (200, echo_of("still there?")) == (
        answer.status,
        answer.json()["choices"][0]["message"]["content"],
    )
