"""Resource limits: concurrent client requests, worker connections, models per worker, the
wait queue and the body size are each bounded, and hitting one is a clear error, never a hang.

Raw WebSocket workers hold requests until the test answers them, so "busy" is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from pytest_aiohttp import AiohttpServer

from llamapool.backends.demo import DemoBackend
from llamapool.config import WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.protocol import (
    ProxyRequest,
    Register,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    decode,
    encode,
)
from llamapool.server.appkeys import SCHEDULER, SOCKETS
from llamapool.testing import create_fake_ollama_app
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .conftest import WORKER_KEY, PoolServer, StartServer, wait_for
from .resilience_helpers import runner_server

Socket = aiohttp.ClientWebSocketResponse[bool]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def raw_worker(
    server: PoolServer, worker_id: str = "raw", *, max_concurrency: int = 4
) -> AsyncIterator[Socket]:
    """A registered Go-style worker serving model ``m`` that answers only when told to."""
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        register = Register(
            worker_id=worker_id,
            worker_key=WORKER_KEY,
            models=["m"],
            max_concurrency=max_concurrency,
        )
        await ws.send_str(encode(register))
        await wait_for(lambda: server.pool.get(worker_id) is not None, what=worker_id)
        yield ws


async def next_request(ws: Socket) -> ProxyRequest:
    msg = await ws.receive(timeout=5)
    assert WSMsgType.TEXT == msg.type, msg
    request = decode(msg.data)
    assert isinstance(request, ProxyRequest)
    return request


async def answer(ws: Socket, request: ProxyRequest, text: str = "done") -> None:
    rid = request.request_id
    await ws.send_str(encode(ResponseHeaders(rid, 200, {"Content-Type": "application/json"})))
    await ws.send_str(encode(ResponseChunk(rid, orjson.dumps({"text": text}))))
    await ws.send_str(encode(ResponseEnd(rid)))


async def chat(server: PoolServer) -> tuple[int, dict[str, str], Any]:
    """POST a chat; its status, headers and JSON body."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/chat/completions", json=CHAT, headers=server.auth) as resp,
    ):
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


def assert_limit_error(
    answer: tuple[int, dict[str, str], Any], status: int, code: str, *, retry_after: bool
) -> None:
    got_status, headers, body = answer
    assert (status, "application/json") == (got_status, headers["Content-Type"].split(";")[0])
    assert code == body["error"]["code"]
    assert body["error"]["message"]
    assert ("1" if retry_after else None) == headers.get("Retry-After")


# --- client connections ---------------------------------------------------------------------


async def test_requests_past_max_connections_get_a_quick_503() -> None:
    """With max_connections=2 and two requests in flight, a third gets 503 JSON with
    Retry-After at once (the worker's connection does not count); once the two finish,
    requests are served again."""
    async with runner_server(max_connections=2) as server, raw_worker(server) as ws:
        first, second = asyncio.create_task(chat(server)), asyncio.create_task(chat(server))
        held = [await next_request(ws), await next_request(ws)]
        refused = await asyncio.wait_for(chat(server), timeout=5)
        for request in held:
            await answer(ws, request)
        served = [await first, await second]
        later = asyncio.create_task(chat(server))
        await answer(ws, await next_request(ws), "later")
        again = await later

    assert_limit_error(refused, 503, "overloaded", retry_after=True)
    assert [200, 200] == [status for status, _, _ in served]
    assert (200, {"text": "later"}) == (again[0], again[2])


# --- worker connections ---------------------------------------------------------------------


async def test_a_worker_past_max_workers_is_refused_before_the_upgrade(
    start_server: StartServer,
) -> None:
    """With max_workers=1, a second worker connection gets HTTP 503 with a JSON error saying
    why, before any WebSocket exists; once the first leaves, a new one joins."""
    server = await start_server(max_workers=1)
    async with raw_worker(server, "first"), aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.ws_url)
        async with http.get(server.ws_url.replace("ws", "http", 1)) as resp:
            status, body = resp.status, await resp.json()
    sockets = server.server.app[SOCKETS]
    await wait_for(lambda: 0 == len(sockets), what="the first worker's socket to close")
    async with raw_worker(server, "second"):
        joined = server.pool.get("second") is not None

    assert 503 == refused.value.status
    assert 503 == status
    assert "too many workers are connected" == body["error"]["message"]
    assert joined


async def test_an_agent_refused_for_max_workers_retries_until_a_slot_frees(
    start_server: StartServer,
) -> None:
    """A worker refused because the server is full says so in its last error, keeps
    retrying, and joins once a slot is free."""
    server = await start_server(max_workers=1)
    cfg = WorkConfig(server_url=server.ws_url, worker_key=WORKER_KEY, reconnect_max=0.5)
    agent = Agent(cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")
    task = asyncio.create_task(agent.run())
    try:
        async with raw_worker(server, "occupant"):
            await wait_for(lambda: "503" in agent.last_error, what="the refused worker's error")
            refused_while_full = server.pool.get(cfg.worker_id) is None
        await asyncio.wait_for(agent.registered.wait(), timeout=15)
        joined = server.pool.get(cfg.worker_id) is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert refused_while_full
    assert joined


# --- models per worker ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "accepted"),
    [(["a", "b", "c"], True), (["a", "b", "c", "a", "b"], True), (["a", "b", "c", "d"], False)],
    ids=["at-the-limit", "duplicates-count-once", "over-the-limit"],
)
async def test_a_worker_may_advertise_at_most_max_models_per_worker(
    start_server: StartServer, models: list[str], accepted: bool
) -> None:
    """With max_models_per_worker=3, three distinct models register; a fourth is refused with
    1008 and a reason naming the limit."""
    server = await start_server(max_models_per_worker=3)
    register = Register(worker_id="raw", worker_key=WORKER_KEY, models=models, protocol=1)

    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(encode(register))
        msg = await ws.receive(timeout=5)
        handle = server.pool.get("raw")

    if accepted:
        assert WSMsgType.TEXT == msg.type  # "registered"
        assert handle is not None
        assert {"a", "b", "c"} == handle.models
    else:
        assert (WSMsgType.CLOSE, 1008) == (msg.type, msg.data)
        assert "too many models: 4 (at most 3)" == msg.extra
        assert None is handle


async def test_an_agent_with_too_many_models_is_refused_with_a_clear_error(
    aiohttp_server: AiohttpServer, start_server: StartServer
) -> None:
    """A worker whose backend lists more models than the server allows is refused with a
    reason that says so, shows it as its last error, and keeps trying (its backend may drop
    models) instead of exiting."""
    backend = await aiohttp_server(create_fake_ollama_app(models=["a:1", "b:1", "c:1"]))
    server = await start_server(max_models_per_worker=2)
    cfg = WorkConfig(
        server_url=server.ws_url,
        worker_key=WORKER_KEY,
        backend_url=f"http://{backend.host}:{backend.port}",
        reconnect_max=0.1,
    )
    agent = Agent(cfg, load_backend("ollama")(BackendSettings(url=cfg.backend_url)))
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: "too many models" in agent.last_error, what="the refusal")
        running = not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert "too many models: 3 (at most 2)" in agent.last_error
    assert (True, 0) == (running, len(server.pool))


# --- the wait queue -------------------------------------------------------------------------


async def test_a_full_queue_answers_429_with_retry_after(start_server: StartServer) -> None:
    """With the only worker busy and queue_size=1, one request waits and the next gets 429
    JSON with Retry-After; the waiting one is served when the worker frees up."""
    server = await start_server(queue_size=1, queue_timeout=30)
    scheduler = server.server.app[SCHEDULER]
    async with raw_worker(server, max_concurrency=1) as ws:
        running = asyncio.create_task(chat(server))
        first = await next_request(ws)
        queued = asyncio.create_task(chat(server))
        await wait_for(lambda: 1 == len(scheduler), what="a queued request")
        refused = await asyncio.wait_for(chat(server), timeout=5)
        await answer(ws, first, "first")
        await answer(ws, await next_request(ws), "queued")
        served = [await running, await queued]

    assert_limit_error(refused, 429, "queue_full", retry_after=True)
    assert [(200, {"text": "first"}), (200, {"text": "queued"})] == [
        (status, body) for status, _, body in served
    ]


# --- the body size --------------------------------------------------------------------------

LIMIT = 1024
PIECE = 16 * 1024
ANNOUNCED = 64 * 1024 * 1024


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_a_body_over_the_limit_is_refused_before_it_is_all_sent(
    start_server: StartServer, path: str, announced: bool
) -> None:
    """A body over max_body_size gets 413 JSON while the client is still sending it: the
    server never waits for (or holds) the whole body."""
    server = await start_server(max_body_size=LIMIT)
    answered = asyncio.Event()
    sent_all = False

    async def slow_body() -> AsyncIterator[bytes]:
        # Two pieces, then nothing more until the answer came (or 10 s passed): a server
        # that needed the whole body would answer only after the generator ended.
        nonlocal sent_all
        for _ in range(2):
            yield b"x" * PIECE
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(answered.wait(), timeout=10)
        sent_all = True

    headers = {**server.auth, "Content-Type": "application/json"}
    if announced:
        headers["Content-Length"] = str(ANNOUNCED)
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + path, data=slow_body(), headers=headers) as resp,
    ):
        answered_before_the_end = not sent_all
        answered.set()
        status, body = resp.status, orjson.loads(await resp.read())

    assert answered_before_the_end
    assert 413 == status
    message = body["error"] if path.startswith("/api/") else body["error"]["message"]
    assert f"request body is larger than the limit of {LIMIT} bytes" == message
