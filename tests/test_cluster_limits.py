"""In a cluster a key's limits hold over every server: what one server admitted comes out of
the same buckets on the others, requests in progress anywhere count against the key's
concurrency, and the daily budget is counted in Redis (so a server that joins later knows it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from llamapool.server.appkeys import KEYS, SCHEDULER
from llamapool.server.cluster.endpoint import CLUSTER

from . import redis_helpers
from .conftest import PoolServer, StartServer, wait_for
from .keys_helpers import MODEL, chat, raw_worker, sdk, write_keys
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
