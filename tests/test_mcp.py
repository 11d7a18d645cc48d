"""Private MCP endpoints: the official ``mcp`` SDK on both sides of a real relay and server.

The MCP server is ``tests/mcp_server.py`` (stdio, or Streamable HTTP with ``--http``); the
relay is ``python -m llamapool mcp`` in a subprocess; the client is the SDK's ``Client`` over
Streamable HTTP at ``/api/mcp/id/<id>`` of an in-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import mcp.types as types
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.cli_helpers import CliProcess, cli_env, cli_process
from tests.conftest import WORKER_KEY, PoolServer, StartServer, wait_for

# The sampling capability is deprecated by the 2026-07-28 revision; the relay still carries it.
pytestmark = pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")

SERVER_SCRIPT = Path(__file__).parent / "mcp_server.py"
STDIO = ("--command", f"{shlex.quote(sys.executable)} {shlex.quote(str(SERVER_SCRIPT))}")


@contextlib.asynccontextmanager
async def relay(
    server: PoolServer, *args: str, markers: Path, mcp_id: str = "tools"
) -> AsyncIterator[CliProcess]:
    """A ``llamapool mcp`` process, registered with ``server``."""
    env = cli_env(WORKER_KEY=WORKER_KEY, MCP_TEST_MARKERS=str(markers))
    args = ("mcp", "--server-url", server.ws_url, "--id", mcp_id, *args)
    async with cli_process(*args, env=env) as proc:
        await proc.event("relay_registered")
        yield proc


@contextlib.asynccontextmanager
async def client(
    server: PoolServer, mcp_id: str = "tools", **options: Any
) -> AsyncIterator[Client]:
    """A connected SDK client of the pool's endpoint ``mcp_id``, with the API key."""
    headers = {**server.auth, **options.pop("headers", {})}
    url = f"{server.url}/api/mcp/id/{mcp_id}"
    async with create_mcp_http_client(headers=headers) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, cache=None, **options) as session:
            yield session


async def sampling(context: Any, params: types.CreateMessageRequestParams) -> Any:
    """The client's model: answers every sampling request the same way."""
    return types.CreateMessageResult(
        role="assistant",
        content=types.TextContent(type="text", text="forty-two"),
        model="test-model",
    )


async def ignore_progress(value: float, total: float | None, message: str | None) -> None:
    """A progress callback: asking for progress makes the server report it."""


def marker(markers: Path, prefix: str) -> list[Path]:
    """The marker files the test MCP server wrote with this prefix."""
    return sorted(markers.glob(f"{prefix}-*"))


def clear(markers: Path) -> None:
    for old in markers.iterdir():
        old.unlink()


@pytest.fixture
async def pool(start_server: StartServer) -> PoolServer:
    return await start_server()


@pytest.fixture
async def http_mcp_server(tmp_path: Path) -> AsyncIterator[str]:
    """``tests/mcp_server.py --http`` on a free port (markers in ``tmp_path``); its MCP URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVER_SCRIPT),
        "--http",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "MCP_TEST_MARKERS": str(tmp_path)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"PORT ")
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        proc.kill()
        await proc.wait()


async def exercise(server: PoolServer, markers: Path) -> None:
    """Tools, resource, prompt, progress, sampling and cancellation through the pool."""
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with client(server, sampling_callback=sampling) as session:
        tools = await session.list_tools()
        assert {"add", "slow", "ask"} <= {t.name for t in tools.tools}
        result = await session.call_tool("add", {"a": 2, "b": 3})
        assert "5" == result.content[0].text  # type: ignore[union-attr]
        resource = await session.read_resource("test://greeting")
        assert "hello from a private MCP server" == resource.contents[0].text  # type: ignore[union-attr]
        prompt = await session.get_prompt("review", {"code": "x = 1"})
        assert "Please review: x = 1" == prompt.messages[0].content.text  # type: ignore[union-attr]
        result = await session.call_tool("slow", {"steps": 3}, progress_callback=on_progress)
        assert "done after 3 steps" == result.content[0].text  # type: ignore[union-attr]
        assert [1.0, 2.0, 3.0] == progress
        result = await session.call_tool("ask", {"question": "the answer?"})
        assert "forty-two" == result.content[0].text  # type: ignore[union-attr]

        clear(markers)  # the calls above started the slow tool too
        scope = anyio.CancelScope()

        async def cancellable() -> None:
            with scope:
                await session.call_tool("slow", {"steps": 10_000})

        call = asyncio.create_task(cancellable())
        await wait_for(lambda: bool(marker(markers, "started")), timeout=20, what="slow tool")
        scope.cancel()
        await asyncio.wait_for(call, 10)
        await wait_for(lambda: bool(marker(markers, "cancelled")), timeout=20, what="cancel")
        # the session is still usable after a cancellation
        result = await session.call_tool("add", {"a": 1, "b": 1})
        assert "2" == result.content[0].text  # type: ignore[union-attr]


async def test_stdio_server_through_the_pool(pool: PoolServer, tmp_path: Path) -> None:
    """A stdio MCP server behind the relay: tools, resource, prompt, progress, sampling, cancel."""
    async with relay(pool, *STDIO, markers=tmp_path):
        await exercise(pool, tmp_path)


async def test_streamable_http_server_through_the_pool(
    pool: PoolServer, tmp_path: Path, http_mcp_server: str
) -> None:
    """A Streamable HTTP MCP server behind the relay works the same way."""
    async with relay(pool, "--url", http_mcp_server, markers=tmp_path):
        await exercise(pool, tmp_path)


async def test_killed_mcp_server_ends_the_call(pool: PoolServer, tmp_path: Path) -> None:
    """An MCP server process killed mid-call ends the call at once with a JSON-RPC error."""
    async with relay(pool, *STDIO, markers=tmp_path), client(pool) as session:
        call = asyncio.create_task(session.call_tool("slow", {"steps": 10_000}))
        await wait_for(lambda: bool(marker(tmp_path, "started")), timeout=20, what="slow tool")
        os.kill(int(marker(tmp_path, "started")[0].read_text()), signal.SIGKILL)
        with pytest.raises(MCPError, match="exited"):
            await asyncio.wait_for(call, 10)


async def test_relay_restart_means_reinitialize(pool: PoolServer, tmp_path: Path) -> None:
    """When the relay goes away, open calls fail promptly, the old session is unknown (404),
    and a new session works once a relay is back."""
    async with relay(pool, *STDIO, markers=tmp_path) as first, client(pool) as session:
        call = asyncio.create_task(session.call_tool("slow", {"steps": 10_000}))
        await wait_for(lambda: bool(marker(tmp_path, "started")), timeout=20, what="slow tool")
        first.proc.kill()
        with pytest.raises(MCPError, match="relay"):
            await asyncio.wait_for(call, 10)
        with pytest.raises(MCPError):
            await session.call_tool("add", {"a": 1, "b": 1})
    async with relay(pool, *STDIO, markers=tmp_path), client(pool) as session:
        result = await session.call_tool("add", {"a": 20, "b": 22})
        assert "42" == result.content[0].text  # type: ignore[union-attr]


async def test_call_timeout_cancels_on_the_server(pool: PoolServer, tmp_path: Path) -> None:
    """A call that outlives the relay's --call-timeout without progress fails with a timeout
    error, and the MCP server is told to cancel it."""
    async with relay(pool, *STDIO, "--call-timeout", "1s", markers=tmp_path):
        async with client(pool) as session:
            result = await session.call_tool(  # it reports progress: it is not cut off
                "slow", {"steps": 20}, progress_callback=ignore_progress
            )
            assert "done after 20 steps" == result.content[0].text  # type: ignore[union-attr]
            with pytest.raises(MCPError, match="timed out"):
                await session.call_tool("slow", {"steps": 0, "hang": True})
        await wait_for(lambda: bool(marker(tmp_path, "cancelled")), timeout=20, what="cancel")


async def test_endpoint_token_and_unknown_sessions(pool: PoolServer, tmp_path: Path) -> None:
    """An endpoint with --token needs X-MCP-Token; unknown endpoints and sessions are 404."""
    async with relay(pool, *STDIO, "--token", "s3cret", markers=tmp_path):
        url = f"{pool.url}/api/mcp/id/tools"
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        async with aiohttp.ClientSession(headers=pool.auth) as http:
            async with http.post(url, json=ping) as response:
                assert 401 == response.status
            token = {"X-MCP-Token": "s3cret", "Mcp-Session-Id": "nope"}
            async with http.post(url, json=ping, headers=token) as response:
                assert 404 == response.status
            async with http.post(f"{pool.url}/api/mcp/id/other", json=ping) as response:
                assert 404 == response.status
        async with client(pool, headers={"X-MCP-Token": "s3cret"}) as session:
            result = await session.call_tool("add", {"a": 1, "b": 2})
            assert "3" == result.content[0].text  # type: ignore[union-attr]
            async with (
                aiohttp.ClientSession(headers=pool.auth) as http,
                http.get(f"{pool.url}/api/v1/state") as response,
            ):
                state = await response.json()
        [endpoint] = state["mcp_endpoints"]
        assert ("tools", True, 1) == (
            endpoint["id"],
            endpoint["token_required"],
            len(endpoint["relays"]),
        )


async def relay_sessions(pool: PoolServer) -> dict[str, int]:
    """Sessions per relay name, from the state API."""
    async with (
        aiohttp.ClientSession(headers=pool.auth) as http,
        http.get(f"{pool.url}/api/v1/state") as response,
    ):
        state = await response.json()
    return {r["name"]: r["sessions"] for e in state["mcp_endpoints"] for r in e["relays"]}


async def test_several_relays_spread_sessions_and_drain(pool: PoolServer, tmp_path: Path) -> None:
    """Sessions go to the least busy relay; a relay told to stop finishes its calls first."""
    async with (
        relay(pool, *STDIO, "--name", "a", markers=tmp_path) as relay_a,
        relay(pool, *STDIO, "--name", "b", markers=tmp_path),
        client(pool) as first,
        client(pool) as second,
    ):
        assert {"a": 1, "b": 1} == await relay_sessions(pool)
        for session in (first, second):  # the SDK checks results against the listed schemas
            await session.list_tools()
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        calls = [
            asyncio.create_task(
                session.call_tool("slow", {"steps": 20}, progress_callback=on_progress)
            )
            for session in (first, second)
        ]
        await wait_for(lambda: len(progress) >= 2, timeout=20, what="both calls running")
        relay_a.proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*calls), 20)
        assert ["done after 20 steps"] * 2 == [r.content[0].text for r in results]  # type: ignore[union-attr]
        assert 0 == await relay_a.wait()
        async with client(pool) as third:
            result = await third.call_tool("add", {"a": 1, "b": 2})
            assert "3" == result.content[0].text  # type: ignore[union-attr]
            assert {"b": 2} == await relay_sessions(pool)


def test_cli_resolves_relay_settings() -> None:
    """``llamapool mcp`` splits the command like a shell and gathers env and headers."""
    from llamapool.cli import McpSettings, resolve

    settings = resolve(
        ["mcp", "--id", "wiki", "--command", "server --root '/srv/my wiki'", "--env", "A=b=c"]
    )
    assert isinstance(settings, McpSettings)
    assert ("server", "--root", "/srv/my wiki") == settings.config.command
    assert (("A", "b=c"),) == settings.config.env
    settings = resolve(["mcp", "--id", "db", "--url", "http://h/mcp", "--bearer-token", "t"])
    assert isinstance(settings, McpSettings)
    assert (("Authorization", "Bearer t"),) == settings.config.headers
