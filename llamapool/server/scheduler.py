"""Who takes the next request, and who waits: the pool plus a bounded FIFO per model.

When every worker serving a model is at its max concurrency, a request waits in that model's
queue instead of failing. Whenever a slot frees or a worker joins, the heads of the queues are
offered the new capacity, oldest first. A full queue fails fast (429); a wait past the timeout
fails with 503; a client that leaves is dropped from the queue. With no queued request the
scheduler costs nothing beyond the pool itself.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection

import attrs

from llamapool.errors import QueueFullError, QueueTimeoutError, RoutingError, WorkersBusyError
from llamapool.server.pool import Pool, WorkerHandle, fallback_names


@attrs.define(eq=False)
class _Waiter:
    model: str
    path: str
    exclude: Collection[WorkerHandle]
    future: asyncio.Future[WorkerHandle]
    since: float


class Scheduler:
    """Hands out worker slots, queueing requests while every eligible worker is busy."""

    def __init__(
        self,
        pool: Pool,
        *,
        queue_size: int,
        queue_timeout: float,
        on_change: Callable[[int, float | None], None] = lambda length, waited: None,
    ) -> None:
        self.pool = pool
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self._on_change = on_change
        self._queues: dict[str, deque[_Waiter]] = {}
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def queued_for(self, worker: WorkerHandle) -> int:
        """Queued requests this worker could take (per-worker ``queue_len`` in the state API)."""
        return sum(
            len(queue)
            for model, queue in self._queues.items()
            if any(name in worker.models for name in fallback_names(model))
        )

    async def acquire(
        self, model: str, path: str, *, exclude: Collection[WorkerHandle] = ()
    ) -> WorkerHandle:
        """A slot on the least-busy eligible worker, waiting in line if all are busy."""
        try:
            return self.pool.acquire(model, path, exclude=exclude)
        except WorkersBusyError:
            if self.queue_size <= 0:
                raise
        if len(self._queues.get(model, ())) >= self.queue_size:
            raise QueueFullError(f"every worker serving {model!r} is busy and the queue is full")
        future = asyncio.get_running_loop().create_future()
        waiter = _Waiter(model, path, exclude, future, time.monotonic())
        self._join(waiter)
        try:
            worker = await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout)
        except BaseException as exc:
            self._abandon(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                raise QueueTimeoutError(
                    f"no worker serving {model!r} became free within {self.queue_timeout:g}s"
                ) from None
            raise
        return worker

    def release(self, worker: WorkerHandle) -> None:
        """Give a slot back and offer it to the queue."""
        self.pool.release(worker)
        self.dispatch()

    def dispatch(self) -> None:
        """Offer free capacity to the oldest waiters (after a release, a join or a leave).

        Waiters whose model no worker serves any more fail at once instead of timing out.
        """
        if not self._length:
            return
        for model, queue in list(self._queues.items()):
            while queue:
                waiter = queue[0]
                try:
                    worker = self.pool.acquire(model, waiter.path, exclude=waiter.exclude)
                except WorkersBusyError:
                    break
                except RoutingError as exc:  # the last worker for the model left
                    self._leave(waiter, waited=None)
                    waiter.future.set_exception(exc)
                    continue
                self._leave(waiter, waited=time.monotonic() - waiter.since)
                waiter.future.set_result(worker)

    # The queues change only in _join and _leave, which report every new length.

    def _join(self, waiter: _Waiter) -> None:
        self._queues.setdefault(waiter.model, deque()).append(waiter)
        self._length += 1
        self._on_change(self._length, None)

    def _leave(self, waiter: _Waiter, *, waited: float | None) -> None:
        """Take a waiter out of its queue; ``waited`` is set when it leaves with a slot."""
        queue = self._queues[waiter.model]
        if queue[0] is waiter:
            queue.popleft()
        else:
            queue.remove(waiter)
        if not queue:
            del self._queues[waiter.model]
        self._length -= 1
        self._on_change(self._length, waited)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter stopped waiting (timeout, client gone): leave the queue, return any slot."""
        if waiter in self._queues.get(waiter.model, ()):
            self._leave(waiter, waited=None)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            self.release(future.result())  # granted a slot it can no longer use
