"""Named worker keys (``WORKER_KEYS_FILE``): what a key's workers may advertise, how many may
connect, and revocation by a changed file, SIGHUP or expiry disconnecting them at once."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType

from llamapool.config import WorkConfig
from llamapool.errors import ConfigError
from llamapool.plugin_api import BackendSettings
from llamapool.protocol import (
    CLOSE_KEY_FULL,
    CLOSE_POLICY,
    REASON_UNAUTHORIZED,
    ModelsUpdate,
    Register,
    encode,
)
from llamapool.server.appkeys import MCP, WORKER_KEYS
from llamapool.server.keyfile import ANONYMOUS, parse_worker_keys, read_worker_keys_file
from llamapool.worker.agent import Agent
from llamapool.worker.loader import load_backend

from .cli_helpers import running_server, ws_url
from .conftest import API_KEY, WORKER_KEY, PoolServer, StartServer, wait_for
from .keys_helpers import captured_events, write_keys

GPU = "wk-gpu-box-0123456789"
LAPTOP = "wk-laptop-0123456789"
Socket = aiohttp.ClientWebSocketResponse[bool]


def keys_file(path: Path, *entries: str) -> Path:
    """A worker keys file of ``entries``, each the YAML lines of one key after ``- ``."""
    body = "".join("  - " + "\n    ".join(entry.strip().splitlines()) + "\n" for entry in entries)
    return write_keys(path, "keys:\n" + body)


def gpu(extra: str = "") -> str:
    return f"name: gpu-box\nkey: {GPU}\n{extra}"


@contextlib.asynccontextmanager
async def connected(url: str, key: str, worker_id: str, models: list[str]) -> AsyncIterator[Socket]:
    """A raw worker's socket, its register sent; closed when the block ends."""
    register = Register(worker_id=worker_id, worker_key=key, models=models, max_concurrency=1)
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(encode(register))
        yield ws


async def closed_with(ws: Socket) -> tuple[int | None, str]:
    """The code and reason the server closed ``ws`` with (what it sent before is skipped)."""
    msg = await asyncio.wait_for(ws.receive(), 10)
    while msg.type is WSMsgType.TEXT:
        msg = await asyncio.wait_for(ws.receive(), 10)
    assert WSMsgType.CLOSE == msg.type
    return ws.close_code, str(msg.extra)


def models_of(server: PoolServer, worker_id: str) -> frozenset[str] | None:
    worker = server.pool.get(worker_id)
    return None if worker is None else worker.models


async def file_server(start_server: StartServer, path: Path, **overrides: Any) -> PoolServer:
    return await start_server(worker_keys_file=str(path), keys_poll_interval=0.05, **overrides)


def test_a_worker_keys_file_has_the_keys_file_layout_with_worker_fields() -> None:
    """Each entry has name, key or hash, models, max_workers, expires and disabled; a client
    key's field is reported with its line."""
    text = "keys:\n  - name: gpu-box\n    key_sha256: " + "ab" * 32 + "\n"
    text += "    models: [llama3*]\n    max_workers: 2\n    expires: 2030-01-01\n"
    (key,) = parse_worker_keys(text, source="w.yaml")
    with pytest.raises(ConfigError) as error:
        parse_worker_keys("keys:\n  - name: a\n    key: 0123456789\n    rpm: 5\n", source="w.yaml")

    assert ("gpu-box", ("llama3*",), 2) == (key.name, key.models, key.max_workers)
    assert datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp() == key.expires
    assert "w.yaml:4: unknown field 'rpm'" == str(error.value)


async def test_models_outside_the_keys_globs_are_refused_at_register_and_on_update(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A worker serves only the models its key's globs match, from its register and from its
    models updates; what is refused is logged once per change; the state names its key."""
    path = keys_file(tmp_path / "workers.yaml", gpu("models: ['llama3*', 'nomic-*']"))
    server = await file_server(start_server, path)
    with captured_events() as events:
        async with connected(server.ws_url, GPU, "w1", ["llama3:8b", "qwen:7b"]) as ws:
            await wait_for(lambda: server.pool.get("w1") is not None, what="the worker")
            registered = models_of(server, "w1")
            await ws.send_str(encode(ModelsUpdate(models=["llama3:70b", "mistral", "qwen:7b"])))
            await wait_for(
                lambda: frozenset({"llama3:70b"}) == models_of(server, "w1"), what="the update"
            )
            async with (
                aiohttp.ClientSession() as http,
                http.get(server.url + "/api/v1/state", headers=server.auth) as resp,
            ):
                (state,) = (await resp.json())["workers"]

    refused = [e["models"] for e in events if e["event"] == "worker_models_refused"]
    assert frozenset({"llama3:8b"}) == registered
    assert [["qwen:7b"], ["mistral", "qwen:7b"]] == refused
    assert ("gpu-box", ["llama3:70b"]) == (state["key"], state["models_supported"])


async def test_max_workers_refuses_more_connections_with_a_retryable_close(
    start_server: StartServer, tmp_path: Path
) -> None:
    """With ``max_workers: 1`` a second worker is closed with 4003 and a reason naming the key
    (a worker retries that), and gets in once the first has left."""
    path = keys_file(tmp_path / "workers.yaml", gpu("max_workers: 1"))
    server = await file_server(start_server, path)
    async with connected(server.ws_url, GPU, "w1", ["m"]):
        await wait_for(lambda: server.pool.get("w1") is not None, what="the first worker")
        async with connected(server.ws_url, GPU, "w2", ["m"]) as second:
            refused = await closed_with(second)
    await wait_for(lambda: server.pool.get("w1") is None, what="the first worker to leave")
    async with connected(server.ws_url, GPU, "w2", ["m"]):
        await wait_for(lambda: server.pool.get("w2") is not None, what="the second worker")

    assert CLOSE_KEY_FULL == refused[0]
    assert "worker key 'gpu-box' has its max_workers (1) connected" == refused[1]


async def test_disabling_a_key_in_the_file_disconnects_its_worker_which_stops(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A worker whose key is disabled is out of the pool at once and closed with 1008
    ``unauthorized``: the real worker stops with that error instead of retrying."""
    path = keys_file(tmp_path / "workers.yaml", gpu(), f"name: laptop\nkey: {LAPTOP}")
    server = await file_server(start_server, path)
    backend = load_backend("demo")(BackendSettings(url="", api_key=""))
    cfg = WorkConfig(server_url=server.ws_url, worker_key=GPU, worker_id="real-1")
    agent = Agent(cfg, backend, backend_name="demo")
    running = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: server.pool.get("real-1") is not None, what="the worker")
        async with connected(server.ws_url, LAPTOP, "laptop-1", ["m"]):
            await wait_for(lambda: server.pool.get("laptop-1") is not None, what="the laptop")
            keys_file(path, gpu("disabled: true"), f"name: laptop\nkey: {LAPTOP}")
            with pytest.raises(ConfigError) as error:
                await asyncio.wait_for(running, 10)
            laptop_stays = server.pool.get("laptop-1") is not None
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    assert "the server rejected this worker: unauthorized" == str(error.value)
    assert None is server.pool.get("real-1")
    assert laptop_stays
    assert 0 == server.server.app[WORKER_KEYS].connected("gpu-box")


async def test_a_removed_key_and_an_expired_key_disconnect_their_workers(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Removing a key from the file, or reaching its ``expires``, closes its workers with 1008
    ``unauthorized``; a changed ``models`` narrows a connected worker without a reconnect."""
    path = keys_file(
        tmp_path / "workers.yaml",
        gpu(),
        f"name: laptop\nkey: {LAPTOP}\nexpires: 2030-01-01",
    )
    server = await file_server(start_server, path)
    store = server.server.app[WORKER_KEYS]
    async with (
        connected(server.ws_url, GPU, "w1", ["a", "b"]) as removed,
        connected(server.ws_url, LAPTOP, "w2", ["a"]) as expired,
    ):
        await wait_for(lambda: len(server.pool) == 2, what="both workers")
        keys_file(path, gpu("models: [b]"), f"name: laptop\nkey: {LAPTOP}\nexpires: 2030-01-01")
        await wait_for(
            lambda: frozenset({"b"}) == models_of(server, "w1"), what="the narrowed models"
        )
        keys_file(path, f"name: laptop\nkey: {LAPTOP}\nexpires: 2030-01-01")
        removed_close = await closed_with(removed)
        store.expire(now=datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc).timestamp())
        expired_close = await closed_with(expired)

    assert (CLOSE_POLICY, REASON_UNAUTHORIZED) == removed_close
    assert (CLOSE_POLICY, REASON_UNAUTHORIZED) == expired_close
    assert 0 == len(server.pool)


async def test_worker_key_still_works_beside_the_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    """``WORKER_KEY`` keys connect as ``anonymous`` beside the file's keys; a wrong key and a
    disabled one are refused alike."""
    path = keys_file(
        tmp_path / "workers.yaml", gpu(), f"name: laptop\nkey: {LAPTOP}\ndisabled: true"
    )
    server = await file_server(start_server, path, worker_keys=WORKER_KEY)
    async with connected(server.ws_url, WORKER_KEY, "plain", ["m"]):
        await wait_for(lambda: server.pool.get("plain") is not None, what="the worker")
        credential = [w.credential for w in server.pool]
        closes = []
        for key in ("wrong-key-0123456789", LAPTOP):
            async with connected(server.ws_url, key, "other", ["m"]) as ws:
                closes.append(await closed_with(ws))

    assert [ANONYMOUS] == credential
    assert [(CLOSE_POLICY, REASON_UNAUTHORIZED)] * 2 == closes


async def test_sighup_reloads_the_worker_keys_file(tmp_path: Path) -> None:
    """``llamapool serve`` reads WORKER_KEYS_FILE again on SIGHUP and disconnects the workers
    of a key no longer in it."""
    path = keys_file(tmp_path / "workers.yaml", gpu())
    async with running_server(
        WORKER_KEYS_FILE=str(path), KEYS_POLL_INTERVAL="1h", API_KEY=API_KEY
    ) as (server, url):
        async with connected(ws_url(url), GPU, "w1", ["m"]) as ws:
            registered = await server.event("worker_registered")
            keys_file(path, f"name: laptop\nkey: {LAPTOP}")
            server.proc.send_signal(signal.SIGHUP)
            close = await closed_with(ws)
        revoked = await server.event("worker_key_revoked")
        assert None is server.proc.returncode

    assert "gpu-box" == registered["credential"]
    assert (CLOSE_POLICY, REASON_UNAUTHORIZED) == close
    assert ("gpu-box", "removed") == (revoked["credential"], revoked["reason"])


def test_the_example_worker_keys_file_parses() -> None:
    """contrib/env/worker-keys.yaml, the commented example, is a valid worker keys file."""
    path = Path(__file__).parent.parent / "contrib" / "env" / "worker-keys.yaml"

    assert ["lab-gpus", "bobs-laptop"] == [k.name for k in read_worker_keys_file(path)]


@contextlib.asynccontextmanager
async def relay_connected(url: str, key: str, mcp_id: str) -> AsyncIterator[Socket]:
    """A raw MCP relay's socket, its register sent; closed when the block ends."""
    register = Register(
        worker_key=key, worker_name=mcp_id, kind="mcp", mcp_id=mcp_id, mcp_token_sha256="ab" * 32
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(encode(register))
        yield ws


async def test_an_mcp_relay_holds_its_worker_key_like_a_worker(
    start_server: StartServer, tmp_path: Path
) -> None:
    """An MCP relay counts against its key's ``max_workers`` (beside workers), and a disabled
    key disconnects it at once with 1008 ``unauthorized``, its endpoint gone."""
    path = keys_file(tmp_path / "workers.yaml", gpu("max_workers: 2"))
    server = await file_server(start_server, path)
    endpoints = server.server.app[MCP].endpoints
    async with (
        connected(server.ws_url, GPU, "w1", ["m"]),
        relay_connected(server.ws_url, GPU, "tools") as relay,
    ):
        await wait_for(lambda: "tools" in endpoints, what="the relay's endpoint")
        async with relay_connected(server.ws_url, GPU, "more-tools") as third:
            full = await closed_with(third)
        keys_file(path, gpu("max_workers: 2\ndisabled: true"))
        revoked = await closed_with(relay)

    assert CLOSE_KEY_FULL == full[0]
    assert "worker key 'gpu-box' has its max_workers (2) connected" == full[1]
    assert (CLOSE_POLICY, REASON_UNAUTHORIZED) == revoked
    assert "tools" not in endpoints
    assert 0 == server.server.app[WORKER_KEYS].connected("gpu-box")
