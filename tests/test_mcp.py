"""Private MCP endpoints: the official ``mcp`` SDK on both sides of a real relay and server.

The MCP server is ``tests/mcp_server.py`` (stdio, or Streamable HTTP with ``--http``); the
relay is ``python -m llamapool mcp`` in a subprocess; the client is the SDK's ``Client`` over
Streamable HTTP at ``/api/mcp/id/<id>`` of an in-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import click
import mcp.types as types
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from llamapool.errors import ConfigError
from llamapool.mcp import McpConfig
from llamapool.server.appkeys import MCP
from llamapool.server.cluster.endpoint import CLUSTER
from llamapool.server.mcp_streams import Connection, Event, SessionStreams
from tests.cli_helpers import CLI_ENV_VARS, CliProcess, cli_env, cli_process
from tests.conftest import WORKER_KEY, PoolServer, StartServer, wait_for
from tests.redis_helpers import running_redis

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


async def serve_mcp(markers: Path, flag: str) -> AsyncIterator[str]:
    """``tests/mcp_server.py <flag>`` on a free port (markers in ``markers``); its base URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVER_SCRIPT),
        flag,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "MCP_TEST_MARKERS": str(markers)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"PORT ")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.kill()
        await proc.wait()


@pytest.fixture
async def http_mcp_server(tmp_path: Path) -> AsyncIterator[str]:
    """The test MCP server over Streamable HTTP; its MCP URL."""
    async for url in serve_mcp(tmp_path, "--http"):
        yield f"{url}/mcp"


@pytest.fixture
async def sse_mcp_server(tmp_path: Path) -> AsyncIterator[str]:
    """The test MCP server over the older HTTP+SSE transport; its SSE URL."""
    async for url in serve_mcp(tmp_path, "--sse"):
        yield f"{url}/sse"


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


async def test_http_sse_server_through_the_pool(
    pool: PoolServer, tmp_path: Path, sse_mcp_server: str
) -> None:
    """An MCP server that speaks only the older HTTP+SSE transport works the same way."""
    async with relay(pool, "--sse-url", sse_mcp_server, markers=tmp_path):
        await exercise(pool, tmp_path)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


async def initialize_error(pool: PoolServer, mcp_id: str = "tools") -> dict[str, Any]:
    """POST ``initialize`` to the endpoint, expecting a prompt JSON-RPC error; that error."""
    url = f"{pool.url}/api/mcp/id/{mcp_id}"
    async with (
        aiohttp.ClientSession(headers=pool.auth, timeout=aiohttp.ClientTimeout(10)) as http,
        http.post(url, json=INITIALIZE, headers=ACCEPT) as response,
    ):
        if response.content_type == "text/event-stream":
            _, answer = await sse_event(response)
        else:
            answer = await response.json()
    assert 0 == answer["id"]
    error: dict[str, Any] = answer["error"]
    return error


@pytest.mark.parametrize("option", ["--url", "--sse-url", "--command"])
async def test_unreachable_mcp_server_fails_initialize_at_once(
    pool: PoolServer, tmp_path: Path, closed_port: int, option: str
) -> None:
    """An MCP server that cannot be reached (a refused --url or --sse-url, a --command that
    does not start) answers initialize at once with JSON-RPC -32000; the relay logs why and
    leaves no task exception behind."""
    not_a_program = tmp_path / "not-a-program"  # executable, but its interpreter is missing
    not_a_program.write_text("#!/no/such/interpreter\n")
    not_a_program.chmod(0o755)
    target = {
        "--url": f"http://127.0.0.1:{closed_port}/mcp",
        "--sse-url": f"http://127.0.0.1:{closed_port}/sse",
        "--command": str(not_a_program),
    }[option]
    async with relay(pool, option, target, markers=tmp_path) as proc:
        error = await initialize_error(pool)
        refused = await proc.event("mcp_session_refused")
        assert 0 == await proc.stop()
    assert -32000 == error["code"]
    assert "MCP session ended" in error["message"]
    assert refused["error"] in error["message"]
    assert "Task exception was never retrieved" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("option", ["--url", "--sse-url"])
async def test_refused_sessions_do_not_count_toward_max_sessions(
    pool: PoolServer, tmp_path: Path, closed_port: int, option: str
) -> None:
    """A session the MCP server could not take is gone from the relay: with --max-sessions 1
    every later initialize is tried again, none finds the relay at its limit."""
    url = f"http://127.0.0.1:{closed_port}/mcp"
    async with relay(pool, option, url, "--max-sessions", "1", markers=tmp_path):
        messages = [(await initialize_error(pool))["message"] for _ in range(3)]
    assert [f"cannot reach {url}"] * 3 == [m.split(": ")[1] for m in messages]


@pytest.mark.parametrize(("option", "path"), [("--url", "/mcp"), ("--sse-url", "/sse")])
async def test_upstream_url_credentials_stay_on_the_relay(
    pool: PoolServer, tmp_path: Path, closed_port: int, option: str, path: str
) -> None:
    """The userinfo and query of the MCP server's URL reach neither the client's error nor
    the relay's log, which show scheme://host:port/path."""
    url = f"http://bob:UPSTREAMPW@127.0.0.1:{closed_port}{path}?key=UPSTREAMQKEY#FRAG"
    async with relay(pool, option, url, markers=tmp_path) as proc:
        error = await initialize_error(pool)
        await proc.event("mcp_session_refused")
        assert 0 == await proc.stop()
    assert f"cannot reach http://127.0.0.1:{closed_port}{path}:" in error["message"]
    for secret in ("UPSTREAMPW", "UPSTREAMQKEY", "bob", "FRAG"):
        assert secret not in error["message"]
        assert secret not in proc.stderr


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


async def test_initialize_waits_for_an_mcp_server_slower_to_start_than_the_call_timeout(
    pool: PoolServer, tmp_path: Path
) -> None:
    """Starting the MCP server is part of ``initialize``, which reports no progress: a server
    that takes 2 s to start is initialized all the same under ``--call-timeout 1s``."""
    slow = ("--command", f"{STDIO[1]} --start-delay 2")
    async with (
        relay(pool, *slow, "--call-timeout", "1s", markers=tmp_path),
        client(pool) as session,
    ):
        result = await session.call_tool("add", {"a": 1, "b": 2})

    assert "3" == result.content[0].text  # type: ignore[union-attr]


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
    settings = resolve(["mcp", "--id", "old", "--sse-url", "http://h/sse"])
    assert isinstance(settings, McpSettings)
    assert "http://h/sse" == settings.config.sse_url
    with pytest.raises(click.UsageError, match="exactly one"):
        resolve(["mcp", "--id", "two", "--url", "http://h/mcp", "--sse-url", "http://h/sse"])


@pytest.fixture
def no_cli_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No llamapool setting of the developer's environment reaches :func:`resolve`."""
    for name in CLI_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def relay_config(*args: str) -> McpConfig:
    """The relay settings ``llamapool mcp ARGS`` resolves to."""
    from llamapool.cli import McpSettings, resolve

    settings = resolve(["mcp", *args])
    assert isinstance(settings, McpSettings)
    return settings.config


def test_mcp_headers_takes_name_colon_value_one_per_line(no_cli_env: pytest.MonkeyPatch) -> None:
    """``MCP_HEADERS`` holds headers in the documented ``Name: value`` form, values with
    spaces, one header per line (CRLF too, blank lines skipped)."""
    url = ("--id", "db", "--url", "http://h/mcp")
    no_cli_env.setenv("MCP_HEADERS", "X-Api-Key: k1")
    assert (("X-Api-Key", "k1"),) == relay_config(*url).headers
    no_cli_env.setenv("MCP_HEADERS", "Authorization: Bearer k 2\r\n\nX-Team:  a b \n")
    assert (("Authorization", "Bearer k 2"), ("X-Team", "a b")) == relay_config(*url).headers


def test_env_file_sets_headers_and_env(tmp_path: Path, no_cli_env: pytest.MonkeyPatch) -> None:
    """An env file sets ``MCP_HEADERS`` and ``MCP_ENV`` as the variables do."""
    env_file = tmp_path / "mcp.env"
    env_file.write_text(
        'MCP_ID=db\nMCP_COMMAND=server\nMCP_ENV="A=1 B=x=y"\n'
        'MCP_HEADERS="X-Api-Key: k 1\nX-Team: t"\n',
        encoding="utf-8",
    )
    config = relay_config("--env-file", str(env_file))
    assert (("A", "1"), ("B", "x=y")) == config.env
    assert (("X-Api-Key", "k 1"), ("X-Team", "t")) == config.headers


@pytest.mark.parametrize(
    ("text", "env", "headers"),
    [
        pytest.param(
            'env: A=1 B=2\nheader: "X-Api-Key: k 1"\n',
            (("A", "1"), ("B", "2")),
            (("X-Api-Key", "k 1"),),
            id="scalars",
        ),
        pytest.param(
            'env: [A=1 2, B=3]\nheader:\n  - "X-Api-Key: k"\n  - "X-Team: t u"\n',
            (("A", "1 2"), ("B", "3")),
            (("X-Api-Key", "k"), ("X-Team", "t u")),
            id="lists",
        ),
    ],
)
def test_yaml_file_sets_headers_and_env(
    tmp_path: Path,
    no_cli_env: pytest.MonkeyPatch,
    text: str,
    env: tuple[tuple[str, str], ...],
    headers: tuple[tuple[str, str], ...],
) -> None:
    """The ``--config`` YAML file sets ``env`` and ``header`` from text (split as the variables
    are) or from a list (one entry an item)."""
    config_file = tmp_path / "mcp.yaml"
    config_file.write_text(f"id: db\ncommand: server\n{text}", encoding="utf-8")
    config = relay_config("--config", str(config_file))
    assert (env, headers) == (config.env, config.headers)


def test_bad_header_in_a_file_names_file_and_line_not_the_value(
    tmp_path: Path, no_cli_env: pytest.MonkeyPatch
) -> None:
    """A malformed header in a file is an error naming the file, the line and the setting,
    without its value; a list for a setting that takes one value is refused."""
    config_file = tmp_path / "mcp.yaml"
    config_file.write_text(
        "id: db\nurl: http://h/mcp\nheader: ['X-Ok: 1', 'Authorization=Bearer SECRET']\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as bad_header:
        relay_config("--config", str(config_file))
    config_file.write_text("id: [a, b]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as listed:
        relay_config("--config", str(config_file))
    config_file.write_text("id: db\nheader:\n  - X-Ok: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="quote entries such as 'Name: value'"):
        relay_config("--config", str(config_file))  # YAML reads it as a mapping
    assert f"{config_file}:3: header: expected 'Name: value'" in str(bad_header.value)
    assert "SECRET" not in str(bad_header.value)
    assert f"{config_file}:1: id: expected a single value" == str(listed.value)


ACCEPT = {"Accept": "application/json, text/event-stream"}


async def sse_event(response: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    """The next SSE event of ``response`` that carries data: its id and its JSON message."""
    event_id, data = "", b""
    async for line in response.content:
        line = line.rstrip(b"\r\n")
        if line.startswith(b"id: "):
            event_id = line[4:].decode()
        elif line.startswith(b"data: "):
            data += line[6:]
        elif not line and data:
            return event_id, json.loads(data)
    raise AssertionError("the stream ended")


async def raw_session(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Initialize a session with raw requests; the headers of its later requests."""
    async with http.post(url, json=INITIALIZE, headers=ACCEPT) as response:
        assert 200 == response.status
        headers = {**ACCEPT, "Mcp-Session-Id": response.headers["Mcp-Session-Id"]}
    headers["MCP-Protocol-Version"] = "2025-11-25"
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=initialized, headers=headers) as response:
        assert 202 == response.status
    return headers


def calls_in_flight(pool: PoolServer) -> int:
    """Calls in flight on all MCP endpoints of ``pool``."""
    return sum(r.calls for endpoint in pool.server.app[MCP] for r in endpoint.relays)


async def test_dropped_stream_resumes_with_last_event_id(pool: PoolServer, tmp_path: Path) -> None:
    """A client whose SSE connection drops mid-call GETs with Last-Event-ID and receives the
    rest of that stream, live or replayed, then the response; nothing twice, nothing lost."""
    url = f"{pool.url}/api/mcp/id/tools"
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"steps": 8}, "_meta": {"progressToken": "p"}},
    }
    async with (
        relay(pool, *STDIO, markers=tmp_path),
        aiohttp.ClientSession(headers=pool.auth) as http,
    ):
        headers = await raw_session(http, url)
        received: list[tuple[str, dict[str, Any]]] = []
        async with http.post(url, json=call, headers=headers) as response:
            assert "text/event-stream" == response.content_type
            received += [await sse_event(response) for _ in range(2)]
        # the connection is gone; resume while the tool still runs: the rest comes live
        resume = {**headers, "Last-Event-ID": received[-1][0]}
        async with http.get(url, headers=resume) as response:
            assert "text/event-stream" == response.content_type
            received += [await sse_event(response) for _ in range(2)]
        # gone again, and this time the call ends meanwhile: the rest is replayed
        await wait_for(lambda: 0 == calls_in_flight(pool), timeout=20, what="the call's end")
        resume = {**headers, "Last-Event-ID": received[-1][0]}
        async with http.get(url, headers=resume) as response:
            while "id" not in received[-1][1]:
                received.append(await sse_event(response))
        stream = received[0][0].split("-")[0]
        assert [f"{stream}-{n}" for n in range(1, 10)] == [i for i, _ in received]
        progress = [message["params"]["progress"] for _, message in received[:-1]]
        assert [float(n) for n in range(1, 9)] == progress
        assert 7 == received[-1][1]["id"]
        assert "done after 8 steps" == received[-1][1]["result"]["content"][0]["text"]

        async with http.get(url, headers={**headers, "Last-Event-ID": "99-1"}) as response:
            assert 400 == response.status


async def test_replay_buffer_is_bounded() -> None:
    """A session keeps only its newest events, by count and by bytes (the newest always), and
    a stream whose next event is gone cannot be resumed rather than resume with a gap."""
    streams = SessionStreams(max_events=3, max_bytes=10)
    first, second = streams.open(waiting=1), streams.open(waiting=1)
    for data in (b"a", b"b", b"c"):
        first.put(data)
    second.put(b"d")  # four events: the oldest, a, is dropped
    assert streams.resume("1-0") is None
    resumed = streams.resume("1-1")
    assert resumed is not None
    assert [("1-2", b"b"), ("1-3", b"c")] == drain(resumed[1])
    second.put(b"0123456789")  # over 10 bytes with the others: only it stays
    assert streams.resume("1-2") is None
    assert streams.resume("2-1") is not None
    assert streams.resume("2-0") is None
    assert streams.resume("3-0") is None
    assert streams.resume("x") is None


def drain(connection: Connection) -> list[Event | None]:
    """What a connection holds now."""
    return [connection.get_nowait() for _ in range(connection.qsize())]


async def test_an_mcp_endpoint_is_reached_through_any_server_of_a_cluster(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The relay is connected to b; a client of a gets the whole MCP exchange (tools,
    progress, sampling, cancellation), its session living on b."""
    async with running_redis(unix_socket=False) as redis:
        cluster = {"cluster_url": redis.url, "cluster_keys": "mcp-cluster-key"}
        a, b = await start_server(**cluster), await start_server(**cluster)
        async with relay(b, *STDIO, markers=tmp_path):
            await wait_for(
                lambda: any("tools" in p.mcp for p in a.server.app[CLUSTER].peers.values()),
                timeout=10,
                what="a to learn where the endpoint is",
            )
            await exercise(a, tmp_path)
            assert not a.server.app[MCP].sessions  # every session lived on b
            async with (
                aiohttp.ClientSession(headers=a.auth) as http,
                http.get(a.url + "/api/v1/state") as response,
            ):
                listed = (await response.json())["mcp_endpoints"]
    b_id = b.server.app[CLUSTER].id
    assert [("tools", b_id)] == [(e["id"], e["server"]) for e in listed]
