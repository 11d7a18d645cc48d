"""What the server takes from the operating system: file descriptors and memory.

Every connection holds a file descriptor; when the process runs out, ``accept()`` fails and
clients cannot even be told to come back later. So the server raises its descriptor limit as
far as it may at start, and caps client connections below what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import sys
from collections.abc import Callable

import structlog

from llamapool.config import ServeConfig

log = structlog.get_logger("llamapool.server")

#: Connections the ``--metrics-port`` listener keeps apart from the clients' (Prometheus
#: scrapes there even when clients fill the main port).
METRICS_CONNECTIONS = 32
#: The metrics listener's backlog: a few scrapers, never a burst.
METRICS_BACKLOG = 128


def fd_reserve(cfg: ServeConfig) -> int:
    """Descriptors kept for what is not a client or worker connection: a burst of accepts
    (asyncio accepts up to ``backlog`` in one go, before the connection guard sees them), the
    metrics port's connections, refused connections being closed, listening sockets, log
    files, the event loop's own, files the dashboard serves."""
    return 2 * cfg.backlog + METRICS_CONNECTIONS + 96


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
    if it fits beside ``max_workers`` and :func:`fd_reserve`, else less, with one warning.

    When both do not fit, clients get what the workers leave, but at least half the budget:
    a pool with thousands of worker slots is unusual, a flood of clients is not.
    """
    reserved = fd_reserve(cfg)
    budget = open_files - reserved
    if cfg.max_connections + cfg.max_workers <= budget:
        return cfg.max_connections
    cap = max(1, min(cfg.max_connections, max(budget - cfg.max_workers, budget // 2)))
    log.warning(
        "open_file_limit_too_low",
        open_file_limit=open_files,
        max_connections=cfg.max_connections,
        max_workers=cfg.max_workers,
        reserved=reserved,
        connection_cap=cap,
        hint="raise LimitNOFILE= (systemd) or ulimit -n, or lower MAX_CONNECTIONS/MAX_WORKERS"
        "/BACKLOG",
    )
    return cap


def unlink_transport(transport: asyncio.BaseTransport) -> None:
    """Let a closed connection's transport be freed the moment it is dropped.

    CPython's selector socket transport keeps a bound method of itself (``_read_ready_cb``),
    a reference cycle that outlives the connection until a full garbage collection, with its
    socket objects and buffers. Called once the connection is lost (its reader is removed by
    then, so the method is never called again); a no-op on other transports (uvloop's).
    """
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


def release_memory() -> None:
    """Give memory freed by closed connections back to the operating system.

    Connections leave no reference cycle behind (see :func:`unlink_transport`), so their
    objects are freed as they close; what keeps the memory is the interpreter's free lists,
    whose few survivors pin whole arenas, and glibc, which keeps freed pages unless asked
    (``malloc_trim``). A full collection clears the free lists; with every live object frozen
    first (see :func:`freeze_survivors`) it scans nothing, so it costs no pause even with
    thousands of streams open.
    """
    freeze_survivors(young=True)
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def freeze_survivors(*, young: bool = False) -> None:
    """Collect garbage, then move every object alive out of the garbage collector's sight
    (``gc.freeze``); ``young``: collect only the younger generations (no pause).

    Called once the server has started, for its long-lived objects (modules, the app, the
    pool), and at each :func:`release_memory`. A full collection costs a pause as long as the
    objects it scans are many, tens of milliseconds per ten thousand requests in flight, and
    would find nothing in them: the relay path makes no reference cycles, so a frozen object
    is still freed the moment it is dropped. Only a cycle alive now and dropped later would
    stay (until :func:`gc.unfreeze`), and the request path makes none.
    """
    gc.collect(1 if young else 2)
    gc.freeze()


#: Collections of the middle generation between two full ones (CPython's default: 10).
#: Requests make no reference cycles, so a full collection finds next to nothing and costs a
#: pause as long as the objects alive are many: while thousands of streams open, the default
#: ran one every second or so, 50-100 ms each, all finding nothing.
FULL_COLLECTION_EVERY = 100


def tune_gc() -> None:
    """Make full garbage collections rarer (see :data:`FULL_COLLECTION_EVERY`)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


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
