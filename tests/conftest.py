"""Shared fixtures: a real server on loopback and real workers dialing into it."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import Phase, settings

from llamapool.config import ServeConfig, WorkConfig
from llamapool.plugin_api import Backend, BackendSettings
from llamapool.server.app import create_app
from llamapool.server.appkeys import POOL
from llamapool.server.cluster.endpoint import CLUSTER
from llamapool.server.pool import Pool
from llamapool.testing import url_of
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

#: The types of the ``start_server`` and ``start_worker`` fixtures, for annotations.
StartServer = Callable[..., Awaitable["PoolServer"]]
StartWorker = Callable[..., Awaitable[Agent]]

# Property-based tests are deterministic unless asked otherwise: the "ci" profile (the default)
# derandomizes (the examples come from each test's own fixed seed), keeps no example database,
# and does not shrink, so a failure shows at once and the same way on every machine.
# HYPOTHESIS_PROFILE=explore draws new random examples on each run and shrinks what fails.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    print_blob=True,
)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    if sys.version_info < (3, 11):
        # Python 3.10's SSL transport is never marked closed when its peer drops the connection
        # (aiohttp's client protocol then lets go of it), so it warns when collected; 3.11's
        # rewrite of asyncio's SSL layer marks it. Seen in test_tls on 3.10.13 only.
        config.addinivalue_line(
            "filterwarnings",
            "ignore:Exception ignored in. <function _SSLProtocolTransport.__del__"
            ":pytest.PytestUnraisableExceptionWarning",
        )


T = TypeVar("T")

API_KEY = "test-api-key"
WORKER_KEY = "test-worker-key"


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 5.0,
    what: str = "condition",
    last: object = None,
) -> None:
    """Poll ``condition`` (a check, or an async one that asks a server) until it holds; fail
    the test with ``what``, and ``last`` (what the check saw, which it may fill) if given."""
    deadline = time.monotonic() + timeout
    while not await _holds(condition):
        if time.monotonic() > deadline:
            seen = "" if last is None else f"; last: {last}"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{seen}")
        await asyncio.sleep(0.01)


async def until(
    fetch: Callable[[], Awaitable[T]],
    condition: Callable[[T], bool],
    *,
    timeout: float = 5.0,
    what: str = "condition",
) -> T:
    """Fetch (a state document, a scrape) until ``condition`` holds of what came; return it."""
    fetched: list[T] = []

    async def holds() -> bool:
        fetched[:] = [await fetch()]
        return condition(fetched[0])

    await wait_for(holds, timeout=timeout, what=what)
    return fetched[0]


async def _holds(condition: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = condition()
    return await result if inspect.isawaitable(result) else result


class PoolServer:
    """A running server and what tests need to reach it."""

    def __init__(self, server: TestServer, cfg: ServeConfig) -> None:
        self.server = server
        self.cfg = cfg

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def ws_url(self) -> str:
        return "ws" + self.url.removeprefix("http") + self.cfg.ws_path

    @property
    def pool(self) -> Pool:
        return self.server.app[POOL]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"} if self.cfg.api_keys else {}


@pytest.fixture
async def start_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[..., Awaitable[PoolServer]]:
    """Start a server; keyword arguments override :class:`ServeConfig` fields."""

    async def start(**overrides: Any) -> PoolServer:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "api_keys": API_KEY,
            "worker_keys": WORKER_KEY,
        }
        settings.update(overrides)
        cfg = ServeConfig(**settings)
        app: web.Application = create_app(cfg)
        server = await aiohttp_server(app, host="127.0.0.1", port=0)
        if CLUSTER in app:  # as `serve` does once it listens
            app[CLUSTER].start(url_of(server))
        return PoolServer(server, cfg)

    return start


@pytest.fixture
async def pool_server(start_server: Callable[..., Awaitable[PoolServer]]) -> PoolServer:
    """A server with the test keys."""
    return await start_server()


@pytest.fixture
async def start_worker() -> AsyncIterator[Callable[..., Awaitable[Agent]]]:
    """Start a worker against a server; stopped at the end of the test.

    ``backend`` is a :class:`Backend` instance or the name of an installed plugin (then
    ``backend_url`` says where it is). The call returns once the server confirmed the worker.
    """
    tasks: list[asyncio.Task[None]] = []

    async def start(
        server: PoolServer,
        backend: Backend | str = "demo",
        *,
        backend_url: str = "",
        backend_api_key: str = "",
        **overrides: Any,
    ) -> Agent:
        if isinstance(backend, str):
            name = backend
            backend = load_backend(name)(BackendSettings(url=backend_url, api_key=backend_api_key))
        else:
            name = type(backend).__name__
        settings: dict[str, Any] = {"server_url": server.ws_url, "worker_key": WORKER_KEY}
        settings.update(overrides)
        agent = Agent(WorkConfig(**settings), backend, backend_name=name)
        task = asyncio.create_task(agent.run())
        tasks.append(task)
        registered = asyncio.create_task(agent.registered.wait())
        done, _ = await asyncio.wait(
            {task, registered}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        if registered not in done:
            registered.cancel()
            if task.done():
                task.result()  # raise the worker's own error
            raise AssertionError("the worker did not register within 10 s")
        await wait_for(lambda: server.pool.get(agent.cfg.worker_id) is not None, what="worker")
        return agent

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
