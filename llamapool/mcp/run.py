"""Run the relay until SIGINT or SIGTERM: the first drains, a second stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from llamapool.errors import ConfigError
from llamapool.mcp.agent import McpRelay
from llamapool.mcp.config import McpConfig
from llamapool.mcp.http import StreamableHttpTransport
from llamapool.mcp.stdio import StdioTransport
from llamapool.mcp.transport import Transport
from llamapool.tls import client_context

log = structlog.get_logger("llamapool.mcp")


def make_transport(cfg: McpConfig) -> Transport:
    """The transport ``cfg`` names: ``command`` (stdio) or ``url`` (Streamable HTTP)."""
    if bool(cfg.command) == bool(cfg.url):
        raise ConfigError("give exactly one of --command (stdio) and --url (Streamable HTTP)")
    if cfg.command:
        return StdioTransport(
            cfg.command, cwd=cfg.cwd, env=cfg.env, max_message_bytes=cfg.max_message_bytes
        )
    if not cfg.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http:// or https:// URL, not {cfg.url!r}")
    tls = client_context(ca_file=cfg.upstream_ca_file, insecure=cfg.upstream_tls_insecure)
    return StreamableHttpTransport(
        cfg.url, headers=cfg.headers, tls=tls, max_message_bytes=cfg.max_message_bytes
    )


async def relay(cfg: McpConfig) -> None:
    """The relay until a signal: the first drains within ``drain_timeout``, a second stops."""
    agent = McpRelay(cfg, make_transport(cfg))
    running = asyncio.ensure_future(agent.run())
    draining: list[asyncio.Task[None]] = []

    async def drain() -> None:
        await agent.drain(cfg.drain_timeout)
        running.cancel()

    def on_signal() -> None:
        if draining or cfg.drain_timeout == 0:
            running.cancel()
        else:
            draining.append(asyncio.ensure_future(drain()))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, on_signal)
    with contextlib.suppress(asyncio.CancelledError):
        await running
    for task in draining:
        task.cancel()
    log.info("relay_stopped")
