"""The one owner of a worker's lifecycle: joining, changing models or status, leaving.

Three structures follow every worker: the pool (who takes the next request), the state (totals,
the state API, the metrics) and the scheduler (requests waiting for a worker). Each lifecycle
event must reach all three, in order, wherever it happens (a register, a models update, a
socket closing, an eviction); callers tell the registry what happened and it keeps them
consistent. What a worker may serve is what it advertises narrowed by its worker key's
``models`` (see :meth:`WorkerKeyStore.permit`), at register, on a models update and when a reload
changes the key. A worker leaves once: whichever of eviction and its socket closing comes first
does the work, the other finds nothing to do.

In a cluster, workers connected to other servers join, change and leave through the same
registry (``remote_*``), and every change to a local worker is announced, so the cluster
publishes it (see :mod:`llamapool.server.cluster`). A worker id is one worker: when it
connects here while the cluster lists it on another server, the connection here wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import structlog

from llamapool.protocol import STATUS_DRAINING, STATUS_NOT_READY, STATUS_READY
from llamapool.server.pool import Pool, WorkerHandle
from llamapool.server.scheduler import Scheduler
from llamapool.server.state import PoolState
from llamapool.server.worker_keys import WorkerKeyStore

log = structlog.get_logger("llamapool.server")


class Registry:
    """Tells the pool, the state and the scheduler about every worker event."""

    def __init__(
        self,
        pool: Pool,
        state: PoolState,
        scheduler: Scheduler,
        *,
        worker_keys: WorkerKeyStore | None = None,
    ) -> None:
        self.pool = pool
        self.state = state
        self.scheduler = scheduler
        self.worker_keys = worker_keys if worker_keys is not None else WorkerKeyStore()
        self.worker_keys.on_models_changed = self.set_models
        #: Told of every local worker whose registration changed (a cluster publishes it).
        self.announce: Callable[[WorkerHandle], None] = lambda worker: None

    def join(self, worker: WorkerHandle) -> WorkerHandle | None:
        """A worker registered; returns the connection of the same worker it replaces.

        Raises :class:`~llamapool.errors.WorkerIdInUseError` when another worker holds the id.
        """
        worker.models = self.worker_keys.permit(worker, worker.models)
        held = self.pool.get(worker.id)
        if held is not None and held.server:  # it was connected to another server: now here
            self.remote_leave(held)
        replaced = self.pool.add(worker)
        self.state.worker_joined(worker)
        self.state.models_changed()
        self.scheduler.dispatch()  # queued requests may be waiting for exactly this worker
        self.announce(worker)
        return replaced

    def leave(self, worker: WorkerHandle) -> bool:
        """A worker is gone (its socket closed, or it was evicted); ``False`` if it already
        was, or a new connection of the same worker replaced it. A worker of another server
        leaves only when the cluster says so (:meth:`remote_leave`)."""
        if worker.server or not self.pool.remove(worker):
            return False
        self.state.worker_left(worker)
        self.state.models_changed()
        self.scheduler.dispatch()  # fail waiters for models nobody serves any more
        self.announce(worker)
        return True

    def set_models(self, worker: WorkerHandle, models: Iterable[str]) -> None:
        """A connected worker's backend now serves ``models`` (or its key changed)."""
        self.pool.set_models(worker, self.worker_keys.permit(worker, models))
        self.state.models_changed()
        self.scheduler.dispatch()
        self.announce(worker)

    def set_status(self, worker: WorkerHandle, status: str) -> None:
        """A worker is ``ready``, ``draining`` or ``not_ready`` (other values are ignored, and
        so is a status that changes nothing: a worker may say the same thing twice)."""
        draining, ready = worker.draining, worker.ready
        if status == STATUS_DRAINING:
            draining = True
        elif status == STATUS_NOT_READY:
            ready = False
        elif status == STATUS_READY:
            draining, ready = False, True
        else:
            return
        if (draining, ready) == (worker.draining, worker.ready):
            return
        self.pool.set_status(worker, draining=draining, ready=ready)
        self.state.models_changed()
        self.scheduler.dispatch()
        self.announce(worker)
        log.info("worker_status_changed", worker_id=worker.id, status=status)

    # Workers connected to other servers of a cluster: in the pool and the scheduler (they take
    # requests like any other), not in the state's records (their own server counts them).

    def remote_join(self, worker: WorkerHandle) -> None:
        """A worker connected to another server joined the cluster (``worker.server``)."""
        if self.pool.get(worker.id) is not None:
            return  # a worker connected here holds the id: it wins, here
        self.pool.add(worker)
        self.state.models_changed()
        self.scheduler.dispatch()

    def remote_update(self, worker: WorkerHandle, **changes: object) -> None:
        """A worker of another server changed what it serves or whether it takes requests."""
        self.pool.reconfigure(worker, **changes)
        self.state.models_changed()
        self.scheduler.dispatch()

    def remote_leave(self, worker: WorkerHandle) -> None:
        """A worker of another server left (or its server did, or the cluster is out of
        reach); requests in flight to it end as that server ends them."""
        if self.pool.remove(worker):
            self.state.models_changed()
            self.scheduler.dispatch()
