"""How the relay reaches its MCP server: one small interface, one class per transport.

A :class:`Transport` opens one :class:`Channel` per client session; a channel carries JSON-RPC
messages as JSON text both ways, in order, until either side closes it.
"""

from __future__ import annotations

from typing import Protocol


class Channel(Protocol):
    """One session with the MCP server."""

    async def send(self, data: str) -> None:
        """Deliver one JSON-RPC message (or batch) to the MCP server; raises
        :class:`~llamapool.errors.McpUpstreamError` if the message was to start the session
        (a Streamable HTTP ``initialize``) and the server cannot be reached."""

    async def receive(self) -> str | None:
        """The next message from the MCP server; ``None`` once the session is over."""

    def ended(self) -> str:
        """Why the session ended on the MCP server's side (after :meth:`receive` said so)."""

    async def close(self) -> None:
        """End the session (stop the process, or tell the HTTP server); idempotent."""


class Transport(Protocol):
    """Opens sessions with one MCP server."""

    #: Shown in logs: ``stdio``, ``streamable_http``, ``sse``.
    name: str

    async def open(self) -> Channel:
        """A new session; raises :class:`~llamapool.errors.McpUpstreamError` if impossible."""

    async def close(self) -> None:
        """Release what the transport holds (connection pools); channels are closed first."""
