"""What the server takes from the operating system: file descriptors and memory.

Every connection holds a file descriptor; when the process runs out, ``accept()`` fails and
clients cannot even be told to come back later. So the server raises its descriptor limit as
far as it may at start, and caps client connections below what is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
from collections.abc import Callable

import structlog

from llamapool.config import ServeConfig

log = structlog.get_logger("llamapool.server")

#: Accepts the listening socket takes in one go, before the connection guard sees any of them.
BACKLOG = 128
#: Connections the ``--metrics-port`` listener keeps apart from the clients' (Prometheus
#: scrapes there even when clients fill the main port).
METRICS_CONNECTIONS = 32
#: Descriptors kept for what is not a client or worker connection: a burst of accepts, the
#: metrics port's connections, refused connections being closed, listening sockets, log files,
#: the event loop's own, files the dashboard serves.
FD_RESERVE = 2 * BACKLOG + METRICS_CONNECTIONS + 96


def raise_open_file_limit() -> int:
    """Raise the soft limit of open files to the hard one (as far as allowed); the limit now."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return sys.maxsize
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # macOS refuses an infinite soft limit; systemd's @resources filter refuses any.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def connection_cap(cfg: ServeConfig, open_files: int) -> int:
    """Client connections the server can hold with ``open_files`` descriptors: ``max_connections``
    if it fits beside ``max_workers`` and :data:`FD_RESERVE`, else less, with one warning.

    When both do not fit, clients get what the workers leave, but at least half the budget:
    a pool with thousands of worker slots is unusual, a flood of clients is not.
    """
    budget = open_files - FD_RESERVE
    if cfg.max_connections + cfg.max_workers <= budget:
        return cfg.max_connections
    cap = max(1, min(cfg.max_connections, max(budget - cfg.max_workers, budget // 2)))
    log.warning(
        "open_file_limit_too_low",
        open_file_limit=open_files,
        max_connections=cfg.max_connections,
        max_workers=cfg.max_workers,
        reserved=FD_RESERVE,
        connection_cap=cap,
        hint="raise LimitNOFILE= (systemd) or ulimit -n, or lower MAX_CONNECTIONS/MAX_WORKERS",
    )
    return cap


def release_memory() -> None:
    """Give memory freed by closed connections back to the operating system.

    asyncio's socket transports hold themselves in a reference cycle, so each closed one waits
    for the rare full garbage collection, and keeps the memory around it from being returned;
    then glibc keeps freed pages unless asked (``malloc_trim``). Takes tens of milliseconds
    with ten thousand connections just closed: call it after bursts, not per connection.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim
