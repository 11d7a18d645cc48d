"""The processes of ``bench_cluster.py``: a Redis, one or two servers (or one ``serve
--processes N``) and the simulated workers of ``_relay_workers.py``, on loopback.

Each setup is a :class:`Setup`: a ``_deploy.Deployment`` whose CPU accounting also counts its
Redis and the server processes a ``--processes`` supervisor started (found in ``/proc``), so
one ``cpu()`` call gives every process of the setup, as ``bench_pool.py`` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aiohttp
import attrs
from _deploy import REST, STARTUP_TIMEOUT, Deployment, Proc, cpu_seconds, free_port, spawn, stop
from _relay_deploy import Config, Pool

REDIS = "/usr/bin/redis-server"
SERVER = "server"


def redis_binary() -> str:
    return REDIS if Path(REDIS).is_file() else shutil.which("redis-server") or REDIS


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nobody listens on right now."""
    for _ in range(100):
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} free consecutive ports")


def alive(pid: int) -> bool:
    """Whether a process exists (a zombie too, until it is reaped)."""
    return Path(f"/proc/{pid}").exists()


@attrs.define
class Setup(Deployment):
    """One setup under test: its processes, where clients go, where workers dial."""

    name: str = ""
    logs: Path = Path()
    worker_key: str = attrs.field(factory=lambda: secrets.token_urlsafe(16), repr=False)
    cluster_key: str = attrs.field(factory=lambda: secrets.token_urlsafe(16), repr=False)
    redis: Proc | None = None
    redis_url: str = ""
    #: The URL the clients use, and each server's own (for ``/healthz`` and ``/metrics``).
    client_url: str = ""
    server_urls: list[str] = attrs.Factory(list)
    metrics_urls: list[str] = attrs.Factory(list)
    #: Processes this benchmark did not start but counts: (role, pid).
    children: list[tuple[str, int]] = attrs.Factory(list)
    workers: Pool | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}

    def cpu(self) -> dict[str, float]:
        totals = super().cpu()
        counted = list(self.children)
        if self.redis is not None:
            counted.append(("redis", self.redis.process.pid))
        for role, pid in counted:
            seconds = cpu_seconds(pid)
            totals[role] = totals.get(role, 0.0) + seconds
            totals[REST] -= seconds
        return totals

    def check_alive(self) -> None:
        """Raise if a process of the setup has died (a supervisor may have replaced it)."""
        for proc in self.procs:
            if proc.process.returncode is not None:
                raise RuntimeError(f"{self.name}: {proc.role} exited; see {proc.log}")
        for role, pid in self.children:
            if not alive(pid):
                raise RuntimeError(f"{self.name}: {role} (pid {pid}) exited")

    # --- starting -----------------------------------------------------------------------------

    async def start_redis(self) -> None:
        port = free_port()
        holder = Deployment()
        cmd = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1"]
        cmd += [
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            str(self.logs / f"redis-{port}.log"),
        ]
        self.redis = await spawn(holder, "redis", cmd, self.logs, stdout=asyncio.subprocess.DEVNULL)
        self.redis_url = f"redis://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and self.redis.process.returncode is None:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"PING\r\n")
                line = await reader.readline()
                writer.close()
                if line == b"+PONG\r\n":
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"redis-server did not start; see {self.redis.log}")

    async def start_server(
        self, role: str, *, cluster: bool, log_level: str, args: Sequence[str] = ()
    ) -> str:
        """One ``python -m llamapool serve`` on a free port (unless ``args`` has ``--port``);
        its URL."""
        port = free_port()
        cmd = [sys.executable, "-m", "llamapool", "serve", "--host", "127.0.0.1"]
        cmd += ["--log-level", log_level, *args]
        if "--port" in args:
            port = int(args[list(args).index("--port") + 1])
        else:
            cmd += ["--port", str(port)]
        env = {
            **os.environ,
            "API_KEY": self.api_key,
            "WORKER_KEY": self.worker_key,
            "DRAIN_TIMEOUT": "1s",
        }
        if cluster:
            env |= {"CLUSTER_URL": self.redis_url, "CLUSTER_KEY": self.cluster_key}
        await spawn(self, role, cmd, self.logs, env=env)
        url = f"http://127.0.0.1:{port}"
        self.server_urls.append(url)
        return url

    def find_children(self) -> None:
        """The server processes a ``--processes`` supervisor (``procs[0]``) started."""
        parent = str(self.procs[0].process.pid)
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rpartition(")")[2].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
                if fields[1] == parent and b"spawn_main" in cmdline:
                    found.append(int(stat.parent.name))
        self.children = [(f"{SERVER} #{i}", pid) for i, pid in enumerate(sorted(found))]

    async def start_workers(
        self, url: str, *, count: int, max_concurrency: int, protocol: str, chunk_bytes: int
    ) -> None:
        """The simulated workers (one process), dialling ``url``."""
        self.workers = Pool(
            Config(self.name, "python", protocol),
            self,
            url,
            self.api_key,
            self.worker_key,
            self.logs,
        )
        await self.workers.start_workers(
            count, rate=1.0, chunk_bytes=chunk_bytes, max_concurrency=max_concurrency, direct=False
        )

    async def stop_workers(self) -> None:
        """Stop the simulated workers and forget their process (its CPU time goes with it)."""
        if self.workers is None or self.workers.workers is None:
            return
        process = self.workers.workers
        await self.workers.stop_workers()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
        self.procs = [p for p in self.procs if p.process is not process]
        self.workers = None

    async def stop(self) -> list[str]:
        """Stop everything (servers and workers, then Redis); what did not stop on SIGTERM
        (``_deploy.stop`` kills it after 15 s, and a server process its supervisor left
        behind is killed here)."""
        await stop(self)
        problems = [
            f"{self.name}: {p.role} did not stop within 15 s of SIGTERM (killed)"
            for p in self.procs
            if p.process.returncode == -signal.SIGKILL
        ]
        for role, pid in self.children:
            if alive(pid):
                problems.append(f"{self.name}: {role} still ran after its supervisor (killed)")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.redis is not None:
            await stop(Deployment(procs=[self.redis]))
        return problems

    # --- what the servers say ---------------------------------------------------------------

    async def wait_ready(self, workers: int, *, cluster: bool) -> None:
        """Until every server counts ``workers`` workers (in a cluster: the whole cluster's,
        and with the cluster connected)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError, KeyError, ValueError):
                    if all(
                        [await self._ready(session, i, workers, cluster) for i in self._servers()]
                    ):
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name}: the servers did not all see {workers} worker(s)")

    def _servers(self) -> range:
        return range(len(self.metrics_urls) or len(self.server_urls))

    async def _ready(
        self, session: aiohttp.ClientSession, index: int, workers: int, cluster: bool
    ) -> bool:
        if self.metrics_urls:
            values = await self.metrics(session, index)
            servers = values.get("llamapool_cluster_servers", 0)
            return (
                values.get("llamapool_cluster_workers") == workers
                and values.get("llamapool_cluster_connected") == 1
                and servers == len(self.metrics_urls)
            )
        async with session.get(self.server_urls[index] + "/healthz") as resp:
            health = await resp.json()
        return bool(
            health["workers"] == workers and (not cluster or health["cluster"] == "connected")
        )

    async def metrics(self, session: aiohttp.ClientSession, index: int) -> dict[str, float]:
        """A server's metrics, each name summed over its labels (``..._total{direction}``
        kept apart as ``name:direction``)."""
        url = self.metrics_urls[index] if self.metrics_urls else self.server_urls[index]
        if not self.metrics_urls:
            url += "/metrics"
        async with session.get(url, headers=self.headers) as resp:
            text = await resp.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            base, _, labels = name.partition("{")
            values[base] = values.get(base, 0.0) + float(value)
            direction = labels.partition('direction="')[2].partition('"')[0]
            if direction:
                key = f"{base}:{direction}"
                values[key] = values.get(key, 0.0) + float(value)
        return values

    async def counters(self) -> list[dict[str, float]]:
        """Per server: requests its clients sent, and requests that crossed out and in."""
        out = []
        async with aiohttp.ClientSession() as session:
            for index in self._servers():
                values = await self.metrics(session, index)
                out.append(
                    {
                        "requests": values.get("llamapool_model_requests_total", 0.0),
                        "out": values.get("llamapool_cluster_requests_total:out", 0.0),
                        "in": values.get("llamapool_cluster_requests_total:in", 0.0),
                    }
                )
        return out

    async def workers_by_server(self) -> list[int]:
        """How many workers each server holds, per the state API (largest first)."""
        async with aiohttp.ClientSession() as session:
            url = self.client_url + "/api/v1/state"
            async with session.get(url, headers=self.headers) as resp:
                state = await resp.json()
        by = Counter(w.get("server", "") for w in state["workers"] if w["status"] != "gone")
        counts = sorted(by.values(), reverse=True)
        return counts + [0] * (len(self._servers()) - len(counts))


@contextlib.asynccontextmanager
async def started(name: str, logs: Path, problems: list[str]) -> AsyncIterator[Setup]:
    """A setup, stopped on the way out (what did not stop cleanly goes to ``problems``); its
    processes log to a folder of its own under ``logs``."""
    folder = logs / "".join(c if c.isalnum() else "-" for c in name)
    folder.mkdir()
    setup = Setup(name=name, logs=folder)
    try:
        yield setup
    finally:
        problems += await setup.stop()
