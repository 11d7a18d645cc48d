"""A small MCP server for the relay tests, on the official SDK (mcp 2.x ``MCPServer``).

``python tests/mcp_server.py`` speaks stdio; ``--http`` serves Streamable HTTP (at ``/mcp``),
``--sse`` the older HTTP+SSE transport (at ``/sse``), on a free loopback port, and prints
``PORT <n>`` once it listens; ``--start-delay S`` waits S seconds before it serves. When
``MCP_TEST_MARKERS`` names a directory, the slow tool writes ``started-<pid>`` there when it
begins and ``cancelled-<pid>`` when it is cancelled, so a test can see what the server saw.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import anyio
import mcp.types as types
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("relay-test")


def _mark(name: str) -> None:
    markers = os.environ.get("MCP_TEST_MARKERS")
    if markers:
        Path(markers, f"{name}-{os.getpid()}").write_text(str(os.getpid()))


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@server.tool()
async def slow(steps: int, ctx: Context, hang: bool = False) -> str:
    """Report progress ``steps`` times, a tenth of a second apart (then hang, if asked)."""
    _mark("started")
    try:
        if hang:
            await anyio.sleep_forever()
        for step in range(steps):
            await ctx.report_progress(step + 1, steps, f"step {step + 1}")
            await anyio.sleep(0.1)
    except anyio.get_cancelled_exc_class():
        _mark("cancelled")
        raise
    return f"done after {steps} steps"


@server.tool()
async def ask(question: str, ctx: Context) -> str:
    """Ask the client's model (sampling) and return its answer."""
    result = await ctx.session.create_message(
        [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))],
        max_tokens=20,
    )
    content = result.content
    return content.text if isinstance(content, types.TextContent) else "?"


@server.resource("test://greeting")
def greeting() -> str:
    """A fixed text."""
    return "hello from a private MCP server"


@server.prompt()
def review(code: str) -> str:
    """Ask for a review of ``code``."""
    return f"Please review: {code}"


def _serve_http(*, sse: bool) -> None:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = server.sse_app() if sse else server.streamable_http_app()
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    anyio.run(uvicorn.Server(config).serve, [sock])


if __name__ == "__main__":
    if "--start-delay" in sys.argv:  # a server slow to start, as an npx package is
        time.sleep(float(sys.argv[sys.argv.index("--start-delay") + 1]))
    if "--http" in sys.argv or "--sse" in sys.argv:
        _serve_http(sse="--sse" in sys.argv)
    else:
        server.run()
