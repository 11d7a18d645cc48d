"""Servers given one ``CLUSTER_URL`` act as one pool: any server answers any request, with the
worker that serves it wherever that worker is connected.

These tests run two or three servers in this process on one real Redis (see
:mod:`.redis_helpers`), with real workers and the official ``openai`` client; the tests with
``serve`` processes, SIGKILL and SO_REUSEPORT are in ``test_cluster_processes``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
import structlog

from llamapool.backends.demo import DemoBackend, EchoOptions
from llamapool.plugin_api import BackendSettings
from llamapool.server import relay
from llamapool.server.appkeys import SCHEDULER, STATE
from llamapool.server.cluster.endpoint import CLUSTER
from llamapool.server.cluster.peer import AUTH, PATH, RELAY_PATH, WORKER
from llamapool.testing import create_fake_ollama_app

from . import redis_helpers
from .conftest import API_KEY, PoolServer, url_of, wait_for
from .keys_helpers import MODEL, captured_events, chat, raw_worker
from .redis_helpers import RedisServer

redis_server = redis_helpers.redis_server

CLUSTER_KEY = "test-cluster-key"

Start = Callable[..., Awaitable[PoolServer]]


@pytest.fixture
async def clustered(redis_server: RedisServer, start_server: Start) -> Start:
    """Start a server in the test cluster (keyword arguments override settings)."""

    async def start(**overrides: Any) -> PoolServer:
        settings: dict[str, Any] = {
            "cluster_url": redis_server.url,
            "cluster_keys": CLUSTER_KEY,
        }
        settings.update(overrides)
        return await start_server(**settings)

    return start


async def together(*servers: PoolServer) -> None:
    """Wait until every server knows every other."""

    def joined() -> bool:
        return all(
            s.server.app[CLUSTER].connected and len(s.server.app[CLUSTER].peers) == len(servers) - 1
            for s in servers
        )

    await wait_for(joined, timeout=10, what="the servers to find each other")


def slow_backend(delay: float = 0.05) -> DemoBackend:
    return DemoBackend(BackendSettings(url=""), options=EchoOptions(chunk_delay=delay))


def client(server: PoolServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


async def ask(server: PoolServer, text: str, *, model: str = "demo", stream: bool = False) -> str:
    messages: Any = [{"role": "user", "content": text}]
    async with client(server) as sdk:
        if not stream:
            chat = await sdk.chat.completions.create(model=model, messages=messages)
            return chat.choices[0].message.content or ""
        parts = []
        async for chunk in await sdk.chat.completions.create(
            model=model, messages=messages, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)


async def test_any_server_answers_with_a_worker_connected_to_another(
    clustered: Start, start_worker: Any
) -> None:
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(b, worker_id="on-b")
    await wait_for(lambda: a.pool.get("on-b") is not None, what="a to learn of b's worker")
    assert a.pool.get("on-b").server == b.server.app[CLUSTER].id  # type: ignore[union-attr]

    assert "across the cluster" in await ask(a, "across the cluster")
    assert "and streamed" in await ask(a, "and streamed", stream=True)


async def test_between_equally_busy_workers_a_request_stays_on_its_server(
    clustered: Start, start_worker: Any
) -> None:
    """With an idle worker on each server, requests to a go to a's own worker, not across to
    b's every other time: a hop costs both servers and the client, for nothing."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(a, worker_id="on-a")
    await start_worker(b, worker_id="on-b")
    await wait_for(lambda: a.pool.get("on-b") is not None, what="a to learn of b's worker")
    with captured_events() as events:
        for n in range(6):
            assert f"one at a time {n}" in await ask(a, f"one at a time {n}")
    served = [e["worker_id"] for e in events if e["event"] == "request_done"]
    assert ["on-a"] * 6 == served


async def test_every_server_lists_the_whole_cluster(clustered: Start, start_worker: Any) -> None:
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(a, worker_id="on-a", worker_name="alpha")
    await start_worker(b, worker_id="on-b", worker_name="beta")
    await wait_for(lambda: a.pool.get("on-b") is not None and b.pool.get("on-a") is not None)
    ids = {a.server.app[CLUSTER].id: "a", b.server.app[CLUSTER].id: "b"}
    async with aiohttp.ClientSession(headers=a.auth) as http:
        for server in (a, b):
            async with http.get(server.url + "/api/v1/state") as response:
                state = await response.json()
            listed = {w["id"]: ids[w["server"]] for w in state["workers"]}
            assert listed == {"on-a": "a", "on-b": "b"}  # each worker once, with its server
            assert state["cluster"]["connected"] is True
            assert len(state["cluster"]["servers"]) == 2
            async with http.get(server.url + "/v1/models") as response:
                models = await response.json()
            assert [m["id"] for m in models["data"]] == ["demo"]
            async with http.get(server.url + "/healthz") as response:
                assert (await response.json())["cluster"] == "connected"
            async with http.get(server.url + "/api/tags") as response:
                assert [m["name"] for m in (await response.json())["models"]] == ["demo"]


async def test_a_workers_limit_holds_with_load_from_every_server(
    clustered: Start, start_worker: Any
) -> None:
    """Two servers send twelve streams at once to the one worker that allows two at a time:
    never more than two run on it, and every answer belongs to its request."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    backend = slow_backend(0.02)
    await start_worker(b, backend, worker_id="only", max_concurrency=2)
    await wait_for(lambda: a.pool.get("only") is not None)
    worker = b.pool.get("only")
    assert worker is not None
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, worker.inflight)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    texts = [f"request number {i}" for i in range(12)]
    try:
        answers = await asyncio.gather(
            *(ask(a if i % 2 else b, text, stream=True) for i, text in enumerate(texts))
        )
    finally:
        watcher.cancel()
    for text, answer in zip(texts, answers, strict=True):
        assert text in answer
    assert peak == 2
    # A request refused for want of a slot goes back to a's queue and is sent again only once
    # b reports a slot free, which happens at most once per request ended: a sends its 6, plus
    # at most one retry for each of the 12 ends, never a stream of retries.
    sent = a.server.app[STATE].metrics.cluster_requests.labels("out")._value.get()
    assert 6 <= sent <= 18


async def test_a_request_queued_on_one_server_takes_a_worker_freed_on_another(
    clustered: Start, start_worker: Any
) -> None:
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(b, slow_backend(0.05), worker_id="only", max_concurrency=1)
    await wait_for(lambda: a.pool.get("only") is not None)
    first = asyncio.create_task(ask(b, "first in line " * 4, stream=True))
    await wait_for(lambda: b.pool.get("only").inflight == 1)  # type: ignore[union-attr]
    await wait_for(lambda: a.pool.get("only").inflight == 1)  # type: ignore[union-attr]
    second = asyncio.create_task(ask(a, "second in line", stream=True))
    await wait_for(lambda: len(a.server.app[SCHEDULER]) == 1, what="the request to queue on a")
    assert "first in line" in await first
    assert "second in line" in await second


async def test_a_server_that_leaves_takes_its_workers_out_of_every_view_at_once(
    clustered: Start, start_worker: Any
) -> None:
    """A stopping server leaves first (before draining): the others stop offering its
    workers on its word, not when its entries expire."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(b, worker_id="leaving")
    await wait_for(lambda: a.pool.get("leaving") is not None)
    with structlog.testing.capture_logs() as logs:
        await b.server.app[CLUSTER].stop()
        await wait_for(lambda: a.pool.get("leaving") is None, what="a to forget b's worker")
    assert not a.server.app[CLUSTER].peers
    b_id = b.server.app[CLUSTER].id
    left = [e for e in logs if e["event"] == "cluster_server_left" and e["server"] == b_id]
    assert [e["reason"] for e in left] == ["left"]


async def test_without_redis_a_server_serves_its_own_workers_and_rejoins(
    redis_server: RedisServer, clustered: Start, start_worker: Any
) -> None:
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(a, worker_id="on-a")
    await start_worker(b, worker_id="on-b")
    await wait_for(lambda: a.pool.get("on-b") is not None and b.pool.get("on-a") is not None)

    await redis_server.stop()
    await wait_for(lambda: not a.server.app[CLUSTER].connected, what="a to notice")
    assert a.pool.get("on-b") is None  # it cannot hear from b: b's workers are not offered
    assert "still served" in await ask(a, "still served")
    async with aiohttp.ClientSession() as http, http.get(a.url + "/healthz") as response:
        assert response.status == 200
        assert (await response.json())["cluster"] == "disconnected"

    await redis_server.start()
    await together(a, b)
    await wait_for(lambda: a.pool.get("on-b") is not None and b.pool.get("on-a") is not None)
    assert b.pool.get("on-b").inflight == 0  # type: ignore[union-attr]  # nothing counted twice
    assert "after the outage" in await ask(a, "after the outage")


async def test_only_a_member_of_the_cluster_may_send_a_request_to_its_workers(
    clustered: Start, start_worker: Any
) -> None:
    a = await clustered()
    await start_worker(a, worker_id="w")
    forged = {WORKER: "w", PATH: "/v1/chat/completions", "Content-Type": "application/json"}
    body = b'{"model": "demo", "messages": []}'
    async with aiohttp.ClientSession() as http:
        for token in ("", "x.1.y", a.server.app[CLUSTER].auth.token("x", now=0)):
            async with http.post(
                a.url + RELAY_PATH, headers={**forged, AUTH: token}, data=body
            ) as response:
                assert response.status == 401
        # And a client's own X-Llamapool-* headers are no key to anything.
        async with http.post(
            a.url + "/v1/chat/completions",
            headers={**a.auth, **forged, AUTH: "forged"},
            data=body,
        ) as response:
            assert response.status == 200


async def test_a_server_with_another_cluster_key_is_not_a_member(
    clustered: Start, start_worker: Any
) -> None:
    a = await clustered()
    outsider = await clustered(cluster_keys="another-key")
    await start_worker(outsider, worker_id="outsider-worker")
    await wait_for(lambda: a.server.app[CLUSTER].connected)
    await wait_for(lambda: outsider.server.app[CLUSTER].connected)
    rounds = a.server.app[CLUSTER].rounds
    # Two full rounds of "who is there" later, the outsider is still no peer.
    await wait_for(lambda: a.server.app[CLUSTER].rounds >= rounds + 2, what="two rounds")
    assert a.pool.get("outsider-worker") is None
    assert not a.server.app[CLUSTER].peers


async def test_a_client_that_leaves_stops_the_job_on_the_other_server(
    clustered: Start, start_worker: Any
) -> None:
    """The stream would run for 20 s; its client reads one chunk and leaves: the worker on the
    other server is free again long before."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    await start_worker(b, slow_backend(0.1), worker_id="far")
    await wait_for(lambda: a.pool.get("far") is not None)
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "word " * 200}],
        "stream": True,
    }
    async with (
        aiohttp.ClientSession(headers=a.auth) as http,
        http.post(a.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        await response.content.readany()
        assert b.pool.get("far").inflight == 1  # type: ignore[union-attr]
    await wait_for(
        lambda: b.pool.get("far").inflight == 0,  # type: ignore[union-attr]
        timeout=5,
        what="the job on b to stop",
    )


async def test_garbage_in_redis_is_skipped_and_the_cluster_goes_on(
    redis_server: RedisServer, clustered: Start, start_worker: Any
) -> None:
    """Redis is shared: whatever else writes there (malformed messages, entries that are not
    a server's, a forged announcement) is skipped, and the servers go on as one pool."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    b_id = b.server.app[CLUSTER].id
    with structlog.testing.capture_logs() as logs:
        await send_junk(redis_server, b_id)
        rounds = a.server.app[CLUSTER].rounds
        await wait_for(lambda: a.server.app[CLUSTER].rounds >= rounds + 2, what="two rounds")
    events = [e["event"] for e in logs]
    assert "cluster_message_invalid" in events
    assert not {"cluster_failed", "cluster_unreachable", "cluster_disconnected"} & set(events)
    await start_worker(b, worker_id="after-the-junk")
    await wait_for(lambda: a.pool.get("after-the-junk") is not None)
    assert "forged" not in a.server.app[CLUSTER].peers
    assert a.pool.get("ghost") is None
    assert "still one pool" in await ask(a, "still one pool")


async def send_junk(redis_server: RedisServer, b_id: str) -> None:
    async with redis_server.client() as redis:
        for junk in (
            b"not json",
            b"[1, 2]",
            b'{"server": "%s", "seq": "x", "workers": {"w": 1}}' % b_id.encode(),
            b'{"server": "%s", "usage": [1]}' % b_id.encode(),
            b'{"server": "%s", "seq": 1, "workers": {"ghost": {"models": 5}}}' % b_id.encode(),
        ):
            await redis.publish("llamapool:events", junk)
        await redis.hset(f"llamapool:workers:{b_id}", "bad", b'{"seq": 1}')
        await redis.set("llamapool:server:forged", b'{"server": "{}", "sig": "00"}', px=5000)
        await redis.sadd("llamapool:servers", "forged")


async def test_requests_are_served_in_order_of_arrival_over_the_servers(
    clustered: Start,
) -> None:
    """The worker on b frees up while a request waits on a and two, which came later, wait on
    b: the one on a goes first, though b could have served its own."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    async with raw_worker(b) as worker, aiohttp.ClientSession() as http:
        await wait_for(lambda: a.pool.get("raw-1") is not None)

        async def post(server: PoolServer, text: str) -> int:
            url = server.url + "/v1/chat/completions"
            async with http.post(url, json=chat(text), headers=a.auth) as response:
                await response.read()
                return response.status

        def send(server: PoolServer, text: str) -> asyncio.Task[int]:
            return asyncio.create_task(post(server, text))

        busy = send(b, "first")
        held = await worker.next()
        on_a = send(a, "waits on a")
        await wait_for(lambda: len(a.server.app[SCHEDULER]) == 1)
        a_id = a.server.app[CLUSTER].id
        await wait_for(lambda: MODEL in b.server.app[CLUSTER]._turns.get(a_id, {}))
        later = [send(b, "later on b"), send(b, "later still on b")]
        await wait_for(lambda: len(b.server.app[SCHEDULER]) == 2)
        worker.auto = True
        await worker.answer(held)
        statuses = await asyncio.gather(busy, on_a, *later)
    assert [200] * 4 == statuses
    assert ["first", "waits on a", "later on b", "later still on b"] == worker.contents()


async def test_a_worker_of_another_server_is_not_evicted_for_its_silence_here(
    clustered: Start, start_worker: Any
) -> None:
    """Heartbeats reach the server a worker is connected to, which watches them; the others
    keep offering it well past their WORKER_TIMEOUT."""
    a, b = await clustered(worker_timeout=0.5), await clustered(worker_timeout=0.5)
    await together(a, b)
    await start_worker(b, worker_id="far", heartbeat_interval=0.1)
    await wait_for(lambda: a.pool.get("far") is not None)
    far = b.pool.get("far")
    assert far is not None
    since = far.last_heartbeat
    await wait_for(lambda: far.last_heartbeat > since + 2.0, what="b to hear 2 s of heartbeats")
    assert a.pool.get("far") is not None
    assert "still offered" in await ask(a, "still offered")


async def test_api_ps_asks_the_workers_of_every_server(
    clustered: Start, start_worker: Any, aiohttp_server: Any
) -> None:
    """``/api/ps`` on a lists what the Ollama behind a worker on b holds in memory."""
    a, b = await clustered(), await clustered()
    await together(a, b)
    ollama = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b"]))
    await start_worker(b, "ollama", backend_url=url_of(ollama), worker_id="ollama-on-b")
    await wait_for(lambda: a.pool.get("ollama-on-b") is not None)
    async with (
        aiohttp.ClientSession(headers=a.auth) as http,
        http.get(a.url + "/api/ps") as response,
    ):
        running = (await response.json())["models"]
    assert [("llama3:8b", 4_920_753_328)] == [(m["name"], m["size"]) for m in running]


async def test_a_responses_follow_up_reaches_its_worker_through_any_server(
    clustered: Start, start_worker: Any
) -> None:
    """A stored response made through a is followed up, and fetched, through b: b asks the
    cluster which worker holds it."""
    a, b, c = await clustered(), await clustered(), await clustered()
    await together(a, b, c)
    await start_worker(c, worker_id="holder")
    await start_worker(c, worker_id="other")
    await wait_for(lambda: a.pool.get("other") is not None and b.pool.get("other") is not None)
    async with client(a) as via_a, client(b) as via_b:
        first = await via_a.responses.create(model="demo", input="remember me")
        holder = c.server.app[relay.AFFINITY].holder(first.id)
        assert holder is None  # c only served it; a relayed it and shared where it lives
        follow_up = await via_b.responses.create(
            model="demo", input="and then", previous_response_id=first.id
        )
        fetched = await via_b.responses.retrieve(first.id)
    assert fetched.id == first.id
    assert follow_up.previous_response_id == first.id
