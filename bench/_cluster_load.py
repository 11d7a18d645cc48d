"""The clients of ``bench_cluster.py``: finite streams, one after another on kept-alive
connections.

Each client holds one connection and sends its next request when the previous answer has
ended. The answers come from the simulated workers of ``_relay_workers.py``: a request that
sets ``"max_tokens": K`` gets K events, each carrying the request's id, its sequence number
and the worker's ``time.monotonic()`` at the send, then a done event with the count and
``data: [DONE]``. They are read by ``_relay_load.StreamReader``'s HTTP side (status, chunked
body) and checked cheaply, without decoding JSON: every event must start with the bytes its
request, its place and its kind dictate and have the exact length the worker pads it to, so an
event of another request, a missing, repeated or cut event, or a wrong count is an error.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import orjson
from _relay_load import CHAT_PATH, MODEL, Histogram, StreamReader, Streams, percentile

DONE = b"data: [DONE]"


class KeptAlive(StreamReader):
    """Streamed answers, one after another, on one kept-alive connection."""

    def __init__(
        self, streams: Streams, loop: asyncio.AbstractEventLoop, *, chunks: int, chunk_bytes: int
    ) -> None:
        super().__init__(streams, b"", b"", loop)
        self.loop = loop
        self.chunks = chunks
        #: An event's length without its ``\n\n``, as the worker pads it.
        self.event_len = chunk_bytes - 2
        self.sid = b""
        self.expect = b""
        self.done_event = b""
        self.timed = False
        self.sent_at = self.first_at = self.ended_at = 0.0
        self.lost = False

    def start(self, sid: bytes, request: bytes, *, timed: bool) -> None:
        """Send the next request; ``status`` and ``finished`` are its futures."""
        if self.lost or self.transport is None:
            raise ConnectionError("connection closed between requests")
        self.sid, self.timed = sid, timed
        self.status = self.loop.create_future()
        self.finished = self.loop.create_future()
        self.buffer.clear()
        self.chunked, self.tail, self.seq, self.done_count, self.last = True, b"", 0, None, False
        self.expect = self._expect()
        self.done_event = b'data: {"id":"%s","chunks":%d}' % (sid, self.chunks)
        self.first_at = self.ended_at = 0.0
        self.sent_at = time.monotonic()
        self.transport.write(request)

    def _expect(self) -> bytes:
        return b'data: {"id":"%s","seq":%d,"t":' % (self.sid, self.seq)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.sent_at:  # else no request to settle
            super().connection_lost(exc)

    def settle(self, error: str | None) -> None:
        """An answer that ended well leaves the connection open for the next request."""
        if error is None:
            if not self.finished.done():
                self.ended_at = time.monotonic()
                self.finished.set_result(None)
            return
        super().settle(error)

    def body(self, data: bytes, now: float) -> str | None:
        events = (self.tail + data).split(b"\n\n")
        self.tail = events.pop()
        for event in events:
            if self.last:
                return "data after [DONE]"
            if self.done_count is not None:
                if event != DONE:
                    return "no [DONE] after the done event"
                self.last = True
            elif event.startswith(self.expect):
                if len(event) != self.event_len or not event.endswith(b'"}'):
                    return "event cut or merged"
                if not self.seq:
                    self.first_at = now
                if self.timed:
                    start = len(self.expect)
                    self.streams.record(now, float(event[start : event.index(b",", start)]))
                else:
                    self.streams.received += 1
                self.seq += 1
                self.expect = self._expect()
            elif event == self.done_event and self.seq == self.chunks:
                self.done_count = self.seq
            else:
                return "event of another request, out of order, or a wrong count"
        return None


@attrs.frozen
class Target:
    """Where the clients connect, and with what key."""

    host: str
    port: int
    headers: dict[str, str]

    @classmethod
    def of(cls, url: str, headers: dict[str, str]) -> Target:
        host, _, port = url.removeprefix("http://").partition(":")
        return cls(host, int(port), headers)


@attrs.define
class Phase:
    """One measured phase: what came back, how fast, and what it cost each process."""

    streams: Streams
    latencies: list[float] = attrs.Factory(list)
    ttfbs: list[float] = attrs.Factory(list)
    errors: Counter[str] = attrs.Factory(Counter)
    elapsed: float = 0.0
    started: float = 0.0
    cpu: dict[str, float] = attrs.Factory(dict)

    @property
    def ok(self) -> int:
        return len(self.latencies)


async def phase(
    target: Target,
    *,
    tag: str,
    requests: int,
    concurrency: int,
    chunks: int,
    chunk_bytes: int,
    max_seconds: float,
    timeout: float,
    timed: bool,
    sample: Callable[[], dict[str, float]] | None = None,
) -> Phase:
    """``requests`` streamed requests from ``concurrency`` kept-alive clients, each answer
    checked; ``sample()`` (the processes' CPU) is called once the connections are open and
    once the last answer is in. Stops early after ``max_seconds``."""
    loop = asyncio.get_running_loop()
    out = Phase(Streams(target.host, target.port, target.headers, timeout=timeout))
    head = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())

    def request(sid: bytes) -> bytes:
        body = orjson.dumps(
            {
                "model": MODEL,
                "stream": True,
                "max_tokens": chunks,
                "messages": [{"role": "user", "content": "bench"}],
                "user": sid.decode(),
            }
        )
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def connect() -> KeptAlive:
        reader = KeptAlive(out.streams, loop, chunks=chunks, chunk_bytes=chunk_bytes)
        connecting = loop.create_connection(lambda: reader, target.host, target.port)
        await asyncio.wait_for(connecting, timeout)
        return reader

    async def answer(reader: KeptAlive) -> str | None:
        status = await reader.status
        return await reader.finished if status == 200 else f"HTTP {status}"

    issued = itertools.count()

    async def client(reader: KeptAlive) -> None:
        while (n := next(issued)) < requests and time.monotonic() < deadline:
            sid = f"{tag}-{n}".encode()
            error: str | None
            try:
                if reader.lost:
                    reader = await connect()
                reader.start(sid, request(sid), timed=timed)
                error = await asyncio.wait_for(answer(reader), timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                error = type(exc).__name__
            if error is not None:
                out.errors[error] += 1
                reader.close()
                reader.lost = True
                continue
            out.latencies.append(reader.ended_at - reader.sent_at)
            out.ttfbs.append(reader.first_at - reader.sent_at)
        reader.close()

    readers = await asyncio.gather(*(connect() for _ in range(concurrency)))
    before = sample() if sample else {}
    out.started = time.monotonic()
    deadline = out.started + max_seconds
    await asyncio.gather(*(client(r) for r in readers))
    out.elapsed = time.monotonic() - out.started
    after = sample() if sample else {}
    # Clock ticks can round a delta below zero.
    out.cpu = {r: max(0.0, after[r] - before[r]) for r in after}
    return out


def summarize(phases: list[Phase]) -> dict[str, Any]:
    """Rounds of one phase together: the median round's rates, percentiles over every answer."""
    latencies = [x for p in phases for x in p.latencies]
    ttfbs = [x for p in phases for x in p.ttfbs]
    delays = Histogram()
    for p in phases:
        for hist in p.streams.delays.values():
            delays.merge(hist)
    errors = sum((p.errors for p in phases), Counter[str]())
    cpu: Counter[str] = Counter()
    for p in phases:
        cpu.update(p.cpu)
    ok = len(latencies)
    chunks = sum(p.streams.received for p in phases)
    elapsed = sum(p.elapsed for p in phases)
    return {
        "requests_ok": ok,
        "chunks": chunks,
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(statistics.median(p.ok / p.elapsed for p in phases), 1),
        "requests_per_s_rounds": [round(p.ok / p.elapsed, 1) for p in phases],
        "chunks_per_s": round(statistics.median(p.streams.received / p.elapsed for p in phases)),
        "ttfb_ms": {"p50": ms(percentile(ttfbs, 50)), "p99": ms(percentile(ttfbs, 99))},
        "latency_ms": {"p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99))},
        "chunk_delay_ms": (
            {"p50": ms(delays.percentile(50)), "p99": ms(delays.percentile(99))}
            if delays.count
            else {}
        ),
        "cpu_s": {k: round(v, 3) for k, v in sorted(cpu.items())},
        "cpu_busy": {k: round(v / elapsed, 3) for k, v in sorted(cpu.items()) if elapsed},
    }


def ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)
