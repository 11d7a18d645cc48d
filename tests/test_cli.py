"""The real command line, in subprocesses: help, version, errors, settings, signals, and a pool
of ``serve`` and ``work`` processes used through the official ``openai`` and ``ollama`` clients."""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from llamapool.testing import create_fake_ollama_app, serve_app

from .cli_helpers import (
    API_KEY,
    WORKER_KEY,
    cli_env,
    cli_process,
    json_lines,
    other_lines,
    run_cli,
    running_server,
    running_worker,
    ws_url,
)

SERVE_VARS = ("PORT", "HOST", "API_KEY", "WORKER_KEY", "WS_PATH", "REQUEST_TIMEOUT")
WORK_VARS = (
    "SERVER_URL",
    "WORKER_KEY",
    "BACKEND",
    "BACKEND_URL",
    "OLLAMA_BASE_URL",
    "BACKEND_API_KEY",
    "OLLAMA_API_KEY",
    "MAX_CONCURRENCY",
    "WORKER_ID",
    "WORKER_NAME",
)
VERSION_LINE = re.compile(
    r"^llamapool (?P<version>\S+) \(sha (?P<sha>[0-9a-f]{7,40}), "
    r"built (?P<date>\d{4}-\d\d-\d\d\S*)\)$"
)


async def owners(url: str) -> dict[str, str]:
    """``GET /v1/models`` as ``{model id: owned_by}``."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}) as resp,
    ):
        assert 200 == resp.status
        return {m["id"]: m["owned_by"] for m in (await resp.json())["data"]}


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("llamapool: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# --- version and help -----------------------------------------------------------------------


def test_version_prints_version_sha_and_date() -> None:
    """``--version`` prints the package version, the git SHA and the build date."""
    result = run_cli("--version")

    match = VERSION_LINE.match(result.stdout.strip())
    assert 0 == result.returncode
    assert match is not None, result.stdout
    assert importlib.metadata.version("llamapool") == match["version"]


@pytest.mark.parametrize(("command", "names"), [("serve", SERVE_VARS), ("work", WORK_VARS)])
def test_command_help_names_every_env_var(command: str, names: tuple[str, ...]) -> None:
    """``serve --help`` and ``work --help`` name every environment variable they read."""
    result = run_cli(command, "--help")

    assert 0 == result.returncode
    assert [] == [name for name in names if not re.search(rf"\b{name}\b", result.stdout)]


def test_top_level_help_lists_the_commands_and_version() -> None:
    """``llamapool --help`` lists both commands and the ``--version`` flag."""
    result = run_cli("--help")

    assert 0 == result.returncode
    assert [] == [
        word
        for word in ("serve", "work", "--version")
        if not re.search(rf"(?m)^\s+{word}\b", result.stdout)
    ]


def test_no_command_shows_the_help_not_an_error() -> None:
    """``llamapool`` alone prints the usage and the commands, as ``--help`` does, with click's
    exit status for a missing command; it is not an error line."""
    result = run_cli()

    assert 2 == result.returncode
    assert result.stderr.startswith("Usage: llamapool")
    assert "error" not in result.stderr
    assert re.search(r"(?m)^\s+serve\b", result.stderr)


def test_console_script_runs() -> None:
    """The ``llamapool`` console script is installed next to Python and runs the CLI."""
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="llamapool")
    script = shutil.which("llamapool", path=str(Path(sys.executable).parent))

    assert "llamapool.cli:main" == entry_point.value
    assert script is not None
    result = subprocess.run(
        [script, "--version"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (0, run_cli("--version").stdout) == (result.returncode, result.stdout)


# --- bad settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        pytest.param(["serve", "--port", "abc"], {}, "--port", id="serve-port-flag"),
        pytest.param(["serve"], {"PORT": "abc"}, "PORT", id="PORT-env"),
        pytest.param(["serve", "--port", "70000"], {}, "--port", id="port-out-of-range"),
        pytest.param(["serve", "--request-timeout", "soon"], {}, "soon", id="timeout-flag"),
        pytest.param(
            ["serve"], {"REQUEST_TIMEOUT": "5 minutes"}, "REQUEST_TIMEOUT", id="timeout-env"
        ),
        pytest.param(["serve", "--request-timeout", "nan"], {}, "'nan'", id="timeout-nan"),
        pytest.param(["serve"], {"IDLE_TIMEOUT": "1e400"}, "IDLE_TIMEOUT", id="timeout-inf"),
        pytest.param(
            ["serve", "--drain-timeout", "1e300"], {}, "longer than a year", id="timeout-too-long"
        ),
        pytest.param(["work"], {"SERVER_TIMEOUT": "inf"}, "SERVER_TIMEOUT", id="work-timeout-inf"),
        pytest.param(
            ["serve", "--max-body-size", "9" * 400], {}, "--max-body-size", id="size-too-large"
        ),
        pytest.param(["work", "--backend", "nope"], {}, "nope", id="unknown-backend"),
        pytest.param(["work", "--max-concurrency", "0"], {}, "--max-concurrency", id="concurrency"),
        pytest.param(
            ["work"],
            {"MAX_CONCURRENCY": "9" * 23},
            "MAX_CONCURRENCY",
            id="concurrency-past-64-bits",
        ),
        pytest.param(["serve", "--backlog", "3000000000"], {}, "--backlog", id="backlog-past-int"),
        pytest.param(
            ["work"], {"MAX_CONCURRENCY": "many"}, "MAX_CONCURRENCY", id="concurrency-env"
        ),
        pytest.param(["work", "--server-url", "not-a-url"], {}, "not-a-url", id="server-url"),
        pytest.param(
            ["work", "--server-url", "ws://127.0.0.1:99999/workers/connect"],
            {},
            "SERVER_URL has a host or port",
            id="server-url-port",
        ),
        pytest.param(
            ["work", "--server-url", "ws://u:SECRETPW@h:99999/x"],
            {},
            "'ws://***@h:99999/x'",
            id="server-url-credentials-hidden",
        ),
        pytest.param(
            ["work"],
            {"SERVER_URL": "ws://[::1/workers/connect"},
            "SERVER_URL",
            id="server-url-host",
        ),
        pytest.param(
            ["work", "--backend-url", "localhost:11434"], {}, "BACKEND_URL", id="backend-url"
        ),
        pytest.param(
            ["work"], {"BACKEND_URL": "localhost:11434"}, "BACKEND_URL", id="BACKEND_URL-env"
        ),
        pytest.param(
            ["serve"], {"CLUSTER_URL": "http://redis"}, "CLUSTER_URL", id="cluster-url-scheme"
        ),
        pytest.param(
            ["serve"],
            {"CLUSTER_URL": "redis://h:notaport"},
            "CLUSTER_URL has a port",
            id="cluster-url-port",
        ),
        pytest.param(
            ["serve"],
            {"CLUSTER_URL": "valkey://:pass/word@h:6379"},
            "CLUSTER_URL has a port",
            id="cluster-url-password-not-echoed",
        ),
        pytest.param(
            ["serve"],
            {"CLUSTER_URL": "redis://h/?socket_timeout=abc"},
            "'socket_timeout'",
            id="cluster-url-option",
        ),
        pytest.param(
            ["serve"], {"CLUSTER_URL": "redis://[::1/x"}, "not a valid URL", id="cluster-ipv6"
        ),
        pytest.param(
            ["serve"], {"CLUSTER_URL": "redis://127.0.0.1:1"}, "CLUSTER_KEY", id="cluster-key"
        ),
        pytest.param(
            ["serve", "--cluster-url", "redis://127.0.0.1:1", "--cluster-key", "k"],
            {},
            "CLUSTER_ADVERTISE_URL",
            id="cluster-wildcard-host",
        ),
        pytest.param(["serve", "--processes", "2"], {}, "CLUSTER_URL", id="processes"),
        pytest.param(["serve", "--ws-path", "/healthz"], {}, "WS_PATH", id="ws-path-taken"),
        pytest.param(["work", "--worker-id", "a b"], {}, "WORKER_ID", id="worker-id"),
        pytest.param(
            ["serve", "--max-connections", "9" * 23], {}, "--max-connections", id="max-connections"
        ),
        pytest.param(["serve"], {"MAX_WORKERS": "9" * 23}, "MAX_WORKERS", id="max-workers"),
        pytest.param(["serve", "--queue-size", "1000001"], {}, "--queue-size", id="queue-size"),
        pytest.param(
            ["mcp", "--id", "x", "--command", "/no/such/program"],
            {},
            "--command: /no/such/program is not an executable program",
            id="mcp-command",
        ),
        pytest.param(
            ["mcp", "--id", "x", "--command", "python3 -V", "--cwd", "/no/such/dir"],
            {},
            "--cwd /no/such/dir is not a directory",
            id="mcp-cwd",
        ),
        pytest.param(["work"], {"WORKER_NAME": "n" * 200}, "WORKER_NAME", id="worker-name"),
        pytest.param(
            ["serve", "--port", "18320", "--metrics-port", "18320"],
            {},
            "METRICS_PORT must differ from PORT",
            id="metrics-port-is-port",
        ),
        pytest.param(
            ["serve", "--port", "18321", "--metrics-port", "18320", "--processes", "2"],
            {"CLUSTER_URL": "redis://127.0.0.1:1", "CLUSTER_KEY": "k"},
            "include PORT",
            id="processes-metrics-port-is-port",
        ),
        pytest.param(
            ["serve", "--port", "18321", "--metrics-port", "65535", "--processes", "2"],
            {"CLUSTER_URL": "redis://127.0.0.1:1", "CLUSTER_KEY": "k"},
            "past 65535",
            id="processes-metrics-port-past-65535",
        ),
    ],
)
def test_bad_value_is_one_line_and_non_zero_exit(
    args: list[str], env: dict[str, str], fragment: str
) -> None:
    """A bad flag or environment value ends the process with one line naming it, no traceback."""
    result = run_cli(*args, env=cli_env(**env))

    assert 0 != result.returncode
    assert "" == result.stdout
    assert_one_error_line(result, fragment)
    assert "pass" not in result.stderr  # no secret of a URL in the message


MCP_UPSTREAM = ["mcp", "--id", "db", "--url", "http://127.0.0.1:1/mcp"]


@pytest.mark.parametrize(
    ("args", "env", "option", "variable"),
    [
        pytest.param(
            ["--header", "Authorization=Bearer MCPSECRET"], {}, "--header", "MCP_HEADERS", id="h"
        ),
        pytest.param(
            [],
            {"MCP_HEADERS": "Authorization=Bearer MCPSECRET"},
            "--header",
            "MCP_HEADERS",
            id="MCP_HEADERS",
        ),
        pytest.param(
            [], {"MCP_HEADERS": "Bad MCPSECRET: v"}, "--header", "MCP_HEADERS", id="header-name"
        ),
        pytest.param(["--env", "DB_PASSWORD MCPSECRET"], {}, "--env", "MCP_ENV", id="env"),
        pytest.param([], {"MCP_ENV": "A=1 MCPSECRET"}, "--env", "MCP_ENV", id="MCP_ENV"),
    ],
)
def test_malformed_mcp_header_or_env_names_the_option_not_the_value(
    args: list[str], env: dict[str, str], option: str, variable: str
) -> None:
    """A malformed ``--header``/``MCP_HEADERS`` or ``--env``/``MCP_ENV`` entry is one line
    naming the option and its variable, and never shows the value (often a secret)."""
    result = run_cli(*MCP_UPSTREAM, *args, env=cli_env(**env))

    assert 2 == result.returncode
    assert_one_error_line(result, f"'{option}'", f"'{variable}'")
    assert "MCPSECRET" not in result.stderr


@pytest.mark.parametrize(
    ("option", "content", "fragment"),
    [
        pytest.param("--api-key-file", b"k\xff\xfe\n", "not UTF-8", id="api-key-file-binary"),
        pytest.param("--api-key-file", b"", "API_KEY_FILE", id="api-key-file-empty"),
        pytest.param(
            "--api-key-file", b"# rotated out\n\n", "holds no key", id="api-key-file-comments"
        ),
        pytest.param("--worker-key-file", b"\n", "WORKER_KEY_FILE", id="worker-key-file-empty"),
    ],
)
def test_a_bad_file_is_one_line_and_non_zero_exit(
    tmp_path: Path, option: str, content: bytes, fragment: str
) -> None:
    """A file setting whose file cannot be used ends ``serve`` with one line naming it, no
    traceback: an empty key file is refused rather than read as "no keys" (an open pool)."""
    path = tmp_path / "file"
    path.write_bytes(content)

    result = run_cli("serve", "--host", "127.0.0.1", "--port", "0", option, str(path))

    assert 0 != result.returncode
    assert "" == result.stdout
    assert_one_error_line(result, fragment)


@pytest.mark.parametrize(
    ("command", "option", "setting"),
    [
        (["serve", "--host", "127.0.0.1"], "--port", "HOST and PORT"),
        (["serve", "--host", "127.0.0.1", "--port", "0"], "--metrics-port", "METRICS_PORT"),
        (["work"], "--status-addr", "STATUS_ADDR"),
        (["work"], "--metrics-addr", "METRICS_ADDR"),
    ],
)
def test_an_address_in_use_is_one_line_and_non_zero_exit(
    command: list[str], option: str, setting: str
) -> None:
    """A port another process holds ends the command with one line naming the address and
    the setting that chose it, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        value = str(port) if option.endswith("port") else f"127.0.0.1:{port}"
        env = cli_env(WORKER_KEY=WORKER_KEY, SERVER_URL="ws://127.0.0.1:9/workers/connect")

        result = run_cli(*command, option, value, env=env)

    assert 1 == result.returncode
    assert_one_error_line(
        result, f"cannot listen on http://127.0.0.1:{port} ({setting}): address already in use"
    )


async def test_worker_with_a_rejected_key_exits_with_one_line() -> None:
    """A worker whose key the server refuses exits non-zero with one clear line."""
    async with (
        running_server() as (_, url),
        cli_process(
            "work",
            "--backend",
            "demo",
            env=cli_env(SERVER_URL=ws_url(url), WORKER_KEY="not-the-key"),
        ) as worker,
    ):
        code = await worker.wait()

    assert 0 != code
    assert "Traceback" not in worker.stderr
    errors = other_lines(worker.stderr)
    assert 1 == len(errors), worker.stderr
    assert errors[0].startswith("llamapool: error: ")
    assert "rejected" in errors[0]


# --- settings from flags and the environment ------------------------------------------------


async def test_flag_beats_environment() -> None:
    """``--worker-name`` wins over ``WORKER_NAME``; ``WORKER_NAME`` alone is used as is."""
    async with (
        running_server() as (_, url),
        running_worker(url, "--backend", "demo", WORKER_NAME="name-from-env"),
        running_worker(
            url, "--backend", "demo", "--worker-name", "name-from-flag", WORKER_NAME="ignored"
        ),
    ):
        listed = await owners(url)

    assert ["name-from-env", "name-from-flag"] == sorted(listed["demo"].split(","))


async def test_port_flag_beats_a_bad_port_variable() -> None:
    """``serve --port 0`` starts even when ``PORT`` holds garbage: the flag is used, not the
    variable."""
    async with (
        running_server(PORT="not-a-port") as (server, url),
        aiohttp.ClientSession() as http,
        http.get(url + "/healthz") as resp,
    ):
        status = resp.status

    assert 200 == status
    assert "Traceback" not in server.stderr


async def test_ollama_base_url_is_an_alias_of_backend_url() -> None:
    """``OLLAMA_BASE_URL`` points the worker at its backend when ``BACKEND_URL`` is unset, and
    ``BACKEND_URL`` wins when both are set."""
    async with (
        serve_app(create_fake_ollama_app(models=["alias-model:1b"])) as alias_url,
        serve_app(create_fake_ollama_app(models=["generic-model:1b"])) as generic_url,
        running_server() as (_, url),
        running_worker(
            url, "--backend", "ollama", OLLAMA_BASE_URL=alias_url, WORKER_NAME="alias-worker"
        ),
        running_worker(
            url,
            BACKEND="ollama",
            BACKEND_URL=generic_url,
            OLLAMA_BASE_URL=alias_url,
            WORKER_NAME="generic-worker",
        ),
    ):
        listed = await owners(url)

    assert {"alias-model:1b": "alias-worker", "generic-model:1b": "generic-worker"} == listed


# --- a whole pool, through the official clients ---------------------------------------------


@pytest.fixture
async def pool_url() -> AsyncIterator[str]:
    """``serve`` with two ``work`` processes: one on a fake Ollama, one on the demo backend."""
    async with (
        serve_app(create_fake_ollama_app(models=["llama3:8b"])) as ollama_url,
        running_server() as (_, url),
        running_worker(url, "--backend", "ollama", "--backend-url", ollama_url),
        running_worker(url, "--backend", "demo"),
    ):
        yield url


def openai_client(url: str, api_key: str = API_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=30)


def ollama_client(url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


async def test_openai_client_chat(pool_url: str) -> None:
    """The openai SDK gets a chat completion, whole and streamed with usage, through the pool."""
    messages: Any = [{"role": "user", "content": "hello pool"}]
    async with openai_client(pool_url) as client:
        whole = await client.chat.completions.create(model="llama3:8b", messages=messages)
        stream = await client.chat.completions.create(
            model="llama3:8b",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert "echo: hello pool" == whole.choices[0].message.content
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "echo: hello pool" == deltas
    usage = chunks[-1].usage
    assert usage is not None
    assert (2, 3) == (usage.prompt_tokens, usage.completion_tokens)


async def test_openai_client_completions_embeddings_and_models(pool_url: str) -> None:
    """The openai SDK's completions, embeddings and model list work through the pool."""
    async with openai_client(pool_url) as client:
        completion = await client.completions.create(model="demo", prompt="complete me")
        embeddings = await client.embeddings.create(model="llama3:8b", input=["one", "two"])
        models = [m.id async for m in client.models.list()]

    assert "echo: complete me" == completion.choices[0].text
    assert [8, 8] == [len(e.embedding) for e in embeddings.data]
    assert ["demo", "llama3:8b"] == sorted(models)


async def test_openai_client_errors(pool_url: str) -> None:
    """A wrong API key raises AuthenticationError; an unknown model raises NotFoundError."""
    messages: Any = [{"role": "user", "content": "hi"}]
    async with openai_client(pool_url, api_key="wrong-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="demo", messages=messages)
    async with openai_client(pool_url) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", messages=messages)


async def test_ollama_client_chat_and_generate(pool_url: str) -> None:
    """The ollama SDK chats and generates, whole and streamed, through the pool."""
    messages = [{"role": "user", "content": "hi ollama"}]
    async with ollama_client(pool_url) as client:
        chat = await client.chat(model="llama3:8b", messages=messages, stream=False)
        chat_parts = [
            part.message.content or ""
            async for part in await client.chat(model="demo", messages=messages, stream=True)
        ]
        generated = await client.generate(model="demo", prompt="say this", stream=False)
        generated_parts = [
            part.response
            async for part in await client.generate(
                model="llama3:8b", prompt="say this", stream=True
            )
        ]

    assert "echo: hi ollama" == chat.message.content
    assert "echo: hi ollama" == "".join(chat_parts)
    assert 1 < len(chat_parts)
    assert "echo: say this" == generated.response
    assert "echo: say this" == "".join(generated_parts)


async def test_ollama_client_embed_and_list(pool_url: str) -> None:
    """The ollama SDK's embed and model list work through the pool."""
    async with ollama_client(pool_url) as client:
        embedded = await client.embed(model="llama3:8b", input=["a", "b", "c"])
        listed = await client.list()

    assert [8, 8, 8] == [len(e) for e in embedded.embeddings]
    assert ["demo", "llama3:8b"] == sorted(m.model or "" for m in listed.models)


# --- the demo -------------------------------------------------------------------------------


async def test_demo_prints_a_curl_line_that_works() -> None:
    """``serve --demo`` prints its URL, its API key and a curl line that gets an echo answer."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    async with cli_process("serve", "--demo", "--port", "0") as demo:
        listening = await demo.event("server_listening")
        await demo.wait_until(
            lambda: any(line.strip().startswith("curl ") for line in demo.stdout_lines),
            what="the curl line",
        )
        curl_line = next(line for line in demo.stdout_lines if line.strip().startswith("curl "))
        curl = await asyncio.create_subprocess_shell(
            curl_line.strip(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await asyncio.wait_for(curl.communicate(), 30)

    key_line = next(line for line in demo.stdout_lines if line.startswith("API key: "))
    api_key = key_line.removeprefix("API key: ").strip()
    assert 0 == curl.returncode, err
    assert listening["url"] in demo.stdout_lines[0]
    assert f"Bearer {api_key}" in curl_line
    assert "echo: Hello, pool!" == json.loads(out)["choices"][0]["message"]["content"]


async def test_serve_runs_on_uvloop_when_it_is_installed() -> None:
    """``llamapool[fast]`` brings uvloop, and every process runs on it; without it, on
    asyncio's own loop (the in-process tests run there, so both loops are tested)."""
    expected = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    async with running_server() as (server, _):
        listening = await server.event("server_listening")

    assert expected == listening["loop"]


# --- signals --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_serve_cleanly(sig: signal.Signals) -> None:
    """SIGINT and SIGTERM stop ``serve`` cleanly: it logs its stop, exits 0 (or by the signal),
    and prints no traceback."""
    async with running_server() as (server, _):
        code = await server.stop(sig)

    assert code in (0, -sig)
    assert "Traceback" not in server.stderr
    assert "server_stopped" in [e.get("event") for e in json_lines(server.stderr)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_work_cleanly(sig: signal.Signals) -> None:
    """SIGINT and SIGTERM stop a connected ``work`` with exit 0 (or by the signal) and no
    traceback, and the server sees it leave."""
    async with (
        running_server() as (server, url),
        running_worker(url, "--backend", "demo") as worker,
    ):
        code = await worker.stop(sig)
        await server.event("worker_disconnected")

    assert code in (0, -sig)
    assert "Traceback" not in worker.stderr
    assert [] == other_lines(worker.stderr)
