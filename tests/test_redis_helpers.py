"""The Redis test kit runs a real server that a test can stop, kill, freeze and start again on
the same port, and that never keeps a key across a restart.

The cluster tests rest on these behaviours (Redis gone under load, Redis back empty, Redis
hanging), so each is checked here against the real ``redis-server``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions

from . import redis_helpers
from .redis_helpers import RedisServer, redis_binary, running_redis

redis_server = redis_helpers.redis_server


async def _assert_refused(server: RedisServer) -> None:
    """Nothing listens on the server's port or socket, and a client says so."""
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", server.port)
    if server.unix_path is not None:
        # Redis removes its socket on SIGTERM; after SIGKILL the file stays, unanswered.
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            await asyncio.open_unix_connection(str(server.unix_path))
    async with server.client() as client:
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()


async def _ping_everywhere(server: RedisServer) -> None:
    """The server answers PING on TCP and on its unix socket, also through its URLs."""
    answers = []
    for url in (server.url, server.unix_url):
        async with redis.asyncio.Redis.from_url(url) as client:
            answers.append(await client.ping())
    assert [True, True] == answers


async def test_server_answers_ping_on_tcp_and_unix_socket(redis_server: RedisServer) -> None:
    """The fixture hands over a running server on loopback, reachable at its two URLs."""
    await _ping_everywhere(redis_server)
    assert f"redis://127.0.0.1:{redis_server.port}" == redis_server.url
    assert f"unix://{redis_server.directory}/redis.sock" == redis_server.unix_url
    assert redis_server.running


async def test_stopped_server_refuses_connections(redis_server: RedisServer) -> None:
    """stop() ends the server with SIGTERM: it exits 0 and its port refuses connections."""
    code = await redis_server.stop()
    assert (0, False) == (code, redis_server.running)
    await _assert_refused(redis_server)


async def test_server_starts_again_on_the_same_port(redis_server: RedisServer) -> None:
    """A server stopped and started again is a new process on the same port and socket."""
    port, pid = redis_server.port, redis_server.pid
    await redis_server.stop()
    await redis_server.start()
    await _ping_everywhere(redis_server)
    assert port == redis_server.port
    assert pid != redis_server.pid


async def test_keys_do_not_survive_a_restart_or_a_kill(redis_server: RedisServer) -> None:
    """Nothing is persisted: the server comes back empty after SIGTERM and after SIGKILL."""
    async with redis_server.client() as client:
        await client.set("cluster:key", "value")
        assert b"value" == await client.get("cluster:key")
    await redis_server.restart()
    async with redis_server.client() as client:
        after_restart = await client.get("cluster:key")
        await client.set("cluster:key", "value")
    await redis_server.kill()
    await redis_server.start()
    async with redis_server.client() as client:
        after_kill = await client.get("cluster:key")
        size = await client.dbsize()
    files = sorted(p.name for p in redis_server.directory.iterdir())
    assert (None, None, 0) == (after_restart, after_kill, size)
    assert ["redis.log", "redis.sock"] == files


async def test_killed_server_refuses_connections_until_started(redis_server: RedisServer) -> None:
    """kill() ends the server as a crash would; start() brings it back on the same port."""
    port = redis_server.port
    await redis_server.kill()
    await _assert_refused(redis_server)
    await redis_server.start()
    await _ping_everywhere(redis_server)
    assert port == redis_server.port


async def test_paused_server_answers_nothing_until_resumed(redis_server: RedisServer) -> None:
    """pause() freezes the server: a request times out instead of failing; resume() thaws it.
    A frozen server still stops on request."""
    async with redis_server.client(socket_timeout=0.2) as client:
        await client.ping()
        redis_server.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
        redis_server.resume()
        assert await client.ping()
    redis_server.pause()
    assert 0 == await redis_server.stop()


async def test_servers_are_independent_and_stopped_after_their_block() -> None:
    """Two servers run side by side without sharing keys; each stops when its block ends."""
    async with running_redis(unix_socket=False) as a, running_redis(unix_socket=False) as b:
        async with a.client() as client_a, b.client() as client_b:
            await client_a.set("only-in-a", "1")
            in_b = await client_b.get("only-in-a")
        with pytest.raises(ValueError, match="unix socket"):
            _ = a.unix_url
        assert (None, True) == (in_b, a.port != b.port)
    assert (False, False) == (a.running, b.running)
    await _assert_refused(a)
    await _assert_refused(b)


def test_missing_binary_skips_naming_the_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without redis-server or valkey-server on PATH a test is skipped and told what to
    install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="Debian package redis-server"):
        redis_binary()
