"""Draining: a worker (or the server) that is asked to stop takes no new requests, finishes
those in flight within its drain timeout, then leaves cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.testing import create_fake_ollama_app, serve_app

from .cli_helpers import CliProcess, cli_env, cli_process, ws_url
from .conftest import (
    API_KEY,
    WORKER_KEY,
    PoolServer,
    StartWorker,
    wait_for,
)
from .resilience_helpers import (
    MODEL,
    STEP,
    Answer,
    chat,
    echo_of,
    handle_of,
    post,
    prompts_seen,
    running_agent,
    streaming,
)

#: Seconds between two streamed tokens of the slow backends here.
DELAY = 0.05
#: A prompt whose streamed echo takes 30 x DELAY = 1.5 s.
SLOW = " ".join(f"w{i}" for i in range(29))
#: A prompt whose streamed echo would take 10 s.
ENDLESS = " ".join(f"w{i}" for i in range(199))


def assert_complete(answer: Answer, prompt: str) -> None:
    assert (200, echo_of(prompt), "[DONE]") == (answer.status, answer.text, answer.events[-1])


def assert_cut(answer: Answer) -> None:
    assert answer.stream_error is not None, answer.body[-300:]
    assert "[DONE]" not in answer.events


# --- the agent ------------------------------------------------------------------------------


async def test_a_draining_worker_finishes_its_stream_and_gets_no_new_request(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A draining worker gets no new request, finishes its stream, then its run() returns."""
    slow = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    other = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    async with (
        running_agent(pool_server, str(slow.make_url(""))) as draining,
        streaming(pool_server.url, SLOW) as stream,
    ):
        await start_worker(pool_server, "ollama", backend_url=str(other.make_url("")))
        drain = asyncio.create_task(draining.agent.drain(STEP))
        handle = handle_of(pool_server, draining.agent)
        await wait_for(lambda: handle.draining, what="the server to see the drain")
        meanwhile = [await post(pool_server.url, chat(f"new {i}", stream=False)) for i in range(4)]
        answer = await stream.rest()
        finished = await asyncio.wait_for(drain, STEP)
        await asyncio.wait_for(draining.task, STEP)

    assert_complete(answer, SLOW)
    assert [(200, echo_of(f"new {i}")) for i in range(4)] == [(a.status, a.text) for a in meanwhile]
    assert [SLOW] == prompts_seen(slow.app)
    assert finished
    assert pool_server.pool.get(draining.agent.cfg.worker_id) is None


async def test_a_drain_with_timeout_zero_cuts_requests_in_flight(
    aiohttp_server: AiohttpServer, pool_server: PoolServer
) -> None:
    """``drain(0)`` cuts the stream in flight with an error event and run() returns."""
    slow = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    async with (
        running_agent(pool_server, str(slow.make_url(""))) as worker,
        streaming(pool_server.url, ENDLESS) as stream,
    ):
        finished = await asyncio.wait_for(worker.agent.drain(0), STEP)
        answer = await stream.rest()
        await asyncio.wait_for(worker.task, STEP)

    assert not finished
    assert_cut(answer)
    assert 0 == len(worker.agent.jobs)


# --- the real command line ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def work_process(
    server: PoolServer, backend_url: str, *args: str
) -> AsyncIterator[CliProcess]:
    """``llamapool work`` on a fake Ollama, registered with ``server``."""
    env = cli_env(SERVER_URL=server.ws_url, WORKER_KEY=WORKER_KEY, BACKEND_URL=backend_url)
    async with cli_process(
        "work", "--backend", "ollama", "--worker-id", "cli", *args, env=env
    ) as proc:
        await proc.event("worker_registered")
        await wait_for(lambda: server.pool.get("cli") is not None, what="the CLI worker")
        yield proc


async def test_sigterm_lets_a_work_process_finish_its_stream_and_exit_0(
    pool_server: PoolServer,
) -> None:
    """On SIGTERM ``llamapool work`` takes no new request, finishes its stream and exits 0."""
    async with (
        serve_app(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY)) as backend_url,
        work_process(pool_server, backend_url, "--drain-timeout", "30s") as worker,
        streaming(pool_server.url, SLOW) as stream,
    ):
        worker.proc.send_signal(signal.SIGTERM)
        handle = pool_server.pool.get("cli")
        await wait_for(lambda: handle is not None and handle.draining, what="draining")
        answer = await stream.rest()
        code = await worker.wait(timeout=STEP)

    assert_complete(answer, SLOW)
    assert 0 == code
    assert "worker_draining" in [e["event"] for e in worker.events]
    assert "Traceback" not in worker.stderr


async def test_a_second_sigterm_stops_a_draining_work_process_at_once(
    pool_server: PoolServer,
) -> None:
    """A second SIGTERM stops a draining ``llamapool work`` at once, cutting its stream cleanly."""
    async with (
        serve_app(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY)) as backend_url,
        work_process(pool_server, backend_url, "--drain-timeout", "-1") as worker,
        streaming(pool_server.url, ENDLESS) as stream,
    ):
        worker.proc.send_signal(signal.SIGTERM)
        handle = pool_server.pool.get("cli")
        await wait_for(lambda: handle is not None and handle.draining, what="draining")
        worker.proc.send_signal(signal.SIGTERM)
        code = await worker.wait(timeout=2)
        answer = await stream.rest()

    assert 0 == code
    assert_cut(answer)
    assert "Traceback" not in worker.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_lets_the_server_finish_its_stream_and_close_workers_cleanly(
    sig: signal.Signals,
) -> None:
    """On SIGTERM ``serve`` takes no new request, finishes its stream, closes workers with 1001."""
    settings = cli_env(API_KEY=API_KEY, WORKER_KEY=WORKER_KEY)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    backend = create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY)
    async with (
        serve_app(backend) as backend_url,
        cli_process(
            "serve", "--host", "127.0.0.1", "--port", "0", "--drain-timeout", "30s", env=settings
        ) as server,
    ):
        url = str((await server.event("server_listening"))["url"])
        worker_env = cli_env(SERVER_URL=ws_url(url), WORKER_KEY=WORKER_KEY, BACKEND_URL=backend_url)
        async with cli_process("work", "--backend", "ollama", env=worker_env) as worker:
            await worker.event("worker_registered")
            async with aiohttp.ClientSession() as kept_alive, streaming(url, SLOW) as stream:
                before = await kept_alive.post(
                    url + "/v1/chat/completions", json=chat("before", stream=False), headers=auth
                )
                await before.read()
                server.proc.send_signal(sig)
                await server.event("server_draining")
                with pytest.raises(aiohttp.ClientConnectionError):
                    await post(url, chat("too late", stream=False))
                with pytest.raises(aiohttp.ClientConnectionError):
                    await kept_alive.post(
                        url + "/v1/chat/completions", json=chat("late", stream=False), headers=auth
                    )
                answer = await stream.rest()
            code = await server.wait(timeout=STEP)
            left = await worker.event("server_disconnected")

    assert_complete(answer, SLOW)
    assert 0 == code
    assert 1001 == left["code"]
    assert "Traceback" not in server.stderr + worker.stderr
    assert 200 == before.status
    assert [SLOW, "before"] == prompts_seen(backend)
