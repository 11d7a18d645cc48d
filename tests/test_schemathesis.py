"""Schemathesis against the server's own ``/openapi.json``: a real server and a demo worker on
loopback, every documented operation called with generated valid and invalid requests.

Schemathesis calls are synchronous, so the server runs on its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from llamapool.config import ServeConfig, WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.server.app import create_app
from llamapool.server.openapi import build_document
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .conftest import API_KEY, WORKER_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CFG = ServeConfig(host="127.0.0.1", port=0, api_keys=API_KEY, worker_keys=WORKER_KEY)
#: Each holds for every documented operation: the document claims no more than the server
#: does (relayed routes document the backend's answers as "any other status").
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
    allow_header_conformance,
]
SETTINGS: dict[str, Any] = {
    "headers": AUTH,
    "request-timeout": 10,
    "generation": {"max-examples": 25, "mode": "all", "database": "none"},
    "phases": {"stateful": {"enabled": False}},
}


class LiveServer:
    """The server and one demo worker on an event loop of their own, in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(create_app(CFG))
        self.url = ""
        self._worker: asyncio.Task[None] | None = None

    def __enter__(self) -> LiveServer:
        self.thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        cfg = WorkConfig(
            server_url=f"ws://{host}:{port}{CFG.ws_path}",
            worker_key=WORKER_KEY,
            worker_id="demo-worker",
        )
        agent = Agent(cfg, load_backend("demo")(BackendSettings(url="")), backend_name="demo")
        self._worker = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.registered.wait(), 10)

    async def _stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        await self.runner.cleanup()


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    with LiveServer() as server:
        yield server


def test_the_document_is_served_without_a_key(live_server: LiveServer) -> None:
    """GET /openapi.json answers, with no key, the document of the running configuration."""
    resp = requests.get(live_server.url + "/openapi.json", timeout=10)

    assert 200 == resp.status_code
    assert build_document(CFG) == resp.json()


#: The document a server with CFG publishes (the test above checks it is the one served);
#: schemathesis' lazy loading from a fixture does not work with pytest 9.
schema = schemathesis.openapi.from_dict(
    build_document(CFG), config=schemathesis.Config.from_dict(SETTINGS)
).exclude(path="/api/v1/state/stream")  # an endless event stream: a request would never end


@schema.parametrize()
def test_the_server_keeps_to_its_document(
    case: schemathesis.Case[Any], live_server: LiveServer
) -> None:
    """Generated requests to every documented operation get no server error and answers whose
    status, content type and body the document allows; invalid ones are refused and the API
    key is enforced."""
    case.call_and_validate(base_url=live_server.url, headers=AUTH, checks=CHECKS)
