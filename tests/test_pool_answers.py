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
from llamapool.testing.fakes import loaded_model

from .conftest import PoolServer, StartWorker, url_of, wait_for
from .resilience_helpers import GoWorker, go_worker

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


async def in_flight(server: PoolServer, body: dict[str, Any]) -> int:
    """A streamed completion through the pool, read to its end; its status."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/completions", json=body, headers=server.auth) as r,
    ):
        await r.read()
        return r.status


async def test_ps_merges_what_ollama_workers_hold_with_models_in_flight(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/api/ps lists what each Ollama backend holds, as it reports it and once per model even
    when two hold it, plus a vLLM model while a request for it is in flight."""
    for loaded in (["qwen2.5:7b", MODEL], [MODEL]):
        ollama_app = create_fake_ollama_app(models=[MODEL, "qwen2.5:7b"], loaded=loaded)
        ollama_backend = await aiohttp_server(ollama_app)
        await start_worker(pool_server, "ollama", backend_url=url_of(ollama_backend))
    vllm = await aiohttp_server(create_fake_vllm_app(models=["vllm-model"], chunk_delay=0.05))
    await start_worker(pool_server, "vllm", backend_url=url_of(vllm))
    body = {"model": "vllm-model", "prompt": "a b c d e f g h", "stream": True, "max_tokens": 40}

    task = asyncio.create_task(in_flight(pool_server, body))
    await wait_for(lambda: bool(fake_log(vllm.app).requests[1:]), what="the request")
    status, _, raw = await get(pool_server, "/api/ps", headers=pool_server.auth)
    assert 200 == await task
    models = orjson.loads(raw)["models"]

    assert 200 == status
    assert ["llama3:8b", "qwen2.5:7b", "vllm-model"] == [m["name"] for m in models]
    assert [loaded_model(MODEL), loaded_model("qwen2.5:7b")] == models[:2]
    assert ("vllm-model", 0) == (models[2]["model"], models[2]["size_vram"])
    assert [] == [p for p in fake_log(vllm.app).paths if p.startswith("/api/")]


async def answer_ps(worker: GoWorker, answer: dict[str, Any] | None) -> dict[str, Any]:
    """Serve the server's next request on a Go worker: ``answer`` as JSON, or (``None``) an
    error before any headers. Returns the request."""
    request = await worker.receive()
    rid = request["request_id"]
    if answer is not None:
        await worker.headers(rid, "application/json")
        await worker.chunk(rid, orjson.dumps(answer))
        await worker.send({"type": "http_proxy_response_end", "request_id": rid})
    else:
        error = {"code": "upstream_error", "message": "ollama is down"}
        await worker.send({"type": "http_proxy_response_end", "request_id": rid, "error": error})
    return request


async def test_ps_asks_go_workers_and_skips_those_that_fail(pool_server: PoolServer) -> None:
    """A Go worker (which proxies to Ollama) is asked GET /api/ps like an Ollama worker; one
    that fails is left out, and the pool still answers with the others' models."""
    async with (
        go_worker(pool_server, models=(MODEL,), worker_id="go-a") as good,
        go_worker(pool_server, models=("mistral:7b",), worker_id="go-b") as failing,
    ):
        ps = asyncio.create_task(get(pool_server, "/api/ps", headers=pool_server.auth))
        requests = await asyncio.gather(
            answer_ps(good, {"models": [loaded_model(MODEL)]}), answer_ps(failing, None)
        )
        status, _, raw = await ps
        slots = [w.inflight for w in pool_server.pool]

    assert [("GET", "/api/ps")] * 2 == [(r["method"], r["path"]) for r in requests]
    assert (200, {"models": [loaded_model(MODEL)]}) == (status, orjson.loads(raw))
    assert [0, 0] == slots


async def test_ps_leaves_out_a_worker_that_does_not_answer_in_time(
    pool_server: PoolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker silent past the /api/ps timeout is left out, and its request cancelled."""
    monkeypatch.setattr("llamapool.server.ollama.PS_TIMEOUT", 0.2)
    async with go_worker(pool_server, models=(MODEL,)) as silent:
        status, _, raw = await get(pool_server, "/api/ps", headers=pool_server.auth)
        asked, cancelled = await silent.receive(), await silent.receive()

    assert (200, {"models": []}) == (status, orjson.loads(raw))
    assert ("http_proxy_cancel", asked["request_id"]) == (
        cancelled["type"],
        cancelled["request_id"],
    )


async def test_ps_needs_the_key(pool_server: PoolServer) -> None:
    """/api/ps without the API key is a 401, as every model endpoint."""
    status, _, _ = await get(pool_server, "/api/ps")

    assert 401 == status


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


async def test_show_by_the_older_name_field_reaches_the_demo_worker(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Older Ollama clients name the model in ``name``: the pool routes by it, and the demo
    worker answers by it too."""
    await start_worker(pool_server, "demo")

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            pool_server.url + "/api/show", json={"name": "demo"}, headers=pool_server.auth
        ) as resp,
    ):
        status, shown = resp.status, await resp.json()

    assert (200, "demo") == (status, shown["details"]["family"])


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
