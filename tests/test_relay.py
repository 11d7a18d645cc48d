"""One request through the pool: the backend's answer arrives unchanged, streams stay streams,
credentials stay on their side, and either side leaving ends the request cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from llamapool.config import ServeConfig, WorkConfig
from llamapool.plugin_api import BackendSettings
from llamapool.protocol import (
    FEATURE_BINARY_FRAMES,
    FRAME_REQUEST_BODY,
    PROTOCOL_VERSION,
    ProxyRequest,
    Register,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    decode,
    encode,
    unpack_frame,
)
from llamapool.server.app import create_app
from llamapool.server.appkeys import POOL
from llamapool.server.link import INLINE_BODY, WorkerLink
from llamapool.server.pool import Pool, WorkerHandle
from llamapool.testing import (
    create_broken_app,
    create_fake_ollama_app,
    create_fake_vllm_app,
    fake_log,
    serve_app,
)
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend
from llamapool_ollama import OllamaBackend

from .conftest import API_KEY, WORKER_KEY, PoolServer, StartServer, StartWorker, url_of, wait_for

MODEL = "llama3:8b"
DELAY = 0.2


def chat(prompt: str, *, stream: bool, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}


def handle_of(server: PoolServer, agent: Agent) -> WorkerHandle:
    handle = server.pool.get(agent.cfg.worker_id)
    assert handle is not None
    return handle


def backend_connections(backend: TestServer) -> int:
    """How many TCP connections the fake backend has open right now."""
    assert backend.runner is not None
    assert backend.runner.server is not None
    return len(backend.runner.server.connections)


async def fetch(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """POST ``body``; answer the status, the Content-Type header and the exact body bytes."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.post(
            url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
        ) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


# --- bodies arrive exactly as the backend sent them -----------------------------------------

EMBED_INPUTS = [f"sentence number {i} for the embedding" for i in range(3000)]
#: A model the worker advertises but its runtime does not have (say, deleted since the worker
#: last listed its models): the runtime answers its own 404.
GHOST = "ghost:7b"
EXACT_CASES = [
    pytest.param("/v1/embeddings", {"model": MODEL, "input": "hello pool"}, id="openai-embed"),
    pytest.param("/v1/embeddings", {"model": MODEL, "input": EMBED_INPUTS}, id="large-embed"),
    pytest.param("/api/embed", {"model": MODEL, "input": ["a", "b", "c"]}, id="ollama-embed"),
    pytest.param("/v1/chat/completions", chat("hi", stream=False, model=GHOST), id="openai-404"),
    pytest.param("/v1/chat/completions", chat("hi", stream=True, model=GHOST), id="sse-404"),
    pytest.param("/api/chat", chat("hi", stream=False, model=GHOST), id="ollama-404"),
    pytest.param("/api/generate", {"model": GHOST, "prompt": "hi"}, id="ollama-generate-404"),
]


class StaleOllama(OllamaBackend):
    """An Ollama plugin whose model list still names a model the runtime no longer has."""

    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        return [*await super().list_models(http), GHOST]


@pytest.mark.parametrize(("path", "body"), EXACT_CASES)
async def test_whole_answers_arrive_byte_for_byte(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    path: str,
    body: dict[str, Any],
) -> None:
    """Status, Content-Type and body bytes through the pool equal the backend's own answer,
    error answers included."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, StaleOllama(BackendSettings(url=url_of(backend))))
    raw = orjson.dumps(body)

    direct = await fetch(url_of(backend) + path, raw)
    pooled = await fetch(pool_server.url + path, raw, pool_server.auth)

    assert direct == pooled
    assert [path, path] == [p for p in fake_log(backend.app).paths if p == path]


async def test_a_backend_answer_of_any_type_is_relayed_unchanged(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """An answer of an unusual content type is relayed with that type and body untouched."""
    # The same body answers every path, so it must also be the model list the worker reads.
    body = orjson.dumps({"models": [{"name": "odd-model"}]}) + b" \r\n\t"
    backend = await aiohttp_server(
        create_broken_app(status=200, body=body, content_type="application/vnd.odd+json")
    )
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))
    raw = orjson.dumps({"model": "odd-model", "prompt": "x", "stream": False})

    pooled = await fetch(pool_server.url + "/api/generate", raw, pool_server.auth)

    assert (200, "application/vnd.odd+json", body) == pooled


# --- streams stay streams -------------------------------------------------------------------


async def timed_lines(resp: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    """Every non-empty line of a streamed body with the loop time it arrived at."""
    loop = asyncio.get_running_loop()
    lines = []
    async for line in resp.content:
        if line.strip():
            lines.append((loop.time(), line))
    return lines


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/chat/completions", "text/event-stream"),
        ("/v1/completions", "text/event-stream"),
        ("/api/chat", "application/x-ndjson"),
        ("/api/generate", "application/x-ndjson"),
    ],
)
async def test_streams_are_relayed_chunk_by_chunk(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    path: str,
    content_type: str,
) -> None:
    """Each token reaches the client as the backend writes it, not when the stream ends."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))
    words = "one two three four five six seven eight nine"  # "echo:" + 9 words: 10 tokens
    if path.endswith(("/chat", "/chat/completions")):
        body = chat(words, stream=True)
    else:
        body = {"model": MODEL, "prompt": words, "stream": True}

    async with (
        aiohttp.ClientSession() as http,
        http.post(pool_server.url + path, json=body, headers=pool_server.auth) as resp,
    ):
        lines = await timed_lines(resp)

    assert (200, content_type) == (resp.status, resp.content_type)
    assert f"echo: {words}" == text_of(path, [line for _, line in lines])
    first_arrival, last_arrival = lines[0][0], lines[-1][0]
    # The backend spends at least 10 x DELAY between its first and last token; a relay that
    # buffered the answer would deliver every line at about the same time.
    assert last_arrival - first_arrival > 5 * DELAY


async def test_a_client_that_keeps_up_gets_its_chunks_straight_from_the_worker_socket(
    start_server: StartServer,
) -> None:
    """Past the first chunk, written by the request's handler with the headers, the chunks of a
    client that keeps up are written by the worker socket's reader the moment each arrives:
    nothing queues for the handler, which wakes again only for the end."""
    server = await start_server()
    register = Register(
        worker_id="raw", worker_key=WORKER_KEY, models=["m"], protocol=PROTOCOL_VERSION
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(encode(register))
        await wait_for(lambda: server.pool.get("raw") is not None, what="the worker")
        worker = server.pool.get("raw")
        assert worker is not None
        assert isinstance(worker.link, WorkerLink)
        link = worker.link
        posting = asyncio.ensure_future(
            http.post(
                server.url + "/v1/chat/completions",
                json=chat("hi", stream=True, model="m"),
                headers=server.auth,
            )
        )
        request = None
        while not isinstance(request, ProxyRequest):  # past the server's own messages
            request = decode((await ws.receive(timeout=5)).data)
        rid = request.request_id
        exchange = link.exchanges[rid]
        sse = {"Content-Type": "text/event-stream"}
        await ws.send_str(encode(ResponseHeaders(rid, 200, sse)))
        events = []
        async with await posting as resp:
            for n in (1, 2, 3):
                await ws.send_str(encode(ResponseChunk(rid, b"data: %d\n\n" % n)))
                events.append(await resp.content.readuntil(b"\n\n"))
                if n == 1:
                    await wait_for(lambda: exchange.sink is not None, what="the straight path")
            straight = (exchange.last_sunk > 0, exchange.pending)
            await ws.send_str(encode(ResponseEnd(rid)))
            rest = await resp.read()

    assert [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", b""] == [*events, rest]
    assert (True, False) == straight


def text_of(path: str, lines: list[bytes]) -> str:
    """The answer text spread over a stream's SSE events or NDJSON lines."""
    parts = []
    for line in lines:
        if path.startswith("/v1/"):
            assert line.startswith(b"data: ")
            payload = line.removeprefix(b"data: ").strip()
            if payload == b"[DONE]":
                continue
            choice = orjson.loads(payload)["choices"][0]
            parts.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
        else:
            data = orjson.loads(line)
            parts.append(data.get("message", {}).get("content") or data.get("response") or "")
    return "".join(parts)


# --- headers and connections ----------------------------------------------------------------


async def test_client_credentials_never_reach_the_backend(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The backend sees the worker's backend key, never the client's Authorization or Cookie;
    other request headers pass through."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], api_key="backend-key"))
    await start_worker(
        pool_server, "ollama", backend_url=url_of(backend), backend_api_key="backend-key"
    )
    headers = {
        **pool_server.auth,
        "Cookie": "session=client-secret",
        "Proxy-Authorization": "Basic client-secret",
        "X-Client-Trace": "trace-7",
    }

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            pool_server.url + "/api/chat", json=chat("hi", stream=False), headers=headers
        ) as resp,
    ):
        answer = await resp.json()

    sent = [r for r in fake_log(backend.app).requests if r.path == "/api/chat"]
    assert 1 == len(sent)
    seen = CIMultiDict(sent[0].headers)
    assert (200, "echo: hi") == (resp.status, answer["message"]["content"])
    assert "Bearer backend-key" == seen.get("Authorization")
    assert None is seen.get("Cookie")
    assert None is seen.get("Proxy-Authorization")
    assert "trace-7" == seen.get("X-Client-Trace")
    assert not any(API_KEY in v or "client-secret" in v for v in sent[0].headers.values())


async def test_the_worker_reuses_keep_alive_connections_to_its_backend(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """Thirty sequential requests reach the backend over one or two TCP connections."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))

    async with aiohttp.ClientSession() as http:
        for i in range(30):
            body = chat(f"request {i}", stream=i % 2 == 0)
            async with http.post(
                pool_server.url + "/v1/chat/completions", json=body, headers=pool_server.auth
            ) as resp:
                await resp.read()
                assert 200 == resp.status

    log = fake_log(backend.app)
    assert 30 == log.paths.count("/v1/chat/completions")
    assert len(log.peers) <= 2


# --- either side leaving --------------------------------------------------------------------


class RunnerPoolServer(PoolServer):
    """A server run like production (AppRunner: handlers are not cancelled on disconnect)."""

    def __init__(self, url: str, app: web.Application, cfg: ServeConfig) -> None:
        self._url, self._app, self.cfg = url, app, cfg

    @property
    def url(self) -> str:
        return self._url

    @property
    def pool(self) -> Pool:
        return self._app[POOL]


@contextlib.asynccontextmanager
async def production_server() -> AsyncIterator[PoolServer]:
    cfg = ServeConfig(host="127.0.0.1", port=0, api_keys=API_KEY, worker_keys=WORKER_KEY)
    app = create_app(cfg)
    async with serve_app(app) as url:
        yield RunnerPoolServer(url, app, cfg)


@pytest.mark.parametrize("runner", ["test-server", "app-runner"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat("word " * 60, stream=True)),
        ("/api/chat", chat("word " * 60, stream=True)),
    ],
    ids=["sse", "ndjson"],
)
async def test_a_client_leaving_mid_stream_stops_the_backend(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    start_worker: StartWorker,
    runner: str,
    path: str,
    body: dict[str, Any],
) -> None:
    """When the client drops a stream, the worker aborts its backend call and the slot frees.

    The backend would need 60 x DELAY = 12 s to finish; everything is torn down in far less.
    """
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    async with contextlib.AsyncExitStack() as stack:
        server = pool_server
        if runner == "app-runner":
            server = await stack.enter_async_context(production_server())
        agent = await start_worker(server, "ollama", backend_url=url_of(backend))
        handle = handle_of(server, agent)

        async with aiohttp.ClientSession() as http:
            resp = await http.post(server.url + path, json=body, headers=server.auth)
            first = await resp.content.readline()
            busy = (handle.inflight, len(agent.jobs), backend_connections(backend))
            resp.close()  # the client hangs up

        await wait_for(
            lambda: (0, 0, 0) == (handle.inflight, len(agent.jobs), backend_connections(backend)),
            timeout=4,
            what="the worker to abort its backend call",
        )

    assert b"echo:" in first
    assert (1, 1, 1) == busy


@pytest.mark.parametrize(
    ("path", "body", "error_line"),
    [
        ("/v1/chat/completions", chat("word " * 60, stream=True), b'data: {"error":'),
        ("/api/chat", chat("word " * 60, stream=True), b'{"error":'),
    ],
    ids=["sse", "ndjson"],
)
async def test_a_worker_leaving_mid_stream_ends_the_stream_with_an_error(
    aiohttp_server: AiohttpServer,
    pool_server: PoolServer,
    path: str,
    body: dict[str, Any],
    error_line: bytes,
) -> None:
    """If the worker disconnects mid-stream, the client gets an error event and the stream ends."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL], chunk_delay=DELAY))
    backend_cls = load_backend("ollama")
    cfg = WorkConfig(server_url=pool_server.ws_url, worker_key=WORKER_KEY)
    agent = Agent(cfg, backend_cls(BackendSettings(url=url_of(backend))), backend_name="ollama")
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.registered.wait(), timeout=10)
        await wait_for(lambda: pool_server.pool.get(cfg.worker_id) is not None, what="worker")

        async with (
            aiohttp.ClientSession() as http,
            http.post(pool_server.url + path, json=body, headers=pool_server.auth) as resp,
        ):
            first = await resp.content.readline()
            task.cancel()  # the worker process goes away
            rest = await asyncio.wait_for(resp.content.read(), timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    lines = [line for line in (first + rest).split(b"\n") if line.strip()]
    assert b"echo:" in first
    assert lines[-1].startswith(error_line)
    assert b"[DONE]" not in rest
    assert 0 == len(pool_server.pool)


# --- binary frames and Go peers ----------------------------------------------------------------


async def go_style_worker(ws_url: str, backend_url: str, models: list[str]) -> None:
    """A worker as the Go project writes it: JSON messages only, bodies in base64, no
    extensions; it replays each request against ``backend_url`` and relays the answer in
    1000-byte chunks."""
    register = Register(worker_id="go-worker", worker_key=WORKER_KEY, models=models)
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
        await ws.send_str(encode(register))
        async for msg in ws:
            request = decode(msg.data)
            if not isinstance(request, ProxyRequest):
                continue
            rid = request.request_id
            async with http.request(
                request.method,
                backend_url + request.path,
                data=request.body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                headers = {"Content-Type": resp.headers["Content-Type"]}
                await ws.send_str(encode(ResponseHeaders(rid, resp.status, headers)))
                async for chunk in resp.content.iter_chunked(1000):
                    await ws.send_str(encode(ResponseChunk(rid, chunk)))
            await ws.send_str(encode(ResponseEnd(rid)))


async def test_binary_frames_are_negotiated_and_bodies_are_the_same_either_way(
    aiohttp_server: AiohttpServer, start_server: StartServer, start_worker: StartWorker
) -> None:
    """A py worker gets binary frames, a Go-style worker JSON; both relay identical bytes."""
    backend = await aiohttp_server(create_fake_vllm_app(models=[MODEL]))
    py_server, go_server = await start_server(), await start_server()
    agent = await start_worker(py_server, "vllm", backend_url=url_of(backend))
    go_task = asyncio.create_task(go_style_worker(go_server.ws_url, url_of(backend), [MODEL]))
    try:
        await wait_for(lambda: go_server.pool.get("go-worker") is not None, what="Go worker")
        raw = orjson.dumps({"model": MODEL, "input": EMBED_INPUTS})
        direct = await fetch(url_of(backend) + "/v1/embeddings", raw)
        via_py = await fetch(py_server.url + "/v1/embeddings", raw, py_server.auth)
        via_go = await fetch(go_server.url + "/v1/embeddings", raw, go_server.auth)
        go_link = go_server.pool.get("go-worker")
        assert go_link is not None
        links = (handle_of(py_server, agent).link, go_link.link)
    finally:
        go_task.cancel()
        await asyncio.gather(go_task, return_exceptions=True)

    assert all(isinstance(link, WorkerLink) for link in links)
    assert [True, False] == [link.binary for link in links if isinstance(link, WorkerLink)]
    assert 200 == direct[0]
    assert len(direct[2]) > 100_000
    assert direct == via_py == via_go


async def test_with_binary_frames_a_small_body_rides_in_the_request_and_a_large_one_follows_raw(
    start_server: StartServer,
) -> None:
    """One frame for a request whose body is at most INLINE_BODY (the base64 of a few KiB
    costs less than a second frame and write); past it, the body follows as one binary frame,
    never base64. A py worker takes either; the bytes are the client's."""
    server = await start_server()
    small, large = (
        b'{"model": "m", "x": "' + b"s" * 100 + b'"}',
        orjson.dumps({"model": "m", "x": "l" * (INLINE_BODY + 1)}),
    )
    register = Register(
        worker_id="bin",
        worker_key=WORKER_KEY,
        models=["m"],
        protocol=PROTOCOL_VERSION,
        features=[FEATURE_BINARY_FRAMES],
    )
    seen: list[tuple[str, bytes]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(encode(register))
        await wait_for(lambda: server.pool.get("bin") is not None, what="the worker")

        async def work() -> None:
            waiting: dict[str, ProxyRequest] = {}
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    kind, rid, payload = unpack_frame(msg.data)
                    assert FRAME_REQUEST_BODY == kind
                    seen.append(("frame", bytes(payload)))
                elif isinstance(request := decode(msg.data), ProxyRequest):
                    if request.body_len:
                        waiting[request.request_id] = request
                        continue
                    rid = request.request_id
                    seen.append(("inline", request.body))
                else:
                    continue
                await ws.send_str(encode(ResponseHeaders(rid, 200, {})))
                await ws.send_str(encode(ResponseEnd(rid)))

        worker = asyncio.create_task(work())
        for body in (small, large):
            async with http.post(
                server.url + "/v1/chat/completions", data=body, headers=server.auth
            ) as resp:
                assert 200 == resp.status
        worker.cancel()

    assert [("inline", small), ("frame", large)] == seen
