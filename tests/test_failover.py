"""Workers come and go: a silent one is evicted and its requests end or move, a dropped one
reconnects and replaces its old entry, and one whose backend is down gets no traffic."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.testing import create_fake_ollama_app, fake_log

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
    free_port,
    go_worker,
    handle_of,
    link_of,
    post,
    prompts_seen,
    runner_server,
    running_agent,
    serve_on,
    state_of,
)

WORKER_TIMEOUT = 1.0
#: Agents beat often enough to outlive the short worker timeout of these tests.
BEATING = {"heartbeat_interval": 0.2, "reconnect_max": 0.2}


def sse_chunk(text: str) -> bytes:
    event = {
        "id": "chatcmpl-go",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\n"


# --- heartbeats and eviction ----------------------------------------------------------------


async def test_unanswered_requests_of_an_evicted_worker_are_retried_elsewhere(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """Requests an evicted silent worker held unanswered are retried elsewhere and succeed."""
    server = await start_server(worker_timeout=WORKER_TIMEOUT)
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    async with go_worker(server) as silent:
        posts = [
            asyncio.create_task(post(server.url, chat(f"held {i}", stream=i == 1), timeout=10))
            for i in range(2)
        ]
        held = [await silent.receive() for _ in posts]
        await start_worker(server, "ollama", backend_url=str(backend.make_url("")), **BEATING)
        started = time.monotonic()
        await silent.fall_silent()
        answers = await asyncio.gather(*posts)
        elapsed = time.monotonic() - started

    assert ["http_proxy_request"] * 2 == [m["type"] for m in held]
    assert [(200, echo_of("held 0")), (200, echo_of("held 1"))] == [
        (a.status, a.text) for a in answers
    ]
    assert ["held 0", "held 1"] == sorted(prompts_seen(backend.app))
    assert server.pool.get(silent.worker_id) is None
    assert elapsed < WORKER_TIMEOUT + 2


async def test_requests_of_an_evicted_worker_with_no_replacement_end_cleanly(
    start_server: StartServer,
) -> None:
    """Alone, an evicted worker's stream raises APIError in the SDK; its whole request gets 502."""
    server = await start_server(worker_timeout=WORKER_TIMEOUT)
    messages: Any = [{"role": "user", "content": "stream me"}]
    async with (
        go_worker(server) as silent,
        openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10
        ) as client,
    ):
        creating = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        )
        streamed = await silent.receive()
        await silent.headers(streamed["request_id"])
        await silent.chunk(streamed["request_id"], sse_chunk("echo:"))
        stream = await asyncio.wait_for(creating, STEP)
        first = await asyncio.wait_for(anext(aiter(stream)), STEP)

        whole = asyncio.create_task(post(server.url, chat("whole", stream=False), timeout=10))
        await silent.receive()
        await silent.fall_silent()

        async def rest() -> list[Any]:
            return [chunk async for chunk in stream]

        with pytest.raises(openai.APIError) as raised:
            await asyncio.wait_for(rest(), 10)
        answer = await whole

    assert "echo:" == first.choices[0].delta.content
    assert "worker disconnected" in raised.value.message
    assert 502 == answer.status
    assert "application/json" == answer.headers["Content-Type"]
    assert "worker_error" == answer.json()["error"]["code"]
    assert 0 == len(server.pool)


# --- reconnect ------------------------------------------------------------------------------


async def test_a_worker_whose_socket_the_server_closed_reconnects_and_serves(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A worker whose socket the server closed reconnects, is listed once and serves again."""
    agent = await start_worker(pool_server, "demo", reconnect_max=0.2)
    old = handle_of(pool_server, agent)

    await link_of(pool_server, agent.cfg.worker_id).ws.close()
    await wait_for(
        lambda: pool_server.pool.get(agent.cfg.worker_id) not in (None, old),
        timeout=STEP,
        what="the worker to reconnect",
    )
    answer = await post(pool_server.url, chat("again", stream=False, model="demo"))
    state = await state_of(pool_server)

    assert (200, echo_of("again")) == (answer.status, answer.text)
    assert [(agent.cfg.worker_id, "idle")] == [(w["id"], w["status"]) for w in state["workers"]]
    assert 1 == len(pool_server.pool)


async def test_a_worker_reconnects_to_a_restarted_server_on_the_same_port() -> None:
    """A worker reconnects by itself to a server restarted on the same port and serves there."""
    port = free_port()
    async with (
        serve_on(create_fake_ollama_app(models=[MODEL]), free_port()) as backend_url,
        runner_server(port) as first,
        running_agent(first, backend_url, reconnect_max=0.3) as worker,
    ):
        before = await post(first.url, chat("before", stream=False))
        await first.stop()
        await wait_for(lambda: not worker.agent.connected, what="the worker to notice")
        async with runner_server(port) as second:
            await wait_for(
                lambda: second.pool.get(worker.agent.cfg.worker_id) is not None,
                timeout=STEP,
                what="the worker to reconnect to the new server",
            )
            after = await post(second.url, chat("after", stream=False))
            workers = (await state_of(second))["workers"]

    assert [(200, echo_of("before")), (200, echo_of("after"))] == [
        (before.status, before.text),
        (after.status, after.text),
    ]
    assert [worker.agent.cfg.worker_id] == [w["id"] for w in workers]


async def test_a_reconnect_with_the_same_id_replaces_the_old_connection(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The same worker process registering again (its old link not yet noticed dead) replaces
    that connection; the id is listed once."""
    async with (
        go_worker(pool_server, worker_id="same-id", instance="s3cret") as stale,
        go_worker(pool_server, worker_id="same-id", instance="s3cret"),
    ):
        closing = await stale.ws.receive(timeout=STEP)
        state = await state_of(pool_server)

        assert (1001, 1) == (closing.data, len(pool_server.pool))
        assert [("same-id", "idle")] == [(w["id"], w["status"]) for w in state["workers"]]


# --- backend health -------------------------------------------------------------------------


async def test_a_worker_started_before_its_backend_serves_once_it_is_up(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A worker whose backend is down gets no request (404) and serves once the backend is up."""
    port = free_port()
    agent = await start_worker(
        pool_server, "ollama", backend_url=f"http://127.0.0.1:{port}", probe_interval=60
    )
    refused = await post(pool_server.url, chat("too early", stream=False))
    handle = handle_of(pool_server, agent)
    down = (handle.ready, sorted(handle.models))

    app = create_fake_ollama_app(models=[MODEL])
    async with serve_on(app, port):
        await agent.probe()
        await wait_for(lambda: handle.ready and MODEL in handle.models, what="models_update")
        answer = await post(pool_server.url, chat("now", stream=False))

    assert 404 == refused.status
    assert "model_not_found" == refused.json()["error"]["code"]
    assert (False, []) == down
    assert (200, echo_of("now")) == (answer.status, answer.text)
    assert ["now"] == prompts_seen(app)


async def test_a_worker_whose_backend_goes_down_gets_no_traffic_until_it_is_back(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A worker whose backend is down gets no request until its backend is back."""
    port = free_port()
    flaky_app = create_fake_ollama_app(models=[MODEL])
    steady_app = create_fake_ollama_app(models=[MODEL])
    async with serve_on(steady_app, free_port()) as steady_url:
        await start_worker(pool_server, "ollama", backend_url=steady_url)
        async with serve_on(flaky_app, port) as flaky_url:
            flaky = await start_worker(
                pool_server, "ollama", backend_url=flaky_url, probe_interval=0.1
            )
        handle = handle_of(pool_server, flaky)
        await wait_for(lambda: not handle.ready, timeout=STEP, what="not_ready")
        during = [await post(pool_server.url, chat(f"down {i}", stream=False)) for i in range(4)]
        seen_while_down = len(fake_log(flaky_app).requests)

        back_app = create_fake_ollama_app(models=[MODEL])
        async with serve_on(back_app, port):
            await wait_for(lambda: handle.ready, timeout=STEP, what="ready again")
            after = [await post(pool_server.url, chat(f"up {i}", stream=True)) for i in range(4)]

    assert [(200, echo_of(f"down {i}")) for i in range(4)] == [(a.status, a.text) for a in during]
    assert [(200, echo_of(f"up {i}")) for i in range(4)] == [(a.status, a.text) for a in after]
    assert 0 == len(prompts_seen(flaky_app))
    assert all(r.path == "/api/tags" for r in fake_log(flaky_app).requests[:seen_while_down])
    assert prompts_seen(back_app), "the recovered worker took none of the requests"
