"""Requests end when they should: a client that leaves cancels its backend call, REQUEST_TIMEOUT
bounds a whole request, and the idle timeout ends silent streams but never busy ones."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.backends.demo import EchoOptions, EchoResponder
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
    Gate,
    chat,
    echo_of,
    gated_ollama,
    get_text,
    metric,
    post,
    runner_server,
    state_of,
    streaming,
)

DELAY = 0.1
#: 50 streamed tokens: 5 s of generation at DELAY.
LONG = " ".join(f"t{i}" for i in range(49))


def connections(backend: TestServer) -> int:
    """TCP connections the fake backend has open now."""
    assert backend.runner is not None
    assert backend.runner.server is not None
    return len(backend.runner.server.connections)


def url_of(backend: TestServer) -> str:
    return str(backend.make_url("")).rstrip("/")


def stalling_ollama(release: asyncio.Event) -> web.Application:
    """A runtime that streams one event of its answer, then goes quiet until ``release``."""
    echo = EchoResponder(EchoOptions(models=(MODEL,)))

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = {"choices": [{"index": 0, "delta": {"content": "echo:"}, "finish_reason": None}]}
        await response.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await release.wait()
        return response

    app = web.Application()
    app.add_routes([web.get("/api/tags", echo.api_tags), web.post("/v1/chat/completions", stall)])
    return app


# --- cancellation ---------------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["test-server", "app-runner"])
async def test_a_client_leaving_mid_stream_aborts_the_backend_and_counts_as_cancelled(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runner: str,
) -> None:
    """A client leaving mid-stream aborts the backend call within 1 s and counts as cancelled."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    async with contextlib.AsyncExitStack() as stack:
        server = pool_server
        if runner == "app-runner":
            server = await stack.enter_async_context(runner_server())
        agent = await start_worker(server, "ollama", backend_url=url_of(backend))
        async with streaming(server.url, LONG):
            busy = (len(agent.jobs), connections(backend))
        loop = asyncio.get_running_loop()
        left = loop.time()
        await wait_for(
            lambda: (0, 0) == (len(agent.jobs), connections(backend)),
            timeout=1.0,
            what="the worker to abort its backend call",
        )
        aborted_after = loop.time() - left
        metrics = await get_text(server.url, "/metrics")
        state = await state_of(server)

    assert (1, 1) == busy
    assert aborted_after < 1.0
    counted = {
        outcome: metric(metrics, "llamapool_model_requests_total", model=MODEL, outcome=outcome)
        for outcome in ("success", "error", "cancelled")
    }
    assert {"success": 0, "error": 0, "cancelled": 1} == counted
    assert 0 == state["server"]["jobs_failed_total"]


# --- REQUEST_TIMEOUT ------------------------------------------------------------------------


async def test_request_timeout_before_the_headers_answers_504_json(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A request unanswered at REQUEST_TIMEOUT gets a 504 JSON error; the backend call stops."""
    server = await start_server(request_timeout=0.5)
    backend = await aiohttp_server(gated_ollama(Gate()))
    agent = await start_worker(server, "ollama", backend_url=url_of(backend))

    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await post(server.url, chat("never answered", stream=True))
    took = loop.time() - started
    await wait_for(
        lambda: (0, 0) == (len(agent.jobs), connections(backend)),
        timeout=1.0,
        what="the backend call to be aborted",
    )

    assert (504, "application/json") == (answer.status, answer.headers["Content-Type"])
    assert "timeout" == answer.json()["error"]["code"]
    assert 0.5 <= took < 1.5


async def test_request_timeout_mid_stream_ends_it_with_an_error_event(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A stream still going at REQUEST_TIMEOUT ends with an error event naming the timeout."""
    server = await start_server(request_timeout=1.0)
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    agent = await start_worker(server, "ollama", backend_url=url_of(backend))

    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await post(server.url, chat(LONG, stream=True))
    took = loop.time() - started
    await wait_for(lambda: 0 == len(agent.jobs), timeout=1.0, what="the job to be cancelled")

    assert 200 == answer.status
    assert "REQUEST_TIMEOUT" in (answer.stream_error or "")
    assert "[DONE]" not in answer.events
    assert answer.text
    assert echo_of(LONG).startswith(answer.text)
    assert 1.0 <= took < 2.0


# --- the idle timeout -----------------------------------------------------------------------


async def test_a_stream_silent_past_the_idle_timeout_ends_with_an_error_event(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A stream silent for the idle timeout ends with an error event and its job is cancelled."""
    server = await start_server(idle_timeout=0.5)
    release = asyncio.Event()
    backend = await aiohttp_server(stalling_ollama(release))
    agent = await start_worker(server, "ollama", backend_url=url_of(backend))

    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await post(server.url, chat("hello", stream=True))
    took = loop.time() - started
    await wait_for(lambda: 0 == len(agent.jobs), timeout=1.0, what="the job to be cancelled")
    release.set()

    assert "echo:" == answer.text
    assert "IDLE_TIMEOUT" in (answer.stream_error or "")
    assert 0.5 <= took < 1.5


async def test_a_long_stream_that_keeps_sending_outlives_the_idle_timeout(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A stream that keeps sending runs ten times the idle timeout and arrives whole."""
    server = await start_server(idle_timeout=0.5)
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    await start_worker(server, "ollama", backend_url=url_of(backend))

    answer = await post(server.url, chat(LONG, stream=True), timeout=2 * STEP)

    assert (200, echo_of(LONG), "[DONE]") == (answer.status, answer.text, answer.events[-1])
