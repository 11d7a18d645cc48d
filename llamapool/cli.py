"""The command line: ``llamapool serve`` and ``llamapool work``.

Every option can also come from the environment variable shown in ``--help`` (the Go version's
names, so existing env files keep working). Errors end the process with one line on stderr.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from llamapool.build import build_info
from llamapool.config import DEFAULT_WS_PATH, ServeConfig, WorkConfig, parse_duration
from llamapool.errors import LlamapoolError
from llamapool.log import configure_logging


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds, or a Go-style duration such as ``30s``, ``2m`` or ``1m30s``."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except LlamapoolError as exc:
            self.fail(str(exc), param, ctx)


_PORT = click.IntRange(0, 65535)
_LOG_LEVEL = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


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
    """llamapool: pool private LLM machines behind one OpenAI-compatible endpoint."""


def _log_option(f: Any) -> Any:
    return click.option(
        "--log-level", envvar="LOG_LEVEL", type=_LOG_LEVEL, default="info", show_envvar=True
    )(f)


@cli.command(context_settings={"show_default": True})
@click.option(
    "--host",
    envvar="HOST",
    default=None,
    show_envvar=True,
    help="Address to listen on.  [default: 0.0.0.0; 127.0.0.1 with --demo]",
)
@click.option(
    "--port",
    envvar="PORT",
    type=_PORT,
    default=8080,
    show_envvar=True,
    help="Port for the API and the worker socket (0: any free port).",
)
@click.option(
    "--api-key",
    envvar="API_KEY",
    default="",
    show_default=False,
    show_envvar=True,
    help="Key(s) clients must send as 'Authorization: Bearer'; comma-separated.",
)
@click.option(
    "--worker-key",
    envvar="WORKER_KEY",
    default="",
    show_default=False,
    show_envvar=True,
    help="Key(s) workers must register with; comma-separated.",
)
@click.option(
    "--ws-path",
    envvar="WS_PATH",
    default=DEFAULT_WS_PATH,
    show_envvar=True,
    help="Path of the worker WebSocket endpoint.",
)
@click.option(
    "--request-timeout",
    envvar="REQUEST_TIMEOUT",
    type=Duration(),
    default="300s",
    show_envvar=True,
    help="Longest a request may take, start to end.",
)
@click.option(
    "--demo",
    is_flag=True,
    help="Also run a built-in demo worker (echo model 'demo') and print a curl line.",
)
@_log_option
def serve(
    host: str | None,
    port: int,
    api_key: str,
    worker_key: str,
    ws_path: str,
    request_timeout: float,
    demo: bool,
    log_level: str,
) -> None:
    """Run the server clients and workers connect to."""
    from llamapool import run

    configure_logging(log_level)
    cfg = ServeConfig(
        host=host or ("127.0.0.1" if demo else "0.0.0.0"),
        port=port,
        api_keys=api_key,
        worker_keys=worker_key,
        ws_path=ws_path,
        request_timeout=request_timeout,
    )
    asyncio.run(run.demo(cfg) if demo else run.serve(cfg))


@cli.command(context_settings={"show_default": True})
@click.option(
    "--server-url",
    envvar="SERVER_URL",
    default=WorkConfig().server_url,
    show_envvar=True,
    help="The server's worker WebSocket URL (ws:// or wss://).",
)
@click.option(
    "--worker-key",
    envvar="WORKER_KEY",
    default="",
    show_default=False,
    show_envvar=True,
    help="Key to register with.",
)
@click.option(
    "--backend",
    envvar="BACKEND",
    default="ollama",
    show_envvar=True,
    help="Backend plugin: ollama, vllm, openwebui, demo, or a third-party one.",
)
@click.option(
    "--backend-url",
    envvar=["BACKEND_URL", "OLLAMA_BASE_URL"],
    default="",
    show_default=False,
    show_envvar=True,
    help="Base URL of the backend.  [default: the backend's usual local URL]",
)
@click.option(
    "--backend-api-key",
    envvar=["BACKEND_API_KEY", "OLLAMA_API_KEY"],
    default="",
    show_default=False,
    show_envvar=True,
    help="Key the worker sends to its backend.",
)
@click.option(
    "--max-concurrency",
    envvar="MAX_CONCURRENCY",
    type=click.IntRange(min=1),
    default=2,
    show_envvar=True,
    help="Requests this worker serves at once.",
)
@click.option(
    "--worker-id",
    envvar="WORKER_ID",
    default="",
    show_default=False,
    show_envvar=True,
    help="Stable id of this worker.  [default: random]",
)
@click.option(
    "--worker-name",
    envvar="WORKER_NAME",
    default="",
    show_default=False,
    show_envvar=True,
    help="Display name.  [default: host name]",
)
@_log_option
def work(
    server_url: str,
    worker_key: str,
    backend: str,
    backend_url: str,
    backend_api_key: str,
    max_concurrency: int,
    worker_id: str,
    worker_name: str,
    log_level: str,
) -> None:
    """Run a worker beside an LLM runtime; it dials out to the server."""
    from llamapool import run

    configure_logging(log_level)
    defaults = WorkConfig()
    cfg = WorkConfig(
        server_url=server_url,
        worker_key=worker_key,
        backend=backend,
        backend_url=backend_url,
        backend_api_key=backend_api_key,
        max_concurrency=max_concurrency,
        worker_id=worker_id or defaults.worker_id,
        worker_name=worker_name or defaults.worker_name,
    )
    asyncio.run(run.work(cfg))


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
