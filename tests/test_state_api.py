"""/api/v1/state tells the truth: the Go version's schema, with numbers equal to the traffic
that went through real workers, and workers shown working, queued, gone, then forgotten."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.build import build_info
from llamapool.protocol import Register, encode
from llamapool.server import state_api
from llamapool.server.appkeys import SCHEDULER, STATE
from llamapool.testing import create_broken_app, create_fake_ollama_app

from .conftest import (
    WORKER_KEY,
    PoolServer,
    StartServer,
    StartWorker,
    url_of,
    wait_for,
)
from .observability_helpers import (
    BROKEN,
    DELAY,
    GHOST,
    MODEL,
    FixedModels,
    cancel_mid_stream,
    chat,
    client_usage,
    get_state,
    post,
    settled,
    state_until,
    status_of,
    streams_running,
)

SERVER_KEYS = {
    "now",
    "version",
    "build_sha",
    "build_date",
    "uptime_s",
    "jobs_inflight_total",
    "jobs_completed_total",
    "jobs_failed_total",
    "scheduler_queue_len",
}
SUMMARY_KEYS = {"connected", "working", "idle", "gone"}
WORKER_KEYS = {
    "id",
    "name",
    "status",
    "connected_at",
    "last_heartbeat",
    "version",
    "build_sha",
    "build_date",
    "models_supported",
    "processed_total",
    "processing_ms_total",
    "avg_processing_ms",
    "inflight",
    "failures_total",
    "queue_len",
    "last_error",
    "tokens_in_total",
    "tokens_out_total",
    "per_model",
}
#: What llamapool-py adds to each worker on top of the Go schema.
WORKER_EXTRAS = {"backend", "max_concurrency", "key"}
TALLY_KEYS = {"success_total", "error_total", "tokens_in_total", "tokens_out_total"}
ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def worker_of(state: dict[str, Any], worker_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [w for w in state["workers"] if w["id"] == worker_id]
    assert 1 == len(found)
    return found[0]


def tally(success: int = 0, error: int = 0, tokens: tuple[int, int] = (0, 0)) -> dict[str, int]:
    return {
        "success_total": success,
        "error_total": error,
        "tokens_in_total": tokens[0],
        "tokens_out_total": tokens[1],
    }


async def test_the_state_has_the_go_schema(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Every object has the Go version's keys with JSON types a Go client decodes."""
    await start_worker(pool_server, "demo", worker_name="schema-worker")
    assert 200 == await status_of(pool_server, "/api/chat", chat("hi", stream=False, model="demo"))

    state = await settled(pool_server)

    (worker,) = state["workers"]
    server = state["server"]
    # Go's four, plus what llamapool-py adds (per-key usage; MCP endpoints, when present).
    assert {"server", "workers_summary", "models", "workers", "keys"} == set(state) - {
        "mcp_endpoints"
    }
    assert SERVER_KEYS == set(server)
    assert SUMMARY_KEYS == set(state["workers_summary"])
    assert [{"name": "demo", "workers": 1}] == state["models"]
    assert WORKER_KEYS | WORKER_EXTRAS == set(worker)
    assert {"demo": TALLY_KEYS} == {m: set(t) for m, t in worker["per_model"].items()}
    assert all(ISO_TIME.match(t) for t in (server["now"], worker["connected_at"]))
    assert ISO_TIME.match(worker["last_heartbeat"])
    assert all(
        isinstance(server[k], int)
        for k in SERVER_KEYS - {"now", "version", "build_sha", "build_date"}
    )
    numeric = {k for k in WORKER_KEYS if k.endswith(("_total", "_ms", "inflight", "queue_len"))}
    assert all(type(worker[k]) is int for k in numeric), {k: worker[k] for k in numeric}
    assert ("schema-worker", "idle", ["demo"]) == (
        worker["name"],
        worker["status"],
        worker["models_supported"],
    )
    build = build_info()
    assert (build.version, build.sha, build.date) == (
        server["version"],
        server["build_sha"],
        server["build_date"],
    )


async def test_the_numbers_equal_what_happened(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Server totals, per-worker counters and per-model tallies equal the traffic: successes,
    backend errors (with the last one named) and a request its client abandoned."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    broken = await aiohttp_server(create_broken_app(status=500))
    good = await start_worker(pool_server, FixedModels(url_of(runtime), [MODEL, GHOST]))
    bad = await start_worker(pool_server, FixedModels(url_of(broken), [BROKEN]))
    told = [0, 0]

    for path, body in [
        ("/v1/chat/completions", chat("one two", stream=False)),
        ("/api/chat", chat("three four five", stream=True)),
        ("/api/generate", {"model": MODEL, "prompt": "six", "stream": False}),
    ]:
        status, raw = await post(pool_server, path, body)
        assert 200 == status
        told = [a + b for a, b in zip(told, client_usage(path, raw), strict=True)]
    assert 404 == await status_of(pool_server, "/api/chat", chat("x", stream=False, model=GHOST))
    assert 500 == await status_of(pool_server, "/api/chat", chat("x", stream=False, model=BROKEN))
    await cancel_mid_stream(pool_server, chat("word " * 100, stream=True))
    await wait_for(
        lambda: 0 == pool_server.server.app[STATE].jobs_inflight_total,
        what="the cancelled request to end",
    )

    state = await get_state(pool_server)
    g, b = worker_of(state, good.cfg.worker_id), worker_of(state, bad.cfg.worker_id)
    server = state["server"]
    assert (0, 3, 2, 0) == (
        server["jobs_inflight_total"],
        server["jobs_completed_total"],
        server["jobs_failed_total"],
        server["scheduler_queue_len"],
    )
    assert {"connected": 2, "working": 0, "idle": 2, "gone": 0} == state["workers_summary"]
    assert [{"name": n, "workers": 1} for n in sorted([BROKEN, GHOST, MODEL])] == state["models"]
    # Three successes, one 404, one cancelled: five processed, one failure.
    assert (5, 1, "backend answered HTTP 404", "idle", 0) == (
        g["processed_total"],
        g["failures_total"],
        g["last_error"],
        g["status"],
        g["inflight"],
    )
    assert {MODEL: tally(success=3, tokens=(told[0], told[1])), GHOST: tally(error=1)} == g[
        "per_model"
    ]
    assert told == [g["tokens_in_total"], g["tokens_out_total"]]
    assert (1, 1, "backend answered HTTP 500", {BROKEN: tally(error=1)}) == (
        b["processed_total"],
        b["failures_total"],
        b["last_error"],
        b["per_model"],
    )
    for w in (g, b):
        assert w["processing_ms_total"] >= 0
        assert abs(w["processing_ms_total"] / w["processed_total"] - w["avg_processing_ms"]) <= 1


async def test_a_workers_reported_version_and_build_show(pool_server: PoolServer) -> None:
    """The version, sha and build date a worker sends in its register message are shown."""
    register = Register(
        worker_id="built-worker",
        worker_name="built",
        worker_key=WORKER_KEY,
        models=["m:1b"],
        version="9.8.7",
        build_sha="cafef00d",
        build_date="2024-02-03T04:05:06Z",
        protocol=1,
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(encode(register))
        await wait_for(lambda: pool_server.pool.get("built-worker") is not None, what="worker")
        state = await get_state(pool_server)

    worker = worker_of(state, "built-worker")
    assert ("9.8.7", "cafef00d", "2024-02-03T04:05:06Z", ["m:1b"]) == (
        worker["version"],
        worker["build_sha"],
        worker["build_date"],
        worker["models_supported"],
    )


async def test_a_worker_that_leaves_shows_gone_then_is_forgotten(
    monkeypatch: pytest.MonkeyPatch, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A departed worker stays listed as gone, then drops out after the gone retention."""
    monkeypatch.setattr(state_api, "PUBLISH_INTERVAL", 0.01)  # prunes every tick
    server = await start_server(gone_retention=0.3)
    agent = await start_worker(server, "demo")

    await agent.drain(timeout=0)
    await wait_for(lambda: server.pool.get(agent.cfg.worker_id) is None, what="the worker to go")
    gone = await get_state(server)
    forgotten = await state_until(server, lambda s: not s["workers"], what="the worker dropped")

    assert {"connected": 0, "working": 0, "idle": 0, "gone": 1} == gone["workers_summary"]
    assert [(agent.cfg.worker_id, "gone", 0)] == [
        (w["id"], w["status"], w["inflight"]) for w in gone["workers"]
    ]
    assert [] == gone["models"]
    assert [] == forgotten["workers"]
    assert {"connected": 0, "working": 0, "idle": 0, "gone": 0} == forgotten["workers_summary"]


async def test_a_busy_worker_shows_working_with_its_requests_in_flight(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """While two slow streams run on a worker, it shows working with two in flight."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    agent = await start_worker(pool_server, "ollama", backend_url=url_of(runtime))

    async with streams_running(pool_server, 2):
        busy = await get_state(pool_server)

    worker = worker_of(busy, agent.cfg.worker_id)
    assert ("working", 2) == (worker["status"], worker["inflight"])
    assert {"connected": 1, "working": 1, "idle": 0, "gone": 0} == busy["workers_summary"]
    assert 2 == busy["server"]["jobs_inflight_total"]


async def test_queued_requests_show_in_the_queue_lengths(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """Requests waiting for a busy worker show in scheduler_queue_len and in the queue_len of
    each worker that could take them (and not of others)."""
    server = await start_server(queue_size=5)
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    agent = await start_worker(server, "ollama", backend_url=url_of(runtime), max_concurrency=1)
    other = await start_worker(server, "demo")

    async with streams_running(server, 1):
        waiting = [
            asyncio.create_task(post(server, "/api/chat", chat(f"q{i}", stream=False)))
            for i in range(2)
        ]
        await wait_for(lambda: 2 == len(server.server.app[SCHEDULER]), what="queue")
        queued = await get_state(server)
    assert [200, 200] == [status for status, _ in await asyncio.gather(*waiting)]
    drained = await get_state(server)

    assert (2, 2, 0) == (
        queued["server"]["scheduler_queue_len"],
        worker_of(queued, agent.cfg.worker_id)["queue_len"],
        worker_of(queued, other.cfg.worker_id)["queue_len"],
    )
    assert (0, 0) == (
        drained["server"]["scheduler_queue_len"],
        worker_of(drained, agent.cfg.worker_id)["queue_len"],
    )
