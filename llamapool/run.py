"""Run the server, a worker, or both (the demo) until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import secrets
import signal
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import attrs
import structlog
from aiohttp import web

from llamapool import eventloop
from llamapool.backends.demo import DEMO_MODELS, DemoBackend
from llamapool.config import ServeConfig, WorkConfig
from llamapool.dialout import draining_on_signals
from llamapool.errors import LlamapoolError
from llamapool.listening import listen
from llamapool.log import Throttle, throttled_loop_errors
from llamapool.plugin_api import BackendSettings
from llamapool.server.app import create_app, create_metrics_app, drain
from llamapool.server.appkeys import KEYS, SOCKETS, STATE, WORKER_KEYS
from llamapool.server.cluster.endpoint import CLUSTER
from llamapool.server.connections import ConnectionGuard, make_runner, refusal_counter
from llamapool.server.resources import (
    METRICS_BACKLOG,
    METRICS_CONNECTIONS,
    connection_cap,
    freeze_survivors,
    raise_open_file_limit,
    tune_gc,
)
from llamapool.tls import server_context
from llamapool.worker.agent import Agent, plugin_failed
from llamapool.worker.loader import load_backend
from llamapool.worker.status import serving_status

log = structlog.get_logger("llamapool")


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    _on_signals(stop.set)
    return stop


@contextlib.asynccontextmanager
async def running_server(cfg: ServeConfig) -> AsyncIterator[str]:
    """Serve ``cfg`` and yield the URL a client on this machine can use.

    On exit the listener closes first, then requests in flight get ``drain_timeout`` to
    finish, then worker connections are closed (see the app's ``on_shutdown``).
    """
    tls = server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
    app = create_app(cfg)
    cap = connection_cap(cfg, raise_open_file_limit())
    runner = make_runner(app, cfg, guard=ConnectionGuard(cap, on_refused=refusal_counter(app)))
    await runner.setup()
    metrics_runner: web.AppRunner | None = None
    reload_on_sighup = False
    try:
        await listen(
            web.TCPSite(
                runner,
                cfg.host,
                cfg.port,
                ssl_context=tls,
                backlog=cfg.backlog,
                reuse_port=cfg.reuse_port or None,
            ),
            setting="HOST and PORT",
        )
        url = _url(cfg.host, runner.addresses[0][1], tls=tls is not None)
        if cfg.metrics_port is not None:
            metrics_app = create_metrics_app(app[STATE], cfg, keys=app[KEYS])
            metrics_runner = make_runner(
                metrics_app, cfg, guard=ConnectionGuard(METRICS_CONNECTIONS)
            )
            await metrics_runner.setup()
            await listen(
                web.TCPSite(
                    metrics_runner,
                    cfg.host,
                    cfg.metrics_port,
                    ssl_context=tls,
                    backlog=METRICS_BACKLOG,
                ),
                setting="METRICS_PORT",
            )
        # Logged once every port is open: a port in use stops the server before it says so.
        log.info("server_listening", url=url, ws_path=cfg.ws_path, loop=eventloop.NAME)
        if metrics_runner is not None:
            port = metrics_runner.addresses[0][1]
            log.info(
                "metrics_listening", url=_url(cfg.host, port, tls=tls is not None) + "/metrics"
            )
        if CLUSTER in app:
            app[CLUSTER].start(await _peer_url(runner, cfg, url, tls))
        _warn_if_open(cfg)
        reload_on_sighup = _on_sighup(functools.partial(_reload_keys, app))
        yield url
    finally:
        if reload_on_sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await stop_server(runner)


async def stop_server(runner: web.AppRunner) -> None:
    """Stop the way Go's ``http.Server.Shutdown`` does: close the listener and the clients'
    idle connections (busy ones close after their response, so no new request starts), let
    the requests in flight finish (the app's drain), then clean up.

    aiohttp's cleanup alone would close the worker sockets' connections too, and a closed
    aiohttp connection stops reading: the streams the drain waits for would freeze.
    """
    for site in list(runner.sites):
        await site.stop()
    workers = {ws.get_extra_info("peername") for ws in runner.app[SOCKETS]}
    for conn in runner.server.connections if runner.server is not None else ():
        if conn.transport is not None and conn.transport.get_extra_info("peername") not in workers:
            conn.close()
    await drain(runner.app)
    await runner.cleanup()


async def _peer_url(
    runner: web.AppRunner, cfg: ServeConfig, url: str, tls: ssl.SSLContext | None
) -> str:
    """The URL the other servers of the cluster reach this one at.

    Processes sharing a port (``reuse_port``) each listen on a port of their own too, since
    a request for one's worker must reach that very process: it is advertised at the host of
    ``CLUSTER_ADVERTISE_URL`` (or ``HOST``, or loopback for a wildcard ``HOST``).
    """
    if not cfg.reuse_port:
        return cfg.cluster_advertise_url.rstrip("/") or url
    site = web.TCPSite(runner, cfg.host, 0, ssl_context=tls, backlog=cfg.backlog)
    await site.start()
    port = runner.addresses[-1][1]  # the site just started
    if cfg.cluster_advertise_url:
        parts = urllib.parse.urlsplit(cfg.cluster_advertise_url)
        host = parts.hostname or "127.0.0.1"
        return _url(host, port, tls=parts.scheme == "https")
    return _url(cfg.host, port, tls=tls is not None)


def _url(host: str, port: int, *, tls: bool) -> str:
    """A URL for a local client: a wildcard address means this machine's loopback."""
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _warn_if_open(cfg: ServeConfig) -> None:
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    if loopback:
        return
    if not cfg.api_keys and not cfg.keys_file:
        log.warning("no_api_key", hint="anyone who can reach this port can use the pool")
    if not cfg.worker_keys and not cfg.worker_keys_file:
        log.warning("no_worker_key", hint="anyone who can reach this port can join as a worker")


async def serve(cfg: ServeConfig) -> None:
    """The server until SIGTERM or SIGINT: the first drains, a second stops at once."""
    _quiet_loop_errors()
    stop = _stop_event()
    main = cast("asyncio.Task[None]", asyncio.current_task())
    try:
        async with running_server(cfg):
            freeze_survivors()  # what startup made lives as long as the server
            tune_gc()
            await stop.wait()
            _on_signals(functools.partial(_cancel, main))  # a second signal: stop now
    except asyncio.CancelledError:
        log.warning("server_stopped_without_draining")
        return
    log.info("server_stopped")


async def work(cfg: WorkConfig) -> None:
    """A worker until SIGTERM or SIGINT: the first drains (finish in-flight requests within
    ``drain_timeout``), a second stops at once."""
    backend_cls = load_backend(cfg.backend)
    try:
        backend = backend_cls(BackendSettings(url=cfg.backend_url, api_key=cfg.backend_api_key))
    except LlamapoolError:
        raise
    except Exception as exc:  # a bug of the plugin's: one line, not a traceback
        raise plugin_failed(cfg.backend, exc) from None
    agent = Agent(cfg, backend, backend_name=cfg.backend)
    async with serving_status(agent) as urls:  # an address in use stops it before it starts
        for url in urls:
            log.info("status_listening", url=url)
        running = asyncio.ensure_future(agent.run())
        async with draining_on_signals(
            running, lambda: agent.drain(cfg.drain_timeout), timeout=cfg.drain_timeout
        ):
            with contextlib.suppress(asyncio.CancelledError):
                await running
    log.info("worker_stopped")


def _quiet_loop_errors() -> None:
    """Log the event loop's errors once per kind and 10 s: a server out of file descriptors
    gets one per failed ``accept()``, which hostile clients can cause at will."""
    asyncio.get_running_loop().set_exception_handler(throttled_loop_errors(Throttle()))


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def _on_signals(callback: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, callback)


def _reload_keys(app: web.Application) -> None:
    """SIGHUP: read the client and the worker keys files again."""
    app[KEYS].reload()
    app[WORKER_KEYS].reload()


def _on_sighup(callback: Callable[[], object]) -> bool:
    """Call ``callback`` on SIGHUP (the keys files' reload); ``False`` where there is none."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(sighup, callback)
    except (NotImplementedError, RuntimeError):  # not the main thread's loop
        return False
    return True


async def _until_stopped(main: Awaitable[None]) -> None:
    stop = _stop_event()
    task = asyncio.ensure_future(main)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def demo(cfg: ServeConfig) -> None:
    """A server and an in-process demo worker, with keys made up if none were given."""
    _quiet_loop_errors()
    api_key = cfg.api_keys[0] if cfg.api_keys else "demo-" + secrets.token_urlsafe(12)
    worker_key = cfg.worker_keys[0] if cfg.worker_keys else secrets.token_urlsafe(24)
    cfg = attrs.evolve(
        cfg, api_keys=cfg.api_keys or (api_key,), worker_keys=cfg.worker_keys or (worker_key,)
    )
    async with running_server(cfg) as url:
        ws_url = "ws" + url.removeprefix("http") + cfg.ws_path
        work_cfg = WorkConfig(
            server_url=ws_url,
            worker_key=worker_key,
            worker_name="demo-worker",
            tls_insecure=bool(cfg.tls_cert),  # its own certificate, on loopback
        )
        agent = Agent(work_cfg, DemoBackend(BackendSettings(url="")), backend_name="demo")
        worker = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.registered.wait(), timeout=30)
            print(_demo_banner(url, api_key), flush=True)
            await _until_stopped(worker)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker


def _demo_banner(url: str, api_key: str) -> str:
    message = {"model": DEMO_MODELS[0], "messages": [{"role": "user", "content": "Hello, pool!"}]}
    body = json.dumps(message)
    return "\n".join(
        [
            f"llamapool demo pool: {url}  (Ctrl+C to stop)",
            f"API key: {api_key}",
            "Try it:",
            f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer {api_key}' "
            f"-H 'Content-Type: application/json' -d '{body}'",
        ]
    )
