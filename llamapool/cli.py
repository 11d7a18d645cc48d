"""The command line: ``llamapool serve`` and ``llamapool work``.

Every setting comes from, in this order: a flag, its environment variable (the Go version's
names, shown in ``--help``, so existing env files keep working), a file (``--env-file`` for
both commands, ``--config`` YAML for the worker), the built-in default.
Files reach click through the context's ``default_map``, which click consults after the
command line and the environment; eager options load them before any other option is read.
:func:`resolve` builds the settings without running anything; errors end the process with one
line on stderr.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import click

from llamapool import config_files
from llamapool._cli_types import ByteSize, Duration, HostPort, format_duration, format_size
from llamapool.build import build_info
from llamapool.config import ServeConfig, WorkConfig
from llamapool.errors import ConfigError, LlamapoolError
from llamapool.log import LOG_FORMATS, LOG_LEVELS, LogSettings, configure_logging

F = TypeVar("F", bound=Callable[..., Any])


_PORT = click.IntRange(0, 65535)


def _serve_default(name: str) -> Any:
    """The default of a :class:`ServeConfig` field: the config class is the one source."""
    return attrs.fields_dict(ServeConfig)[name].default


def _work_default(name: str) -> Any:
    """The default of a :class:`WorkConfig` field."""
    return attrs.fields_dict(WorkConfig)[name].default


def _option(*decls: str, envvar: str | list[str], **kwargs: Any) -> Callable[[F], F]:
    """An option readable from ``envvar`` and listed with it in ``--help``."""
    return click.option(*decls, envvar=envvar, show_envvar=True, **kwargs)


def _duration(decl: str, envvar: str, default: Any, help: str, **kind: bool) -> Callable[[F], F]:
    return _option(
        decl, envvar=envvar, type=Duration(**kind), default=format_duration(default), help=help
    )


def _secret(decl: str, *more: str, envvar: str | list[str], help: str) -> Callable[[F], F]:
    return _option(decl, *more, envvar=envvar, default="", show_default=False, help=help)


def _load_env_file(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    """Eager: read ``--env-file`` into ``default_map`` before other options are resolved."""
    if value is None or ctx.resilient_parsing:
        return
    entries = config_files.read_entries(Path(value), yaml_file=False)
    # An env file is closer to the environment than the YAML file: its values win.
    ctx.default_map = {
        **(ctx.default_map or {}),
        **config_files.to_default_map(ctx, entries, source=value),
    }


def _load_config(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    """Eager: read the worker's YAML file into ``default_map`` (below ``--env-file``).

    Without ``--config`` the OS default file is read if it exists (macOS and Windows only, as
    in the Go worker); when it is, logs also go to the OS log directory unless told otherwise.
    """
    if ctx.resilient_parsing:
        return
    path = Path(value) if value is not None else config_files.default_worker_config()
    if path is None or (value is None and not path.is_file()):
        return
    entries = config_files.read_entries(path, yaml_file=True)
    settings = config_files.to_default_map(ctx, entries, source=str(path))
    log_dir = config_files.default_worker_log_dir()
    if value is None and log_dir is not None:
        settings.setdefault("log_dir", str(log_dir))
    ctx.default_map = {**settings, **(ctx.default_map or {})}


def _env_file_option(f: F) -> F:
    return _option(
        "--env-file",
        envvar="ENV_FILE",
        type=click.Path(dir_okay=False),
        expose_value=False,
        is_eager=True,
        callback=_load_env_file,
        help="Read settings from this KEY=value file (systemd EnvironmentFile syntax).",
    )(f)


def _log_options(*, log_dir_default: str = "") -> Callable[[F], F]:
    """``--log-level``, ``--log-dir`` and ``--log-format``, shared by both commands."""
    options = [
        _option(
            "--log-level",
            envvar="LOG_LEVEL",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            default="info",
            help="Least important events to log.",
        ),
        _option(
            "--log-dir",
            envvar="LOG_DIR",
            type=click.Path(file_okay=False),
            default=None,
            help="Also write JSON logs to rotating files (10 MiB x 5) in this directory."
            + (f"  [default: {log_dir_default}]" if log_dir_default else ""),
        ),
        _option(
            "--log-format",
            envvar="LOG_FORMAT",
            type=click.Choice(LOG_FORMATS, case_sensitive=False),
            default="auto",
            help="Format on stderr; auto: console on a terminal, JSON otherwise.",
        ),
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _version(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(str(build_info()))
        ctx.exit()


@click.group(context_settings={"show_default": True, "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_version,
    help="Print version, git SHA and build date, then exit.",
)
def cli() -> None:
    """llamapool: pool private LLM machines behind one OpenAI-compatible endpoint.

    Settings come from flags, then environment variables, then files, then defaults.
    """


# --- serve ----------------------------------------------------------------------------------


@attrs.frozen
class ServeSettings:
    """Everything ``llamapool serve`` needs to run."""

    config: ServeConfig
    log: LogSettings
    demo: bool = False


def serve_settings(params: Mapping[str, Any]) -> ServeSettings:
    """Settings from the resolved ``serve`` options (flag, environment, file or default)."""
    demo = bool(params["demo"])
    fields = _config_fields(ServeConfig, params, api_key="api_keys", worker_key="worker_keys")
    fields["api_keys"] = _keys(params["api_key"], params["api_key_file"])
    fields["worker_keys"] = _keys(params["worker_key"], params["worker_key_file"])
    fields["host"] = fields["host"] or ("127.0.0.1" if demo else "0.0.0.0")
    return ServeSettings(ServeConfig(**fields), _log_settings(params), demo)


@cli.command(context_settings={"show_default": True})
@_option(
    "--host",
    envvar="HOST",
    default=None,
    help="Address to listen on.  [default: 0.0.0.0; 127.0.0.1 with --demo]",
)
@_option(
    "--port",
    envvar="PORT",
    type=_PORT,
    default=_serve_default("port"),
    help="Port for the API and the worker socket (0: any free port).",
)
@_option(
    "--metrics-port",
    envvar="METRICS_PORT",
    type=_PORT,
    default=None,
    help="Serve /metrics on this port instead.  [default: /metrics on --port]",
)
@_secret(
    "--api-key",
    envvar="API_KEY",
    help="Key(s) clients must send as 'Authorization: Bearer'; comma-separated.",
)
@_option(
    "--api-key-file",
    envvar="API_KEY_FILE",
    default="",
    show_default=False,
    help="File of client keys, one per line (added to --api-key; for rotation).",
)
@_secret("--worker-key", envvar="WORKER_KEY", help="Key(s) workers must register with.")
@_option(
    "--worker-key-file",
    envvar="WORKER_KEY_FILE",
    default="",
    show_default=False,
    help="File of worker keys, one per line (added to --worker-key).",
)
@_option(
    "--ws-path",
    envvar="WS_PATH",
    default=_serve_default("ws_path"),
    help="Path of the worker WebSocket endpoint.",
)
@_duration(
    "--request-timeout",
    "REQUEST_TIMEOUT",
    _serve_default("request_timeout"),
    "Longest a request may take, start to end.",
    zero=False,
)
@_option(
    "--max-body-size",
    envvar="MAX_BODY_SIZE",
    type=ByteSize(),
    default=format_size(_serve_default("max_body_size")),
    help="Largest request body accepted from a client.",
)
@_duration(
    "--idle-timeout",
    "IDLE_TIMEOUT",
    _serve_default("idle_timeout"),
    "End a stream when its worker sends nothing for this long.",
    zero=False,
)
@_option(
    "--queue-size",
    envvar="QUEUE_SIZE",
    type=click.IntRange(min=0),
    default=_serve_default("queue_size"),
    help="Requests that may wait per model while its workers are busy (0: none).",
)
@_duration(
    "--queue-timeout",
    "QUEUE_TIMEOUT",
    _serve_default("queue_timeout"),
    "Longest a request waits in the queue before a 503.",
)
@_duration(
    "--drain-timeout",
    "DRAIN_TIMEOUT",
    _serve_default("drain_timeout"),
    "On SIGTERM, time in-flight requests get to finish (0: stop at once; -1: wait forever).",
    forever=True,
)
@_duration(
    "--worker-timeout",
    "WORKER_TIMEOUT",
    _serve_default("worker_timeout"),
    "Evict a worker silent for this long.",
    zero=False,
)
@_duration(
    "--register-timeout",
    "REGISTER_TIMEOUT",
    _serve_default("register_timeout"),
    "Time a new worker connection has to register.",
    zero=False,
)
@_option(
    "--max-attempts",
    envvar="MAX_ATTEMPTS",
    type=click.IntRange(min=1),
    default=_serve_default("max_attempts"),
    help="Workers one request may be tried on when workers vanish before answering.",
)
@_duration(
    "--gone-retention",
    "GONE_RETENTION",
    _serve_default("gone_retention"),
    "How long a departed worker stays listed as 'gone' in the state API.",
)
@_option(
    "--tls-cert",
    envvar="TLS_CERT",
    default="",
    show_default=False,
    help="PEM certificate chain: serve HTTPS and WSS on the same port (with --tls-key).",
)
@_option(
    "--tls-key",
    envvar="TLS_KEY",
    default="",
    show_default=False,
    help="PEM private key of --tls-cert.",
)
@_option(
    "--metrics-require-key",
    envvar="METRICS_REQUIRE_KEY",
    is_flag=True,
    help="Require the API key on /metrics too (open by default, as in Go).",
)
@_option(
    "--max-connections",
    envvar="MAX_CONNECTIONS",
    type=click.IntRange(min=1),
    default=_serve_default("max_connections"),
    help="Client requests handled at once; more are answered 503.",
)
@_option(
    "--max-workers",
    envvar="MAX_WORKERS",
    type=click.IntRange(min=1),
    default=_serve_default("max_workers"),
    help="Worker connections at once; more are refused.",
)
@_option(
    "--max-models-per-worker",
    envvar="MAX_MODELS_PER_WORKER",
    type=click.IntRange(min=1),
    default=_serve_default("max_models_per_worker"),
    help="Models one worker may advertise.",
)
@click.option(
    "--demo",
    is_flag=True,
    help="Also run a built-in demo worker (echo model 'demo') and print a curl line.",
)
@_env_file_option
@_log_options()
def serve(**params: Any) -> None:
    """Run the server clients and workers connect to."""
    from llamapool import run

    settings = serve_settings(params)
    _configure_logging(settings.log, "server.log")
    cfg = settings.config
    asyncio.run(run.demo(cfg) if settings.demo else run.serve(cfg))


# --- work -----------------------------------------------------------------------------------


@attrs.frozen
class WorkSettings:
    """Everything ``llamapool work`` needs to run."""

    config: WorkConfig
    log: LogSettings


def work_settings(params: Mapping[str, Any]) -> WorkSettings:
    """Settings from the resolved ``work`` options (flag, environment, file or default)."""
    fields = _config_fields(WorkConfig, params)
    for generated in ("worker_id", "worker_name"):  # empty: let WorkConfig make one up
        if not fields[generated]:
            del fields[generated]
    return WorkSettings(WorkConfig(**fields), _log_settings(params))


@cli.command(context_settings={"show_default": True})
@_option(
    "--server-url",
    envvar="SERVER_URL",
    default=_work_default("server_url"),
    help="The server's worker WebSocket URL (ws:// or wss://).",
)
@_secret("--worker-key", envvar="WORKER_KEY", help="Key to register with.")
@_option(
    "--backend",
    envvar="BACKEND",
    default=_work_default("backend"),
    help="Backend plugin: ollama, vllm, openwebui, demo, or a third-party one.",
)
@_option(
    "--backend-url",
    "--ollama-base-url",
    "backend_url",
    envvar=["BACKEND_URL", "OLLAMA_BASE_URL", "OLLAMA_URL"],
    default="",
    show_default=False,
    help="Base URL of the backend.  [default: the backend's usual local URL]",
)
@_secret(
    "--backend-api-key",
    "--ollama-api-key",
    "backend_api_key",
    envvar=["BACKEND_API_KEY", "OLLAMA_API_KEY"],
    help="Key the worker sends to its backend.",
)
@_option(
    "--max-concurrency",
    envvar="MAX_CONCURRENCY",
    type=click.IntRange(min=1),
    default=_work_default("max_concurrency"),
    help="Requests this worker serves at once.",
)
@_option(
    "--worker-id",
    envvar="WORKER_ID",
    default="",
    show_default=False,
    help="Stable id of this worker.  [default: random]",
)
@_option(
    "--worker-name",
    envvar="WORKER_NAME",
    default="",
    show_default=False,
    help="Display name.  [default: host name]",
)
@_option(
    "--status-addr",
    envvar="STATUS_ADDR",
    type=HostPort(),
    default="",
    show_default=False,
    help="host:port of the local /status and /version endpoint.  [default: off]",
)
@_option(
    "--metrics-addr",
    envvar="METRICS_ADDR",
    type=HostPort(),
    default="",
    show_default=False,
    help="host:port of the worker's Prometheus /metrics.  [default: off]",
)
@_duration(
    "--drain-timeout",
    "DRAIN_TIMEOUT",
    _work_default("drain_timeout"),
    "On SIGTERM, time in-flight requests get to finish (0: exit at once; -1: wait forever).",
    forever=True,
)
@_duration(
    "--probe-interval",
    "PROBE_INTERVAL",
    _work_default("probe_interval"),
    "Time between checks of the backend's health and models.",
    zero=False,
)
@_duration(
    "--reconnect-max",
    "RECONNECT_MAX",
    _work_default("reconnect_max"),
    "Longest wait between two attempts to reach the server.",
    zero=False,
)
@_duration(
    "--heartbeat-interval",
    "HEARTBEAT_INTERVAL",
    _work_default("heartbeat_interval"),
    "Time between heartbeats (the server evicts a worker silent for 15s).",
    zero=False,
)
@_option(
    "--ca-file",
    envvar="CA_FILE",
    default="",
    show_default=False,
    help="PEM file of the CA(s) that signed the server's certificate.  [default: the system's]",
)
@_option(
    "--tls-insecure",
    envvar="TLS_INSECURE",
    is_flag=True,
    help="Do not verify the server's certificate (self-signed test servers only).",
)
@_option(
    "--config",
    envvar="CONFIG_FILE",
    type=click.Path(dir_okay=False),
    expose_value=False,
    is_eager=True,
    callback=_load_config,
    show_default=False,
    help="YAML file of settings ('server_url: ...').  [default: worker.yaml in "
    "~/Library/Application Support/llamapool on macOS, %ProgramData%\\llamapool on "
    "Windows, none elsewhere]",
)
@_env_file_option
@_log_options(
    log_dir_default="none; when the OS-default worker.yaml is read, ~/Library/Logs/llamapool "
    "on macOS, %ProgramData%\\llamapool\\Logs on Windows"
)
def work(**params: Any) -> None:
    """Run a worker beside an LLM runtime; it dials out to the server."""
    from llamapool import run

    settings = work_settings(params)
    _configure_logging(settings.log, "worker.log")
    asyncio.run(run.work(settings.config))


# --- shared ---------------------------------------------------------------------------------


def _keys(listed: str, path: str) -> tuple[str, ...]:
    """Keys from a comma-separated value plus a file of one key per line (``#`` comments).

    Several keys are accepted at once so an operator can rotate them without downtime.
    """
    keys = [k.strip() for k in listed.split(",") if k.strip()]
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
        keys += [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]
    return tuple(dict.fromkeys(keys))


def _config_fields(cls: type, params: Mapping[str, Any], **renamed: str) -> dict[str, Any]:
    """The options that are fields of ``cls``: each option is named after its field, except
    ``renamed`` ones (``--api-key`` fills ``api_keys``)."""
    fields = attrs.fields_dict(cls)
    values = {renamed.get(name, name): value for name, value in params.items()}
    return {name: value for name, value in values.items() if name in fields}


def _log_settings(params: Mapping[str, Any]) -> LogSettings:
    log_dir = params["log_dir"]
    return LogSettings(
        level=params["log_level"].lower(),
        format=params["log_format"].lower(),
        dir=Path(log_dir) if log_dir else None,
    )


def _configure_logging(settings: LogSettings, file_name: str) -> None:
    configure_logging(
        settings.level, fmt=settings.format, log_dir=settings.dir, file_name=file_name
    )


_SETTINGS: dict[str, tuple[click.Command, Callable[[Mapping[str, Any]], Any]]] = {
    "serve": (serve, serve_settings),
    "work": (work, work_settings),
}


def resolve(args: Sequence[str]) -> ServeSettings | WorkSettings:
    """The settings ``llamapool <args>`` would run with, from flags, environment and files.

    Runs nothing: tests and tools use it to see what a command line means.
    """
    if not args or args[0] not in _SETTINGS:
        raise click.UsageError(f"expected one of {', '.join(_SETTINGS)}")
    command, build = _SETTINGS[args[0]]
    with command.make_context(args[0], list(args[1:])) as ctx:
        settings: ServeSettings | WorkSettings = build(ctx.params)
    return settings


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line and a non-zero exit on any error."""
    try:
        cli.main(args=argv, prog_name="llamapool", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"llamapool: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except LlamapoolError as exc:
        click.echo(f"llamapool: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
