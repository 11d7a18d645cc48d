"""``llamapool serve``: its options and the settings they resolve to."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import click

from llamapool import eventloop, tls
from llamapool._cli_options import (
    PORT,
    apply_log_settings,
    config_fields,
    duration,
    env_file_option,
    field_default,
    log_options,
    log_settings,
    option,
    secret,
)
from llamapool._cli_types import MAX_COUNT, MAX_PROCESSES, ByteSize, format_size
from llamapool.config import ServeConfig
from llamapool.errors import ConfigError
from llamapool.log import LogSettings


@attrs.frozen
class ServeSettings:
    """Everything ``llamapool serve`` needs to run."""

    config: ServeConfig
    log: LogSettings
    demo: bool = False


def serve_settings(params: Mapping[str, Any]) -> ServeSettings:
    """Settings from the resolved ``serve`` options (flag, environment, file or default)."""
    demo = bool(params["demo"])
    fields = config_fields(
        ServeConfig,
        params,
        api_key="api_keys",
        worker_key="worker_keys",
        cluster_key="cluster_keys",
    )
    fields["api_keys"] = _keys(params["api_key"], params["api_key_file"], "API_KEY_FILE")
    fields["worker_keys"] = _keys(
        params["worker_key"], params["worker_key_file"], "WORKER_KEY_FILE"
    )
    fields["cluster_keys"] = _keys(
        params["cluster_key"], params["cluster_key_file"], "CLUSTER_KEY_FILE"
    )
    fields["host"] = fields["host"] or ("127.0.0.1" if demo else "0.0.0.0")
    config = ServeConfig(**fields)
    _check_files(config)
    return ServeSettings(config, log_settings(params), demo)


def _check_files(cfg: ServeConfig) -> None:
    """Load the TLS files once before anything starts: a bad one is one line from the command,
    not an error from each of ``--processes`` (and not a cluster that never forms)."""
    if cfg.tls_cert:
        tls.server_context(cfg.tls_cert, cfg.tls_key)
    if cfg.cluster_ca_file:
        tls.client_context(ca_file=cfg.cluster_ca_file, what="CLUSTER_CA_FILE")


def _keys(listed: str, path: str, setting: str) -> tuple[str, ...]:
    """Keys from a comma-separated value plus a file of one key per line (``#`` comments).

    Several keys are accepted at once so an operator can rotate them without downtime.
    A file that holds no key is an error: read as "no keys", it would open the pool to all.
    """
    keys = [k.strip() for k in listed.split(",") if k.strip()]
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {setting} {path}: {exc.strerror}") from None
        except UnicodeDecodeError:  # its message would quote the bytes: part of a key
            raise ConfigError(f"cannot read {setting} {path}: not UTF-8 text") from None
        in_file = [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
        if not in_file:
            raise ConfigError(f"{setting} {path} holds no key (one key per line)")
        keys += in_file
    return tuple(dict.fromkeys(keys))


@click.command(context_settings={"show_default": True})
@option(
    "--host",
    envvar="HOST",
    default=None,
    help="Address to listen on.  [default: 0.0.0.0; 127.0.0.1 with --demo]",
)
@option(
    "--port",
    envvar="PORT",
    type=PORT,
    default=field_default(ServeConfig, "port"),
    help="Port for the API and the worker socket (0: any free port).",
)
@option(
    "--metrics-port",
    envvar="METRICS_PORT",
    type=PORT,
    default=None,
    help="Serve /metrics on this port instead.  [default: /metrics on --port]",
)
@secret(
    "--api-key",
    envvar="API_KEY",
    help="Key(s) clients must send as 'Authorization: Bearer'; comma-separated.",
)
@option(
    "--api-key-file",
    envvar="API_KEY_FILE",
    default="",
    show_default=False,
    help="File of client keys, one per line (added to --api-key; for rotation).",
)
@secret("--worker-key", envvar="WORKER_KEY", help="Key(s) workers must register with.")
@option(
    "--worker-key-file",
    envvar="WORKER_KEY_FILE",
    default="",
    show_default=False,
    help="File of worker keys, one per line (added to --worker-key).",
)
@option(
    "--worker-keys-file",
    envvar="WORKER_KEYS_FILE",
    default="",
    show_default=False,
    help="YAML file of named worker keys with models, max_workers and expiry (reloaded on "
    "SIGHUP and when it changes).",
)
@option(
    "--keys-file",
    envvar="KEYS_FILE",
    default="",
    show_default=False,
    help="YAML file of named client keys with models, limits and weights (reloaded on "
    "SIGHUP and when it changes).",
)
@duration(
    "--keys-poll-interval",
    "KEYS_POLL_INTERVAL",
    field_default(ServeConfig, "keys_poll_interval"),
    "How often to check whether --keys-file or --worker-keys-file changed.",
    zero=False,
)
@option(
    "--ws-path",
    envvar="WS_PATH",
    default=field_default(ServeConfig, "ws_path"),
    help="Path of the worker WebSocket endpoint.",
)
@duration(
    "--request-timeout",
    "REQUEST_TIMEOUT",
    field_default(ServeConfig, "request_timeout"),
    "Longest a request may take, start to end.",
    zero=False,
)
@option(
    "--max-body-size",
    envvar="MAX_BODY_SIZE",
    type=ByteSize(),
    default=format_size(field_default(ServeConfig, "max_body_size")),
    help="Largest request body accepted from a client.",
)
@duration(
    "--idle-timeout",
    "IDLE_TIMEOUT",
    field_default(ServeConfig, "idle_timeout"),
    "End a stream when its worker sends nothing for this long.",
    zero=False,
)
@option(
    "--queue-size",
    envvar="QUEUE_SIZE",
    type=click.IntRange(min=0, max=MAX_COUNT),
    default=field_default(ServeConfig, "queue_size"),
    help="Requests each key may have waiting per model while its workers are busy (0: none).",
)
@option(
    "--max-queued",
    envvar="MAX_QUEUED",
    type=click.IntRange(min=0, max=MAX_COUNT),
    default=field_default(ServeConfig, "max_queued"),
    help="Requests that may wait at once over every model and key (0: no overall bound).",
)
@duration(
    "--queue-timeout",
    "QUEUE_TIMEOUT",
    field_default(ServeConfig, "queue_timeout"),
    "Longest a request waits in the queue before a 503.",
)
@option(
    "--queue-position-events/--no-queue-position-events",
    envvar="QUEUE_POSITION_EVENTS",
    default=field_default(ServeConfig, "queue_position_events"),
    help="Give a waiting OpenAI or Anthropic stream its place in line as SSE comments "
    "(': queued position=N') every second.",
)
@duration(
    "--drain-timeout",
    "DRAIN_TIMEOUT",
    field_default(ServeConfig, "drain_timeout"),
    "On SIGTERM, time in-flight requests get to finish (0: stop at once; -1: wait forever).",
    forever=True,
)
@duration(
    "--worker-timeout",
    "WORKER_TIMEOUT",
    field_default(ServeConfig, "worker_timeout"),
    "Evict a worker silent for this long.",
    zero=False,
)
@duration(
    "--register-timeout",
    "REGISTER_TIMEOUT",
    field_default(ServeConfig, "register_timeout"),
    "Time a new worker connection has to register.",
    zero=False,
)
@option(
    "--max-attempts",
    envvar="MAX_ATTEMPTS",
    type=click.IntRange(min=1, max=MAX_COUNT),
    default=field_default(ServeConfig, "max_attempts"),
    help="Workers one request may be tried on when workers vanish before answering.",
)
@duration(
    "--gone-retention",
    "GONE_RETENTION",
    field_default(ServeConfig, "gone_retention"),
    "How long a departed worker stays listed as 'gone' in the state API.",
)
@option(
    "--tls-cert",
    envvar="TLS_CERT",
    default="",
    show_default=False,
    help="PEM certificate chain: serve HTTPS and WSS on the same port (with --tls-key).",
)
@option(
    "--tls-key",
    envvar="TLS_KEY",
    default="",
    show_default=False,
    help="PEM private key of --tls-cert.",
)
@option(
    "--metrics-require-key",
    envvar="METRICS_REQUIRE_KEY",
    is_flag=True,
    help="Require the API key on /metrics too (open by default, as in Go).",
)
@option(
    "--max-connections",
    envvar="MAX_CONNECTIONS",
    type=click.IntRange(min=1, max=MAX_COUNT),
    default=field_default(ServeConfig, "max_connections"),
    help="Client connections at once; past that, slow ones are closed or new ones get 503.",
)
@option(
    "--backlog",
    envvar="BACKLOG",
    type=click.IntRange(min=1, max=65535),
    default=field_default(ServeConfig, "backlog"),
    help="Connections the listening socket queues for a burst (capped by net.core.somaxconn).",
)
@duration(
    "--header-timeout",
    "HEADER_TIMEOUT",
    field_default(ServeConfig, "header_timeout"),
    "Close a connection that takes longer to send its request headers.",
    zero=False,
)
@duration(
    "--keepalive-timeout",
    "KEEPALIVE_TIMEOUT",
    field_default(ServeConfig, "keepalive_timeout"),
    "Close a keep-alive connection idle for this long.",
    zero=False,
)
@option(
    "--max-workers",
    envvar="MAX_WORKERS",
    type=click.IntRange(min=1, max=MAX_COUNT),
    default=field_default(ServeConfig, "max_workers"),
    help="Worker connections at once; more are refused.",
)
@option(
    "--max-models-per-worker",
    envvar="MAX_MODELS_PER_WORKER",
    type=click.IntRange(min=1, max=MAX_COUNT),
    default=field_default(ServeConfig, "max_models_per_worker"),
    help="Models one worker may advertise.",
)
@option(
    "--access-log/--no-access-log",
    envvar="ACCESS_LOG",
    default=field_default(ServeConfig, "access_log"),
    help="Log one line per HTTP request (method, path, status, duration, bytes, key name).",
)
@option(
    "--cluster-url",
    envvar="CLUSTER_URL",
    default="",
    show_default=False,
    help="Valkey/Redis URL (redis://, rediss://, valkey://, unix://) of a cluster of servers "
    "that form one pool.  [default: none, a pool of its own]",
)
@secret(
    "--cluster-key",
    envvar="CLUSTER_KEY",
    help="Secret the servers of the cluster share; comma-separated for rotation.",
)
@option(
    "--cluster-key-file",
    envvar="CLUSTER_KEY_FILE",
    default="",
    show_default=False,
    help="File of cluster keys, one per line (added to --cluster-key).",
)
@option(
    "--cluster-advertise-url",
    envvar="CLUSTER_ADVERTISE_URL",
    default="",
    show_default=False,
    help="URL the other servers of the cluster reach this one at.  [default: the listening "
    "address, when --host is a specific address]",
)
@option(
    "--cluster-ca-file",
    envvar="CLUSTER_CA_FILE",
    default="",
    show_default=False,
    help="PEM file of the CAs to check the other servers' TLS certificates against.  "
    "[default: the system's]",
)
@option(
    "--processes",
    envvar="PROCESSES",
    type=click.IntRange(min=1, max=MAX_PROCESSES),
    default=field_default(ServeConfig, "processes"),
    help="Server processes on this host, one per core: they share --port (SO_REUSEPORT) and "
    "form one pool through --cluster-url.",
)
@option(
    "--reuse-port/--no-reuse-port",
    envvar="REUSE_PORT",
    default=field_default(ServeConfig, "reuse_port"),
    help="Share --port with other server processes of this host (SO_REUSEPORT), for a "
    "supervisor that starts them itself; set by --processes.",
)
@click.option(
    "--demo",
    is_flag=True,
    help="Also run a built-in demo worker (echo model 'demo') and print a curl line.",
)
@env_file_option
@log_options()
def serve(**params: Any) -> None:
    """Run the server clients and workers connect to."""
    from llamapool import run

    settings = serve_settings(params)
    apply_log_settings(settings.log, "server.log")
    cfg = settings.config
    if cfg.processes > 1:
        if settings.demo:
            raise ConfigError("--demo runs one process: leave out --processes")
        from llamapool import processes

        raise SystemExit(processes.supervise(settings))
    eventloop.run(run.demo(cfg) if settings.demo else run.serve(cfg))
