"""Header hygiene both ways: hop-by-hop headers never cross the pool, the client's credentials
never reach a backend (the worker adds the backend's own key), and a worker's response headers
are checked and bounded before they reach a client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer

from llamapool import headers as headers_module
from llamapool.config import WorkConfig
from llamapool.headers import allowed_response_headers
from llamapool.plugin_api import BackendSettings
from llamapool.protocol import (
    Message,
    ProxyRequest,
    Register,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    decode,
    encode,
)
from llamapool.server.validate import MAX_HEADER_VALUE, MAX_HEADERS
from llamapool.testing import create_fake_ollama_app, fake_log
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .conftest import API_KEY, WORKER_KEY, PoolServer, StartWorker, url_of, wait_for

MODEL = "llama3:8b"
BACKEND_KEY = "backend-key-77"
MARKER = "hop-marker"
#: Hop-by-hop headers (RFC 9110 section 7.6.1) and the de-facto Proxy-Connection; so are the
#: headers ``Connection`` names (here ``X-hop-marker``).
HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Transfer-Encoding",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "Proxy-Connection",
)
#: What a client sends that must stay on its side of the server (the body goes chunked, so
#: Transfer-Encoding: chunked is sent too).
CLIENT_HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "Cookie": f"session={MARKER}",
    "Connection": f"keep-alive, X-{MARKER}",
    f"X-{MARKER}": "named by Connection, so hop-by-hop",
    "Keep-Alive": f"timeout=5, {MARKER}",
    "TE": "trailers",
    "Trailer": f"X-{MARKER}",
    "Upgrade": f"{MARKER}/1",
    "Proxy-Authorization": f"Basic {MARKER}",
    "Proxy-Connection": MARKER,
    "X-Client-Kept": "kept",
}
#: What a backend answers that must stay on the worker's side.
BACKEND_HEADERS = {
    # An allowed name, but named by Connection: hop-by-hop all the same.
    "Connection": f"keep-alive, X-RateLimit-{MARKER}",
    f"X-RateLimit-{MARKER}": "named by Connection, so hop-by-hop",
    "Keep-Alive": f"timeout=99, {MARKER}",
    "TE": MARKER,
    "Trailer": f"X-{MARKER}",
    "Upgrade": f"{MARKER}/1",
    "Proxy-Authenticate": f'Basic realm="{MARKER}"',
    "Proxy-Connection": MARKER,
    "X-RateLimit-Backend-Kept": "kept",
}


def chat_body(model: str = MODEL) -> bytes:
    return orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    )


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """The body as an async generator, so the client sends it with Transfer-Encoding: chunked."""
    yield body[:10]
    yield body[10:]


def hop_by_hop_in(
    headers: CIMultiDict[str] | dict[str, str], *, own: tuple[str, ...] = ()
) -> list[str]:
    """The hop-by-hop headers present, except ``own`` (which the last hop may set itself, as
    the server does ``Transfer-Encoding: chunked``), and any header carrying the marker."""
    headers = CIMultiDict(headers)
    marked = [f"{k}: {v}" for k, v in headers.items() if MARKER in v.lower() or MARKER in k.lower()]
    return [name for name in HOP_BY_HOP if name in headers and name not in own] + marked


#: Hop-by-hop headers the server sets on its own connection to a client.
SERVER_OWN = ("Connection", "Transfer-Encoding")


def with_hop_headers(app: web.Application) -> web.Application:
    """``app`` answering every request with :data:`BACKEND_HEADERS` too."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(BACKEND_HEADERS)

    app.on_response_prepare.append(add)
    return app


async def post(
    url: str, body: bytes | AsyncIterator[bytes], headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


# --- through the whole pool -----------------------------------------------------------------


async def test_hop_by_hop_headers_and_client_credentials_stay_on_their_side(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The backend sees neither the client's hop-by-hop headers nor its Authorization and
    Cookie, but the worker's backend key; the client sees none of the backend's hop-by-hop
    headers; other headers cross both ways."""
    backend = await aiohttp_server(
        with_hop_headers(create_fake_ollama_app(models=[MODEL], api_key=BACKEND_KEY))
    )
    await start_worker(
        pool_server, "ollama", backend_url=url_of(backend), backend_api_key=BACKEND_KEY
    )
    headers = {**CLIENT_HEADERS, "Content-Type": "application/json"}

    status, answer_headers, body = await post(
        pool_server.url + "/api/chat", chunked(chat_body()), headers
    )

    (seen,) = [r for r in fake_log(backend.app).requests if r.path == "/api/chat"]
    backend_saw = CIMultiDict(seen.headers)
    assert (200, "echo: hi") == (status, orjson.loads(body)["message"]["content"])
    assert [] == hop_by_hop_in(backend_saw)
    assert (f"Bearer {BACKEND_KEY}", None) == (
        backend_saw.get("Authorization"),
        seen.headers.get("Cookie"),
    )
    assert not any(API_KEY in v for v in seen.headers.values())
    assert "kept" == backend_saw.get("X-Client-Kept")
    assert [] == hop_by_hop_in(answer_headers, own=SERVER_OWN)
    assert "kept" == answer_headers.get("X-RateLimit-Backend-Kept")


async def test_the_server_strips_client_headers_before_the_wire(pool_server: PoolServer) -> None:
    """A worker is never sent the client's hop-by-hop headers, Authorization or Cookie."""
    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(encode(Register(worker_id="raw", worker_key=WORKER_KEY, models=[MODEL])))
        await wait_for(lambda: pool_server.pool.get("raw") is not None, what="the raw worker")
        headers = {**CLIENT_HEADERS, "Content-Type": "application/json"}
        chat = asyncio.create_task(
            post(pool_server.url + "/api/chat", chunked(chat_body()), headers)
        )
        request = decode((await ws.receive(timeout=5)).data)
        assert isinstance(request, ProxyRequest)
        await ws.send_str(encode(ResponseHeaders(request.request_id, 200, {})))
        await ws.send_str(encode(ResponseEnd(request.request_id)))
        await chat

    wire = CIMultiDict(request.headers)
    assert [] == hop_by_hop_in(wire)
    assert (None, None) == (wire.get("Authorization"), wire.get("Cookie"))
    assert "kept" == wire.get("X-Client-Kept")


async def test_a_header_that_is_not_utf8_reaches_the_backend_with_replacement_characters(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """HTTP allows any bytes in a header value; the wire's JSON carries only UTF-8. The bytes
    that are not UTF-8 arrive as U+FFFD, as through the Go server, and the request is served:
    no 500, nothing charged to the worker."""
    backend = await aiohttp_server(create_fake_ollama_app(models=[MODEL]))
    await start_worker(pool_server, "ollama", backend_url=url_of(backend))
    body = chat_body()
    head = (
        b"POST /api/chat HTTP/1.1\r\nHost: pool\r\nConnection: close\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        b"X-Bytes: caf\xc3\xa9 \xff\xfe end\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(pool_server.server.host, pool_server.server.port)
    writer.write(head + body)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    (seen,) = [r for r in fake_log(backend.app).requests if r.path == "/api/chat"]
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert "café \ufffd\ufffd end" == CIMultiDict(seen.headers)["X-Bytes"]


def test_forwarded_header_values_are_always_utf8() -> None:
    """Bytes aiohttp kept as surrogates become U+FFFD, both ways (a backend's answer is read
    the same way); valid text, ASCII or not, passes as it is."""
    escaped = b"\xff ok \xc3\xa9".decode("utf-8", "surrogateescape")

    kept = headers_module.forwardable(
        [("X-A", escaped), ("X-B", "café"), ("X-C", "plain")], frozenset()
    )

    assert {"X-A": "\ufffd ok é", "X-B": "café", "X-C": "plain"} == kept
    assert encode(ResponseHeaders("r", 200, kept))  # the wire takes them


# --- the worker on its own (as behind a Go server, which forwards more) ---------------------


@contextlib.asynccontextmanager
async def go_style_server(
    aiohttp_server: AiohttpServer, request: ProxyRequest
) -> AsyncIterator[tuple[str, list[Message], asyncio.Event]]:
    """A one-socket server that sends ``request`` to the worker that registers and records
    what comes back; yields its WebSocket URL, the messages and an event set at the end."""
    received: list[Message] = []
    ended = asyncio.Event()

    async def socket(http_request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(http_request)
        await ws.receive()  # the register
        await ws.send_str(encode(request))
        async for msg in ws:
            message = decode(msg.data)
            if isinstance(message, (ResponseHeaders, ResponseChunk, ResponseEnd)):
                received.append(message)
            if isinstance(message, ResponseEnd):
                ended.set()
        return ws

    app = web.Application()
    app.router.add_get("/workers/connect", socket)
    server = await aiohttp_server(app)
    yield url_of(server).replace("http", "ws", 1) + "/workers/connect", received, ended


async def test_the_worker_strips_what_a_server_forwards_and_what_a_backend_answers(
    aiohttp_server: AiohttpServer,
) -> None:
    """Given a request carrying the client's credentials and hop-by-hop headers (as a Go
    server may send them), the worker passes on neither, adds the backend key, and drops the
    backend's hop-by-hop response headers."""
    backend = await aiohttp_server(
        with_hop_headers(create_fake_ollama_app(models=[MODEL], api_key=BACKEND_KEY))
    )
    dirty = ProxyRequest(
        request_id="r1",
        method="POST",
        path="/api/chat",
        headers={**CLIENT_HEADERS, "Transfer-Encoding": "chunked", "Host": MARKER},
        body=chat_body(),
    )
    async with go_style_server(aiohttp_server, dirty) as (url, received, ended):
        cls = load_backend("ollama")
        cfg = WorkConfig(server_url=url, worker_key=WORKER_KEY)
        agent = Agent(cfg, cls(BackendSettings(url=url_of(backend), api_key=BACKEND_KEY)))
        task = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(ended.wait(), timeout=10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    (seen,) = [r for r in fake_log(backend.app).requests if r.path == "/api/chat"]
    backend_saw = CIMultiDict(seen.headers)
    first = received[0]
    assert isinstance(first, ResponseHeaders)
    assert 200 == first.status
    assert [] == hop_by_hop_in(backend_saw)
    assert f"Bearer {BACKEND_KEY}" == backend_saw.get("Authorization")
    assert None is backend_saw.get("Cookie")
    assert "kept" == backend_saw.get("X-Client-Kept")
    assert [] == hop_by_hop_in(first.headers)
    assert "kept" == CIMultiDict(first.headers).get("X-RateLimit-Backend-Kept")


# --- response headers from a worker ---------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_worker(server: PoolServer) -> AsyncIterator[aiohttp.ClientWebSocketResponse[bool]]:
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(encode(Register(worker_id="raw", worker_key=WORKER_KEY, models=[MODEL])))
        await wait_for(lambda: server.pool.get("raw") is not None, what="the raw worker")
        yield ws


async def answered_with(
    server: PoolServer, status: int, headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], bytes]:
    """What a client gets when a raw worker answers with ``status`` and ``headers``."""
    async with raw_worker(server) as ws:
        chat = asyncio.create_task(
            post(server.url + "/v1/chat/completions", chat_body(), server.auth)
        )
        msg = await ws.receive(timeout=5)
        assert WSMsgType.TEXT == msg.type
        request = decode(msg.data)
        assert isinstance(request, ProxyRequest)
        await ws.send_str(encode(ResponseHeaders(request.request_id, status, headers)))
        await ws.send_str(encode(ResponseChunk(request.request_id, b'{"ok": true}')))
        await ws.send_str(encode(ResponseEnd(request.request_id)))
        return await chat


async def test_a_workers_hop_by_hop_headers_never_reach_the_client(
    pool_server: PoolServer,
) -> None:
    """Hop-by-hop headers in a worker's response headers are dropped; the others pass."""
    headers = {**BACKEND_HEADERS, "Transfer-Encoding": MARKER, "Content-Type": "application/json"}

    status, got, body = await answered_with(pool_server, 200, headers)

    assert (200, b'{"ok": true}') == (status, body)
    assert [] == hop_by_hop_in(got, own=SERVER_OWN)
    assert "kept" == got.get("X-RateLimit-Backend-Kept")


async def test_a_workers_response_headers_are_checked_and_bounded(
    pool_server: PoolServer,
) -> None:
    """Headers with CR, LF or NUL in their value, oversized values or malformed names are
    dropped, and at most MAX_HEADERS are kept; the response itself is served."""
    bad: dict[str, Any] = {
        "X-Inject": "a\r\nSet-Cookie: evil=1",
        "X-Lf": "a\nb",
        "X-Nul": "a\x00b",
        "X-Big": "b" * (MAX_HEADER_VALUE + 1),
        "Bad Name": "x",
        "X-Bad:Name": "x",
        "": "empty name",
    }
    many = {f"X-RateLimit-H-{i:03}": str(i) for i in range(MAX_HEADERS + 36)}

    status, got, body = await answered_with(pool_server, 200, {**bad, **many})

    kept = [name for name in got if name.startswith("X-RateLimit-H-")]
    assert (200, b'{"ok": true}') == (status, body)
    assert [f"X-RateLimit-H-{i:03}" for i in range(MAX_HEADERS)] == kept
    assert [] == [name for name in bad if name in got]
    assert None is got.get("Set-Cookie")


def test_header_verdicts_are_remembered_within_bounds() -> None:
    """A name's verdict is remembered, so a response is judged in one pass; a worker sending
    ever new or huge names fills no more than the bound, never with a huge name, and every
    name is still judged right once the memory is full."""
    verdicts = headers_module._allowed
    huge = "X-RateLimit-" + "a" * 100_000
    for i in range(verdicts.entries + 100):
        allowed_response_headers({f"X-Name-{i}": "v", huge: "v"})

    assert len(verdicts.memo) <= verdicts.entries
    assert [] == [name for name in verdicts.memo if len(name) > verdicts.key_length]
    assert {huge: "v", "Retry-After": "1"} == allowed_response_headers(
        {huge: "v", "X-Name-new": "v", "Retry-After": "1", "Set-Cookie": "c=1"}
    )


@pytest.mark.parametrize("status", [0, -1, 99, 100, 101, 199, 301, 302, 307, 308, 600, 999])
async def test_an_invalid_status_from_a_worker_is_a_502(
    pool_server: PoolServer, status: int
) -> None:
    """A status outside 200-599, or a redirect, from a worker answers 502 JSON in the API's
    error shape: the pool's origin never redirects a client where a worker says."""
    got_status, got, body = await answered_with(pool_server, status, {})

    error = orjson.loads(body)["error"]
    assert (502, "application/json") == (got_status, got.get("Content-Type"))
    assert ("worker_error", f"the worker sent an invalid status {status}") == (
        error["code"],
        error["message"],
    )


#: What a hostile worker might answer to act on the pool's origin in a browser.
HOSTILE = {
    "Set-Cookie": "session=stolen; Path=/",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Credentials": "true",
    "Location": "https://evil.example/",
    "Refresh": "0; url=https://evil.example/",
    "X-Frame-Options": "ALLOWALL",
    "Content-Security-Policy": "default-src *",
    "Strict-Transport-Security": "max-age=0",
    "Clear-Site-Data": '"*"',
    "Link": "<https://evil.example/x.js>; rel=preload",
    "WWW-Authenticate": 'Basic realm="pool"',
    "X-Request-Id": "forged-by-the-worker",
    "Content-Encoding": "gzip",
}
#: What an LLM API response needs, under the names runtimes give it.
NEEDED = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Retry-After": "3",
    "X-RateLimit-Remaining-Requests": "59",
    "X-RateLimit-Reset-Tokens": "6ms",
    "Anthropic-RateLimit-Requests-Remaining": "9",
    "OpenAI-Processing-Ms": "42",
    "Request-Id": "req_anthropic_1",
    "X-Vllm-Request-Id": "cmpl-1",
}


async def test_only_allow_listed_worker_headers_reach_the_client(
    pool_server: PoolServer,
) -> None:
    """Nothing a worker sends can set a cookie, redirect, or change how a browser treats the
    pool's origin; the headers an API response needs pass under their own names; the pool's
    X-Request-Id wins over the worker's."""
    status, got, body = await answered_with(pool_server, 200, {**HOSTILE, **NEEDED})

    assert (200, b'{"ok": true}') == (status, body)
    assert [] == [name for name in HOSTILE if name != "X-Request-Id" and name in got]
    assert NEEDED == {name: got[name] for name in NEEDED if name in got}
    assert "forged-by-the-worker" != got["X-Request-Id"]
