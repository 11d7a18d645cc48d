"""Keys stay secret: no API key, worker key or backend key, right or wrong, shows up in what
the server and the worker publish about themselves or in their logs."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from llamapool.plugin_api import BackendError, fetch_json
from llamapool.protocol import Register, encode
from llamapool.testing import create_broken_app, create_fake_ollama_app
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
from .resilience_helpers import free_port

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


SERVER_PASSWORD = "server-password-71c3"
BACKEND_PASSWORD = "backend-password-e9d4"


@pytest.mark.parametrize("backend", ["down", "wrong-shape"])
async def test_credentials_in_urls_are_never_logged_or_shown(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    backend: str,
) -> None:
    """A password in SERVER_URL or BACKEND_URL (``scheme://user:password@host``) reaches no log
    event and no /status: the URLs show as ``scheme://***@host``, whether the server is up or
    down, and whether the backend does not listen (the error is fetch_json's) or answers
    what the plugin cannot read (the error is the plugin's own)."""
    caplog.set_level(logging.DEBUG)
    dead = f"ws://proxy:{SERVER_PASSWORD}@127.0.0.1:{free_port()}/workers/connect"
    live = pool_server.ws_url.replace("ws://", f"ws://proxy:{SERVER_PASSWORD}@")
    if backend == "down":
        port = free_port()
    else:
        wrong = create_broken_app(status=200, body=b"{}", content_type="application/json")
        port = (await aiohttp_server(wrong)).port
    backend_url = f"http://admin:{BACKEND_PASSWORD}@127.0.0.1:{port}"
    with capture_logs() as events:
        agent = await start_worker(
            pool_server,
            "ollama",
            backend_url=backend_url,
            server_url=f"{dead},{live}",
            reconnect_max=0.1,
        )
        await agent.probe()  # last_error, overwritten by the dead URL's, is the backend's again
        status_app = await aiohttp_server(create_status_app(agent, status=True, metrics=False))
        async with aiohttp.ClientSession() as http:
            status = await text_of(http, url_of(status_app) + "/status", {})

    logged = repr(events) + caplog.text + "".join(capsys.readouterr())
    assert [] == [p for p in (SERVER_PASSWORD, BACKEND_PASSWORD) if p in logged + status]
    shown = {e["event"]: e.get("url") or e.get("error") for e in events}
    assert dead.replace(f"proxy:{SERVER_PASSWORD}", "***") == shown["server_unreachable"]
    assert live.replace(f"proxy:{SERVER_PASSWORD}", "***") == shown["worker_connected"]
    assert "http://***@127.0.0.1:" in shown["backend_unreachable"]
    assert "http://***@127.0.0.1:" in status


async def test_fetch_json_errors_show_urls_without_their_credentials(
    aiohttp_server: AiohttpServer,
) -> None:
    """The BackendError of fetch_json, which plugins raise and log as they are, names the URL
    with ``***@`` in place of its credentials: refused, an HTTP error, or not JSON."""
    failing = await aiohttp_server(create_broken_app(status=500))
    html = await aiohttp_server(create_broken_app(status=200, content_type="text/html"))
    ports = {"down": free_port(), "500": failing.port, "html": html.port}
    errors = {}
    async with aiohttp.ClientSession() as http:
        for name, port in ports.items():
            with pytest.raises(BackendError) as caught:
                await fetch_json(http, f"http://admin:{BACKEND_PASSWORD}@127.0.0.1:{port}/x")
            errors[name] = str(caught.value)

    shown = {name: f"GET http://***@127.0.0.1:{port}/x " for name, port in ports.items()}
    assert [] == [(name, e) for name, e in errors.items() if not e.startswith(shown[name])]
    assert [] == [e for e in errors.values() if BACKEND_PASSWORD in e]
