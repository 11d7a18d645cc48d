"""The processes of ``bench_relay.py``: the server under test (Python or Go) and the simulated
workers, on loopback, and what ``/proc`` says about them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
from _deploy import STARTUP_TIMEOUT, Deployment, free_port, spawn, stop
from _relay_load import PauseScraper

WORKERS_SCRIPT = str(Path(__file__).with_name("_relay_workers.py"))
FLOOR_SCRIPT = str(Path(__file__).with_name("_floor_server.py"))


@attrs.frozen
class Config:
    """One column of the report: which server, and how the simulated workers talk to it."""

    name: str
    server: str  # "python", "go" or "floor" (see _floor_server.py)
    protocol: str  # "v1" or "binary"


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in KiB."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


@attrs.define
class Pool:
    """A running server and, once started, its simulated workers."""

    config: Config
    deployment: Deployment
    url: str
    api_key: str
    worker_key: str
    logs: Path
    workers: asyncio.subprocess.Process | None = None
    direct_url: str = ""
    _pauses: PauseScraper | None = None

    @property
    def pauses(self) -> PauseScraper:
        """The server's pause histograms, over a connection of their own."""
        if self._pauses is None:
            self._pauses = PauseScraper(self.url)
        return self._pauses

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}

    @property
    def server_pid(self) -> int:
        return self.deployment.procs[0].process.pid

    def sample(self) -> dict[str, float]:
        """CPU seconds per role and the server's memory, now."""
        out = self.deployment.cpu()
        out["at"] = time.monotonic()
        mem = memory_kib(self.server_pid)
        out["rss_kib"], out["hwm_kib"] = mem.get("VmRSS", 0), mem.get("VmHWM", 0)
        return out

    async def worker_count(self, session: aiohttp.ClientSession) -> int:
        if self.config.server in ("python", "floor"):
            async with session.get(self.url + "/healthz") as resp:
                return int((await resp.json())["workers"])
        async with session.get(self.url + "/api/v1/state", headers=self.headers) as resp:
            summary = (await resp.json())["workers_summary"]
            return int(sum(summary.values()) - summary.get("gone", 0))

    async def wait_workers(self, count: int, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        server = self.deployment.procs[0]
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline and server.process.returncode is None:
                with contextlib.suppress(aiohttp.ClientError, KeyError, ValueError):
                    if await self.worker_count(session) >= count:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the server did not report {count} worker(s); see {server.log}")

    async def start_workers(
        self, count: int, *, rate: float, chunk_bytes: int, max_concurrency: int, direct: bool
    ) -> None:
        """Start the simulated workers and wait until the server counts them all."""
        ws_url = "ws" + self.url.removeprefix("http") + "/workers/connect"
        cmd = [sys.executable, WORKERS_SCRIPT, "--url", ws_url, f"--key={self.worker_key}"]
        cmd += ["--workers", str(count), "--protocol", self.config.protocol]
        cmd += ["--rate", str(rate), "--chunk-bytes", str(chunk_bytes)]
        cmd += ["--max-concurrency", str(max_concurrency)] + (["--direct"] if direct else [])
        proc = await spawn(
            self.deployment,
            "workers",
            cmd,
            self.logs,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.workers = proc.process
        assert proc.process.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.process.stdout.readline(), 120)
            if line.startswith(b"direct "):
                self.direct_url = line.split()[1].decode()
            elif line.strip() == b"ready":
                break
            else:
                raise RuntimeError(f"the simulated workers did not start; see {proc.log}")
        await self.wait_workers(count, timeout=120)

    async def command(self, line: str) -> None:
        assert self.workers is not None
        assert self.workers.stdin is not None
        self.workers.stdin.write(line.encode() + b"\n")
        await self.workers.stdin.drain()

    async def stop_workers(self) -> dict[str, Any]:
        """Close the workers' standard input; they print their counters and exit."""
        if self.workers is None or self.workers.stdin is None or self.workers.stdout is None:
            return {}
        self.workers.stdin.close()
        try:
            line = await asyncio.wait_for(self.workers.stdout.readline(), 30)
            return dict(json.loads(line)) if line else {}
        except (asyncio.TimeoutError, ValueError):
            return {}


@contextlib.asynccontextmanager
async def running_server(
    config: Config,
    *,
    go_server: str | None,
    max_connections: int,
    max_workers: int,
    log_level: str,
    logs: Path,
) -> AsyncIterator[Pool]:
    """Start one server on a free loopback port; stop it and its workers on the way out."""
    deployment = Deployment()
    port = free_port()
    worker_key = secrets.token_urlsafe(16)
    env = {**os.environ, "API_KEY": deployment.api_key, "WORKER_KEY": worker_key}
    if config.server == "go":
        assert go_server is not None
        # The Go server listens on every interface (``:PORT``); the benchmark reaches it on
        # loopback only, and its keys are random.
        cmd = [go_server]
        env |= {"PORT": str(port), "METRICS_PORT": str(port)}
    elif config.server == "floor":
        cmd = [sys.executable, FLOOR_SCRIPT, str(port)]
    else:
        cmd = [sys.executable, "-m", "llamapool", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--log-level", log_level]
        env |= {
            "MAX_CONNECTIONS": str(max_connections),
            "MAX_WORKERS": str(max_workers),
            "DRAIN_TIMEOUT": "1s",
        }
    pool = Pool(
        config,
        deployment,
        f"http://127.0.0.1:{port}",
        deployment.api_key,
        worker_key,
        logs,
    )
    try:
        await spawn(deployment, "server", cmd, logs, env=env)
        await pool.wait_workers(0)
        yield pool
    finally:
        if pool._pauses is not None:
            await pool._pauses.close()
        await pool.stop_workers()
        await stop(deployment)
