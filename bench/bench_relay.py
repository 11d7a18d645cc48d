"""The relay at scale, side by side with the Go llamapool server, in one run on one machine.

Every server under test runs as a subprocess on loopback: ``python -m llamapool serve`` (the
llamapool this interpreter imports), with simulated workers speaking wire protocol v1 (JSON and
base64, as a Go worker does) and, with ``--protocol binary`` or ``both``, the binary-frame
extension; and with ``--go-server PATH``, the Go server binary, with the same simulated v1
workers. The simulated workers run in their own process (``_relay_workers.py``); this process
is the client side (``_relay_load.py``) and reads ``/proc`` for each process's CPU time and the
server's memory. Scenarios (each on a freshly started server, the configurations interleaved):

- ``stream``: S streams open at once, each a chunk every 1/R s; chunks relayed per second,
  relay delay p50/p99/max, server CPU per chunk, server memory per open stream;
- ``burst``: S streams, plus N more that all end within the same 50 ms, mid-window; the relay
  delay the others see around that moment;
- ``requests``: non-streamed requests answered at once, with 10 and with 1,000 workers:
  server CPU per request, latency, idle memory per worker, and at concurrency 1 the time to
  first byte against the same answer served directly.

With ``--floor``, a last column runs ``_floor_server.py``: the same relay with nothing but
relaying, on the same stack (CPython, aiohttp, uvloop), to tell what llamapool's own work costs
from what the stack costs.

    python bench/bench_relay.py --go-server /tmp/gobuild/llamapool-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _relay_deploy import Config, Pool, running_server
from _relay_load import Histogram, LoopLag, Streams, pauses_between, percentile, requests
from _relay_report import render
from bench_pool import environment

SCENARIOS = ("stream", "burst", "requests")


def round_ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 2)


def delays(hist: Histogram) -> dict[str, Any]:
    return {
        "count": hist.count,
        "p50_ms": round_ms(hist.percentile(50)),
        "p99_ms": round_ms(hist.percentile(99)),
        "max_ms": round_ms(hist.max) if hist.count else None,
    }


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    roles = set(before) - {"at", "rss_kib", "hwm_kib"}
    return {r: round(max(0.0, after[r] - before[r]), 3) for r in sorted(roles)}


async def sleep_until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


def client_session(limit: int, timeout: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=60)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout)
    )


# --- streams ----------------------------------------------------------------------------------


async def streams_scenario(
    pool: Pool, args: argparse.Namespace, *, streams: int, rate: float, burst: int
) -> dict[str, Any]:
    """Open ``streams`` (+ ``burst``) streams, measure a window of ``args.duration`` seconds."""
    total = streams + burst
    idle = pool.sample()
    await pool.start_workers(
        args.workers,
        rate=rate,
        chunk_bytes=args.chunk_bytes,
        max_concurrency=math.ceil(total / args.workers) + 16,
        direct=False,
    )
    await asyncio.sleep(1.0)
    with_workers = pool.sample()
    pauses = pool.pauses
    await pauses.buckets()  # its connection opens now, while the server is idle
    own_lag = LoopLag()
    host, _, port = pool.url.removeprefix("http://").partition(":")
    load = Streams(host, int(port), pool.headers, timeout=args.timeout)
    gate = asyncio.Semaphore(args.open_parallel)
    opening = time.monotonic()
    tasks = [asyncio.create_task(load.one(gate, f"s{i}", burst=i >= streams)) for i in range(total)]
    deadline = opening + args.timeout
    while load.opened + load.errors.total() < total and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # many tasks; one counter to watch
    opened_in = time.monotonic() - opening
    t0 = time.monotonic() + args.warmup
    t_burst = t0 + args.duration / 2
    await sleep_until(t0)
    paused_before = await pauses.buckets()
    before = pool.sample()
    t1 = before["at"] + args.duration  # however long the scrape took
    received0 = load.received
    open_at_start = load.open_now
    peak_rss = before["rss_kib"]
    if burst:
        await pool.command(f"burst {t_burst:.6f}")
    paused_at_burst: dict[str, dict[float, float]] | None = None
    while time.monotonic() < t1:
        await asyncio.sleep(min(0.5, max(0.0, t1 - time.monotonic())))
        peak_rss = max(peak_rss, pool.sample()["rss_kib"])
        if burst and paused_at_burst is None and time.monotonic() >= t_burst + 1.0:
            paused_at_burst = await pauses.buckets()  # the burst second, roughly
    after = pool.sample()
    paused_after = await pauses.buckets()
    received1 = load.received
    await pool.command("end_all")
    done, _ = await asyncio.wait(tasks, timeout=args.timeout)
    unfinished = len(tasks) - len(done)
    for task in tasks:
        task.cancel()
    worker_counters = await pool.stop_workers()
    elapsed = after["at"] - before["at"]
    chunks = received1 - received0
    cpu = cpu_delta(before, after)
    offered = rate * (streams + (burst / 2 if burst else 0))
    row: dict[str, Any] = {
        "streams": streams,
        "rate": rate,
        "burst": burst,
        "workers": args.workers,
        "opened": load.opened,
        "opened_in_s": round(opened_in, 2),
        "open_p99_ms": round_ms(percentile(load.open_delays, 99)),
        "open_at_window_start": open_at_start,
        "finished_ok": load.finished_ok,
        "unfinished": unfinished,
        "errors": dict(load.errors),
        "window_s": round(elapsed, 3),
        "offered_per_s": round(offered, 1),
        "chunks_per_s": round(chunks / elapsed, 1) if elapsed else None,
        "delay": delays(load.window(before["at"], after["at"])),
        "server_cpu_us_per_chunk": round(cpu["server"] * 1e6 / chunks, 2) if chunks else None,
        "cpu_s": cpu,
        "cpu_busy": {r: round(v / elapsed, 3) for r, v in cpu.items()} if elapsed else {},
        "rss_mib": {
            "no_workers": round(idle["rss_kib"] / 1024, 1),
            "idle_workers": round(with_workers["rss_kib"] / 1024, 1),
            "streams_open": round(before["rss_kib"] / 1024, 1),
            "peak_window": round(peak_rss / 1024, 1),
            "hwm": round(after["hwm_kib"] / 1024, 1),
        },
        "kib_per_stream": (
            round((before["rss_kib"] - with_workers["rss_kib"]) / open_at_start, 1)
            if open_at_start
            else None
        ),
        "worker_counters": worker_counters,
        "pauses": pauses_between(paused_before, paused_after),
        "load_generator_stall_ms": own_lag.longest(before["at"], after["at"]),
    }
    own_lag.stop()
    if burst:
        row["load_generator_stall_burst_ms"] = own_lag.longest(t_burst, t_burst + 1.0)
        row["pauses_to_burst_end"] = pauses_between(paused_before, paused_at_burst)
        row["delay_before_burst"] = delays(load.window(before["at"], t_burst))
        row["delay_burst_second"] = delays(load.window(t_burst, t_burst + 1.0))
    return row


# --- requests ---------------------------------------------------------------------------------


async def requests_scenario(pool: Pool, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """Non-streamed requests answered at once: CPU per request, and the first byte at c=1."""
    idle = pool.sample()
    await pool.start_workers(
        workers,
        rate=1.0,
        chunk_bytes=args.chunk_bytes,
        max_concurrency=args.concurrency + 8,
        direct=True,
    )
    await asyncio.sleep(1.0)
    with_workers = pool.sample()
    row: dict[str, Any] = {
        "workers": workers,
        "rss_mib": {
            "no_workers": round(idle["rss_kib"] / 1024, 1),
            "idle_workers": round(with_workers["rss_kib"] / 1024, 1),
        },
        "kib_per_worker": round((with_workers["rss_kib"] - idle["rss_kib"]) / workers, 1),
    }
    common = {"max_seconds": args.max_seconds}
    async with client_session(args.concurrency + 4, args.timeout) as session:
        await requests(
            session, pool.url, pool.headers, count=args.warmup_requests, concurrency=8, **common
        )
        before = pool.sample()
        out = await requests(
            session,
            pool.url,
            pool.headers,
            count=args.requests,
            concurrency=args.concurrency,
            **common,
        )
        after = pool.sample()
        cpu = cpu_delta(before, after)
        ok = len(out.latencies)
        row |= {
            "requests_ok": ok,
            "errors": dict(out.errors),
            "concurrency": args.concurrency,
            "requests_per_s": round(ok / out.elapsed, 1) if out.elapsed else None,
            "latency_ms": {
                p: round_ms(percentile(out.latencies, q))
                for p, q in (("p50", 50), ("p99", 99), ("max", 100))
            },
            "server_cpu_ms_per_request": round(cpu["server"] * 1000 / ok, 4) if ok else None,
            "cpu_s": cpu,
            "cpu_busy": {r: round(v / out.elapsed, 3) for r, v in cpu.items()},
        }
        if workers == min(args.request_workers):
            row["ttfb_c1"] = await first_byte(session, pool, args)
    await pool.stop_workers()
    return row


async def first_byte(
    session: aiohttp.ClientSession, pool: Pool, args: argparse.Namespace
) -> dict[str, Any]:
    """Time to first byte at concurrency 1, through the pool and directly, in alternating
    rounds so a slow spell of the machine hurts both."""
    direct = {"Content-Type": "application/json"}
    pooled: list[float] = []
    straight: list[float] = []
    errors = 0
    per_round = max(1, args.ttfb_requests // 5)
    for _ in range(5):
        for url, headers, into in (
            (pool.url, pool.headers, pooled),
            (pool.direct_url, direct, straight),
        ):
            out = await requests(
                session, url, headers, count=per_round, concurrency=1, max_seconds=30
            )
            into.extend(out.ttfbs)
            errors += out.errors.total()
    pool_p50, direct_p50 = percentile(pooled, 50), percentile(straight, 50)
    return {
        "requests": len(pooled),
        "errors": errors,
        "pool_p50_ms": round_ms(pool_p50),
        "pool_p99_ms": round_ms(percentile(pooled, 99)),
        "direct_p50_ms": round_ms(direct_p50),
        "added_p50_ms": round_ms(pool_p50 - direct_p50),
    }


# --- the run ----------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[Config]:
    out = []
    if args.go_server:
        out.append(Config("go v1", "go", "v1"))
    if args.protocol in ("v1", "both"):
        out.append(Config("python v1", "python", "v1"))
    if args.protocol in ("binary", "both"):
        out.append(Config("python binary", "python", "binary"))
    if args.floor:
        out.append(Config("floor binary", "floor", "binary"))
    return out


async def bench(args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    plan: list[tuple[str, dict[str, Any]]] = []
    if "stream" in args.scenarios:
        for streams, rate in zip(args.streams, args.rate, strict=True):
            plan.append(("stream", {"streams": streams, "rate": rate, "burst": 0}))
    if "burst" in args.scenarios and args.burst_end:
        plan.append(
            (
                "burst",
                {"streams": args.streams[0], "rate": args.burst_rate, "burst": args.burst_end},
            )
        )
    if "requests" in args.scenarios:
        plan += [("requests", {"workers": w}) for w in args.request_workers]
    most_streams = max(args.streams) + args.burst_end
    for run, (scenario, params) in enumerate(plan):
        for config in configurations(args):
            started = time.monotonic()
            here = logs / f"{run + 1}-{scenario}-{config.name.replace(' ', '-')}"
            here.mkdir(exist_ok=True)
            async with running_server(
                config,
                go_server=args.go_server,
                max_connections=most_streams + 1024,
                max_workers=max(args.workers, *args.request_workers) + 64,
                log_level=args.server_log_level,
                logs=here,
            ) as pool:
                if scenario == "requests":
                    row = await requests_scenario(pool, args, params["workers"])
                else:
                    row = await streams_scenario(pool, args, **params)
            row = {"scenario": scenario, "config": config.name, **row}
            results.append(row)
            print(
                f"  {scenario} {params} {config.name}: done in {time.monotonic() - started:.0f} s, "
                f"errors {row['errors'] or 0}",
                file=sys.stderr,
                flush=True,
            )
    return results


def raise_nofile(needed: int) -> int:
    """Raise the soft limit of open files (children inherit it); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    add = parser.add_argument
    add("--go-server", metavar="PATH", help="the Go llamapool-server binary to compare with")
    add("--protocol", choices=("v1", "binary", "both"), default="both", help="Python server")
    add(
        "--floor",
        action="store_true",
        help="add the floor: the least a relay costs on this stack (_floor_server.py)",
    )
    add("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    add("--streams", type=int, nargs="+", default=[1000], metavar="S", help="open streams")
    add("--rate", type=float, nargs="+", default=[20.0], metavar="R", help="chunks/s per stream")
    add("--duration", type=float, default=20.0, metavar="SECONDS", help="measured window")
    add("--warmup", type=float, default=2.0, metavar="SECONDS", help="after the last open")
    add("--workers", type=int, default=10, metavar="W", help="workers for the stream scenarios")
    add("--chunk-bytes", type=int, default=160, metavar="B", help="bytes per chunk (SSE event)")
    add("--open-parallel", type=int, default=64, metavar="N", help="streams opening at once")
    add("--burst-end", type=int, default=1000, metavar="N", help="streams ending together")
    add("--burst-rate", type=float, default=5.0, metavar="R", help="chunks/s in the burst run")
    add("--requests", type=int, default=2000, metavar="N", help="non-streamed, measured")
    add("--warmup-requests", type=int, default=200, metavar="N")
    add("--concurrency", type=int, default=8, metavar="C", help="for the non-streamed requests")
    add("--request-workers", type=int, nargs="+", default=[10, 1000], metavar="W")
    add("--ttfb-requests", type=int, default=500, metavar="N", help="first byte at c=1, each")
    add("--max-seconds", type=float, default=60.0, metavar="S", help="cap per request phase")
    add("--timeout", type=float, default=60.0, metavar="S", help="opening streams, one read")
    add(
        "--server-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the Python server's --log-level (the Go server logs at info)",
    )
    add(
        "--logs",
        metavar="DIR",
        help="keep the processes' logs in DIR, a folder per run (default: a temporary one)",
    )
    add("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if len(args.rate) == 1:
        args.rate *= len(args.streams)
    if len(args.rate) != len(args.streams):
        parser.error("give one --rate, or one per --streams value")
    if min(*args.streams, args.workers, args.requests, args.concurrency) < 1:
        parser.error("--streams, --workers, --requests and --concurrency must be at least 1")
    if max(args.streams) + args.burst_end > 20_000 or max(args.request_workers) > 5_000:
        parser.error("at most 20,000 streams and 5,000 workers")
    if args.go_server and not Path(args.go_server).is_file():
        parser.error(f"--go-server {args.go_server}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needed = 2 * (max(args.streams) + args.burst_end + max(args.request_workers)) + 1024
    nofile = raise_nofile(needed)
    if nofile < needed:
        print(f"bench_relay: only {nofile} open files allowed, {needed} wanted", file=sys.stderr)
    parameters = {k: v for k, v in vars(args).items() if k != "json"}
    with tempfile.TemporaryDirectory(prefix="llamapool-bench-relay-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        try:
            results = asyncio.run(bench(args, logs))
        except (RuntimeError, OSError) as exc:
            print(f"bench_relay: {exc}", file=sys.stderr)
            for log in sorted(logs.glob("*/*.log")):
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            return 1
    report: dict[str, Any] = {
        "environment": environment(),
        "parameters": parameters,
        "results": results,
    }
    report["environment"]["go_server"] = args.go_server
    print(json.dumps(report, indent=2) if args.json else render(report))
    failed = sum(sum(r["errors"].values()) + r.get("unfinished", 0) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
