"""How much the pool costs: throughput and latency through it, against its backend directly.

Every process is real and runs on loopback: a fake Ollama (``llamapool.testing``) in its own
process, ``python -m llamapool serve`` and ``python -m llamapool work --backend ollama``, as an
operator would run them. This process is the load generator: one ``aiohttp.ClientSession``
whose keep-alive pool holds one connection per simulated client.

For each concurrency it measures non-streamed and streamed OpenAI chat completions, against
the backend directly and through the pool, in rounds that alternate between the two, after a
warm-up. Every answer is checked (status, echoed content, number of SSE events); failures are
counted and reported, never dropped. It also reads the CPU time of each process and of the
whole machine, so the cost per request of the server, the worker and the backend can be told
apart, and a run disturbed by something else on the machine shows it.

    python bench/bench_pool.py --requests 2000 --concurrency 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _deploy import running_pool
from _load import KINDS, Outcome, Target, check_plain, check_stream, load, request_body, summarize
from _report import render

# --- the run --------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    started = running_pool(
        workers=args.workers,
        max_concurrency=max(args.concurrency),
        chunk_delay=args.chunk_delay,
        server_log_level=args.server_log_level,
        server_profile=args.server_profile,
        logs=logs,
    )
    async with started as deployment:
        connector = aiohttp.TCPConnector(limit=max(args.concurrency), keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            targets = (
                Target("direct", deployment.backend_url, {"Content-Type": "application/json"}),
                Target(
                    "pool",
                    deployment.server_url,
                    {
                        "Content-Type": "application/json",
                        "Authorization": f"Bearer {deployment.api_key}",
                    },
                ),
            )
            for concurrency, (kind, stream) in itertools.product(args.concurrency, KINDS):
                body = request_body(stream=stream, tokens=args.chunks)
                check = (check_stream if stream else check_plain)(args.chunks)
                common = {"concurrency": concurrency, "max_seconds": args.max_seconds}
                warm = {
                    t.name: await load(session, t, body, check, requests=args.warmup, **common)
                    for t in targets
                }
                # Rounds alternate between the targets, so a slow spell of a shared machine
                # hurts both sides rather than one.
                rounds: dict[str, list[Outcome]] = {t.name: [] for t in targets}
                for _, target in itertools.product(range(args.rounds), targets):
                    before = deployment.cpu()
                    outcome = await load(
                        session, target, body, check, requests=args.requests, **common
                    )
                    after = deployment.cpu()
                    # Clock ticks can round a delta below zero.
                    outcome.cpu = {r: max(0.0, after[r] - before[r]) for r in after}
                    rounds[target.name].append(outcome)
                for target in targets:
                    row = {"concurrency": concurrency, "kind": kind, "target": target.name}
                    row |= summarize(rounds[target.name])
                    row["warmup_errors"] = dict(warm[target.name].errors)
                    results.append(row)
                    progress(row)
    return {"parameters": parameters(args), "results": results}


def progress(row: dict[str, Any]) -> None:
    errors = sum(row["errors"].values()) + sum(row["warmup_errors"].values())
    print(
        f"  c={row['concurrency']:<3} {row['kind']:<13} {row['target']:<6} "
        f"{row['requests_ok']} ok, {errors} errors, req/s by round {row['requests_per_s_rounds']}",
        file=sys.stderr,
        flush=True,
    )


def environment() -> dict[str, Any]:
    from aiohttp import http_parser

    import llamapool

    source = str(Path(llamapool.__file__).parent.parent)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        git = ["git", "-C", source, "describe", "--always", "--dirty", "--abbrev=12"]
        source += (
            " @ " + subprocess.run(git, capture_output=True, check=True, text=True).stdout.strip()
        )

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "aiohttp": aiohttp.__version__,
        "aiohttp_c_parser": http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser",
        "orjson": orjson.__version__,
        "llamapool": llamapool.__version__,
        "llamapool_source": source,
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def parameters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "requests": args.requests,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "chunks": args.chunks,
        "chunk_delay": args.chunk_delay,
        "workers": args.workers,
        "worker_max_concurrency": max(args.concurrency),
        "max_seconds": args.max_seconds,
        "timeout": args.timeout,
        "server_log_level": args.server_log_level,
        "server_profile": args.server_profile,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, metavar="N", help="per round")
    parser.add_argument("--rounds", type=int, default=3, metavar="R", help="per target and kind")
    parser.add_argument("--warmup", type=int, default=200, metavar="N", help="per target and kind")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[16], metavar="C", help="clients at once"
    )
    parser.add_argument("--chunks", type=int, default=64, metavar="K", help="tokens per answer")
    parser.add_argument("--workers", type=int, default=1, metavar="W")
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the backend's pause between tokens (0: as fast as it can, so chunks coalesce)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, metavar="S", help="cap per round"
    )
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per request")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--server-profile", metavar="PATH", help="run the server under cProfile, stats to PATH"
    )
    parser.add_argument(
        "--server-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the server's --log-level (info, the default, logs a line per request)",
    )
    args = parser.parse_args(argv)
    if min(args.requests, args.rounds, args.chunks, args.workers, *args.concurrency) < 1:
        parser.error("--requests, --rounds, --chunks, --workers, --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llamapool-bench-") as tmp:
        try:
            report = {"environment": environment()} | asyncio.run(bench(args, Path(tmp)))
        except (RuntimeError, OSError) as exc:
            print(f"bench_pool: {exc}", file=sys.stderr)
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    failed = sum(
        sum(r["errors"].values()) + sum(r["warmup_errors"].values()) for r in report["results"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
