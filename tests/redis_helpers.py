"""A real Redis (or Valkey) server on loopback for the cluster tests, which a test can stop,
kill, freeze and start again on the same port.

Cluster mode keeps its shared state in Redis, so its tests need the real server rather than a
fake: the outages they exercise (Redis gone under load, Redis back empty, Redis hanging) are
the server's own behaviour. Each :class:`RedisServer` runs ``redis-server`` (Debian package
``redis-server``) or ``valkey-server`` on ``127.0.0.1``, optionally on a unix socket too, in a
directory of its own, without persistence: a restarted server comes back empty, as a Redis
without disks does after a crash. Readiness is a real PING polled under a deadline, never a
sleep.

Tests take the ``redis_server`` fixture (started, and stopped whatever happens) or open
:func:`running_redis` for more servers or other options. A module makes the fixture its own
by naming it at module level::

    from . import redis_helpers
    from .redis_helpers import RedisServer

    redis_server = redis_helpers.redis_server


    async def test_state_is_shared(redis_server: RedisServer) -> None:
        async with redis_server.client() as redis:
            assert await redis.ping()
        await redis_server.stop()  # Redis is gone: connections are refused
        await redis_server.start()  # back on the same port, with no keys

Without either binary the fixture and :func:`running_redis` skip the test, naming the Debian
package to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

#: The server programs accepted, in order of preference; both take the same options.
BINARIES = ("redis-server", "valkey-server")
#: Longest a server may take to answer PING after it was started.
STARTUP = 10.0
#: Longest a server may take to exit after SIGTERM before it is killed.
SHUTDOWN = 10.0
#: How many fresh ports a first start tries, should another process take the chosen one first.
PORT_ATTEMPTS = 3
#: Between two readiness probes: a poll interval under a deadline, not a wait for readiness.
POLL_INTERVAL = 0.01


def redis_binary() -> str:
    """The path of ``redis-server``, else ``valkey-server``; skips the test if neither is on
    ``PATH``."""
    for name in BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        "redis-server is not installed (it comes with the Debian package redis-server; "
        "valkey-server from the package valkey-server works too)"
    )


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` (and a unix socket, if asked), which
    can be stopped and started again on the same port and socket.

    Nothing is persisted (``--save "" --appendonly no``), so keys never survive a stop or a
    kill. The server's output goes to ``redis.log`` in ``directory``; failures quote its tail.
    """

    def __init__(
        self, binary: str, directory: Path, *, port: int | None = None, unix_socket: bool = False
    ) -> None:
        self.binary = binary
        self.directory = directory
        #: The TCP port; chosen at the first :meth:`start` unless given, then kept.
        self.port = port or 0
        self._port_fixed = port is not None
        #: The unix socket's path, if the server listens on one.
        self.unix_path: Path | None = directory / "redis.sock" if unix_socket else None
        self.log_path = directory / "redis.log"
        self._process: asyncio.subprocess.Process | None = None
        self._paused = False

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT``, as ``CLUSTER_URL`` takes it."""
        return f"redis://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        """``unix:///path/redis.sock``; only for a server started with ``unix_socket=True``."""
        if self.unix_path is None:
            raise ValueError("this Redis server was not given a unix socket (unix_socket=True)")
        return f"unix://{self.unix_path}"

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited (it may be paused)."""
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        """The process id of the running server, if any."""
        return self._process.pid if self.running and self._process is not None else None

    def log(self, lines: int = 20, *, since: int = 0) -> str:
        """The last ``lines`` lines the server printed (after byte ``since``), for failure
        messages."""
        try:
            with self.log_path.open("rb") as file:
                file.seek(since)
                text = file.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        code = self._process.returncode if self._process is not None else None
        return f"{self.binary} on port {self.port} (exit {code}); output:\n{self.log()}"

    def client(self, *, unix: bool = False, **options: Any) -> redis.asyncio.Redis:
        """A client of this server that fails at once instead of retrying, with short
        timeouts; ``options`` go to :class:`redis.asyncio.Redis`. Use it as ``async with``."""
        settings: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "socket_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
            **options,
        }
        if unix:
            return redis.asyncio.Redis(unix_socket_path=self.unix_url[len("unix://") :], **settings)
        return redis.asyncio.Redis(host="127.0.0.1", port=self.port, **settings)

    async def start(self, *, timeout: float = STARTUP) -> None:
        """Start the server and return once it answers PING.

        The first start picks a free port (trying another if one is taken meanwhile); later
        starts reuse it, so clients configured with :attr:`url` find the server again.
        """
        if self.running:
            raise RuntimeError(f"Redis is already running: {self.describe()}")
        if self._port_fixed:
            await self._start_once(timeout)
            return
        for attempt in range(PORT_ATTEMPTS):
            self.port = free_port()
            try:
                await self._start_once(timeout)
            except _PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
            else:
                self._port_fixed = True
                return

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self.unix_path is not None:
            command += ["--unixsocket", str(self.unix_path), "--unixsocketperm", "700"]
        return command

    async def _start_once(self, timeout: float) -> None:
        with self.log_path.open("ab") as log:
            start_of_log = log.tell()
            self._process = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._paused = False
        try:
            await self._wait_ready(timeout)
        except _PortTaken:
            await self.kill()
            raise
        except BaseException:
            await self.kill()
            if "Address already in use" in self.log(200, since=start_of_log):
                raise _PortTaken(f"port {self.port} is taken: {self.describe()}") from None
            raise

    async def _wait_ready(self, timeout: float) -> None:
        """Poll PING until this very process answers it, under a deadline."""
        process = self._process
        assert process is not None
        deadline = time.monotonic() + timeout
        while True:
            if process.returncode is not None:
                raise AssertionError(f"Redis exited before it answered PING: {self.describe()}")
            with contextlib.suppress(
                redis.exceptions.ConnectionError, redis.exceptions.TimeoutError
            ):
                async with self.client() as client:
                    if await client.ping():
                        # Another server answering on the port must not pass for this one.
                        info = await client.info("server")
                        if info.get("process_id") != process.pid:
                            raise _PortTaken(f"another server answers on port {self.port}")
                        break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for Redis to answer PING: "
                    f"{self.describe()}"
                )
            await asyncio.sleep(POLL_INTERVAL)
        if self.unix_path is not None:
            async with self.client(unix=True) as client:
                await client.ping()

    async def stop(self, *, timeout: float = SHUTDOWN) -> int:
        """SIGTERM and wait for the exit (a paused server is resumed first); the exit code.

        A server still running after ``timeout`` is killed and the test fails.
        """
        process = self._process
        if process is None:
            raise RuntimeError("Redis was never started")
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
                if self._paused:
                    process.send_signal(signal.SIGCONT)
            self._paused = False
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                await self.kill()
                raise AssertionError(
                    f"Redis did not exit within {timeout}s of SIGTERM: {self.describe()}"
                ) from None
        code = process.returncode
        assert code is not None
        return code

    async def kill(self) -> None:
        """SIGKILL, as a crash would end it, and wait for the exit; nothing if not running."""
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        self._paused = False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers, as when
        Redis hangs or its host stalls. :meth:`resume` thaws it."""
        if self._process is None or not self.running:
            raise RuntimeError("Redis is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a server frozen by :meth:`pause` (SIGCONT)."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGCONT)
        self._paused = False

    async def restart(self, *, timeout: float = STARTUP) -> None:
        """Stop (SIGTERM) and start again on the same port: the server comes back empty."""
        await self.stop()
        await self.start(timeout=timeout)

    async def close(self) -> None:
        """Stop the server if it runs, killing it should SIGTERM not end it; never fails."""
        if not self.running:
            return
        try:
            await self.stop()
        except AssertionError:
            await self.kill()


class _PortTaken(AssertionError):
    """The chosen port was taken between choosing and binding it."""


@contextlib.asynccontextmanager
async def running_redis(*, unix_socket: bool = True) -> AsyncIterator[RedisServer]:
    """A started Redis server in a temporary directory; stopped, whatever happened, when the
    block ends. Skips the test if no server binary is installed.

    The directory is made under the system's temporary directory rather than pytest's
    ``tmp_path``: a unix socket's path must stay under about 100 bytes, which a long test name
    in ``tmp_path`` can exceed.
    """
    binary = redis_binary()
    with tempfile.TemporaryDirectory(prefix="llamapool-redis-") as directory:
        os.chmod(directory, 0o700)
        server = RedisServer(binary, Path(directory), unix_socket=unix_socket)
        try:
            await server.start()
            yield server
        finally:
            await server.close()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A Redis server on ``127.0.0.1`` and a unix socket, answering PING; stopped after the
    test. Skips the test if neither ``redis-server`` nor ``valkey-server`` is installed."""
    async with running_redis(unix_socket=True) as server:
        yield server
