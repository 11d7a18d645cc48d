"""The worker's local endpoints: ``/status`` and ``/version`` (``--status-addr``) and
``/metrics`` (``--metrics-addr``), as the Go worker serves them for menu-bar apps and Prometheus.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from llamapool.errors import ConfigError
from llamapool.listening import listen
from llamapool.worker.agent import Agent

AGENT = web.AppKey("agent", Agent)


def status(agent: Agent) -> dict[str, Any]:
    """The Go worker's ``/status`` document (plus the backend's name)."""
    beat = agent.last_heartbeat
    return {
        "state": agent.state,
        "connected_to_server": agent.connected,
        "connected_to_backend": agent.backend_up,
        "connected_to_ollama": agent.backend_up,
        "current_jobs": len(agent.jobs),
        "max_concurrency": agent.cfg.max_concurrency,
        "models": agent.models,
        "last_error": agent.last_error or agent.jobs.last_error,
        "last_heartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(beat)) if beat else None,
        "worker_id": agent.cfg.worker_id,
        "worker_name": agent.cfg.worker_name,
        "backend": agent.backend_name,
        "version": agent.build.version,
        "build_sha": agent.build.sha,
        "build_date": agent.build.date,
    }


async def _status(request: web.Request) -> web.Response:
    return _json(status(request.app[AGENT]))


async def _version(request: web.Request) -> web.Response:
    build = request.app[AGENT].build
    return _json({"version": build.version, "build_sha": build.sha, "build_date": build.date})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[AGENT].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def create_status_app(agent: Agent, *, status: bool, metrics: bool) -> web.Application:
    app = web.Application()
    app[AGENT] = agent
    if status:
        app.add_routes([web.get("/status", _status), web.get("/version", _version)])
    if metrics:
        app.add_routes([web.get("/metrics", _metrics)])
    return app


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (or ``:port``, meaning loopback) as a pair; IPv6 as ``[::1]:port``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"not a host:port address: {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@contextlib.asynccontextmanager
async def serving_status(agent: Agent) -> AsyncIterator[list[str]]:
    """Serve ``/status`` and ``/metrics`` where configured; yields their base URLs."""
    cfg = agent.cfg
    wanted: dict[tuple[str, int], set[str]] = {}
    if cfg.status_addr:
        wanted.setdefault(split_addr(cfg.status_addr), set()).add("status")
    if cfg.metrics_addr:
        wanted.setdefault(split_addr(cfg.metrics_addr), set()).add("metrics")
    runners: list[web.AppRunner] = []
    urls: list[str] = []
    try:
        for (host, port), kinds in wanted.items():
            app = create_status_app(agent, status="status" in kinds, metrics="metrics" in kinds)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            setting = " and ".join(f"{kind.upper()}_ADDR" for kind in sorted(kinds))
            await listen(web.TCPSite(runner, host, port), setting=setting)
            bound = runner.addresses[0]
            urls.append(f"http://{host if ':' not in host else f'[{host}]'}:{bound[1]}")
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()
