"""The floor: the least a relay of llamapool's wire protocol costs on llamapool's fixed stack.

``bench_relay.py --floor`` runs this beside the real servers, as a column of its own. It is
CPython, aiohttp and uvloop doing only what relaying needs: one aiohttp application with the
worker WebSocket and one model route, messages taken as they are parsed (``server/inbox.py``),
a chunk written straight to its client's socket. It has none of llamapool's own work: no keys,
limits, queue, retries, timeouts, flow control, usage accounting, logs, metrics or state, and
it trusts every peer. What llamapool costs above this column is llamapool's; what this column
costs above Go's is the stack's.

Never a server to run: it checks nothing. It listens on loopback only.

Run as a script: ``_floor_server.py PORT``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import sys
from typing import Any

import orjson
from aiohttp import WSMessage, WSMsgType, web

from llamapool.eventloop import run
from llamapool.protocol import FRAME_RESPONSE_CHUNK, unpack_frame
from llamapool.server.inbox import InboxWebSocket

#: Hop-by-hop and recomputed headers a worker's answer must not carry to the client.
_DROP = frozenset(("content-length", "transfer-encoding", "connection"))


class Answer:
    """One request on a worker: the handler's future, and its client's socket once streaming."""

    __slots__ = ("body", "done", "headers", "stream", "transport", "writer")

    def __init__(self, stream: bool) -> None:
        loop = asyncio.get_running_loop()
        self.stream = stream
        self.headers: asyncio.Future[tuple[int, dict[str, str]]] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.body: list[bytes] = []
        self.transport: Any = None
        self.writer: Any = None

    def chunk(self, data: bytes) -> None:
        if self.transport is None:
            self.body.append(data)
            return
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Worker:
    def __init__(self, ws: InboxWebSocket) -> None:
        self.ws = ws
        self.answers: dict[str, Answer] = {}
        self.ids = itertools.count(1)

    def on_message(self, msg: WSMessage) -> None:
        if msg.type == WSMsgType.BINARY:
            kind, request_id, payload = unpack_frame(msg.data)
            answer = self.answers.get(request_id)
            if kind == FRAME_RESPONSE_CHUNK and answer is not None:
                answer.chunk(bytes(payload))
            return
        message = orjson.loads(msg.data)
        answer = self.answers.get(message.get("request_id", ""))
        if answer is None:
            return
        kind = message["type"]
        if kind == "http_proxy_response_chunk":
            answer.chunk(base64.b64decode(message["data"]))
        elif kind == "http_proxy_response_headers":
            answer.headers.set_result((message["status"], message.get("headers") or {}))
        elif kind == "http_proxy_response_end":
            answer.end()


class Workers:
    """The connected workers, taken in turn."""

    def __init__(self) -> None:
        self.connected: list[Worker] = []
        self.turn = 0

    def next(self) -> Worker:
        self.turn += 1
        return self.connected[self.turn % len(self.connected)]


WORKERS = web.AppKey("workers", Workers)


async def worker_socket(request: web.Request) -> web.WebSocketResponse:
    ws = InboxWebSocket(max_msg_size=0)
    await ws.prepare(request)
    register = orjson.loads((await ws.receive()).data)
    if "binary_frames" in register.get("features", []):
        reply = {"type": "registered", "features": ["binary_frames"], "version": "floor"}
        await ws.send_str(orjson.dumps(reply).decode())
    worker = Worker(ws)
    ws.deliver_to(worker.on_message)
    workers = request.app[WORKERS].connected
    workers.append(worker)
    try:
        async for _ in ws:  # close, ping; data messages went to the worker
            pass
    finally:
        workers.remove(worker)
    return ws


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    stream = b'"stream":true' in body or b'"stream": true' in body
    worker = request.app[WORKERS].next()
    request_id = str(next(worker.ids))
    answer = worker.answers[request_id] = Answer(stream)
    message = {
        "type": "http_proxy_request",
        "request_id": request_id,
        "method": request.method,
        "path": request.path,
        "headers": {},
        "body": base64.b64encode(body).decode(),
        "stream": stream,
    }
    try:
        await worker.ws.send_str(orjson.dumps(message).decode())
        status, headers = await answer.headers
        headers = {k: v for k, v in headers.items() if k.lower() not in _DROP}
        if not stream:
            await answer.done
            return web.Response(status=status, headers=headers, body=b"".join(answer.body))
        response = web.StreamResponse(status=status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        if answer.body:
            await response.write(b"".join(answer.body))
        answer.transport = request.transport
        await answer.done
        await response.write_eof()
        return response
    finally:
        del worker.answers[request_id]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"workers": len(request.app[WORKERS].connected)})


async def serve(port: int) -> None:
    """Serve until killed."""
    app = web.Application()
    app[WORKERS] = Workers()
    app.router.add_get("/workers/connect", worker_socket)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main(port: int) -> None:
    run(serve(port))


if __name__ == "__main__":
    main(int(sys.argv[1]))
