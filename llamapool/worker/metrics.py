"""The worker's Prometheus series, with the Go worker's names (``--metrics-addr``)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest

from llamapool.build import BuildInfo

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    """One worker's collectors, in a registry of their own."""

    def __init__(self, build: BuildInfo, *, max_concurrency: int) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # Go exports no *_created
        self.registry = r = CollectorRegistry(auto_describe=True)
        Gauge(
            "llamapool_build_info",
            "Build information of this llamapool component.",
            ["component", "version", "sha", "date"],
            registry=r,
        ).labels("worker", build.version, build.sha, build.date).set(1)
        self.connected_to_server = Gauge(
            "llamapool_worker_connected_to_server",
            "1 while the worker is registered with the server.",
            registry=r,
        )
        self.connected_to_backend = Gauge(
            "llamapool_worker_connected_to_backend",
            "1 while the worker's backend answers its health probe.",
            registry=r,
        )
        # The Go worker only knew Ollama; its series name stays for existing dashboards.
        self.connected_to_ollama = Gauge(
            "llamapool_worker_connected_to_ollama",
            "1 while the worker's backend answers its health probe (Go name).",
            registry=r,
        )
        self.current_jobs = Gauge(
            "llamapool_worker_current_jobs", "Requests being served now.", registry=r
        )
        self.max_concurrency = Gauge(
            "llamapool_worker_max_concurrency", "Requests served at once at most.", registry=r
        )
        self.max_concurrency.set(max_concurrency)
        self.jobs_started = Counter(
            "llamapool_worker_jobs_started", "Requests the worker started.", registry=r
        )
        self.jobs_succeeded = Counter(
            "llamapool_worker_jobs_succeeded",
            "Requests relayed to the end with a non-5xx status from the backend.",
            registry=r,
        )
        self.jobs_failed = Counter(
            "llamapool_worker_jobs_failed",
            "Requests that failed: backend unreachable, 5xx, or broken mid-answer.",
            registry=r,
        )
        self.jobs_cancelled = Counter(
            "llamapool_worker_jobs_cancelled",
            "Requests the server cancelled (the client went away).",
            registry=r,
        )
        self.job_duration = Histogram(
            "llamapool_worker_job_duration_seconds",
            "Time from receiving a request to sending its end.",
            buckets=_BUCKETS,
            registry=r,
        )

    def set_backend_up(self, up: bool) -> None:
        self.connected_to_backend.set(int(up))
        self.connected_to_ollama.set(int(up))

    def render(self) -> bytes:
        return generate_latest(self.registry)
