"""The worker link under hostile input: raw WebSocket clients play buggy or malicious workers.

The register must come in time, within a size limit and with valid strings; a registered
worker's garbage is ignored and counted until there is too much of it; a worker can only
answer its own requests; and an oversized frame closes only that worker's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from structlog.testing import capture_logs

from llamapool.protocol import (
    FRAME_RESPONSE_CHUNK,
    Heartbeat,
    ModelsUpdate,
    ProxyRequest,
    Register,
    ResponseChunk,
    ResponseEnd,
    ResponseHeaders,
    WireError,
    decode,
    encode,
    pack_frame,
)
from llamapool.server import inbox
from llamapool.server import link as link_module
from llamapool.server.inbox import InboxWebSocket
from llamapool.server.link import MAX_INVALID, WorkerLink
from llamapool.server.pool import WorkerHandle
from llamapool.server.validate import MAX_REGISTER_BYTES

from .conftest import WORKER_KEY, PoolServer, StartServer, wait_for

Socket = aiohttp.ClientWebSocketResponse[bool]

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
HEARTBEAT = encode(Heartbeat(ts=1))
_IGNORED_TOTAL = re.compile(r"^llamapool_worker_messages_ignored_total (\S+)$", re.MULTILINE)


def register(worker_id: str = "raw-1", **fields: Any) -> str:
    """A Go-style register (no extensions): every message travels as JSON text."""
    settings: dict[str, Any] = {
        "worker_id": worker_id,
        "worker_name": worker_id,
        "worker_key": WORKER_KEY,
        "models": ["m"],
        "max_concurrency": 4,
    }
    settings.update(fields)
    return encode(Register(**settings))


@contextlib.asynccontextmanager
async def raw_worker(
    server: PoolServer, worker_id: str = "raw-1", **fields: Any
) -> AsyncIterator[Socket]:
    """A registered raw worker's socket; closed when the block ends."""
    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(register(worker_id, **fields))
        await wait_for(lambda: server.pool.get(worker_id) is not None, what=worker_id)
        yield ws


def handle(server: PoolServer, worker_id: str = "raw-1") -> WorkerHandle:
    worker = server.pool.get(worker_id)
    assert worker is not None
    return worker


def link(server: PoolServer, worker_id: str = "raw-1") -> WorkerLink:
    """The server's side of a worker's connection, which counts what it ignored."""
    worker_link = handle(server, worker_id).link
    assert isinstance(worker_link, WorkerLink)
    return worker_link


async def ignored_by(server: PoolServer, worker_id: str, count: int) -> None:
    """Wait until the server has counted ``count`` invalid messages from ``worker_id``."""
    await wait_for(
        lambda: link(server, worker_id).invalid == count,
        what=f"{count} invalid messages from {worker_id}",
    )


async def ignored_total(server: PoolServer) -> float:
    """llamapool_worker_messages_ignored_total as /metrics shows it."""
    async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as resp:
        match = _IGNORED_TOTAL.search(await resp.text())
    assert match is not None
    return float(match[1])


async def next_request(ws: Socket) -> ProxyRequest:
    msg = await ws.receive(timeout=5)
    assert WSMsgType.TEXT == msg.type, msg
    request = decode(msg.data)
    assert isinstance(request, ProxyRequest)
    return request


async def answer(ws: Socket, request_id: str, body: bytes, **headers: str) -> None:
    """Answer a request as a worker does: headers, one chunk, end."""
    await ws.send_str(encode(ResponseHeaders(request_id, 200, headers)))
    await ws.send_str(encode(ResponseChunk(request_id, body)))
    await ws.send_str(encode(ResponseEnd(request_id)))


async def post_chat(server: PoolServer) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + "/v1/chat/completions", json=CHAT, headers=server.auth) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def state_workers(server: PoolServer) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.url + "/api/v1/state", headers=server.auth) as resp,
    ):
        workers: list[dict[str, Any]] = (await resp.json())["workers"]
        return workers


async def closed_with(ws: Socket) -> tuple[int | None, str]:
    """Read until the server closes the socket; its close code and reason."""
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type == WSMsgType.CLOSE:
            return msg.data, str(msg.extra or "")
        if msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
            return ws.close_code, ""


# --- the register ---------------------------------------------------------------------------


async def test_no_register_in_time_is_closed_with_1008(start_server: StartServer) -> None:
    """A connection that sends nothing within register_timeout is closed with 1008."""
    server = await start_server(register_timeout=0.5)

    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        code, reason = await closed_with(ws)

    assert (1008, "no register message in time") == (code, reason)
    assert 0 == len(server.pool)


async def test_a_register_over_the_size_limit_is_closed_with_1008(
    pool_server: PoolServer,
) -> None:
    """A register message larger than MAX_REGISTER_BYTES is refused before it is parsed."""
    padded = orjson.loads(register())
    padded["padding"] = "x" * MAX_REGISTER_BYTES

    async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
        await ws.send_str(orjson.dumps(padded).decode())
        code, reason = await closed_with(ws)

    assert (1008, "register message too large") == (code, reason)
    assert 0 == len(pool_server.pool)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"worker_name": "evil\x1b[2J\r\nname"}, "worker_name"),
        ({"worker_name": "n" * 200}, "worker_name"),
        ({"worker_id": "bad id"}, "worker_id"),
        ({"worker_id": "w/" + "x" * 200}, "worker_id"),
        ({"worker_id": "<script>"}, "worker_id"),
        ({"models": ["has space"]}, "model ids"),
        ({"models": ["tab\tbed"]}, "model ids"),
        ({"models": ["m" * 300]}, "model ids"),
        ({"models": [f"m{i}" for i in range(6)]}, "too many models: 6 (at most 5)"),
        ({"version": "1.0\x00"}, "version"),
        ({"backend": "b" * 100}, "backend"),
        ({"paths": ["v1/relative"]}, "paths"),
        ({"max_concurrency": 1_000_000}, "max_concurrency"),
    ],
    ids=[
        "name-control-chars",
        "name-200-chars",
        "id-space",
        "id-too-long",
        "id-markup",
        "model-space",
        "model-tab",
        "model-too-long",
        "too-many-models",
        "version-nul",
        "backend-too-long",
        "relative-path",
        "huge-concurrency",
    ],
)
async def test_a_register_with_invalid_strings_is_closed_naming_the_problem(
    start_server: StartServer, fields: dict[str, Any], named: str
) -> None:
    """An invalid worker-supplied string closes the socket with 1008 and a reason naming the
    field; the worker never reaches the pool or the state API."""
    server = await start_server(max_models_per_worker=5)
    worker_id = fields.get("worker_id", "raw-1")

    async with aiohttp.ClientSession() as http, http.ws_connect(server.ws_url) as ws:
        await ws.send_str(register(**fields))
        code, reason = await closed_with(ws)

    assert 1008 == code
    assert named in reason
    assert WORKER_KEY not in reason
    assert None is server.pool.get(worker_id)
    assert [] == await state_workers(server)


# --- a registered worker's garbage ----------------------------------------------------------

#: Messages a registered worker may send that the server ignores and counts.
COUNTED: list[str | bytes] = [
    "not json",
    "[1, 2]",
    '{"type": 5}',
    '{"no_type": "heartbeat"}',
    '{"type": "heartbeat", "ts": "soon"}',
    '{"type": "http_proxy_response_chunk", "request_id": "r", "data": "not base64!"}',
    '{"type": "http_proxy_response_headers", "request_id": "r", "status": 200, "headers": [1]}',
    '{"type": "models_update", "models": "m"}',
    encode(ResponseHeaders("never-given", 200, {})),
    encode(ResponseChunk("never-given", b"stolen")),
    encode(ResponseEnd("never-given")),
    encode(ProxyRequest(request_id="x", method="GET", path="/v1/models")),  # a server message
    register("raw-1"),  # a second register
    pack_frame(FRAME_RESPONSE_CHUNK, "never-given", b"stolen"),
    b"\x02",  # a binary frame shorter than its header
    b"\x02\x09short",  # shorter than its request id
]


async def send(ws: Socket, frame: str | bytes) -> None:
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)


async def test_garbage_is_ignored_and_counted_and_the_worker_keeps_serving(
    pool_server: PoolServer,
) -> None:
    """Non-JSON, wrong types, missing types, responses for requests never given, server-side
    messages and broken binary frames are each ignored and counted; unknown types are
    ignored and counted apart (they never count towards a disconnect); the connection stays up
    and serves; the count reaches /metrics on disconnect."""
    async with raw_worker(pool_server) as ws:
        await ws.send_str('{"type": "from_a_future_version", "x": 1}')
        for frame in COUNTED:
            await send(ws, frame)
        await ws.send_str(HEARTBEAT)
        await ignored_by(pool_server, "raw-1", len(COUNTED))
        chat = asyncio.create_task(post_chat(pool_server))
        request = await next_request(ws)
        await answer(ws, request.request_id, b'{"ok": true}', **{"Content-Type": "text/plain"})
        status, _, body = await chat
        before = await ignored_total(pool_server)
    await wait_for(lambda: 0 == len(pool_server.pool), what="the worker to leave")

    assert (200, b'{"ok": true}') == (status, body)
    assert 0 == before
    assert len(COUNTED) + 1 == await ignored_total(pool_server)


async def test_a_workers_messages_are_handled_as_parsed_and_in_order_around_pings(
    pool_server: PoolServer,
) -> None:
    """With every aiohttp setup.cfg allows, a worker's data messages skip the receive queue (the
    relay's fast path); pings between them, which do take the queue, change nothing about their
    order."""
    async with raw_worker(pool_server) as ws:
        socket = link(pool_server).ws
        direct = isinstance(socket, InboxWebSocket) and socket.delivering
        chat = asyncio.create_task(post_chat(pool_server))
        request = await next_request(ws)
        await ws.ping()
        await ws.send_str(encode(ResponseHeaders(request.request_id, 200, {})))
        for part in (b"a", b"b", b"c", b"d"):
            await ws.ping()
            await ws.send_str(encode(ResponseChunk(request.request_id, part)))
        await ws.send_str(encode(ResponseEnd(request.request_id)))
        status, _, body = await chat

    assert (True, True) == (inbox.SUPPORTED, direct)
    assert (200, b"abcd") == (status, body)


async def test_repeated_garbage_gets_the_worker_disconnected(pool_server: PoolServer) -> None:
    """MAX_INVALID bad messages in a window are tolerated; the next one closes the socket
    with 4002, a code the worker does not take for a refused key."""
    async with raw_worker(pool_server) as ws:
        for _ in range(MAX_INVALID):
            await ws.send_str("garbage")
        await ws.send_str(HEARTBEAT)
        await ignored_by(pool_server, "raw-1", MAX_INVALID)
        still_there = pool_server.pool.get("raw-1") is not None
        await ws.send_str("one too many")
        code, reason = await closed_with(ws)
    await wait_for(lambda: 0 == len(pool_server.pool), what="the worker to leave")

    assert still_there
    assert (4002, "too many invalid messages") == (code, reason)
    assert MAX_INVALID + 1 == await ignored_total(pool_server)


async def test_invalid_messages_are_counted_per_window_not_for_life(
    pool_server: PoolServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the window has passed, the count starts again: a long-lived worker never adds
    up its rare mistakes to a disconnect."""
    monkeypatch.setattr(link_module, "INVALID_WINDOW", 0.3)
    async with raw_worker(pool_server) as ws:
        for _ in range(MAX_INVALID):
            await ws.send_str("garbage")
        await ignored_by(pool_server, "raw-1", MAX_INVALID)
        window_over = time.monotonic() + 0.4
        await wait_for(lambda: time.monotonic() > window_over, what="the window to pass")
        for _ in range(MAX_INVALID):
            await ws.send_str("garbage")
        await ws.send_str(HEARTBEAT)
        await ignored_by(pool_server, "raw-1", 2 * MAX_INVALID)

        assert not ws.closed
        assert 2 * MAX_INVALID == link(pool_server).invalid


async def test_messages_for_a_request_the_server_ended_are_late_not_invalid(
    pool_server: PoolServer,
) -> None:
    """A worker that keeps answering a request whose client left (it had not yet read the
    cancel) is never disconnected for it, however often that happens."""
    async with raw_worker(pool_server) as ws:
        for _ in range(3):
            chat = asyncio.create_task(post_chat(pool_server))
            request = await next_request(ws)
            chat.cancel()
            cancel = await ws.receive(timeout=5)
            rid = request.request_id
            await ws.send_str(encode(ResponseHeaders(rid, 200, {})))
            for _ in range(MAX_INVALID):
                await ws.send_str(encode(ResponseChunk(rid, b"too late")))
                await ws.send_bytes(pack_frame(FRAME_RESPONSE_CHUNK, rid, b"too late"))
            await ws.send_str(encode(ResponseEnd(rid)))
        await ws.send_str(HEARTBEAT)
        late = 3 * (2 * MAX_INVALID + 2)
        await wait_for(lambda: late == link(pool_server).late, what=f"{late} late messages")

        assert ("http_proxy_cancel", 0) == (decode(cancel.data).TYPE, link(pool_server).invalid)
        assert not ws.closed


async def test_a_worker_cannot_answer_another_workers_request(pool_server: PoolServer) -> None:
    """A second worker sending headers, chunks, a binary chunk and an end for the first
    worker's request is ignored; the client gets the first worker's answer only."""
    async with (
        raw_worker(pool_server, "honest", models=["m"]) as honest,
        raw_worker(pool_server, "thief", models=["other"]) as thief,
    ):
        chat = asyncio.create_task(post_chat(pool_server))
        request = await next_request(honest)
        rid = request.request_id
        await thief.send_str(encode(ResponseHeaders(rid, 418, {"Request-Id": "thief"})))
        await thief.send_str(encode(ResponseChunk(rid, b"from the thief")))
        await thief.send_bytes(pack_frame(FRAME_RESPONSE_CHUNK, rid, b"from the thief"))
        await thief.send_str(encode(ResponseEnd(rid, WireError("x", "thief ended it"))))
        await ignored_by(pool_server, "thief", 4)
        await answer(honest, rid, b'{"from": "honest"}', **{"Request-Id": "honest"})
        status, headers, body = await chat

    assert (200, "honest", b'{"from": "honest"}') == (status, headers["Request-Id"], body)


async def test_models_update_with_invalid_ids_is_ignored(start_server: StartServer) -> None:
    """A models_update with a malformed id or too many models changes nothing and is
    counted; a valid one that follows takes effect."""
    server = await start_server(max_models_per_worker=3)
    async with raw_worker(server, models=["m"]) as ws:
        for models in (["bad id"], ["ok", "x" * 300], ["a", "b", "c", "d"], ["m\x00"]):
            await ws.send_str(encode(ModelsUpdate(models)))
        await ws.send_str(encode(ModelsUpdate(["m2", "m2", "m3"])))
        await wait_for(lambda: handle(server).models == {"m2", "m3"}, what="the valid update")
        ignored = link(server).invalid
        async with (
            aiohttp.ClientSession() as http,
            http.get(server.url + "/v1/models", headers=server.auth) as resp,
        ):
            listed = sorted(m["id"] for m in (await resp.json())["data"])

    assert 4 == ignored
    assert ["m2", "m3"] == listed


async def test_an_oversized_frame_closes_only_that_worker(start_server: StartServer) -> None:
    """A frame above the maximum message size closes that connection (1009); the server
    keeps serving and other workers still join."""
    server = await start_server(max_body_size=1024)

    async with raw_worker(server, "big") as ws:
        await ws.send_str("x" * (2 * 1024 * 1024))
        code, _ = await closed_with(ws)
    await wait_for(lambda: server.pool.get("big") is None, what="the worker to leave")
    async with raw_worker(server, "after") as ws:
        chat = asyncio.create_task(post_chat(server))
        request = await next_request(ws)
        await answer(ws, request.request_id, b"still here")
        status, _, body = await chat

    assert 1009 == code
    assert (200, b"still here") == (status, body)


async def test_a_huge_error_message_from_a_worker_is_cut_in_the_state_api(
    pool_server: PoolServer,
) -> None:
    """A worker's error message reaches the state API cut to a bounded length."""
    async with raw_worker(pool_server) as ws:
        chat = asyncio.create_task(post_chat(pool_server))
        request = await next_request(ws)
        await ws.send_str(encode(ResponseHeaders(request.request_id, 500, {})))
        await ws.send_str(encode(ResponseEnd(request.request_id, WireError("e", "E" * 100_000))))
        status, _, _ = await chat
        (worker,) = await state_workers(pool_server)

    assert 500 == status
    assert 0 < len(worker["last_error"]) <= 200


async def test_a_flood_of_refused_worker_connections_logs_one_line_per_reason(
    pool_server: PoolServer,
) -> None:
    """Anyone can open worker sockets with a wrong key: fifty of them log one warning (and
    say how many more were held back in the next one), never fifty."""
    with capture_logs() as logs:
        for _ in range(50):
            async with aiohttp.ClientSession() as http, http.ws_connect(pool_server.ws_url) as ws:
                await ws.send_str(register("intruder", worker_key="wrong"))
                code, _ = await closed_with(ws)
                assert 1008 == code

    rejected = [e for e in logs if e["event"] == "worker_rejected"]
    assert [("bad_worker_key", 0)] == [(e["reason"], e["suppressed"]) for e in rejected]
