"""The report of ``bench_relay.py`` as a table: one column per configuration, Go first, and
the Python columns divided by Go's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from _deploy import REST
from _report import busy_warning

LABEL, CELL, RATIO = 40, 15, 7

Getter = Callable[[dict[str, Any]], "float | None"]


def dig(*keys: str) -> Getter:
    def get(row: dict[str, Any]) -> float | None:
        value: Any = row
        for key in keys:
            if not isinstance(value, dict) or value.get(key) is None:
                return None
            value = value[key]
        return float(value)

    return get


def busy(role: str) -> Getter:
    def get(row: dict[str, Any]) -> float | None:
        value = row.get("cpu_busy", {}).get(role)
        return None if value is None else value * 100

    return get


#: The server's own clock (server/pauses.py): a bucket's upper bound, so "at most".
PAUSE_ROWS: list[tuple[str, Getter, int]] = [
    ("server stalls over 20 ms", dig("pauses", "stalls_over_20ms"), 0),
    ("longest server stall (ms, at most)", dig("pauses", "longest_stall_ms"), 0),
    ("GC pauses over 20 ms", dig("pauses", "gcs_over_20ms"), 0),
    ("longest GC pause (ms, at most)", dig("pauses", "longest_gc_ms"), 0),
]
STREAM_ROWS: list[tuple[str, Getter, int]] = [
    ("chunks relayed per second", dig("chunks_per_s"), 0),
    ("relay delay p50 (ms)", dig("delay", "p50_ms"), 1),
    ("relay delay p99 (ms)", dig("delay", "p99_ms"), 1),
    ("relay delay max (ms)", dig("delay", "max_ms"), 1),
    ("server CPU per chunk (us)", dig("server_cpu_us_per_chunk"), 1),
    *PAUSE_ROWS,
    ("server busy (% of a core)", busy("server"), 0),
    ("sim. workers busy (%)", busy("workers"), 0),
    ("load generator busy (%)", busy("load generator"), 0),
    ("load generator's longest stall (ms)", dig("load_generator_stall_ms"), 1),
    ("rest of the machine busy (%)", busy(REST), 0),
    ("server RSS, workers idle (MiB)", dig("rss_mib", "idle_workers"), 1),
    ("server RSS, streams open (MiB)", dig("rss_mib", "streams_open"), 1),
    ("memory per open stream (KiB)", dig("kib_per_stream"), 1),
    ("seconds to open every stream", dig("opened_in_s"), 1),
    ("open (to headers) p99 (ms)", dig("open_p99_ms"), 1),
]
BURST_ROWS: list[tuple[str, Getter, int]] = [
    ("relay delay p99 before the burst (ms)", dig("delay_before_burst", "p99_ms"), 1),
    ("relay delay p99, second after (ms)", dig("delay_burst_second", "p99_ms"), 1),
    ("relay delay max, second after (ms)", dig("delay_burst_second", "max_ms"), 1),
    ("relay delay p99, whole window (ms)", dig("delay", "p99_ms"), 1),
    ("longest stall to the second after (ms)", dig("pauses_to_burst_end", "longest_stall_ms"), 0),
    ("load gen. stall, second after (ms)", dig("load_generator_stall_burst_ms"), 1),
    *PAUSE_ROWS,
    ("chunks relayed per second", dig("chunks_per_s"), 0),
    ("server CPU per chunk (us)", dig("server_cpu_us_per_chunk"), 1),
]
REQUEST_ROWS: list[tuple[str, Getter, int]] = [
    ("server CPU per request (ms)", dig("server_cpu_ms_per_request"), 3),
    ("requests per second", dig("requests_per_s"), 0),
    ("latency p50 (ms)", dig("latency_ms", "p50"), 2),
    ("latency p99 (ms)", dig("latency_ms", "p99"), 2),
    ("latency max (ms)", dig("latency_ms", "max"), 1),
    ("server busy (% of a core)", busy("server"), 0),
    ("rest of the machine busy (%)", busy(REST), 0),
    ("server RSS, no workers (MiB)", dig("rss_mib", "no_workers"), 1),
    ("server RSS, workers idle (MiB)", dig("rss_mib", "idle_workers"), 1),
    ("memory per idle worker (KiB)", dig("kib_per_worker"), 1),
    ("first byte c=1 p50 (ms)", dig("ttfb_c1", "pool_p50_ms"), 3),
    ("first byte c=1, direct p50 (ms)", dig("ttfb_c1", "direct_p50_ms"), 3),
    ("first byte added at c=1 p50 (ms)", dig("ttfb_c1", "added_p50_ms"), 3),
]


def render(report: dict[str, Any]) -> str:
    env, results = report["environment"], report["results"]
    lines = [
        f"Python {env['python']}, aiohttp {env['aiohttp']}, llamapool {env['llamapool']} "
        f"from {env['llamapool_source']}",
        f"Go server: {env.get('go_server') or 'not given (--go-server)'}",
        f"{env['platform']}, {env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable)",
    ]
    configs = list(dict.fromkeys(r["config"] for r in results))
    go = "go v1" if "go v1" in configs else None
    header = f"{'':{LABEL}}"
    for config in configs:
        header += f"{config:>{CELL}}"
        if go and config != go:
            header += f"{'/go':>{RATIO}}"
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["scenario"], title(row)), {})[row["config"]] = row
    for (scenario, heading), rows in groups.items():
        table = {"stream": STREAM_ROWS, "burst": BURST_ROWS, "requests": REQUEST_ROWS}[scenario]
        lines += ["", heading, header]
        for label, get, digits in table:
            values = {c: get(r) for c, r in rows.items()}
            if all(v is None for v in values.values()):
                continue
            line = f"  {label:<{LABEL - 2}}"
            for config in configs:
                line += f"{fmt(values.get(config), digits):>{CELL}}"
                if go and config != go:
                    line += f"{fmt(ratio(values.get(config), values.get(go)), 2):>{RATIO}}"
            lines.append(line)
        errors = {c: r["errors"] for c, r in rows.items() if r["errors"] or r.get("unfinished")}
        for config, errs in errors.items():
            unfinished = rows[config].get("unfinished")
            lines.append(
                f"  errors, {config}: {errs}" + (f", unfinished {unfinished}" * bool(unfinished))
            )
    lines += busy_warning(results, lambda r: f"{r['scenario']} {r['config']}")
    return "\n".join(lines)


def title(row: dict[str, Any]) -> str:
    if row["scenario"] == "requests":
        return (
            f"non-streamed requests answered at once: {row['workers']} workers, "
            f"concurrency {row['concurrency']}"
        )
    offered = f"{row['offered_per_s']:,.0f} chunks/s offered"
    if row["scenario"] == "burst":
        return (
            f"{row['streams']:,} streams plus {row['burst']:,} that end within 50 ms mid-window, "
            f"{row['rate']:g} chunks/s each, {row['workers']} workers"
        )
    return (
        f"{row['streams']:,} streams x {row['rate']:g} chunks/s ({offered}), "
        f"{row['workers']} workers, {row['window_s']:.0f} s window"
    )


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None
