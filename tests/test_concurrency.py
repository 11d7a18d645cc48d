"""Many clients at once: every answer goes to the request that asked for it, the load spreads
over every worker, no worker takes more than its max concurrency, and every slot comes back."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson
from pytest_aiohttp import AiohttpServer

from llamapool.testing import create_fake_ollama_app, fake_log

from .conftest import PoolServer, StartWorker, url_of, wait_for

MODEL = "llama3:8b"
WORKERS = 4
MAX_CONCURRENCY = 4
REQUESTS = 300
#: Twice the pool's capacity, so requests compete for slots.
CLIENTS = 2 * WORKERS * MAX_CONCURRENCY
MAX_ATTEMPTS = 200


def request_for(i: int, prompt: str) -> tuple[str, dict[str, Any]]:
    """Request ``i``: OpenAI or Ollama, streamed or not, in turn."""
    messages = [{"role": "user", "content": prompt}]
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"model": MODEL, "messages": messages}),
        ("/v1/chat/completions", {"model": MODEL, "messages": messages, "stream": True}),
        ("/api/chat", {"model": MODEL, "messages": messages}),  # Ollama streams by default
        ("/api/generate", {"model": MODEL, "prompt": prompt, "stream": False}),
    ]
    return requests[i % 4]


def answer_text(path: str, body: dict[str, Any], raw: bytes) -> str:
    """The text of an answer, whichever API and framing it came in."""
    if path.startswith("/v1/") and body.get("stream"):
        parts = []
        for line in raw.split(b"\n"):
            payload = line.removeprefix(b"data: ").strip()
            if line.startswith(b"data: ") and payload != b"[DONE]":
                parts.append(orjson.loads(payload)["choices"][0]["delta"].get("content") or "")
        return "".join(parts)
    if path.startswith("/v1/"):
        return str(orjson.loads(raw)["choices"][0]["message"]["content"])
    lines = [orjson.loads(line) for line in raw.split(b"\n") if line.strip()]
    return "".join(
        line.get("message", {}).get("content") or line.get("response", "") for line in lines
    )


async def test_hundreds_of_concurrent_requests_each_get_their_own_answer(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """300 concurrent mixed requests over 4 workers all succeed with their own echo, spread over
    every worker, never above a worker's max concurrency, and leave no slot taken."""
    backends = [
        await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=0.002))
        for _ in range(WORKERS)
    ]
    agents = [
        await start_worker(
            pool_server, "ollama", backend_url=url_of(b), max_concurrency=MAX_CONCURRENCY
        )
        for b in backends
    ]
    handles = [pool_server.pool.get(a.cfg.worker_id) for a in agents]
    workers = [h for h in handles if h is not None]
    assert WORKERS == len(workers)

    highest = dict.fromkeys((w.id for w in workers), 0)
    refusals: list[tuple[int, Any]] = []
    clients = asyncio.Semaphore(CLIENTS)
    done = asyncio.Event()

    async def watch_load() -> None:
        while not done.is_set():
            for worker in workers:
                highest[worker.id] = max(highest[worker.id], worker.inflight)
            await asyncio.sleep(0.001)

    async def one(http: aiohttp.ClientSession, i: int) -> tuple[int, str, str]:
        prompt = f"request {i} {uuid.uuid4().hex}"
        path, body = request_for(i, prompt)
        async with clients:
            for _ in range(MAX_ATTEMPTS):
                async with http.post(
                    pool_server.url + path, json=body, headers=pool_server.auth
                ) as resp:
                    raw = await resp.read()
                if resp.status not in (429, 503):
                    return resp.status, f"echo: {prompt}", answer_text(path, body, raw)
                refusals.append((resp.status, orjson.loads(raw)))
                await wait_for(
                    lambda: any(w.has_capacity for w in workers), what="a free slot", timeout=30
                )
        raise AssertionError(f"request {i} was refused {MAX_ATTEMPTS} times")

    watcher = asyncio.create_task(watch_load())
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as http:
        results = await asyncio.gather(*(one(http, i) for i in range(REQUESTS)))
    done.set()
    await watcher

    assert [(200, expected) for _, expected, _ in results] == [
        (status, text) for status, _, text in results
    ]
    for status, error in refusals:  # a refusal is JSON in its API's shape, then retried
        assert isinstance(error["error"], (str, dict))
        assert status in (429, 503)
    served = [len([r for r in fake_log(b.app).requests if r.method == "POST"]) for b in backends]
    assert REQUESTS == sum(served)  # each request reached exactly one backend, once
    assert all(count > 0 for count in served), served
    assert all(level <= MAX_CONCURRENCY for level in highest.values()), highest
    assert MAX_CONCURRENCY == max(highest.values())
    await wait_for(
        lambda: all(w.inflight == 0 for w in workers) and not any(len(a.jobs) for a in agents),
        what="every slot and job to be released",
    )
    assert [0] * WORKERS == [w.inflight for w in workers]


async def test_concurrent_streams_do_not_interleave(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Streams sharing one worker connection each carry only their own request's tokens."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=0.01))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend), max_concurrency=16)
    words = [[f"w{i}-{n}" for n in range(20)] for i in range(16)]

    async def stream(http: aiohttp.ClientSession, i: int) -> str:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": " ".join(words[i])}],
            "stream": True,
        }
        async with http.post(
            pool_server.url + "/v1/chat/completions", json=body, headers=pool_server.auth
        ) as resp:
            return answer_text("/v1/chat/completions", body, await resp.read())

    async with aiohttp.ClientSession() as http:
        answers = await asyncio.gather(*(stream(http, i) for i in range(16)))

    assert [f"echo: {' '.join(w)}" for w in words] == answers
    assert 16 == fake_log(backend.app).paths.count("/v1/chat/completions")
