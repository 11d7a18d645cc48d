"""Shared pieces of the resilience tests: fakes that hold their answers, a server run the way
``llamapool serve`` runs it, a Go worker played over a raw WebSocket, and clients whose every
wait is bounded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from llamapool.config import ServeConfig, WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.run import stop_server
from llamapool.server.app import create_app
from llamapool.server.appkeys import POOL, SCHEDULER, STATE
from llamapool.server.connections import make_runner
from llamapool.server.link import WorkerLink
from llamapool.server.pool import Pool, WorkerHandle
from llamapool.server.scheduler import Scheduler
from llamapool.server.state import PoolState
from llamapool.testing import create_fake_ollama_app
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .conftest import API_KEY, WORKER_KEY, PoolServer, wait_for

MODEL = "llama3:8b"
#: The longest any one step of a test may take (a request, a reconnect, a drain).
STEP = 5.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def chat(prompt: str, *, stream: bool, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat completion request for ``prompt``."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    return {**body, **extra}


def echo_of(prompt: str) -> str:
    """What the fake backends answer to ``prompt``."""
    return " ".join(["echo:", *prompt.split()])


@attrs.frozen
class Answer:
    """One response as its client received it."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def events(self) -> list[Any]:
        """The data of each SSE event: decoded JSON, or ``"[DONE]"``."""
        out: list[Any] = []
        for block in self.body.split(b"\n\n"):
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line.removeprefix(b"data: ")
                    out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
        return out

    @property
    def text(self) -> str:
        """The answer's text, whole or streamed (OpenAI chat shape)."""
        if not self.headers.get("Content-Type", "").startswith("text/event-stream"):
            return str(self.json()["choices"][0]["message"]["content"])
        return "".join(
            e["choices"][0]["delta"].get("content") or ""
            for e in self.events
            if isinstance(e, dict) and e.get("choices")
        )

    @property
    def stream_error(self) -> str | None:
        """The message of the error event that ended a stream, if one did."""
        errors = [e for e in self.events if isinstance(e, dict) and "error" in e]
        return str(errors[-1]["error"]["message"]) if errors else None


async def post(
    url: str,
    body: dict[str, Any],
    *,
    path: str = "/v1/chat/completions",
    timeout: float = STEP,
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST ``body`` with the test API key; the whole answer, or a failed test after
    ``timeout``."""
    auth = {"Authorization": f"Bearer {API_KEY}", **(headers or {})}
    async with aiohttp.ClientSession() as http:

        async def go() -> Answer:
            async with http.post(url + path, json=body, headers=auth) as resp:
                data = await resp.read()
                return Answer(resp.status, dict(resp.headers), data)

        try:
            return await asyncio.wait_for(go(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no answer within {timeout}s: {body}") from None


class Stream:
    """A streamed chat request whose client has read its first event."""

    def __init__(self, resp: aiohttp.ClientResponse, first: bytes) -> None:
        self.resp, self.first = resp, first

    async def rest(self, timeout: float = STEP) -> Answer:
        data = await asyncio.wait_for(self.resp.content.read(), timeout)
        return Answer(self.resp.status, dict(self.resp.headers), self.first + data)


@contextlib.asynccontextmanager
async def streaming(url: str, prompt: str) -> AsyncIterator[Stream]:
    """A stream in progress: its first event has arrived."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url + "/v1/chat/completions", json=chat(prompt, stream=True), headers=auth
        ) as resp,
    ):
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), STEP)
        yield Stream(resp, first)


async def get_json(url: str, path: str) -> Any:
    """``GET path`` with the test key, as JSON."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=auth) as resp:
        assert 200 == resp.status, await resp.text()
        return await asyncio.wait_for(resp.json(), STEP)


async def get_text(url: str, path: str) -> str:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as http, http.get(url + path, headers=auth) as resp:
        assert 200 == resp.status
        return await asyncio.wait_for(resp.text(), STEP)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when the series is absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        sample, _, rest = series.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and found == wanted:
            return float(value)
    return 0.0


# --- fake backends that hold their answers --------------------------------------------------


class Gate:
    """Holds every model request to a fake backend until the test opens it, so a request can
    be kept "in flight, nothing answered yet" for exactly as long as a test needs."""

    def __init__(self, *, opened: bool = False) -> None:
        self.opened = asyncio.Event()
        if opened:
            self.opened.set()
        #: Requests waiting at the gate now.
        self.held = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET":  # model listings (the worker's probe) pass
            return await handler(request)
        self.held += 1
        try:
            await self.opened.wait()
        finally:
            self.held -= 1
        return await handler(request)


def gated_ollama(gate: Gate, *, models: tuple[str, ...] = (MODEL,)) -> web.Application:
    """A fake Ollama that records each request, then answers once ``gate`` is open."""
    app = create_fake_ollama_app(models=models)
    app.middlewares.append(gate.middleware)
    return app


def prompts_seen(app: web.Application) -> list[str]:
    """The user prompts of the chat requests a fake backend received, in order."""
    from llamapool.testing import fake_log

    return [
        r.json()["messages"][-1]["content"]
        for r in fake_log(app).requests
        if r.path.endswith("/chat/completions")
    ]


# --- servers run the way the CLI runs them --------------------------------------------------


class RunnerServer(PoolServer):
    """A server on the runner ``llamapool serve`` uses (handler cancellation: a client that
    leaves cancels its request's handler; connections counted at accept)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.app = create_app(cfg)
        self.runner = make_runner(self.app, cfg)
        self.port = cfg.port
        self.stopped = False

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop as ``llamapool serve`` does on SIGTERM (idempotent)."""
        if not self.stopped:
            self.stopped = True
            await stop_server(self.runner)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pool(self) -> Pool:
        return self.app[POOL]

    @property
    def state(self) -> PoolState:
        return self.app[STATE]

    @property
    def scheduler(self) -> Scheduler:
        return self.app[SCHEDULER]


@contextlib.asynccontextmanager
async def runner_server(port: int = 0, **overrides: Any) -> AsyncIterator[RunnerServer]:
    """A :class:`RunnerServer` with the test keys for the block."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "api_keys": API_KEY,
        "worker_keys": WORKER_KEY,
        **overrides,
    }
    server = RunnerServer(ServeConfig(**settings))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def handle_of(server: PoolServer, agent: Agent) -> WorkerHandle:
    handle = server.pool.get(agent.cfg.worker_id)
    assert handle is not None, "the worker is not in the pool"
    return handle


def link_of(server: PoolServer, worker_id: str) -> WorkerLink:
    handle = server.pool.get(worker_id)
    assert handle is not None, f"{worker_id} is not in the pool"
    assert isinstance(handle.link, WorkerLink)
    return handle.link


async def state_of(server: PoolServer) -> Any:
    return await get_json(server.url, "/api/v1/state")


def app_of(server: PoolServer) -> web.Application:
    """The application behind a test server or a :class:`RunnerServer`."""
    return server.app if isinstance(server, RunnerServer) else server.server.app


async def until_queued(server: PoolServer, length: int) -> None:
    """Wait until the server's queue holds ``length`` requests."""
    scheduler = app_of(server)[SCHEDULER]
    await wait_for(lambda: length == len(scheduler), timeout=STEP, what=f"{length} queued")


@contextlib.asynccontextmanager
async def serve_on(app: web.Application, port: int) -> AsyncIterator[str]:
    """Run ``app`` on a given loopback port for the block; yield its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@attrs.define
class RunningAgent:
    """A worker agent run by the test itself, so the test can see ``run()`` return."""

    agent: Agent
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running_agent(
    server: PoolServer, backend_url: str, **overrides: Any
) -> AsyncIterator[RunningAgent]:
    """An Ollama-backed agent registered with ``server``; cancelled when the block ends."""
    settings: dict[str, Any] = {"server_url": server.ws_url, "worker_key": WORKER_KEY}
    settings.update(overrides)
    backend = load_backend("ollama")(BackendSettings(url=backend_url))
    agent = Agent(WorkConfig(**settings), backend, backend_name="ollama")
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(
            lambda: server.pool.get(agent.cfg.worker_id) is not None or task.done(),
            timeout=STEP,
            what="the worker to register",
        )
        if task.done():
            task.result()
        yield RunningAgent(agent, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --- a Go worker, played over a raw WebSocket -----------------------------------------------


class GoWorker:
    """A worker speaking only protocol v1, driven step by step by the test: it never sends a
    byte the test did not ask for (so it can fall silent, like a machine gone to sleep)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool], worker_id: str) -> None:
        self.ws = ws
        self.worker_id = worker_id
        self._beating: asyncio.Task[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def receive(self, timeout: float = STEP) -> dict[str, Any]:
        """The next JSON message from the server (a failed test after ``timeout``)."""
        msg = await self.ws.receive(timeout=timeout)
        assert aiohttp.WSMsgType.TEXT == msg.type, f"expected a text frame, got {msg!r}"
        data: dict[str, Any] = json.loads(msg.data)
        return data

    async def headers(self, request_id: str, content_type: str = "text/event-stream") -> None:
        await self.send(
            {
                "type": "http_proxy_response_headers",
                "request_id": request_id,
                "status": 200,
                "headers": {"Content-Type": content_type},
            }
        )

    async def chunk(self, request_id: str, data: bytes) -> None:
        await self.send(
            {
                "type": "http_proxy_response_chunk",
                "request_id": request_id,
                "data": base64.b64encode(data).decode(),
            }
        )

    def beat(self, interval: float = 0.1) -> None:
        """Send heartbeats in the background until :meth:`fall_silent`."""

        async def beats() -> None:
            while True:
                await self.send({"type": "heartbeat", "ts": int(time.time())})
                await asyncio.sleep(interval)

        self._beating = asyncio.create_task(beats())

    async def fall_silent(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)


@contextlib.asynccontextmanager
async def go_worker(
    server: PoolServer,
    *,
    models: tuple[str, ...] = (MODEL,),
    max_concurrency: int = 2,
    worker_id: str = "",
    instance: str = "",
) -> AsyncIterator[GoWorker]:
    """A registered Go-style worker for the block (heartbeating until told to fall silent);
    with ``instance``, it proves its identity the way a llamapool-py worker does."""
    worker_id = worker_id or "go-" + uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.ws_url, autoping=True)
        worker = GoWorker(ws, worker_id)
        try:
            await worker.send(
                {
                    "type": "register",
                    "worker_id": worker_id,
                    "worker_name": worker_id,
                    "worker_key": WORKER_KEY,
                    "models": list(models),
                    "max_concurrency": max_concurrency,
                    **({"instance": instance} if instance else {}),
                }
            )
            await wait_for(lambda: server.pool.get(worker_id) is not None, what="go register")
            worker.beat()
            yield worker
        finally:
            await worker.fall_silent()
            await ws.close()
