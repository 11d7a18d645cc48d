"""The other half of :mod:`.peer`: a request another server sent for a worker connected here."""

from __future__ import annotations

import orjson
import structlog
from aiohttp import web

from llamapool.server.appkeys import LOG_THROTTLE, POOL, SCHEDULER
from llamapool.server.cluster.membership import Cluster
from llamapool.server.cluster.peer import (
    AUTH,
    MODEL,
    PATH,
    REFUSED,
    REFUSED_BUSY,
    REFUSED_GONE,
    REFUSED_RETRY,
    STREAM,
    WORKER,
)
from llamapool.server.relay import NotStarted, relay_forwarded

log = structlog.get_logger("llamapool.server")

CLUSTER = web.AppKey("cluster", Cluster)


async def relay_for_peer(request: web.Request) -> web.StreamResponse:
    """``* /cluster/v1/relay``: serve a request on the worker another server chose.

    Only a member of the cluster gets in (a valid request token, see :mod:`.auth`); the
    ``X-Llamapool-*`` headers are read here and nowhere else, so nothing a client or a worker
    sends can pass for them.
    """
    cluster = request.app[CLUSTER]
    origin = cluster.auth.origin(request.headers.get(AUTH, ""))
    if origin is None:
        request.app[LOG_THROTTLE].log(log.warning, "cluster_request_rejected", reason="token")
        return _refuse(401, "unauthorized", "a valid cluster token is required")
    path = request.headers.get(PATH, "")
    worker = request.app[POOL].get(request.headers.get(WORKER, ""))
    if worker is None or worker.server or not path.startswith("/"):
        return _refuse(503, REFUSED_GONE, "the worker is not connected to this server")
    model = request.headers.get(MODEL, "")
    if model:
        request.app[SCHEDULER].taken_elsewhere(model)
    cluster.forwarded(worker, origin, +1)
    try:
        return await relay_forwarded(
            request,
            worker,
            path=path,
            model=model,
            stream=request.headers.get(STREAM) == "1",
        )
    except NotStarted as exc:
        return _refuse(503, REFUSED_BUSY if exc.busy else REFUSED_RETRY, str(exc))
    finally:
        cluster.forwarded(worker, origin, -1)


def _refuse(status: int, why: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": {"message": message, "type": "cluster", "code": why}}),
        content_type="application/json",
        headers={REFUSED: why},
    )
