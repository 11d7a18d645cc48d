"""Chaos: steady load over a pool of real ``serve`` and ``work`` processes while workers are
killed and restarted, links are cut mid-stream and the server restarts.

Every request must end (an answer or a clean error; a hung request fails the test), every
answer must be the echo of its own prompt, every request that had not started on a worker
when it died must be retried elsewhere and succeed, and afterwards the pool must be whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from llamapool.testing import create_fake_ollama_app, serve_app

from .cli_helpers import CliProcess, cli_env, cli_process
from .conftest import API_KEY, WORKER_KEY, until, wait_for
from .resilience_helpers import MODEL, Answer, chat, echo_of, free_port
from .tcp_proxy import TcpProxy

WORKERS = 4
CONCURRENCY = 3
REQUESTS = 400
CLIENTS = 12
FINAL_ROUND = 40
#: The longest one attempt of one request may take before it counts as hung.
HANG = 20.0
#: Connection attempts per request while the server is away, and the pause between them.
CONNECT_RETRIES, CONNECT_PAUSE = 150, 0.1
#: Seconds any chaos step (a restart, a reconnect) may take.
STEP = 15.0
TOKEN_DELAY = 0.02


# --- fake backends that the test can freeze -------------------------------------------------


class Runtime:
    """A fake Ollama with a "time to first token", which the test can freeze: requests held
    there have reached the worker's backend but the worker has sent nothing back yet."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.app = create_fake_ollama_app(models=[MODEL], chunk_delay=TOKEN_DELAY)
        self.app.middlewares.append(self.middleware)
        self.thawed = asyncio.Event()
        self.thawed.set()
        #: Prompts between arrival and first byte, and how many answers are streaming.
        self.waiting: collections.Counter[str] = collections.Counter()
        self.streaming = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "GET":
            return await handler(request)
        prompt = orjson.loads(await request.read())["messages"][-1]["content"]
        self.waiting[prompt] += 1
        try:
            await asyncio.sleep(self.rng.uniform(0.01, 0.15))
            await self.thawed.wait()
        finally:
            self.waiting[prompt] -= 1
            if not self.waiting[prompt]:
                del self.waiting[prompt]
        self.streaming += 1
        try:
            return await handler(request)
        finally:
            self.streaming -= 1


# --- the pool -------------------------------------------------------------------------------


class Pool:
    """The ``serve`` process, the ``work`` processes, their fake runtimes and links."""

    def __init__(self, stack: contextlib.AsyncExitStack, port: int) -> None:
        self.stack = stack
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.server: CliProcess | None = None
        #: Every server process started, for their logs.
        self.servers: list[CliProcess] = []
        self.workers: dict[str, CliProcess] = {}
        self.runtimes: dict[str, Runtime] = {}
        self.runtime_urls: dict[str, str] = {}
        self.links: dict[str, TcpProxy] = {}
        #: Monotonic times of server SIGKILLs (requests in flight then may fail).
        self.server_kills: list[float] = []

    async def start_server(self) -> None:
        env = cli_env(API_KEY=API_KEY, WORKER_KEY=WORKER_KEY)
        args = ("--host", "127.0.0.1", "--port", str(self.port), "--drain-timeout", "10s")
        args += ("--queue-timeout", "10s", "--request-timeout", "15s")
        self.server = await self.stack.enter_async_context(cli_process("serve", *args, env=env))
        self.servers.append(self.server)
        await self.server.event("server_listening", timeout=STEP)

    async def start_worker(self, worker_id: str) -> None:
        env = cli_env(
            SERVER_URL=f"ws://127.0.0.1:{self.links[worker_id].port}/workers/connect",
            WORKER_KEY=WORKER_KEY,
            BACKEND_URL=self.runtime_urls[worker_id],
        )
        args = ("--backend", "ollama", "--worker-id", worker_id, "--worker-name", worker_id)
        args += ("--max-concurrency", str(CONCURRENCY), "--reconnect-max", "0.3s")
        worker = await self.stack.enter_async_context(cli_process("work", *args, env=env))
        self.workers[worker_id] = worker
        await worker.event("worker_registered", timeout=STEP)

    async def state(self) -> dict[str, Any] | None:
        """``/api/v1/state``, or ``None`` while the server is away."""
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    self.url + "/api/v1/state",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=aiohttp.ClientTimeout(total=2),
                ) as resp,
            ):
                data: dict[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def connected(self) -> list[str]:
        """Ids of the workers the server lists as connected (sorted, duplicates kept)."""
        state = await self.state()
        if state is None:
            return []
        return sorted(w["id"] for w in state["workers"] if w["status"] != "gone")

    async def until(self, check: Callable[[list[str]], bool], what: str) -> None:
        await until(self.connected, check, what=what, timeout=STEP)

    async def whole(self) -> None:
        ids = sorted(self.workers)
        await self.until(lambda connected: ids == connected, "every worker to be registered")


# --- the load -------------------------------------------------------------------------------


@attrs.define
class Outcome:
    """How one request ended for its client."""

    index: int
    prompt: str
    stream: bool
    kind: str = "pending"
    detail: str = ""
    connect_retries: int = 0
    no_worker_retries: int = 0
    started: float = 0.0
    ended: float = 0.0


async def one_request(http: aiohttp.ClientSession, url: str, outcome: Outcome) -> None:
    """Send one request, retrying only while it could not reach the server (or the server had
    no worker yet after a restart); record how it ended."""
    body = chat(outcome.prompt, stream=outcome.stream)
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": f"chaos-{outcome.index}"}
    answered = False

    async def attempt() -> Answer:
        nonlocal answered
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            answered = True
            return Answer(resp.status, dict(resp.headers), await resp.read())

    for _ in range(CONNECT_RETRIES):
        outcome.started, answered = time.monotonic(), False
        try:
            answer = await asyncio.wait_for(attempt(), HANG)
        except asyncio.TimeoutError:
            outcome.kind, outcome.ended = "hung", time.monotonic()
            return
        except aiohttp.ClientError as exc:
            outcome.ended = time.monotonic()
            if answered:  # the connection dropped in the middle of the answer
                outcome.kind, outcome.detail = "cut", repr(exc)
                return
            outcome.connect_retries += 1
            await asyncio.sleep(CONNECT_PAUSE)
            continue
        outcome.ended = time.monotonic()
        if answer.status == 404 and b"model_not_found" in answer.body:
            outcome.no_worker_retries += 1  # a restarted server whose workers are not back yet
            await asyncio.sleep(CONNECT_PAUSE)
            continue
        classify(outcome, answer)
        return
    outcome.kind = "gave_up"


def classify(outcome: Outcome, answer: Answer) -> None:
    if answer.status != 200:
        outcome.kind, outcome.detail = f"http_{answer.status}", answer.body.decode()[:200]
    elif outcome.stream and answer.stream_error is not None:
        outcome.kind, outcome.detail = "stream_error_event", answer.stream_error
    elif outcome.stream and (not answer.events or answer.events[-1] != "[DONE]"):
        outcome.kind, outcome.detail = "truncated", answer.body.decode()[-200:]
    elif answer.text != echo_of(outcome.prompt):
        outcome.kind, outcome.detail = "wrong", answer.text[:200]
    else:
        outcome.kind = "ok"


def make_requests(first: int, count: int, rng: random.Random) -> list[Outcome]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    outcomes = []
    for i in range(first, first + count):
        length = 60 if i % 5 == 0 else rng.randint(3, 15)  # some long streams
        prompt = f"req{i} " + " ".join(rng.choice(words) for _ in range(length))
        outcomes.append(Outcome(i, prompt, stream=i % 3 != 0))
    return outcomes


async def run_load(url: str, outcomes: list[Outcome], done: list[int]) -> None:
    """Send every request with ``CLIENTS`` concurrent clients; ``done[0]`` counts the ended."""
    queue = collections.deque(outcomes)

    async def client() -> None:
        async with aiohttp.ClientSession() as http:
            while queue:
                outcome = queue.popleft()
                await one_request(http, url, outcome)
                done[0] += 1

    await asyncio.gather(*(client() for _ in range(CLIENTS)))


# --- chaos ----------------------------------------------------------------------------------


@attrs.define
class Chaos:
    """What the chaos did, to check the load's outcomes against."""

    #: Prompts held before their first byte on a worker when it died or its link was cut.
    not_started: set[str] = attrs.Factory(set)
    #: Streams in progress on a worker when it died or its link was cut.
    mid_stream: int = 0
    events: list[str] = attrs.Factory(list)


async def when_done(done: list[int], count: int) -> None:
    await wait_for(lambda: done[0] >= count, timeout=120, what=f"{count} requests to end")


async def lose_worker(pool: Pool, chaos: Chaos, worker_id: str, *, kill: bool) -> None:
    """Kill a worker (SIGKILL, then start it again) or cut its link, at a moment when it holds
    a request it has not answered yet and, if possible, a stream in progress."""
    runtime = pool.runtimes[worker_id]
    with contextlib.suppress(AssertionError):  # a stream in progress is welcome, not required
        await wait_for(lambda: runtime.streaming > 0, timeout=3, what="a stream")
    runtime.thawed.clear()
    try:
        await wait_for(lambda: bool(runtime.waiting), timeout=STEP, what="an unanswered request")
        with contextlib.suppress(AssertionError):  # more are welcome, beside a stream
            await wait_for(
                lambda: sum(runtime.waiting.values()) >= 2 and runtime.streaming > 0,
                timeout=1.5,
                what="two unanswered requests beside a stream",
            )
        chaos.not_started |= set(runtime.waiting)
        chaos.mid_stream += runtime.streaming
        if kill:
            worker = pool.workers[worker_id]
            worker.proc.send_signal(signal.SIGKILL)
            await worker.wait(timeout=STEP)
        else:
            pool.links[worker_id].cut()
    finally:
        runtime.thawed.set()
    chaos.events.append(f"{'killed' if kill else 'cut'} {worker_id}")
    if kill:
        await pool.until(lambda ids: worker_id not in ids, f"{worker_id} to leave")
        await pool.start_worker(worker_id)
    await pool.whole()


async def restart_server(pool: Pool, chaos: Chaos, sig: signal.Signals) -> None:
    """Stop the server (SIGTERM drains, SIGKILL does not) and start it again on its port."""
    server = pool.server
    assert server is not None
    if sig == signal.SIGKILL:
        pool.server_kills.append(time.monotonic())
    code = await server.stop(sig, timeout=STEP)
    assert (0 if sig == signal.SIGTERM else -signal.SIGKILL) == code, server.describe()
    chaos.events.append(f"server {sig.name}")
    await pool.start_server()
    await pool.whole()


async def run_chaos(pool: Pool, chaos: Chaos, done: list[int]) -> None:
    await when_done(done, 50)
    await lose_worker(pool, chaos, "w1", kill=True)
    await when_done(done, 110)
    await lose_worker(pool, chaos, "w2", kill=False)
    await when_done(done, 170)
    await restart_server(pool, chaos, signal.SIGTERM)
    await when_done(done, 230)
    await lose_worker(pool, chaos, "w3", kill=True)
    await when_done(done, 290)
    await restart_server(pool, chaos, signal.SIGKILL)
    await when_done(done, 340)
    await lose_worker(pool, chaos, "w0", kill=False)


# --- the test -------------------------------------------------------------------------------


def server_log(pool: Pool) -> dict[str, list[dict[str, Any]]]:
    """Each request's ``request_done`` events across every server process, by request id."""
    attempts: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for server in pool.servers:
        for event in server.events:
            if event.get("event") == "request_done":
                attempts[str(event.get("request_id"))].append(event)
    return attempts


def explain(outcome: Outcome, attempts: list[dict[str, Any]], kills: list[float]) -> str:
    """Why a request failed, if the chaos explains it; ``""`` if nothing does."""
    if any(
        e["outcome"] == "error" and e["status"] == 200 and "disconnected" in str(e["error"])
        for e in attempts
    ):
        return "mid_stream_on_lost_worker"
    if any(outcome.started <= t <= outcome.ended for t in kills):
        return "in_flight_on_killed_server"
    return ""


@contextlib.asynccontextmanager
async def chaos_pool() -> AsyncIterator[Pool]:
    rng = random.Random(4)
    async with contextlib.AsyncExitStack() as stack:
        pool = Pool(stack, free_port())
        await pool.start_server()
        for i in range(WORKERS):
            worker_id = f"w{i}"
            runtime = pool.runtimes[worker_id] = Runtime(rng)
            pool.runtime_urls[worker_id] = await stack.enter_async_context(serve_app(runtime.app))
            link = pool.links[worker_id] = TcpProxy(pool.port)
            await link.start()
            stack.push_async_callback(link.close)
            await pool.start_worker(worker_id)
        await pool.whole()
        yield pool


async def test_the_pool_survives_chaos_without_losing_a_request() -> None:
    """Under load and chaos every request ends cleanly, unstarted ones succeed, the pool heals."""
    rng = random.Random(9)
    outcomes = make_requests(0, REQUESTS, rng)
    chaos = Chaos()
    done = [0]
    async with chaos_pool() as pool:
        started = time.monotonic()
        load = asyncio.create_task(run_load(pool.url, outcomes, done))
        try:
            await run_chaos(pool, chaos, done)
            await asyncio.wait_for(asyncio.shield(load), 120)
        finally:
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        took = time.monotonic() - started

        await pool.whole()
        final = make_requests(REQUESTS, FINAL_ROUND, rng)
        await run_load(pool.url, final, [0])
        state = await pool.state()
        attempts = server_log(pool)

    kinds = collections.Counter(o.kind for o in outcomes)
    failed = [o for o in outcomes if o.kind != "ok"]
    reasons = collections.Counter(
        explain(o, attempts.get(f"chaos-{o.index}", []), pool.server_kills) for o in failed
    )
    retried = {
        rid for rid, events in attempts.items() if any(e.get("attempt", 1) > 1 for e in events)
    }
    by_prompt = {o.prompt: o for o in outcomes}
    by_id = {f"chaos-{o.index}": o for o in outcomes}
    retried_outcomes = [by_id[rid] for rid in sorted(retried) if rid in by_id]
    print(
        f"\nchaos: {len(outcomes)} sent in {took:.1f}s over {WORKERS} workers "
        f"({', '.join(chaos.events)}); outcomes {dict(kinds)}; errors explained by "
        f"{dict(reasons)}; retried on another worker {len(retried)} "
        f"(held unstarted at a loss {len(chaos.not_started)}, streams in progress at a loss "
        f"{chaos.mid_stream}); client reconnects {sum(o.connect_retries for o in outcomes)}, "
        f"404s while workers re-registered {sum(o.no_worker_retries for o in outcomes)}; "
        f"final round {collections.Counter(o.kind for o in final)}"
    )

    assert [] == [(o.index, o.kind) for o in outcomes if o.kind in ("hung", "wrong", "pending")]
    assert [] == [
        (o.index, o.kind, o.detail)
        for o in failed
        if not explain(o, attempts.get(f"chaos-{o.index}", []), pool.server_kills)
    ]
    assert reasons["mid_stream_on_lost_worker"] <= chaos.mid_stream
    assert chaos.not_started, "no request was caught unstarted by a worker loss"
    assert [] == [
        (p, by_prompt[p].kind) for p in sorted(chaos.not_started) if by_prompt[p].kind != "ok"
    ]
    assert [] == [(o.index, o.kind) for o in retried_outcomes if o.kind != "ok"]
    assert ["ok"] * FINAL_ROUND == [o.kind for o in final]
    assert state is not None
    assert [f"w{i}" for i in range(WORKERS)] == sorted(w["id"] for w in state["workers"])
