"""When every worker is busy, requests wait in a bounded FIFO per model instead of failing, and
leave it for a freed slot, a new worker, a timeout, a full queue or a client that gave up."""

from __future__ import annotations

import asyncio

from aiohttp import web
from pytest_aiohttp import AiohttpServer

from llamapool.testing import create_fake_ollama_app

from .conftest import (
    PoolServer,
    StartServer,
    StartWorker,
    wait_for,
)
from .resilience_helpers import (
    MODEL,
    STEP,
    Answer,
    Gate,
    chat,
    echo_of,
    gated_ollama,
    get_text,
    metric,
    post,
    prompts_seen,
    runner_server,
    state_of,
    until_queued,
)


def ask(server: PoolServer, prompt: str, *, stream: bool = False) -> asyncio.Task[Answer]:
    return asyncio.create_task(post(server.url, chat(prompt, stream=stream), timeout=2 * STEP))


async def busy_worker(
    server: PoolServer, start_worker: StartWorker, aiohttp_server: AiohttpServer, gate: Gate
) -> tuple[asyncio.Task[Answer], web.Application]:
    """A worker with one slot, taken by a request its backend holds at ``gate``."""
    backend = await aiohttp_server(gated_ollama(gate))
    await start_worker(server, "ollama", backend_url=str(backend.make_url("")), max_concurrency=1)
    holding = ask(server, "first")
    await wait_for(lambda: 1 == gate.held, what="the first request to reach the backend")
    return holding, backend.app


async def test_queued_requests_are_served_in_order_as_slots_free(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Requests for a full worker wait in line, shown in state and metrics, and run in order."""
    gate = Gate()
    holding, backend = await busy_worker(pool_server, start_worker, aiohttp_server, gate)
    waiting = []
    for i in range(3):
        waiting.append(ask(pool_server, f"queued {i}", stream=i == 1))
        await until_queued(pool_server, i + 1)
    state = await state_of(pool_server)
    metrics = await get_text(pool_server.url, "/metrics")

    gate.opened.set()
    answers = [await task for task in (holding, *waiting)]
    after = await state_of(pool_server)
    metrics_after = await get_text(pool_server.url, "/metrics")

    assert 3 == state["server"]["scheduler_queue_len"]
    assert [3] == [w["queue_len"] for w in state["workers"]]
    assert 3 == metric(metrics, "llamapool_queue_length")
    prompts = ["first", "queued 0", "queued 1", "queued 2"]
    assert [(200, echo_of(p)) for p in prompts] == [(a.status, a.text) for a in answers]
    assert prompts == prompts_seen(backend)
    assert (0, [0]) == (
        after["server"]["scheduler_queue_len"],
        [w["queue_len"] for w in after["workers"]],
    )
    assert 3 == metric(metrics_after, "llamapool_queue_wait_seconds_count")


async def test_a_queued_request_goes_to_a_worker_that_joins(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A queued request goes at once to a worker with its model that joins the pool."""
    gate = Gate()
    holding, _ = await busy_worker(pool_server, start_worker, aiohttp_server, gate)
    queued = ask(pool_server, "take me")
    await until_queued(pool_server, 1)

    fresh = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, "ollama", backend_url=str(fresh.make_url("")))
    answer = await asyncio.wait_for(queued, STEP)
    still_held = gate.held
    gate.opened.set()
    await holding

    assert (200, echo_of("take me")) == (answer.status, answer.text)
    assert 1 == still_held
    assert ["take me"] == prompts_seen(fresh.app)


async def test_a_full_queue_answers_429_with_retry_after(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A request that finds the queue full gets a 429 JSON error with Retry-After at once."""
    server = await start_server(queue_size=1)
    gate = Gate()
    holding, _ = await busy_worker(server, start_worker, aiohttp_server, gate)
    queued = ask(server, "in line")
    await until_queued(server, 1)

    refused = await post(server.url, chat("one too many", stream=True))
    gate.opened.set()
    answers = [await holding, await queued]

    assert 429 == refused.status
    assert refused.headers["Retry-After"].isdigit()
    assert "application/json" == refused.headers["Content-Type"]
    assert ("queue_full", "rate_limit_error") == (
        refused.json()["error"]["code"],
        refused.json()["error"]["type"],
    )
    assert [200, 200] == [a.status for a in answers]


async def test_a_request_waiting_past_the_queue_timeout_gets_503(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A request that waits past the queue timeout gets a 503 JSON error."""
    server = await start_server(queue_timeout=0.3)
    gate = Gate()
    holding, backend = await busy_worker(server, start_worker, aiohttp_server, gate)

    loop = asyncio.get_running_loop()
    started = loop.time()
    timed_out = await post(server.url, chat("too patient", stream=False))
    waited = loop.time() - started
    queue_after = len(server.pool), (await state_of(server))["server"]["scheduler_queue_len"]
    gate.opened.set()
    await holding

    assert 503 == timed_out.status
    assert "queue_timeout" == timed_out.json()["error"]["code"]
    assert 0.3 <= waited < 0.3 + 1
    assert (1, 0) == queue_after
    assert ["first"] == prompts_seen(backend)


async def test_a_client_that_gives_up_while_queued_is_dropped(
    aiohttp_server: AiohttpServer, start_worker: StartWorker
) -> None:
    """A client that leaves while queued is dropped from the queue and never reaches a worker."""
    gate = Gate()
    async with runner_server() as server:
        holding, backend = await busy_worker(server, start_worker, aiohttp_server, gate)
        impatient = ask(server, "never mind")
        await until_queued(server, 1)
        impatient.cancel()  # the client hangs up
        await until_queued(server, 0)
        state = await state_of(server)

        gate.opened.set()
        first = await holding
        later = await post(server.url, chat("later", stream=False))

    assert 0 == state["server"]["scheduler_queue_len"]
    assert [200, 200] == [first.status, later.status]
    assert ["first", "later"] == prompts_seen(backend)
