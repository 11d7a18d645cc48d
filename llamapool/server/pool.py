"""The worker registry and the least-busy scheduler. No aiohttp here: pure bookkeeping.

Picking a worker costs the same with ten workers or ten thousand. For each model the pool keeps
the workers that serve it, grouped by what they can serve (their API paths) and bucketed by
their number of requests in flight; a worker with no free slot sits in no bucket. Acquiring or
releasing a slot moves one worker between neighbouring buckets of each model it serves.
"""

from __future__ import annotations

import hmac
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Protocol

import attrs

from llamapool.errors import NoWorkerError, WorkerIdInUseError, WorkersBusyError
from llamapool.memo import Remembered
from llamapool.protocol import ProxyRequest
from llamapool.server.exchange import Exchange

#: Go's alias rule: ``name:tag-suffix`` falls back to ``name:tag``.
_ALIAS = re.compile(r"^([^:]+):([^-\s]+)(-.+)?$")


def _fallback_names(model: str) -> tuple[str, ...]:
    """Names to try, in order, for a requested model.

    The exact name first; then Go's alias (``llama3:8b-q4_0`` -> ``llama3:8b``); then Ollama's
    implicit tag (``llama3`` <-> ``llama3:latest``).
    """
    names = [model]
    match = _ALIAS.match(model)
    if match and match.group(3):
        names.append(f"{match.group(1)}:{match.group(2)}")
    if ":" not in model:
        names.append(model + ":latest")
    elif model.endswith(":latest"):
        names.append(model.removesuffix(":latest"))
    return tuple(names)


#: :func:`_fallback_names`, remembered: a request asks it two or three times (to choose a
#: worker, then the name it serves), and names come from clients (see
#: :class:`~llamapool.memo.Remembered` for the bounds).
fallback_names = Remembered(_fallback_names)


class Link(Protocol):
    """The connection a worker is reached through; the pool only stores it."""

    @property
    def window(self) -> int: ...

    def open(self) -> Exchange: ...

    def forget(self, request_id: str) -> None: ...

    async def send_request(self, request: ProxyRequest, body: bytes) -> None: ...

    async def cancel(self, request_id: str) -> None: ...

    def grant_soon(self, request_id: str, amount: int) -> None: ...

    def close_soon(self, reason: str) -> None: ...


@attrs.define(eq=False)
class WorkerHandle:
    """One connected worker as the scheduler sees it."""

    id: str
    name: str
    models: frozenset[str]
    max_concurrency: int
    #: API paths it serves; ``None`` means every path (Go workers do not say).
    paths: frozenset[str] | None
    link: Link
    version: str = ""
    build_sha: str = ""
    build_date: str = ""
    backend: str = ""
    #: The worker's protocol extension level; 0 for a Go worker.
    protocol: int = 0
    #: The worker process's secret (see ``Register.instance``); empty for a Go worker.
    instance: str = attrs.field(default="", repr=False)
    #: The name of the worker key it connected with (never the key): ``anonymous`` for
    #: ``WORKER_KEY`` keys and in a pool without worker keys.
    credential: str = "anonymous"
    #: In a cluster, the id of the server the worker is connected to when that is another
    #: server (its link then crosses to that server); empty for a worker connected here.
    server: str = ""
    inflight: int = 0
    #: Set when the worker said it is draining: it finishes its requests but takes no more.
    draining: bool = False
    #: Cleared while the worker says its backend is down.
    ready: bool = True
    connected_at: float = attrs.field(factory=time.time)
    last_heartbeat: float = attrs.field(factory=time.monotonic)
    _buckets: list[_Buckets] = attrs.field(factory=list, repr=False)
    #: When the scheduler last picked this worker: ties go to the least recently picked.
    _picked: int = attrs.field(default=0, repr=False)

    @property
    def routable(self) -> bool:
        """Whether new requests may be sent to this worker."""
        return self.ready and not self.draining

    @property
    def has_capacity(self) -> bool:
        return self.inflight < self.max_concurrency


class _Buckets:
    """Workers serving one model with one set of paths, bucketed by requests in flight.

    Each level holds the workers connected to this server before those of other servers of
    a cluster: between equally busy workers, a request stays on this server rather than
    crossing to another (a hop costs both servers CPU and the client latency).
    """

    __slots__ = ("_levels", "_lowest", "members", "paths")

    def __init__(self, paths: frozenset[str] | None) -> None:
        self.paths = paths
        self.members = 0
        # OrderedDict, not dict: a dict finds its first key by scanning the holes its removed
        # keys left, which makes round-robin O(workers); an OrderedDict's first key is O(1).
        # Per level: (this server's workers, other servers' workers).
        self._levels: list[tuple[OrderedDict[WorkerHandle, None], ...]] = []
        self._lowest = 0

    def serves(self, path: str) -> bool:
        return self.paths is None or path in self.paths

    def insert(self, worker: WorkerHandle) -> None:
        if not worker.has_capacity:
            return
        level = worker.inflight
        while len(self._levels) <= level:
            self._levels.append((OrderedDict(), OrderedDict()))
        # Appended last: ties rotate round-robin.
        self._levels[level][1 if worker.server else 0][worker] = None
        self._lowest = min(self._lowest, level)

    def discard(self, worker: WorkerHandle) -> None:
        if worker.inflight < len(self._levels):
            self._levels[worker.inflight][1 if worker.server else 0].pop(worker, None)

    def least_busy(self) -> WorkerHandle | None:
        levels = self._levels
        while self._lowest < len(levels):
            here, elsewhere = levels[self._lowest]
            if here:
                return next(iter(here))
            if elsewhere:
                return next(iter(elsewhere))
            self._lowest += 1
        return None


@attrs.frozen
class ModelInfo:
    """A model the pool can serve, for the model listing endpoints."""

    id: str
    created: int
    workers: tuple[WorkerHandle, ...]


class Pool:
    """Connected workers, the models they serve, and who takes the next request."""

    def __init__(self) -> None:
        #: Called after a worker's requests in flight changed (a cluster publishes its load).
        self.on_load: Callable[[WorkerHandle], None] | None = None
        self._workers: dict[str, WorkerHandle] = {}
        self._index: dict[str, dict[frozenset[str] | None, _Buckets]] = {}
        self._first_seen: dict[str, int] = {}
        self._picks = 0
        #: Models of connected workers that cannot take requests right now (draining, backend
        #: down), with how many such workers: requests for them wait instead of failing.
        self._parked: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self._workers.values()))

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._workers.get(worker_id)

    def add(self, worker: WorkerHandle) -> WorkerHandle | None:
        """Register a worker; returns the handle it replaces when its id was connected.

        Only the same worker process may take over a connected id (it proves it with its
        instance secret, e.g. after its link went dead before the server noticed); anyone
        else gets :class:`WorkerIdInUseError` until the connected one leaves or is evicted.
        """
        old = self._workers.get(worker.id)
        if old is not None:
            if not (old.instance and hmac.compare_digest(old.instance, worker.instance)):
                raise WorkerIdInUseError(f"worker id {worker.id!r} is connected")
            self.remove(old)
        self._workers[worker.id] = worker
        self._link(worker, worker.models)
        self._park(worker, +1)
        return old

    def remove(self, worker: WorkerHandle) -> bool:
        """Forget a worker; ``False`` if it was already gone (or replaced)."""
        if self._workers.get(worker.id) is not worker:
            return False
        del self._workers[worker.id]
        self._unlink(worker)
        self._park(worker, -1)
        return True

    def set_models(self, worker: WorkerHandle, models: Iterable[str]) -> None:
        """Replace the models a connected worker serves."""
        self.reconfigure(worker, models=frozenset(models))

    def set_status(
        self, worker: WorkerHandle, *, draining: bool | None = None, ready: bool | None = None
    ) -> None:
        """Take a worker out of routing (draining, backend down) or put it back."""
        changes: dict[str, bool] = {}
        if draining is not None:
            changes["draining"] = draining
        if ready is not None:
            changes["ready"] = ready
        self.reconfigure(worker, **changes)

    def reconfigure(self, worker: WorkerHandle, **changes: object) -> None:
        """Change what a worker serves (``models``, ``paths``, ``max_concurrency``, ``ready``,
        ``draining``), moving it between the index's groups."""
        connected = self._workers.get(worker.id) is worker
        self._unlink(worker)
        if connected:
            self._park(worker, -1)
        for name, value in changes.items():
            setattr(worker, name, value)
        if connected:
            self._link(worker, worker.models)
            self._park(worker, +1)

    def acquire(
        self, model: str, path: str, *, exclude: Collection[WorkerHandle] = ()
    ) -> WorkerHandle:
        """Take a slot on the least-busy worker serving ``model`` at ``path``.

        Raises :class:`NoWorkerError` when no worker serves it (even through an alias) and
        :class:`WorkersBusyError` when all that do are full. Workers in ``exclude`` (those a
        retried request already failed on) are left out, at a cost paid only by retries.
        """
        if not exclude:
            return self._acquire(model, path)
        hidden = [w for w in exclude if w._buckets]
        for worker in hidden:
            self._unlink(worker)
        try:
            return self._acquire(model, path)
        finally:
            for worker in hidden:
                if self._workers.get(worker.id) is worker:
                    self._link(worker, worker.models)

    def _acquire(self, model: str, path: str) -> WorkerHandle:
        for name in fallback_names(model):
            groups = self._index.get(name)
            if not groups:
                continue
            best: WorkerHandle | None = None
            eligible = False
            for buckets in groups.values():
                if not buckets.serves(path):
                    continue
                eligible = True
                candidate = buckets.least_busy()
                if candidate is not None and (best is None or _rank(candidate) < _rank(best)):
                    best = candidate
            if best is not None:
                self._picks += 1
                best._picked = self._picks
                self._move(best, +1)
                return best
            if eligible:
                raise WorkersBusyError(f"every worker serving {name!r} is busy")
        for name in fallback_names(model):
            if self._parked.get(name):
                raise WorkersBusyError(f"no worker serving {name!r} can take requests right now")
        raise NoWorkerError(f"no worker serves model {model!r} at {path}")

    def acquire_worker(self, worker: WorkerHandle, path: str | None) -> WorkerHandle:
        """Take a slot on one given worker, for a request only it can serve (it holds a stored
        response, or another server of the cluster chose it); :meth:`release` gives it back.
        ``path=None``: the caller has checked what the worker serves.

        Raises :class:`NoWorkerError` when the worker left or does not serve ``path`` and
        :class:`WorkersBusyError` when it is full or takes no requests now (never queued).
        """
        if self._workers.get(worker.id) is not worker or not (
            worker.paths is None or path is None or path in worker.paths
        ):
            raise NoWorkerError(f"worker {worker.name!r} does not serve {path} any more")
        if not (worker.routable and worker.has_capacity):
            raise WorkersBusyError(f"worker {worker.name!r} can not take requests right now")
        self._picks += 1
        worker._picked = self._picks
        self._move(worker, +1)
        return worker

    def release(self, worker: WorkerHandle) -> None:
        """Give back a slot taken with :meth:`acquire`."""
        if worker.inflight > 0:
            self._move(worker, -1)

    def models(self) -> list[ModelInfo]:
        """Every model some worker serves, sorted by id, with its workers sorted by name."""
        by_model: dict[str, list[WorkerHandle]] = {}
        for worker in self._workers.values():
            if not worker.routable:
                continue
            for model in worker.models:
                by_model.setdefault(model, []).append(worker)
        return [
            ModelInfo(
                id=model,
                created=self._first_seen[model],
                workers=tuple(sorted(workers, key=lambda w: w.name)),
            )
            for model, workers in sorted(by_model.items())
        ]

    def advertised(self) -> set[str]:
        """Every model a connected worker advertises, whether or not it takes requests now."""
        return self._index.keys() | self._parked.keys()

    def forget_model(self, model: str) -> None:
        """Drop what the pool remembers of a model nobody advertises (its first-seen time)."""
        if model not in self._index:
            self._first_seen.pop(model, None)

    # bookkeeping ---------------------------------------------------------------------------

    def _park(self, worker: WorkerHandle, delta: int) -> None:
        """Count (or uncount) the models of a connected worker that is not routable."""
        if worker.routable:
            return
        for model in worker.models:
            count = self._parked.get(model, 0) + delta
            if count > 0:
                self._parked[model] = count
            else:
                self._parked.pop(model, None)

    def set_inflight(self, worker: WorkerHandle, inflight: int) -> None:
        """Set a worker's requests in flight as counted elsewhere (a worker of another server
        of the cluster: the load that server reports)."""
        self._move(worker, max(0, inflight) - worker.inflight)

    def _move(self, worker: WorkerHandle, delta: int) -> None:
        for buckets in worker._buckets:
            buckets.discard(worker)
        worker.inflight += delta
        for buckets in worker._buckets:
            buckets.insert(worker)
        if self.on_load is not None:
            self.on_load(worker)

    def _link(self, worker: WorkerHandle, models: Iterable[str]) -> None:
        if not worker.routable:
            return
        now = int(time.time())
        for model in models:
            groups = self._index.setdefault(model, {})
            buckets = groups.get(worker.paths)
            if buckets is None:
                buckets = groups[worker.paths] = _Buckets(worker.paths)
            buckets.members += 1
            buckets.insert(worker)
            worker._buckets.append(buckets)
            self._first_seen.setdefault(model, now)

    def _unlink(self, worker: WorkerHandle) -> None:
        if not worker._buckets:
            return
        for model in worker.models:
            groups = self._index.get(model)
            buckets = groups.get(worker.paths) if groups else None
            if groups is None or buckets is None:
                continue
            buckets.discard(worker)
            buckets.members -= 1
            if buckets.members == 0:
                del groups[worker.paths]
                if not groups:
                    del self._index[model]
        worker._buckets.clear()


def _rank(worker: WorkerHandle) -> tuple[int, bool, int]:
    """Least busy first, then a worker of this server, then the least recently picked."""
    return worker.inflight, bool(worker.server), worker._picked
