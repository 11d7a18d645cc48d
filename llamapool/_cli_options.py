"""Options both commands share, and the helpers that turn resolved options into settings.

Every option is readable from its environment variable and shows it in ``--help``; the eager
``--env-file`` loads its file into the context's ``default_map`` before any other option is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import click

from llamapool import config_files
from llamapool._cli_types import Duration, format_duration
from llamapool.log import LOG_FORMATS, LOG_LEVELS, LogSettings, configure_logging

F = TypeVar("F", bound=Callable[..., Any])


PORT = click.IntRange(0, 65535)


def option(*decls: str, envvar: str | list[str], **kwargs: Any) -> Callable[[F], F]:
    """An option readable from ``envvar`` and listed with it in ``--help``."""
    return click.option(*decls, envvar=envvar, show_envvar=True, **kwargs)


def duration(decl: str, envvar: str, default: Any, help: str, **kind: bool) -> Callable[[F], F]:
    return option(
        decl, envvar=envvar, type=Duration(**kind), default=format_duration(default), help=help
    )


def secret(decl: str, *more: str, envvar: str | list[str], help: str) -> Callable[[F], F]:
    return option(decl, *more, envvar=envvar, default="", show_default=False, help=help)


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


def env_file_option(f: F) -> F:
    return option(
        "--env-file",
        envvar="ENV_FILE",
        type=click.Path(dir_okay=False),
        expose_value=False,
        is_eager=True,
        callback=_load_env_file,
        help="Read settings from this KEY=value file (systemd EnvironmentFile syntax).",
    )(f)


def log_options(*, log_dir_default: str = "") -> Callable[[F], F]:
    """``--log-level``, ``--log-dir`` and ``--log-format``, shared by both commands."""
    options = [
        option(
            "--log-level",
            envvar="LOG_LEVEL",
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            default="info",
            help="Least important events to log.",
        ),
        option(
            "--log-dir",
            envvar="LOG_DIR",
            type=click.Path(file_okay=False),
            default=None,
            help="Also write JSON logs to rotating files (10 MiB x 5) in this directory."
            + (f"  [default: {log_dir_default}]" if log_dir_default else ""),
        ),
        option(
            "--log-format",
            envvar="LOG_FORMAT",
            type=click.Choice(LOG_FORMATS, case_sensitive=False),
            default="auto",
            help="Format on stderr; auto: console on a terminal, JSON otherwise.",
        ),
    ]

    def decorate(f: F) -> F:
        for each in reversed(options):
            f = each(f)
        return f

    return decorate


def dial_options(config: type, *, peer: str) -> Callable[[F], F]:
    """The options of a command that dials out to the server (``work``, ``mcp``): where, with
    which key, and how the connection is kept (see :mod:`llamapool.dialout`)."""
    options = [
        option(
            "--server-url",
            envvar="SERVER_URL",
            default=",".join(field_default(config, "server_url")),
            help="The server's worker WebSocket URL (ws:// or wss://); several, "
            "comma-separated (a cluster), are tried in turn.",
        ),
        secret("--worker-key", envvar="WORKER_KEY", help="Key to register with."),
        duration(
            "--reconnect-max",
            "RECONNECT_MAX",
            field_default(config, "reconnect_max"),
            "Longest wait between two attempts to reach the server.",
            zero=False,
        ),
        duration(
            "--heartbeat-interval",
            "HEARTBEAT_INTERVAL",
            field_default(config, "heartbeat_interval"),
            f"Time between heartbeats (the server drops a {peer} silent for 15s).",
            zero=False,
        ),
        duration(
            "--server-timeout",
            "SERVER_TIMEOUT",
            field_default(config, "server_timeout"),
            "Silence from the server (no message, no pong to a ping) after which the link is "
            f"taken for dead and the {peer} reconnects.",
            zero=False,
        ),
        option(
            "--ca-file",
            envvar="CA_FILE",
            default="",
            show_default=False,
            help="PEM file of the CA(s) that signed the server's certificate.  "
            "[default: the system's]",
        ),
        option(
            "--tls-insecure",
            envvar="TLS_INSECURE",
            is_flag=True,
            help="Do not verify the server's certificate (self-signed test servers only).",
        ),
    ]

    def decorate(f: F) -> F:
        for each in reversed(options):
            f = each(f)
        return f

    return decorate


def config_fields(cls: type, params: Mapping[str, Any], **renamed: str) -> dict[str, Any]:
    """The options that are fields of ``cls``: each option is named after its field, except
    ``renamed`` ones (``--api-key`` fills ``api_keys``)."""
    fields = attrs.fields_dict(cls)
    values = {renamed.get(name, name): value for name, value in params.items()}
    return {name: value for name, value in values.items() if name in fields}


def log_settings(params: Mapping[str, Any]) -> LogSettings:
    log_dir = params["log_dir"]
    return LogSettings(
        level=params["log_level"].lower(),
        format=params["log_format"].lower(),
        dir=Path(log_dir) if log_dir else None,
    )


def apply_log_settings(settings: LogSettings, file_name: str) -> None:
    configure_logging(
        settings.level, fmt=settings.format, log_dir=settings.dir, file_name=file_name
    )


def field_default(cls: type, name: str) -> Any:
    """The default of a config class's field: the config class is the one source of them."""
    return attrs.fields_dict(cls)[name].default
