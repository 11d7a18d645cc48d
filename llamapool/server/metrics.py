"""Every Prometheus series the server exports, declared once.

The first four keep the Go version's exact names and labels so existing dashboards and alerts
work unchanged. Labels stay bounded: models and worker ids come from registered workers (never
from what a client asks for), client key names from ``KEYS_FILE`` (plus ``anonymous``; see
:meth:`ServerMetrics.forget_key`), and there are no request ids or free text. The series of a model
or worker that is gone are removed (:meth:`ServerMetrics.forget_model`,
:meth:`ServerMetrics.forget_worker_model`), when :class:`~llamapool.server.state.PoolState`
forgets it.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from llamapool.build import BuildInfo

__all__ = [
    "CONTENT_TYPE_LATEST",
    "KEY_LIMITS",
    "OUTCOMES",
    "TOKEN_KINDS",
    "ServerMetrics",
    "generate_latest",
]

#: Label values of ``outcome`` in llamapool_model_requests_total: success, error, cancelled.
OUTCOMES = ("success", "error", "cancelled")
#: Label values of ``kind`` in llamapool_model_tokens_total.
TOKEN_KINDS = ("in", "out")

#: Label values of ``limit`` in llamapool_key_limited_total.
KEY_LIMITS = ("rpm", "tpm", "concurrency", "daily_tokens")

#: Latency buckets from 5 ms to 10 min: LLM requests range from embeddings to long generations.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

#: Pause buckets from 1 ms to 1 s: what a streaming user notices starts at a few tens of ms.
_PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class ServerMetrics:
    """The server's collectors, in a registry of their own (one per application)."""

    def __init__(self, build: BuildInfo, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # Go exports no *_created
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        #: Series handed out by :meth:`of`, by (collector, label values).
        self._series: dict[tuple[Any, ...], Any] = {}
        # --- the Go version's series -----------------------------------------------------
        self.build_info = Gauge(
            "llamapool_build_info",
            "Build information of this llamapool component.",
            ["component", "version", "sha", "date"],
            registry=r,
        )
        self.build_info.labels("server", build.version, build.sha, build.date).set(1)
        self.model_requests = Counter(
            "llamapool_model_requests",
            "Requests per model by outcome (success, error, cancelled).",
            ["model", "outcome"],
            registry=r,
        )
        self.model_tokens = Counter(
            "llamapool_model_tokens",
            "Tokens per model as reported by the backends; kind is in or out.",
            ["model", "kind"],
            registry=r,
        )
        self.request_duration = Histogram(
            "llamapool_request_duration_seconds",
            "Time from dispatch to the end of the response, per worker and model.",
            ["worker_id", "model"],
            buckets=_BUCKETS,
            registry=r,
        )
        # --- what an operator needs beyond them ------------------------------------------
        self.time_to_first_byte = Histogram(
            "llamapool_time_to_first_byte_seconds",
            "Time from dispatch until the worker's response headers arrived, per model.",
            ["model"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "llamapool_requests_in_flight",
            "Requests currently being served by a worker.",
            registry=r,
        )
        self.workers = Gauge(
            "llamapool_workers",
            "Workers known to the server, by status (working, idle, draining, not_ready, gone).",
            ["status"],
            registry=r,
        )
        self.model_workers = Gauge(
            "llamapool_model_workers",
            "Workers that can take requests for each model now (0 while none can).",
            ["model"],
            registry=r,
        )
        self.rejections = Counter(
            "llamapool_rejections",
            "Requests refused before reaching a worker, by reason.",
            ["reason"],
            registry=r,
        )
        self.queue_length = Gauge(
            "llamapool_queue_length",
            "Requests waiting for a free worker.",
            registry=r,
        )
        self.queue_wait = Histogram(
            "llamapool_queue_wait_seconds",
            "Time requests spent waiting for a free worker.",
            buckets=_BUCKETS,
            registry=r,
        )
        # --- per client key (names from KEYS_FILE, and "anonymous": a bounded set) ---------
        self.key_requests = Counter(
            "llamapool_key_requests",
            "Model requests admitted, per client key name.",
            ["key"],
            registry=r,
        )
        self.key_tokens = Counter(
            "llamapool_key_tokens",
            "Tokens charged per client key name (reported usage, or estimated); kind is in or out.",
            ["key", "kind"],
            registry=r,
        )
        self.key_active = Gauge(
            "llamapool_key_requests_active",
            "Model requests of each client key waiting in a queue or on a worker.",
            ["key"],
            registry=r,
        )
        self.key_limited = Counter(
            "llamapool_key_limited",
            "Model requests refused by a key's limits (rpm, tpm, concurrency, daily_tokens).",
            ["key", "limit"],
            registry=r,
        )
        self.worker_messages_ignored = Counter(
            "llamapool_worker_messages_ignored",
            "Worker messages that were malformed or named an unknown request.",
            registry=r,
        )

        # --- a cluster of servers (CLUSTER_URL) -------------------------------------------
        self.cluster_connected = Gauge(
            "llamapool_cluster_connected",
            "1 while this server reaches the cluster's Redis (0: serving its own workers only).",
            registry=r,
        )
        self.cluster_servers = Gauge(
            "llamapool_cluster_servers",
            "Servers of the cluster this server knows, itself included.",
            registry=r,
        )
        self.cluster_workers = Gauge(
            "llamapool_cluster_workers",
            "Workers connected to any server of the cluster (the cluster's total).",
            registry=r,
        )
        self.cluster_requests = Counter(
            "llamapool_cluster_requests",
            "Requests that crossed between servers: out (to a worker of another server) or "
            "in (from another server, for a worker here).",
            ["direction"],
            registry=r,
        )

        # --- pauses of the whole server (see server/pauses.py) ------------------------------
        self.event_loop_lag = Histogram(
            "llamapool_event_loop_lag_seconds",
            "How late a timer asked for every 10 ms runs: the event loop's stalls, during "
            "which no request of this server moves.",
            buckets=_PAUSE_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "llamapool_gc_pause_seconds",
            "Garbage collections of this server's process, per generation, start to end.",
            ["generation"],
            buckets=_PAUSE_BUCKETS,
            registry=r,
        )

        # --- MCP endpoints (labels: endpoint ids of connected relays, known methods) -------
        self.mcp_calls = Counter(
            "llamapool_mcp_calls",
            "MCP calls per endpoint, method and outcome (ok, error, timeout, cancelled, "
            "relay_gone).",
            ["endpoint", "method", "outcome"],
            registry=r,
        )
        self.mcp_call_duration = Histogram(
            "llamapool_mcp_call_duration_seconds",
            "Time from a client's MCP request to its response, per endpoint and method.",
            ["endpoint", "method"],
            buckets=_BUCKETS,
            registry=r,
        )

    def of(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(*labels)``, remembered: a request touches about ten series, and
        prometheus-client checks, converts and locks on every lookup (3 µs each); a series
        is forgotten here when it is removed (see :meth:`_remove`)."""
        key = (metric, *labels)
        series: _Metric | None = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*labels)
        return series

    def mcp_call(self, endpoint: str, method: str, outcome: str, seconds: float) -> None:
        """One MCP call ended."""
        self.of(self.mcp_calls, endpoint, method, outcome).inc()
        self.of(self.mcp_call_duration, endpoint, method).observe(seconds)

    def forget_model(self, model: str) -> None:
        """Remove every per-model series of a model that is gone."""
        self._remove(self.model_workers, model)
        self._remove(self.time_to_first_byte, model)
        for outcome in OUTCOMES:
            self._remove(self.model_requests, model, outcome)
        for kind in TOKEN_KINDS:
            self._remove(self.model_tokens, model, kind)

    def forget_worker_model(self, worker_id: str, model: str) -> None:
        """Remove the series of one worker for one model (the worker or the model is gone)."""
        self._remove(self.request_duration, worker_id, model)

    def forget_key(self, name: str) -> None:
        """Remove every series of a client key name no longer configured."""
        self._remove(self.key_requests, name)
        self._remove(self.key_active, name)
        for kind in TOKEN_KINDS:
            self._remove(self.key_tokens, name, kind)
        for limit in KEY_LIMITS:
            self._remove(self.key_limited, name, limit)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _remove(self, metric: Counter | Gauge | Histogram, *labels: str) -> None:
        self._series.pop((metric, *labels), None)
        # prometheus-client before 0.20 raises KeyError for a series that was never created.
        with contextlib.suppress(KeyError):
            metric.remove(*labels)
