"""Ollama's native API for models on OpenAI-only backends, end to end: the official ollama client
against a real server, a real worker and a fake vLLM (or Open WebUI) that records what it got."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from ollama import AsyncClient as OllamaClient
from ollama import ResponseError
from pytest_aiohttp import AiohttpServer

from llamapool.config import MIB
from llamapool.testing import (
    Replay,
    create_fake_ollama_app,
    create_fake_openwebui_app,
    create_fake_vllm_app,
    create_replay_app,
    fake_log,
)
from llamapool.worker.jobs import MAX_TRANSLATED_ANSWER

from .conftest import PoolServer, StartWorker, url_of

MODEL = "qwen2.5-7b"
PROMPT = "hello from ollama"
USER = [{"role": "user", "content": PROMPT}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look it up",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    }
]


async def vllm_pool(
    aiohttp_server: AiohttpServer, server: PoolServer, start_worker: StartWorker
) -> TestServer:
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    await start_worker(server, "vllm", backend_url=url_of(backend))
    return backend


def posted(backend: TestServer) -> list[tuple[str, Any]]:
    """Each POST the fake runtime got: its path and JSON body."""
    return [(r.path, r.json()) for r in fake_log(backend.app).requests if r.method == "POST"]


async def chat_answer(
    server: PoolServer, *, timeout: float = 300, **fields: Any
) -> tuple[int, Any]:
    """``POST /api/chat`` of :data:`USER` to :data:`MODEL` (plus ``fields``), as raw HTTP: the
    status and the JSON body, whatever the status (the SDK would raise on an error)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
        http.post(
            server.url + "/api/chat",
            json={"model": MODEL, "messages": USER, **fields},
            headers=server.auth,
        ) as r,
    ):
        return r.status, await r.json()


def client(server: PoolServer) -> OllamaClient:
    return OllamaClient(host=server.url, headers=server.auth)


async def test_a_vllm_worker_offers_the_translatable_ollama_paths(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A vLLM worker registers Ollama's chat, generate and embedding paths, not /api/show."""
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    agent = await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    worker = pool_server.pool.get(agent.cfg.worker_id)
    assert worker is not None
    ollama = {p for p in worker.paths or () if p.startswith("/api/")}
    assert {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings"} == ollama


async def test_chat_is_translated_with_its_options(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """ollama.chat against vLLM: the backend gets an OpenAI chat with the options mapped, and
    the client Ollama's answer with usage as token counts."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)
    options = {
        "temperature": 0.3,
        "top_k": 5,
        "seed": 7,
        "stop": ["zzz"],
        "num_predict": 4,
        "num_ctx": 4096,
    }

    async with client(pool_server) as ollama:
        answer = await ollama.chat(
            model=MODEL, messages=USER, options=options, keep_alive="1m", format="json"
        )

    assert f"echo: {PROMPT}" == answer.message.content
    assert (True, "stop", 3, 4) == (
        answer.done,
        answer.done_reason,
        answer.prompt_eval_count,
        answer.eval_count,
    )
    assert [
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": USER,
                "stream": False,
                "temperature": 0.3,
                "top_k": 5,
                "seed": 7,
                "stop": ["zzz"],
                "max_tokens": 4,
                "response_format": {"type": "json_object"},
            },
        )
    ] == posted(backend)


async def test_a_streamed_chat_arrives_as_ndjson_with_usage(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A streamed ollama.chat gets the text piece by piece and a done part counting tokens;
    the backend was asked for usage in the stream."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)

    async with client(pool_server) as ollama:
        parts = [p async for p in await ollama.chat(model=MODEL, messages=USER, stream=True)]

    assert f"echo: {PROMPT}" == "".join(p.message.content or "" for p in parts)
    assert [False] * (len(parts) - 1) + [True] == [p.done for p in parts]
    assert (3, 4) == (parts[-1].prompt_eval_count, parts[-1].eval_count)
    ((path, body),) = posted(backend)
    assert ("/v1/chat/completions", {"include_usage": True}) == (path, body["stream_options"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_tool_calls_come_back_as_ollama_tool_calls(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    stream: bool,
) -> None:
    """Tools reach vLLM as OpenAI tools; its call (arguments streamed in pieces) reaches the
    client whole, with arguments as an object."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)

    async with client(pool_server) as ollama:
        if stream:
            parts = [
                p
                async for p in await ollama.chat(
                    model=MODEL, messages=USER, tools=TOOLS, stream=True
                )
            ]
        else:
            parts = [await ollama.chat(model=MODEL, messages=USER, tools=TOOLS)]

    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [("lookup", {"text": PROMPT})] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert TOOLS == posted(backend)[0][1]["tools"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_generate_is_a_one_turn_chat(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    stream: bool,
) -> None:
    """ollama.generate with a system prompt becomes a templated chat on vLLM."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)

    async with client(pool_server) as ollama:
        if stream:
            parts = [
                p
                async for p in await ollama.generate(
                    model=MODEL, prompt=PROMPT, system="be brief", stream=True
                )
            ]
        else:
            parts = [await ollama.generate(model=MODEL, prompt=PROMPT, system="be brief")]

    assert f"echo: {PROMPT}" == "".join(p.response for p in parts)
    assert parts[-1].done
    ((path, body),) = posted(backend)
    system = {"role": "system", "content": "be brief"}
    assert ("/v1/chat/completions", [system, *USER]) == (path, body["messages"])


async def test_a_raw_generate_is_a_text_completion(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A raw prompt goes to /v1/completions untemplated."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)

    async with client(pool_server) as ollama:
        answer = await ollama.generate(model=MODEL, prompt=PROMPT, raw=True)

    assert (f"echo: {PROMPT}", 4) == (answer.response, answer.eval_count)
    assert [("/v1/completions", PROMPT)] == [(p, b["prompt"]) for p, b in posted(backend)]


async def test_embed_and_embeddings_carry_the_backends_vectors(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """ollama.embed and ollama.embeddings answer vLLM's vectors, in input order."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url_of(backend) + "/v1/embeddings", json={"model": MODEL, "input": ["a b", "c"]}
        ) as r,
    ):
        direct = [d["embedding"] for d in (await r.json())["data"]]

    async with client(pool_server) as ollama:
        embed = await ollama.embed(model=MODEL, input=["a b", "c"])
        single = await ollama.embeddings(model=MODEL, prompt="c")

    assert (direct, 3) == ([list(e) for e in embed.embeddings], embed.prompt_eval_count)
    assert direct[1] == list(single.embedding)


async def test_what_cannot_be_mapped_is_a_400_and_never_reaches_the_backend(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """An option with no OpenAI counterpart gets a 400 naming it; vLLM is not called."""
    backend = await vllm_pool(aiohttp_server, pool_server, start_worker)

    async with client(pool_server) as ollama:
        with pytest.raises(ResponseError) as caught:
            await ollama.chat(model=MODEL, messages=USER, options={"mirostat": 2})

    assert 400 == caught.value.status_code
    assert "mirostat" in caught.value.error
    assert [] == posted(backend)


async def test_a_backend_error_keeps_its_status_in_ollamas_shape(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """vLLM's OpenAI error becomes {"error": message} with the same status."""
    error = {"error": {"message": "temperature must be positive", "type": "BadRequestError"}}
    replay = Replay([orjson.dumps(error)], content_type="application/json", status=400)
    backend = await aiohttp_server(
        create_replay_app({"/v1/chat/completions": replay}, models=[MODEL])
    )
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    status, body = await chat_answer(pool_server)

    assert (400, {"error": "temperature must be positive"}) == (status, body)


async def test_a_whole_answer_past_the_cap_is_a_502_in_ollamas_shape(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A non-streamed answer larger than MAX_TRANSLATED_ANSWER is not read whole into the
    worker's memory: the client gets a 502 with {"error": ...} naming the limit."""
    mib = b"x" * MIB
    chunks = [mib] * (MAX_TRANSLATED_ANSWER // MIB + 1)
    replay = Replay(chunks, content_type="application/json")
    backend = await aiohttp_server(
        create_replay_app({"/v1/chat/completions": replay}, models=[MODEL])
    )
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    status, body = await chat_answer(pool_server, stream=False)

    limit = MAX_TRANSLATED_ANSWER // MIB
    error = f"the backend's answer is larger than the {limit} MiB the worker translates"
    assert (502, {"error": error}) == (status, body)


async def test_an_error_body_that_never_ends_is_answered_from_its_start(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A backend that answers an error and then never ends its body: the worker reads the
    start of it (where the message is), and the client gets the error at once, not when the
    request times out."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def endless_error(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=503, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"error": {"message": "overloaded", "type": "server_error"}}')
        for _ in range(6000):  # a minute of padding at most: bounded, and far past the answer
            await response.write(b" " * 4096)
            await asyncio.sleep(0.01)
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", endless_error)
    backend = await aiohttp_server(app)
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    status, body = await chat_answer(pool_server, stream=False, timeout=10)

    assert (503, {"error": "overloaded"}) == (status, body)


async def test_replayed_reasoning_and_tool_deltas_become_thinking_and_one_call(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A recorded vLLM stream, written in odd pieces: reasoning becomes thinking, and the
    argument deltas one complete tool call."""

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    call = {"index": 0, "id": "call_1", "function": {"name": "lookup", "arguments": '{"te'}}
    stream = b"".join(
        [
            event({"role": "assistant", "reasoning_content": "I should look"}),
            event({"tool_calls": [call]}),
            event({"tool_calls": [{"index": 0, "function": {"arguments": 'xt": "x"}'}}]}),
            event({}, "tool_calls"),
            b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}\n\n',
            b"data: [DONE]\n\n",
        ]
    )
    pieces = [stream[i : i + 37] for i in range(0, len(stream), 37)]
    backend = await aiohttp_server(
        create_replay_app({"/v1/chat/completions": Replay(pieces)}, models=[MODEL])
    )
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    async with client(pool_server) as ollama:
        parts = [
            p async for p in await ollama.chat(model=MODEL, messages=USER, tools=TOOLS, stream=True)
        ]

    assert "I should look" == "".join(p.message.thinking or "" for p in parts)
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [("lookup", {"text": "x"})] == [(c.function.name, c.function.arguments) for c in calls]
    final = parts[-1]
    assert (9, 5, "stop") == (final.prompt_eval_count, final.eval_count, final.done_reason)


async def test_a_native_ollama_worker_is_not_translated(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """An Ollama worker gets /api/* at the same path with the client's bytes, and the client
    gets Ollama's bytes unchanged."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))
    body = orjson.dumps({"model": MODEL, "input": ["a", "b"], "keep_alive": "1m"})
    async with aiohttp.ClientSession() as http:
        async with http.post(url_of(backend) + "/api/embed", data=body) as r:
            direct = await r.read()
        async with http.post(
            pool_server.url + "/api/embed", data=body, headers=pool_server.auth
        ) as r:
            relayed = await r.read()

    sent = [(r.path, r.body) for r in fake_log(backend.app).requests if r.method == "POST"]
    assert direct == relayed
    assert [("/api/embed", body)] * 2 == sent


async def test_open_webui_translates_only_its_non_ollama_models(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """On Open WebUI, an Ollama model's /api/chat goes to its Ollama proxy as sent; a model
    from an OpenAI connection is translated to its chat completions route."""
    backend = await aiohttp_server(
        create_fake_openwebui_app(models=["llama3:8b"], openai_models=["gpt-4o-mini"])
    )
    await start_worker(
        pool_server, "openwebui", backend_url=url_of(backend), backend_api_key="sk-webui"
    )

    async with client(pool_server) as ollama:
        native = await ollama.chat(model="llama3:8b", messages=USER)
        translated = await ollama.chat(model="gpt-4o-mini", messages=USER)

    assert [f"echo: {PROMPT}"] * 2 == [native.message.content, translated.message.content]
    assert ["/ollama/api/chat", "/api/chat/completions"] == [p for p, _ in posted(backend)]
