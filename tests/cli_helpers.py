"""Run the real ``llamapool`` CLI in subprocesses, with bounded waits on what it prints.

Both commands log JSON lines on stderr when stderr is not a terminal; a test waits for a given
event (``server_listening``, ``worker_registered``) instead of sleeping. Every process started
through :func:`cli_process` is killed when its block ends, whatever happened in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from llamapool.cli import cli

#: The keys CLI pools run with.
API_KEY = "cli-api-key"
WORKER_KEY = "cli-worker-key"


#: Every environment variable the CLI reads; stripped from the inherited environment so the
#: developer's own settings never leak into a test.
def _cli_env_vars() -> frozenset[str]:
    """Every environment variable an option of ``serve`` or ``work`` reads."""
    names: set[str] = set()
    for command in cli.commands.values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                names.add(envvar)
            elif envvar:
                names.update(envvar)
    return frozenset(names)


#: Stripped from the environment of CLI subprocesses, so a developer's own settings never leak
#: into a test.
CLI_ENV_VARS = _cli_env_vars()
#: Longest a CLI process may take to reach a state a test waits for.
STARTUP = 30.0


def cli_env(**settings: str) -> dict[str, str]:
    """The test process's environment without llamapool settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if k not in CLI_ENV_VARS}
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = STARTUP
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m llamapool ARGS`` to completion (killed after ``timeout``)."""
    return subprocess.run(
        [sys.executable, "-m", "llamapool", *args],
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among ``text``'s lines (log events); other lines are skipped."""
    events = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            events.append(data)
    return events


def other_lines(text: str) -> list[str]:
    """The non-empty lines of ``text`` that are not JSON log events."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            lines.append(line)
    return lines


class CliProcess:
    """One running ``python -m llamapool`` process, its output read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.proc = proc
        self.args = args
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = asyncio.Condition()
        self._eof = 0
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, self.stdout_lines)),
            asyncio.create_task(self._read(proc.stderr, self.stderr_lines)),
        ]

    async def _read(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            async with self._changed:
                lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._eof += 1
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON log events printed on stderr so far."""
        return json_lines(self.stderr)

    def describe(self) -> str:
        tail = "\n".join(self.stderr_lines[-20:])
        return f"llamapool {' '.join(self.args)} (exit {self.proc.returncode}); stderr:\n{tail}"

    async def wait_until(
        self, condition: Callable[[], bool], *, what: str, timeout: float = STARTUP
    ) -> None:
        """Wait until ``condition`` holds; fail if the process closes its output first or the
        time is up."""

        def ready() -> bool:
            return condition() or self._eof == 2

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: {self.describe()}"
            ) from None
        if not condition():
            raise AssertionError(f"the process ended before {what}: {self.describe()}")

    async def event(self, name: str, *, timeout: float = STARTUP) -> dict[str, Any]:
        """The first log event called ``name``, waiting for it if need be."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e.get("event") == name), None)

        await self.wait_until(lambda: found() is not None, what=f"event {name!r}", timeout=timeout)
        event = found()
        assert event is not None
        return event

    async def wait(self, *, timeout: float = STARTUP) -> int:
        """Wait for the process to exit and its output to be read; its exit code."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(asyncio.gather(*self._readers), timeout)
        return code

    async def stop(self, sig: int = signal.SIGTERM, *, timeout: float = STARTUP) -> int:
        """Send ``sig`` and wait for the exit code."""
        self.proc.send_signal(sig)
        return await self.wait(timeout=timeout)

    async def kill(self) -> None:
        """Make sure the process is gone and its pipes are closed."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def cli_process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[CliProcess]:
    """Start ``python -m llamapool ARGS``; it is killed when the block ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llamapool",
        *args,
        env=cli_env() if env is None else env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    process = CliProcess(proc, args)
    try:
        yield process
    finally:
        await process.kill()


def ws_url(http_url: str, ws_path: str = "/workers/connect") -> str:
    """The worker WebSocket URL of a server listening at ``http_url``."""
    return "ws" + http_url.removeprefix("http") + ws_path


@contextlib.asynccontextmanager
async def running_server(*args: str, **env: str) -> AsyncIterator[tuple[CliProcess, str]]:
    """``llamapool serve`` on a free loopback port with the test keys; yields it and its URL."""
    settings = {"API_KEY": API_KEY, "WORKER_KEY": WORKER_KEY, **env}
    async with cli_process(
        "serve", "--host", "127.0.0.1", "--port", "0", *args, env=cli_env(**settings)
    ) as server:
        listening = await server.event("server_listening")
        yield server, str(listening["url"])


@contextlib.asynccontextmanager
async def running_worker(url: str, *args: str, **env: str) -> AsyncIterator[CliProcess]:
    """``llamapool work`` against the server at ``url``; yields once the server confirmed it."""
    settings = {"SERVER_URL": ws_url(url), "WORKER_KEY": WORKER_KEY, **env}
    async with cli_process("work", *args, env=cli_env(**settings)) as worker:
        await worker.event("worker_registered")
        yield worker
