"""Simulated workers for ``bench_relay.py``, run as a script in a process of their own.

W WebSocket connections register with the server under test and answer every
``http_proxy_request`` the way a worker relaying a model would: headers, then one chunk every
``1/rate`` seconds, then an end. They speak wire protocol v1 as a Go worker does (JSON text
frames, chunk bytes in base64), or, with ``--protocol binary``, register as a llamapool-py
worker with the ``binary_frames`` feature and send each chunk as one binary frame. They do not
ask for ``flow_control``, so no credit messages are involved.

Each chunk is one SSE event carrying its stream's id, its sequence number and
``time.monotonic()`` taken just before the send, padded to ``--chunk-bytes``:
``CLOCK_MONOTONIC`` is one clock for every process of the machine, so the client reading the
event knows how long the relay took. A stream runs until it is told to end: ``end_all`` on
standard input ends every stream (a done event with the count, ``data: [DONE]``, then the end
message), ``burst <t>`` ends the streams whose request asked for ``"burst": true`` at monotonic
time ``t`` plus up to 50 ms. A streamed request that sets ``"max_tokens": K`` is a finite
stream instead: its K events leave back to back, as fast as the socket takes them, then the
done event (``bench_cluster.py``). A request with ``"stream": false`` is answered at once, in
one chunk. With ``--direct``, the same immediate answer is also served over plain HTTP, for the
direct baseline of the time to first byte.

Standard output: ``ready`` once every worker has registered (``direct <url>`` before it), and
a JSON line of counters when standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import heapq
import itertools
import json
import math
import random
import secrets
import sys
import time
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import WSMsgType, web

from llamapool.protocol import FRAME_REQUEST_BODY, FRAME_RESPONSE_CHUNK, pack_frame, unpack_frame

MODEL = "bench"
HEARTBEAT = 5.0
#: The sender wakes at most this often; a chunk leaves at most this late (its timestamp is
#: taken at the send, so lateness never counts as relay delay).
TICK = 0.002
BURST_SPREAD = 0.05
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
JSON_HEADERS = {"Content-Type": "application/json"}


@attrs.define(eq=False)
class Stream:
    request_id: str
    sid: str
    link: Link
    burst: bool
    end_at: float = math.inf
    seq: int = 0
    done: bool = False


@attrs.define(eq=False)
class Link:
    """One worker's WebSocket and how it encodes what it sends."""

    ws: aiohttp.ClientWebSocketResponse[bool]
    binary: bool
    #: ``http_proxy_request`` messages waiting for their binary body frame.
    pending: dict[str, dict[str, Any]] = attrs.Factory(dict)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(message).decode())

    async def send_chunk(self, request_id: str, data: bytes) -> None:
        if self.binary:
            await self.ws.send_bytes(pack_frame(FRAME_RESPONSE_CHUNK, request_id, data))
        else:
            b64 = base64.b64encode(data).decode()
            await self.send_json(
                {"type": "http_proxy_response_chunk", "request_id": request_id, "data": b64}
            )

    async def send_end(self, request_id: str) -> None:
        await self.send_json({"type": "http_proxy_response_end", "request_id": request_id})


@attrs.define
class Workers:
    """Every simulated worker of this process and the streams they are sending."""

    rate: float
    chunk_bytes: int
    #: By link and request id: request ids are unique per worker connection only.
    streams: dict[tuple[Link, str], Stream] = attrs.Factory(dict)
    heap: list[tuple[float, int, Stream]] = attrs.Factory(list)
    order: itertools.count[int] = attrs.Factory(itertools.count)
    counters: dict[str, float] = attrs.Factory(
        lambda: dict.fromkeys(("requests", "chunks", "cancelled", "max_late_s"), 0)
    )

    def event(self, stream: Stream) -> bytes:
        head = b'data: {"id":"%s","seq":%d,"t":%.6f,"p":"' % (
            stream.sid.encode(),
            stream.seq,
            time.monotonic(),
        )
        pad = max(0, self.chunk_bytes - len(head) - 4)
        return head + b"x" * pad + b'"}\n\n'

    async def on_request(self, link: Link, message: dict[str, Any], body: bytes) -> None:
        self.counters["requests"] += 1
        request_id = message["request_id"]
        try:
            ask = orjson.loads(body)
        except orjson.JSONDecodeError:
            ask = {}
        sid = str(ask.get("user", ""))
        if not message.get("stream"):
            answer = orjson.dumps({"id": sid, "object": "chat.completion", "choices": []})
            await link.send_json(
                {
                    "type": "http_proxy_response_headers",
                    "request_id": request_id,
                    "status": 200,
                    "headers": JSON_HEADERS,
                }
            )
            await link.send_chunk(request_id, answer)
            await link.send_end(request_id)
            return
        stream = Stream(request_id, sid, link, burst=bool(ask.get("burst")))
        self.streams[link, request_id] = stream
        await link.send_json(
            {
                "type": "http_proxy_response_headers",
                "request_id": request_id,
                "status": 200,
                "headers": SSE_HEADERS,
            }
        )
        tokens = ask.get("max_tokens")
        if isinstance(tokens, int):
            await self.send_all(stream, tokens)
            return
        # Streams start at random phases, as real ones do.
        due = time.monotonic() + random.uniform(0, 1 / self.rate)
        heapq.heappush(self.heap, (due, next(self.order), stream))

    def on_cancel(self, link: Link, request_id: str) -> None:
        stream = self.streams.pop((link, request_id), None)
        if stream is not None:
            stream.done = True
            self.counters["cancelled"] += 1

    def end_all(self, at: float, *, burst_only: bool = False) -> None:
        for stream in self.streams.values():
            if stream.burst or not burst_only:
                stream.end_at = at + (random.uniform(0, BURST_SPREAD) if burst_only else 0)

    async def send_due(self) -> None:
        """The one sender: every tick, each stream whose next chunk is due sends it."""
        interval = 1 / self.rate
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                due, _, stream = heapq.heappop(self.heap)
                if stream.done:
                    continue
                self.counters["max_late_s"] = max(self.counters["max_late_s"], now - due)
                try:
                    if due >= stream.end_at:
                        await self.finish(stream)
                        continue
                    await stream.link.send_chunk(stream.request_id, self.event(stream))
                except (ConnectionError, RuntimeError):  # the socket closed under us
                    stream.done = True
                    continue
                stream.seq += 1
                self.counters["chunks"] += 1
                heapq.heappush(self.heap, (due + interval, next(self.order), stream))

    async def send_all(self, stream: Stream, count: int) -> None:
        """A finite stream: ``count`` events back to back, then the done event and the end."""
        try:
            for _ in range(count):
                await stream.link.send_chunk(stream.request_id, self.event(stream))
                stream.seq += 1
            self.counters["chunks"] += count
            await self.finish(stream)
        except (ConnectionError, RuntimeError):  # the socket closed under us
            stream.done = True
            self.streams.pop((stream.link, stream.request_id), None)

    async def finish(self, stream: Stream) -> None:
        stream.done = True
        del self.streams[stream.link, stream.request_id]
        tail = b'data: {"id":"%s","chunks":%d}\n\ndata: [DONE]\n\n' % (
            stream.sid.encode(),
            stream.seq,
        )
        await stream.link.send_chunk(stream.request_id, tail)
        await stream.link.send_end(stream.request_id)


async def run_worker(
    session: aiohttp.ClientSession,
    workers: Workers,
    args: argparse.Namespace,
    index: int,
    registered: asyncio.Event,
) -> None:
    binary = args.protocol == "binary"
    ws = await session.ws_connect(args.url, max_msg_size=0, autoping=True, heartbeat=None)
    register: dict[str, Any] = {
        "type": "register",
        "worker_id": f"bench-{index}-{secrets.token_hex(4)}",
        "worker_name": f"bench-{index}",
        "worker_key": args.key,
        "models": [MODEL],
        "max_concurrency": args.max_concurrency,
    }
    if binary:
        register |= {"protocol": 1, "features": ["binary_frames"], "version": "bench"}
    await ws.send_str(json.dumps(register))
    link = Link(ws, binary=False)
    if not binary:
        registered.set()
    beat = asyncio.create_task(heartbeat(link))
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                kind, request_id, payload = unpack_frame(msg.data)
                message = link.pending.pop(request_id, None)
                if kind == FRAME_REQUEST_BODY and message is not None:
                    await workers.on_request(link, message, bytes(payload))
                continue
            if msg.type != WSMsgType.TEXT:
                break
            message = orjson.loads(msg.data)
            kind = message.get("type")
            if kind == "http_proxy_request":
                if message.get("body_len"):
                    link.pending[message["request_id"]] = message
                else:
                    body = base64.b64decode(message.get("body") or "")
                    await workers.on_request(link, message, body)
            elif kind == "http_proxy_cancel":
                workers.on_cancel(link, message["request_id"])
            elif kind == "registered":
                link.binary = "binary_frames" in message.get("features", [])
                registered.set()
    finally:
        beat.cancel()
        await ws.close()


async def heartbeat(link: Link) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT)
        await link.send_json({"type": "heartbeat", "ts": int(time.time())})


async def direct_backend(workers: Workers) -> web.AppRunner:
    """The same immediate answer over plain HTTP: what the pool's first byte is compared to."""

    async def answer(request: web.Request) -> web.Response:
        ask = orjson.loads(await request.read())
        workers.counters["requests"] += 1
        body = orjson.dumps({"id": str(ask.get("user", "")), "object": "chat.completion"})
        return web.Response(body=body, headers=JSON_HEADERS)

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", answer)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"direct http://127.0.0.1:{port}", flush=True)
    return runner


async def commands(workers: Workers) -> None:
    """Read standard input until it closes: ``end_all``, ``burst <t>``."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        word, _, rest = line.decode().strip().partition(" ")
        if word == "end_all":
            workers.end_all(time.monotonic())
        elif word == "burst":
            workers.end_all(float(rest), burst_only=True)


async def main(args: argparse.Namespace) -> None:
    workers = Workers(rate=args.rate, chunk_bytes=args.chunk_bytes)
    runner = await direct_backend(workers) if args.direct else None
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        gate = asyncio.Semaphore(args.connect_parallel)

        async def start(index: int) -> asyncio.Task[None]:
            async with gate:
                registered = asyncio.Event()
                task = asyncio.create_task(run_worker(session, workers, args, index, registered))
                waiter = asyncio.create_task(registered.wait())
                await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if task.done():
                    task.result()  # raise why it could not connect
                return task

        tasks = await asyncio.gather(*(start(i) for i in range(args.workers)))
        print("ready", flush=True)
        sender = asyncio.create_task(workers.send_due())
        await commands(workers)
        sender.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(sender, *tasks, return_exceptions=True)
    if runner is not None:
        await runner.cleanup()
    print(json.dumps(workers.counters), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Simulated workers for bench_relay.py.")
    parser.add_argument("--url", required=True, help="the server's worker WebSocket URL")
    parser.add_argument("--key", required=True, help="the worker key")
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--protocol", choices=("v1", "binary"), default="v1")
    parser.add_argument("--rate", type=float, default=20.0, help="chunks per second per stream")
    parser.add_argument("--chunk-bytes", type=int, default=160)
    parser.add_argument("--max-concurrency", type=int, default=100)
    parser.add_argument("--connect-parallel", type=int, default=50)
    parser.add_argument("--direct", action="store_true", help="also serve the answer over HTTP")
    asyncio.run(main(parser.parse_args()))
