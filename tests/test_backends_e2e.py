"""The whole pool against each backend: a server, a real worker with the backend's plugin, and
a fake runtime (Ollama, vLLM, Open WebUI) on loopback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from ollama import AsyncClient as OllamaClient
from openai import AsyncOpenAI
from pytest_aiohttp import AiohttpServer

from llamapool.testing import (
    create_fake_ollama_app,
    create_fake_openwebui_app,
    create_fake_vllm_app,
    fake_log,
)

from .conftest import API_KEY, PoolServer, StartWorker, url_of

MODEL = "llama3:8b"
PROMPT = "hello from the pool"
WEBUI_KEY = "sk-webui"


@attrs.frozen
class Runtime:
    """One kind of backend: its plugin, its fake, and where each public path lands on it."""

    plugin: str
    make_app: Callable[..., web.Application]
    upstream: dict[str, str]
    api_key: str = ""


OLLAMA = Runtime(
    "ollama",
    create_fake_ollama_app,
    {
        p: p
        for p in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/api/chat",
            "/api/generate",
            "/api/embed",
        )
    },
)
VLLM = Runtime(
    "vllm",
    create_fake_vllm_app,
    {p: p for p in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")},
)
OPENWEBUI = Runtime(
    "openwebui",
    create_fake_openwebui_app,
    {
        "/v1/chat/completions": "/api/chat/completions",
        "/v1/completions": "/ollama/v1/completions",
        "/v1/embeddings": "/api/embeddings",
        "/api/chat": "/ollama/api/chat",
        "/api/generate": "/ollama/api/generate",
        "/api/embed": "/ollama/api/embed",
    },
    api_key=WEBUI_KEY,
)
RUNTIMES = [pytest.param(r, id=r.plugin) for r in (OLLAMA, VLLM, OPENWEBUI)]
OLLAMA_NATIVE = [pytest.param(r, id=r.plugin) for r in (OLLAMA, OPENWEBUI)]


async def start_pool(
    aiohttp_server: AiohttpServer,
    server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
    **fake: Any,
) -> TestServer:
    """Start ``runtime``'s fake and a worker in front of it; answer the fake's server."""
    backend = await aiohttp_server(runtime.make_app(models=[MODEL], **fake))
    await start_worker(
        server, runtime.plugin, backend_url=url_of(backend), backend_api_key=runtime.api_key
    )
    return backend


async def post(
    server: PoolServer, path: str, body: dict[str, Any]
) -> tuple[int, str, bytes, CIMultiDict[str]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + path, json=body, headers=server.auth) as resp,
    ):
        return resp.status, resp.content_type, await resp.read(), CIMultiDict(resp.headers)


def sse_text(raw: bytes) -> tuple[str, list[bytes]]:
    """The text of an SSE completion stream, and its data payloads."""
    payloads = [
        line.removeprefix(b"data: ") for line in raw.split(b"\n") if line.startswith(b"data: ")
    ]
    parts = []
    for payload in payloads[:-1]:
        choice = orjson.loads(payload)["choices"][0]
        parts.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(parts), payloads


def ndjson_text(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The text of an Ollama NDJSON stream, and its lines."""
    lines = [orjson.loads(line) for line in raw.split(b"\n") if line.strip()]
    text = "".join(
        line.get("message", {}).get("content") or line.get("response") or "" for line in lines
    )
    return text, lines


def landed(backend: TestServer, public_path: str, runtime: Runtime) -> list[dict[str, str]]:
    """The headers of every request the fake got at the upstream path of ``public_path``."""
    upstream = runtime.upstream[public_path]
    return [dict(r.headers) for r in fake_log(backend.app).requests if r.path == upstream]


# --- OpenAI API, every backend --------------------------------------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_openai_chat_completion(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """A non-streamed OpenAI chat completion is answered by the backend's echo."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}

    status, content_type, raw, _ = await post(pool_server, "/v1/chat/completions", body)

    answer = orjson.loads(raw)
    assert (200, "application/json") == (status, content_type)
    assert f"echo: {PROMPT}" == answer["choices"][0]["message"]["content"]
    assert 1 == len(landed(backend, "/v1/chat/completions", runtime))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_openai_chat_completion_stream(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """A streamed OpenAI chat completion arrives as SSE ending in [DONE]."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True}

    status, content_type, raw, _ = await post(pool_server, "/v1/chat/completions", body)

    text, payloads = sse_text(raw)
    assert (200, "text/event-stream") == (status, content_type)
    assert f"echo: {PROMPT}" == text
    assert b"[DONE]" == payloads[-1]
    assert 1 == len(landed(backend, "/v1/chat/completions", runtime))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_openai_text_completion(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
    stream: bool,
) -> None:
    """An OpenAI text completion is answered, streamed or not."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)
    body = {"model": MODEL, "prompt": PROMPT, "stream": stream}

    status, _, raw, _ = await post(pool_server, "/v1/completions", body)

    text = sse_text(raw)[0] if stream else orjson.loads(raw)["choices"][0]["text"]
    assert (200, f"echo: {PROMPT}") == (status, text)
    assert 1 == len(landed(backend, "/v1/completions", runtime))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_openai_embeddings(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """Embeddings through the pool are the backend's own answer, byte for byte."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)
    body = {"model": MODEL, "input": [PROMPT, "second input"]}
    upstream = url_of(backend) + runtime.upstream["/v1/embeddings"]
    headers = {"Authorization": f"Bearer {runtime.api_key}"} if runtime.api_key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(upstream, json=body, headers=headers) as r,
    ):
        direct = await r.read()

    status, _, raw, _ = await post(pool_server, "/v1/embeddings", body)

    assert (200, direct) == (status, raw)
    assert 2 == len(orjson.loads(raw)["data"])


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_openai_sdk_streams_through_the_pool(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """The official openai client lists the model and streams a chat through every backend."""
    await start_pool(aiohttp_server, pool_server, start_worker, runtime)

    async with AsyncOpenAI(base_url=pool_server.url + "/v1", api_key=API_KEY) as client:
        model = await client.models.retrieve(MODEL)
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]

    assert MODEL == model.id
    assert f"echo: {PROMPT}" == "".join(parts)


# --- Ollama's native API: ollama and openwebui ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("runtime", OLLAMA_NATIVE)
async def test_ollama_chat(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
    stream: bool,
) -> None:
    """/api/chat is answered through the backend's native Ollama API, streamed or not."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": stream}

    status, content_type, raw, _ = await post(pool_server, "/api/chat", body)

    text, lines = ndjson_text(raw)
    assert 200 == status
    assert ("application/x-ndjson" if stream else "application/json") == content_type
    assert f"echo: {PROMPT}" == text
    assert lines[-1]["done"] is True
    assert 1 == len(landed(backend, "/api/chat", runtime))


@pytest.mark.parametrize("runtime", OLLAMA_NATIVE)
async def test_ollama_generate_streams_by_default(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """/api/generate without 'stream' streams NDJSON, as Ollama does."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)

    status, content_type, raw, _ = await post(
        pool_server, "/api/generate", {"model": MODEL, "prompt": PROMPT}
    )

    text, lines = ndjson_text(raw)
    assert (200, "application/x-ndjson") == (status, content_type)
    assert f"echo: {PROMPT}" == text
    assert len(lines) > 2
    assert 1 == len(landed(backend, "/api/generate", runtime))


@pytest.mark.parametrize("runtime", OLLAMA_NATIVE)
async def test_ollama_embed(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """/api/embed answers one vector per input."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, runtime)

    status, _, raw, _ = await post(pool_server, "/api/embed", {"model": MODEL, "input": ["a", "b"]})

    assert (200, 2) == (status, len(orjson.loads(raw)["embeddings"]))
    assert 1 == len(landed(backend, "/api/embed", runtime))


@pytest.mark.parametrize("runtime", OLLAMA_NATIVE)
async def test_the_ollama_sdk_chats_through_the_pool(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runtime: Runtime,
) -> None:
    """The official ollama client lists the model and streams a chat through the pool."""
    await start_pool(aiohttp_server, pool_server, start_worker, runtime)

    async with OllamaClient(host=pool_server.url, headers=pool_server.auth) as client:
        tags = await client.list()
        parts = [
            part.message.content or ""
            async for part in await client.chat(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
            )
        ]

    assert [MODEL] == [m.model for m in tags.models]
    assert f"echo: {PROMPT}" == "".join(parts)


# --- vLLM has no Ollama API: the worker translates ----------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed"])
async def test_a_vllm_only_pool_translates_ollama_paths(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker, path: str
) -> None:
    """With only a vLLM worker, Ollama-native requests for its model are answered in Ollama's
    shape, and vLLM only ever sees OpenAI paths."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, VLLM)
    body = {"model": MODEL, "prompt": PROMPT, "input": PROMPT, "messages": [], "stream": False}
    if path == "/api/chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]

    status, content_type, raw, _ = await post(pool_server, path, body)

    answer = orjson.loads(raw)
    assert (200, "application/json") == (status, content_type)
    assert "embeddings" in answer if path == "/api/embed" else answer["done"] is True
    assert not [p for p in fake_log(backend.app).paths if p.startswith("/api/")]


async def test_ollama_paths_go_to_the_least_busy_worker_translated_or_not(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """With an ollama and a vllm worker serving one model, /api/chat goes to the least busy
    one like any request: to vllm (translated) while ollama is busy."""
    ollama = await start_pool(aiohttp_server, pool_server, start_worker, OLLAMA, chunk_delay=0.05)
    vllm = await start_pool(aiohttp_server, pool_server, start_worker, VLLM)
    long_chat = {"model": MODEL, "messages": [{"role": "user", "content": "w " * 100}]}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": False}

    async with (
        aiohttp.ClientSession() as http,
        http.post(pool_server.url + "/api/chat", json=long_chat, headers=pool_server.auth) as held,
    ):
        await held.content.readline()  # ollama now has one request in flight, vllm none
        native = [await post(pool_server, "/api/chat", chat) for _ in range(5)]
        openai = await post(pool_server, "/v1/chat/completions", chat)
        await held.read()

    assert [200] * 5 == [status for status, *_ in native]
    assert [f"echo: {PROMPT}"] * 5 == [
        orjson.loads(raw)["message"]["content"] for *_, raw, _ in native
    ]
    assert 1 == fake_log(ollama.app).paths.count("/api/chat")
    assert 200 == openai[0]
    assert ["/v1/models"] + ["/v1/chat/completions"] * 6 == fake_log(vllm.app).paths


# --- Open WebUI -----------------------------------------------------------------------------


async def test_openwebui_gets_openai_chat_at_its_own_route_with_its_key(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/v1/chat/completions reaches Open WebUI at /api/chat/completions with the worker's
    bearer key, never the client's."""
    backend = await start_pool(aiohttp_server, pool_server, start_worker, OPENWEBUI)
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}

    status, *_ = await post(pool_server, "/v1/chat/completions", body)

    requests = fake_log(backend.app).requests
    assert 200 == status
    assert ["/api/models", "/api/chat/completions"] == [r.path for r in requests]
    assert [f"Bearer {WEBUI_KEY}"] * 2 == [
        CIMultiDict(r.headers).get("Authorization") for r in requests
    ]
