"""/api/v1/state/stream: the current snapshot at once, a new one soon after each change, bursts
coalesced, keep-alives while idle, and many watchers at no cost to the requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from llamapool.server import state_api

from .conftest import (
    PoolServer,
    StartWorker,
    wait_for,
)
from .observability_helpers import (
    SSEReader,
    chat,
    post,
    settled,
    status_of,
)

STREAM = "/api/v1/state/stream"


@contextlib.asynccontextmanager
async def watching(server: PoolServer, http: aiohttp.ClientSession) -> AsyncIterator[SSEReader]:
    """One watcher of the state stream for the block."""
    async with http.get(server.url + STREAM, headers=server.auth) as resp:
        assert 200 == resp.status
        assert "text/event-stream" == resp.content_type
        yield SSEReader(resp)


def worker_ids(snapshot: dict[str, Any]) -> list[str]:
    return [w["id"] for w in snapshot["workers"]]


def completed(snapshot: dict[str, Any]) -> int:
    done: int = snapshot["server"]["jobs_completed_total"]
    return done


async def test_the_stream_needs_the_api_key(pool_server: PoolServer) -> None:
    """Without the key the stream answers 401 and sends no snapshot."""
    async with aiohttp.ClientSession() as http, http.get(pool_server.url + STREAM) as resp:
        status, body = resp.status, await resp.read()

    assert 401 == status
    assert b"workers" not in body


async def test_the_first_event_is_the_current_snapshot_at_once(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A new watcher gets the pool as it is now, without waiting for a change or a tick."""
    agent = await start_worker(pool_server, "demo")
    assert 200 == await status_of(pool_server, "/api/chat", chat("hi", stream=False, model="demo"))
    expected = await settled(pool_server)

    async with aiohttp.ClientSession() as http, watching(pool_server, http) as events:
        started = time.monotonic()
        first = await events.snapshot(timeout=2)
        waited = time.monotonic() - started

    assert waited < state_api.PUBLISH_INTERVAL
    assert [agent.cfg.worker_id] == worker_ids(first)
    assert 1 == first["server"]["jobs_completed_total"]
    assert expected["workers"][0]["per_model"] == first["workers"][0]["per_model"]
    assert expected["workers_summary"] == first["workers_summary"]


async def test_a_worker_joining_is_streamed_within_a_second(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A watcher sees a new worker less than a second after the server registered it."""
    async with aiohttp.ClientSession() as http, watching(pool_server, http) as events:
        assert [] == worker_ids(await events.snapshot())
        agent = await start_worker(pool_server, "demo")
        joined = await events.snapshot_where(lambda s: bool(s["workers"]), timeout=1.0)

    assert [agent.cfg.worker_id] == worker_ids(joined)
    assert {"connected": 1, "working": 0, "idle": 1, "gone": 0} == joined["workers_summary"]


async def test_a_burst_of_changes_is_coalesced(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Fifty requests, each changing the state several times, give far fewer events, the last
    of which shows all fifty."""
    await start_worker(pool_server, "demo", max_concurrency=8)
    async with aiohttp.ClientSession() as http, watching(pool_server, http) as events:
        await events.snapshot()
        counted: list[dict[str, Any]] = []

        async def count() -> None:
            while True:
                counted.append(await events.snapshot(timeout=30))

        counter = asyncio.create_task(count())
        statuses = await asyncio.gather(
            *(
                post(pool_server, "/api/chat", chat(f"n{i}", stream=False, model="demo"))
                for i in range(50)
            )
        )
        try:
            await wait_for(
                lambda: bool(counted) and completed(counted[-1]) == 50, what="all fifty shown"
            )
        finally:
            counter.cancel()
            await asyncio.gather(counter, return_exceptions=True)

    assert [200] * 50 == [status for status, _ in statuses]
    assert len(counted) < 25, len(counted)
    assert 0 == counted[-1]["server"]["jobs_inflight_total"]


async def test_an_idle_stream_sends_keep_alive_comments(
    monkeypatch: pytest.MonkeyPatch, pool_server: PoolServer
) -> None:
    """With nothing changing, the stream still sends SSE comments at the keep-alive interval."""
    monkeypatch.setattr(state_api, "KEEPALIVE_INTERVAL", 0.1)

    async with aiohttp.ClientSession() as http, watching(pool_server, http) as events:
        await events.snapshot()
        started = time.monotonic()
        kinds = [await events.next(timeout=2) for _ in range(3)]
        elapsed = time.monotonic() - started

    assert [("comment", "ping")] * 3 == kinds
    assert elapsed < 2


async def test_fifty_watchers_do_not_hold_up_requests(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """With fifty watchers connected, requests still succeed promptly and every watcher is
    told about them."""
    await start_worker(pool_server, "demo", max_concurrency=4)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        watchers = [await stack.enter_async_context(watching(pool_server, http)) for _ in range(50)]
        await asyncio.gather(*(w.snapshot() for w in watchers))
        started = time.monotonic()
        statuses = await asyncio.gather(
            *(
                post(pool_server, "/api/chat", chat(f"w{i}", stream=False, model="demo"))
                for i in range(20)
            )
        )
        elapsed = time.monotonic() - started
        finals = await asyncio.gather(
            *(w.snapshot_where(lambda s: completed(s) == 20) for w in watchers)
        )

    assert [200] * 20 == [status for status, _ in statuses]
    assert elapsed < 5
    assert 50 == len(finals)
