"""What a cluster costs: the hop between two servers, and a second server process on one host.

Everything runs on loopback, bounded in count and time: a ``redis-server`` per cluster
(``--save "" --appendonly no``, on a free port, stopped at the end), ``python -m llamapool
serve`` processes (the llamapool this interpreter imports), simulated workers speaking the wire
protocol in a process of their own (``_relay_workers.py``), and the clients in this process
(``_cluster_load.py``), which also reads ``/proc`` for the CPU time of every process.

- ``hop``: the same workers and clients in three setups, alive together and measured in turns:
  one server without a cluster; two clustered servers with the workers on B and the clients on
  A (every request crosses A to B); two clustered servers with workers and clients on A (the
  cluster's bookkeeping without a crossing). Requests per second, chunks per second, first
  byte and last byte, the delay of each chunk from the worker's send to the client's read,
  server and Redis CPU per request and per chunk, and the differences from one server.
- ``processes``: ``serve --processes 1`` against ``--processes 2`` on one port (both in a
  cluster), workers and many client connections through that port, streaming at full speed:
  requests and chunks per second, and their ratio.

Every answer is checked: its request's id on every event, every event in order and whole,
the done event's count, then ``[DONE]``.

    python bench/bench_cluster.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _cluster_deploy import Setup, free_ports, redis_binary, started
from _cluster_load import Phase, Target, phase, summarize
from _cluster_report import render
from bench_pool import environment
from bench_relay import raise_nofile

PARTS = ("hop", "processes")


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


async def run_phase(
    setup: Setup,
    args: argparse.Namespace,
    *,
    tag: str,
    requests: int,
    concurrency: int,
    timed: bool = True,
) -> Phase:
    """One measured phase; ``timed``: also read the worker's time in every event (the chunk
    delay), which costs the clients a little more."""
    setup.check_alive()
    return await phase(
        Target.of(setup.client_url, setup.headers),
        tag=tag,
        requests=requests,
        concurrency=concurrency,
        chunks=args.chunks,
        chunk_bytes=args.chunk_bytes,
        max_seconds=args.max_seconds,
        timeout=args.timeout,
        timed=timed,
        sample=setup.cpu,
    )


def crossed(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """Requests the clients sent to the setup's servers and how many crossed to another."""
    pairs = list(zip(before, after, strict=True))
    return {
        "requests": int(sum(a["requests"] - b["requests"] for b, a in pairs)),
        "crossed": int(sum(a["out"] - b["out"] for b, a in pairs)),
        "per_server": [int(a["requests"] - b["requests"]) for b, a in pairs],
    }


async def warm_up(setup: Setup, args: argparse.Namespace, *, concurrency: int) -> dict[str, int]:
    """Requests sent, checked and not measured (the servers' connections to each other open
    here); their errors."""
    out = await run_phase(setup, args, tag="warm", requests=args.warmup, concurrency=concurrency)
    return dict(out.errors)


# --- the extra hop ------------------------------------------------------------------------------


async def hop(args: argparse.Namespace, logs: Path, problems: list[str]) -> dict[str, Any]:
    common = {"log_level": args.server_log_level}
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(started("one server", logs, problems))
        crossing = await stack.enter_async_context(started("hop", logs, problems))
        local = await stack.enter_async_context(started("cluster, local", logs, problems))
        setups = [one, crossing, local]
        await crossing.start_redis()
        await local.start_redis()
        one.client_url = await one.start_server("server", cluster=False, **common)
        dial_b = await crossing.start_server("server B", cluster=True, **common)
        crossing.client_url = await crossing.start_server("server A", cluster=True, **common)
        local.client_url = await local.start_server("server A", cluster=True, **common)
        await local.start_server("server B", cluster=True, **common)
        for setup in setups:
            await setup.wait_ready(0, cluster=setup is not one)
        workers = {"count": args.workers, "max_concurrency": args.max_concurrency}
        workers |= {"protocol": args.protocol, "chunk_bytes": args.chunk_bytes}
        await one.start_workers(one.client_url, **workers)
        await crossing.start_workers(dial_b, **workers)
        await local.start_workers(local.client_url, **workers)
        for setup in setups:
            await setup.wait_ready(args.workers, cluster=setup is not one)
        progress(f"hop: {len(setups)} setups up, {args.workers} workers each")

        warm = {s.name: await warm_up(s, args, concurrency=max(args.concurrency)) for s in setups}
        before = {s.name: await s.counters() for s in setups}
        phases: dict[tuple[str, int], list[Phase]] = {}
        # The setups take turns, so a slow spell of a shared machine hurts them all.
        for r in range(args.rounds):
            for setup in setups:
                for c in args.concurrency:
                    out = await run_phase(
                        setup, args, tag=f"r{r}c{c}", requests=args.requests, concurrency=c
                    )
                    phases.setdefault((setup.name, c), []).append(out)
                    progress(
                        f"hop round {r + 1}/{args.rounds} {setup.name:<15} c={c:<3} "
                        f"{out.ok / out.elapsed:7.1f} req/s, errors {dict(out.errors) or 0}"
                    )
        rows = []
        for setup in setups:
            setup.check_alive()
            requests = crossed(before[setup.name], await setup.counters())
            for c in args.concurrency:
                row = {"setup": setup.name, "concurrency": c}
                row |= summarize(phases[setup.name, c])
                row |= {"cluster_requests": requests, "warmup_errors": warm[setup.name]}
                rows.append(row)
    return {"setups": [s.name for s in setups], "rows": rows}


# --- one process or two -------------------------------------------------------------------------


async def start_processes(setup: Setup, args: argparse.Namespace, count: int) -> None:
    await setup.start_redis()
    port, metrics = free_ports(1), free_ports(count)
    flags = ["--processes", str(count), "--port", str(port), "--metrics-port", str(metrics)]
    setup.client_url = await setup.start_server(
        "server", cluster=True, log_level=args.server_log_level, args=flags
    )
    setup.metrics_urls = [f"http://127.0.0.1:{metrics + i}/metrics" for i in range(count)]


async def balanced_workers(setup: Setup, args: argparse.Namespace) -> list[int]:
    """Start the workers through the shared port; while the kernel put more of them on one
    process than an even split would, start them again (at most ``--rebalance`` times)."""
    for attempt in range(args.rebalance + 1):
        await setup.start_workers(
            setup.client_url,
            count=args.proc_workers,
            max_concurrency=args.proc_max_concurrency,
            protocol=args.protocol,
            chunk_bytes=args.chunk_bytes,
        )
        await setup.wait_ready(args.proc_workers, cluster=True)
        split = await setup.workers_by_server()
        if split[0] - split[-1] <= 1 or attempt == args.rebalance:
            return split
        progress(f"{setup.name}: workers per process {split}, starting them again")
        await setup.stop_workers()
        await setup.wait_ready(0, cluster=True)
    raise AssertionError("unreachable")


async def processes(args: argparse.Namespace, logs: Path, problems: list[str]) -> dict[str, Any]:
    counts = (1, 2)
    async with contextlib.AsyncExitStack() as stack:
        setups = []
        for count in counts:
            name = f"{count} process" + ("es" if count > 1 else "")
            setups.append(await stack.enter_async_context(started(name, logs, problems)))
        for setup, count in zip(setups, counts, strict=True):
            await start_processes(setup, args, count)
        splits = {}
        for setup in setups:
            await setup.wait_ready(0, cluster=True)
            setup.find_children()
            splits[setup.name] = await balanced_workers(setup, args)
        progress(f"processes: workers per process {splits}")

        warm = {s.name: await warm_up(s, args, concurrency=args.proc_concurrency) for s in setups}
        before = {s.name: await s.counters() for s in setups}
        phases: dict[str, list[Phase]] = {}
        for r in range(args.rounds):
            for setup in setups:
                out = await run_phase(
                    setup,
                    args,
                    tag=f"r{r}",
                    requests=args.proc_requests,
                    concurrency=args.proc_concurrency,
                    timed=False,  # the clients as light as they can be
                )
                phases.setdefault(setup.name, []).append(out)
                progress(
                    f"processes round {r + 1}/{args.rounds} {setup.name:<11} "
                    f"{out.ok / out.elapsed:7.1f} req/s, errors {dict(out.errors) or 0}"
                )
        rows = []
        for setup in setups:
            setup.check_alive()
            row = {"setup": setup.name, "concurrency": args.proc_concurrency}
            row |= summarize(phases[setup.name])
            row["workers_per_process"] = splits[setup.name]
            row["cluster_requests"] = crossed(before[setup.name], await setup.counters())
            row["warmup_errors"] = warm[setup.name]
            rows.append(row)
    return {"setups": [s.name for s in setups], "rows": rows}


# --- the command --------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    problems: list[str] = []
    started_at = time.monotonic()
    if "hop" in args.parts:
        results["hop"] = await hop(args, logs, problems)
    if "processes" in args.parts:
        results["processes"] = await processes(args, logs, problems)
    results["seconds"] = round(time.monotonic() - started_at)
    results["stop_problems"] = problems
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    add = parser.add_argument
    add("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    add("--chunks", type=int, default=32, metavar="K", help="events per answer")
    add("--chunk-bytes", type=int, default=160, metavar="B", help="bytes per event")
    add("--protocol", choices=("v1", "binary"), default="binary", help="the workers' frames")
    add("--rounds", type=int, default=3, metavar="R", help="per setup and concurrency")
    add("--warmup", type=int, default=200, metavar="N", help="requests per setup, not measured")
    add("--max-seconds", type=float, default=60.0, metavar="S", help="cap per round")
    add("--timeout", type=float, default=30.0, metavar="S", help="per request")
    add(
        "--server-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the servers' --log-level (info, the default, logs a line per request)",
    )
    add("--json", action="store_true", help="print the report as JSON")
    add("--logs", metavar="DIR", help="keep the processes' logs in DIR (default: deleted)")
    hop_group = parser.add_argument_group("hop")
    add = hop_group.add_argument
    add("--workers", type=int, default=4, metavar="W", help="simulated workers")
    add("--max-concurrency", type=int, default=8, metavar="N", help="per worker")
    add("--concurrency", type=int, nargs="+", default=[1, 16], metavar="C", help="clients")
    add("--requests", type=int, default=1000, metavar="N", help="per round and concurrency")
    proc_group = parser.add_argument_group("processes")
    add = proc_group.add_argument
    add("--proc-workers", type=int, default=8, metavar="W", help="simulated workers")
    add("--proc-max-concurrency", type=int, default=16, metavar="N", help="per worker")
    add("--proc-concurrency", type=int, default=64, metavar="C", help="client connections")
    add("--proc-requests", type=int, default=5000, metavar="N", help="per round")
    add("--rebalance", type=int, default=8, metavar="N", help="worker restarts for an even split")
    args = parser.parse_args(argv)
    counts = [args.chunks, args.rounds, args.workers, args.max_concurrency, args.requests]
    counts += [args.proc_workers, args.proc_max_concurrency, args.proc_concurrency]
    if min(*counts, *args.concurrency, args.proc_requests) < 1:
        parser.error("counts must be at least 1")
    if args.chunk_bytes < 64:
        parser.error("--chunk-bytes must be at least 64 (an event's id, number and time)")
    if max(args.concurrency) > 1000 or args.proc_concurrency > 1000 or args.requests > 100_000:
        parser.error("at most 1,000 clients and 100,000 requests per round")
    if not Path(redis_binary()).is_file():
        parser.error("redis-server not found (apt-get install redis-server)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile(4096)
    parameters = {k: v for k, v in vars(args).items() if k != "json"}
    with tempfile.TemporaryDirectory(prefix="llamapool-bench-cluster-") as tmp:
        if args.logs:
            tmp = args.logs
            Path(tmp).mkdir(parents=True, exist_ok=True)
        try:
            results = asyncio.run(bench(args, Path(tmp)))
        except (RuntimeError, OSError) as exc:
            print(f"bench_cluster: {exc}", file=sys.stderr)
            for log in sorted(Path(tmp).glob("*/*.log")):
                print(f"--- {log.parent.name}/{log.name}", file=sys.stderr)
                print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
            return 1
    report: dict[str, Any] = {
        "environment": environment(),
        "parameters": parameters,
        **results,
    }
    report["environment"]["redis"] = redis_version()
    print(json.dumps(report, indent=2) if args.json else render(report))
    rows = [row for part in PARTS if part in report for row in report[part]["rows"]]
    failed = any(row["errors"] or row["warmup_errors"] for row in rows)
    return 1 if failed or report["stop_problems"] else 0


def redis_version() -> str:
    with contextlib.suppress(OSError):
        out = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True)
        return out.stdout.split(" v=", 1)[1].split()[0] if " v=" in out.stdout else ""
    return ""


if __name__ == "__main__":
    sys.exit(main())
