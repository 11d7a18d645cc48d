"""A worker id belongs to the worker process holding it.

Anyone with the worker key could otherwise register under a connected worker's id and take
its place (and its traffic). A re-registration replaces a connected id only when it carries
that worker's instance secret, which a worker process makes at start and never shows anyone
but the server; anyone else is refused with close code 4009 and a reason, and retries.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType

from llamapool.backends.demo import DEMO_MODELS, DemoBackend
from llamapool.config import WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.protocol import Register, encode
from llamapool.worker.agent import Agent

from .conftest import WORKER_KEY, PoolServer, StartWorker, wait_for
from .resilience_helpers import chat, echo_of, post


async def test_another_connection_cannot_take_a_connected_workers_id(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A register with a connected worker's id, the right worker key but not its instance
    secret is closed with 4009 and a reason; the worker keeps its place and its traffic."""
    agent = await start_worker(pool_server, worker_id="victim")
    handle = pool_server.pool.get("victim")
    hijack = Register(
        worker_id="victim",
        worker_key=WORKER_KEY,
        models=[DEMO_MODELS[0]],
        protocol=1,
        instance="a guess",
    )

    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(encode(hijack))
        closed = await ws.receive(timeout=5)
    answer = await post(pool_server.url, chat("mine", stream=False, model=DEMO_MODELS[0]))

    assert (WSMsgType.CLOSE, 4009) == (closed.type, closed.data)
    assert "'victim' is in use" in str(closed.extra)
    assert (handle, True) == (pool_server.pool.get("victim"), agent.connected)
    assert (200, echo_of("mine")) == (
        answer.status,
        answer.json()["choices"][0]["message"]["content"],
    )


async def test_a_second_process_with_the_same_id_waits_its_turn(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A second worker process given the same WORKER_ID is refused while the first is
    connected, does not exit (its key is fine), and takes the id once the first has left."""
    first = await start_worker(pool_server, worker_id="twin")
    first_handle = pool_server.pool.get("twin")
    cfg = WorkConfig(
        server_url=pool_server.ws_url,
        worker_key=WORKER_KEY,
        worker_id="twin",
        worker_name="second",
        reconnect_max=0.2,
    )
    second = Agent(cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")
    task = asyncio.create_task(second.run())
    try:
        await wait_for(lambda: "in use" in second.last_error, what="the refusal")
        refused_while_first_there = pool_server.pool.get("twin") is first_handle
        await first.drain(0)
        await wait_for(
            lambda: (h := pool_server.pool.get("twin")) is not None and h.name == "second",
            what="the second process to take the id",
        )
        alive = not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert (True, True) == (refused_while_first_there, alive)
