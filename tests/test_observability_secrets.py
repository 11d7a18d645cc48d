"""Keys stay secret: no API key, worker key or backend key, right or wrong, shows up in what
the server and the worker publish about themselves or in their logs."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from llamapool.protocol import Register, encode
from llamapool.testing import create_fake_ollama_app
from llamapool.worker.status import create_status_app

from .conftest import (
    API_KEY,
    WORKER_KEY,
    PoolServer,
    StartWorker,
    url_of,
    wait_for,
)
from .observability_helpers import (
    MODEL,
    SSEReader,
    chat,
    status_of,
)

BACKEND_KEY = "backend-key-5d0e1c"
WRONG_API_KEY = "wrong-api-key-a41b"
WRONG_WORKER_KEY = "wrong-worker-key-9c2f"
SECRETS = (API_KEY, WORKER_KEY, BACKEND_KEY, WRONG_API_KEY, WRONG_WORKER_KEY)


async def text_of(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    async with http.get(url, headers=headers) as resp:
        assert 200 == resp.status, url
        return await resp.text()


async def test_no_key_is_ever_published_or_logged(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After traffic with good and bad keys, /metrics, the state API and its stream, the
    worker's /status, /version and /metrics, and every log event are free of any key."""
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], api_key=BACKEND_KEY))
        agent = await start_worker(
            pool_server, "ollama", backend_url=url_of(runtime), backend_api_key=BACKEND_KEY
        )
        status_app = await aiohttp_server(create_status_app(agent, status=True, metrics=True))
        assert 200 == await status_of(pool_server, "/api/chat", chat("hi", stream=False))
        assert 200 == await status_of(pool_server, "/v1/chat/completions", chat("x", stream=True))
        wrong = {"Authorization": f"Bearer {WRONG_API_KEY}"}
        assert 401 == await status_of(
            pool_server, "/api/chat", chat("x", stream=False), headers=wrong
        )
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(pool_server.ws_url) as ws:
                await ws.send_str(
                    encode(Register(worker_id="intruder", worker_key=WRONG_WORKER_KEY))
                )
                await ws.receive()
            assert ws.close_code == 1008
            auth = pool_server.auth
            published = {
                "/metrics": await text_of(http, pool_server.url + "/metrics", {}),
                "/api/v1/state": await text_of(http, pool_server.url + "/api/v1/state", auth),
                "worker /status": await text_of(http, url_of(status_app) + "/status", {}),
                "worker /version": await text_of(http, url_of(status_app) + "/version", {}),
                "worker /metrics": await text_of(http, url_of(status_app) + "/metrics", {}),
            }
            async with http.get(pool_server.url + "/api/v1/state/stream", headers=auth) as resp:
                published["stream"] = (await SSEReader(resp).next())[1]
        await wait_for(lambda: 0 == len(agent.jobs), what="the jobs to end")

    logged = {
        "structlog": repr(events),
        "stdlib": caplog.text,
        "output": "".join(capsys.readouterr()),
    }
    assert [] == [
        (secret, where)
        for secret in SECRETS
        for where, text in {**published, **logged}.items()
        if secret in text
    ]
    assert any(e["event"] == "request_done" for e in events)  # the logs were captured
    assert agent.cfg.worker_id in published["/api/v1/state"]
