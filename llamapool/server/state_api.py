"""``/api/v1/state`` (JSON), ``/api/v1/state/stream`` (SSE) and ``/metrics``.

Many dashboards may watch at once, so the snapshot is rendered once per change, at most a few
times a second, by one background task, and every watcher sends those same bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from llamapool.server.appkeys import STATE
from llamapool.server.metrics import CONTENT_TYPE_LATEST
from llamapool.server.state import PoolState

#: Seconds between two snapshots on the stream: changes within it are coalesced.
PUBLISH_INTERVAL = 0.25
#: Seconds of quiet after which the stream sends an SSE comment, so proxies keep it open.
KEEPALIVE_INTERVAL = 15.0


class StateBroadcaster:
    """Renders the state snapshot when it changed and wakes the stream watchers."""

    def __init__(self, state: PoolState) -> None:
        self.state = state
        self.published = -1
        self.snapshot = b""
        self.closing = False
        self._fresh = asyncio.Event()

    def publish(self) -> None:
        if self.state.version == self.published:
            return
        self.published = self.state.version
        self.snapshot = orjson.dumps(self.state.snapshot())
        fresh, self._fresh = self._fresh, asyncio.Event()
        fresh.set()

    async def next(self, seen: int) -> tuple[int, bytes] | None:
        """The first snapshot newer than version ``seen``; ``None`` once the server stops."""
        while self.published == seen and not self.closing:
            await self._fresh.wait()
        return None if self.closing else (self.published, self.snapshot)

    def close(self) -> None:
        """Release every watcher, so a stopping server does not wait on open dashboards."""
        self.closing = True
        self._fresh.set()


BROADCASTER = web.AppKey("broadcaster", StateBroadcaster)


async def broadcast_state(app: web.Application) -> AsyncIterator[None]:
    """Background task: every :data:`PUBLISH_INTERVAL`, forget what is gone past the retention
    (whether or not anyone watches) and publish the changes."""
    broadcaster = app[BROADCASTER] = StateBroadcaster(app[STATE])
    broadcaster.publish()

    async def loop() -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL)
            app[STATE].prune()
            broadcaster.publish()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def state(request: web.Request) -> web.Response:
    """``GET /api/v1/state``: the whole pool, in the Go version's schema."""
    return web.Response(
        body=orjson.dumps(request.app[STATE].snapshot()), content_type="application/json"
    )


async def state_stream(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/state/stream``: a snapshot at once, then one per change."""
    broadcaster = request.app[BROADCASTER]
    broadcaster.publish()  # the first snapshot is current, not up to a tick old
    response = await _events(request)
    async with response:
        seen = -1
        while response.is_connected():
            update = await broadcaster.next(seen)
            if update is None:
                break
            seen, snapshot = update
            await response.send(snapshot.decode())
    return response


async def _events(request: web.Request) -> EventSourceResponse:
    """An event stream, its headers sent, that pings every :data:`KEEPALIVE_INTERVAL`.

    aiohttp-sse 3 takes the interval when the response is made; 2.2, the last release that
    runs on Python 3.10, only once it is (a property that 3 no longer has).
    """
    try:
        response = EventSourceResponse(ping_interval=KEEPALIVE_INTERVAL)
    except TypeError:  # aiohttp-sse 2.2
        response = EventSourceResponse()
        response.ping_interval = KEEPALIVE_INTERVAL  # type: ignore[attr-defined,unused-ignore]
    await response.prepare(request)
    return response


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def release_watchers(app: web.Application) -> None:
    """``on_shutdown``: end the state streams so shutdown does not wait for their clients."""
    app[BROADCASTER].close()
