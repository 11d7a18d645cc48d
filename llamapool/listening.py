"""Opening a listening socket, or one clear line saying why it cannot be opened."""

from __future__ import annotations

import os
import socket

from aiohttp import web

from llamapool.errors import ConfigError


async def listen(site: web.BaseSite, *, setting: str) -> None:
    """Start ``site``; a port in use, a privileged port or an address this host does not have
    is a :class:`ConfigError` naming the ``setting`` that chose it, not a traceback."""
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {site.name} ({setting}): {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    # uvloop's message repeats the address; the errno's own text is the reason.
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno).lower()
    return str(exc.strerror or exc).lower()
