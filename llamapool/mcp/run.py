"""Run the relay until SIGINT or SIGTERM: the first drains, a second stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil

import structlog

from llamapool.dialout import draining_on_signals
from llamapool.errors import ConfigError
from llamapool.mcp.agent import McpRelay
from llamapool.mcp.config import ONE_TRANSPORT, McpConfig
from llamapool.mcp.http import StreamableHttpTransport
from llamapool.mcp.sse import SseTransport
from llamapool.mcp.stdio import StdioTransport
from llamapool.mcp.transport import Transport
from llamapool.tls import client_context
from llamapool.urls import url_for_logs

log = structlog.get_logger("llamapool.mcp")


def _runnable(cfg: McpConfig) -> bool:
    """Whether the command's program can be started as the session will start it: a path is
    taken from ``--cwd``, a name looked up in the ``PATH`` it is given (``--env``) or ours."""
    program = cfg.command[0]
    if os.sep in program:
        full = os.path.join(cfg.cwd, program) if cfg.cwd else program
        return os.path.isfile(full) and os.access(full, os.X_OK)
    return shutil.which(program, path=dict(cfg.env).get("PATH", os.environ.get("PATH"))) is not None


def make_transport(cfg: McpConfig) -> Transport:
    """The transport ``cfg`` names: ``command`` (stdio), ``url`` (Streamable HTTP) or
    ``sse_url`` (HTTP+SSE)."""
    if [bool(cfg.command), bool(cfg.url), bool(cfg.sse_url)].count(True) != 1:
        raise ConfigError(ONE_TRANSPORT)
    if cfg.command:
        # Checked now, not when the first client opens a session and gets an error instead.
        if cfg.cwd and not os.path.isdir(cfg.cwd):
            raise ConfigError(f"--cwd {cfg.cwd} is not a directory")
        if not _runnable(cfg):
            raise ConfigError(f"--command: {cfg.command[0]} is not an executable program")
        return StdioTransport(
            cfg.command, cwd=cfg.cwd, env=cfg.env, max_message_bytes=cfg.max_message_bytes
        )
    option, url = ("--url", cfg.url) if cfg.url else ("--sse-url", cfg.sse_url)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{option} must be an http:// or https:// URL, not {url_for_logs(url)!r}")
    tls = client_context(ca_file=cfg.upstream_ca_file, insecure=cfg.upstream_tls_insecure)
    kind = StreamableHttpTransport if cfg.url else SseTransport
    return kind(url, headers=cfg.headers, tls=tls, max_message_bytes=cfg.max_message_bytes)


async def relay(cfg: McpConfig) -> None:
    """The relay until a signal: the first drains within ``drain_timeout``, a second stops."""
    agent = McpRelay(cfg, make_transport(cfg))
    running = asyncio.ensure_future(agent.run())
    async with draining_on_signals(
        running, lambda: agent.drain(cfg.drain_timeout), timeout=cfg.drain_timeout
    ):
        with contextlib.suppress(asyncio.CancelledError):
            await running
    log.info("relay_stopped")
