"""The processes under test: a fake backend, the server and its workers, on loopback.

Run as a script, this module is the fake backend: a fake Ollama on a free port that prints its
URL and serves until its standard input closes, so it never outlives the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from _load import MODEL

#: The CPU time of the machine not spent in the processes under test.
REST = "rest of the machine"
STARTUP_TIMEOUT = 30.0


_CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


def machine_cpu_seconds() -> float:
    """CPU time every core of the machine spent busy so far (``/proc/stat``; NaN elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return math.nan
    ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICK


@attrs.frozen
class Proc:
    role: str
    process: asyncio.subprocess.Process
    log: Path


@attrs.define
class Deployment:
    """The processes under test and the URLs to reach them."""

    procs: list[Proc] = attrs.Factory(list)
    backend_url: str = ""
    server_url: str = ""
    api_key: str = attrs.field(factory=lambda: secrets.token_urlsafe(16), repr=False)

    def cpu(self) -> dict[str, float]:
        """CPU seconds per role (workers summed), and what the rest of the machine used.

        The rest is every other process, plus kernel time not charged to any process (part of
        the loopback traffic's softirq work lands there): on a quiet machine it stays small.
        """
        machine = machine_cpu_seconds()
        totals: dict[str, float] = {"load generator": time.process_time()}
        for proc in self.procs:
            totals[proc.role] = totals.get(proc.role, 0.0) + cpu_seconds(proc.process.pid)
        totals[REST] = machine - sum(totals.values())
        return totals


async def spawn(deployment: Deployment, role: str, args: list[str], logs: Path, **kw: Any) -> Proc:
    log = logs / f"{role}-{len(deployment.procs)}.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(*args, stderr=stderr, **kw)
    proc = Proc(role, process, log)
    deployment.procs.append(proc)
    return proc


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_workers(server: Proc, url: str, count: int) -> None:
    """Wait until the server answers ``/healthz`` with at least ``count`` workers."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and server.process.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/healthz") as resp:
                    if (await resp.json())["workers"] >= count:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the server did not report {count} worker(s); see {server.log}")


@contextlib.asynccontextmanager
async def running_pool(
    *,
    workers: int,
    max_concurrency: int,
    chunk_delay: float,
    server_log_level: str,
    server_profile: str | None,
    logs: Path,
) -> AsyncIterator[Deployment]:
    """Start the backend, the server and the workers; stop them all on the way out.

    Each process logs to its own file in ``logs``; ``server_profile`` runs the server under
    cProfile, which writes its stats there when the server exits.
    """
    deployment = Deployment()
    python = sys.executable
    worker_key = secrets.token_urlsafe(16)
    try:
        backend = await spawn(
            deployment,
            "backend",
            [python, __file__, "--chunk-delay", str(chunk_delay)],
            logs,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert backend.process.stdout is not None
        line = await asyncio.wait_for(backend.process.stdout.readline(), STARTUP_TIMEOUT)
        deployment.backend_url = line.decode().strip()
        if not deployment.backend_url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the fake backend did not start; see {backend.log}")

        serve = [python, "-m", "cProfile", "-o", server_profile] if server_profile else [python]
        port = free_port()
        serve += ["-m", "llamapool", "serve", "--host", "127.0.0.1", "--port", str(port)]
        serve += ["--log-level", server_log_level]
        server_env = {**os.environ, "API_KEY": deployment.api_key, "WORKER_KEY": worker_key}
        server = await spawn(deployment, "server", serve, logs, env=server_env)
        deployment.server_url = f"http://127.0.0.1:{port}"
        await wait_for_workers(server, deployment.server_url, 0)

        worker_env = {**os.environ, "WORKER_KEY": worker_key}
        ws_url = "ws" + deployment.server_url.removeprefix("http") + "/workers/connect"
        for i in range(workers):
            work = [
                python, "-m", "llamapool", "work",
                "--server-url", ws_url,
                "--backend", "ollama",
                "--backend-url", deployment.backend_url,
                "--max-concurrency", str(max_concurrency),
                "--worker-name", f"bench-{i}",
                "--log-level", "warning",
            ]  # fmt: skip
            await spawn(deployment, "worker", work, logs, env=worker_env)
        await wait_for_workers(server, deployment.server_url, workers)
        yield deployment
    finally:
        await stop(deployment)


async def stop(deployment: Deployment) -> None:
    """SIGTERM everyone (the CLIs drain and exit; cProfile writes its file), then SIGKILL."""
    for proc in reversed(deployment.procs):
        if proc.process.stdin is not None:
            proc.process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(signal.SIGTERM)
    for proc in deployment.procs:
        try:
            await asyncio.wait_for(proc.process.wait(), 15)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.process.kill()
            await proc.process.wait()


async def serve_backend(chunk_delay: float) -> None:
    """A fake Ollama on a free port: print its URL, serve until stdin closes."""
    from llamapool.testing import create_fake_ollama_app, fake_log, serve_app

    app = create_fake_ollama_app(models=(MODEL,), chunk_delay=chunk_delay)
    async with serve_app(app) as url:
        print(url, flush=True)
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while not reader.at_eof():
            # The fake records every request for tests; forget them so memory stays flat.
            fake_log(app).requests.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1024), 1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The benchmark's fake backend.")
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    asyncio.run(serve_backend(parser.parse_args().chunk_delay))
