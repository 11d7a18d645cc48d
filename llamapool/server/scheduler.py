"""Who takes the next request, and who waits: the pool plus a fair queue per model.

When every worker serving a model is at its max concurrency, a request waits in that model's
queue instead of failing. Whenever a slot frees or a worker joins, the queues are offered the
new capacity. Within a model's queue each client key has its own lane, and lanes are served by
start-time fair queueing: a lane's next turn is tagged with a virtual time that advances by
``1 / weight`` each time it is served, and the lowest tag goes first. So a key with 500 waiting
requests and a key with one take turns (in proportion to their weights), and within its lane a
key's requests go by priority, then in order of arrival. Picking the next request costs
O(log keys).

A lane keeps its finish tag while its model's queue is not empty, so a key that asks again
the moment it is served (one request at a time) starts where its last turn finished, behind the
others, not at the head of the line each time. The queue of a model with no waiter is dropped,
and its virtual time starts afresh.

In a cluster the servers share where their queues stand (see :class:`Turn`), and the fair queue
spans them: a lane starts no earlier than the virtual time of any server, a key's turns advance
by what it was served on every server, and a server whose next turn comes after another
server's leaves a freed slot to that one. So weights hold between keys whose requests wait on
different servers, and a key that spreads its requests over servers does not get a share per
server. The bound is what the servers have not heard of yet (one message, about a millisecond).

A full lane (``queue_size`` per key and model), or ``max_queued`` requests waiting in all,
fails fast (429); a wait past the timeout fails with 503; a client that leaves is dropped from
the queue. With no queued request the scheduler costs nothing beyond the pool itself.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Collection

import attrs

from llamapool.errors import (
    NoWorkerError,
    QueueFullError,
    QueueTimeoutError,
    RoutingError,
    WorkersBusyError,
)
from llamapool.server.keyfile import ANONYMOUS, Caller
from llamapool.server.pool import Pool, WorkerHandle, fallback_names

#: Seconds a server leaves a free slot to another server of its cluster whose next request
#: came first, before serving its own (should that one not take it).
DEFER_GRACE = 0.2


@attrs.frozen
class Turn:
    """Where one server's fair queue for a model stands: what the servers of a cluster tell
    each other so that the fair queue spans them."""

    #: The start tag of the turn it serves next, and when that turn's request arrived (by the
    #: wall clock; it breaks ties between servers).
    start: float
    arrived: float
    #: Its virtual time (the start tag of the last turn it served).
    vtime: float
    #: Each key's finish tag: where that key's next turn starts.
    finish: dict[str, float]


@attrs.define(eq=False)
class _Waiter:
    model: str
    path: str
    exclude: Collection[WorkerHandle]
    future: asyncio.Future[WorkerHandle]
    since: float
    lane: _Lane
    #: Cleared when it leaves the queue; a lane drops left waiters lazily.
    queued: bool = True
    #: When it arrived, by the wall clock (servers of a cluster compare it).
    arrived: float = attrs.field(factory=time.time)
    #: When it was first held back for a request of another server that came first.
    deferred: float | None = None


@attrs.define(eq=False)
class _Lane:
    """One key's waiting requests for one model, best first: (-priority, arrival, waiter)."""

    name: str
    weight: float
    waiting: list[tuple[int, int, _Waiter]] = attrs.Factory(list)
    live: int = 0
    #: Virtual time at which its next turn starts (its last turn's finish).
    finish: float = 0.0
    scheduled: bool = False

    def head(self) -> _Waiter | None:
        waiting = self.waiting
        while waiting and not waiting[0][2].queued:
            heapq.heappop(waiting)
        return waiting[0][2] if waiting else None

    def compact(self) -> None:
        """Drop waiters that left, once they outnumber those still waiting."""
        if len(self.waiting) > 2 * self.live + 8:
            self.waiting = [entry for entry in self.waiting if entry[2].queued]
            heapq.heapify(self.waiting)


@attrs.define(eq=False)
class _ModelQueue:
    lanes: dict[str, _Lane] = attrs.Factory(dict)
    #: Lanes with waiters: (start tag, order, lane).
    turns: list[tuple[float, int, _Lane]] = attrs.Factory(list)
    #: The start tag of the last turn served.
    vtime: float = 0.0
    length: int = 0


class Scheduler:
    """Hands out worker slots, queueing requests fairly while every eligible worker is busy."""

    def __init__(
        self,
        pool: Pool,
        *,
        queue_size: int,
        queue_timeout: float,
        max_queued: int = 0,
        on_change: Callable[[int, float | None], None] = lambda length, waited: None,
    ) -> None:
        self.pool = pool
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        #: Requests that may wait at once over every model and key (0: no overall bound).
        self.max_queued = max_queued
        self._on_change = on_change
        self._queues: dict[str, _ModelQueue] = {}
        self._by_key: Counter[str] = Counter()
        self._length = 0
        self._order = itertools.count()
        #: In a cluster: requests waiting on the other servers, for a model and key, and in
        #: all (the cluster sets them), so the queue bounds hold over the cluster.
        self.queued_elsewhere: Callable[[str, str], int] = lambda model, key: 0
        self.queued_elsewhere_total: Callable[[], int] = lambda: 0
        #: In a cluster: where the other servers' queues for a model stand, and what to call
        #: when the queues here change (the cluster sets them).
        self.elsewhere: Callable[[str], Collection[Turn]] = lambda model: ()
        self.on_queue: Callable[[], None] = lambda: None
        self._recheck: asyncio.TimerHandle | None = None
        #: Models whose freed slot is left to another server, until when (monotonic).
        self._held: dict[str, float] = {}

    def __len__(self) -> int:
        return self._length

    def queued_for(self, worker: WorkerHandle) -> int:
        """Queued requests this worker could take (per-worker ``queue_len`` in the state API)."""
        return sum(
            queue.length
            for model, queue in self._queues.items()
            if any(name in worker.models for name in fallback_names(model))
        )

    def lanes(self) -> dict[str, dict[str, int]]:
        """Requests waiting per model and key name (what a cluster tells the others)."""
        return {
            model: {name: lane.live for name, lane in queue.lanes.items() if lane.live}
            for model, queue in self._queues.items()
        }

    def queued_by_key(self) -> dict[str, int]:
        """Queued requests per key name, over every model."""
        return dict(self._by_key)

    async def acquire(
        self,
        model: str,
        path: str,
        *,
        exclude: Collection[WorkerHandle] = (),
        key: Caller | None = None,
        on_wait: Callable[[Callable[[], int]], None] | None = None,
    ) -> WorkerHandle:
        """A slot on the least-busy eligible worker, waiting in line if all are busy.

        ``key`` is who asks: a model its key may not use is answered as one no worker serves,
        and while the request waits it takes turns with other keys' requests. ``on_wait`` is
        called if the request has to wait, with a function that tells its place in line.
        """
        if key is not None and not key.key.allows(model):
            raise NoWorkerError(f"no worker serves model {model!r} at {path}")
        try:
            return self.pool.acquire(model, path, exclude=exclude)
        except WorkersBusyError:
            if self.queue_size <= 0:
                raise
        name, weight = (key.name, key.weight) if key is not None else (ANONYMOUS, 1.0)
        queue = self._queues.get(model)
        lane = queue.lanes.get(name) if queue is not None else None
        waiting = lane.live if lane is not None else 0
        if waiting + self.queued_elsewhere(model, name) >= self.queue_size:
            raise QueueFullError(f"every worker serving {model!r} is busy and the queue is full")
        if self.max_queued and self._length + self.queued_elsewhere_total() >= self.max_queued:
            raise QueueFullError("every worker is busy and the queue is full")
        future = asyncio.get_running_loop().create_future()
        priority = key.priority if key is not None else 0
        waiter = self._join(model, path, exclude, future, name, weight, priority)
        if on_wait is not None:
            on_wait(lambda: self.position(waiter))
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

    def position(self, waiter: _Waiter) -> int:
        """Where ``waiter`` stands in line: 1 when it is served next, if no more come.

        The fair queue's own order: the waiters ahead in its lane, plus, of every other lane,
        the turns whose start tags come before its own. O(lanes + its lane's length); asked
        about once a second per waiting stream that wants to show it.
        """
        queue = self._queues.get(waiter.model)
        if queue is None or not waiter.queued:
            return 0
        starts = {id(lane): start for start, _, lane in queue.turns}
        lane = waiter.lane
        mine = next((p, o) for p, o, w in lane.waiting if w is waiter)
        ahead = sum(1 for p, o, w in lane.waiting if w.queued and (p, o) < mine)
        own_start = starts.get(id(lane), queue.vtime) + ahead / lane.weight
        before = 0
        for other in queue.lanes.values():
            if other is lane or not other.live:
                continue
            start = starts.get(id(other), queue.vtime)
            if start < own_start:
                turns = math.ceil(round((own_start - start) * other.weight, 6))
                before += min(other.live, turns)
        return 1 + ahead + before

    def turns(self) -> dict[str, Turn]:
        """Where the queue of each model with waiters stands (what a cluster tells the others)."""
        turns = {}
        for model, queue in self._queues.items():
            if queue.length:
                start, waiter = self._next(model, queue)
                finish = {name: lane.finish for name, lane in queue.lanes.items() if lane.finish}
                turns[model] = Turn(start, waiter.arrived, queue.vtime, finish)
        return turns

    def release(self, worker: WorkerHandle) -> None:
        """Give a slot back and offer it to the queue."""
        self.pool.release(worker)
        self.dispatch()

    def dispatch(self) -> None:
        """Offer free capacity to the waiters whose turn it is (after a release, a join or a
        leave).

        Waiters whose model no worker serves any more fail at once instead of timing out.
        In a cluster, a server whose next turn for a model comes after another server's (by
        start tag, then arrival) leaves the free slots to that one, for at most
        :data:`DEFER_GRACE` seconds (in case the other cannot use them), so the fair queue
        spans the cluster and the worker's own server does not serve its own clients first.
        """
        if not self._length:
            return
        for model, queue in list(self._queues.items()):
            while queue.length:
                turn, waiter = self._next(model, queue)
                if self._defer(model, turn, waiter):
                    break
                try:
                    worker = self.pool.acquire(model, waiter.path, exclude=waiter.exclude)
                except WorkersBusyError:
                    break
                except RoutingError as exc:  # the last worker for the model left
                    self._leave(waiter, waited=None)
                    waiter.future.set_exception(exc)
                    continue
                self._served(queue, turn, waiter.lane)
                self._leave(waiter, waited=time.monotonic() - waiter.since)
                waiter.future.set_result(worker)

    def taken_elsewhere(self, model: str) -> None:
        """A request from another server is about to take a slot for ``model``: the slot left
        to it is used (the next one freed is not held any more unless that server still has
        a turn that comes first)."""
        self._held.pop(model, None)

    def _defer(self, model: str, start: float, waiter: _Waiter) -> bool:
        """Whether to leave a freed slot to the server whose turn comes first. The slot is
        held until that server's request arrives (its queue may say it has none waiting the
        moment it sent it), at most :data:`DEFER_GRACE` seconds per waiter here."""
        now = time.monotonic()
        held = self._held.get(model, 0.0) > now
        mine = (start, waiter.arrived)
        if not held and not any((t.start, t.arrived) < mine for t in self.elsewhere(model)):
            return False
        if waiter.deferred is None:
            waiter.deferred = now
        elif now - waiter.deferred >= DEFER_GRACE:
            self._held.pop(model, None)
            return False
        if not held:
            self._held[model] = now + DEFER_GRACE
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(DEFER_GRACE, self._rechecked)
        return True

    def _rechecked(self) -> None:
        self._recheck = None
        self.dispatch()

    # The queues change only in _join and _leave, which report every new length.

    def _join(
        self,
        model: str,
        path: str,
        exclude: Collection[WorkerHandle],
        future: asyncio.Future[WorkerHandle],
        name: str,
        weight: float,
        priority: int,
    ) -> _Waiter:
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = _ModelQueue()
        lane = queue.lanes.get(name)
        if lane is None:
            lane = queue.lanes[name] = _Lane(name, weight)
        lane.weight = weight  # the key file may have been reloaded
        waiter = _Waiter(model, path, exclude, future, time.monotonic(), lane)
        heapq.heappush(lane.waiting, (-priority, next(self._order), waiter))
        lane.live += 1
        if not lane.scheduled:
            lane.scheduled = True
            start = max(queue.vtime, lane.finish)
            for turn in self.elsewhere(model):  # a newcomer here starts where the others are
                start = max(start, turn.vtime, turn.finish.get(name, 0.0))
            heapq.heappush(queue.turns, (start, next(self._order), lane))
        queue.length += 1
        self._by_key[name] += 1
        self._length += 1
        self._on_change(self._length, None)
        self.on_queue()
        return waiter

    def _next(self, model: str, queue: _ModelQueue) -> tuple[float, _Waiter]:
        """The waiter whose turn it is, and the turn's start tag (the queue is not empty)."""
        while True:
            start, _, lane = queue.turns[0]
            waiter = lane.head()
            if waiter is None:
                heapq.heappop(queue.turns)  # every waiter of the lane left
                lane.scheduled = False
                continue
            later = max((t.finish.get(lane.name, 0.0) for t in self.elsewhere(model)), default=0)
            if later > start:  # the key was served on another server meanwhile
                lane.finish = later
                heapq.heapreplace(queue.turns, (later, next(self._order), lane))
                continue
            return start, waiter

    def _served(self, queue: _ModelQueue, start: float, lane: _Lane) -> None:
        """The lane at the top of the turns was served: its next turn comes later."""
        heapq.heappop(queue.turns)
        queue.vtime = start
        # Rounded so that float drift never breaks a tie the exact arithmetic would make.
        lane.finish = round(start + 1 / lane.weight, 9)
        if lane.live > 1:
            heapq.heappush(queue.turns, (lane.finish, next(self._order), lane))
        else:
            lane.scheduled = False

    def _leave(self, waiter: _Waiter, *, waited: float | None) -> None:
        """Take a waiter out of its queue; ``waited`` is set when it leaves with a slot."""
        waiter.queued = False
        lane = waiter.lane
        lane.live -= 1
        lane.compact()
        queue = self._queues[waiter.model]
        queue.length -= 1
        if not queue.length:
            del self._queues[waiter.model]  # an idle queue starts its virtual time afresh
        self._by_key[lane.name] -= 1
        if not self._by_key[lane.name]:
            del self._by_key[lane.name]
        self._length -= 1
        self._on_change(self._length, waited)
        self.on_queue()

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter stopped waiting (timeout, client gone): leave the queue, return any slot."""
        if waiter.queued:
            self._leave(waiter, waited=None)
        future = waiter.future
        if not future.done():
            future.cancel()
        elif not future.cancelled() and future.exception() is None:
            self.release(future.result())  # granted a slot it can no longer use
