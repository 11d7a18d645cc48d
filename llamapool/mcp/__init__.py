"""``llamapool mcp``: a relay that puts a private MCP server behind the pool's public endpoint.

It dials out to the server like a worker, registers an endpoint id, and for each client session
the server opens, holds one session with the MCP server through a :class:`Transport`.
"""

from __future__ import annotations

from llamapool.mcp.config import McpConfig
from llamapool.mcp.transport import Channel, Transport

__all__ = ["Channel", "McpConfig", "Transport"]
