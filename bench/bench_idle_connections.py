"""What idle keep-alive connections cost the server, and whether it gives the memory back.

Starts ``python -m llamapool serve`` on loopback, reads its resident memory (``/proc``), opens N
connections that each send one ``GET /healthz`` and then sit idle with keep-alive, reads the
memory again, closes them all, waits for the server to notice, and reads it a last time.
Linux only (``/proc/<pid>/status``).

    python bench/bench_idle_connections.py --n 10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from pathlib import Path

from _deploy import free_port

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n"
STARTUP_TIMEOUT = 30.0

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def one_request(port: int) -> Conn:
    """A connection that has had its answer and stays open (keep-alive)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"/healthz answered {status.decode()}")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return reader, writer


async def open_idle(port: int, n: int, parallel: int) -> list[Conn]:
    gate = asyncio.Semaphore(parallel)

    async def opened() -> Conn:
        async with gate:
            return await one_request(port)

    return list(await asyncio.gather(*(opened() for _ in range(n))))


async def until_ready(port: int, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and proc.returncode is None:
        with contextlib.suppress(OSError):
            _, writer = await one_request(port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the server did not start")


async def settle(pid: int, fds: int, timeout: float) -> float:
    """Wait until the server holds at most ``fds`` descriptors (it closed the connections)."""
    started = time.monotonic()
    while open_fds(pid) > fds and time.monotonic() - started < timeout:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # another process: nothing to wait on but /proc
    return time.monotonic() - started


async def run(args: argparse.Namespace) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "llamapool", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "warning", *args.serve_args]
    env = {**os.environ, "MAX_CONNECTIONS": str(args.n + 100)}
    proc = await asyncio.create_subprocess_exec(*cmd, env=env)
    try:
        await until_ready(port, proc)
        await asyncio.sleep(0.5)
        fds_before, before = open_fds(proc.pid), rss_mib(proc.pid)
        started = time.monotonic()
        conns = await open_idle(port, args.n, args.parallel)
        opening = time.monotonic() - started
        await asyncio.sleep(1.0)
        held = rss_mib(proc.pid)
        for _, writer in conns:
            writer.close()
        conns.clear()
        closing = await settle(proc.pid, fds_before, timeout=30)
        await asyncio.sleep(args.wait)
        after = rss_mib(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
    per_conn = (held - before) * 1024 / args.n
    print(f"{args.n} idle keep-alive connections to llamapool serve ({' '.join(args.serve_args)})")
    print(
        f"  opened in {opening:.1f} s, all closed on the server {closing:.1f} s after the clients"
    )
    print(f"  server RSS before  {before:7.1f} MiB")
    print(f"  server RSS with    {held:7.1f} MiB  ({per_conn:.1f} KiB per connection)")
    print(f"  server RSS after   {after:7.1f} MiB  ({args.wait:.0f} s after the last close)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=2000, help="connections (default 2000)")
    parser.add_argument(
        "--parallel", type=int, default=100, help="connections being opened at once"
    )
    parser.add_argument(
        "--wait", type=float, default=5.0, help="seconds after the close before the last reading"
    )
    parser.add_argument("serve_args", nargs="*", help="more options for llamapool serve (after --)")
    args = parser.parse_args()
    if not 1 <= args.n <= 50_000:
        parser.error("--n must be between 1 and 50000")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.n + 100
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            parser.error(f"--n {args.n} needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
