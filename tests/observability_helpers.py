"""Helpers for the tests that compare what /metrics, the state API and /status say with what
happened: real requests, and readers for Prometheus text, server-sent events and usage."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from llamapool.plugin_api import BackendSettings
from llamapool_ollama import OllamaBackend

from .conftest import PoolServer, until

MODEL = "llama3:8b"
#: Seconds a polling helper waits for its condition before it fails the test.
WAIT = 5.0
#: Listed by its worker, unknown to the runtime: the runtime answers 404.
GHOST = "ghost:7b"
#: Served by a runtime that answers 500 to everything.
BROKEN = "broken:1b"
#: Served by a worker whose runtime does not listen: no response headers ever come.
DOWN = "down:1b"
#: Asked for by clients, served by nobody: must never become a label.
UNKNOWN = "nope-unknown:1b"
#: Seconds between two tokens of the fake runtime.
DELAY = 0.05


def chat(prompt: str, *, stream: bool, model: str = MODEL, usage: bool = False) -> dict[str, Any]:
    """An OpenAI or Ollama chat body; ``usage`` asks an OpenAI stream for its usage event."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    return body


class FixedModels(OllamaBackend):
    """An Ollama-style backend whose model list is fixed: its runtime may fail every request,
    or not listen at all, and the worker still offers these models."""

    def __init__(self, url: str, models: Iterable[str]) -> None:
        super().__init__(BackendSettings(url=url))
        self.models = list(models)

    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        return list(self.models)


async def post(
    server: PoolServer, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """POST ``body`` through the pool with the test key (unless ``headers`` replace it)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.url + path, json=body, headers=server.auth if headers is None else headers
        ) as resp,
    ):
        return resp.status, await resp.read()


async def status_of(
    server: PoolServer, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
) -> int:
    """The status of one request through the pool (its body read and dropped)."""
    return (await post(server, path, body, headers=headers))[0]


async def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        assert 200 == resp.status, await resp.text()
        return await resp.json()


async def get_state(server: PoolServer) -> dict[str, Any]:
    """``GET /api/v1/state``."""
    state: dict[str, Any] = await get_json(server.url + "/api/v1/state", server.auth)
    return state


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def cancel_mid_stream(
    server: PoolServer, body: dict[str, Any], *, path: str = "/api/chat"
) -> bytes:
    """Start a stream, read its first line, and hang up."""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(server.url + path, json=body, headers=server.auth)
        first = await resp.content.readline()
        resp.close()
    return first


@contextlib.asynccontextmanager
async def streams_running(server: PoolServer, count: int) -> AsyncIterator[None]:
    """``count`` slow streams in progress (each has sent its first line) for the block."""
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        for i in range(count):
            resp = await stack.enter_async_context(
                http.post(
                    server.url + "/api/chat",
                    json=chat("slow " * 200 + str(i), stream=True),
                    headers=server.auth,
                )
            )
            assert b"echo:" in await resp.content.readline()
        yield


async def state_until(
    server: PoolServer,
    condition: Callable[[dict[str, Any]], bool],
    *,
    what: str,
    timeout: float = WAIT,
) -> dict[str, Any]:
    """``GET /api/v1/state`` until ``condition`` holds."""
    return await until(lambda: get_state(server), condition, what=what, timeout=timeout)


async def settled(server: PoolServer) -> dict[str, Any]:
    """The state once no request is in flight: a client may read the end of an answer a moment
    before the server has booked it."""
    return await state_until(
        server, lambda s: 0 == s["server"]["jobs_inflight_total"], what="requests to finish"
    )


# --- Prometheus -----------------------------------------------------------------------------

Key = tuple[str, frozenset[tuple[str, str]]]


class Metrics:
    """One scrape of a Prometheus endpoint, parsed by the reference parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def labels(self, name: str) -> list[dict[str, str]]:
        """The label sets of every sample named ``name``."""
        return [dict(ls) for (n, ls) in self.samples if n == name]


async def scrape(url: str) -> Metrics:
    """``GET {url}/metrics``."""
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert 200 == resp.status
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Metrics(await resp.text())


async def scrape_until(
    url: str, condition: Callable[[Metrics], bool], *, what: str, timeout: float = WAIT
) -> Metrics:
    """Scrape until ``condition`` holds (what happened after a response may lag it a little)."""
    return await until(lambda: scrape(url), condition, what=what, timeout=timeout)


# --- usage as a client reads it -------------------------------------------------------------


def client_usage(path: str, raw: bytes) -> tuple[int, int]:
    """The (in, out) tokens an answer reports, read the way a client reads them (0, 0 if none)."""
    if path.startswith("/v1/"):
        if raw.startswith(b"data: "):
            found = (0, 0)
            for line in raw.split(b"\n"):
                payload = line.removeprefix(b"data: ").strip()
                if line.startswith(b"data: ") and payload != b"[DONE]":
                    usage = orjson.loads(payload).get("usage")
                    if usage:
                        found = (usage["prompt_tokens"], usage.get("completion_tokens", 0))
            return found
        usage = orjson.loads(raw).get("usage") or {}
        return usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    last = orjson.loads([line for line in raw.split(b"\n") if line.strip()][-1])
    return last.get("prompt_eval_count", 0), last.get("eval_count", 0)


# --- server-sent events ---------------------------------------------------------------------


class SSEReader:
    """Reads one SSE response event by event: a ``data`` payload, or a ``:`` comment."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = WAIT) -> tuple[str, str]:
        """The next event as ``("data", payload)`` or ``("comment", text)``."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> tuple[str, str]:
        data: list[str] = []
        comment = ""
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\r\n")
            if line == "":
                if data:
                    return "data", "\n".join(data)
                if comment:
                    return "comment", comment
            elif line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))

    async def snapshot(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next state snapshot, skipping keep-alive comments."""
        return await self.snapshot_where(lambda _: True, timeout=timeout)

    async def snapshot_where(
        self, condition: Callable[[dict[str, Any]], bool], *, timeout: float = WAIT
    ) -> dict[str, Any]:
        """The first snapshot for which ``condition`` holds."""

        async def find() -> dict[str, Any]:
            while True:
                kind, payload = await self._next()
                if kind == "data":
                    snapshot: dict[str, Any] = orjson.loads(payload)
                    if condition(snapshot):
                        return snapshot

        return await asyncio.wait_for(find(), timeout)
