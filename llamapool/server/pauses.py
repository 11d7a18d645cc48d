"""How long the server stops serving everyone at once: event-loop stalls and garbage collections.

One event loop carries every stream, so a callback that runs for 30 ms, or a full garbage
collection, delays every chunk of every stream by that much. Client-side latency shows it only
mixed with the network and the client's own delays; these two series show it from the server's
own clock:

- ``llamapool_event_loop_lag_seconds``: how late a timer asked for every
  :data:`TICK` seconds runs, less the time the operating system kept the server waiting for a
  CPU meanwhile (Linux: a machine busy with other work delays the timer too, but that is not a
  pause of the server's making). A stall shorter than a tick can hide between two timers; one
  longer than a tick is seen, short by at most a tick.
- ``llamapool_gc_pause_seconds{generation}``: each collection of the garbage collector, from its
  start to its end, in the process (every application of the process sees all of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from aiohttp import web

from llamapool.server.appkeys import STATE

#: Seconds between two lag measurements (each costs a few µs: under 0.5 ms of CPU a second).
TICK = 0.01


async def watch_pauses(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: measure loop lag and collection pauses while the application runs."""
    metrics = app[STATE].metrics
    lag, pause = metrics.event_loop_lag, metrics.gc_pause
    by_generation = [metrics.of(pause, str(generation)) for generation in range(3)]
    loop = asyncio.get_running_loop()
    clock = time.monotonic
    with _cpu_wait() as waited:
        due, wait = clock() + TICK, waited()
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal due, wait, timer
            now, wait_now = clock(), waited()
            lag.observe(max(0.0, now - due - (wait_now - wait)))
            due, wait = now + TICK, wait_now
            timer = loop.call_later(TICK, tick)

        started = 0.0

        def collecting(phase: str, info: dict[str, Any]) -> None:
            nonlocal started
            if phase == "start":
                started = clock()
            else:
                by_generation[info["generation"]].observe(clock() - started)

        timer = loop.call_later(TICK, tick)
        gc.callbacks.append(collecting)
        try:
            yield
        finally:
            gc.callbacks.remove(collecting)
            if timer is not None:
                timer.cancel()


@contextlib.contextmanager
def _cpu_wait() -> Iterator[Callable[[], float]]:
    """A clock of the seconds this thread has waited for a CPU (``/proc/thread-self/schedstat``,
    read without reopening it); always 0 where there is none."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        yield lambda: 0.0
        return

    def waited() -> float:
        return int(os.pread(fd, 64, 0).split()[1]) / 1e9

    try:
        yield waited
    finally:
        os.close(fd)
