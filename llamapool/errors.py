"""The exception tree.

Inside a process errors are exceptions; at the boundaries they become data: an HTTP error body,
an ``http_proxy_response_end`` error on the wire, or one line from the CLI.
"""

from __future__ import annotations


class LlamapoolError(Exception):
    """Root of every error llamapool raises on purpose."""


class ConfigError(LlamapoolError):
    """A setting is missing or has a value we cannot use."""


class PluginError(LlamapoolError):
    """A backend plugin is missing, fails to import, or is not a backend."""


class ProtocolError(LlamapoolError):
    """A peer sent a message that does not follow the wire protocol."""


class RoutingError(LlamapoolError):
    """No worker can take a request right now; ``status`` is the HTTP status to answer with."""

    status = 503
    code = "routing_error"
    #: Label value of ``llamapool_rejections_total``.
    reason = "unavailable"


class NoWorkerError(RoutingError):
    """No connected worker serves the model (or the API path) that was asked for."""

    status = 404
    code = "model_not_found"
    reason = "no_worker"


class WorkersBusyError(RoutingError):
    """Workers serve the model, but every one of them is at its max concurrency."""

    status = 503
    code = "workers_busy"
    reason = "busy"


class QueueFullError(RoutingError):
    """Every worker for the model is busy and its wait queue is full: try again later."""

    status = 429
    code = "queue_full"
    reason = "queue_full"


class QueueTimeoutError(RoutingError):
    """The request waited in the queue for longer than the queue timeout."""

    status = 503
    code = "queue_timeout"
    reason = "queue_timeout"


class WorkerIdInUseError(LlamapoolError):
    """A worker registered with the id of a connected worker but could not prove it is that
    worker (its per-process instance secret differs): someone else holding the worker key, or
    two workers configured with the same ``WORKER_ID``."""


class BackendError(LlamapoolError):
    """The worker could not reach its backend or the backend failed mid-answer."""


class McpUpstreamError(LlamapoolError):
    """An MCP relay could not open a session with its MCP server (the command does not start,
    the URL does not answer)."""
