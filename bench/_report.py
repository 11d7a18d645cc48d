"""The benchmark's report as a table for people."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable
from typing import Any

from _deploy import REST
from _load import KINDS

LABEL, CELL = 28, 14
#: Share of one core used outside the processes under test above which a phase is suspect.
BUSY_ELSEWHERE = 0.3
#: What takes part in a phase against the backend directly.
DIRECT_ROLES = ("load generator", "backend", REST)


def render(report: dict[str, Any]) -> str:
    env, params = report["environment"], report["parameters"]
    lines = [
        f"Python {env['python']}, aiohttp {env['aiohttp']} (C parser: {env['aiohttp_c_parser']}), "
        f"orjson {env['orjson']}, llamapool {env['llamapool']} from {env['llamapool_source']}",
        f"{env['platform']}, {env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable)",
        f"{params['workers']} worker(s) with max_concurrency {params['worker_max_concurrency']}, "
        f"server log level {params['server_log_level']}, {params['chunks']} tokens per answer, "
        f"{params['chunk_delay']} s between tokens",
        f"{params['rounds']} rounds of {params['requests']} requests per target and kind after "
        f"{params['warmup']} warm-up (requests/s: median round; latency: all rounds)",
    ]
    rows = {(r["concurrency"], r["kind"], r["target"]): r for r in report["results"]}
    for concurrency in params["concurrency"]:
        lines += [
            "",
            f"concurrency {concurrency}",
            f"{'':{LABEL}}{'direct':>{CELL}}{'pool':>{CELL}}{'pool/direct':>{CELL}}",
        ]
        for kind, stream in KINDS:
            direct, pooled = rows[(concurrency, kind, "direct")], rows[(concurrency, kind, "pool")]
            lines.append(kind + (f" ({params['chunks']} SSE events)" if stream else ""))
            metrics: list[tuple[str, str, str | None, int]] = [
                ("requests/s", "requests_per_s", None, 1)
            ]
            metrics += [(f"latency {p} (ms)", "latency_ms", p, 2) for p in ("p50", "p99")]
            if stream:
                metrics += [(f"first byte {p} (ms)", "ttfb_ms", p, 2) for p in ("p50", "p99")]
            for label, key, sub, digits in metrics:
                a, b = (r[key] if sub is None else r[key][sub] for r in (direct, pooled))
                lines.append(table_row(label, fmt(a, digits), fmt(b, digits), fmt(ratio(a, b), 2)))
            for label, key in (("errors", "errors"), ("warm-up errors", "warmup_errors")):
                a, b = (sum(r[key].values()) for r in (direct, pooled))
                if a or b or key == "errors":
                    detail = f"   direct {direct[key]}, pool {pooled[key]}" if a or b else ""
                    lines.append(table_row(label, str(a), str(b)) + detail)
            reads = (fmt(r["reads_per_answer"], 1) for r in (direct, pooled))
            lines.append(table_row("client reads per answer", *reads))
            lines.append("  CPU ms per request (busy %)")
            for role in ("load generator", "backend", "server", "worker", REST):
                cpu = (cpu_cell(r, role) for r in (direct, pooled))
                lines.append(table_row(role, *cpu, indent=4))
    lines += busy_warning(
        report["results"], lambda r: f"c={r['concurrency']} {r['kind']} {r['target']}"
    )
    return "\n".join(lines)


def busy_warning(
    rows: Iterable[dict[str, Any]], label: Callable[[dict[str, Any]], str]
) -> list[str]:
    """Lines warning that something else kept the machine busy during some of ``rows`` (each
    named by ``label``): their numbers measure that contention too. None if nothing did."""
    busy = [
        f"{label(r)} ({r['cpu_busy'][REST]:.0%})"
        for r in rows
        if r.get("cpu_busy", {}).get(REST, 0) > BUSY_ELSEWHERE
    ]
    if not busy:
        return []
    warning = (
        f"WARNING: something else kept this machine busy during {', '.join(busy)} "
        "(see 'rest of the machine'): those numbers measure the contention too."
    )
    return ["", textwrap.fill(warning, 100)]


def table_row(label: str, *cells: str, indent: int = 2) -> str:
    return " " * indent + f"{label:<{LABEL - indent}}" + "".join(f"{c:>{CELL}}" for c in cells)


def cpu_cell(row: dict[str, Any], role: str) -> str:
    if role not in row["cpu_ms_per_request"] or (
        row["target"] == "direct" and role not in DIRECT_ROLES
    ):
        return "-"
    return f"{row['cpu_ms_per_request'][role]:.3f} ({row['cpu_busy'][role] * 100:.0f}%)"


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(direct: float | None, pooled: float | None) -> float | None:
    return pooled / direct if direct and pooled is not None else None
