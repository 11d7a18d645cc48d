"""Settings from flags, environment variables, env files and the worker's YAML file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import click
import pytest

from llamapool import cli, config_files
from llamapool.cli import ServeSettings, WorkSettings, resolve
from llamapool.config import ServeConfig, WorkConfig
from llamapool.config_files import Entry, parse_env_file, parse_yaml
from llamapool.errors import ConfigError

#: Every environment variable either command reads.
CLI_ENV_VARS = sorted(
    {
        name
        for command in (cli.serve, cli.work)
        for param in command.params
        if isinstance(param, click.Option) and param.envvar
        for name in ([param.envvar] if isinstance(param.envvar, str) else param.envvar)
    }
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No llamapool setting of the developer's environment leaks into a test."""
    for name in CLI_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def serve_settings(*args: str) -> ServeSettings:
    settings = resolve(["serve", *args])
    assert isinstance(settings, ServeSettings)
    return settings


def work_settings(*args: str) -> WorkSettings:
    settings = resolve(["work", *args])
    assert isinstance(settings, WorkSettings)
    return settings


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m llamapool ARGS`` with only ``env`` as llamapool settings."""
    clean = {k: v for k, v in os.environ.items() if k not in CLI_ENV_VARS}
    return subprocess.run(
        [sys.executable, "-m", "llamapool", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command printed; fails if it printed more or exited 0."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 == result.returncode, result.stderr
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("llamapool: error: ")
    return lines[0]


# --- env files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("PORT=9000\n", {"PORT": "9000"}, id="plain"),
        pytest.param("export PORT=9000\n", {"PORT": "9000"}, id="export"),
        pytest.param("  PORT = 9000  \r\n", {"PORT": "9000"}, id="spaces-crlf"),
        pytest.param("A='x # y $z \\n'\n", {"A": "x # y $z \\n"}, id="single-quotes-literal"),
        pytest.param('A="say \\"hi\\" \\\\ \\$x \\q"\n', {"A": 'say "hi" \\ $x \\q'}, id="double"),
        pytest.param('A="  padded  "\n', {"A": "  padded  "}, id="quoted-spaces-kept"),
        pytest.param("A=one two\n", {"A": "one two"}, id="inner-space"),
        pytest.param("A=va\\\nlue\n", {"A": "value"}, id="continuation"),
        pytest.param("A=x # not a comment\n", {"A": "x # not a comment"}, id="inline-hash"),
        pytest.param("A=\n", {"A": ""}, id="empty"),
        pytest.param("A=1\nA=2\n", {"A": "2"}, id="last-wins"),
        pytest.param("A=pre'quoted'post\n", {"A": "prequotedpost"}, id="concatenated"),
        pytest.param("A=no-newline-at-end", {"A": "no-newline-at-end"}, id="no-final-newline"),
    ],
)
def test_env_file_values(text: str, expected: dict[str, str]) -> None:
    """Env file values are read the way systemd's EnvironmentFile= reads them."""
    assert expected == {e.key: e.value for e in parse_env_file(text, source="f")}


def test_env_file_skips_comments_and_blank_lines_and_keeps_line_numbers() -> None:
    """``#`` and ``;`` lines and blank lines are skipped; each entry knows its line."""
    text = "# a comment\n\n; another\n   # indented\nPORT=1\nB='two\nlines'\nC=3\n"

    assert [
        Entry("PORT", "1", 5),
        Entry("B", "two\nlines", 6),
        Entry("C", "3", 8),
    ] == parse_env_file(text, source="f")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("PORT=1\nPORT 80\n", "server.env:2: expected KEY=value", id="no-equals"),
        pytest.param("\n\nA='open\n", "server.env:3: unterminated single quote", id="single"),
        pytest.param('A="open\nB=1\n', "server.env:1: unterminated double quote", id="double"),
        pytest.param("=value\n", "server.env:1: expected KEY=value", id="no-key"),
    ],
)
def test_malformed_env_file_names_file_and_line(text: str, message: str) -> None:
    """A malformed env file is one error naming the file and the line."""
    with pytest.raises(ConfigError) as exc_info:
        parse_env_file(text, source="server.env")

    assert message == str(exc_info.value)


def test_env_file_sets_serve_settings(tmp_path: Path) -> None:
    """``serve --env-file`` reads the Go version's variable names into the server config."""
    env_file = write(
        tmp_path / "server.env",
        "API_KEY=k1,k2\nWORKER_KEY='w k'\nPORT=9000\nMETRICS_PORT=9090\nWS_PATH=/ws\n"
        "REQUEST_TIMEOUT=90\nIDLE_TIMEOUT=1m30s\nQUEUE_SIZE=0\nQUEUE_TIMEOUT=500ms\n"
        "DRAIN_TIMEOUT=-1\nMAX_BODY_SIZE=1MB\nLOG_LEVEL=debug\nLOG_FORMAT=json\n",
    )

    settings = serve_settings("--env-file", env_file)

    cfg = settings.config
    assert (("k1", "k2"), ("w k",)) == (cfg.api_keys, cfg.worker_keys)
    assert (9000, 9090, "/ws") == (cfg.port, cfg.metrics_port, cfg.ws_path)
    assert (90.0, 90.0, 0, 0.5, -1.0) == (
        cfg.request_timeout,
        cfg.idle_timeout,
        cfg.queue_size,
        cfg.queue_timeout,
        cfg.drain_timeout,
    )
    assert 1_000_000 == cfg.max_body_size
    assert ("debug", "json") == (settings.log.level, settings.log.format)


def test_empty_value_in_a_file_leaves_the_default(tmp_path: Path) -> None:
    """``PORT=`` in a file counts as unset, as an empty environment variable does."""
    env_file = write(tmp_path / "server.env", "PORT=\nWS_PATH=\n")

    cfg = serve_settings("--env-file", env_file).config

    assert (8080, "/workers/connect") == (cfg.port, cfg.ws_path)


# --- precedence -----------------------------------------------------------------------------


def test_serve_precedence_flag_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For each setting the flag wins over the variable, which wins over the env file."""
    env_file = write(
        tmp_path / "server.env",
        "PORT=1001\nREQUEST_TIMEOUT=11\nAPI_KEY=file-key\nQUEUE_SIZE=7\n",
    )
    monkeypatch.setenv("ENV_FILE", env_file)
    monkeypatch.setenv("PORT", "2002")
    monkeypatch.setenv("REQUEST_TIMEOUT", "22")

    cfg = serve_settings("--port", "3003").config

    # PORT: flag; REQUEST_TIMEOUT: environment; API_KEY, QUEUE_SIZE: file; WS_PATH: default.
    assert (3003, 22.0, ("file-key",), 7, "/workers/connect") == (
        cfg.port,
        cfg.request_timeout,
        cfg.api_keys,
        cfg.queue_size,
        cfg.ws_path,
    )


def test_work_precedence_flag_environment_env_file_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker: flag, then environment, then ``--env-file``, then ``--config`` YAML, then default."""
    config = write(
        tmp_path / "worker.yaml",
        "server_url: ws://yaml:1/w\nmax_concurrency: 3\nworker_name: from-yaml\n"
        "drain_timeout: 5s\nprobe_interval: 7s\n",
    )
    env_file = write(
        tmp_path / "worker.env", "MAX_CONCURRENCY=4\nWORKER_NAME=from-env-file\nDRAIN_TIMEOUT=6s\n"
    )
    monkeypatch.setenv("WORKER_NAME", "from-environment")
    monkeypatch.setenv("DRAIN_TIMEOUT", "8s")

    cfg = work_settings("--config", config, "--env-file", env_file, "--drain-timeout", "9s").config

    assert (("ws://yaml:1/w",), 4, "from-environment", 9.0, 7.0, 30.0) == (
        cfg.server_url,
        cfg.max_concurrency,
        cfg.worker_name,
        cfg.drain_timeout,
        cfg.probe_interval,
        cfg.reconnect_max,
    )


def test_precedence_in_a_real_process(tmp_path: Path) -> None:
    """In ``python -m llamapool work``, the backend named by flag, variable or file is the one
    the worker tries to load (and reports as missing)."""
    config = write(tmp_path / "worker.yaml", "backend: from-yaml\n")
    env_file = write(tmp_path / "worker.env", "BACKEND=from-env-file\n")
    files = ("--config", config, "--env-file", env_file)

    yaml_only = error_line(run_cli("work", "--config", config))
    env_file_wins = error_line(run_cli("work", *files))
    variable_wins = error_line(run_cli("work", *files, BACKEND="from-variable"))
    flag_wins = error_line(run_cli("work", *files, "--backend", "from-flag", BACKEND="x"))

    assert "from-yaml" in yaml_only
    assert "from-env-file" in env_file_wins
    assert "from-variable" in variable_wins
    assert "from-flag" in flag_wins


# --- the worker's YAML file -----------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["server_url", "SERVER_URL", "server-url", "serverurl", "ServerURL"]
)
def test_yaml_key_spellings(tmp_path: Path, key: str) -> None:
    """A YAML key may be the option name, the env var name or Go's field name, in any case."""
    config = write(tmp_path / "worker.yaml", f"{key}: wss://pool.example/workers/connect\n")

    cfg = work_settings("--config", config).config

    assert ("wss://pool.example/workers/connect",) == cfg.server_url


def test_yaml_file_sets_worker_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CONFIG_FILE`` names a YAML file whose values reach every worker setting."""
    config = write(
        tmp_path / "worker.yaml",
        "# a worker\n"
        "server_url: wss://pool.example/workers/connect\n"
        "worker_key: 'secret'\n"
        "backend: vllm\n"
        "ollama_base_url: http://gpu:8000\n"
        "max_concurrency: 8\n"
        "worker_id: w-1\n"
        "worker_name: Alpha\n"
        "status_addr: 127.0.0.1:4555\n"
        "metrics_addr: ':9100'\n"
        "drain_timeout: 0\n"
        "probe_interval: 1m\n"
        "reconnect_max: 10\n"
        "log_dir: " + str(tmp_path / "logs") + "\n",
    )
    monkeypatch.setenv("CONFIG_FILE", config)

    settings = work_settings()

    cfg = settings.config
    assert (("wss://pool.example/workers/connect",), "secret", "vllm", "http://gpu:8000") == (
        cfg.server_url,
        cfg.worker_key,
        cfg.backend,
        cfg.backend_url,
    )
    assert (8, "w-1", "Alpha", "127.0.0.1:4555", ":9100") == (
        cfg.max_concurrency,
        cfg.worker_id,
        cfg.worker_name,
        cfg.status_addr,
        cfg.metrics_addr,
    )
    assert (0.0, 60.0, 10.0) == (cfg.drain_timeout, cfg.probe_interval, cfg.reconnect_max)
    assert tmp_path / "logs" == settings.log.dir


def test_empty_yaml_file_is_fine(tmp_path: Path) -> None:
    """An empty or comment-only YAML file sets nothing."""
    config = write(tmp_path / "worker.yaml", "# nothing yet\n")

    assert 2 == work_settings("--config", config).config.max_concurrency


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "backend: demo\nserver_url: [ws://a\n",
            "worker.yaml:3: invalid YAML",
            id="bad-yaml",
        ),
        pytest.param("- a\n- b\n", "worker.yaml:1: expected 'setting: value' lines", id="list"),
        pytest.param(
            "backend: demo\nbackend_url:\n  a: 1\n",
            "worker.yaml:2: backend_url: expected a single value",
            id="nested",
        ),
        pytest.param("1: x\n", "worker.yaml:1: a setting name must be text", id="number-key"),
    ],
)
def test_malformed_yaml_names_file_and_line(text: str, message: str) -> None:
    """A malformed YAML file is one error naming the file and the line."""
    with pytest.raises(ConfigError) as exc_info:
        parse_yaml(text, source="worker.yaml")

    assert str(exc_info.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "backend: demo\nworker_kee: x\n",
            "worker.yaml:2: unknown setting 'worker_kee' (did you mean WORKER_KEY?)",
            id="unknown-key",
        ),
        pytest.param(
            "backend: demo\n\nmax_concurrency: many\n",
            "worker.yaml:3: max_concurrency: 'many' is not a valid integer",
            id="not-an-int",
        ),
        pytest.param(
            "max_concurrency: 0\n",
            "worker.yaml:1: max_concurrency: 0 is not in the range",
            id="out-of-range",
        ),
        pytest.param(
            "drain_timeout: soon\n",
            "worker.yaml:1: drain_timeout: not a duration: 'soon'",
            id="not-a-duration",
        ),
        pytest.param(
            "status_addr: localhost\n",
            "worker.yaml:1: status_addr: expected host:port",
            id="not-host-port",
        ),
        pytest.param("backend: yes\n", "worker.yaml:1: backend: expected a value", id="yes-no"),
        pytest.param(
            "config_file: other.yaml\n",
            "worker.yaml:1: config_file cannot be set in a file",
            id="config-in-file",
        ),
    ],
)
def test_bad_setting_in_yaml_is_one_line_naming_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    """Unknown keys and wrong values in the YAML file end ``work`` with one line, exit 1."""
    write(tmp_path / "worker.yaml", text)

    result = subprocess.run(
        [sys.executable, "-m", "llamapool", "work", "--config", "worker.yaml"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in CLI_ENV_VARS},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert error_line(result).startswith(f"llamapool: error: {message}"), result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "PORT=1\nPORT=eighty\n", ":2: PORT: 'eighty' is not a valid integer", id="int"
        ),
        pytest.param("PROT=1\n", ":1: unknown setting 'PROT' (did you mean PORT?)", id="typo"),
        pytest.param("SERVER_URL=ws://x\n", ":1: unknown setting 'SERVER_URL'", id="worker-only"),
        pytest.param("ENV_FILE=/x\n", ":1: ENV_FILE cannot be set in a file", id="env-file"),
        pytest.param("MAX_BODY_SIZE=huge\n", ":1: MAX_BODY_SIZE: not a size", id="size"),
        pytest.param("A='x\n", ":1: unterminated single quote", id="quote"),
    ],
)
def test_bad_env_file_is_one_line_naming_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    """A bad ``serve --env-file`` ends the process with one line naming file and line, exit 1."""
    env_file = write(tmp_path / "server.env", text)

    line = error_line(run_cli("serve", "--env-file", env_file))

    assert line.startswith(f"llamapool: error: {env_file}{message}"), line


@pytest.mark.parametrize("option", ["--config", "--env-file"])
def test_missing_explicit_file_is_an_error(tmp_path: Path, option: str) -> None:
    """A file named by ``--config`` or ``--env-file`` must exist."""
    missing = str(tmp_path / "nope")

    line = error_line(run_cli("work", option, missing))

    assert f"llamapool: error: {missing}: no such file" == line


# --- OS defaults ----------------------------------------------------------------------------


def test_default_paths_follow_the_go_worker() -> None:
    """macOS and Windows have a default config file and log folder; Linux has neither."""
    mac = {"HOME": "/Users/ada"}
    windows = {"ProgramData": "D:\\Data\\"}

    assert Path("/Users/ada/Library/Application Support/llamapool/worker.yaml") == (
        config_files.default_worker_config(platform="darwin", environ=mac)
    )
    assert Path("/Users/ada/Library/Logs/llamapool") == (
        config_files.default_worker_log_dir(platform="darwin", environ=mac)
    )
    assert Path("D:\\Data", "llamapool", "worker.yaml") == (
        config_files.default_worker_config(platform="win32", environ=windows)
    )
    assert Path("D:\\Data", "llamapool", "Logs") == (
        config_files.default_worker_log_dir(platform="win32", environ=windows)
    )
    assert (None, None) == (
        config_files.default_worker_config(platform="linux", environ={}),
        config_files.default_worker_log_dir(platform="linux", environ={}),
    )


def test_default_config_file_is_read_and_brings_the_default_log_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On macOS the worker reads ~/Library/Application Support/llamapool/worker.yaml when it
    exists, and then also logs to ~/Library/Logs/llamapool."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "Library" / "Application Support" / "llamapool" / "worker.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("worker_name: mac-mini\n", encoding="utf-8")

    settings = work_settings()

    assert "mac-mini" == settings.config.worker_name
    assert tmp_path / "Library" / "Logs" / "llamapool" == settings.log.dir


def test_missing_default_config_file_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a default worker.yaml the worker runs on its defaults and logs to stderr only."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))

    settings = work_settings()

    assert (2, None) == (settings.config.max_concurrency, settings.log.dir)


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16MiB", 16 * 1024 * 1024),
        ("1MB", 1_000_000),
        ("512KiB", 512 * 1024),
        ("2048", 2048),
        ("16m", 16 * 1024 * 1024),
        ("1.5 GiB", 3 * 512 * 1024 * 1024),
    ],
)
def test_max_body_size_units(text: str, expected: int) -> None:
    """``--max-body-size`` takes plain bytes or a unit, decimal (MB) or binary (MiB)."""
    assert expected == serve_settings("--max-body-size", text).config.max_body_size


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["serve", "--max-body-size", "0"], "--max-body-size"),
        (["serve", "--queue-size", "-1"], "--queue-size"),
        (["serve", "--request-timeout", "0"], "--request-timeout"),
        (["serve", "--queue-timeout", "-1"], "--queue-timeout"),
        (["work", "--metrics-addr", "9100"], "--metrics-addr"),
        (["work", "--status-addr", "host:99999"], "--status-addr"),
        (["work", "--drain-timeout", "-2"], "--drain-timeout"),
        (["work", "--probe-interval", "0s"], "--probe-interval"),
    ],
)
def test_bad_values_are_rejected(args: list[str], fragment: str) -> None:
    """Out-of-range sizes, durations and addresses are usage errors naming the option."""
    with pytest.raises(click.BadParameter) as exc_info:
        resolve(args)

    assert fragment in exc_info.value.format_message()


def test_defaults_match_the_config_classes() -> None:
    """With nothing set, the CLI builds the config classes' own defaults."""
    serve = serve_settings()
    work = work_settings()

    assert ("0.0.0.0", 8080, None, 16 * 1024 * 1024, 300.0) == (
        serve.config.host,
        serve.config.port,
        serve.config.metrics_port,
        serve.config.max_body_size,
        serve.config.request_timeout,
    )
    assert (60.0, 20.0, "", "") == (
        work.config.drain_timeout,
        work.config.probe_interval,
        work.config.status_addr,
        work.config.metrics_addr,
    )
    assert ("info", "auto", None) == (serve.log.level, serve.log.format, serve.log.dir)


@pytest.mark.parametrize("command", [cli.serve, cli.work], ids=["serve", "work"])
def test_help_shows_the_variable_of_every_option(command: click.Command) -> None:
    """Every option but ``--demo`` and ``--help`` has an environment variable, shown in help."""
    help_text = " ".join(command.get_help(click.Context(command, info_name="x")).split())
    missing = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in ("demo", "help"):
            continue
        envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        if not envvars or not param.show_envvar or envvars[0] not in help_text:
            missing.append(param.name)

    assert [] == missing


@pytest.mark.parametrize(
    ("command", "config_class", "renamed"),
    [
        (
            cli.serve,
            ServeConfig,
            {"api_keys": "api_key", "worker_keys": "worker_key", "cluster_keys": "cluster_key"},
        ),
        (cli.work, WorkConfig, {}),
    ],
    ids=["serve", "work"],
)
def test_every_config_field_has_an_option(
    command: click.Command, config_class: type, renamed: dict[str, str]
) -> None:
    """Each field of ServeConfig and WorkConfig can be set from the command line."""
    options = {p.name for p in command.params}

    assert [] == [f for f in attrs.fields_dict(config_class) if renamed.get(f, f) not in options]


def test_flags_can_be_set_from_files(tmp_path: Path) -> None:
    """On/off settings read ``true`` from an env file and YAML's ``true`` from the YAML file."""
    env_file = write(tmp_path / "server.env", "METRICS_REQUIRE_KEY=true\n")
    config = write(tmp_path / "worker.yaml", "tls_insecure: true\n")

    assert (True, True) == (
        serve_settings("--env-file", env_file).config.metrics_require_key,
        work_settings("--config", config).config.tls_insecure,
    )
