"""The report of ``bench_cluster.py`` as tables: the hop against one server (with the
differences), and two server processes against one (with the ratio)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import Any

from _deploy import REST
from _relay_report import dig, fmt
from _report import busy_warning

LABEL, CELL, DELTA = 38, 15, 10
SERVER = "server"

Getter = Callable[[dict[str, Any]], "float | None"]
#: Label, value, digits, and how a column compares with the first: ``ratio`` (rates),
#: ``diff`` (costs and delays) or not at all ("").
Row = tuple[str, Getter, int, str]


def server_roles(row: dict[str, Any]) -> dict[str, float]:
    """CPU seconds of each server process of the setup (a supervisor's are its own row)."""
    return {k: v for k, v in sorted(row["cpu_s"].items()) if k.startswith(SERVER)}


def per(role: str, unit: float, by: str) -> Getter:
    """CPU of ``role`` (``server``: every server process) per answered request or chunk."""

    def get(row: dict[str, Any]) -> float | None:
        count = row["requests_ok"] if by == "request" else row["chunks"]
        if not count:
            return None
        seconds = sum(server_roles(row).values()) if role == SERVER else row["cpu_s"].get(role)
        return None if seconds is None else seconds * unit / count

    return get


def busy(role: str) -> Getter:
    def get(row: dict[str, Any]) -> float | None:
        if role == SERVER:
            elapsed = row["elapsed_s"]
            return sum(server_roles(row).values()) / elapsed * 100 if elapsed else None
        value = row["cpu_busy"].get(role)
        return None if value is None else value * 100

    return get


def crossed_share(row: dict[str, Any]) -> float | None:
    requests = row["cluster_requests"]
    return requests["crossed"] / requests["requests"] * 100 if requests["requests"] else None


ROWS: list[Row] = [
    ("requests/s", dig("requests_per_s"), 1, "ratio"),
    ("chunks/s", dig("chunks_per_s"), 0, "ratio"),
    ("first byte p50 (ms)", dig("ttfb_ms", "p50"), 3, "diff"),
    ("first byte p99 (ms)", dig("ttfb_ms", "p99"), 3, "diff"),
    ("last byte p50 (ms)", dig("latency_ms", "p50"), 3, "diff"),
    ("last byte p99 (ms)", dig("latency_ms", "p99"), 3, "diff"),
    ("chunk delay p50 (ms)", dig("chunk_delay_ms", "p50"), 3, "diff"),
    ("chunk delay p99 (ms)", dig("chunk_delay_ms", "p99"), 3, "diff"),
    ("server CPU per request (ms)", per(SERVER, 1e3, "request"), 3, "diff"),
    ("server CPU per chunk (us)", per(SERVER, 1e6, "chunk"), 1, "diff"),
    ("Redis CPU per request (us)", per("redis", 1e6, "request"), 1, "diff"),
    ("busy (% of a core): servers", busy(SERVER), 0, ""),
    ("  simulated workers", busy("workers"), 0, ""),
    ("  load generator", busy("load generator"), 0, ""),
    ("  Redis", busy("redis"), 0, ""),
    ("  rest of the machine", busy(REST), 0, ""),
    ("requests that crossed (%)", crossed_share, 0, ""),
]


def each_server(unit: float, by: str) -> Callable[[dict[str, Any]], str]:
    """Each server process's CPU per request (``by``: ``request``) or per second of the
    phase (``second``: busy %), as ``A 1.23 + B 0.45``."""

    def text(row: dict[str, Any]) -> str:
        roles = server_roles(row)
        count = row["requests_ok"] if by == "request" else row["elapsed_s"]
        if not count:
            return "n/a"
        named = {k.removeprefix(SERVER).strip(): v for k, v in roles.items()}
        if len(named) > 1:
            named.pop("", None)  # a supervisor: counted in the total, not a process that serves
        digits = 2 if by == "request" else 0
        return " + ".join(f"{k} {v * unit / count:.{digits}f}".strip() for k, v in named.items())

    return text


def header(env: dict[str, Any]) -> list[str]:
    return [
        f"Python {env['python']}, aiohttp {env['aiohttp']}, llamapool {env['llamapool']} "
        f"from {env['llamapool_source']}, Redis {env.get('redis') or '?'}",
        f"{env['platform']}, {env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable)",
    ]


def render(report: dict[str, Any]) -> str:
    params, env = report["parameters"], report["environment"]
    lines = header(env)
    answers = (
        f"{params['chunks']} events of {params['chunk_bytes']} bytes per answer, sent back to "
        f"back ({params['protocol']} frames); server log level {params['server_log_level']}"
    )
    if "hop" in report:
        lines += ["", *hop_table(report["hop"], params, answers)]
    if "processes" in report:
        lines += ["", *processes_table(report["processes"], params, answers, env["cores"])]
    rows = [r for part in ("hop", "processes") if part in report for r in report[part]["rows"]]
    lines += busy_warning(rows, lambda r: f"{r['setup']} c={r['concurrency']}")
    for problem in report["stop_problems"]:
        lines += ["", textwrap.fill(f"WARNING: at the end, {problem}.", 100)]
    lines += ["", f"({report['seconds']} s)"]
    return "\n".join(lines)


def hop_table(part: dict[str, Any], params: dict[str, Any], answers: str) -> list[str]:
    setups = part["setups"]
    base = setups[0]
    lines = [
        "The extra hop. one server: no cluster; hop: two servers in a cluster, the workers on B,",
        "the clients on A (every request crosses); cluster, local: two servers in a cluster, the",
        "workers and the clients on A (no crossing). Δ: the difference from one server (x: ratio).",
        f"{params['workers']} workers x max_concurrency {params['max_concurrency']}; {answers}",
        f"{params['rounds']} rounds of {params['requests']} requests per setup and concurrency "
        f"after {params['warmup']} warm-up; the setups take turns",
    ]
    head = f"{'':{LABEL}}"
    for setup in setups:
        head += f"{setup:>{CELL}}" + (f"{'Δ':>{DELTA}}" if setup != base else "")
    for c in params["concurrency"]:
        rows = {r["setup"]: r for r in part["rows"] if r["concurrency"] == c}
        lines += ["", f"concurrency {c}", head]
        for label, get, digits, compare in ROWS:
            values = {s: get(rows[s]) for s in setups}
            line = f"  {label:<{LABEL - 2}}"
            for setup in setups:
                line += f"{fmt(values[setup], digits):>{CELL}}"
                if setup != base:
                    line += f"{delta(values[setup], values[base], digits, compare):>{DELTA}}"
            lines.append(line)
        lines += text_rows(
            rows,
            setups,
            [("server CPU per request, each (ms)", each_server(1e3, "request"))],
            gap=lambda s: DELTA if s != base else 0,
        )
        lines += errors(rows)
    return lines


def processes_table(
    part: dict[str, Any], params: dict[str, Any], answers: str, cores: int | None
) -> list[str]:
    setups = part["setups"]
    rows = {r["setup"]: r for r in part["rows"]}
    one, two = setups[0], setups[-1]
    ratio_head = f"{two[0]}/{one[0]}"
    lines = [
        "One server process or two: serve --processes N on one port (SO_REUSEPORT), in a "
        "cluster either way.",
        f"{params['proc_workers']} workers x max_concurrency {params['proc_max_concurrency']} "
        f"and {params['proc_concurrency']} client connections, all through the shared port;",
        f"{answers}",
        f"{params['rounds']} rounds of {params['proc_requests']} requests per setup after "
        f"{params['warmup']} warm-up; the setups take turns",
        "",
        f"{'':{LABEL}}" + "".join(f"{s:>{CELL}}" for s in setups) + f"{ratio_head:>{DELTA}}",
    ]
    for label, get, digits, compare in ROWS:
        values = {s: get(rows[s]) for s in setups}
        line = f"  {label:<{LABEL - 2}}"
        line += "".join(f"{fmt(values[s], digits):>{CELL}}" for s in setups)
        first, second = values[one], values[two]
        ratio = second / first if compare and first and second is not None else None
        lines.append(line + (f"{fmt(ratio, 2):>{DELTA}}" if ratio is not None else ""))
    lines += text_rows(
        rows,
        setups,
        [
            ("each server process busy (%)", each_server(100, "second")),
            ("server CPU per request, each (ms)", each_server(1e3, "request")),
            ("workers per process", lambda r: " + ".join(map(str, r["workers_per_process"]))),
            (
                "requests reaching each process",
                lambda r: " + ".join(map(str, r["cluster_requests"]["per_server"])),
            ),
        ],
        gap=lambda s: 0,
    )
    lines += errors(rows)
    caveat = (
        "Caveat: the load generator (this process) and the simulated workers share the "
        f"machine's {cores or 'few'} cores with the servers (their busy % above), so a second "
        "server process competes with them: the ratio is what a second process gives on this "
        "machine under this load, not what it gives on a host whose cores serve the server "
        "alone. A request that reaches a process other than its worker's crosses to it "
        "(requests that crossed), at the cost the hop table shows."
    )
    return [*lines, "", *textwrap.wrap(caveat, 100)]


def text_rows(
    rows: dict[str, dict[str, Any]],
    setups: list[str],
    spec: list[tuple[str, Callable[[dict[str, Any]], str]]],
    *,
    gap: Callable[[str], int],
) -> list[str]:
    """Rows whose cells are text, wider than a column when they must be."""
    out = []
    for label, text in spec:
        line = f"  {label:<{LABEL - 2}}"
        for setup in setups:
            line += f" {text(rows[setup]):>{CELL - 1}}" + " " * gap(setup)
        out.append(line.rstrip())
    return out


def errors(rows: dict[str, dict[str, Any]]) -> list[str]:
    out = [f"  errors, {s}: {r['errors']}" for s, r in rows.items() if r["errors"]]
    warm = [f"  warm-up errors, {s}: {r['warmup_errors']}" for s, r in rows.items()]
    return out + [w for w, r in zip(warm, rows.values(), strict=True) if r["warmup_errors"]]


def delta(value: float | None, base: float | None, digits: int, compare: str) -> str:
    if value is None or base is None or not compare:
        return ""
    if compare == "ratio":
        return f"{value / base:.2f}x" if base else ""
    return f"{value - base:+,.{digits}f}"
