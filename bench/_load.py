"""What the load generator sends, how it checks each answer, and what it records."""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import attrs
import orjson
from multidict import CIMultiDictProxy

MODEL = "bench:latest"
PROMPT = "hello pool bench"
CHAT_PATH = "/v1/chat/completions"
#: What is measured: a label and whether the request asks for a stream.
KINDS = (("non-streamed", False), ("streamed", True))

Check = Callable[[int, "CIMultiDictProxy[str]", bytes], "str | None"]


def expected_text(prompt: str, tokens: int) -> str:
    """The echo backend's answer: ``echo:`` and the prompt's words, cycled to ``tokens`` words.

    Written out here rather than imported, so the check does not share code with what it checks.
    """
    words = ["echo:", *prompt.split()]
    return " ".join(words[i % len(words)] for i in range(tokens))


def request_body(*, stream: bool, tokens: int) -> bytes:
    message = {"role": "user", "content": PROMPT}
    return orjson.dumps(
        {"model": MODEL, "messages": [message], "max_tokens": tokens, "stream": stream}
    )


def check_plain(tokens: int) -> Check:
    """A non-streamed answer must be 200 with the echo as its one message."""
    want = expected_text(PROMPT, tokens)

    def check(status: int, headers: CIMultiDictProxy[str], body: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}"
        try:
            content = orjson.loads(body)["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return "body is not a chat completion"
        return None if content == want else "wrong content"

    return check


def check_stream(tokens: int) -> Check:
    """A stream must be 200 SSE: one event per token, a finish event, then ``[DONE]``."""
    want = expected_text(PROMPT, tokens)

    def check(status: int, headers: CIMultiDictProxy[str], body: bytes) -> str | None:
        if status != 200:
            return f"HTTP {status}"
        if not headers.get("Content-Type", "").startswith("text/event-stream"):
            return "not an event stream"
        events = body.split(b"\n\n")
        if events[-1] != b"" or events[-2] != b"data: [DONE]":
            return "stream does not end with [DONE]"
        if len(events) != tokens + 3:  # tokens, finish, [DONE], and the empty tail
            return f"{len(events) - 3} token events, expected {tokens}"
        try:
            pieces = [orjson.loads(e[6:])["choices"][0]["delta"] for e in events[:-2]]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return "malformed SSE event"
        text = "".join(p.get("content", "") for p in pieces)
        return None if text == want else "wrong content"

    return check


@attrs.frozen
class Target:
    """Where the load goes: the backend itself, or the pool in front of it."""

    name: str
    url: str
    headers: dict[str, str]


@attrs.define
class Outcome:
    """One measured phase: what came back, how fast, and what it cost each process."""

    latencies: list[float] = attrs.Factory(list)
    ttfbs: list[float] = attrs.Factory(list)
    #: Body reads (``iter_any`` chunks) the client needed for the answers that were right.
    reads: int = 0
    errors: Counter[str] = attrs.Factory(Counter)
    elapsed: float = 0.0
    cpu: dict[str, float] = attrs.Factory(dict)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


def summarize(rounds: list[Outcome]) -> dict[str, Any]:
    """Rounds of one phase together: the median round's rate, percentiles over every answer."""
    latencies = [x for o in rounds for x in o.latencies]
    ttfbs = [x for o in rounds for x in o.ttfbs]
    errors = sum((o.errors for o in rounds), Counter[str]())
    ok, elapsed = len(latencies), sum(o.elapsed for o in rounds)
    cpu: Counter[str] = Counter()
    for o in rounds:
        cpu.update(o.cpu)
    answered = max(1, ok + errors.total())
    return {
        "requests_ok": ok,
        "errors": dict(errors),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(statistics.median(o.rate for o in rounds), 1),
        "requests_per_s_rounds": [round(o.rate, 1) for o in rounds],
        "latency_ms": {"p50": ms(percentile(latencies, 50)), "p99": ms(percentile(latencies, 99))},
        "ttfb_ms": {"p50": ms(percentile(ttfbs, 50)), "p99": ms(percentile(ttfbs, 99))},
        "reads_per_answer": round(sum(o.reads for o in rounds) / ok, 1) if ok else None,
        "cpu_ms_per_request": {k: round(v * 1000 / answered, 3) for k, v in cpu.items()},
        "cpu_busy": {k: round(v / elapsed, 3) for k, v in cpu.items() if elapsed},
    }


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


async def load(
    session: aiohttp.ClientSession,
    target: Target,
    body: bytes,
    check: Check,
    *,
    requests: int,
    concurrency: int,
    max_seconds: float,
) -> Outcome:
    """Send ``requests`` requests from ``concurrency`` clients; stop early after ``max_seconds``."""
    outcome = Outcome()
    issued = itertools.count()
    url = target.url + CHAT_PATH
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds

    async def client() -> None:
        while next(issued) < requests and loop.time() < deadline:
            started = time.perf_counter()
            first = 0.0
            chunks: list[bytes] = []
            try:
                async with session.post(url, data=body, headers=target.headers) as resp:
                    async for chunk in resp.content.iter_any():
                        if not first:
                            first = time.perf_counter()
                        chunks.append(chunk)
                    done = time.perf_counter()
                    error = check(resp.status, resp.headers, b"".join(chunks))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = type(exc).__name__
            if error is not None:
                outcome.errors[error] += 1
                continue
            outcome.latencies.append(done - started)
            outcome.ttfbs.append((first or done) - started)
            outcome.reads += len(chunks)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    outcome.elapsed = time.perf_counter() - started
    return outcome
