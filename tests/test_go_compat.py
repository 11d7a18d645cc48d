"""Wire compatibility with Go llamapool peers, played in the test with the exact v1 shapes.

A Go worker and a Go server speak only protocol v1: JSON text frames with a ``type`` field,
snake_case fields, ``[]byte`` as base64 strings. They never advertise ``features`` and never send
``registered``, so they must never receive a binary frame or an extension message either.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.config import WorkConfig
from llamapool.errors import ConfigError
from llamapool.plugin_api import BackendSettings
from llamapool.testing import create_fake_ollama_app, fake_log
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .conftest import WORKER_KEY, PoolServer, wait_for

MODEL = "go-model:7b"
#: What a v1 server may ever send a worker.
SERVER_TO_WORKER_V1 = {"http_proxy_request", "http_proxy_cancel"}
#: What a v1 worker may ever send a server.
WORKER_TO_SERVER_V1 = {
    "register",
    "heartbeat",
    "http_proxy_response_headers",
    "http_proxy_response_chunk",
    "http_proxy_response_end",
}
#: The register fields a Go worker sends (design.md); anything else must be an extension.
REGISTER_V1 = {"type", "worker_id", "worker_name", "worker_key", "models", "max_concurrency"}
REGISTER_EXTENSIONS = {
    "token",
    "version",
    "build_sha",
    "build_date",
    "backend",
    "protocol",
    "features",
    "paths",
    "instance",
}
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9_]*$")
STEP = 5.0  # seconds any single wire step may take


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


async def model_ids(server: PoolServer) -> list[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.url + "/v1/models", headers=server.auth) as resp,
    ):
        assert 200 == resp.status
        return [m["id"] for m in (await resp.json())["data"]]


# --- a Go worker, played by a raw WebSocket client ------------------------------------------


class GoWorker:
    """The worker side of one connection, speaking exactly what a Go worker speaks."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        self.ws = ws
        #: Every frame the server sent this worker, in order.
        self.received: list[Any] = []  # aiohttp WSMessage (text as str or bytes)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def receive(self, timeout: float = STEP) -> dict[str, Any]:
        """The next message from the server, which must be a JSON text frame."""
        msg = await self.ws.receive(timeout=timeout)
        self.received.append(msg)
        assert WSMsgType.TEXT == msg.type, f"a Go worker got a non-text frame: {msg!r}"
        data: dict[str, Any] = json.loads(msg.data)
        return data

    async def respond(
        self,
        request_id: str,
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
        chunks: tuple[bytes, ...] = (),
    ) -> None:
        """Answer a request the way a Go worker relays its backend: headers, chunks, end."""
        await self.send(
            {
                "type": "http_proxy_response_headers",
                "request_id": request_id,
                "status": status,
                "headers": headers or {"Content-Type": "application/json"},
            }
        )
        for chunk in chunks:
            await self.chunk(request_id, chunk)
        await self.send({"type": "http_proxy_response_end", "request_id": request_id})

    async def chunk(self, request_id: str, data: bytes) -> None:
        await self.send(
            {"type": "http_proxy_response_chunk", "request_id": request_id, "data": b64(data)}
        )

    def assert_spoke_only_v1(self) -> None:
        """Every frame received so far was a v1 server message in a text frame."""
        kinds = []
        for msg in self.received:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                continue
            assert WSMsgType.TEXT == msg.type, f"a Go worker got a non-text frame: {msg!r}"
            kinds.append(json.loads(msg.data)["type"])
        assert set() == set(kinds) - SERVER_TO_WORKER_V1


def go_register(
    worker_id: str,
    *,
    key: str = WORKER_KEY,
    legacy_token: bool = False,
    models: list[str] | None = None,
    name: str = "go-alpha",
) -> dict[str, Any]:
    """A Go worker's register message: the v1 fields only, no extension."""
    message: dict[str, Any] = {
        "type": "register",
        "worker_id": worker_id,
        "worker_name": name,
        "worker_key": key,
        "models": [MODEL] if models is None else models,
        "max_concurrency": 2,
    }
    if legacy_token:  # older Go workers carry the key as "token" instead
        del message["worker_key"]
        message["token"] = key
    return message


@pytest.fixture
async def go_worker(
    pool_server: PoolServer,
) -> AsyncIterator[Callable[..., Awaitable[GoWorker]]]:
    """Connect Go workers (to ``pool_server`` unless told otherwise); each call registers one
    and returns once the pool holds it."""
    async with aiohttp.ClientSession() as http:
        sockets: list[aiohttp.ClientWebSocketResponse[bool]] = []

        async def connect(server: PoolServer | None = None, **register: Any) -> GoWorker:
            server = server or pool_server
            ws = await http.ws_connect(server.ws_url, autoping=True)
            sockets.append(ws)
            worker = GoWorker(ws)
            worker_id = register.pop("worker_id", None) or "go-" + uuid.uuid4().hex[:8]
            await worker.send(go_register(worker_id, **register))
            await wait_for(lambda: server.pool.get(worker_id) is not None, what="register")
            return worker

        yield connect
        for ws in sockets:
            await ws.close()


class Client:
    """A client of the pool whose requests run in the background while the test plays the
    worker; whatever is left running is cancelled at the end of the test."""

    def __init__(self, http: aiohttp.ClientSession, server: PoolServer) -> None:
        self.http = http
        self.server = server
        self.tasks: list[asyncio.Task[aiohttp.ClientResponse]] = []

    def post(self, path: str, **kwargs: Any) -> asyncio.Task[aiohttp.ClientResponse]:
        kwargs["headers"] = {**self.server.auth, **kwargs.get("headers", {})}
        task = asyncio.create_task(self.http.post(self.server.url + path, **kwargs))
        self.tasks.append(task)
        return task


@pytest.fixture
async def client(pool_server: PoolServer) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as http:
        client = Client(http, pool_server)
        yield client
        for task in client.tasks:
            task.cancel()
        for result in await asyncio.gather(*client.tasks, return_exceptions=True):
            if isinstance(result, aiohttp.ClientResponse):
                result.close()


async def test_go_worker_registers_with_worker_key(
    pool_server: PoolServer, go_worker: Callable[..., Awaitable[GoWorker]]
) -> None:
    """A Go worker's v1 register (worker_key, no extensions) puts its models in /v1/models."""
    await go_worker(worker_id="go-1", name="go-alpha", models=[MODEL, "other:1b"])

    async with (
        aiohttp.ClientSession() as http,
        http.get(pool_server.url + "/v1/models", headers=pool_server.auth) as resp,
    ):
        listed = {m["id"]: m["owned_by"] for m in (await resp.json())["data"]}

    assert {MODEL: "go-alpha", "other:1b": "go-alpha"} == listed
    handle = pool_server.pool.get("go-1")
    assert handle is not None
    assert (2, None) == (handle.max_concurrency, handle.paths)  # a Go worker serves any path


async def test_go_worker_registers_with_legacy_token(
    pool_server: PoolServer, go_worker: Callable[..., Awaitable[GoWorker]]
) -> None:
    """A register carrying the key in the legacy ``token`` field is accepted."""
    await go_worker(worker_id="go-legacy", legacy_token=True)

    assert [MODEL] == await model_ids(pool_server)


async def test_go_worker_relays_a_streamed_request_byte_for_byte(
    go_worker: Callable[..., Awaitable[GoWorker]],
    client: Client,
) -> None:
    """A streamed request reaches a Go worker as base64 JSON; its chunks stream back unchanged."""
    worker = await go_worker()
    body = (
        b'{"model": "go-model:7b",  "messages": [{"role": "user", "content": "h\xc3\xa9llo"}],'
        b'\n "stream": true}'
    )
    chunks = (b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n")

    posting = client.post(
        "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Trace": "t1"},
    )
    request = await worker.receive()
    rid = request["request_id"]
    await worker.send(
        {
            "type": "http_proxy_response_headers",
            "request_id": rid,
            "status": 200,
            "headers": {"Content-Type": "text/event-stream", "X-Vllm-Request-Id": "go"},
        }
    )
    await worker.chunk(rid, chunks[0])
    resp = await asyncio.wait_for(posting, STEP)
    # The first chunk arrives while the worker still holds the others: a real stream.
    first = await asyncio.wait_for(resp.content.readexactly(len(chunks[0])), STEP)
    for chunk in chunks[1:]:
        await worker.chunk(rid, chunk)
    await worker.send({"type": "http_proxy_response_end", "request_id": rid})
    rest = await asyncio.wait_for(resp.read(), STEP)

    assert "http_proxy_request" == request["type"]
    assert body == unb64(request["body"])
    assert ("POST", "/v1/chat/completions", True) == (
        request["method"],
        request["path"],
        request["stream"],
    )
    sent_headers = {k.lower(): v for k, v in request["headers"].items()}
    assert "authorization" not in sent_headers
    assert "t1" == sent_headers["x-trace"]
    assert (200, "text/event-stream", "go") == (
        resp.status,
        resp.headers["Content-Type"],
        resp.headers["X-Vllm-Request-Id"],
    )
    assert b"".join(chunks) == first + rest
    worker.assert_spoke_only_v1()


async def test_go_worker_non_streamed_request_relays_status_and_body(
    go_worker: Callable[..., Awaitable[GoWorker]],
    client: Client,
) -> None:
    """A non-streamed request says ``stream: false``; the worker's status and body reach the
    client unchanged."""
    worker = await go_worker()
    body = b'{"model":"go-model:7b","input":"hello"}'
    answer = b'{"error":{"message":"nope","type":"invalid_request_error","code":null}}'

    posting = client.post("/v1/embeddings", data=body)
    request = await worker.receive()
    await worker.respond(request["request_id"], status=422, chunks=(answer[:10], answer[10:]))
    resp = await asyncio.wait_for(posting, STEP)
    received = await asyncio.wait_for(resp.read(), STEP)

    assert ("/v1/embeddings", False, body) == (
        request["path"],
        request["stream"],
        unb64(request["body"]),
    )
    assert (422, "application/json", answer) == (
        resp.status,
        resp.headers["Content-Type"],
        received,
    )
    worker.assert_spoke_only_v1()


async def test_go_worker_ollama_path_is_the_public_path(
    go_worker: Callable[..., Awaitable[GoWorker]],
    client: Client,
) -> None:
    """An Ollama-native request reaches a Go worker at its public path, streamed by default."""
    worker = await go_worker()
    body = b'{"model":"go-model:7b","prompt":"hi"}'
    line = b'{"response":"hi","done":true}\n'

    posting = client.post("/api/generate", data=body)
    request = await worker.receive()
    await worker.respond(
        request["request_id"], headers={"Content-Type": "application/x-ndjson"}, chunks=(line,)
    )
    resp = await asyncio.wait_for(posting, STEP)
    received = await asyncio.wait_for(resp.read(), STEP)

    assert ("/api/generate", True) == (request["path"], request["stream"])
    assert (200, line) == (resp.status, received)


async def test_go_worker_error_before_headers_is_a_502(
    go_worker: Callable[..., Awaitable[GoWorker]],
    client: Client,
) -> None:
    """``http_proxy_response_end`` with an error and no headers gives the client a 502 JSON
    error naming the worker's message."""
    worker = await go_worker()

    posting = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    request = await worker.receive()
    await worker.send(
        {
            "type": "http_proxy_response_end",
            "request_id": request["request_id"],
            "error": {"code": "upstream_error", "message": "ollama is down"},
        }
    )
    resp = await asyncio.wait_for(posting, STEP)
    error = await resp.json()

    assert (502, "application/json") == (resp.status, resp.content_type)
    assert "worker_error" == error["error"]["code"]
    assert "ollama is down" in error["error"]["message"]


async def test_go_worker_refusing_while_draining_gives_a_complete_error(
    go_worker: Callable[..., Awaitable[GoWorker]], client: Client
) -> None:
    """A draining Go worker's refusal (503 headers, then an end with an error and no body)
    reaches the client as a complete 503 with a JSON error body, as the Go server answers it."""
    worker = await go_worker()

    posting = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    request = await worker.receive()
    rid = request["request_id"]
    await worker.send(  # exactly what the Go worker sends while draining
        {
            "type": "http_proxy_response_headers",
            "request_id": rid,
            "status": 503,
            "headers": {"Content-Type": "application/json"},
        }
    )
    await worker.send(
        {
            "type": "http_proxy_response_end",
            "request_id": rid,
            "error": {"code": "worker_draining", "message": "worker is draining"},
        }
    )
    resp = await asyncio.wait_for(posting, STEP)
    error = await asyncio.wait_for(resp.json(), STEP)

    assert 503 == resp.status
    assert "worker is draining" in error["error"]["message"]


async def test_go_worker_heartbeats_and_unknown_types_keep_it_connected(
    pool_server: PoolServer,
    go_worker: Callable[..., Awaitable[GoWorker]],
    client: Client,
) -> None:
    """Heartbeats and message types the server does not know are accepted and ignored."""
    worker = await go_worker(worker_id="go-chatty")
    await worker.send({"type": "heartbeat", "ts": int(time.time())})
    # status_update is a real Go message; the other is from some future version.
    await worker.send({"type": "status_update", "max_concurrency": 2, "status": "idle"})
    await worker.send({"type": "quantum_entanglement", "spin": "up"})
    await worker.send({"type": "heartbeat", "ts": int(time.time())})

    posting = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    request = await worker.receive()
    await worker.respond(request["request_id"], chunks=(b'{"ok":true}',))
    resp = await asyncio.wait_for(posting, STEP)
    received = await asyncio.wait_for(resp.read(), STEP)

    assert (200, b'{"ok":true}') == (resp.status, received)
    assert pool_server.pool.get("go-chatty") is not None
    worker.assert_spoke_only_v1()


async def test_client_disconnect_mid_stream_cancels_on_the_go_worker(
    go_worker: Callable[..., Awaitable[GoWorker]],
    client: Client,
) -> None:
    """A client that hangs up mid-stream makes the server send ``http_proxy_cancel``."""
    worker = await go_worker()
    first = b"data: {}\n\n"

    posting = client.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": [], "stream": True}
    )
    request = await worker.receive()
    rid = request["request_id"]
    await worker.send(
        {
            "type": "http_proxy_response_headers",
            "request_id": rid,
            "status": 200,
            "headers": {"Content-Type": "text/event-stream"},
        }
    )
    await worker.chunk(rid, first)
    resp = await asyncio.wait_for(posting, STEP)
    await asyncio.wait_for(resp.content.readexactly(len(first)), STEP)
    resp.close()  # the client hangs up mid-stream
    cancel = await worker.receive()

    assert {"type": "http_proxy_cancel", "request_id": rid} == cancel
    worker.assert_spoke_only_v1()


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(json.dumps(go_register("bad", key="wrong")), id="wrong-worker-key"),
        pytest.param(json.dumps(go_register("bad", key="wrong", legacy_token=True)), id="token"),
        pytest.param(json.dumps(go_register("bad", key="")), id="no-key"),
        pytest.param("register me, please", id="not-json"),
        pytest.param(json.dumps({"type": "heartbeat", "ts": 1}), id="not-register"),
        pytest.param(b"\x02\x03raw", id="binary-frame"),
    ],
)
async def test_bad_register_is_closed_with_1008(
    pool_server: PoolServer, first: str | bytes
) -> None:
    """A wrong key, a first message that is not JSON or not a register: close code 1008."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(pool_server.ws_url) as ws,
    ):
        if isinstance(first, bytes):
            await ws.send_bytes(first)
        else:
            await ws.send_str(first)
        msg = await ws.receive(timeout=STEP)

    assert (WSMsgType.CLOSE, 1008) == (msg.type, msg.data)
    assert 0 == len(pool_server.pool)


async def test_silent_go_worker_is_evicted_and_a_heartbeating_one_stays(
    start_server: Callable[..., Awaitable[PoolServer]],
    go_worker: Callable[..., Awaitable[GoWorker]],
) -> None:
    """A Go worker silent past the worker timeout is evicted; one sending heartbeats stays."""
    server = await start_server(worker_timeout=1.0)
    beating = await go_worker(server, worker_id="go-beating", models=["beating:1b"])

    async def heartbeats() -> None:
        while True:
            await beating.send({"type": "heartbeat", "ts": int(time.time())})
            await asyncio.sleep(0.2)

    beat = asyncio.create_task(heartbeats())
    try:
        silent = await go_worker(server, worker_id="go-silent", models=["silent:1b"])
        assert ["beating:1b", "silent:1b"] == sorted(await model_ids(server))

        async def silent_gone() -> bool:
            return "silent:1b" not in await model_ids(server)

        await wait_for(silent_gone, timeout=10, what="the silent worker's eviction")
        assert ["beating:1b"] == await model_ids(server)
    finally:
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
    closing = await silent.ws.receive(timeout=STEP)
    assert (WSMsgType.CLOSE, 1001) == (closing.type, closing.data)


# --- a Go server, played by a small aiohttp app ---------------------------------------------


class GoServerConnection:
    """One worker connection as a v1-only Go server sees it."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        #: Every frame the worker sent, in arrival order.
        self.received: list[aiohttp.WSMessage] = []
        self._queue: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()

    def feed(self, msg: aiohttp.WSMessage) -> None:
        self.received.append(msg)
        self._queue.put_nowait(msg)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(message))

    async def next(self, *, heartbeats: bool = False, timeout: float = STEP) -> dict[str, Any]:
        """The next message from the worker (a JSON text frame), heartbeats skipped unless
        asked for."""
        while True:
            msg = await asyncio.wait_for(self._queue.get(), timeout)
            assert WSMsgType.TEXT == msg.type, f"a Go server got a non-text frame: {msg!r}"
            data: dict[str, Any] = json.loads(msg.data)
            if heartbeats or data["type"] != "heartbeat":
                return data

    async def response(self, request_id: str) -> list[dict[str, Any]]:
        """Every message for ``request_id`` up to and including its end."""
        messages = []
        while True:
            message = await self.next()
            if message.get("request_id") == request_id:
                messages.append(message)
                if message["type"] == "http_proxy_response_end":
                    return messages

    def assert_spoke_only_v1(self) -> None:
        """Every frame so far was a v1 worker message in a text frame."""
        kinds = []
        for msg in self.received:
            assert WSMsgType.TEXT == msg.type, f"a Go server got a non-text frame: {msg!r}"
            kinds.append(json.loads(msg.data)["type"])
        assert set() == set(kinds) - WORKER_TO_SERVER_V1


class GoServer:
    """A Go llamapool server's worker endpoint: reads a register, never answers
    ``registered``, and lets the test drive the connection."""

    def __init__(self, *, reject: bool = False) -> None:
        self.reject = reject
        self.connections: asyncio.Queue[GoServerConnection] = asyncio.Queue()
        self.app = web.Application()
        self.app.router.add_get("/workers/connect", self._socket)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = GoServerConnection(ws)
        self.connections.put_nowait(conn)
        async for msg in ws:
            conn.feed(msg)
            if self.reject:  # what a Go server does with a bad worker key
                await ws.close(code=1008, message=b"unauthorized")
        return ws

    async def connection(self) -> GoServerConnection:
        return await asyncio.wait_for(self.connections.get(), 10)


class FakeOllama:
    """The fake Ollama from llamapool.testing, plus how each request to it ended."""

    def __init__(self, server: TestServer, outcomes: list[tuple[str, str]]) -> None:
        self.server = server
        #: ``(path, "completed")`` for a request answered in full, else the exception's name.
        self.outcomes = outcomes

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"


@pytest.fixture
async def fake_ollama(aiohttp_server: AiohttpServer) -> FakeOllama:
    app = create_fake_ollama_app(models=("qwen2.5:7b", "llama3:8b"), chunk_delay=0.02)
    outcomes: list[tuple[str, str]] = []

    @web.middleware
    async def watch(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except BaseException as exc:
            outcomes.append((request.path, type(exc).__name__))
            raise
        outcomes.append((request.path, "completed"))
        return response

    app.middlewares.append(watch)
    return FakeOllama(await aiohttp_server(app, host="127.0.0.1", port=0), outcomes)


@pytest.fixture
async def go_server(aiohttp_server: AiohttpServer) -> Callable[..., Awaitable[str]]:
    """Start a fake Go server; the call returns its worker WebSocket URL."""

    async def start(go: GoServer) -> str:
        server = await aiohttp_server(go.app, host="127.0.0.1", port=0)
        return f"ws://{server.host}:{server.port}/workers/connect"

    return start


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[..., tuple[Agent, asyncio.Task[None]]]]:
    """Run our real worker in-process with the ollama plugin; stopped at the end."""
    tasks: list[asyncio.Task[None]] = []

    def start(
        server_url: str, backend_url: str, **overrides: Any
    ) -> tuple[Agent, asyncio.Task[None]]:
        settings: dict[str, Any] = {
            "server_url": server_url,
            "worker_key": WORKER_KEY,
            "worker_id": "py-worker-1",
            "worker_name": "py-alpha",
            "max_concurrency": 3,
            "heartbeat_interval": 0.2,
        }
        settings.update(overrides)
        backend = load_backend("ollama")(BackendSettings(url=backend_url))
        agent = Agent(WorkConfig(**settings), backend, backend_name="ollama")
        task = asyncio.create_task(agent.run())
        tasks.append(task)
        return agent, task

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def go_connected(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> tuple[Agent, GoServerConnection, dict[str, Any]]:
    """Our agent connected to a fake Go server: the agent, the connection, its register."""
    go = GoServer()
    agent, _ = run_agent(await go_server(go), fake_ollama.url)
    conn = await go.connection()
    return agent, conn, await conn.next()


def proxy_request(path: str, body: bytes, *, stream: bool | None, **extra: Any) -> dict[str, Any]:
    """An ``http_proxy_request`` as a Go server marshals it (``omitempty`` drops a false
    ``stream``)."""
    message: dict[str, Any] = {
        "type": "http_proxy_request",
        "request_id": uuid.uuid4().hex,
        "method": "POST",
        "path": path,
        "body": b64(body),
        **extra,
    }
    if stream:
        message["stream"] = True
    return message


def without_timestamps(ndjson: bytes) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
    for line in lines:
        line.pop("created_at", None)
    return lines


async def test_agent_registers_with_go_fields(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """Our worker's register carries every v1 field a Go server reads, in snake_case."""
    agent, _, register = await go_connected(go_server, run_agent, fake_ollama)

    assert "register" == register["type"]
    assert ("py-worker-1", "py-alpha", WORKER_KEY, ["llama3:8b", "qwen2.5:7b"], 3) == (
        register["worker_id"],
        register["worker_name"],
        register["worker_key"],
        register["models"],
        register["max_concurrency"],
    )
    assert set() == set(register) - REGISTER_V1 - REGISTER_EXTENSIONS
    assert [] == [key for key in register if not SNAKE_CASE.match(key)]
    assert False is agent.registered.is_set()  # a Go server never confirms


async def test_agent_streams_to_a_go_server_as_json_base64(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """Asked by a Go server, our worker answers with JSON headers, base64 chunks and an end,
    never binary frames, and the chunks reassemble into the backend's answer."""
    _, conn, _ = await go_connected(go_server, run_agent, fake_ollama)
    body = b'{"model": "llama3:8b", "messages": [{"role": "user", "content": "hello go server"}]}'
    request = proxy_request(
        "/api/chat",
        body,
        stream=True,
        headers={"Content-Type": "application/json", "Authorization": "Bearer client-key"},
    )

    await conn.send(request)
    messages = await conn.response(request["request_id"])
    async with (
        aiohttp.ClientSession() as http,
        http.post(fake_ollama.url + "/api/chat", data=body) as direct,
    ):
        expected = await direct.read()

    headers, *chunks, end = messages
    assert "http_proxy_response_headers" == headers["type"]
    assert (200, "application/x-ndjson") == (headers["status"], headers["headers"]["Content-Type"])
    assert {"http_proxy_response_chunk"} == {c["type"] for c in chunks}
    assert 1 < len(chunks)  # streamed as the backend wrote, not buffered
    streamed = b"".join(unb64(c["data"]) for c in chunks)
    assert without_timestamps(expected) == without_timestamps(streamed)
    assert {"type": "http_proxy_response_end", "request_id": request["request_id"]} == end
    via_worker = next(r for r in fake_log(fake_ollama.server.app).requests if r.path == "/api/chat")
    assert body == via_worker.body
    assert [] == [k for k in via_worker.headers if k.lower() == "authorization"]
    conn.assert_spoke_only_v1()


async def test_agent_relays_byte_exact_without_go_omitted_fields(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """A request without ``stream`` or ``headers`` (Go omits empty ones) is served, and the
    reassembled body is the backend's exact bytes."""
    _, conn, _ = await go_connected(go_server, run_agent, fake_ollama)
    body = b'{"model":"llama3:8b","input":["one","two words"]}'
    request = proxy_request("/api/embed", body, stream=None)

    await conn.send(request)
    messages = await conn.response(request["request_id"])
    async with (
        aiohttp.ClientSession() as http,
        http.post(fake_ollama.url + "/api/embed", data=body) as direct,
    ):
        expected = await direct.read()

    chunks = [unb64(m["data"]) for m in messages if m["type"] == "http_proxy_response_chunk"]
    assert 200 == messages[0]["status"]
    assert expected == b"".join(chunks)
    assert "error" not in messages[-1]
    conn.assert_spoke_only_v1()


async def test_go_server_cancel_stops_the_worker_and_its_backend_request(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """``http_proxy_cancel`` mid-stream aborts the backend request and stops the chunks."""
    _, conn, _ = await go_connected(go_server, run_agent, fake_ollama)
    long_answer = {
        "model": "llama3:8b",
        "messages": [{"role": "user", "content": "go on"}],
        "options": {"num_predict": 5000},  # 100 s of tokens at the fake's pace
    }
    slow = proxy_request("/api/chat", json.dumps(long_answer).encode(), stream=True)
    await conn.send(slow)
    while (await conn.next()).get("type") != "http_proxy_response_chunk":
        pass  # headers first, then wait for the stream to be flowing

    await conn.send({"type": "http_proxy_cancel", "request_id": slow["request_id"]})

    def backend_aborted() -> bool:
        return any(path == "/api/chat" for path, _ in fake_ollama.outcomes)

    await wait_for(backend_aborted, timeout=STEP, what="the backend request to end")
    # A second request is a barrier: the worker handled the cancel before it.
    barrier = proxy_request("/api/embed", b'{"model":"llama3:8b","input":"x"}', stream=None)
    await conn.send(barrier)
    after_cancel: list[dict[str, Any]] = []
    while True:
        message = await conn.next()
        after_cancel.append(message)
        if message == {"type": "http_proxy_response_end", "request_id": barrier["request_id"]}:
            break

    assert [("/api/chat", "CancelledError")] == [
        o for o in fake_ollama.outcomes if o[0] == "/api/chat"
    ]
    first_barrier = next(
        i for i, m in enumerate(after_cancel) if m.get("request_id") == barrier["request_id"]
    )
    assert [] == [
        m for m in after_cancel[first_barrier:] if m.get("request_id") == slow["request_id"]
    ]
    conn.assert_spoke_only_v1()


async def test_agent_sends_heartbeats_to_a_go_server(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """Our worker sends ``{"type": "heartbeat", "ts": <unix seconds>}`` on its interval."""
    _, conn, _ = await go_connected(go_server, run_agent, fake_ollama)

    beats = [await conn.next(heartbeats=True) for _ in range(2)]

    assert [{"heartbeat", "ts"}, {"heartbeat", "ts"}] == [
        {b["type"], *(k for k in b if k != "type")} for b in beats
    ]
    assert all(isinstance(b["ts"], int) and abs(b["ts"] - time.time()) < 60 for b in beats)


async def test_agent_ignores_unknown_messages_from_a_go_server(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """Message types the worker does not know (Go's legacy ``job_request``, future ones) are
    ignored and the connection keeps serving."""
    _, conn, _ = await go_connected(go_server, run_agent, fake_ollama)
    await conn.send({"type": "job_request", "job_id": "j1", "endpoint": "generate", "payload": {}})
    await conn.send({"type": "status_request", "verbose": True})
    request = proxy_request("/api/embed", b'{"model":"qwen2.5:7b","input":"x"}', stream=None)

    await conn.send(request)
    messages = await conn.response(request["request_id"])

    assert 200 == messages[0]["status"]
    assert "error" not in messages[-1]
    conn.assert_spoke_only_v1()


async def test_agent_rejected_by_a_go_server_stops_with_a_config_error(
    go_server: Callable[..., Awaitable[str]],
    run_agent: Callable[..., tuple[Agent, asyncio.Task[None]]],
    fake_ollama: FakeOllama,
) -> None:
    """A Go server closing with 1008 (bad key) makes the worker stop instead of retrying."""
    go = GoServer(reject=True)
    _, task = run_agent(await go_server(go), fake_ollama.url)

    with pytest.raises(ConfigError, match="rejected"):
        await asyncio.wait_for(task, 10)
