"""A cluster of real ``serve`` processes on one real Redis, with real ``work`` processes and the
official ``openai`` client: the pool stays one pool under load, when a server is killed, when
Redis goes away and comes back, and when ``serve --processes 2`` shares one port.

Every client call is bounded (a call past :data:`CALL` counts as hung and fails the test), and
every wait is for a condition under a deadline: a log event, the state API, a count of requests
a fake runtime holds. Slow answers come from a fake Ollama in this process, whose token delay
makes a stream last long enough to be in flight when something breaks (the demo backend has
no setting for its delay); a long stream is a request for many tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import attrs
import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from llamapool.testing import create_fake_ollama_app, serve_app

from . import redis_helpers
from .cli_helpers import API_KEY, WORKER_KEY, CliProcess, cli_env, cli_process, ws_url
from .conftest import wait_for
from .redis_helpers import RedisServer
from .resilience_helpers import MODEL, echo_of, free_port

redis_server = redis_helpers.redis_server

CLUSTER_KEY = "process-cluster-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Longest one client call may take; past it the request counts as hung.
CALL = 15.0
#: Longest a process may take to start, or the cluster to settle after a change (a killed
#: server's entries expire 3 s after its last refresh).
SETTLE = 15.0
#: Seconds between two tokens of the fake runtime's answers.
TOKEN_DELAY = 0.02
#: Tokens of an answer that is still streaming when the test breaks something (~40 s).
LONG = 2000


# --- a fake runtime that counts what it serves ----------------------------------------------


class Runtime:
    """A fake Ollama whose answers take :data:`TOKEN_DELAY` per token, counting the model
    requests it is serving at once (exactly, not sampled: it runs in this process)."""

    def __init__(self) -> None:
        self.app = create_fake_ollama_app(models=[MODEL], chunk_delay=TOKEN_DELAY)
        self.app.middlewares.append(self.middleware)
        self.active = 0
        self.peak = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET":  # the worker's probes
            return await handler(request)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await handler(request)
        finally:
            self.active -= 1


# --- servers, workers and clients -----------------------------------------------------------


@attrs.define
class Server:
    """One ``serve`` process of the cluster."""

    process: CliProcess
    url: str
    #: Its id in the cluster (the ``server`` of its workers' state entries).
    id: str

    @property
    def ws_url(self) -> str:
        return ws_url(self.url)


class Cluster:
    """The processes of one test and the clients that reach them; all stopped at the end."""

    def __init__(
        self, stack: contextlib.AsyncExitStack, redis: RedisServer, http: aiohttp.ClientSession
    ) -> None:
        self.stack = stack
        self.redis = redis
        self.http = http
        self.servers: list[Server] = []
        self.workers: dict[str, CliProcess] = {}
        #: Where each worker is connected, as every server lists it once the cluster settled.
        self.placement: dict[str, str] = {}
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of a ``serve`` process of this cluster."""
        return cli_env(
            API_KEY=API_KEY,
            WORKER_KEY=WORKER_KEY,
            CLUSTER_URL=self.redis.url,
            CLUSTER_KEY=CLUSTER_KEY,
            **settings,
        )

    async def start_servers(self, count: int) -> list[Server]:
        """Start ``count`` servers at once on ports of their own; return once each knows all."""
        env = self.env(HOST="127.0.0.1", PORT="0")
        started = [
            await self.stack.enter_async_context(cli_process("serve", env=env))
            for _ in range(count)
        ]
        joined = await asyncio.gather(*(p.event("cluster_joined", timeout=SETTLE) for p in started))
        for process, event in zip(started, joined, strict=True):
            listening = await process.event("server_listening")
            self.servers.append(Server(process, str(listening["url"]), str(event["server"])))
        await self.settled(self.servers, {})
        return self.servers

    async def start_workers(
        self, first: Sequence[Server], *, backend_url: str = "", **env: str
    ) -> list[str]:
        """One worker per server of ``first``, each listing every server in ``SERVER_URL``
        but that one first; returns their ids once every server lists them."""
        settings = {"WORKER_KEY": WORKER_KEY, "RECONNECT_MAX": "1s", **env}
        if backend_url:
            settings.update(BACKEND="ollama", BACKEND_URL=backend_url)
        else:
            settings["BACKEND"] = "demo"
        placed: dict[str, str] = {}
        started = []
        for server in first:
            worker_id = f"w{len(self.workers)}"
            at = self.servers.index(server)
            order = self.servers[at:] + self.servers[:at]
            urls = ",".join(s.ws_url for s in order)
            worker_env = cli_env(SERVER_URL=urls, WORKER_ID=worker_id, **settings)
            process = await self.stack.enter_async_context(cli_process("work", env=worker_env))
            self.workers[worker_id] = process
            placed[worker_id] = server.id
            started.append(process)
        await asyncio.gather(*(p.event("worker_registered", timeout=SETTLE) for p in started))
        await self.settled(self.servers, {**self.placement, **placed})
        return list(placed)

    async def state(self, server: Server) -> dict[str, Any]:
        """``GET /api/v1/state`` of ``server``."""
        async with self.http.get(server.url + "/api/v1/state", headers=AUTH) as response:
            assert 200 == response.status, await response.text()
            data: dict[str, Any] = await response.json()
            return data

    async def health(self, server: Server) -> dict[str, Any]:
        """``GET /healthz`` of ``server`` (no key needed)."""
        async with self.http.get(server.url + "/healthz") as response:
            assert 200 == response.status
            data: dict[str, Any] = await response.json()
            return data

    async def settled(self, servers: Sequence[Server], placement: dict[str, str]) -> None:
        """Wait until each of ``servers`` is connected to the cluster, knows exactly them,
        and lists each worker of ``placement`` once, with the server it is connected to."""
        ids = sorted(s.id for s in servers)
        wanted = sorted(placement.items())
        last: dict[str, Any] = {}

        async def whole() -> bool:
            for server in servers:
                state = await self.state(server)
                cluster = last[server.id] = state["cluster"]
                last[server.id]["workers"] = listed(state)
                if not cluster["connected"] or sorted(s["id"] for s in cluster["servers"]) != ids:
                    return False
                if listed(state) != wanted:
                    return False
            return True

        await wait_for(
            whole, what=f"every server to list {wanted} among {ids}", last=last, timeout=SETTLE
        )
        self.placement = dict(placement)

    def client(self, server: Server) -> openai.AsyncOpenAI:
        """The ``openai`` client of ``server`` (one per server, reused)."""
        if server.id not in self._clients:
            self._clients[server.id] = openai.AsyncOpenAI(
                base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=CALL
            )
            self.stack.push_async_callback(self._clients[server.id].close)
        return self._clients[server.id]


@pytest.fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    """The test's processes (killed at the end, whatever happened) on its own Redis."""
    async with contextlib.AsyncExitStack() as stack:
        timeout = aiohttp.ClientTimeout(total=5)
        http = await stack.enter_async_context(aiohttp.ClientSession(timeout=timeout))
        yield Cluster(stack, redis_server, http)


def listed(state: dict[str, Any]) -> list[tuple[str, str]]:
    """The state document's workers as ``(id, server)``, sorted: a worker listed twice shows."""
    return sorted((w["id"], w["server"]) for w in state["workers"])


# --- requests -------------------------------------------------------------------------------


def prompt(label: str) -> str:
    """A prompt no other request of the test has."""
    return f"{label} {uuid.uuid4().hex[:8]} asks the cluster"


def echo(text: str, tokens: int | None = None) -> str:
    """The echo runtimes' answer to ``text`` (``tokens`` long: its words over and over)."""
    words = echo_of(text).split(" ")
    if tokens is not None:
        words = [words[i % len(words)] for i in range(tokens)]
    return " ".join(words)


async def ask(
    sdk: openai.AsyncOpenAI,
    text: str,
    *,
    stream: bool,
    model: str = "demo",
    max_tokens: int | None = None,
    first: Callable[[], None] = lambda: None,
) -> str:
    """The answer to ``text``, whole or streamed; ``first`` is called on its first chunk.
    A call that takes longer than :data:`CALL` fails the test."""
    messages: Any = [{"role": "user", "content": text}]
    extra: Any = {} if max_tokens is None else {"max_tokens": max_tokens}

    async def go() -> str:
        if not stream:
            chat = await sdk.chat.completions.create(model=model, messages=messages, **extra)
            return chat.choices[0].message.content or ""
        parts: list[str] = []
        chunks = await sdk.chat.completions.create(
            model=model, messages=messages, stream=True, **extra
        )
        async with chunks:
            async for chunk in chunks:
                if not parts:
                    first()
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    try:
        return await asyncio.wait_for(go(), CALL)
    except asyncio.TimeoutError:
        raise AssertionError(f"no answer to {text!r} within {CALL}s: it hangs") from None


#: What a client may see of a failure it is told about: an error status or event, or its
#: connection closing (the SDK wraps that as ``APIConnectionError``; httpx's own errors count
#: too, should a read in the middle of a stream reach the caller unwrapped).
CLEAN_FAILURES = (openai.APIError, httpx.TransportError)


def connection_lost(error: BaseException | None) -> bool:
    """Whether ``error`` is the connection closing under the client (not a timeout)."""
    timeouts = (openai.APITimeoutError, httpx.TimeoutException)
    lost = (openai.APIConnectionError, httpx.TransportError)
    return isinstance(error, lost) and not isinstance(error, timeouts)


@attrs.define
class Outcome:
    """One request through one server: its answer, or the clean failure it ended with."""

    server: str
    prompt: str
    tokens: int | None = None
    started: float = attrs.Factory(time.monotonic)
    ended: float = 0.0
    answer: str | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.answer == echo(self.prompt, self.tokens)


async def request(
    cluster: Cluster,
    server: Server,
    label: str,
    *,
    stream: bool,
    tokens: int | None = None,
    first: Callable[[], None] = lambda: None,
) -> Outcome:
    """One request through ``server`` to the fake runtime's model."""
    outcome = Outcome(server.id, prompt(label), tokens)
    try:
        outcome.answer = await ask(
            cluster.client(server),
            outcome.prompt,
            stream=stream,
            model=MODEL,
            max_tokens=tokens,
            first=first,
        )
    except CLEAN_FAILURES as exc:
        outcome.error = exc
    finally:
        outcome.ended = time.monotonic()
    return outcome


async def batch(
    cluster: Cluster,
    servers: Sequence[Server],
    count: int,
    *,
    stream: bool | None = None,
    tokens: int | None = None,
) -> list[Outcome]:
    """``count`` requests at once, spread over ``servers``; streamed or not as ``stream``
    says, else every other one (only streams take the runtime's time per token)."""
    return await asyncio.gather(
        *(
            request(
                cluster,
                servers[i % len(servers)],
                f"batch {i}",
                stream=i % 2 == 0 if stream is None else stream,
                tokens=tokens,
            )
            for i in range(count)
        )
    )


def failures(outcomes: Sequence[Outcome]) -> list[tuple[str, str]]:
    """The requests that did not get their own answer, and what they got instead."""
    return [(o.prompt, repr(o.error) if o.error else repr(o.answer)) for o in outcomes if not o.ok]


class Load:
    """Clients that each send requests one after another (streamed every other time) to one
    server, until stopped; a server can be left alone sooner with :meth:`halt`."""

    def __init__(self, cluster: Cluster, servers: Sequence[Server], *, lanes: int) -> None:
        self.cluster = cluster
        self.outcomes: list[Outcome] = []
        self.halted: set[str] = set()
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._lane(server, lane))
            for server in servers
            for lane in range(lanes)
        ]

    async def _lane(self, server: Server, lane: int) -> None:
        n = 0
        while not self._stop.is_set() and server.id not in self.halted:
            n += 1
            call = request(self.cluster, server, f"load {lane} {n}", stream=(lane + n) % 2 == 0)
            self.outcomes.append(await call)

    def halt(self, server: Server) -> None:
        """Send nothing more to ``server``."""
        self.halted.add(server.id)

    def answered(self, *servers: Server) -> bool:
        """Whether each of ``servers`` has answered two requests already."""
        return all(sum(o.ok for o in self.outcomes if o.server == s.id) >= 2 for s in servers)

    async def stop(self) -> list[Outcome]:
        """Stop sending; every request in flight ends (or fails the test as hung)."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes


# --- the tests ------------------------------------------------------------------------------


async def test_three_servers_serve_one_pool(cluster: Cluster) -> None:
    """Sixty requests over three servers, whose workers are connected one to each: every
    answer is its own request's, and every server lists every worker once with its server."""
    servers = await cluster.start_servers(3)
    workers = await cluster.start_workers(servers, MAX_CONCURRENCY="2")

    texts = [prompt(f"request {i}") for i in range(60)]
    answers = await asyncio.gather(
        *(
            ask(cluster.client(servers[i % 3]), text, stream=i % 2 == 1)
            for i, text in enumerate(texts)
        )
    )

    assert [echo_of(t) for t in texts] == answers
    placement = dict(zip(workers, (s.id for s in servers), strict=True))
    states = [await cluster.state(server) for server in servers]
    for state in states:
        assert sorted(placement.items()) == listed(state)
        assert 3 == len(state["cluster"]["servers"])
    # Each server counts the requests of its own clients, and each worker's server the
    # requests its worker served, from whichever server: the cluster counts each once.
    assert [20, 20, 20] == [s["server"]["jobs_completed_total"] for s in states]
    served = [
        w["processed_total"]
        for state, server in zip(states, servers, strict=True)
        for w in state["workers"]
        if w["server"] == server.id
    ]
    assert 60 == sum(served)


async def test_a_workers_limit_holds_with_load_from_every_server(cluster: Cluster) -> None:
    """Twenty-four streams through three servers to the one worker that takes two at a time:
    its runtime never serves more than two at once, nor does the worker report more, nor its
    server; and every request gets its own answer."""
    runtime = Runtime()
    status_port = free_port()
    backend = await cluster.stack.enter_async_context(serve_app(runtime.app))
    servers = await cluster.start_servers(3)
    [worker] = await cluster.start_workers(
        servers[1:2],
        backend_url=backend,
        MAX_CONCURRENCY="2",
        STATUS_ADDR=f"127.0.0.1:{status_port}",
    )
    seen: Counter[str] = Counter()
    done = asyncio.Event()

    async def sample() -> None:
        """The worker's own count of jobs, and its server's, as often as they answer."""
        status_url = f"http://127.0.0.1:{status_port}/status"
        while not done.is_set():
            async with cluster.http.get(status_url) as response:
                jobs = (await response.json())["current_jobs"]
            state = await cluster.state(servers[1])
            [entry] = [w for w in state["workers"] if w["id"] == worker]
            seen[f"worker {jobs}"] += 1
            seen[f"server {entry['inflight']}"] += 1

    sampler = asyncio.create_task(sample())
    try:
        outcomes = await asyncio.gather(
            *(request(cluster, servers[i % 3], f"limited {i}", stream=True) for i in range(24))
        )
    finally:
        done.set()
        await sampler

    assert [] == failures(outcomes)
    assert 2 == runtime.peak
    assert set(seen) <= {f"{who} {n}" for who in ("worker", "server") for n in (0, 1, 2)}, seen
    assert seen["worker 2"], seen  # the samples saw it full
    assert seen["server 2"], seen


async def test_a_killed_server_leaves_the_rest_serving(cluster: Cluster) -> None:
    """SIGKILL one of three servers under load: its clients' requests fail at once with the
    connection, another server's request that was streaming from its worker ends with an
    error event, nothing hangs, the survivors answer every new request, and its worker is
    listed (once) with the server it moved to."""
    runtime = Runtime()
    backend = await cluster.stack.enter_async_context(serve_app(runtime.app))
    s0, s1, s2 = await cluster.start_servers(3)
    [w0] = await cluster.start_workers([s0], backend_url=backend, MAX_CONCURRENCY="2")

    # Two long streams fill w0, the only worker yet: one from s0's own client, one that s1
    # sends across to s0.
    streaming = {s0.id: asyncio.Event(), s1.id: asyncio.Event()}
    long_s0, long_s1 = (
        asyncio.create_task(
            request(cluster, s, "long", stream=True, tokens=LONG, first=streaming[s.id].set)
        )
        for s in (s0, s1)
    )
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in streaming.values())), SETTLE)
    w1, w2 = await cluster.start_workers([s1, s2], backend_url=backend, MAX_CONCURRENCY="2")
    load = Load(cluster, [s0, s1, s2], lanes=3)
    await wait_for(
        lambda: load.answered(s0, s1, s2), what="answers through every server", timeout=SETTLE
    )

    killed_at = time.monotonic()
    load.halt(s0)
    assert -signal.SIGKILL == await s0.process.stop(signal.SIGKILL)
    right_after = await batch(cluster, [s1, s2], 12)
    moved = sorted({w0: s1.id, w1: s1.id, w2: s2.id}.items())  # w0 dials the next server
    doubled = []

    async def moved_and_listed_once() -> bool:
        for server in (s1, s2):
            state = await cluster.state(server)
            ids = [w["id"] for w in state["workers"]]
            if len(ids) != len(set(ids)):
                doubled.append((server.id, listed(state)))
            if listed(state) != moved or len(state["cluster"]["servers"]) != 2:
                return False
        return True

    await wait_for(moved_and_listed_once, what=f"the survivors to list {moved}", timeout=SETTLE)
    later = await batch(cluster, [s1, s2], 12)
    outcomes = await load.stop()  # a request that hung, or failed uncleanly, fails it here
    cut_s0, cut_s1 = await long_s0, await long_s1

    assert [] == failures(right_after + later)
    assert connection_lost(cut_s0.error), cut_s0
    # s1 is up: it ends the stream it was relaying with an error event.
    assert isinstance(cut_s1.error, openai.APIError), cut_s1
    assert not connection_lost(cut_s1.error), cut_s1
    assert cut_s0.ended - killed_at < 5, cut_s0
    assert cut_s1.ended - killed_at < 5, cut_s1
    through_s0 = [o for o in outcomes if o.server == s0.id and not o.ok]
    assert all(connection_lost(o.error) for o in through_s0), failures(through_s0)
    survivors = [o for o in outcomes if o.server != s0.id]
    assert [] == failures([o for o in survivors if o.started > killed_at])
    assert [] == doubled


async def test_without_redis_each_server_serves_its_own_workers(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    """Redis stops under load: every server says so and serves with its own worker; Redis
    back, every server lists every worker again, and once the load ends no server counts a
    request still in flight, nor holds back a worker it thinks busy."""
    runtime = Runtime()
    backend = await cluster.stack.enter_async_context(serve_app(runtime.app))
    servers = await cluster.start_servers(3)
    workers = await cluster.start_workers(servers, backend_url=backend, MAX_CONCURRENCY="2")
    load = Load(cluster, servers, lanes=3)
    await wait_for(
        lambda: load.answered(*servers), what="answers through every server", timeout=SETTLE
    )

    await redis_server.stop()

    async def alone() -> bool:
        for server, worker in zip(servers, workers, strict=True):
            if (await cluster.health(server))["cluster"] != "disconnected":
                return False
            state = await cluster.state(server)
            if state["cluster"]["connected"] or listed(state) != [(worker, server.id)]:
                return False
        return True

    await wait_for(alone, what="every server to serve alone", timeout=SETTLE)
    alone_batch = await batch(cluster, servers, 12)

    await redis_server.start()
    await cluster.settled(servers, dict(zip(workers, (s.id for s in servers), strict=True)))
    outcomes = await load.stop()

    assert [] == failures(alone_batch)
    assert [] == failures(outcomes)

    async def idle() -> bool:
        for server in servers:
            state = await cluster.state(server)
            busy = [w["inflight"] for w in state["workers"] if w["inflight"]]
            if state["server"]["jobs_inflight_total"] or busy:
                return False
        return True

    # Six streams through one server run at once on the six slots of the three workers:
    # that server counts no request of the outage on any of them.
    for server in servers:
        await wait_for(idle, what="every server to count nothing in flight", timeout=SETTLE)
        runtime.peak = 0
        assert [] == failures(await batch(cluster, [server], 6, stream=True, tokens=30))
        assert 6 == runtime.peak, server.id


def children_of(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from ``/proc``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.asynccontextmanager
async def one_connection() -> AsyncIterator[tuple[aiohttp.ClientSession, list[object]]]:
    """A client session that keeps one connection (a new one each time), and the list of the
    connections it opened: one, if every request of the session took the same."""
    opened: list[object] = []

    async def count(*_: object) -> None:
        opened.append(None)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(count)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1),
        trace_configs=[trace],
        timeout=aiohttp.ClientTimeout(total=CALL),
    ) as http:
        yield http, opened


async def which_process(http: aiohttp.ClientSession, url: str) -> str:
    """The cluster id of the server process on the other end of the session's connection."""
    async with http.get(url + "/healthz") as response:
        return str((await response.json())["server"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; SO_REUSEPORT spreads on Linux")
async def test_processes_share_one_port_and_one_pool(cluster: Cluster) -> None:
    """``serve --processes 2``: both processes join the cluster, a worker connected through the
    shared port answers requests that land on either process, and SIGTERM to the supervisor
    stops both (exit 0, no process left)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("serve", "--processes", "2", "--host", "127.0.0.1", "--port", str(port))
    supervisor = await cluster.stack.enter_async_context(
        cli_process(*args, env=cluster.env(DRAIN_TIMEOUT="5s"))
    )

    @cluster.stack.callback
    def kill_its_processes() -> None:
        """Should the test fail before they stop: each is in a process group of its own, so
        killing the supervisor (at the end of ``cli_process``) would not end them."""
        for pid in children_of(supervisor.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    await supervisor.wait_until(
        lambda: 2 == sum(e.get("event") == "cluster_joined" for e in supervisor.events),
        what="both processes to join",
        timeout=SETTLE,
    )
    children = children_of(supervisor.proc.pid)
    worker_env = cli_env(
        SERVER_URL=ws_url(url), WORKER_KEY=WORKER_KEY, BACKEND="demo", WORKER_ID="shared"
    )
    worker = await cluster.stack.enter_async_context(cli_process("work", env=worker_env))
    await worker.event("worker_registered", timeout=SETTLE)

    views: dict[str, dict[str, Any]] = {}

    async def both_list_both_and_the_worker() -> bool:
        async with one_connection() as (http, _):
            server_id = await which_process(http, url)
            async with http.get(url + "/api/v1/state", headers=AUTH) as response:
                views[server_id] = await response.json()
        return len(views) == 2 and all(
            len(view["cluster"]["servers"]) == 2
            and ["shared"] == [w["id"] for w in view["workers"]]
            for view in views.values()
        )

    await wait_for(
        both_list_both_and_the_worker,
        what="both processes to list it all",
        last=views,
        timeout=SETTLE,
    )
    [owner] = {w["server"] for view in views.values() for w in view["workers"]}
    assert owner in views

    answered: Counter[str] = Counter()
    for i in range(60):  # each connection lands on either process: both, long before 60
        async with one_connection() as (http, opened):
            server_id = await which_process(http, url)
            text = prompt(f"through {server_id} {i}")
            body = {"model": "demo", "messages": [{"role": "user", "content": text}]}
            async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as response:
                answer = (await response.json())["choices"][0]["message"]["content"]
        assert (echo(text), 1) == (answer, len(opened))  # answered by that process
        answered[server_id] += 1
        if len(answered) == 2:
            break
    assert set(views) == set(answered)  # the process without the worker answered too

    assert 0 == await supervisor.stop(signal.SIGTERM, timeout=SETTLE)
    stopped = [e["process"] for e in supervisor.events if e.get("event") == "server_stopped"]
    assert [0, 1] == sorted(stopped)  # each drained and stopped (a crash logs no such line)
    assert len(children) >= 2
    await wait_for(
        lambda: not any(alive(pid) for pid in children),
        what=f"the processes {children} to exit",
        timeout=5,
    )


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_processes_stop_when_their_supervisor_is_killed(cluster: Cluster) -> None:
    """A supervisor killed outright (SIGKILL) cannot forward a signal: its processes notice it
    is gone and stop on their own, draining as on SIGTERM, instead of serving on unwatched."""
    port = free_port()
    args = ("serve", "--processes", "2", "--host", "127.0.0.1", "--port", str(port))
    supervisor = await cluster.stack.enter_async_context(
        cli_process(*args, env=cluster.env(DRAIN_TIMEOUT="1s"))
    )
    await supervisor.wait_until(
        lambda: 2 == sum(e.get("event") == "cluster_joined" for e in supervisor.events),
        what="both processes to join",
        timeout=SETTLE,
    )
    children = children_of(supervisor.proc.pid)
    assert len(children) >= 2

    @cluster.stack.callback
    def kill_its_processes() -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    await supervisor.kill()
    await wait_for(
        lambda: not any(alive(pid) for pid in children),
        what=f"the processes {children} to stop on their own",
        timeout=SETTLE,
    )
