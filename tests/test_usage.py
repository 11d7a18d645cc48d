"""Token accounting: the usage scanner reads what backends report wherever chunks split, and the
tokens /metrics and the state API show equal those the clients were told about."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from llamapool.server.usage import Usage, UsageScanner
from llamapool.testing import create_fake_ollama_app, create_fake_vllm_app

from .conftest import (
    PoolServer,
    StartWorker,
    url_of,
)
from .observability_helpers import (
    MODEL,
    FixedModels,
    chat,
    client_usage,
    get_state,
    post,
    scrape,
    scrape_until,
    settled,
)

VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def ndjson(*lines: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def openai_chunk(content: str | None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    choices = [{"index": 0, "delta": delta, "finish_reason": None if content else "stop"}]
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1}
    return chunk | {"choices": choices} | extra


USAGE = {"prompt_tokens": 12, "completion_tokens": 345, "total_tokens": 357}
#: Text a model may well write: it looks like a usage field, but sits inside a JSON string.
DECOY = 'the reply was {"prompt_tokens": 5, "completion_tokens": 6, "eval_count": 7}'

BODIES = {
    "openai-body": (
        orjson.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": USAGE
                | {
                    "prompt_tokens_details": {"cached_tokens": 99},
                    "completion_tokens_details": {"reasoning_tokens": 98},
                },
            }
        ),
        Usage(12, 345),
    ),
    "openai-sse-usage-last": (
        sse(
            openai_chunk("Hel"),
            openai_chunk("lo"),
            openai_chunk(None),
            {"id": "chatcmpl-1", "choices": [], "usage": USAGE},
        ),
        Usage(12, 345),
    ),
    "openai-sse-usage-null-then-real": (
        sse(
            openai_chunk("Hel", usage=None),
            openai_chunk("lo", usage=None),
            openai_chunk(None, usage=None),
            {"id": "chatcmpl-1", "choices": [], "usage": USAGE},
        ),
        Usage(12, 345),
    ),
    "ollama-ndjson-done": (
        ndjson(
            {"model": MODEL, "message": {"role": "assistant", "content": "Hel"}, "done": False},
            {"model": MODEL, "message": {"role": "assistant", "content": "lo"}, "done": False},
            {
                "model": MODEL,
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "prompt_eval_count": 21,
                "prompt_eval_duration": 123456,
                "eval_count": 1234,
                "eval_duration": 654321,
            },
        ),
        Usage(21, 1234),
    ),
    "ollama-body": (
        orjson.dumps(
            {
                "model": MODEL,
                "response": "Hello",
                "done": True,
                "total_duration": 5,
                "prompt_eval_count": 8,
                "eval_count": 40,
            }
        ),
        Usage(8, 40),
    ),
    "openai-embeddings": (
        orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": 17, "total_tokens": 17},
            }
        ),
        Usage(17, 0),
    ),
    "ollama-embed": (
        orjson.dumps({"model": MODEL, "embeddings": [[0.1, 0.2]], "prompt_eval_count": 9}),
        Usage(9, 0),
    ),
    "no-usage": (sse(openai_chunk("Hel"), openai_chunk("lo"), openai_chunk(None)), None),
    "decoy-only": (sse(openai_chunk(DECOY), openai_chunk(None)), None),
    "decoy-then-real": (
        sse(
            openai_chunk(DECOY),
            openai_chunk(None),
            {"id": "chatcmpl-1", "choices": [], "usage": USAGE},
        ),
        Usage(12, 345),
    ),
    "ollama-decoy": (
        ndjson(
            {"model": MODEL, "response": DECOY, "done": False},
            {"model": MODEL, "response": "", "done": True, "prompt_eval_count": 3, "eval_count": 4},
        ),
        Usage(3, 4),
    ),
}


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def scan(chunks: Iterator[bytes]) -> Usage | None:
    scanner = UsageScanner()
    for chunk in chunks:
        scanner.feed(memoryview(chunk))
    return scanner.usage()


@pytest.mark.parametrize(("body", "expected"), BODIES.values(), ids=BODIES.keys())
def test_usage_is_found_whatever_the_chunk_size(body: bytes, expected: Usage | None) -> None:
    """Every chunk size from one byte to the whole body reports the same usage."""
    found = {size: scan(chunks_of(body, size)) for size in range(1, len(body) + 1)}

    assert dict.fromkeys(found, expected) == found


@pytest.mark.parametrize(("body", "expected"), BODIES.values(), ids=BODIES.keys())
def test_usage_is_found_wherever_one_split_falls(body: bytes, expected: Usage | None) -> None:
    """A body cut in two at any byte reports the same usage as the whole body."""
    found = {cut: scan(iter([body[:cut], body[cut:]])) for cut in range(len(body) + 1)}

    assert dict.fromkeys(found, expected) == found


def test_a_decoy_inside_a_string_is_not_counted() -> None:
    """Usage-like text the model wrote (quotes escaped in JSON) is never taken for usage."""
    body = orjson.dumps({"choices": [{"message": {"content": DECOY}}]})

    assert b'\\"prompt_tokens\\": 5' in body
    assert None is scan(iter([body]))


# --- end to end -----------------------------------------------------------------------------

#: A mix of every API and framing; each tuple is (path, body).
TRAFFIC: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", chat("one two three", stream=False)),
    ("/v1/chat/completions", chat("four five", stream=True, usage=True)),
    ("/v1/completions", {"model": MODEL, "prompt": "six seven eight", "max_tokens": 5}),
    ("/v1/embeddings", {"model": MODEL, "input": ["nine ten", "eleven"]}),
    ("/api/chat", chat("twelve thirteen fourteen fifteen", stream=True)),
    ("/api/chat", chat("sixteen", stream=False)),
    ("/api/generate", {"model": MODEL, "prompt": "a b c d e f", "options": {"num_predict": 9}}),
    ("/api/embed", {"model": MODEL, "input": "g h i"}),
    ("/v1/chat/completions", chat("on vllm", stream=False, model=VLLM_MODEL)),
    ("/v1/chat/completions", chat("on vllm too", stream=True, model=VLLM_MODEL, usage=True)),
    ("/v1/embeddings", {"model": VLLM_MODEL, "input": "vllm embeds this"}),
]


async def test_tokens_shown_equal_the_tokens_clients_were_told_about(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Per model in /metrics, per worker and per model in the state API, the token totals are
    the sums of the usage in the answers the clients received."""
    ollama = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    vllm = await aiohttp_server(create_fake_vllm_app(models=[VLLM_MODEL]))
    ollama_worker = await start_worker(pool_server, "ollama", backend_url=url_of(ollama))
    vllm_worker = await start_worker(pool_server, "vllm", backend_url=url_of(vllm))
    told: dict[str, list[int]] = {MODEL: [0, 0], VLLM_MODEL: [0, 0]}

    for path, body in TRAFFIC:
        status, raw = await post(pool_server, path, body)
        assert 200 == status, raw
        tokens_in, tokens_out = client_usage(path, raw)
        assert tokens_in > 0
        told[body["model"]][0] += tokens_in
        told[body["model"]][1] += tokens_out

    state = await settled(pool_server)
    metrics = await scrape(pool_server.url)
    workers = {w["id"]: w for w in state["workers"]}
    shown_per_worker = {
        model: [workers[agent.cfg.worker_id][f"tokens_{kind}_total"] for kind in ("in", "out")]
        for model, agent in ((MODEL, ollama_worker), (VLLM_MODEL, vllm_worker))
    }
    shown_per_model = {
        model: [
            workers[agent.cfg.worker_id]["per_model"][model][f"tokens_{kind}_total"]
            for kind in ("in", "out")
        ]
        for model, agent in ((MODEL, ollama_worker), (VLLM_MODEL, vllm_worker))
    }
    in_metrics = {
        model: [
            metrics.value("llamapool_model_tokens_total", model=model, kind=kind)
            for kind in ("in", "out")
        ]
        for model in told
    }
    assert told == shown_per_worker
    assert told == shown_per_model
    assert told == in_metrics


async def test_an_openai_stream_without_include_usage_counts_no_tokens(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A stream that reports no usage adds a success and no tokens (nothing is estimated)."""
    ollama = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    agent = await start_worker(pool_server, "ollama", backend_url=url_of(ollama))

    status, raw = await post(pool_server, "/v1/chat/completions", chat("a b c", stream=True))

    metrics = await scrape_until(
        pool_server.url,
        lambda m: m.value("llamapool_model_requests_total", model=MODEL, outcome="success") == 1,
        what="the request to be counted",
    )
    state = await get_state(pool_server)
    (worker,) = [w for w in state["workers"] if w["id"] == agent.cfg.worker_id]
    assert (200, (0, 0)) == (status, client_usage("/v1/chat/completions", raw))
    assert b'"content":"echo:"' in raw
    assert 0 == metrics.total("llamapool_model_tokens_total")
    assert (0, 0) == (worker["tokens_in_total"], worker["tokens_out_total"])
    assert {"success_total": 1, "error_total": 0, "tokens_in_total": 0, "tokens_out_total": 0} == (
        worker["per_model"][MODEL]
    )


# --- the client gets the backend's bytes, counted or not ------------------------------------

#: A fixed SSE answer: usage in the last event, a decoy in the text, awkward chunk edges.
SCRIPTED = [
    b'data: {"id":"x","choices":[{"delta":{"content":"' + DECOY.replace('"', '\\"').encode(),
    b'"}}],"usage":null}\n\ndata: {"id":"x","choices":[],"usage":{"prompt_t',
    b'okens":7,"completion_to',
    b'kens":11,"total_tokens":18}}\n\n',
    b"data: [DONE]\n\n",
]
SCRIPTED_MODEL = "scripted:1b"


def create_scripted_app() -> web.Application:
    """A runtime whose every answer is :data:`SCRIPTED`, written chunk by chunk."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in SCRIPTED:
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    return app


async def test_counting_leaves_a_stream_byte_identical(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The client receives exactly the backend's bytes while the server counts their tokens."""
    runtime = await aiohttp_server(create_scripted_app())
    await start_worker(pool_server, FixedModels(url_of(runtime), [SCRIPTED_MODEL]))
    body = chat("hi", stream=True, model=SCRIPTED_MODEL)

    async with (
        aiohttp.ClientSession() as http,
        http.post(url_of(runtime) + "/v1/chat/completions", json=body) as resp,
    ):
        direct = await resp.read()
    status, pooled = await post(pool_server, "/v1/chat/completions", body)

    await settled(pool_server)
    metrics = await scrape(pool_server.url)
    assert b"".join(SCRIPTED) == direct
    assert (200, direct) == (status, pooled)
    assert [7, 11] == [
        metrics.value("llamapool_model_tokens_total", model=SCRIPTED_MODEL, kind=kind)
        for kind in ("in", "out")
    ]


async def test_echo_streams_through_the_pool_match_direct_ones(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A streamed echo answer through the pool has the same events and content as one straight
    from the backend (ids and timestamps aside, which differ between any two generations)."""
    ollama = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, "ollama", backend_url=url_of(ollama))

    for path, body in [
        ("/v1/chat/completions", chat("same words here", stream=True, usage=True)),
        ("/api/chat", chat("same words here", stream=True)),
    ]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(url_of(ollama) + path, json=body) as resp,
        ):
            direct = await resp.read()
        status, pooled = await post(pool_server, path, body)
        assert (200, normalized(direct)) == (status, normalized(pooled))


def normalized(raw: bytes) -> list[Any]:
    """A stream's events with the fields that name one generation (id, time) blanked."""
    events = []
    for line in raw.split(b"\n"):
        payload = line.removeprefix(b"data: ").strip()
        if not payload:
            continue
        if payload == b"[DONE]":
            events.append("[DONE]")
            continue
        event = orjson.loads(payload)
        for field in ("id", "created", "created_at"):
            if field in event:
                event[field] = "*"
        events.append(event)
    return events
