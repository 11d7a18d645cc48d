"""The relay's settings."""

from __future__ import annotations

import socket

import attrs

from llamapool.config import check_server_urls, comma_separated

#: The error when a relay is given no transport, or more than one.
ONE_TRANSPORT = (
    "give exactly one of --command (stdio), --url (Streamable HTTP) and --sse-url (HTTP+SSE)"
)


@attrs.frozen(kw_only=True)
class McpConfig:
    """Everything ``llamapool mcp`` needs: where the pool is, and how to reach the MCP server.

    Exactly one of ``command`` (stdio), ``url`` (Streamable HTTP) and ``sse_url`` (the older
    HTTP+SSE transport) is set.
    """

    #: Every URL of ``SERVER_URL`` (comma-separated), tried in turn.
    server_url: tuple[str, ...] = attrs.field(
        default=("ws://localhost:8080/workers/connect",),
        converter=comma_separated,
        validator=check_server_urls,
    )
    worker_key: str = attrs.field(default="", repr=False)
    #: The public endpoint id: clients use ``/api/mcp/id/{mcp_id}``.
    mcp_id: str
    #: Display name of this relay.
    name: str = attrs.Factory(socket.gethostname)
    #: stdio: the MCP server's command line (already split), working directory, extra env.
    command: tuple[str, ...] = ()
    cwd: str = ""
    env: tuple[tuple[str, str], ...] = ()
    #: Streamable HTTP: the MCP server's URL and the headers to send it.
    url: str = ""
    #: HTTP+SSE (protocol 2024-11-05): the URL of the server's SSE stream.
    sse_url: str = ""
    #: Both HTTP transports: the headers to send the MCP server.
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), repr=False)
    upstream_ca_file: str = ""
    upstream_tls_insecure: bool = False
    #: Extra token clients must send in ``X-MCP-Token`` (only its SHA-256 reaches the server).
    token: str = attrs.field(default="", repr=False)
    #: Client sessions this relay holds at once (one upstream session each).
    max_sessions: int = 16
    #: Longest an MCP call may run without progress (0: the server's default).
    call_timeout: float = 300.0
    #: Largest JSON-RPC message from the MCP server.
    max_message_bytes: int = 4 * 1024 * 1024
    drain_timeout: float = 60.0
    reconnect_max: float = 30.0
    heartbeat_interval: float = 5.0
    server_timeout: float = 30.0
    ca_file: str = ""
    tls_insecure: bool = False
