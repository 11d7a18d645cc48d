"""In a cluster a key's limits and fair share hold over every server: what one server admitted
comes out of the same buckets on the others, requests in progress anywhere count against the
key's concurrency, the daily budget is counted in Redis (so a server that joins later knows
it), and keys whose requests wait on different servers take turns by weight.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llamapool.server.appkeys import KEYS, SCHEDULER
from llamapool.server.cluster.endpoint import CLUSTER

from . import redis_helpers
from .conftest import PoolServer, StartServer, wait_for
from .keys_helpers import (
    BATCH,
    CHAT,
    MODEL,
    RawWorker,
    chat,
    fair_keys,
    post,
    raw_worker,
    sdk,
    until_queued,
    write_keys,
)
from .redis_helpers import RedisServer

redis_server = redis_helpers.redis_server

KEY = "sk-shared-app-key"
CLUSTER_KEY = "test-cluster-key"


async def member(
    start_server: StartServer, redis: RedisServer, keys_file: Path, **overrides: Any
) -> PoolServer:
    """A server of the test cluster, with the keys file and no plain API keys."""
    settings: dict[str, Any] = {
        "cluster_url": redis.url,
        "cluster_keys": CLUSTER_KEY,
        "keys_file": str(keys_file),
        "api_keys": (),
    }
    return await start_server(**settings, **overrides)


async def cluster_of(
    count: int,
    start_server: StartServer,
    redis: RedisServer,
    keys_file: Path,
    **overrides: Any,
) -> list[PoolServer]:
    """``count`` servers of the test cluster, once each knows every other."""
    servers = [await member(start_server, redis, keys_file, **overrides) for _ in range(count)]
    await wait_for(
        lambda: all(len(s.server.app[CLUSTER].peers) == count - 1 for s in servers),
        timeout=10,
        what="the servers to find each other",
    )
    return servers


def usage_on(server: PoolServer) -> Any:
    return server.server.app[KEYS].usage["app"]


async def test_requests_per_minute_hold_across_servers(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path / "keys.yaml", f"keys:\n  - name: app\n    key: {KEY}\n    rpm: 4\n")
    a, b = await cluster_of(2, start_server, redis_server, keys)
    messages = chat("hi")["messages"]
    async with raw_worker(a, auto=True), sdk(a, KEY) as on_a, sdk(b, KEY) as on_b:
        for _ in range(3):
            await on_a.chat.completions.create(model=MODEL, messages=messages)
        # b takes a's three requests out of the same bucket
        await wait_for(lambda: usage_on(b).requests.level < 2, what="b to hear of a's requests")
        await on_b.chat.completions.create(model=MODEL, messages=messages)
        with pytest.raises(openai.RateLimitError) as refused:
            await on_b.chat.completions.create(model=MODEL, messages=messages)
    assert refused.value.code == "rate_limit_exceeded"


async def test_concurrency_counts_requests_in_progress_on_every_server(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    keys = write_keys(
        tmp_path / "keys.yaml", f"keys:\n  - name: app\n    key: {KEY}\n    max_concurrent: 1\n"
    )
    a, b = await cluster_of(2, start_server, redis_server, keys)
    messages: Any = chat("hold on")["messages"]
    async with raw_worker(a) as worker, sdk(a, KEY) as on_a, sdk(b, KEY) as on_b:
        held = asyncio.create_task(on_a.chat.completions.create(model=MODEL, messages=messages))
        request = await worker.next()  # in progress on a's worker
        await wait_for(lambda: usage_on(b).active_elsewhere == 1, what="b to count a's request")
        with pytest.raises(openai.RateLimitError) as refused:
            await on_b.chat.completions.create(model=MODEL, messages=messages)
        await worker.answer(request)
        await held
        await wait_for(lambda: usage_on(b).active_elsewhere == 0, what="b to see it end")
        worker.auto = True
        await on_b.chat.completions.create(model=MODEL, messages=messages)
    assert refused.value.code == "rate_limit_exceeded"


async def test_a_daily_budget_spent_on_one_server_is_spent_on_all_and_on_newcomers(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The raw worker reports 100 tokens per answer; the budget is 150."""
    keys = write_keys(
        tmp_path / "keys.yaml", f"keys:\n  - name: app\n    key: {KEY}\n    daily_tokens: 150\n"
    )
    a, b = await cluster_of(2, start_server, redis_server, keys)
    messages = chat("hi")["messages"]
    async with raw_worker(a, auto=True), sdk(a, KEY) as on_a, sdk(b, KEY) as on_b:
        await on_a.chat.completions.create(model=MODEL, messages=messages)
        await on_a.chat.completions.create(model=MODEL, messages=messages)  # 200 of 150
        await wait_for(lambda: usage_on(b).day_tokens >= 150, what="b to read the budget")
        with pytest.raises(openai.RateLimitError) as on_b_refused:
            await on_b.chat.completions.create(model=MODEL, messages=messages)
        c = await member(start_server, redis_server, keys)
        await wait_for(lambda: usage_on(c).day_tokens >= 150, what="a newcomer to read it")
        async with sdk(c, KEY) as on_c:
            with pytest.raises(openai.RateLimitError) as on_c_refused:
                await on_c.chat.completions.create(model=MODEL, messages=messages)
    assert on_b_refused.value.code == on_c_refused.value.code == "insufficient_quota"


async def test_the_queue_bounds_hold_over_the_servers(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """QUEUE_SIZE 2: with two requests waiting on a, a third one sent to b is refused (429)."""
    keys = write_keys(tmp_path / "keys.yaml", f"keys:\n  - name: app\n    key: {KEY}\n")
    a, b = await cluster_of(2, start_server, redis_server, keys, queue_size=2)
    messages: Any = chat("wait")["messages"]
    async with raw_worker(a) as worker, sdk(a, KEY) as on_a, sdk(b, KEY) as on_b:
        await wait_for(lambda: b.pool.get("raw-1") is not None, what="b to learn of the worker")
        calls = [
            asyncio.create_task(on_a.chat.completions.create(model=MODEL, messages=messages))
            for _ in range(3)
        ]
        first = await worker.next()  # one on the worker, two waiting on a
        await wait_for(lambda: len(a.server.app[SCHEDULER]) == 2, what="two waiting on a")
        scheduler_b = b.server.app[SCHEDULER]
        await wait_for(
            lambda: scheduler_b.queued_elsewhere(MODEL, "app") == 2, what="b to count them"
        )
        with pytest.raises(openai.RateLimitError) as refused:
            await on_b.chat.completions.create(model=MODEL, messages=messages)
        worker.auto = True
        await worker.answer(first)
        await asyncio.gather(*calls)
    assert refused.value.code == "queue_full"


def in_step(*servers: PoolServer) -> bool:
    """Whether each server knows where every other server's queues stand."""
    for here in servers:
        for there in servers:
            if there is here:
                continue
            known = here.server.app[CLUSTER]._turns.get(there.server.app[CLUSTER].id, {})
            if known != there.server.app[SCHEDULER].turns():
                return False
    return True


async def served_over(worker: RawWorker, servers: tuple[PoolServer, ...], count: int) -> list[str]:
    """Answer the request on the worker, then ``count`` more but the last, each once the
    servers are in step (so the order is the scheduler's, not the messages' timing); the key
    of each one. The last one served stays on the worker, the servers in step."""
    request = worker.received[-1]
    order = []
    for _ in range(count):
        await wait_for(lambda: in_step(*servers), what="the servers to share their queues")
        await worker.answer(request)
        request = await worker.next()
        order.append(orjson.loads(request.body)["messages"][0]["content"].split("-")[0])
    await wait_for(lambda: in_step(*servers), what="the servers to share their queues")
    return order


async def contend(
    tmp_path: Path,
    start_server: StartServer,
    redis: RedisServer,
    *,
    weight: int,
    queued: list[tuple[int, str, int]],
    count: int,
) -> list[str]:
    """Two servers and a worker with one slot on the first, held busy; ``queued`` sends
    (server, key, requests) in that order; the key of each of the next ``count`` served."""
    keys = fair_keys(tmp_path / "keys.yaml", batch_weight=weight)
    servers = tuple(await cluster_of(2, start_server, redis, keys))
    a, b = servers
    async with raw_worker(a) as worker, aiohttp.ClientSession() as http:
        await wait_for(lambda: b.pool.get("raw-1") is not None, what="b to learn of the worker")
        tasks = [asyncio.create_task(post(http, a, BATCH, chat("held")))]
        await worker.next()
        waiting = [0, 0]
        for index, key, requests in queued:
            label = "batch" if key == BATCH else "chat"
            for i in range(requests):
                body = chat(f"{label}-{i}")
                tasks.append(asyncio.create_task(post(http, servers[index], key, body)))
                waiting[index] += 1
                await until_queued(servers[index], waiting[index])
        order = await served_over(worker, servers, count)
        await worker.answer(worker.received[-1])
        for _ in range(sum(waiting) - count):
            await worker.answer_next()
        answers = await asyncio.gather(*tasks)
    assert all(200 == status for status, _, _ in answers)
    return order


async def test_keys_waiting_on_different_servers_share_by_weight(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Weights 3:1, batch's requests waiting on a (the worker's server) and chat's on b: of 24
    served, batch gets 18 and chat 6 (within one), as on one server; not the 1:1 of taking
    turns by server nor the order of arrival."""
    order = await contend(
        tmp_path,
        start_server,
        redis_server,
        weight=3,
        queued=[(0, BATCH, 20), (1, CHAT, 20)],
        count=24,
    )
    assert 17 <= order.count("batch") <= 19, order


async def test_a_key_sending_through_two_servers_gets_one_share_not_two(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Weights 1:1, batch's requests waiting on both servers and chat's on a: of 20 served,
    chat gets 10 (within one), not the third it would get if each server gave batch a share."""
    order = await contend(
        tmp_path,
        start_server,
        redis_server,
        weight=1,
        queued=[(0, BATCH, 10), (1, BATCH, 10), (0, CHAT, 20)],
        count=20,
    )
    assert 9 <= order.count("chat") <= 11, order


async def test_a_key_that_starts_waiting_on_another_server_joins_the_turns_where_they_are(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Chat's queue on a has been served six times when batch (weight 1) starts queueing on b:
    the two alternate from there; batch does not catch up on the six turns it was not there
    for."""
    keys = fair_keys(tmp_path / "keys.yaml")
    a, b = await cluster_of(2, start_server, redis_server, keys)
    async with raw_worker(a) as worker, aiohttp.ClientSession() as http:
        await wait_for(lambda: b.pool.get("raw-1") is not None, what="b to learn of the worker")
        tasks = [asyncio.create_task(post(http, a, CHAT, chat("held")))]
        await worker.next()
        for i in range(16):
            tasks.append(asyncio.create_task(post(http, a, CHAT, chat(f"chat-{i}"))))
            await until_queued(a, i + 1)
        first = await served_over(worker, (a, b), 6)
        for i in range(8):
            tasks.append(asyncio.create_task(post(http, b, BATCH, chat(f"batch-{i}"))))
            await until_queued(b, i + 1)
        then = await served_over(worker, (a, b), 12)
        await worker.answer(worker.received[-1])
        for _ in range(6):
            await worker.answer_next()
        answers = await asyncio.gather(*tasks)

    assert ["chat"] * 6 == first
    longest = max(len(run) for run in "".join(k[0] for k in then).split("c") if run)
    assert (1, 6) == (longest, then.count("batch")), then
    assert all(200 == status for status, _, _ in answers)
