"""The worker's own endpoints tell the truth: /status, /version and /metrics follow its link to
the server, its backend's health and the requests it really served."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.build import build_info
from llamapool.testing import create_broken_app, create_fake_ollama_app, fake_log
from llamapool.worker.agent import Agent
from llamapool.worker.status import create_status_app, serving_status

from .conftest import (
    PoolServer,
    StartServer,
    StartWorker,
    url_of,
    wait_for,
)
from .observability_helpers import (
    BROKEN,
    DELAY,
    MODEL,
    FixedModels,
    Metrics,
    chat,
    get_json,
    post,
    scrape,
    status_of,
    streams_running,
)

ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
WORKER_SERIES = {
    "llamapool_worker_connected_to_server": "gauge",
    "llamapool_worker_connected_to_backend": "gauge",
    "llamapool_worker_connected_to_ollama": "gauge",
    "llamapool_worker_current_jobs": "gauge",
    "llamapool_worker_max_concurrency": "gauge",
    "llamapool_worker_jobs_started": "counter",
    "llamapool_worker_jobs_succeeded": "counter",
    "llamapool_worker_jobs_failed": "counter",
    "llamapool_worker_job_duration_seconds": "histogram",
}


async def status_server(aiohttp_server: AiohttpServer, agent: Agent) -> str:
    """The agent's /status, /version and /metrics on a loopback port; their base URL."""
    return url_of(await aiohttp_server(create_status_app(agent, status=True, metrics=True)))


def counters(m: Metrics) -> dict[str, float]:
    """The worker's job counters and gauges, by short name."""
    names = ["started_total", "succeeded_total", "failed_total", "cancelled_total"]
    values = {n.removesuffix("_total"): m.value(f"llamapool_worker_jobs_{n}") for n in names}
    values["current"] = m.value("llamapool_worker_current_jobs")
    values["durations"] = m.value("llamapool_worker_job_duration_seconds_count")
    return values


def jobs(started: int, succeeded: int = 0, failed: int = 0, current: int = 0) -> dict[str, float]:
    done = succeeded + failed
    return {
        "started": started,
        "succeeded": succeeded,
        "failed": failed,
        "cancelled": 0,
        "current": current,
        "durations": done,
    }


async def test_status_describes_a_connected_worker(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/status has the Go worker's fields, with this worker's identity, link and models."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL, "qwen:0.5b"]))
    agent = await start_worker(
        pool_server,
        "ollama",
        backend_url=url_of(runtime),
        max_concurrency=3,
        worker_name="status-worker",
        heartbeat_interval=0.05,
    )
    await wait_for(lambda: agent.last_heartbeat is not None, what="a heartbeat")
    base = await status_server(aiohttp_server, agent)

    status = await get_json(base + "/status")

    build = build_info()
    assert ISO_TIME.match(status.pop("last_heartbeat"))
    assert {
        "state": "connected",
        "connected_to_server": True,
        "connected_to_backend": True,
        "connected_to_ollama": True,
        "current_jobs": 0,
        "max_concurrency": 3,
        "models": [MODEL, "qwen:0.5b"],
        "last_error": "",
        "worker_id": agent.cfg.worker_id,
        "worker_name": "status-worker",
        "backend": "ollama",
        "version": build.version,
        "build_sha": build.sha,
        "build_date": build.date,
    } == status


async def test_version_names_the_build(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """/version answers the version, sha and build date of the worker."""
    agent = await start_worker(pool_server, "demo")
    base = await status_server(aiohttp_server, agent)

    version = await get_json(base + "/version")

    build = build_info()
    assert {"version": build.version, "build_sha": build.sha, "build_date": build.date} == version


async def test_serving_status_yields_the_bound_url(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """With ``status_addr`` on port 0, the yielded URL is where /status really answers; /metrics
    is not served there unless ``metrics_addr`` asks for it."""
    agent = await start_worker(pool_server, "demo", status_addr="127.0.0.1:0")

    async with serving_status(agent) as urls, aiohttp.ClientSession() as http:
        (url,) = urls
        async with http.get(url + "/status") as resp:
            status = resp.status, (await resp.json())["worker_id"]
        async with http.get(url + "/metrics") as resp:
            metrics_status = resp.status

    assert re.match(r"^http://127\.0\.0\.1:\d+$", url)
    assert not url.endswith(":0")
    assert (200, agent.cfg.worker_id) == status
    assert 404 == metrics_status


async def test_worker_metrics_count_the_jobs_it_served(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """N requests start and succeed N jobs, each timed; a job in progress shows as current."""
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    agent = await start_worker(
        pool_server, "ollama", backend_url=url_of(runtime), max_concurrency=4
    )
    base = await status_server(aiohttp_server, agent)
    before = await scrape(base)
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", chat("a", stream=False)),
        ("/v1/chat/completions", chat("b", stream=True)),
        ("/api/chat", chat("c", stream=True)),
        ("/api/generate", {"model": MODEL, "prompt": "d", "stream": False}),
        ("/v1/embeddings", {"model": MODEL, "input": "e"}),
    ]

    for path, body in requests:
        assert 200 == await status_of(pool_server, path, body)
    await wait_for(lambda: 0 == len(agent.jobs), what="the jobs to end")
    after = await scrape(base)
    async with streams_running(pool_server, 1):
        during = await scrape(base)
        status_during = await get_json(base + "/status")

    assert WORKER_SERIES == {name: after.types[name] for name in WORKER_SERIES}
    assert jobs(0) == counters(before)
    assert jobs(5, succeeded=5) == counters(after)
    assert jobs(6, succeeded=5, current=1) == counters(during)
    assert 1 == status_during["current_jobs"]
    assert (1, 1, 1, 4) == (
        after.value("llamapool_worker_connected_to_server"),
        after.value("llamapool_worker_connected_to_backend"),
        after.value("llamapool_worker_connected_to_ollama"),
        after.value("llamapool_worker_max_concurrency"),
    )
    assert 1 == after.total("llamapool_build_info", component="worker")


async def test_a_backend_error_counts_as_a_failed_job(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A 5xx from the backend is relayed to the client and counted as one failed job."""
    broken = await aiohttp_server(create_broken_app(status=500))
    agent = await start_worker(pool_server, FixedModels(url_of(broken), [BROKEN]))
    base = await status_server(aiohttp_server, agent)

    status, _ = await post(pool_server, "/api/chat", chat("x", stream=False, model=BROKEN))
    await wait_for(lambda: 0 == len(agent.jobs), what="the job to end")

    assert 500 == status
    assert jobs(1, failed=1) == counters(await scrape(base))


async def test_a_backend_that_goes_down_and_comes_back(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """While the backend is down the worker says not_ready and the server stops routing to it
    (requests wait for it, then get 503); once it is back, its models return and requests are
    served again."""
    pool_server = await start_server(queue_timeout=0.3)
    runtime = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    port = runtime.port
    agent = await start_worker(pool_server, "ollama", backend_url=url_of(runtime))
    base = await status_server(aiohttp_server, agent)
    handle = pool_server.pool.get(agent.cfg.worker_id)
    assert handle is not None

    await runtime.close()
    refused, _ = await post(pool_server, "/api/chat", chat("x", stream=False))
    await agent.probe()  # probe now rather than after probe_interval
    await wait_for(lambda: not handle.routable, what="the server to stop routing")
    down = await get_json(base + "/status")
    down_metrics = await scrape(base)
    down_models = await listed_models(pool_server)
    while_down, _ = await post(pool_server, "/api/chat", chat("x", stream=False))

    revived: TestServer = await aiohttp_server(
        create_fake_ollama_app(models=[MODEL]), host="127.0.0.1", port=port
    )
    await agent.probe()
    await wait_for(lambda: handle.routable, what="the server to route again")
    up = await get_json(base + "/status")
    up_metrics = await scrape(base)
    served, _ = await post(pool_server, "/api/chat", chat("back", stream=False))

    assert (502, 503, 200) == (refused, while_down, served)
    assert ("not_ready", False, False, True) == (
        down["state"],
        down["connected_to_backend"],
        down["connected_to_ollama"],
        down["connected_to_server"],
    )
    assert down["last_error"].startswith("backend")
    assert (0, 0, 1) == (
        down_metrics.value("llamapool_worker_connected_to_backend"),
        down_metrics.value("llamapool_worker_connected_to_ollama"),
        down_metrics.value("llamapool_worker_jobs_failed_total"),
    )
    assert [] == down_models
    assert ("connected", True, True, [MODEL]) == (
        up["state"],
        up["connected_to_backend"],
        up["connected_to_ollama"],
        up["models"],
    )
    assert (1, 1) == (
        up_metrics.value("llamapool_worker_connected_to_backend"),
        up_metrics.value("llamapool_worker_connected_to_ollama"),
    )
    assert [MODEL] == await listed_models(pool_server)
    assert 1 == fake_log(revived.app).paths.count("/api/chat")


async def listed_models(server: PoolServer) -> list[str]:
    """The model ids the server's ``/v1/models`` lists."""
    models = await get_json(server.url + "/v1/models", server.auth)
    return [m["id"] for m in models["data"]]
