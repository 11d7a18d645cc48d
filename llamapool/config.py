"""Settings of the two processes, as attrs classes.

Every setting has the Go version's environment variable name, so existing env files keep
working; the CLI (:mod:`llamapool.cli`) maps flags and variables onto these classes.
"""

from __future__ import annotations

import re
import socket
import urllib.parse
import uuid
from collections.abc import Callable

import attrs

from llamapool.errors import ConfigError
from llamapool.server import validate
from llamapool.urls import without_credentials

DEFAULT_WS_PATH = "/workers/connect"
MIB = 1024 * 1024
_SERVER_URL = re.compile(r"^(ws|wss|http|https)://[^/]+")
_BACKEND_URL = re.compile(r"^https?://[^/]+")


def comma_separated(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """Comma-separated values: several keys let an operator rotate them without downtime,
    several server URLs let a worker or relay fail over between the servers of a cluster."""
    if isinstance(value, tuple):
        return value
    return tuple(k.strip() for k in value.split(",") if k.strip())


def check_server_urls(
    _: object, __: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    """Each URL of ``SERVER_URL`` on its own, so the error names the bad one of a list."""
    if not value:
        raise ConfigError("SERVER_URL must name at least one ws:// or wss:// URL")
    for url in value:
        _check_url(url, "SERVER_URL", _SERVER_URL, "a ws:// or wss://")


def _check_url(url: str, setting: str, form: re.Pattern[str], kind: str) -> None:
    """A URL of ``form`` whose host and port parse; the error shows it without credentials."""
    shown = without_credentials(url)
    if not form.match(url):
        raise ConfigError(f"{setting} must be {kind} URL, got {shown!r}")
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 (it parses the host and the port)
    except ValueError:
        raise ConfigError(
            f"{setting} has a host or port that does not parse (a port is 0 to 65535): {shown!r}"
        ) from None


@attrs.frozen(kw_only=True)
class ServeConfig:
    """What ``llamapool serve`` needs."""

    host: str = "0.0.0.0"
    port: int = 8080
    metrics_port: int | None = None
    api_keys: tuple[str, ...] = attrs.field(default=(), converter=comma_separated, repr=False)
    worker_keys: tuple[str, ...] = attrs.field(default=(), converter=comma_separated, repr=False)
    ws_path: str = attrs.field(default=DEFAULT_WS_PATH)
    #: Seconds one request may take from start to end.
    request_timeout: float = 300.0
    #: Largest request body accepted from a client.
    max_body_size: int = 16 * MIB
    #: Seconds of silence after which a worker is evicted (Go: 15 s).
    worker_timeout: float = 15.0
    #: Seconds a new worker connection has to send its register message.
    register_timeout: float = 5.0
    #: Seconds a stream may go without a byte from its worker before it is ended.
    idle_timeout: float = 120.0
    #: Requests that may wait per model when every worker serving it is busy (0: none wait).
    queue_size: int = 100
    #: Seconds a request may wait in the queue before it is answered 503.
    queue_timeout: float = 30.0
    #: Streaming OpenAI and Anthropic requests that wait get their stream at once, with an SSE
    #: comment of their place in line every second (``: queued position=N``).
    queue_position_events: bool = False
    #: Seconds in-flight requests get to finish on SIGTERM before the server stops anyway.
    drain_timeout: float = 30.0
    #: How many workers one request may be tried on when workers vanish before answering.
    max_attempts: int = 3
    #: Seconds a departed worker stays listed as ``gone`` in the state API.
    gone_retention: float = 300.0
    #: PEM certificate chain and private key: serve HTTPS and WSS on the same port.
    tls_cert: str = ""
    tls_key: str = attrs.field(default="")
    #: Whether ``/metrics`` needs the API key too (it is open by default, as in Go).
    metrics_require_key: bool = False
    #: Client connections open at once, counted at accept; when full, the connection waiting
    #: longest for its request headers is closed to make room, or the new one answered 503.
    #: Sized for streaming: each open stream holds one (and a file descriptor, ~20 KiB).
    max_connections: int = 12288
    #: Connections the kernel queues on the listening socket until the server accepts them:
    #: a burst of clients connecting at once past it sees dropped SYNs (a 1 s retry each).
    #: The kernel caps it at ``net.core.somaxconn`` (4096 on Linux since 5.4).
    backlog: int = 1024
    #: Seconds a client has to send a request's headers, from connecting (or, on a kept-alive
    #: connection, from the request's first byte).
    header_timeout: float = 5.0
    #: Seconds an idle keep-alive connection stays open between two requests.
    keepalive_timeout: float = 30.0
    #: Worker connections at once; more are refused.
    max_workers: int = 1024
    #: Models one worker may advertise.
    max_models_per_worker: int = 1000
    #: YAML file of named client keys with limits (reloaded on SIGHUP and when it changes).
    keys_file: str = ""
    #: YAML file of named worker keys, in the layout of ``keys_file`` (reloaded the same way).
    worker_keys_file: str = ""
    #: Seconds between two checks whether ``keys_file`` or ``worker_keys_file`` changed (and
    #: whether a worker key expired).
    keys_poll_interval: float = 2.0
    #: Requests that may wait at once over every model and key (0: only ``queue_size`` per
    #: key and model bounds them).
    max_queued: int = 0
    #: One log line per HTTP request.
    access_log: bool = True
    #: Valkey/Redis URL of a cluster of servers forming one pool (none: a pool of its own).
    cluster_url: str = attrs.field(default="")
    #: Keys the servers of the cluster prove themselves with (the first signs; any verifies).
    cluster_keys: tuple[str, ...] = attrs.field(default=(), converter=comma_separated, repr=False)
    #: The URL the other servers reach this one at (default: the listening address).
    cluster_advertise_url: str = ""
    #: PEM file of the CAs the other servers' TLS certificates are checked against (default:
    #: the system's).
    cluster_ca_file: str = ""
    #: Share the listening port with other processes (SO_REUSEPORT): several processes of one
    #: host, one cluster (each also listens on a port of its own for its peers).
    reuse_port: bool = False
    #: Server processes to run on this host (each one core), sharing the port and the cluster.
    processes: int = attrs.field(default=1)

    @cluster_url.validator
    def _check_cluster(self, _: attrs.Attribute[str], value: str) -> None:
        if not value:
            if self.processes > 1:
                raise ConfigError(
                    "PROCESSES above 1 needs CLUSTER_URL (the processes share a pool)"
                )
            return
        if not value.startswith(("redis://", "rediss://", "valkey://", "valkeys://", "unix://")):
            raise ConfigError(
                "CLUSTER_URL must be a redis://, rediss://, valkey://, valkeys:// or unix:// URL"
            )
        _check_cluster_url(value)
        if not self.cluster_keys:
            raise ConfigError("CLUSTER_URL needs CLUSTER_KEY (the secret the servers share)")
        advertised = self.cluster_advertise_url
        if advertised and not advertised.startswith(("http://", "https://")):
            raise ConfigError("CLUSTER_ADVERTISE_URL must be an http:// or https:// URL")
        alone = self.processes <= 1 and not self.reuse_port  # not one of a host's processes
        if not advertised and self.host in ("0.0.0.0", "::", "") and alone:
            raise ConfigError(
                "CLUSTER_ADVERTISE_URL is needed when HOST is a wildcard address: "
                "the URL the other servers reach this one at"
            )
        if self.processes > 1 and self.port == 0:
            raise ConfigError("PROCESSES above 1 needs a fixed PORT (they share it)")

    @processes.validator
    def _check_metrics_port(self, _: attrs.Attribute[int], value: int) -> None:
        """Process N serves its metrics on ``METRICS_PORT`` + N: each must be a port of its
        own (an operating system would give a random one for 65536)."""
        if not self.metrics_port:
            return
        last = self.metrics_port + value - 1
        if self.port and self.metrics_port <= self.port <= last:
            raise ConfigError(
                "METRICS_PORT must differ from PORT"
                if value == 1
                else f"METRICS_PORT to METRICS_PORT+{value - 1} (one per process) include PORT"
            )
        if last > 65535:
            raise ConfigError(
                f"METRICS_PORT+{value - 1} (one port per process) is past 65535: lower it"
            )

    @tls_key.validator
    def _check_tls(self, _: attrs.Attribute[str], value: str) -> None:
        if bool(value) != bool(self.tls_cert):
            raise ConfigError("TLS needs both TLS_CERT and TLS_KEY")

    @ws_path.validator
    def _check_ws_path(self, _: attrs.Attribute[str], value: str) -> None:
        if not value.startswith("/"):
            raise ConfigError(f"WS_PATH must start with '/', got {value!r}")


def _check_cluster_url(url: str) -> None:
    """Parse ``CLUSTER_URL`` as the cluster will, so a malformed one stops the start instead of
    the cluster never forming. The messages never quote the URL: it may hold a password."""
    from redis.connection import parse_url

    redis_url = re.sub(r"^valkey(s?)://", r"redis\1://", url)
    try:
        parts = urllib.parse.urlsplit(redis_url)
    except ValueError:
        raise ConfigError("CLUSTER_URL is not a valid URL (check its host)") from None
    try:
        parts.port  # noqa: B018 (it parses the port)
    except ValueError:
        raise ConfigError("CLUSTER_URL has a port that is not a number from 0 to 65535") from None
    try:
        parse_url(redis_url)  # type: ignore[no-untyped-call]
    except ValueError as exc:  # names a query option, not its value
        raise ConfigError(f"CLUSTER_URL: {exc}") from None


def _as_setting(check: Callable[[str, str], None], setting: str, value: str) -> None:
    """Run one of the server's checks on a worker's own setting: the server would refuse the
    worker for it at every reconnect; here it is one line at start."""
    try:
        check(setting, value)
    except validate.Invalid as exc:
        raise ConfigError(str(exc)) from None


def _default_worker_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen(kw_only=True)
class WorkConfig:
    """What ``llamapool work`` needs."""

    #: Every URL of ``SERVER_URL`` (comma-separated), tried in turn.
    server_url: tuple[str, ...] = attrs.field(
        default=("ws://127.0.0.1:8080" + DEFAULT_WS_PATH,),
        converter=comma_separated,
        validator=check_server_urls,
    )
    worker_key: str = attrs.field(default="", repr=False)
    backend: str = "ollama"
    #: The backend's base URL (empty: the plugin's default).
    backend_url: str = attrs.field(default="")
    backend_api_key: str = attrs.field(default="", repr=False)
    max_concurrency: int = attrs.field(default=2)
    worker_id: str = attrs.field(factory=_default_worker_id)
    worker_name: str = attrs.field(factory=socket.gethostname)
    #: Seconds between heartbeats (Go: 5 s).
    heartbeat_interval: float = 5.0
    #: Seconds the server may stay silent (no message, no pong to the worker's pings)
    #: before the worker takes the link for dead and reconnects: a black-holed path (a NAT
    #: rebinding, a laptop changing networks) closes no socket by itself.
    server_timeout: float = 15.0
    #: Cap of the exponential reconnect backoff, in seconds.
    reconnect_max: float = 30.0
    #: Seconds between two checks of the backend's health and model list.
    probe_interval: float = 20.0
    #: Seconds to let in-flight requests finish on SIGTERM (0: exit at once; -1: wait forever).
    drain_timeout: float = 60.0
    #: ``host:port`` of the local status endpoint (``/status``, ``/version``); empty: off.
    status_addr: str = ""
    #: ``host:port`` of the worker's Prometheus endpoint; empty: off.
    metrics_addr: str = ""
    #: PEM file of the CA(s) that signed the server's certificate (default: the system store).
    ca_file: str = ""
    #: Skip verifying the server's certificate (wss:// to a self-signed test server only).
    tls_insecure: bool = False

    @max_concurrency.validator
    def _check_concurrency(self, _: attrs.Attribute[int], value: int) -> None:
        if value < 1:
            raise ConfigError(f"MAX_CONCURRENCY must be at least 1, got {value}")

    @worker_id.validator
    def _check_worker_id(self, _: attrs.Attribute[str], value: str) -> None:
        _as_setting(validate.check_id, "WORKER_ID", value)

    @worker_name.validator
    def _check_worker_name(self, _: attrs.Attribute[str], value: str) -> None:
        _as_setting(validate.check_text, "WORKER_NAME", value)

    @backend_url.validator
    def _check_backend_url(self, _: attrs.Attribute[str], value: str) -> None:
        # Without a scheme (localhost:11434) every request would fail, each with an error
        # that does not say why; say it once, at start.
        if value:
            _check_url(value, "BACKEND_URL", _BACKEND_URL, "an http:// or https://")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``1.5``, ``500ms``, ``30s``, ``2m``, ``1h`` or Go's ``1m30s``.

    A bare number is seconds; ``-1`` stays ``-1`` (used for "wait forever").
    """
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if not text or _DURATION.sub("", text) != "":
        raise ConfigError(f"not a duration: {text!r} (try 30s, 2m or 1m30s)")
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))
