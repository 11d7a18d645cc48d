"""What the server keeps stays bounded and its gauges tell the truth: a worker advertising model
after model leaves a bounded /metrics, series of departed models and workers go after the gone
retention, and the queue gauge follows the queue when the last worker for a model leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from llamapool.protocol import ModelsUpdate, Register, encode
from llamapool.server.appkeys import SCHEDULER
from llamapool.server.pool import WorkerHandle

from .conftest import WORKER_KEY, PoolServer, StartServer, StartWorker, wait_for
from .observability_helpers import Metrics, chat, get_state, post, scrape, scrape_until

Socket = aiohttp.ClientWebSocketResponse[bool]

#: Seconds a departed worker or model is kept, for the tests that wait for it to be forgotten.
RETENTION = 0.2


@contextlib.asynccontextmanager
async def raw_worker(server: PoolServer, worker_id: str, **fields: Any) -> AsyncIterator[Socket]:
    """A raw socket registered as a worker (python protocol: model updates allowed)."""
    register = Register(
        worker_id=worker_id,
        worker_key=WORKER_KEY,
        protocol=1,
        features=["models_update"],
        **fields,
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(encode(register))
        await wait_for(lambda: server.pool.get(worker_id) is not None, what=worker_id)
        yield ws


def handle(server: PoolServer, worker_id: str) -> WorkerHandle:
    worker = server.pool.get(worker_id)
    assert worker is not None
    return worker


def model_series(metrics: Metrics) -> list[str]:
    """The lines of every series labelled with a model."""
    return [line for line in metrics.text.splitlines() if 'model="' in line]


#: Series that move with time, not with what workers advertise (their values grow in length).
CLOCKS = ("llamapool_event_loop_lag_seconds", "llamapool_gc_pause_seconds")


def series(metrics: Metrics) -> list[str]:
    """Every sample line but the pause clocks'."""
    return [
        line
        for line in metrics.text.splitlines()
        if line and not line.startswith("#") and not line.startswith(CLOCKS)
    ]


def size(metrics: Metrics) -> tuple[int, int]:
    """How many sample lines, and how many characters they take."""
    lines = series(metrics)
    return len(lines), sum(map(len, lines))


async def advertise(server: PoolServer, ws: Socket, worker_id: str, first: int, last: int) -> None:
    """Send updates ``first`` to ``last - 1``, three new models each; wait until all applied."""
    for i in range(first, last):
        await ws.send_str(encode(ModelsUpdate(models=[f"flood-{i:04d}-{j}" for j in range(3)])))
    final = {f"flood-{last - 1:04d}-{j}" for j in range(3)}
    await wait_for(lambda: final == handle(server, worker_id).models, what="the last update")


async def test_a_worker_advertising_model_after_model_leaves_metrics_bounded(
    start_server: StartServer,
) -> None:
    """Model after model keeps /metrics at its live models plus MAX_MODELS_PER_WORKER departed
    ones while the worker is connected, and back to where it started once it left."""
    server = await start_server(max_models_per_worker=4, gone_retention=RETENTION)
    empty = await scrape(server.url)

    async with raw_worker(server, "flood", models=["flood-start"]) as ws:
        await advertise(server, ws, "flood", 0, 10)
        early = await scrape(server.url)
        await advertise(server, ws, "flood", 10, 400)
        late = await scrape(server.url)
    gone = await scrape_until(
        server.url, lambda m: not model_series(m), what="the departed models to be forgotten"
    )

    assert 3 + 4 == len(model_series(late))  # 3 advertised, 4 departed kept for the retention
    assert [1.0] * 3 == [
        late.value("llamapool_model_workers", model=f"flood-0399-{j}") for j in range(3)
    ]
    assert size(early) == size(late)
    assert (len(series(empty)), []) == (len(series(gone)), model_series(gone))


async def test_a_model_without_workers_stays_at_zero_then_disappears(
    start_server: StartServer,
) -> None:
    """A model whose last worker left shows 0 workers during the gone retention (for alerts),
    then its series are removed."""
    server = await start_server(gone_retention=2.0)

    async with raw_worker(server, "only", models=["lonely"]):
        served = await scrape(server.url)
    await wait_for(lambda: server.pool.get("only") is None, what="the worker to leave")
    orphaned = await scrape(server.url)
    forgotten = await scrape_until(
        server.url,
        lambda m: {"model": "lonely"} not in m.labels("llamapool_model_workers"),
        what="the model to be forgotten",
        timeout=10,
    )

    assert 1.0 == served.value("llamapool_model_workers", model="lonely")
    assert [{"model": "lonely"}] == orphaned.labels("llamapool_model_workers")
    assert 0.0 == orphaned.value("llamapool_model_workers", model="lonely")
    assert [] == model_series(forgotten)


async def test_a_departed_workers_series_vanish_after_the_gone_retention(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """The per-worker duration series of a worker gone past the retention are removed; those of
    a worker still connected, and its model's series, stay."""
    server = await start_server(gone_retention=RETENTION)
    leaving = await start_worker(server, "demo", worker_id="leaving")
    await start_worker(server, "demo", worker_id="staying")
    for prompt in ("one", "two"):  # the least recently picked worker goes next: one each
        assert (
            200
            == (
                await post(server, "/v1/chat/completions", chat(prompt, stream=False, model="demo"))
            )[0]
        )
    duration = "llamapool_request_duration_seconds_count"
    served = await scrape_until(
        server.url, lambda m: 2 == len(m.labels(duration)), what="both requests booked"
    )

    await leaving.drain(timeout=0)
    after = await scrape_until(
        server.url, lambda m: 1 == len(m.labels(duration)), what="the departed worker's series"
    )
    state = await get_state(server)

    assert [("leaving", "demo"), ("staying", "demo")] == sorted(
        (s["worker_id"], s["model"]) for s in served.labels(duration)
    )
    assert [{"worker_id": "staying", "model": "demo"}] == after.labels(duration)
    assert 2.0 == after.total("llamapool_model_requests_total", model="demo")
    assert ["staying"] == [w["id"] for w in state["workers"]]


async def test_the_queue_gauge_returns_to_zero_when_the_last_worker_for_a_model_leaves(
    start_server: StartServer,
) -> None:
    """When the last worker for a model leaves, its queued requests are answered and the queue
    length in /metrics and in the state API is 0 at once, as are the requests in flight."""
    server = await start_server(queue_size=5)
    scheduler = server.server.app[SCHEDULER]
    body = chat("wait", stream=False, model="m")

    async with raw_worker(server, "last", models=["m"], max_concurrency=1):
        taken = asyncio.create_task(post(server, "/v1/chat/completions", body))
        await wait_for(lambda: 1 == handle(server, "last").inflight, what="a request taken")
        queued = [asyncio.create_task(post(server, "/v1/chat/completions", body)) for _ in range(2)]
        await wait_for(lambda: 2 == len(scheduler), what="two requests queued")
        waiting = await scrape(server.url)
    answers = await asyncio.gather(taken, *queued)
    metrics, state = await scrape(server.url), await get_state(server)

    assert 2.0 == waiting.value("llamapool_queue_length")
    assert [502, 404, 404] == [status for status, _ in answers]
    assert (0.0, 0, 0.0, 0) == (
        metrics.value("llamapool_queue_length"),
        state["server"]["scheduler_queue_len"],
        metrics.value("llamapool_requests_in_flight"),
        state["server"]["jobs_inflight_total"],
    )
