"""``llamapool work``: its options, its YAML file and the settings they resolve to."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import click

from llamapool import config_files, eventloop
from llamapool._cli_options import (
    apply_log_settings,
    config_fields,
    dial_options,
    duration,
    env_file_option,
    field_default,
    log_options,
    log_settings,
    option,
    secret,
)
from llamapool._cli_types import HostPort
from llamapool.config import WorkConfig
from llamapool.log import LogSettings
from llamapool.server.validate import MAX_CONCURRENCY


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


@attrs.frozen
class WorkSettings:
    """Everything ``llamapool work`` needs to run."""

    config: WorkConfig
    log: LogSettings


def work_settings(params: Mapping[str, Any]) -> WorkSettings:
    """Settings from the resolved ``work`` options (flag, environment, file or default)."""
    fields = config_fields(WorkConfig, params)
    for generated in ("worker_id", "worker_name"):  # empty: let WorkConfig make one up
        if not fields[generated]:
            del fields[generated]
    return WorkSettings(WorkConfig(**fields), log_settings(params))


@click.command(context_settings={"show_default": True})
@dial_options(WorkConfig, peer="worker")
@option(
    "--backend",
    envvar="BACKEND",
    default=field_default(WorkConfig, "backend"),
    help="Backend plugin: ollama, vllm, openwebui, demo, or a third-party one.",
)
@option(
    "--backend-url",
    "--ollama-base-url",
    "backend_url",
    envvar=["BACKEND_URL", "OLLAMA_BASE_URL", "OLLAMA_URL"],
    default="",
    show_default=False,
    help="Base URL of the backend.  [default: the backend's usual local URL]",
)
@secret(
    "--backend-api-key",
    "--ollama-api-key",
    "backend_api_key",
    envvar=["BACKEND_API_KEY", "OLLAMA_API_KEY"],
    help="Key the worker sends to its backend.",
)
@option(
    "--max-concurrency",
    envvar="MAX_CONCURRENCY",
    type=click.IntRange(min=1, max=MAX_CONCURRENCY),
    default=field_default(WorkConfig, "max_concurrency"),
    help="Requests this worker serves at once.",
)
@option(
    "--worker-id",
    envvar="WORKER_ID",
    default="",
    show_default=False,
    help="Stable id of this worker.  [default: random]",
)
@option(
    "--worker-name",
    envvar="WORKER_NAME",
    default="",
    show_default=False,
    help="Display name.  [default: host name]",
)
@option(
    "--status-addr",
    envvar="STATUS_ADDR",
    type=HostPort(),
    default="",
    show_default=False,
    help="host:port of the local /status and /version endpoint.  [default: off]",
)
@option(
    "--metrics-addr",
    envvar="METRICS_ADDR",
    type=HostPort(),
    default="",
    show_default=False,
    help="host:port of the worker's Prometheus /metrics.  [default: off]",
)
@duration(
    "--drain-timeout",
    "DRAIN_TIMEOUT",
    field_default(WorkConfig, "drain_timeout"),
    "On SIGTERM, time in-flight requests get to finish (0: exit at once; -1: wait forever).",
    forever=True,
)
@duration(
    "--probe-interval",
    "PROBE_INTERVAL",
    field_default(WorkConfig, "probe_interval"),
    "Time between checks of the backend's health and models.",
    zero=False,
)
@option(
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
@env_file_option
@log_options(
    log_dir_default="none; when the OS-default worker.yaml is read, ~/Library/Logs/llamapool "
    "on macOS, %ProgramData%\\llamapool\\Logs on Windows"
)
def work(**params: Any) -> None:
    """Run a worker beside an LLM runtime; it dials out to the server."""
    from llamapool import run

    settings = work_settings(params)
    apply_log_settings(settings.log, "worker.log")
    eventloop.run(run.work(settings.config))
