"""The shortest path through the pool: a client, the server, a demo worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp

from llamapool.worker.agent import Agent

from .conftest import PoolServer


async def test_chat_completion_through_demo_worker(
    pool_server: PoolServer, start_worker: Callable[..., Awaitable[Agent]]
) -> None:
    """A chat completion sent to the server is answered by the demo worker's echo."""
    await start_worker(pool_server, "demo")
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            pool_server.url + "/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hello pool"}]},
            headers=pool_server.auth,
        )
        body = await resp.json()
    assert 200 == resp.status
    assert "echo: hello pool" == body["choices"][0]["message"]["content"]
