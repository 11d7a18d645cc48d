"""/metrics tells the truth: after real traffic through real workers, every series the server
exports equals what happened, under the Go version's names and labels."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from llamapool.build import build_info
from llamapool.config import ServeConfig
from llamapool.run import running_server
from llamapool.server.app import create_app
from llamapool.server.appkeys import POOL
from llamapool.server.pool import Pool
from llamapool.testing import create_broken_app, create_fake_ollama_app, fake_log

from .conftest import (
    API_KEY,
    WORKER_KEY,
    PoolServer,
    StartServer,
    StartWorker,
    url_of,
)
from .observability_helpers import (
    BROKEN,
    DELAY,
    DOWN,
    GHOST,
    MODEL,
    UNKNOWN,
    FixedModels,
    Metrics,
    cancel_mid_stream,
    chat,
    client_usage,
    closed_port,
    post,
    scrape,
    scrape_until,
    settled,
    status_of,
    streams_running,
)

SUCCESSES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", chat("one two", stream=False)),
    ("/v1/chat/completions", chat("three four", stream=True, usage=True)),
    ("/v1/chat/completions", chat("five", stream=True)),  # no usage asked for: none counted
    ("/api/chat", chat("six seven eight", stream=True)),
    ("/api/generate", {"model": MODEL, "prompt": "nine ten", "stream": False}),
    ("/v1/embeddings", {"model": MODEL, "input": "eleven twelve"}),
]


async def test_build_info_is_one_series_set_to_one(pool_server: PoolServer) -> None:
    """``llamapool_build_info{component="server",version,sha,date}`` is 1, on the main port,
    with no key."""
    build = build_info()

    metrics = await scrape(pool_server.url)

    assert [
        {"component": "server", "version": build.version, "sha": build.sha, "date": build.date}
    ] == (metrics.labels("llamapool_build_info"))
    assert 1.0 == metrics.value(
        "llamapool_build_info",
        component="server",
        version=build.version,
        sha=build.sha,
        date=build.date,
    )


async def test_counters_equal_what_happened(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """After successes, backend 4xx and 5xx, a worker that never answers, a client that hangs
    up, unknown models and a bad key, every series equals exactly that traffic."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    broken = await aiohttp_server(create_broken_app(status=500))
    good = await start_worker(pool_server, FixedModels(url_of(runtime), [MODEL, GHOST]))
    bad = await start_worker(pool_server, FixedModels(url_of(broken), [BROKEN]))
    dead_url = f"http://127.0.0.1:{closed_port()}"
    dead = await start_worker(pool_server, FixedModels(dead_url, [DOWN]))
    told = [0, 0]

    for path, body in SUCCESSES:
        status, raw = await post(pool_server, path, body)
        assert 200 == status, raw
        told = [a + b for a, b in zip(told, client_usage(path, raw), strict=True)]
    statuses = [
        await status_of(pool_server, "/v1/chat/completions", chat("x", stream=False, model=GHOST)),
        await status_of(pool_server, "/api/chat", chat("x", stream=False, model=GHOST)),
        await status_of(pool_server, "/v1/chat/completions", chat("x", stream=False, model=BROKEN)),
        await status_of(pool_server, "/v1/chat/completions", chat("x", stream=False, model=DOWN)),
        await status_of(pool_server, "/v1/chat/completions", chat("x", stream=True, model=UNKNOWN)),
        await status_of(pool_server, "/api/generate", {"model": UNKNOWN, "prompt": "x"}),
        await status_of(pool_server, "/api/chat", chat("x", stream=False), headers={}),
    ]
    first = await cancel_mid_stream(pool_server, chat("word " * 100, stream=True))

    m = await scrape_until(
        pool_server.url,
        lambda m: (
            m.value("llamapool_model_requests_total", model=MODEL, outcome="cancelled") == 1
            and m.value("llamapool_requests_in_flight") == 0
        ),
        what="the cancelled request to end",
    )
    assert [404, 404, 500, 502, 404, 404, 401] == statuses
    assert b"echo:" in first
    assert {
        (MODEL, "success"): 6,
        (MODEL, "cancelled"): 1,
        (GHOST, "error"): 2,
        (BROKEN, "error"): 1,
        (DOWN, "error"): 1,
    } == {
        (labels["model"], labels["outcome"]): m.value("llamapool_model_requests_total", **labels)
        for labels in m.labels("llamapool_model_requests_total")
    }
    assert {(MODEL, "in"): told[0], (MODEL, "out"): told[1]} == {
        (labels["model"], labels["kind"]): m.value("llamapool_model_tokens_total", **labels)
        for labels in m.labels("llamapool_model_tokens_total")
    }
    assert told[0] > 0
    assert told[1] > 0
    duration = "llamapool_request_duration_seconds_count"
    assert {
        (good.cfg.worker_id, MODEL): 7,
        (good.cfg.worker_id, GHOST): 2,
        (bad.cfg.worker_id, BROKEN): 1,
        (dead.cfg.worker_id, DOWN): 1,
    } == {(ls["worker_id"], ls["model"]): m.value(duration, **ls) for ls in m.labels(duration)}
    go_types = {
        "llamapool_build_info": "gauge",
        "llamapool_model_requests": "counter",
        "llamapool_model_tokens": "counter",
        "llamapool_request_duration_seconds": "histogram",
    }
    assert go_types == {name: m.types[name] for name in go_types}
    # Every request that got response headers, and only those: not the one to DOWN.
    ttfb = "llamapool_time_to_first_byte_seconds_count"
    assert {MODEL: 7, GHOST: 2, BROKEN: 1} == {
        ls["model"]: m.value(ttfb, **ls) for ls in m.labels(ttfb)
    }
    assert 0 == m.value("llamapool_requests_in_flight")
    assert {"idle": 3, "working": 0, "draining": 0, "not_ready": 0, "gone": 0} == {
        ls["status"]: m.value("llamapool_workers", **ls) for ls in m.labels("llamapool_workers")
    }
    assert {"no_worker": 2, "unauthorized": 1} == {
        ls["reason"]: m.value("llamapool_rejections_total", **ls)
        for ls in m.labels("llamapool_rejections_total")
    }
    assert UNKNOWN not in m.text
    assert 0 == m.value("llamapool_queue_length")


class RunnerServer(PoolServer):
    """A server run the way ``llamapool serve`` runs it: a handler is cancelled when its
    client leaves (the test server lets it run on until its next write fails)."""

    def __init__(self, url: str, app: web.Application, cfg: ServeConfig) -> None:
        self._url, self._app, self.cfg = url, app, cfg

    @property
    def url(self) -> str:
        return self._url

    @property
    def pool(self) -> Pool:
        return self._app[POOL]


@contextlib.asynccontextmanager
async def cancelling_server() -> AsyncIterator[PoolServer]:
    cfg = ServeConfig(host="127.0.0.1", port=0, api_keys=API_KEY, worker_keys=WORKER_KEY)
    app = create_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield RunnerServer(f"http://127.0.0.1:{runner.addresses[0][1]}", app, cfg)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("runner", ["test-server", "cancelling-runner"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_a_client_hanging_up_is_counted_once_as_cancelled(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runner: str,
    path: str,
) -> None:
    """A stream its client abandons counts as cancelled (not success, not error), with its
    time to first byte, and leaves nothing in flight."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    async with contextlib.AsyncExitStack() as stack:
        server = pool_server
        if runner == "cancelling-runner":
            server = await stack.enter_async_context(cancelling_server())
        await start_worker(server, "ollama", backend_url=url_of(runtime))

        first = await cancel_mid_stream(server, chat("word " * 100, stream=True), path=path)
        m = await scrape_until(
            server.url,
            lambda m: (
                1 == m.total("llamapool_model_requests_total")
                and 0 == m.value("llamapool_requests_in_flight")
            ),
            what="the request to end",
        )

    assert b"echo:" in first
    assert [{"model": MODEL, "outcome": "cancelled"}] == m.labels("llamapool_model_requests_total")
    assert 1 == m.value("llamapool_time_to_first_byte_seconds_count", model=MODEL)
    assert 0 == m.total("llamapool_model_tokens_total")


async def test_an_alias_is_counted_under_the_name_the_worker_serves(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A request for an alias (a quantization tag, an implicit :latest) is counted under the
    model the worker serves: what clients type never becomes a label."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b", "llama3:latest"]))
    await start_worker(pool_server, "ollama", backend_url=url_of(runtime))

    for asked in ("llama3:8b-q4_0-typed-by-a-client", "llama3"):
        assert 200 == await status_of(
            pool_server, "/api/chat", chat("x", stream=False, model=asked)
        )

    await settled(pool_server)
    m = await scrape(pool_server.url)
    assert [
        {"model": "llama3:8b", "outcome": "success"},
        {"model": "llama3:latest", "outcome": "success"},
    ] == sorted(m.labels("llamapool_model_requests_total"), key=lambda ls: ls["model"])
    assert "typed-by-a-client" not in m.text
    assert 'model="llama3"' not in m.text


async def test_histograms_have_buckets_sum_and_count(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The duration histogram's +Inf bucket equals its count, and its sum is positive."""
    agent = await start_worker(pool_server, "demo")
    for i in range(3):
        body = chat(f"hi {i}", stream=False, model="demo")
        assert 200 == await status_of(pool_server, "/api/chat", body)

    await settled(pool_server)
    m = await scrape(pool_server.url)

    labels = {"worker_id": agent.cfg.worker_id, "model": "demo"}
    assert 3 == m.value("llamapool_request_duration_seconds_count", **labels)
    assert 3 == m.value("llamapool_request_duration_seconds_bucket", **labels, le="+Inf")
    assert 0 < m.value("llamapool_request_duration_seconds_sum", **labels)
    assert 3 == m.value("llamapool_time_to_first_byte_seconds_bucket", model="demo", le="+Inf")


def hold_the_loop(seconds: float) -> None:
    """Keep the thread busy for ``seconds`` of its own CPU time, as a long callback would (the
    stall under test, not a wait; time the machine gives to others does not count)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def stalls_over(m: Metrics, seconds: str) -> float:
    """Loop lag observations above the bucket ``le=seconds``."""
    over = m.value("llamapool_event_loop_lag_seconds_count")
    return over - m.value("llamapool_event_loop_lag_seconds_bucket", le=seconds)


async def test_a_stalled_event_loop_and_a_full_collection_show_as_pauses(
    pool_server: PoolServer,
) -> None:
    """Whatever holds the server's event loop for 100 ms (here the test itself, which shares the
    loop) is a lag over 50 ms; a full garbage collection is one generation-2 pause."""
    before = await scrape(pool_server.url)
    hold_the_loop(0.1)
    gc.collect()

    after = await scrape_until(
        pool_server.url,
        lambda m: stalls_over(m, "0.05") > stalls_over(before, "0.05"),
        what="the stall to be measured",
    )

    assert 1 <= after.value("llamapool_gc_pause_seconds_count", generation="2") - before.value(
        "llamapool_gc_pause_seconds_count", generation="2"
    )
    assert 0 < after.value("llamapool_event_loop_lag_seconds_count")


REJECTIONS = [
    pytest.param({"queue_size": 0}, 1, 503, "busy", id="busy"),
    pytest.param({"queue_size": 1}, 2, 429, "queue_full", id="queue_full"),
    pytest.param({"queue_size": 5, "queue_timeout": 0.2}, 1, 503, "queue_timeout", id="timeout"),
]


@pytest.mark.parametrize(("overrides", "running", "status", "reason"), REJECTIONS)
async def test_rejections_are_counted_by_reason(
    aiohttp_server: AiohttpServer,
    start_server: StartServer,
    start_worker: StartWorker,
    overrides: dict[str, Any],
    running: int,
    status: int,
    reason: str,
) -> None:
    """A request refused because every worker is busy, the queue is full, or it waited too long
    is counted once under its reason, and reaches no worker."""
    server = await start_server(**overrides)
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    await start_worker(server, "ollama", backend_url=url_of(runtime), max_concurrency=1)
    queued: asyncio.Task[tuple[int, bytes]] | None = None

    async with streams_running(server, 1):
        if running == 2:  # one more waits in the queue
            queued = asyncio.create_task(post(server, "/api/chat", chat("queued", stream=False)))
            await scrape_until(
                server.url,
                lambda m: m.value("llamapool_queue_length") == 1,
                what="a queued request",
            )
        refused, _ = await post(server, "/api/chat", chat("refused", stream=False))
        m = await scrape(server.url)
    if queued is not None:
        assert 200 == (await queued)[0]

    assert status == refused
    assert running == fake_log(runtime.app).paths.count("/api/chat")
    assert {reason: 1} == {
        ls["reason"]: m.value("llamapool_rejections_total", **ls)
        for ls in m.labels("llamapool_rejections_total")
    }
    assert 0 == m.total("llamapool_model_requests_total", outcome="error")


async def test_the_workers_gauge_follows_each_status(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """One worker shows idle, then working while it serves, draining, and gone once it left."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    agent = await start_worker(pool_server, "ollama", backend_url=url_of(runtime))

    def statuses(m: Metrics) -> dict[str, float]:
        return {
            ls["status"]: m.value("llamapool_workers", **ls) for ls in m.labels("llamapool_workers")
        }

    def only(status: str) -> dict[str, float]:
        return {s: float(s == status) for s in ("idle", "working", "draining", "not_ready", "gone")}

    seen = [statuses(await scrape(pool_server.url))]
    async with streams_running(pool_server, 1):
        seen.append(statuses(await scrape(pool_server.url)))
        drain = asyncio.create_task(agent.drain(timeout=-1))
        m = await scrape_until(
            pool_server.url, lambda m: statuses(m) == only("draining"), what="draining"
        )
        seen.append(statuses(m))
    await drain
    m = await scrape_until(pool_server.url, lambda m: statuses(m) == only("gone"), what="gone")
    seen.append(statuses(m))

    assert [only("idle"), only("working"), only("draining"), only("gone")] == seen


async def test_metrics_move_to_their_own_port_when_one_is_set() -> None:
    """With a metrics port, /metrics is served there and only there, from the same state, and
    its answers name their request as the main port's do."""
    cfg = ServeConfig(
        host="127.0.0.1", port=0, metrics_port=0, api_keys=API_KEY, worker_keys=WORKER_KEY
    )
    with capture_logs() as logs:
        async with running_server(cfg) as url, aiohttp.ClientSession() as http:
            (listening,) = [e["url"] for e in logs if e["event"] == "metrics_listening"]
            metrics_url = listening.removesuffix("/metrics")
            async with http.get(url + "/metrics") as resp:
                on_main = resp.status
            async with http.post(url + "/api/chat", json=chat("x", stream=False)) as resp:
                unauthorized = resp.status
            key = {"Authorization": f"Bearer {API_KEY}"}
            async with http.get(metrics_url + "/api/v1/state", headers=key) as resp:
                state_on_metrics_port = resp.status
            m = await scrape(metrics_url)
            named = {"X-Request-Id": "scrape-7"}
            async with http.get(metrics_url + "/metrics", headers=named) as resp:
                echoed = resp.headers.get("X-Request-Id")

    assert metrics_url != url
    assert (404, 401, 404) == (on_main, unauthorized, state_on_metrics_port)
    assert "scrape-7" == echoed
    assert 1 == m.value("llamapool_rejections_total", reason="unauthorized")
    assert 1 == m.total("llamapool_build_info", component="server")


async def test_without_a_metrics_port_metrics_share_the_main_port(pool_server: PoolServer) -> None:
    """By default /metrics is on the main port and needs no key, like /healthz."""
    async with aiohttp.ClientSession() as http, http.get(pool_server.url + "/metrics") as resp:
        status, body = resp.status, await resp.text()

    assert 200 == status
    assert "llamapool_build_info{" in body
