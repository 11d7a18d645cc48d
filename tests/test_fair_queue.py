"""Fair queueing: while a model's workers are busy, keys take turns by weight, a key's own
requests go by priority, and each key's queue is bounded on its own.

A raw worker with one slot holds each request until the test answers it, so the order in which
requests reach it is exactly the order the scheduler dispatched them.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any, cast

import aiohttp

from llamapool.server.keyfile import Caller, ClientKey
from llamapool.server.pool import Pool, WorkerHandle
from llamapool.server.scheduler import Scheduler

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
    until_queued,
)


async def fair_server(start_server: StartServer, tmp_path: Path, **settings: Any) -> PoolServer:
    path = fair_keys(tmp_path / "keys.yaml", batch_weight=settings.pop("batch_weight", 1))
    return await start_server(keys_file=str(path), **settings)


async def queue_up(
    http: aiohttp.ClientSession,
    server: PoolServer,
    worker: RawWorker,
    batches: list[tuple[str, str, int]],
) -> list[asyncio.Task[tuple[int, dict[str, str], Any]]]:
    """Hold one request on the worker, then queue ``count`` requests per (key, label) in that
    order, each labelled ``label-i``."""
    tasks = [asyncio.create_task(post(http, server, BATCH, chat("held")))]
    await worker.next()  # held until the test answers it: the worker is busy
    queued = 0
    for key, label, count in batches:
        for i in range(count):
            tasks.append(asyncio.create_task(post(http, server, key, chat(f"{label}-{i}"))))
            queued += 1
            await until_queued(server, queued)  # arrival order is the order sent
    return tasks


async def served_order(worker: RawWorker, held_count: int, count: int) -> list[str]:
    """Answer the held request, then ``count`` more; the label of each one answered."""
    await worker.answer(worker.received[held_count - 1])
    return [(await worker.answer_next()).split("-")[0] for _ in range(count)]


async def test_a_key_with_one_request_is_served_next_to_one_with_fifty(
    start_server: StartServer, tmp_path: Path
) -> None:
    """With 50 requests of one key queued before one of another key, the other key's request
    is served second, not fifty-first; the rest follow in order."""
    server = await fair_server(start_server, tmp_path)
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        tasks = await queue_up(http, server, worker, [(BATCH, "batch", 50), (CHAT, "chat", 1)])
        order = await served_order(worker, 1, 51)
        answers = await asyncio.gather(*tasks)
        contents = worker.contents()

    assert ["batch", "chat"] + ["batch"] * 49 == order
    assert [f"batch-{i}" for i in range(50)] == [c for c in contents if c.startswith("batch-")]
    assert [200] * 52 == [status for status, _, _ in answers]


async def test_keys_of_equal_weight_alternate(start_server: StartServer, tmp_path: Path) -> None:
    """Two keys of weight 1 with 10 queued requests each are served in turn."""
    server = await fair_server(start_server, tmp_path)
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        tasks = await queue_up(http, server, worker, [(BATCH, "batch", 10), (CHAT, "chat", 10)])
        order = await served_order(worker, 1, 20)
        await asyncio.gather(*tasks)

    assert ["batch", "chat"] * 10 == order


async def test_a_key_of_weight_three_gets_three_turns_for_one(
    start_server: StartServer, tmp_path: Path
) -> None:
    """With weights 3:1 and both keys backlogged, of 24 requests served the heavier key gets
    18 and the other 6 (within one), never more than 3 in a row."""
    server = await fair_server(start_server, tmp_path, batch_weight=3)
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        tasks = await queue_up(http, server, worker, [(BATCH, "batch", 20), (CHAT, "chat", 20)])
        order = await served_order(worker, 1, 24)
        rest = [await worker.answer_next() for _ in range(16)]
        await asyncio.gather(*tasks)

    batch = order.count("batch")
    longest = max(len(run) for run in "".join(k[0] for k in order).split("c") if run)
    assert 17 <= batch <= 19, order
    assert 3 >= longest, order
    assert 16 == len(rest)


async def test_a_key_orders_its_own_requests_by_priority(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A request that asks for a lower priority (X-Priority) waits behind its key's other
    requests; one asking for more than its key's priority gets the key's."""
    server = await fair_server(start_server, tmp_path)
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        held = asyncio.create_task(post(http, server, CHAT, chat("held")))
        await worker.next()
        tasks = []
        for label, priority in (("low", "-5"), ("high", "7"), ("normal", "")):
            headers = {"X-Priority": priority} if priority else {}
            tasks.append(
                asyncio.create_task(post(http, server, CHAT, chat(label), headers=headers))
            )
            await until_queued(server, len(tasks))
        await worker.answer(worker.received[0])
        order = [await worker.answer_next() for _ in range(3)]
        await asyncio.gather(held, *tasks)

    assert ["high", "normal", "low"] == order


async def test_each_key_has_its_own_queue_bound(start_server: StartServer, tmp_path: Path) -> None:
    """A key whose queue for a model is full gets 429 queue_full, while another key can still
    queue and is served."""
    server = await fair_server(start_server, tmp_path, queue_size=2)
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        tasks = await queue_up(http, server, worker, [(BATCH, "batch", 2), (CHAT, "chat", 1)])
        refused = await post(http, server, BATCH, chat("one too many"))
        await worker.answer(worker.received[0])
        for _ in range(3):
            await worker.answer_next()
        answers = await asyncio.gather(*tasks)

    assert (429, "queue_full") == (refused[0], refused[2]["error"]["code"])
    assert "1" == refused[1]["Retry-After"]
    assert [200] * 4 == [status for status, _, _ in answers]


async def test_max_queued_bounds_the_queue_over_every_key(
    start_server: StartServer, tmp_path: Path
) -> None:
    """MAX_QUEUED caps the requests waiting at once, whichever key sent them."""
    server = await fair_server(start_server, tmp_path, max_queued=2)
    async with raw_worker(server) as worker, aiohttp.ClientSession() as http:
        tasks = await queue_up(http, server, worker, [(BATCH, "batch", 1), (CHAT, "chat", 1)])
        refused = await post(http, server, CHAT, chat("third"))
        await worker.answer(worker.received[0])
        for _ in range(2):
            await worker.answer_next()
        await asyncio.gather(*tasks)

    assert (429, "queue_full") == (refused[0], refused[2]["error"]["code"])


async def test_waiters_that_leave_never_block_or_lose_the_others() -> None:
    """With waiters of several keys leaving at random (timeouts, clients gone), every waiter
    that stays gets a slot, exactly once, and the scheduler ends empty."""
    rng = random.Random(13)
    pool = Pool()
    pool.add(WorkerHandle("w", "w", frozenset({MODEL}), 1, None, cast(Any, None)))
    scheduler = Scheduler(pool, queue_size=1000, queue_timeout=60)
    held = await scheduler.acquire(MODEL, "/v1/chat/completions")
    keys = [Caller(ClientKey(f"k{i}", b"", weight=i + 1), 0) for i in range(4)]
    waiters = [
        asyncio.create_task(scheduler.acquire(MODEL, "/v1/chat/completions", key=rng.choice(keys)))
        for _ in range(200)
    ]
    await wait_for(lambda: 200 == len(scheduler), what="200 waiters")
    leaving = set(rng.sample(range(200), 80))
    for i in sorted(leaving):
        waiters[i].cancel()
    await wait_for(lambda: 120 == len(scheduler), what="the others to stay")

    served = 0
    scheduler.release(held)
    staying = {w for i, w in enumerate(waiters) if i not in leaving}
    while staying:
        done, staying = await asyncio.wait(staying, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert done, "a waiter was never served"
        for task in done:
            served += 1
            scheduler.release(task.result())

    assert (120, 0, {}, {}) == (
        served,
        len(scheduler),
        scheduler.queued_by_key(),
        scheduler._queues,
    )
    assert 0 == pool.get("w").inflight  # type: ignore[union-attr]


async def test_a_key_that_asks_again_as_soon_as_it_is_served_takes_turns_with_a_backlog() -> None:
    """A key with one request at a time, which sends the next as soon as one is served (a chat
    client), alternates with a key that has ten queued: its new request starts where its last
    turn finished, not at the head of the line each time."""
    pool = Pool()
    pool.add(WorkerHandle("w", "w", frozenset({MODEL}), 1, None, cast(Any, None)))
    scheduler = Scheduler(pool, queue_size=100, queue_timeout=60)
    path = "/v1/chat/completions"
    held = await scheduler.acquire(MODEL, path)
    batch, chat = (Caller(ClientKey(name, b""), 0) for name in ("batch", "chat"))
    waiting = {asyncio.create_task(scheduler.acquire(MODEL, path, key=batch)): "batch"}
    for _ in range(9):
        waiting[asyncio.create_task(scheduler.acquire(MODEL, path, key=batch))] = "batch"
    waiting[asyncio.create_task(scheduler.acquire(MODEL, path, key=chat))] = "chat"
    await wait_for(lambda: 11 == len(scheduler), what="11 waiters")

    order = []
    slot = held
    for _ in range(10):
        scheduler.release(slot)
        done, _ = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert 1 == len(done)
        task = done.pop()
        order.append(waiting.pop(task))
        slot = task.result()
        if order[-1] == "chat":  # it asks again at once
            waiting[asyncio.create_task(scheduler.acquire(MODEL, path, key=chat))] = "chat"
            await wait_for(lambda: len(waiting) == len(scheduler), what="chat to queue again")
    for task in waiting:
        task.cancel()

    assert ["batch", "chat"] * 5 == order, order
