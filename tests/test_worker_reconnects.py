"""A worker exits only when its key is refused; every other way a server closes on it, it
dials again (so a misbehaviour disconnect never becomes a crash loop under systemd)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from llamapool.backends.demo import DemoBackend
from llamapool.config import WorkConfig
from llamapool.errors import ConfigError
from llamapool.plugin_api import BackendSettings
from llamapool.worker.agent import Agent

from .conftest import WORKER_KEY, wait_for


async def closing_server(
    aiohttp_server: AiohttpServer, code: int, reason: bytes
) -> tuple[str, list[int]]:
    """A server that reads each register and closes with ``code`` and ``reason``; its worker
    URL and a list that grows with each connection."""
    connections: list[int] = []

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        connections.append(len(connections))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await ws.close(code=code, message=reason)
        return ws

    app = web.Application()
    app.add_routes([web.get("/workers/connect", ws_handler)])
    server = await aiohttp_server(app)
    return f"ws://127.0.0.1:{server.port}/workers/connect", connections


def agent_for(url: str) -> Agent:
    cfg = WorkConfig(server_url=url, worker_key=WORKER_KEY, reconnect_max=0.1)
    return Agent(cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (4002, b"too many invalid messages"),
        (4009, b"worker id 'w' is in use by another connected worker"),
        (1008, b"expected register"),
        (1001, b"server shutdown"),
        (1011, b"server error"),
    ],
)
async def test_a_worker_dials_again_after_any_close_but_a_refused_key(
    aiohttp_server: AiohttpServer, code: int, reason: bytes
) -> None:
    """Closed for misbehaviour, an id in use, a register the server would not take, a
    shutdown or an error, the worker keeps dialing."""
    url, connections = await closing_server(aiohttp_server, code, reason)
    task = asyncio.create_task(agent_for(url).run())
    try:
        await wait_for(lambda: len(connections) >= 3, what="the worker to dial three times")
        running = not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert running


async def test_a_worker_whose_key_is_refused_exits_with_a_clear_error(
    aiohttp_server: AiohttpServer,
) -> None:
    """1008 with the reason 'unauthorized' (what Go and llamapool servers send for a wrong
    key) stops the worker with an error naming it, after one attempt."""
    url, connections = await closing_server(aiohttp_server, 1008, b"unauthorized")

    with pytest.raises(ConfigError, match="rejected this worker: unauthorized"):
        await asyncio.wait_for(agent_for(url).run(), timeout=10)

    assert 1 == len(connections)
