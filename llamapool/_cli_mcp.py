"""``llamapool mcp``: the MCP relay's options and the settings they resolve to."""

from __future__ import annotations

import re
import shlex
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
from llamapool._cli_types import ByteSize, format_size
from llamapool.log import LogSettings
from llamapool.mcp.config import ONE_TRANSPORT, McpConfig

_MCP_ID = re.compile(r"^[A-Za-z0-9][\w.:@+=-]{0,127}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _load_config(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    """Eager: read a YAML file of settings into ``default_map`` (below ``--env-file``)."""
    if value is None or ctx.resilient_parsing:
        return
    entries = config_files.read_entries(Path(value), yaml_file=True)
    settings = config_files.to_default_map(ctx, entries, source=value)
    ctx.default_map = {**settings, **(ctx.default_map or {})}


@attrs.frozen
class McpSettings:
    """Everything ``llamapool mcp`` needs to run."""

    config: McpConfig
    log: LogSettings


class Pair(click.ParamType):  # type: ignore[type-arg]
    """A ``KEY=VALUE`` (``--env``) or ``Name: value`` (``--header``) entry, as a pair.

    Errors name the option and never show what was given: the value is often a secret.
    Several entries in the environment variable are separated by whitespace (``MCP_ENV``) or
    by line breaks (``MCP_HEADERS``: a header value may hold spaces).
    """

    def __init__(self, sep: str, *, header: bool = False) -> None:
        self.sep = sep
        self.header = header
        self.name = "'Name: value'" if header else "KEY=VALUE"
        self.splitter = "\n" if header else None

    def split_envvar_value(self, rv: str) -> list[str]:
        return [part for part in rv.split(self.splitter) if part.strip()]

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, str]:
        if isinstance(value, tuple):  # converted already (read from a file)
            return value
        key, found, rest = str(value).partition(self.sep)
        key = key.strip()
        if not found or not key:
            self.fail(f"expected {self.name} (what was given is not shown)", param, ctx)
        if not self.header:
            return key, rest
        if not _HEADER_NAME.match(key):
            self.fail("expected 'Name: value' with a valid header name", param, ctx)
        value = rest.strip()
        if "\r" in value or "\n" in value:
            self.fail("a header value cannot hold a line break", param, ctx)
        return key, value


def mcp_settings(params: Mapping[str, Any]) -> McpSettings:
    """Settings from the resolved ``mcp`` options (flag, environment, file or default)."""
    fields = config_fields(McpConfig, params, id="mcp_id")
    if not _MCP_ID.match(fields["mcp_id"]):
        raise click.BadParameter(
            "must be 1 to 128 letters, digits or ._:@+=-, starting with a letter or digit",
            param_hint="'--id'",
        )
    command = params["command"] or ""
    try:
        fields["command"] = tuple(shlex.split(command))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--command'") from None
    if [bool(fields["command"]), bool(params["url"]), bool(params["sse_url"])].count(True) != 1:
        raise click.UsageError(ONE_TRANSPORT)
    fields["env"] = params["env"]
    headers = params["header"]
    if params["bearer_token"]:
        headers += (("Authorization", f"Bearer {params['bearer_token']}"),)
    fields["headers"] = headers
    if not fields["name"]:
        del fields["name"]
    return McpSettings(McpConfig(**fields), log_settings(params))


@click.command(context_settings={"show_default": True})
@dial_options(McpConfig, peer="relay")
@option(
    "--id",
    envvar="MCP_ID",
    required=True,
    help="Endpoint id: clients reach the MCP server at /api/mcp/id/<id>.",
)
@option(
    "--name",
    envvar="MCP_NAME",
    default="",
    show_default=False,
    help="Display name of this relay.  [default: host name]",
)
@option(
    "--command",
    envvar="MCP_COMMAND",
    default="",
    show_default=False,
    help="stdio MCP server: its command line, split like a shell does (one process per "
    "client session).",
)
@option(
    "--cwd",
    envvar="MCP_CWD",
    default="",
    show_default=False,
    help="Working directory of the --command process.  [default: the relay's]",
)
@option(
    "--env",
    envvar="MCP_ENV",
    multiple=True,
    type=Pair("="),
    help="Environment variable for the --command process (repeatable; MCP_ENV: separated "
    "by spaces).",
)
@option(
    "--url",
    envvar="MCP_URL",
    default="",
    show_default=False,
    help="Streamable HTTP MCP server: its URL (e.g. http://127.0.0.1:8000/mcp).",
)
@option(
    "--sse-url",
    envvar="MCP_SSE_URL",
    default="",
    show_default=False,
    help="MCP server speaking the older HTTP+SSE transport: the URL of its SSE stream "
    "(e.g. http://127.0.0.1:8000/sse).",
)
@option(
    "--header",
    envvar="MCP_HEADERS",
    multiple=True,
    type=Pair(":", header=True),
    help="Header sent to the --url or --sse-url server (repeatable; MCP_HEADERS: one per line).",
)
@secret(
    "--bearer-token",
    envvar="MCP_BEARER_TOKEN",
    help="Bearer token for the --url or --sse-url server.",
)
@option(
    "--upstream-ca-file",
    envvar="MCP_CA_FILE",
    default="",
    show_default=False,
    help="PEM file of the CA(s) of the --url server's certificate.  [default: the system's]",
)
@option(
    "--upstream-tls-insecure",
    envvar="MCP_TLS_INSECURE",
    is_flag=True,
    help="Do not verify the --url server's certificate.",
)
@secret(
    "--token",
    envvar="MCP_TOKEN",
    help="Extra token clients must send in X-MCP-Token (besides the pool's API key).",
)
@option(
    "--max-sessions",
    envvar="MCP_MAX_SESSIONS",
    type=click.IntRange(1, 4096),
    default=field_default(McpConfig, "max_sessions"),
    help="Client sessions this relay serves at once.",
)
@duration(
    "--call-timeout",
    "MCP_CALL_TIMEOUT",
    field_default(McpConfig, "call_timeout"),
    "Longest a call may run without reporting progress (0: the server's default).",
)
@option(
    "--max-message-size",
    "max_message_bytes",
    envvar="MCP_MAX_MESSAGE_SIZE",
    type=ByteSize(),
    default=format_size(field_default(McpConfig, "max_message_bytes")),
    help="Largest JSON-RPC message accepted from the MCP server.",
)
@duration(
    "--drain-timeout",
    "DRAIN_TIMEOUT",
    field_default(McpConfig, "drain_timeout"),
    "On SIGTERM, time calls in flight get to finish (0: exit at once; -1: wait forever).",
    forever=True,
)
@option(
    "--config",
    envvar="MCP_CONFIG_FILE",
    type=click.Path(dir_okay=False),
    expose_value=False,
    is_eager=True,
    callback=_load_config,
    show_default=False,
    help="YAML file of settings ('id: ...').",
)
@env_file_option
@log_options()
def mcp(**params: Any) -> None:
    """Relay a private MCP server to the pool; it dials out to the server."""
    from llamapool.mcp import run

    settings = mcp_settings(params)
    apply_log_settings(settings.log, "mcp.log")
    eventloop.run(run.relay(settings.config))
