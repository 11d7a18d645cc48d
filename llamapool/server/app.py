"""The server application: the whole URL map in one table."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from llamapool.build import build_info
from llamapool.config import ServeConfig
from llamapool.errors import ConfigError
from llamapool.log import Throttle
from llamapool.protocol import CLOSE_GOING_AWAY
from llamapool.server import mcp_http, middleware, ollama, openai, openapi, relay, state_api
from llamapool.server.affinity import ResponseAffinity
from llamapool.server.appkeys import (
    CONFIG,
    ENDS,
    KEYS,
    LOG_THROTTLE,
    MCP,
    POOL,
    REGISTRY,
    SCHEDULER,
    SOCKETS,
    STATE,
    WORKER_KEYS,
)
from llamapool.server.cluster.endpoint import CLUSTER, relay_for_peer
from llamapool.server.cluster.membership import Cluster
from llamapool.server.cluster.peer import RELAY_PATH
from llamapool.server.ends import Ends
from llamapool.server.http_errors import json_response
from llamapool.server.keys import KeyStore, watch_keys_file
from llamapool.server.mcp_relays import expire_mcp_sessions
from llamapool.server.mcp_sessions import McpEndpoints
from llamapool.server.metrics import ServerMetrics
from llamapool.server.pauses import watch_pauses
from llamapool.server.pool import Pool
from llamapool.server.registry import Registry
from llamapool.server.routes import MODEL_ROUTES
from llamapool.server.scheduler import Scheduler
from llamapool.server.state import PoolState
from llamapool.server.worker_keys import WorkerKeyStore
from llamapool.server.workers import evict_silent_workers, worker_socket

log = structlog.get_logger("llamapool.server")


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is up (no key needed). In a cluster, also whether it
    reaches the others (out of reach it still serves its own workers: still ``ok``)."""
    body: dict[str, object] = {"status": "ok", "workers": len(request.app[POOL])}
    cluster = request.app.get(CLUSTER)
    if cluster is not None:
        body["cluster"] = "connected" if cluster.connected else "disconnected"
        body["server"] = cluster.id
    return json_response(body)


DASHBOARD = Path(__file__).parent / "dashboard"


#: The files the dashboard page loads; nothing else under its folder is served.
ASSETS = frozenset({"dashboard.css", "dashboard.js"})


async def dashboard_asset(request: web.Request) -> web.FileResponse:
    """``GET /dashboard/assets/{name}``: the page's stylesheet and script."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(DASHBOARD / name)


async def dashboard(request: web.Request) -> web.FileResponse:
    """``GET /dashboard/``: the live dashboard page (static; it reads the state stream)."""
    return web.FileResponse(DASHBOARD / "index.html")


async def to_dashboard(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


async def drain(app: web.Application) -> None:
    """The listener is closed; let requests in flight (and queued) finish within the drain
    timeout, then close the worker connections cleanly.

    Call it after stopping the sites and before the runner's cleanup (as ``running_server``
    does): aiohttp's ``pre_shutdown`` stops reading every connection, worker sockets included,
    so streams in flight would freeze. It also runs ``on_shutdown``, a no-op by then.
    """
    state, scheduler = app[STATE], app[SCHEDULER]
    if state.jobs_inflight_total or len(scheduler):
        log.info("server_draining", in_flight=state.jobs_inflight_total, queued=len(scheduler))
    with contextlib.suppress(asyncio.TimeoutError):
        timeout = app[CONFIG].drain_timeout
        await asyncio.wait_for(state.idle.wait(), None if timeout < 0 else timeout)
    sockets = app[SOCKETS]
    await asyncio.gather(
        *(ws.close(code=CLOSE_GOING_AWAY, message=b"server shutdown") for ws in list(sockets))
    )


def create_metrics_app(
    state: PoolState, cfg: ServeConfig, *, keys: KeyStore | None = None
) -> web.Application:
    """``/metrics`` alone, for ``--metrics-port`` (behind the API key with
    ``metrics_require_key``, as on the main port; ``keys``: the main app's)."""
    app = web.Application(
        middlewares=[middleware.request_ids, middleware.access_log, middleware.client_auth]
    )
    app[CONFIG] = cfg
    app[STATE] = state
    app[KEYS] = keys if keys is not None else KeyStore(cfg.api_keys, cfg.keys_file)
    app.add_routes([web.get("/metrics", state_api.metrics)])
    app.on_response_prepare.append(middleware.echo_request_id)
    return app


def create_app(cfg: ServeConfig, *, pool: Pool | None = None) -> web.Application:
    """The server: HTTP API, worker socket, state, metrics (unless on their own port)."""
    app = web.Application(
        client_max_size=cfg.max_body_size,
        middlewares=[
            middleware.request_ids,
            middleware.access_log,
            middleware.json_errors,
            middleware.client_auth,
        ],
    )
    app[CONFIG] = cfg
    app[POOL] = pool = pool if pool is not None else Pool()
    app[ENDS] = Ends()
    build = build_info()
    app[STATE] = state = PoolState(
        pool,
        ServerMetrics(build),
        build,
        gone_retention=cfg.gone_retention,
        max_gone_workers=cfg.max_workers,
        max_gone_models=cfg.max_models_per_worker,
    )
    app[SCHEDULER] = scheduler = Scheduler(
        pool,
        queue_size=cfg.queue_size,
        queue_timeout=cfg.queue_timeout,
        max_queued=cfg.max_queued,
        on_change=state.queue_changed,
    )
    state.queued_for = scheduler.queued_for
    app[KEYS] = keys = KeyStore(
        cfg.api_keys, cfg.keys_file, metrics=state.metrics, on_change=state.changed
    )
    state.keys_view = lambda: keys.snapshot(scheduler.queued_by_key())
    app[WORKER_KEYS] = worker_keys = WorkerKeyStore(cfg.worker_keys, cfg.worker_keys_file)
    app[REGISTRY] = registry = Registry(pool, state, app[SCHEDULER], worker_keys=worker_keys)
    if cfg.cluster_url:
        app[CLUSTER] = Cluster(
            cfg.cluster_url,
            cfg.cluster_keys,
            pool=pool,
            state=state,
            registry=registry,
            keys=keys,
            ca_file=cfg.cluster_ca_file,
        )
        app.add_routes([web.route("*", RELAY_PATH, relay_for_peer)])
        app.cleanup_ctx.append(_cluster_session)
        app.on_shutdown.append(_leave_cluster)
    app[SOCKETS] = set()
    app[LOG_THROTTLE] = Throttle()
    app[relay.MODELS_IN_FLIGHT] = Counter()
    app[MCP] = McpEndpoints(on_change=state.changed, on_call=state.metrics.mcp_call)
    state.mcp_view = app[MCP].snapshot
    if CLUSTER in app:
        app[CLUSTER].share_mcp(app[MCP])
    app[relay.AFFINITY] = ResponseAffinity()
    if CLUSTER in app:
        app[CLUSTER].share_responses(app[relay.AFFINITY])
    #: Model routes the pool answers itself when no worker serves the path for the model.
    fallbacks = {"/api/show": ollama.show_from_pool}
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/openapi.json", openapi.document),
            # llamapool's own API
            web.get("/api/v1/state", state_api.state),
            web.get("/api/v1/state/stream", state_api.state_stream),
            web.get("/", ollama.root),  # Ollama's probe answer; browsers: the dashboard
            web.get("/dashboard", to_dashboard),
            web.get("/dashboard/", dashboard),
            web.get("/dashboard/assets/{name}", dashboard_asset),
            # Every model endpoint, relayed by model (the table is routes.MODEL_ROUTES)
            *(
                web.post(r.path, relay.model_handler(r, otherwise=fallbacks.get(r.path)))
                for r in MODEL_ROUTES
            ),
            # OpenAI, answered by the pool
            web.get("/v1/models", openai.list_models),
            web.get("/v1/models/{id:.+}", openai.get_model),
            # OpenAI Responses API's stored responses, relayed to the worker holding them
            web.get("/v1/responses/{id}", openai.stored_response),
            web.delete("/v1/responses/{id}", openai.stored_response),
            web.get("/v1/responses/{id}/input_items", openai.stored_response),
            web.post("/v1/responses/{id}/cancel", openai.stored_response),
            # Ollama, answered by the pool
            web.get("/api/tags", ollama.tags),
            web.get("/api/ps", ollama.ps),
            web.get("/api/version", ollama.version),
            *(web.route(method, path, ollama.not_managed) for method, path in ollama.MANAGEMENT),
            *mcp_http.routes(),  # private MCP servers, through `llamapool mcp` relays
        ]
    )
    if cfg.metrics_port is None:
        app.add_routes([web.get("/metrics", state_api.metrics)])
    if _serves(app, cfg.ws_path):  # the route first added would win, and workers never connect
        raise ConfigError(f"WS_PATH {cfg.ws_path} is a path the server already serves")
    app.add_routes([web.get(cfg.ws_path, worker_socket)])
    app.on_response_prepare.append(middleware.echo_request_id)
    app.on_response_prepare.append(middleware.rate_limit_headers)
    app.cleanup_ctx.append(watch_keys_file(KEYS, cfg.keys_poll_interval))
    app.cleanup_ctx.append(watch_keys_file(WORKER_KEYS, cfg.keys_poll_interval))
    app.cleanup_ctx.append(evict_silent_workers)
    app.cleanup_ctx.append(state_api.broadcast_state)
    app.cleanup_ctx.append(expire_mcp_sessions)
    app.cleanup_ctx.append(watch_pauses)
    app.on_shutdown.append(state_api.release_watchers)
    app.on_shutdown.append(drain)
    return app


def _serves(app: web.Application, path: str) -> bool:
    """Whether a route of ``app`` takes ``path`` (a plain route, or a pattern that matches)."""
    for resource in app.router.resources():
        info = resource.get_info()
        pattern = info.get("pattern")
        if info.get("path") == path or (pattern is not None and pattern.fullmatch(path)):
            return True
    return False


async def _leave_cluster(app: web.Application) -> None:
    """Stopping: leave the cluster first, so no other server sends more requests here."""
    await app[CLUSTER].stop()


async def _cluster_session(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[CLUSTER].stop()
    await app[CLUSTER].close()
