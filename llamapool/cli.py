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

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click

from llamapool._cli_mcp import McpSettings, mcp, mcp_settings
from llamapool._cli_serve import ServeSettings, serve, serve_settings
from llamapool._cli_work import WorkSettings, work, work_settings
from llamapool.build import build_info
from llamapool.errors import LlamapoolError

__all__ = [
    "McpSettings",
    "ServeSettings",
    "WorkSettings",
    "cli",
    "main",
    "mcp",
    "mcp_settings",
    "resolve",
    "serve",
    "serve_settings",
    "work",
    "work_settings",
]


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


cli.add_command(serve)
cli.add_command(work)
cli.add_command(mcp)


_SETTINGS: dict[str, tuple[click.Command, Callable[[Mapping[str, Any]], Any]]] = {
    "serve": (serve, serve_settings),
    "work": (work, work_settings),
    "mcp": (mcp, mcp_settings),
}


def resolve(args: Sequence[str]) -> ServeSettings | WorkSettings | McpSettings:
    """The settings ``llamapool <args>`` would run with, from flags, environment and files.

    Runs nothing: tests and tools use it to see what a command line means.
    """
    if not args or args[0] not in _SETTINGS:
        raise click.UsageError(f"expected one of {', '.join(_SETTINGS)}")
    command, build = _SETTINGS[args[0]]
    with command.make_context(args[0], list(args[1:])) as ctx:
        settings: ServeSettings | WorkSettings | McpSettings = build(ctx.params)
    return settings


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line and a non-zero exit on any error."""
    try:
        cli.main(args=argv, prog_name="llamapool", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:  # no command: the help, as it is
        click.echo(exc.format_message(), err=True)
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
