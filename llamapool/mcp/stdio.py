"""The stdio transport: one child process per session, JSON-RPC as lines on stdin and stdout.

A process per client session keeps ``initialize`` and capabilities exact and ids unshared.
Its stderr goes to the relay's log. A process that dies soon after it started makes the next
start wait (0.5 s doubling up to 30 s), so a broken command cannot spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import structlog

from llamapool.errors import McpUpstreamError

log = structlog.get_logger("llamapool.mcp")

#: A process that lived less than this counts as a crash for the start backoff.
_EARLY_EXIT = 10.0
_BACKOFF_MAX = 30.0
#: Time a process gets to exit after its stdin closed, then after SIGTERM.
_GRACE = 2.0


class StdioTransport:
    """Starts ``command`` for each session."""

    name = "stdio"

    def __init__(
        self,
        command: tuple[str, ...],
        *,
        cwd: str = "",
        env: tuple[tuple[str, str], ...] = (),
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.command = command
        self.cwd = cwd or None
        self.env = {**os.environ, **dict(env)} if env else None
        self.max_message_bytes = max_message_bytes
        self._crashes = 0
        self._next_start = 0.0

    async def open(self) -> StdioChannel:
        delay = self._next_start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=self.max_message_bytes + 1,
                start_new_session=True,  # the relay's Ctrl+C is not the server's
            )
        except OSError as exc:
            self._crashed()
            raise McpUpstreamError(f"cannot start {self.command[0]!r}: {exc}") from None
        log.info("mcp_server_started", pid=proc.pid, command=self.command[0])
        return StdioChannel(proc, self)

    def _crashed(self) -> None:
        self._crashes += 1
        delay = min(_BACKOFF_MAX, 0.5 * 2 ** (self._crashes - 1))
        self._next_start = time.monotonic() + delay

    def _exited(self, lifetime: float, *, expected: bool) -> None:
        if expected or lifetime >= _EARLY_EXIT:
            self._crashes = 0
        else:
            self._crashed()

    async def close(self) -> None:
        pass


class StdioChannel:
    """One MCP server process."""

    def __init__(self, proc: asyncio.subprocess.Process, transport: StdioTransport) -> None:
        self.proc = proc
        self.transport = transport
        self.started = time.monotonic()
        self.closing = False
        self._reaped = False
        self._stderr = asyncio.create_task(self._log_stderr())

    async def send(self, data: str) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError):
            stdin.write(data.encode() + b"\n")
            await stdin.drain()

    async def receive(self) -> str | None:
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # longer than the limit
                log.warning("mcp_message_too_large", pid=self.proc.pid)
                await self._stop()
                return None
            if not line:
                await self._reap()
                return None
            text = line.decode(errors="replace").strip()
            if text:
                return text

    def ended(self) -> str:
        code = self.proc.returncode
        return f"the MCP server process exited (code {code})"

    async def close(self) -> None:
        self.closing = True
        await self._stop()

    async def _stop(self) -> None:
        proc = self.proc
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), _GRACE)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), _GRACE)
                except asyncio.TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        await self._reap()

    async def _reap(self) -> None:
        if self._reaped:
            return
        self._reaped = True
        code = await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stderr), _GRACE)
        if not self._stderr.done():
            self._stderr.cancel()
        lifetime = time.monotonic() - self.started
        if not self.closing:
            log.warning("mcp_server_exited", pid=self.proc.pid, code=code)
        self.transport._exited(lifetime, expected=self.closing)

    async def _log_stderr(self) -> None:
        stderr = self.proc.stderr
        assert stderr is not None
        with contextlib.suppress(ValueError, ConnectionError):
            while line := await stderr.readline():
                text = line.decode(errors="replace").rstrip()
                if text:
                    log.info("mcp_server_stderr", pid=self.proc.pid, line=text[:2000])
