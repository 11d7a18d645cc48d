"""What the pool has done, for ``/api/v1/state``, its SSE stream, the dashboard and /metrics.

The relay and the worker endpoint report events here; this module keeps the running totals
(per worker and per model), mirrors them into the Prometheus collectors, and renders the Go
version's state schema. A worker that leaves stays listed as ``gone`` for a while, so an operator
sees it went away rather than it silently vanishing.

Nothing here grows without bound. A departed worker's record, and a model no connected worker
advertises any more, are kept for the gone retention and then forgotten with every metric
series they have; at most ``max_gone_workers`` departed workers and ``max_gone_models``
departed models are kept at once (the oldest go first), so a worker cycling through model lists
or ids faster than the retention cannot pile them up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from llamapool.build import BuildInfo
from llamapool.server.metrics import OUTCOMES, ServerMetrics
from llamapool.server.pool import Pool, WorkerHandle
from llamapool.server.usage import Usage

#: Outcomes of a request that reached a worker (label values of llamapool_model_requests_total).
SUCCESS, ERROR, CANCELLED = OUTCOMES


@attrs.define
class ModelTally:
    success_total: int = 0
    error_total: int = 0
    tokens_in_total: int = 0
    tokens_out_total: int = 0


@attrs.define
class WorkerRecord:
    """The lifetime totals of one worker id, across reconnects."""

    handle: WorkerHandle
    gone_at: float | None = None
    processed_total: int = 0
    processing_ms_total: float = 0.0
    failures_total: int = 0
    last_error: str = ""
    tokens_in_total: int = 0
    tokens_out_total: int = 0
    per_model: dict[str, ModelTally] = attrs.Factory(dict)
    #: The status this record is counted under in the workers gauge.
    counted_as: str = ""

    @property
    def status(self) -> str:
        if self.gone_at is not None:
            return "gone"
        if self.handle.draining:
            return "draining"
        if not self.handle.ready:
            return "not_ready"
        return "working" if self.handle.inflight else "idle"


class PoolState:
    """Running totals of the pool and a monotonically increasing change counter."""

    def __init__(
        self,
        pool: Pool,
        metrics: ServerMetrics,
        build: BuildInfo,
        *,
        gone_retention: float = 300,
        max_gone_workers: int = 1024,
        max_gone_models: int = 1000,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.build = build
        self.gone_retention = gone_retention
        self.max_gone_workers = max_gone_workers
        self.max_gone_models = max_gone_models
        self.started = time.time()
        self.version = 0
        self.records: dict[str, WorkerRecord] = {}
        self.jobs_inflight_total = 0
        self.jobs_completed_total = 0
        self.jobs_failed_total = 0
        self.queue_len = 0
        #: Models some connected worker advertises (whether or not it takes requests now).
        self._models: set[str] = set()
        #: Models with series but no connected worker advertising them: when each went,
        #: oldest first.
        self._gone_models: dict[str, float] = {}
        #: Ids of the departed workers in ``records``, oldest departure first.
        self._gone_workers: dict[str, None] = {}
        #: For each model, the workers with a tally (and a duration series) for it.
        self._served_by: dict[str, set[str]] = {}
        self._status_counts: dict[str, int] = {}
        #: Queued requests a worker could take (the scheduler sets it: its ``queued_for``).
        self.queued_for: Callable[[WorkerHandle], int] = lambda worker: 0
        #: Per client key name: usage, requests in flight and queued (the app sets it).
        self.keys_view: Callable[[], list[dict[str, Any]]] = lambda: []
        #: MCP endpoints, their relays and sessions (the app sets it: McpEndpoints.snapshot).
        self.mcp_view: Callable[[], list[dict[str, Any]]] = lambda: []
        #: In a cluster: this server's id, the cluster's servers, and the entries of the
        #: workers connected to other servers (the cluster sets them).
        self.server_id = ""
        self.cluster_view: Callable[[], dict[str, Any] | None] = lambda: None
        self.remote_workers: Callable[[], list[dict[str, Any]]] = lambda: []
        #: Set while no request is in flight or queued (what a draining server waits for).
        self.idle = asyncio.Event()
        self.idle.set()
        self._count_workers()  # every status series exists from the start, at 0

    def changed(self) -> None:
        self.version += 1
        if self.jobs_inflight_total or self.queue_len:
            self.idle.clear()
        else:
            self.idle.set()

    # --- events ------------------------------------------------------------------------------

    def models_changed(self) -> None:
        """Workers joined, left, or changed models or readiness: recount workers per model.

        A model that loses its last worker stays at 0 for the gone retention (so "no worker
        for a model" can be alerted on by name), then it is forgotten with all its series.
        """
        counts = {info.id: len(info.workers) for info in self.pool.models()}
        advertised = self.pool.advertised()
        now = time.time()
        for model in self._models - advertised:
            self._gone_models[model] = now
            self.metrics.of(self.metrics.model_workers, model).set(0)
        for model in advertised:
            self._gone_models.pop(model, None)
            self.metrics.of(self.metrics.model_workers, model).set(counts.get(model, 0))
        self._models = advertised
        self._evict_models()
        self._count_workers()

    def worker_joined(self, worker: WorkerHandle) -> None:
        record = self.records.get(worker.id)
        if record is None:
            self.records[worker.id] = WorkerRecord(worker)
        else:  # a reconnect keeps its totals
            record.handle, record.gone_at = worker, None
            self._gone_workers.pop(worker.id, None)
        self._count_workers()

    def worker_left(self, worker: WorkerHandle) -> None:
        record = self.records.get(worker.id)
        if record is not None and record.handle is worker:
            record.gone_at = time.time()
            self._gone_workers[worker.id] = None
            while len(self._gone_workers) > self.max_gone_workers:
                self._forget_worker(next(iter(self._gone_workers)))
        self._count_workers()

    def request_started(self, worker: WorkerHandle) -> None:
        self.jobs_inflight_total += 1
        self.metrics.requests_in_flight.inc()
        self._recount(worker)

    def request_finished(
        self,
        worker: WorkerHandle,
        model: str,
        *,
        outcome: str,
        duration: float,
        ttfb: float | None,
        usage: Usage | None,
        error: str = "",
        forwarded: bool = False,
    ) -> None:
        """One request a worker took has ended. ``model`` is the name the worker serves.

        ``forwarded``: another server of the cluster holds the client; it counts the request
        in the pool's totals and model series, so the cluster's sums count it once, and this
        server counts it for its worker only.
        """
        self.jobs_inflight_total -= 1
        m = self.metrics
        m.requests_in_flight.dec()
        if not forwarded:
            m.of(m.model_requests, model, outcome).inc()
            if ttfb is not None:
                m.of(m.time_to_first_byte, model).observe(ttfb)
            if outcome == SUCCESS:
                self.jobs_completed_total += 1
            elif outcome == ERROR:
                self.jobs_failed_total += 1
            if usage is not None:
                m.of(m.model_tokens, model, "in").inc(usage.tokens_in)
                m.of(m.model_tokens, model, "out").inc(usage.tokens_out)
        record = self.records.get(worker.id)
        if record is not None:  # a worker forgotten already gets no new per-worker series
            self._tally(record, model, outcome, duration, usage, error)
        if model not in self._models and model not in self._gone_models:
            self._gone_models[model] = time.time()  # its worker dropped it meanwhile
            self._evict_models()
        self._recount(worker)

    def _tally(
        self,
        record: WorkerRecord,
        model: str,
        outcome: str,
        duration: float,
        usage: Usage | None,
        error: str,
    ) -> None:
        """Add one request to a worker's totals and its duration series."""
        worker_id = record.handle.id
        self.metrics.of(self.metrics.request_duration, worker_id, model).observe(duration)
        tally = record.per_model.get(model)
        if tally is None:
            tally = record.per_model[model] = ModelTally()
            self._served_by.setdefault(model, set()).add(worker_id)
        record.processed_total += 1
        record.processing_ms_total += duration * 1000
        if outcome == SUCCESS:
            tally.success_total += 1
        elif outcome == ERROR:
            record.failures_total += 1
            record.last_error = error[:200]
            tally.error_total += 1
        if usage is not None:
            record.tokens_in_total += usage.tokens_in
            record.tokens_out_total += usage.tokens_out
            tally.tokens_in_total += usage.tokens_in
            tally.tokens_out_total += usage.tokens_out

    def rejected(self, reason: str) -> None:
        """A request refused before any worker saw it (no_worker, busy, unauthorized, ...)."""
        self.metrics.of(self.metrics.rejections, reason).inc()

    def queue_changed(self, length: int, waited: float | None) -> None:
        """The queue grew or shrank; ``waited`` is set when a request left it for a worker."""
        self.queue_len = length
        self.metrics.queue_length.set(length)
        if waited is not None:
            self.metrics.queue_wait.observe(waited)
        self.changed()

    # --- views -------------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> None:
        """Forget workers and models gone for longer than the retention period, with their
        series. Cheap when nothing expired: the server calls it every fraction of a second."""
        cutoff = (time.time() if now is None else now) - self.gone_retention
        workers = _until(self._gone_workers, lambda wid: self.records[wid].gone_at or 0, cutoff)
        models = _until(self._gone_models, self._gone_models.__getitem__, cutoff)
        for wid in workers:
            self._forget_worker(wid)
        for model in models:
            self._forget_model(model)
        if workers or models:
            self._count_workers()

    def _evict_models(self) -> None:
        while len(self._gone_models) > self.max_gone_models:
            self._forget_model(next(iter(self._gone_models)))

    def _forget_worker(self, worker_id: str) -> None:
        """Drop a departed worker's record and its per-worker series."""
        del self._gone_workers[worker_id]
        record = self.records.pop(worker_id)
        for model in record.per_model:
            self.metrics.forget_worker_model(worker_id, model)
            served = self._served_by[model]
            served.discard(worker_id)
            if not served:
                del self._served_by[model]

    def _forget_model(self, model: str) -> None:
        """Drop a departed model's series, its tallies in worker records and its pool entry."""
        del self._gone_models[model]
        self.metrics.forget_model(model)
        for worker_id in self._served_by.pop(model, ()):
            del self.records[worker_id].per_model[model]
            self.metrics.forget_worker_model(worker_id, model)
        self.pool.forget_model(model)

    def _count_workers(self) -> None:
        """Recount every worker by status (joins, leaves, status changes: rare events)."""
        counts = dict.fromkeys(("working", "idle", "draining", "not_ready", "gone"), 0)
        for record in self.records.values():
            record.counted_as = record.status
            counts[record.counted_as] += 1
        for status, n in counts.items():
            self.metrics.of(self.metrics.workers, status).set(n)
        self._status_counts = counts
        self.changed()

    def _recount(self, worker: WorkerHandle) -> None:
        """Move one worker between status counts (every request: O(1), not O(workers))."""
        record = self.records.get(worker.id)
        if record is not None and record.handle is worker and record.status != record.counted_as:
            counts = self._status_counts
            counts[record.counted_as] -= 1
            self.metrics.of(self.metrics.workers, record.counted_as).set(counts[record.counted_as])
            record.counted_as = record.status
            counts[record.counted_as] += 1
            self.metrics.of(self.metrics.workers, record.counted_as).set(counts[record.counted_as])
        self.changed()

    def snapshot(self) -> dict[str, Any]:
        """The Go version's ``/api/v1/state`` document."""
        now = time.time()
        mono = time.monotonic()
        workers = [_worker(r, now, mono, self.queued_for) for r in self.records.values()]
        if self.server_id:
            for entry in workers:
                entry["server"] = self.server_id
            workers += self.remote_workers()
        workers.sort(key=lambda w: (w["status"] == "gone", w["name"], w["id"]))
        summary = dict.fromkeys(("connected", "working", "idle", "gone"), 0)
        for w in workers:
            if w["status"] == "gone":
                summary["gone"] += 1
            else:
                summary["connected"] += 1
                summary["working" if w["inflight"] else "idle"] += 1
        return {
            "server": {
                "now": _iso(now),
                "version": self.build.version,
                "build_sha": self.build.sha,
                "build_date": self.build.date,
                "uptime_s": int(now - self.started),
                "jobs_inflight_total": self.jobs_inflight_total,
                "jobs_completed_total": self.jobs_completed_total,
                "jobs_failed_total": self.jobs_failed_total,
                "scheduler_queue_len": self.queue_len,
            },
            "workers_summary": summary,
            "models": [{"name": m.id, "workers": len(m.workers)} for m in self.pool.models()],
            "workers": workers,
            "keys": self.keys_view(),
            "mcp_endpoints": self.mcp_view(),
            **({"cluster": cluster} if (cluster := self.cluster_view()) is not None else {}),
        }

    def worker_entry(self, worker: WorkerHandle) -> dict[str, Any] | None:
        """One connected worker's entry of the state document (what a cluster publishes)."""
        record = self.records.get(worker.id)
        if record is None or record.handle is not worker:
            return None
        return _worker(record, time.time(), time.monotonic(), self.queued_for)


def _until(departed: Iterable[str], gone_at: Callable[[str], float], cutoff: float) -> list[str]:
    """The keys of ``departed`` (oldest first) that went before ``cutoff``."""
    stale = []
    for key in departed:
        if gone_at(key) >= cutoff:
            break
        stale.append(key)
    return stale


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _worker(
    record: WorkerRecord, now: float, mono: float, queued_for: Callable[[WorkerHandle], int]
) -> dict[str, Any]:
    h = record.handle
    processed = record.processed_total
    return {
        "id": h.id,
        "name": h.name,
        "status": record.status,
        "connected_at": _iso(h.connected_at),
        "last_heartbeat": _iso(now - (mono - h.last_heartbeat)),
        "version": h.version,
        "build_sha": h.build_sha,
        "build_date": h.build_date,
        "backend": h.backend,
        "key": h.credential,
        "models_supported": sorted(h.models),
        "max_concurrency": h.max_concurrency,
        "processed_total": processed,
        "processing_ms_total": round(record.processing_ms_total),
        "avg_processing_ms": round(record.processing_ms_total / processed) if processed else 0,
        "inflight": 0 if record.gone_at is not None else h.inflight,
        "failures_total": record.failures_total,
        "queue_len": 0 if record.gone_at is not None else queued_for(h),
        "last_error": record.last_error,
        "tokens_in_total": record.tokens_in_total,
        "tokens_out_total": record.tokens_out_total,
        "per_model": {name: attrs.asdict(t) for name, t in sorted(record.per_model.items())},
    }
