"""Slow, idle and hostile client connections are bounded: a deadline for request headers and
for idle keep-alive, a connection cap counted at accept that sheds the slowest first, a quick
503 past it, and logs that stay short and keyless.

The server runs as ``llamapool serve`` runs it (``running_server``) on loopback; attackers are
raw sockets, the normal client is aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from llamapool.config import ServeConfig
from llamapool.log import Throttle, throttled_loop_errors
from llamapool.run import running_server
from llamapool.server.app import create_app
from llamapool.server.resources import connection_cap, fd_reserve

from .conftest import API_KEY, WORKER_KEY
from .resilience_helpers import free_port, get_text, metric

#: A request whose headers never end: the line and one header, the blank line never comes.
PARTIAL = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Trickle: "
#: The rest of it, for a slow client that does finish.
REST = b"a\r\n\r\n"
COMPLETE = b"GET /healthz HTTP/1.1\r\nHost: idle\r\n\r\n"
#: How long any one wait of these tests may take.
STEP = 5.0


@contextlib.asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[tuple[str, int]]:
    """``llamapool serve`` with the test keys on a free loopback port: its host and port."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "api_keys": API_KEY,
        "worker_keys": WORKER_KEY,
        **overrides,
    }
    async with running_server(ServeConfig(**settings)) as url:
        host, _, port = url.removeprefix("http://").rpartition(":")
        yield host, int(port)


class RawClient:
    """One raw TCP connection to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server: tuple[str, int], first: bytes = PARTIAL) -> RawClient:
        reader, writer = await asyncio.open_connection(*server)
        writer.write(first)
        await writer.drain()
        return cls(reader, writer)

    async def closed_by_server(self, timeout: float = STEP) -> bool:
        """Whether the server closes the connection within ``timeout`` (sending nothing)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1024), timeout)
        except ConnectionResetError:
            return True
        except asyncio.TimeoutError:
            return False
        return b"" == data

    async def response(self, timeout: float = STEP) -> tuple[int, dict[str, str], Any]:
        """The status, headers and JSON body of the one response the server sends."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *lines = head.decode("latin-1").strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = await asyncio.wait_for(
            self.reader.readexactly(int(headers["content-length"])), timeout
        )
        return int(status_line.split()[1]), headers, orjson.loads(body)

    def close(self) -> None:
        self.writer.close()


async def open_many(server: tuple[str, int], count: int, *, at_once: int = 100) -> list[RawClient]:
    """``count`` slowloris connections, opened in accept order (``at_once`` being opened)."""
    gate = asyncio.Semaphore(at_once)

    async def one() -> RawClient:
        async with gate:
            return await RawClient.connect(server)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def timed_healthz(server: tuple[str, int]) -> tuple[int, float]:
    """``GET /healthz`` on a new connection: its status and how long it took, in seconds."""
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP)) as http,
        http.get(f"http://{server[0]}:{server[1]}/healthz") as resp,
    ):
        await resp.read()
        return resp.status, time.monotonic() - started


# --- deadlines ------------------------------------------------------------------------------


async def test_a_client_trickling_its_headers_is_closed_at_the_header_deadline() -> None:
    """A connection that sends a byte of its headers every 0.1 s is still closed once
    HEADER_TIMEOUT (0.5 s) has passed since it connected, without an answer."""
    async with serving(header_timeout=0.5) as server:
        started = time.monotonic()
        client = await RawClient.connect(server)

        async def trickle() -> None:
            while True:
                await asyncio.sleep(0.1)
                client.writer.write(b"a")

        trickling = asyncio.create_task(trickle())
        try:
            closed = await client.closed_by_server()
        finally:
            trickling.cancel()
            client.close()
        elapsed = time.monotonic() - started

    assert closed
    assert 0.45 <= elapsed < 2.5, elapsed


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    """A connection that got its answer and then sends nothing is closed after
    KEEPALIVE_TIMEOUT (0.5 s); a keep-alive connection that sends again in time is served."""
    async with serving(keepalive_timeout=0.5) as server:
        busy = await RawClient.connect(server, COMPLETE)
        first = (await busy.response())[0]
        await asyncio.sleep(0.2)  # well within the timeout: the connection is reused
        busy.writer.write(COMPLETE)
        second = (await busy.response())[0]
        answered = time.monotonic()
        closed = await busy.closed_by_server()
        idle_for = time.monotonic() - answered
        busy.close()

    assert (200, 200) == (first, second)
    assert closed
    assert 0.4 <= idle_for < 2.5, idle_for


async def test_a_body_that_never_ends_is_cut_off_at_the_request_timeout() -> None:
    """A model request whose body stops halfway holds its connection (and its slot against
    the cap) only until REQUEST_TIMEOUT (0.5 s) after its headers; a body that trickles in
    whole within it is answered."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: slow\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    body = b'{"model": "nobody-serves-this"}'.ljust(100)
    async with serving(request_timeout=0.5, header_timeout=5.0) as server:
        stalled = await RawClient.connect(server, head + body[:9])
        started = time.monotonic()
        with capture_logs() as logs:
            closed = await stalled.closed_by_server()
        elapsed = time.monotonic() - started
        stalled.close()

        slow = await RawClient.connect(server, head)
        for piece in (body[:50], body[50:]):
            await asyncio.sleep(0.1)
            slow.writer.write(piece)
        answered = (await slow.response())[0]
        slow.close()

    assert closed
    assert 0.45 <= elapsed < 2.5, elapsed
    assert ["body_timeout"] == [e["reason"] for e in logs if e["event"] == "slow_client_closed"]
    assert 404 == answered  # routed: the whole body arrived in time


# --- the connection cap ---------------------------------------------------------------------


async def test_at_the_cap_the_oldest_slow_connections_make_room_for_a_normal_client() -> None:
    """With MAX_CONNECTIONS=50 and 60 slowloris connections, the 11 oldest are closed (10 for
    the slowloris newcomers, 1 for the normal client), the normal client gets 200 quickly, and
    the 49 newest are still open: they get their answer when they finish their headers.

    "Quickly" is well under HEADER_TIMEOUT (30 s), which a client stuck behind the slowloris
    connections would wait; 5 s leaves a slow CI machine its stalls."""
    async with serving(max_connections=50, header_timeout=30) as server:
        slow = [await RawClient.connect(server) for _ in range(60)]
        status, elapsed = await timed_healthz(server)
        shed = await asyncio.gather(*(c.closed_by_server() for c in slow[:11]))
        for client in slow[11:]:
            client.writer.write(REST)
        answers = await asyncio.gather(*(c.response() for c in slow[11:]))
        for client in slow:
            client.close()

    assert 200 == status
    assert elapsed < 5.0, elapsed
    assert [True] * 11 == shed
    assert [200] * 49 == [answer[0] for answer in answers]


async def test_past_the_cap_with_no_slow_connection_a_new_one_gets_a_json_503() -> None:
    """With MAX_CONNECTIONS=2 both held by requests in progress (state streams), a third
    connection gets 503 JSON in OpenAI shape with Retry-After: 1 before it is read, counted
    as an ``overloaded`` rejection; the separate metrics port still answers."""
    metrics_port = free_port()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        serving(max_connections=2, metrics_port=metrics_port) as server,
        aiohttp.ClientSession() as first,
        aiohttp.ClientSession() as second,
    ):
        url = f"http://{server[0]}:{server[1]}"
        streams = [
            await http.get(url + "/api/v1/state/stream", headers=auth) for http in (first, second)
        ]
        for stream in streams:  # both requests are being answered: neither can be shed
            await asyncio.wait_for(stream.content.readline(), STEP)
        refused = await RawClient.connect(server, COMPLETE)
        status, headers, body = await refused.response()
        closed = await refused.closed_by_server()
        refused.close()
        metrics = await get_text(f"http://127.0.0.1:{metrics_port}", "/metrics")
        for stream in streams:
            stream.close()

    assert (503, "application/json", "1") == (
        status,
        headers["content-type"],
        headers["retry-after"],
    )
    assert "overloaded" == body["error"]["code"]
    assert body["error"]["message"]
    assert closed
    assert 1 == metric(metrics, "llamapool_rejections_total", reason="overloaded")


def _open_file_limit(needed: int) -> None:
    """Raise this process's soft limit of open files to ``needed``, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files (client and server ends); the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def test_a_normal_client_is_answered_in_milliseconds_under_1100_slowloris() -> None:
    """1,100 connections trickling header bytes every 2 s against the default limits
    (MAX_CONNECTIONS=1024): a normal client's /healthz is answered, each time within 1 s."""
    _open_file_limit(2 * 1100 + 2 * 1024 + 512)
    async with serving() as server:
        slow = await open_many(server, 1100)

        async def trickle() -> None:
            while True:
                await asyncio.sleep(2.0)
                for client in slow:
                    if not client.writer.is_closing():
                        client.writer.write(b"a")

        trickling = asyncio.create_task(trickle())
        try:
            timings = []
            for _ in range(5):
                timings.append(await timed_healthz(server))
                await asyncio.sleep(0.5)
        finally:
            trickling.cancel()
            for client in slow:
                client.close()
    latencies = [round(elapsed * 1000, 1) for _, elapsed in timings]
    print(f"/healthz under 1100 slowloris connections, ms: {latencies}")

    assert [200] * 5 == [status for status, _ in timings]
    assert max(latencies) < 1000, latencies


# --- logs -----------------------------------------------------------------------------------

SECRET = "SECRET-5f2a9c"
MALFORMED = {
    "BadHttpMethod": f"G<T /v1/models?key={SECRET} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "BadStatusLine": f"GET /v1/models?key={SECRET} HTTP/1.1 x\r\nHost: x\r\n\r\n".encode(),
}


async def test_malformed_requests_are_logged_once_per_reason_without_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ten malformed request lines of each of two kinds, with a key in the query string: each
    gets a 400 JSON answer; the log has one line per kind, no traceback and no key."""
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        async with serving() as server:
            answers = {}
            for reason, request in MALFORMED.items():
                for _ in range(10):
                    client = await RawClient.connect(server, request)
                    answers[reason] = await client.response()
                    client.close()

    bad = [e for e in events if e["event"] == "bad_http_request"]
    assert sorted(MALFORMED) == sorted(e["reason"] for e in bad)
    assert dict.fromkeys(MALFORMED, 400) == {r: a[0] for r, a in answers.items()}
    assert {"invalid_request"} == {a[2]["error"]["code"] for a in answers.values()}
    assert [] == [e for e in events if "exc_info" in e or SECRET in repr(e)]
    assert SECRET not in caplog.text
    assert "Error handling request" not in caplog.text


async def test_a_body_that_does_not_decode_is_the_clients_error_not_a_traceback() -> None:
    """A body sent as gzip that is not gzip, to a route that answers without reading it (a
    401 here): aiohttp fails reading the rest after the answer; that is a warning about a bad
    request, never an error with a traceback."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 20\r\n\r\n" + b"x" * 20
    )
    with capture_logs() as events:
        async with serving() as server:
            client = await RawClient.connect(server, request)
            status = (await client.response())[0]
            closed = await client.closed_by_server()
            client.close()

    assert 401 == status
    assert closed
    assert [] == [e for e in events if e["log_level"] == "error" or "exc_info" in e]
    assert ["warning"] == [e["log_level"] for e in events if e["event"] == "bad_http_request"]


async def test_an_unexpected_failure_is_a_json_500_and_one_traceback_per_interval(
    aiohttp_server: Any,
) -> None:
    """A bug a client can trigger at will (here a route that always fails) answers each time
    with a JSON 500 in the route's API shape, and logs its traceback once, not per request."""

    async def broken(request: web.Request) -> web.Response:
        raise ValueError("a bug of ours")

    app = create_app(ServeConfig(host="127.0.0.1", port=0, api_keys=API_KEY))
    app.router.add_get("/api/broken", broken)
    server = await aiohttp_server(app)
    with capture_logs() as events:
        async with aiohttp.ClientSession() as http:
            answers = []
            for _ in range(5):
                async with http.get(
                    server.make_url("/api/broken"), headers={"Authorization": f"Bearer {API_KEY}"}
                ) as resp:
                    answers.append((resp.status, await resp.json()))

    failures = [e for e in events if e["event"] == "request_failed"]
    assert [(500, {"error": "internal error"})] * 5 == answers  # Ollama's shape on /api
    assert [("ValueError", 0)] == [(e["reason"], e["suppressed"]) for e in failures]
    assert all("exc_info" in e for e in failures)


def test_the_throttle_passes_one_line_per_reason_and_interval_and_counts_the_rest() -> None:
    """Within 10 s a reason passes once; the first line after the interval carries how many
    were held back; reasons are throttled apart."""
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    first = [throttle.passes("a") for _ in range(5)] + [throttle.passes("b")]
    now[0] = 10.0
    later = [throttle.passes("a"), throttle.passes("a"), throttle.passes("b")]

    assert [0, None, None, None, None, 0] == first
    assert [4, None, 0] == later


def test_event_loop_errors_are_throttled_and_show_no_repr() -> None:
    """A hundred failed accept()s log one line, without a traceback; an error whose message
    carries a repr or a call's arguments (here with a key in them) logs only what precedes."""
    handle = throttled_loop_errors(Throttle())
    loop = asyncio.new_event_loop()
    try:
        with capture_logs() as events:
            for _ in range(100):
                handle(
                    loop,
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                    },
                )
            handle(loop, {"message": f"Exception in callback <Handle f('key={SECRET}')>"})
            handle(loop, {"message": f"Exception in callback Job.run(key='{SECRET}')"})
    finally:
        loop.close()

    assert [
        {
            "event": "event_loop_error",
            "reason": "socket.accept() out of system resource",
            "error": "OSError",
            "detail": "Too many open files",
            "suppressed": 0,
            "log_level": "warning",
        },
        {
            "event": "event_loop_error",
            "reason": "Exception in callback",
            "suppressed": 0,
            "log_level": "warning",
        },
        {
            "event": "event_loop_error",
            "reason": "Exception in callback Job.run",
            "suppressed": 0,
            "log_level": "warning",
        },
    ] == events


def test_too_few_open_files_cap_client_connections_with_one_warning() -> None:
    """With 1,024 open files for 1,024 clients and 1,024 workers, clients get half of what
    the reserve leaves, and one warning names the numbers."""
    cfg = ServeConfig(max_connections=1024, backlog=128)
    with capture_logs() as events:
        cap = connection_cap(cfg, 1024)
        roomy = connection_cap(cfg, 4096)

    assert ((1024 - fd_reserve(cfg)) // 2, 1024) == (cap, roomy)
    assert [("open_file_limit_too_low", 1024, cap)] == [
        (e["event"], e["open_file_limit"], e["connection_cap"]) for e in events
    ]
