"""``serve --processes N``: one server process per core, one port, one pool.

An event loop runs on one core, so one server process relays what one core can. To use every
core of a host, the parent starts N server processes that share the listening port (with
SO_REUSEPORT the kernel spreads new connections over them) and join one cluster through
``CLUSTER_URL``: a request that reaches any process is served by the least-busy worker,
whichever process it is connected to (see :mod:`llamapool.server.cluster`).

The parent only supervises. It forwards SIGTERM, SIGINT and SIGHUP (the processes are in a
process group of their own, so a terminal's Ctrl-C reaches each once, through it), restarts a
process that died (unless the processes keep dying at start, which is a setting they all
refuse: then it stops them and fails), and exits once all have stopped, with a non-zero
status if one did not stop cleanly. A process whose supervisor is gone (killed outright)
stops on its own.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import attrs
import structlog

from llamapool import eventloop
from llamapool._cli_options import apply_log_settings
from llamapool._cli_serve import ServeSettings

log = structlog.get_logger("llamapool")

#: A process that dies sooner than this after its start counts as failing to start.
SHORT_LIFE = 5.0
#: Failed starts in a row after which the supervisor gives up.
MAX_FAILED_STARTS = 3
#: Seconds before a process that died is started again.
RESTART_DELAY = 1.0


def supervise(settings: ServeSettings) -> int:
    """Run ``settings.config.processes`` server processes until they stop; the exit status."""
    count = settings.config.processes
    context = multiprocessing.get_context("spawn")
    children: dict[int, tuple[BaseProcess, float]] = {}
    stopping = False

    def start(index: int) -> None:
        process = context.Process(target=_serve, args=(settings, index), name=f"server-{index}")
        process.start()
        children[index] = (process, time.monotonic())

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for process, _started in children.values():
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("server_processes_starting", processes=count, port=settings.config.port)
    for index in range(count):
        start(index)
    failed_starts = 0
    status = 0
    while children:
        wait([process.sentinel for process, _ in children.values()], timeout=1.0)
        for index, (process, started) in list(children.items()):
            if process.exitcode is None:
                continue
            del children[index]
            if stopping:
                if process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                    status = 1  # it did not stop cleanly
                continue
            lived = time.monotonic() - started
            failed_starts = failed_starts + 1 if lived < SHORT_LIFE else 0
            log.warning("server_process_exited", process=index, exit_code=process.exitcode)
            if failed_starts >= MAX_FAILED_STARTS:
                log.error("server_processes_failing", hint="see the processes' own errors")
                status = 1
                forward(signal.SIGTERM, None)
                continue
            time.sleep(RESTART_DELAY)
            start(index)
    return status


def _orphaned(parent: int) -> None:
    """Stop (draining, as on SIGTERM) once the supervisor is gone, even killed outright: a
    server process must not go on serving on its own, out of anyone's control."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _serve(settings: ServeSettings, index: int) -> None:
    """One server process: its own process group, the shared port, its own metrics port."""
    from llamapool import run

    os.setpgrp()  # a terminal's Ctrl-C reaches it once, through the supervisor
    threading.Thread(target=_orphaned, args=(os.getppid(),), daemon=True).start()
    cfg = settings.config
    cfg = attrs.evolve(
        cfg,
        processes=1,
        reuse_port=True,
        metrics_port=cfg.metrics_port + index if cfg.metrics_port else cfg.metrics_port,
    )
    apply_log_settings(settings.log, f"server-{index}.log")
    structlog.contextvars.bind_contextvars(process=index)
    eventloop.run(run.serve(cfg))
