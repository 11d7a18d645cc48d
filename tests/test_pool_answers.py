"""What the pool answers itself: Ollama's probe and version, running models, model details
for backends that are not Ollama, model management refused, each model listed once."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from ollama import AsyncClient as OllamaClient
from ollama import ResponseError
from pytest_aiohttp import AiohttpServer

from llamapool.testing import create_fake_ollama_app, create_fake_vllm_app, fake_log

from .conftest import PoolServer, StartWorker, url_of, wait_for

MODEL = "llama3:8b"


async def ollama(server: PoolServer, call: str, *args: Any) -> Any:
    """One call of the official ollama client against the pool, its connections closed."""
    async with OllamaClient(host=server.url, headers=server.auth) as client:
        return await getattr(client, call)(*args)


async def get(
    server: PoolServer, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, server.url + path, headers=headers or {}, allow_redirects=False
        ) as resp,
    ):
        return resp.status, resp.content_type, await resp.read()


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_root_answers_like_ollama_to_api_clients(
    pool_server: PoolServer, method: str
) -> None:
    """GET and HEAD / answer "Ollama is running" as text, with no key."""
    status, content_type, raw = await get(pool_server, "/", method=method)

    assert (200, "text/plain") == (status, content_type)
    assert (b"" if method == "HEAD" else b"Ollama is running") == raw


async def test_version_needs_no_key(pool_server: PoolServer) -> None:
    """GET /api/version answers an Ollama version without a key, as Ollama does."""
    status, _, raw = await get(pool_server, "/api/version")

    assert (200, ["version"]) == (status, list(orjson.loads(raw)))
    assert [0, 6, 4] <= [int(p) for p in orjson.loads(raw)["version"].split(".")]


async def test_ps_lists_the_models_being_served(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/api/ps lists a model while a request for it is in flight, and not after."""
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL], chunk_delay=0.05))
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))
    body = {"model": MODEL, "prompt": "a b c d e f g h", "stream": True, "max_tokens": 40}

    async def slow_request() -> int:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                pool_server.url + "/v1/completions", json=body, headers=pool_server.auth
            ) as r,
        ):
            await r.read()
            return r.status

    task = asyncio.create_task(slow_request())
    await wait_for(lambda: bool(fake_log(backend.app).requests[1:]), what="the request")
    during = [m.model for m in (await ollama(pool_server, "ps")).models]
    assert 200 == await task
    after = [m.model for m in (await ollama(pool_server, "ps")).models]

    assert ([MODEL], []) == (during, after)


async def test_show_is_described_by_the_pool_for_a_vllm_model(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/api/show for a model on a vLLM worker is answered by the pool in the shape the ollama
    client reads, with the capabilities the backend's paths give."""
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    shown = await ollama(pool_server, "show", MODEL)

    assert ["completion", "embedding"] == shown.capabilities
    assert MODEL == (shown.modelinfo or {})["general.basename"]
    assert [] == [r.path for r in fake_log(backend.app).requests if r.method == "POST"]


async def test_show_is_relayed_to_an_ollama_worker(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/api/show for a model on an Ollama worker is Ollama's own answer, relayed."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))

    shown = await ollama(pool_server, "show", MODEL)

    assert ("demo", ["/api/show"]) == (
        shown.details.family if shown.details else None,
        [r.path for r in fake_log(backend.app).requests if r.method == "POST"],
    )


async def test_show_of_an_unknown_model_is_404(pool_server: PoolServer) -> None:
    """/api/show for a model no worker serves is Ollama's 404."""
    with pytest.raises(ResponseError) as caught:
        await ollama(pool_server, "show", "nobody-serves-this")

    assert 404 == caught.value.status_code


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/pull", {"model": MODEL}),
        ("POST", "/api/push", {"model": MODEL}),
        ("POST", "/api/create", {"model": "x", "from": MODEL}),
        ("POST", "/api/copy", {"source": MODEL, "destination": "y"}),
        ("DELETE", "/api/delete", {"model": MODEL}),
    ],
)
async def test_model_management_is_refused_clearly(
    pool_server: PoolServer, method: str, path: str, body: dict[str, Any]
) -> None:
    """Pull, push, create, copy and delete answer 403 with an Ollama error saying the pool does
    not manage models."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, pool_server.url + path, json=body, headers=pool_server.auth) as r,
    ):
        answer = orjson.loads(await r.read())

    assert (403, ["error"]) == (r.status, list(answer))
    assert "does not manage models" in answer["error"]


async def test_ollama_client_sees_the_refusal(pool_server: PoolServer) -> None:
    """The ollama client's pull raises a ResponseError carrying the pool's message."""
    with pytest.raises(ResponseError) as caught:
        await ollama(pool_server, "pull", MODEL)

    assert 403 == caught.value.status_code
    assert "does not manage models" in caught.value.error


async def test_each_model_is_listed_once(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A model on an Ollama and a vLLM worker appears once in /v1/models and /api/tags."""
    for make, plugin in ((create_fake_ollama_app, "ollama"), (create_fake_vllm_app, "vllm")):
        backend = await aiohttp_server(make(models=[MODEL]))
        await start_worker(pool_server, plugin, backend_url=url_of(backend))

    _, _, models = await get(pool_server, "/v1/models", headers=pool_server.auth)
    tags = await ollama(pool_server, "list")

    assert [MODEL] == [m["id"] for m in orjson.loads(models)["data"]]
    assert [MODEL] == [m.model for m in tags.models]
