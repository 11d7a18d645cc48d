"""The Responses API across a pool: a follow-up (``previous_response_id``) and the stored
response routes reach the worker that produced the response, found from the relayed answer;
when that worker is gone, the client gets OpenAI's 404, not another worker's confusion."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.config import WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.server.affinity import (
    SCAN_LIMIT,
    Holder,
    ResponseAffinity,
    ResponseIdScanner,
)
from llamapool.testing import create_fake_vllm_app, fake_log
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .conftest import API_KEY, WORKER_KEY, PoolServer, StartWorker, url_of, wait_for

MODEL = "Qwen/Qwen3-8B"

# --- the bookkeeping ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_least_recently_used_id_goes_first_beyond_the_count() -> None:
    """Past max_ids, the id used longest ago is forgotten; a lookup counts as a use."""
    affinity = ResponseAffinity(max_ids=2)
    affinity.remember("a", Holder("w1", MODEL))
    affinity.remember("b", Holder("w2", MODEL))
    affinity.holder("a")
    affinity.remember("c", Holder("w3", MODEL))

    found = {rid: affinity.holder(rid) for rid in ("a", "b", "c")}

    assert {"a": Holder("w1", MODEL), "b": None, "c": Holder("w3", MODEL)} == found
    assert 2 == len(affinity)


def test_an_id_is_forgotten_a_ttl_after_its_last_use() -> None:
    """An id lives ttl seconds from its last use (creation or lookup), then is gone."""
    clock = Clock()
    affinity = ResponseAffinity(ttl=10, clock=clock)
    affinity.remember("a", Holder("w1", MODEL))
    affinity.remember("b", Holder("w1", MODEL))
    clock.now = 9
    kept = affinity.holder("a")
    clock.now = 15

    assert (Holder("w1", MODEL), Holder("w1", MODEL), None) == (
        kept,
        affinity.holder("a"),
        affinity.holder("b"),
    )
    clock.now = 26
    assert (None, 0) == (affinity.holder("a"), len(affinity))


def test_a_deleted_id_is_forgotten() -> None:
    """forget() drops an id at once."""
    affinity = ResponseAffinity()
    affinity.remember("a", Holder("w1", MODEL))
    affinity.forget("a")

    assert None is affinity.holder("a")


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    )


RID = "resp_0123456789abcdef0123456789abcdef"
#: The text a model may write: an id-like key inside a string, its quotes escaped.
DECOY = 'see {"id": "resp_decoy"}'
ANSWERS = {
    "body, id first (OpenAI, vLLM)": orjson.dumps(
        {"id": RID, "object": "response", "output": [{"id": "msg_1", "type": "message"}]}
    ),
    "stream, type first": sse(
        {"type": "response.created", "sequence_number": 0, "response": {"id": RID}},
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": DECOY},
    ),
    "stream, response first (openai-python's field order, as vLLM dumps it)": sse(
        {"response": {"id": RID, "instructions": DECOY}, "type": "response.created"},
        {"item": {"id": "msg_1"}, "type": "response.output_item.added"},
    ),
}


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def found_id(chunks: Iterator[bytes]) -> str:
    scanner = ResponseIdScanner()
    for chunk in chunks:
        scanner.feed(memoryview(chunk))
    return scanner.response_id


@pytest.mark.parametrize("answer", ANSWERS.values(), ids=ANSWERS.keys())
def test_the_response_id_is_found_wherever_chunks_split(answer: bytes) -> None:
    """Every chunk size, and every single cut, finds the response's own id."""
    by_size = {size: found_id(chunks_of(answer, size)) for size in range(1, len(answer) + 1)}
    by_cut = {cut: found_id(iter([answer[:cut], answer[cut:]])) for cut in range(len(answer))}

    assert dict.fromkeys(by_size, RID) == by_size
    assert dict.fromkeys(by_cut, RID) == by_cut


def test_the_id_is_looked_for_only_in_the_first_bytes() -> None:
    """Past SCAN_LIMIT bytes, the scanner stops looking (its cost per answer is bounded)."""
    padding = b" " * SCAN_LIMIT

    assert "" == found_id(iter([padding, orjson.dumps({"id": RID})]))


# --- through the pool -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def vllm_worker(
    server: PoolServer, backend: TestServer, worker_id: str
) -> AsyncIterator[None]:
    """A vLLM-type worker, running for the block (then gone from the pool)."""
    settings = WorkConfig(server_url=server.ws_url, worker_key=WORKER_KEY, worker_id=worker_id)
    agent = Agent(
        settings, load_backend("vllm")(BackendSettings(url=url_of(backend))), backend_name="vllm"
    )
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: server.pool.get(worker_id) is not None, what="the worker")
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: server.pool.get(worker_id) is None, what="the worker to leave")


def followups(backend: TestServer) -> list[str | None]:
    """The previous_response_id of each Responses request the backend received."""
    return [
        r.json().get("previous_response_id")
        for r in fake_log(backend.app).requests
        if r.path == "/v1/responses"
    ]


async def two_backends(aiohttp_server: AiohttpServer) -> tuple[TestServer, TestServer]:
    first = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    second = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    return first, second


async def test_follow_ups_land_on_the_worker_that_stored_the_response(
    aiohttp_server: AiohttpServer, pool_server: PoolServer
) -> None:
    """With two workers serving the model, a chain of follow-ups (plain and streamed), then
    retrieve, input_items and delete, all reach the worker whose backend stored the response;
    after the delete the pool answers 404 for the id."""
    backends = await two_backends(aiohttp_server)
    client = openai.AsyncOpenAI(base_url=pool_server.url + "/v1", api_key=API_KEY, max_retries=0)
    async with (
        vllm_worker(pool_server, backends[0], "w1"),
        vllm_worker(pool_server, backends[1], "w2"),
    ):
        first = await client.responses.create(model=MODEL, input="one")
        ids = [first.id]
        for text in ("two", "three"):
            answer = await client.responses.create(
                model=MODEL, input=text, previous_response_id=ids[-1]
            )
            ids.append(answer.id)
        async with client.responses.stream(
            model=MODEL, input="four", previous_response_id=ids[-1]
        ) as stream:
            streamed = await stream.get_final_response()
        ids.append(streamed.id)
        retrieved = await client.responses.retrieve(ids[-1])
        items = await client.responses.input_items.list(ids[-1])
        await client.responses.delete(ids[-1])
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.retrieve(ids[-1])
    await client.close()

    holder = 0 if followups(backends[0]) else 1
    assert [None, *ids[:-1]] == followups(backends[holder])
    assert [] == followups(backends[1 - holder])
    assert ("echo: four", ids[-1]) == (streamed.output_text, retrieved.id)
    assert ["four"] == [c.text for c in items.data[0].content]  # type: ignore[union-attr]
    assert ["GET", "GET", "DELETE"] == [
        r.method for r in fake_log(backends[holder].app).requests if r.method != "POST"
    ][-3:]
    assert "response_not_found" == gone.value.code


async def test_a_follow_up_whose_worker_left_gets_a_clear_404(
    aiohttp_server: AiohttpServer, pool_server: PoolServer
) -> None:
    """When the worker that stored a response has left, a follow-up answers OpenAI's 404
    (previous_response_not_found, param previous_response_id) and never reaches another
    worker; a new conversation still works there."""
    first, second = await two_backends(aiohttp_server)
    client = openai.AsyncOpenAI(base_url=pool_server.url + "/v1", api_key=API_KEY, max_retries=0)
    async with contextlib.AsyncExitStack() as stays:
        async with vllm_worker(pool_server, first, "leaves"):
            stored = await client.responses.create(model=MODEL, input="remember me")
            await stays.enter_async_context(vllm_worker(pool_server, second, "stays"))
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(
                model=MODEL, input="and now?", previous_response_id=stored.id
            )
        fresh = await client.responses.create(model=MODEL, input="new start")
    await client.close()

    body = caught.value.body
    assert isinstance(body, dict)
    assert ("previous_response_not_found", "previous_response_id") == (
        body["code"],
        body["param"],
    )
    assert "left the pool" in body["message"]
    assert [None] == followups(second)
    assert "echo: new start" == fresh.output_text


async def test_an_id_the_pool_never_saw_is_routed_by_model(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A follow-up naming an id the pool does not know goes to a worker serving the model,
    whose backend answers for it; a stored-response route with an unknown id is a 404."""
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))
    body = {"model": MODEL, "input": "hi", "previous_response_id": "resp_unknown"}
    async with aiohttp.ClientSession(headers=pool_server.auth) as http:
        async with http.post(pool_server.url + "/v1/responses", json=body) as resp:
            relayed = (resp.status, (await resp.json())["error"]["code"])
        async with http.get(pool_server.url + "/v1/responses/resp_unknown") as resp:
            answered = (resp.status, (await resp.json())["error"]["code"])

    assert (404, "previous_response_not_found") == relayed
    assert ["resp_unknown"] == followups(backend)
    assert (404, "response_not_found") == answered


async def test_a_busy_pinned_worker_answers_503_with_retry_after(
    aiohttp_server: AiohttpServer, pool_server: PoolServer
) -> None:
    """A follow-up whose worker is at its max concurrency is not queued for another worker:
    it answers 503 with Retry-After, which the SDKs retry."""
    slow = await aiohttp_server(create_fake_vllm_app(models=[MODEL], chunk_delay=0.05))
    settings = WorkConfig(
        server_url=pool_server.ws_url, worker_key=WORKER_KEY, worker_id="one", max_concurrency=1
    )
    agent = Agent(
        settings, load_backend("vllm")(BackendSettings(url=url_of(slow))), backend_name="vllm"
    )
    task = asyncio.create_task(agent.run())
    await wait_for(lambda: pool_server.pool.get("one") is not None, what="the worker")
    stored = {"model": MODEL, "input": "x"}
    busy = {"model": MODEL, "input": "slow " * 100, "stream": True}
    async with aiohttp.ClientSession(headers=pool_server.auth) as http:
        async with http.post(pool_server.url + "/v1/responses", json=stored) as resp:
            rid = (await resp.json())["id"]
        async with http.post(pool_server.url + "/v1/responses", json=busy) as streaming:
            await streaming.content.readline()
            follow = {"model": MODEL, "input": "y", "previous_response_id": rid}
            async with http.post(pool_server.url + "/v1/responses", json=follow) as resp:
                refused = (resp.status, resp.headers.get("Retry-After"))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert (503, "1") == refused
