"""The worker's checks of its backend: each one bounded, none in the way of connecting, and
a status sent (and logged by the server) only when it changed.

The worker checks its backend at start and every ``probe_interval``. A backend can hang
rather than fail: it takes the connection and never answers. A check that has no answer
within ``probe_interval`` counts as the backend down, and the worker dials the server
whatever its backend does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from llamapool.config import WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.protocol import (
    FEATURES,
    PROTOCOL_VERSION,
    STATUS_NOT_READY,
    STATUS_READY,
    Register,
    Registered,
    StatusUpdate,
    decode,
    encode,
)
from llamapool.testing import create_broken_app, create_fake_ollama_app, fake_log
from llamapool.worker.agent import FIRST_CHECK_GRACE, Agent
from llamapool.worker.loader import load_backend

from .conftest import WORKER_KEY, PoolServer, StartWorker, url_of, wait_for

MODEL = "llama3:8b"
#: What a test allows on top of a bound: a check, a dial and a register on loopback.
SLACK = 2.0


class ModelList:
    """An Ollama runtime's model list (``GET /api/tags``) that a test changes, or makes hang:
    while ``answering`` is clear, every listing is held unanswered (the socket stays open)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models = list(models)
        self.answering = asyncio.Event()
        self.answering.set()

    def app(self) -> web.Application:
        async def api_tags(request: web.Request) -> web.Response:
            await self.answering.wait()
            return web.json_response({"models": [{"name": m} for m in self.models]})

        app = web.Application()
        app.router.add_get("/api/tags", api_tags)
        return app


@contextlib.asynccontextmanager
async def serving(aiohttp_server: AiohttpServer, models: ModelList) -> AsyncIterator[str]:
    """Run ``models`` on loopback; its URL. Held listings are let go at the end."""
    server = await aiohttp_server(models.app())
    try:
        yield url_of(server)
    finally:
        models.answering.set()


async def test_a_hung_check_counts_as_the_backend_down_and_checks_go_on(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A model listing that hangs is given up after probe_interval: the worker is not_ready,
    says why, and the server stops routing to it; once the backend answers again, the next
    check brings its new models."""
    tags = ModelList([MODEL])
    async with serving(aiohttp_server, tags) as url:
        agent = await start_worker(pool_server, "ollama", backend_url=url, probe_interval=0.2)
        handle = pool_server.pool.get(agent.cfg.worker_id)
        assert handle is not None

        tags.answering.clear()
        await wait_for(lambda: not agent.backend_up, what="the hung check to time out")
        await wait_for(lambda: not handle.routable, what="the server to stop routing")
        down = (agent.state, agent.last_error)
        tags.models = [MODEL, "qwen:7b"]
        tags.answering.set()
        await wait_for(lambda: handle.routable, what="the server to route again")

    assert ("not_ready", f"backend: {url} did not answer within 0.2s") == down
    assert ("connected", [MODEL, "qwen:7b"]) == (agent.state, agent.models)
    assert frozenset({MODEL, "qwen:7b"}) == handle.models


async def test_a_backend_that_hangs_at_start_does_not_keep_the_worker_from_the_server(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """With its first check unanswered (and probe_interval far off), the worker registers
    within FIRST_CHECK_GRACE, serving nothing yet; the models follow when the check answers."""
    tags = ModelList([MODEL])
    tags.answering.clear()
    async with serving(aiohttp_server, tags) as url:
        started = time.monotonic()
        agent = await start_worker(pool_server, "ollama", backend_url=url, probe_interval=60)
        took = time.monotonic() - started
        handle = pool_server.pool.get(agent.cfg.worker_id)
        assert handle is not None
        before = (agent.state, handle.models)

        tags.answering.set()
        await wait_for(lambda: MODEL in handle.models, what="the models to follow")

    assert took < FIRST_CHECK_GRACE + SLACK, f"registered after {took:.2f}s"
    assert ("not_ready", frozenset()) == before
    assert ("connected", True) == (agent.state, handle.routable)


# --- a status is news once --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def recording_server(aiohttp_server: AiohttpServer) -> AsyncIterator[tuple[str, list[str]]]:
    """A llamapool-py server as far as the status goes: it confirms each register with every
    feature and records the status updates it gets. Yields its worker URL and that record."""
    statuses: list[str] = []

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the register
        await ws.send_str(encode(Registered(features=list(FEATURES))))
        async for msg in ws:
            match decode(msg.data):
                case StatusUpdate(status=status):
                    statuses.append(status)
        return ws

    app = web.Application()
    app.add_routes([web.get("/workers/connect", ws_handler)])
    server = await aiohttp_server(app)
    yield f"ws://127.0.0.1:{server.port}/workers/connect", statuses


async def test_a_worker_whose_backend_stays_down_says_so_once(
    aiohttp_server: AiohttpServer,
) -> None:
    """Check after check failing, the worker sends not_ready once, not once per check."""
    backend = await aiohttp_server(create_broken_app(status=500))
    async with recording_server(aiohttp_server) as (url, statuses):
        cfg = WorkConfig(
            server_url=url,
            worker_key=WORKER_KEY,
            backend_url=url_of(backend),
            probe_interval=0.02,
        )
        ollama = load_backend("ollama")(BackendSettings(url=cfg.backend_url))
        agent = Agent(cfg, ollama, backend_name="ollama")
        task = asyncio.create_task(agent.run())
        try:
            await wait_for(lambda: agent.registered.is_set(), what="the register")
            await wait_for(
                lambda: len(fake_log(backend.app).requests) >= 10, what="ten failed checks"
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert [STATUS_NOT_READY] == statuses


async def test_the_server_logs_a_status_only_when_it_changed(pool_server: PoolServer) -> None:
    """A worker that says not_ready three times (a Go-era worker may) is taken out of routing
    once and logged once; ready then puts it back."""
    register = Register(
        worker_id="repeats",
        worker_key=WORKER_KEY,
        models=[MODEL],
        protocol=PROTOCOL_VERSION,
        features=list(FEATURES),
    )
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
            await ws.send_str(encode(register))
            await ws.receive()  # registered
            for status in (STATUS_NOT_READY, STATUS_NOT_READY, STATUS_NOT_READY, STATUS_READY):
                await ws.send_str(encode(StatusUpdate(status)))
            await wait_for(lambda: any(e.get("status") == STATUS_READY for e in logs), what="ready")

    changes = [e["status"] for e in logs if e["event"] == "worker_status_changed"]
    assert [STATUS_NOT_READY, STATUS_READY] == changes


async def test_a_model_id_the_server_would_refuse_is_left_out_not_the_worker(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A backend listing one id too long to serve: the worker registers with its other models
    and says once what it left out (the server would refuse the whole register for it, at
    every reconnect)."""
    too_long = "m" * 300
    backend = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b", too_long]))
    with capture_logs() as events:
        agent = await start_worker(pool_server, "ollama", backend_url=url_of(backend))
        await agent.probe()  # a second check of the same list says nothing new

    assert ["llama3:8b"] == agent.models
    assert ["llama3:8b"] == sorted(pool_server.pool.get(agent.cfg.worker_id).models)
    assert [1] == [e["count"] for e in events if e["event"] == "backend_models_skipped"]
