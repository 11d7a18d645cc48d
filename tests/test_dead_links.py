"""Both ends notice a dead link within seconds, and the worker tells the truth about it.

A network path can die without closing anything: a NAT mapping expires, a laptop changes
networks, a server freezes. Nothing arrives, nothing is refused. The server evicts a worker
it has not heard from in 15 s; the worker pings a server it has not heard from and, when no
pong comes within ``server_timeout``, drops the link and dials again. The same worker process
on its new link replaces its old entry at once (it proves it with its instance secret), even
before the server has noticed the old link is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from llamapool.backends.demo import DEMO_MODELS, DemoBackend
from llamapool.config import WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.worker.agent import Agent
from llamapool.worker.status import serving_status

from .conftest import WORKER_KEY, PoolServer, StartWorker, wait_for
from .resilience_helpers import chat, echo_of, post
from .tcp_proxy import tcp_proxy

#: The worker's bound for a silent server in these tests, in seconds.
SERVER_TIMEOUT = 1.0
#: What reconnecting may add on top: the first backoff (at most 0.5 s) and a handshake.
SLACK = 1.5


async def status_of(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(url + "/status") as resp:
        data: dict[str, Any] = await resp.json()
        return data


async def test_a_worker_whose_path_goes_dead_reconnects_within_its_bound(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """With its path to the server black-holed, the worker reconnects on a new path within
    SERVER_TIMEOUT (plus a backoff), replaces its own stale entry long before the server's 15 s
    eviction, says so on /status, and serves again."""
    port = pool_server.server.port
    assert port is not None
    async with tcp_proxy(port) as proxy:
        agent = await start_worker(
            pool_server,
            server_url=f"ws://127.0.0.1:{proxy.port}{pool_server.cfg.ws_path}",
            server_timeout=SERVER_TIMEOUT,
            status_addr="127.0.0.1:0",
        )
        stale = pool_server.pool.get(agent.cfg.worker_id)
        async with serving_status(agent) as (status_url,):
            before = await status_of(status_url)
            proxy.pause()
            paused = time.monotonic()
            await wait_for(
                lambda: pool_server.pool.get(agent.cfg.worker_id) not in (None, stale),
                timeout=SERVER_TIMEOUT + SLACK + 2,
                what="the worker to register again on a new path",
            )
            took = time.monotonic() - paused
            await wait_for(lambda: agent.connected, what="the worker to say it is connected")
            after = await status_of(status_url)
        answer = await post(pool_server.url, chat("back again", stream=False, model=DEMO_MODELS[0]))

    assert (True, True) == (before["connected_to_server"], after["connected_to_server"])
    assert took < SERVER_TIMEOUT + SLACK, f"reconnected after {took:.2f}s"
    assert (2, 1) == (proxy.connections, len(pool_server.pool))
    assert (200, echo_of("back again")) == (
        answer.status,
        answer.json()["choices"][0]["message"]["content"],
    )


@contextlib.asynccontextmanager
async def server_that_stops_reading(
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[tuple[int, list[float]]]:
    """A server that takes one worker's register and then never reads or answers again (no
    pong either: aiohttp answers pings only while reading); later connections are refused.
    Yields its port and the times at which workers dialed it."""
    connected: list[float] = []
    hold = asyncio.Event()

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        connected.append(time.monotonic())
        if len(connected) > 1:
            raise web.HTTPServiceUnavailable()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the register, then silence
        await hold.wait()
        return ws

    app = web.Application()
    app.add_routes([web.get("/workers/connect", ws_handler)])
    server = await aiohttp_server(app)
    assert server.port is not None
    try:
        yield server.port, connected
    finally:
        hold.set()


async def test_a_worker_drops_a_server_that_stops_answering_and_status_says_so(
    aiohttp_server: AiohttpServer,
) -> None:
    """A server that takes the register and then goes silent (no message, no pong) is
    dropped within SERVER_TIMEOUT; /status then says the worker is not connected, and it keeps
    dialing instead of exiting."""
    async with server_that_stops_reading(aiohttp_server) as (port, connected):
        cfg = WorkConfig(
            server_url=f"ws://127.0.0.1:{port}/workers/connect",
            worker_key=WORKER_KEY,
            server_timeout=SERVER_TIMEOUT,
            reconnect_max=0.2,
            status_addr="127.0.0.1:0",
        )
        agent = Agent(cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")
        task = asyncio.create_task(agent.run())
        try:
            async with serving_status(agent) as (status_url,):
                await wait_for(lambda: agent.connected, what="the first connection")
                linked = time.monotonic()
                await wait_for(
                    lambda: not agent.connected,
                    timeout=SERVER_TIMEOUT + SLACK,
                    what="the worker to give up on the silent server",
                )
                dropped = time.monotonic() - linked
                status = await status_of(status_url)
                await wait_for(lambda: len(connected) >= 2, what="the worker to dial again")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert dropped < SERVER_TIMEOUT + 0.5, f"dropped after {dropped:.2f}s"
    assert (False, "connecting") == (status["connected_to_server"], status["state"])
    assert not task.done() or task.cancelled()
