"""The clients of ``bench_relay.py``: many open streams, or many short requests.

A stream checks every event it reads: its stream id (no cross-talk), sequence numbers from 0
without a gap (complete and in order), then a done event whose count matches and
``data: [DONE]``. The relay delay of each chunk is the monotonic time the client read it minus
the time the worker stamped into it just before sending it (both ``CLOCK_MONOTONIC``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter

import aiohttp
import attrs
import orjson

MODEL = "bench"
CHAT_PATH = "/v1/chat/completions"
#: Delays are kept in logarithmic bins 2% wide, per tenth of a second of receipt time.
_BIN = math.log(1.02)
_FLOOR = 1e-6
SLICE = 0.1


@attrs.define
class Histogram:
    """Delays in 2%-wide bins, with the exact maximum."""

    bins: Counter[int] = attrs.Factory(Counter)
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.bins[int(math.log(max(seconds, _FLOOR) / _FLOOR) / _BIN)] += 1
        self.max = max(self.max, seconds)

    def merge(self, other: Histogram) -> None:
        self.bins.update(other.bins)
        self.max = max(self.max, other.max)

    @property
    def count(self) -> int:
        return self.bins.total()

    def percentile(self, p: float) -> float:
        """Nearest rank, to the bin's upper edge (never above the maximum); NaN when empty."""
        total = self.count
        if not total:
            return math.nan
        rank = max(1, math.ceil(p / 100 * total))
        seen = 0
        for b in sorted(self.bins):
            seen += self.bins[b]
            if seen >= rank:
                return min(self.max, _FLOOR * math.exp((b + 1) * _BIN))
        return self.max


@attrs.define
class Streams:
    """Open streams, what they received, and how they ended."""

    host: str
    port: int
    headers: dict[str, str]
    #: Longest wait for a connection and the answer's headers.
    timeout: float = 60.0
    received: int = 0
    opened: int = 0
    open_now: int = 0
    finished_ok: int = 0
    errors: Counter[str] = attrs.Factory(Counter)
    #: Receipt time slice (``int(t / SLICE)``) to the delays read in it.
    delays: dict[int, Histogram] = attrs.Factory(dict)
    open_delays: list[float] = attrs.Factory(list)

    def window(self, start: float, end: float) -> Histogram:
        """Every delay read from ``start`` to ``end`` (to the slice)."""
        merged = Histogram()
        for s in range(int(start / SLICE), int(end / SLICE)):
            if s in self.delays:
                merged.merge(self.delays[s])
        return merged

    def request(self, sid: str, *, burst: bool) -> bytes:
        body = orjson.dumps(
            {
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "bench"}],
                "user": sid,
                "burst": burst,
            }
        )
        head = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    async def one(self, gate: asyncio.Semaphore, sid: str, *, burst: bool) -> None:
        """One stream, from the connection to its last byte; its first error is counted."""
        loop = asyncio.get_running_loop()
        reader = StreamReader(self, sid.encode(), self.request(sid, burst=burst), loop)
        try:
            async with gate:
                started = time.monotonic()
                connect = loop.create_connection(lambda: reader, self.host, self.port)
                await asyncio.wait_for(connect, self.timeout)
                status = await asyncio.wait_for(reader.status, self.timeout)
                self.open_delays.append(time.monotonic() - started)
        except (OSError, asyncio.TimeoutError) as exc:
            self.errors[f"open: {type(exc).__name__}"] += 1
            reader.close()
            return
        if status != 200:
            self.errors[f"HTTP {status}"] += 1
            reader.close()
            return
        self.opened += 1
        self.open_now += 1
        try:
            error = await reader.finished
        finally:
            self.open_now -= 1
            reader.close()
        if error:
            self.errors[error] += 1
        else:
            self.finished_ok += 1

    def record(self, now: float, sent: float) -> None:
        self.received += 1
        slice_ = int(now / SLICE)
        hist = self.delays.get(slice_)
        if hist is None:
            hist = self.delays[slice_] = Histogram()
        hist.add(now - sent)


class StreamReader(asyncio.Protocol):
    """One streamed answer over a raw HTTP/1.1 connection, decoded and checked as it arrives.

    A protocol rather than an HTTP client library: reading the events in the transport's own
    callback costs a fraction of a task wake-up per read, so the client side stays cheaper
    than the server it measures.
    """

    def __init__(
        self, streams: Streams, sid: bytes, request: bytes, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.streams = streams
        self.request = request
        self.prefix = b'data: {"id":"' + sid + b'",'
        self.status: asyncio.Future[int] = loop.create_future()
        self.finished: asyncio.Future[str | None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.chunked = True
        self.tail = b""
        self.seq = 0
        self.done_count: int | None = None
        self.last = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def settle(self, error: str | None) -> None:
        """The stream is over: ``error`` says why it went wrong, None if it did not."""
        if not self.status.done():
            self.status.set_exception(ConnectionError(error or "closed before the headers"))
        if not self.finished.done():
            self.finished.set_result(error)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.chunked and self.status.done() and not self.finished.done():
            self.body(bytes(self.buffer), time.monotonic())
            self.settle(self.end())
        self.settle("connection closed mid-stream")

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buffer += data
        if not self.status.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            del self.buffer[: end + 4]
            self.chunked = b"transfer-encoding: chunked" in head
            self.status.set_result(int(head.split(b" ", 2)[1]))
        if not self.chunked:
            return  # read to the close
        pos = 0
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                self.settle(self.end())
                return
            if len(buf) < line_end + 2 + size + 2:
                break
            error = self.body(bytes(buf[line_end + 2 : line_end + 2 + size]), now)
            if error:
                self.settle(error)
                return
            pos = line_end + 2 + size + 2
        del buf[:pos]

    def body(self, data: bytes, now: float) -> str | None:
        events = (self.tail + data).split(b"\n\n")
        self.tail = events.pop()
        for event in events:
            if self.last:
                return "data after [DONE]"
            if event == b"data: [DONE]":
                self.last = True
                continue
            if not event.startswith(self.prefix):
                return _foreign(event)
            fields = orjson.loads(event[6:])
            if "chunks" in fields:
                self.done_count = fields["chunks"]
                continue
            if fields["seq"] != self.seq:
                return "chunk missing or out of order"
            self.seq += 1
            self.streams.record(now, fields["t"])
        return None

    def end(self) -> str | None:
        if self.tail or not self.last:
            return "stream ended without [DONE]"
        if self.done_count != self.seq:
            return f"done event says {self.done_count} chunks, {self.seq} arrived"
        return None


def _foreign(event: bytes) -> str:
    """Why an event is not the stream's own: an error the server reports in the stream (its
    message, which names the cause) or, what must never happen, another's or garbage."""
    if event.startswith(b'data: {"error"'):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return f"error event: {orjson.loads(event[6:])['error']['message'][:60]}"
    return "event of another stream or malformed"


@attrs.define
class Requests:
    """Short non-streamed requests: latencies, first bytes, errors."""

    latencies: list[float] = attrs.Factory(list)
    ttfbs: list[float] = attrs.Factory(list)
    errors: Counter[str] = attrs.Factory(Counter)
    elapsed: float = 0.0


async def requests(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    *,
    count: int,
    concurrency: int,
    max_seconds: float,
) -> Requests:
    """``count`` non-streamed requests from ``concurrency`` clients, each answer checked."""
    out = Requests()
    issued = itertools.count()
    deadline = time.monotonic() + max_seconds

    async def client() -> None:
        while (n := next(issued)) < count and time.monotonic() < deadline:
            sid = f"r{n}"
            body = orjson.dumps({"model": MODEL, "stream": False, "messages": [], "user": sid})
            started = time.perf_counter()
            try:
                async with session.post(url + CHAT_PATH, data=body, headers=headers) as resp:
                    first = await resp.content.read(1)
                    ttfb = time.perf_counter()
                    rest = await resp.read()
                    done = time.perf_counter()
                    status = resp.status
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                out.errors[type(exc).__name__] += 1
                continue
            if status != 200:
                out.errors[f"HTTP {status}"] += 1
            elif orjson.loads(first + rest).get("id") != sid:
                out.errors["wrong answer"] += 1
            else:
                out.latencies.append(done - started)
                out.ttfbs.append(ttfb - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    out.elapsed = time.perf_counter() - started
    return out


def percentile(values: list[float], p: float) -> float:
    """Nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- the server's own pauses --------------------------------------------------------------------

#: The Python server's pause histograms (server/pauses.py); the Go server has none.
PAUSE_SERIES = {
    "stall": "llamapool_event_loop_lag_seconds_bucket",
    "gc": "llamapool_gc_pause_seconds_bucket",
}
#: A pause a streaming user would notice (the issue's bound).
NOTICEABLE = 0.02
#: Seconds a scrape may take (a server that cannot answer in time gets no pause figures).
SCRAPE_TIMEOUT = 5.0


class PauseScraper:
    """Reads the pause histograms over one kept-alive connection, opened while the server is
    idle: under overload a new connection would wait behind every stream still opening."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=3600),
            timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT),
        )

    async def close(self) -> None:
        await self.http.close()

    async def buckets(self) -> dict[str, dict[float, float]] | None:
        """The cumulative bucket counts of each pause histogram (summed over its labels),
        now; ``None`` for a server without them, or one too busy to answer in time."""
        try:
            async with self.http.get(self.url + "/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        found: dict[str, dict[float, float]] = {kind: {} for kind in PAUSE_SERIES}
        for line in text.splitlines():
            for kind, series in PAUSE_SERIES.items():
                if line.startswith(series + "{"):
                    labels, _, value = line.rpartition(" ")
                    le = labels.rpartition('le="')[2].partition('"')[0]
                    bound = math.inf if le == "+Inf" else float(le)
                    found[kind][bound] = found[kind].get(bound, 0.0) + float(value)
        return found if all(found.values()) else None


def pauses_between(
    before: dict[str, dict[float, float]] | None, after: dict[str, dict[float, float]] | None
) -> dict[str, float | None]:
    """For each kind: pauses over :data:`NOTICEABLE`, and the longest as its bucket's upper
    bound in ms (``inf``: over the largest bucket)."""
    if before is None or after is None:
        return {}
    out: dict[str, float | None] = {}
    for kind in PAUSE_SERIES:
        delta = {b: after[kind][b] - before[kind].get(b, 0.0) for b in sorted(after[kind])}
        total = delta[math.inf]
        out[f"{kind}s_over_{NOTICEABLE * 1000:g}ms"] = total - delta.get(NOTICEABLE, 0.0)
        longest = next((b for b, n in delta.items() if n == total), math.inf) if total else None
        out[f"longest_{kind}_ms"] = None if longest is None else longest * 1000
    return out


class LoopLag:
    """This process's own stalls: how late a 10 ms timer runs, per tenth of a second of
    receipt time, so that a window can tell a delay the client caused from one it measured."""

    TICK = 0.01

    def __init__(self) -> None:
        self.worst: dict[int, float] = {}  # SLICE index -> the latest lateness in it
        self._due = time.monotonic() + self.TICK
        self._timer = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        late, key = now - self._due, int(now / SLICE)
        if late > self.worst.get(key, 0.0):
            self.worst[key] = late
        self._due = now + self.TICK
        self._timer = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    def longest(self, start: float, end: float) -> float:
        """The longest stall seen between ``start`` and ``end``, in ms."""
        keys = range(int(start / SLICE), int(end / SLICE) + 1)
        return round(max((self.worst.get(k, 0.0) for k in keys), default=0.0) * 1000, 1)

    def stop(self) -> None:
        self._timer.cancel()
