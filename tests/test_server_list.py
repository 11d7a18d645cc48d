"""``SERVER_URL`` may list the servers of a cluster: a worker dials them in turn, moving on
when an attempt fails or a link drops, and a bad URL in the list is named when it is refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from llamapool.cli import WorkSettings, resolve
from llamapool.config import WorkConfig
from llamapool.errors import ConfigError
from llamapool.mcp.config import McpConfig

from .conftest import PoolServer, StartServer, StartWorker, wait_for
from .resilience_helpers import free_port

#: Longest a worker may take to find the next server (its backoff is capped far below).
MOVE_ON = 5.0


def dead_url() -> str:
    """A worker URL on a loopback port nothing listens on: dialing it is refused."""
    return f"ws://127.0.0.1:{free_port()}/workers/connect"


def urls(*servers: PoolServer | str) -> str:
    """``SERVER_URL`` naming ``servers`` (running ones or plain URLs), in that order."""
    return ",".join(s if isinstance(s, str) else s.ws_url for s in servers)


async def test_a_worker_passes_a_dead_url_and_moves_on_when_its_server_stops(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """Given a refused URL, then two servers, the worker registers with the first server that
    answers, and with the next one once that server stops."""
    server1, server2 = await start_server(), await start_server()
    dead, url1 = dead_url(), server1.ws_url  # a closed test server has no URL

    with capture_logs() as logs:
        agent = await start_worker(
            server1, server_url=urls(dead, server1, server2), reconnect_max=0.1
        )
        on_server1 = (agent.dialer.url, server2.pool.get(agent.cfg.worker_id))

        await server1.server.close()
        await wait_for(
            lambda: server2.pool.get(agent.cfg.worker_id) is not None,
            timeout=MOVE_ON,
            what="the worker to register with server2",
        )

    assert (url1, None) == on_server1
    assert server2.ws_url == agent.dialer.url
    assert [
        ("server_unreachable", dead),
        ("worker_connected", url1),
        ("server_disconnected", url1),
        ("worker_connected", server2.ws_url),
    ] == links(logs)


async def test_a_dropped_link_wraps_around_the_list(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """From the last URL of the list the worker goes back to the first."""
    server = await start_server()
    dead = dead_url()
    agent = await start_worker(server, server_url=urls(server, dead), reconnect_max=0.1)

    with capture_logs() as logs:
        await agent.dialer.close(1000, "test")
        await wait_for(
            lambda: any(e["event"] == "worker_registered" for e in logs),
            timeout=MOVE_ON,
            what="the worker to register again",
        )

    assert [
        ("server_disconnected", server.ws_url),
        ("server_unreachable", dead),
        ("worker_connected", server.ws_url),
    ] == links(logs)


async def test_one_url_is_dialed_again_after_a_drop(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """A single URL behaves as it always did: the worker dials it again."""
    server = await start_server()
    agent = await start_worker(server, reconnect_max=0.1)

    with capture_logs() as logs:
        await agent.dialer.close(1000, "test")
        await wait_for(
            lambda: any(e["event"] == "worker_registered" for e in logs),
            timeout=MOVE_ON,
            what="the worker to register again",
        )

    assert (server.ws_url,) == agent.cfg.server_url
    assert [
        ("server_disconnected", server.ws_url),
        ("worker_connected", server.ws_url),
    ] == links(logs)


async def test_a_server_that_never_answers_the_handshake_is_passed_within_server_timeout(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """A server that takes the TCP connection and never answers the WebSocket upgrade is given
    up after SERVER_TIMEOUT, logged as unreachable, and the worker moves on to the next URL."""
    server = await start_server()
    held: list[asyncio.StreamWriter] = []

    async def say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    mute = f"ws://127.0.0.1:{port}/workers/connect"
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            agent = await start_worker(
                server, server_url=urls(mute, server), server_timeout=0.5, reconnect_max=0.1
            )
            took = time.monotonic() - started
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()

    assert took < 0.5 + MOVE_ON, f"registered after {took:.2f}s"
    assert [("server_unreachable", mute), ("worker_connected", server.ws_url)] == links(logs)
    assert "server unreachable: no answer within 0.5s" == agent.last_error
    assert ["no answer within 0.5s"] == [
        e["error"] for e in logs if e["event"] == "server_unreachable"
    ]


async def test_an_unreachable_server_is_described_in_words(
    start_server: StartServer, start_worker: StartWorker
) -> None:
    """The log says what failed, host, port and reason, without aiohttp's repr of the TLS
    context it was given (which showed even for ws://)."""
    server = await start_server()
    port = free_port()

    with capture_logs() as logs:
        dead = f"ws://127.0.0.1:{port}/workers/connect"
        await start_worker(server, server_url=urls(dead, server), reconnect_max=0.1)

    (error,) = [e["error"] for e in logs if e["event"] == "server_unreachable"]
    assert error.startswith(f"cannot connect to 127.0.0.1:{port}: "), error
    assert "object at" not in error, error
    assert "ssl:" not in error, error


def links(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the dialer logged of its attempts and links, and the URL each names."""
    return [(e["event"], e["url"]) for e in logs if e["event"] in _LINK_EVENTS]


_LINK_EVENTS = ("server_unreachable", "worker_connected", "server_disconnected")


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "extra"), [(WorkConfig, {}), (McpConfig, {"mcp_id": "wiki"})], ids=["work", "mcp"]
)
@pytest.mark.parametrize("bad", ["not-a-url", "ftp://pool.example/workers/connect"])
def test_a_bad_url_in_the_list_is_refused_by_name(
    config: type[Any], extra: dict[str, str], bad: str
) -> None:
    """Every element is checked, and the error names the one that is no ws:// URL."""
    listed = f"ws://127.0.0.1:8080/workers/connect, {bad}, wss://pool.example/workers/connect"

    with pytest.raises(ConfigError, match=f"SERVER_URL must be a ws:// or wss:// URL, got '{bad}'"):
        config(server_url=listed, **extra)


def test_a_list_without_a_url_is_refused() -> None:
    """Commas alone name no server."""
    with pytest.raises(ConfigError, match="SERVER_URL must name at least one"):
        WorkConfig(server_url=" , ")


def test_the_flag_and_the_variable_take_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--server-url`` and ``SERVER_URL`` give every URL, in order, without the spaces."""
    listed = "ws://a:8080/workers/connect , wss://b/workers/connect,"
    expected = ("ws://a:8080/workers/connect", "wss://b/workers/connect")
    monkeypatch.delenv("SERVER_URL", raising=False)

    from_flag = resolve(["work", "--server-url", listed])
    monkeypatch.setenv("SERVER_URL", listed)
    from_variable = resolve(["work"])

    assert isinstance(from_flag, WorkSettings)
    assert isinstance(from_variable, WorkSettings)
    assert (expected, expected) == (from_flag.config.server_url, from_variable.config.server_url)
