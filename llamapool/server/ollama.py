"""Ollama's native API: generation relayed to workers, ``/api/tags`` answered by the pool."""

from __future__ import annotations

import hashlib
import time

from aiohttp import web

from llamapool.server.appkeys import POOL
from llamapool.server.http_errors import Flavor, json_response
from llamapool.server.relay import proxy_route

generate = proxy_route(Flavor.OLLAMA, stream_default=True)
chat = proxy_route(Flavor.OLLAMA, stream_default=True)
embed = proxy_route(Flavor.OLLAMA, stream_default=False)


async def tags(request: web.Request) -> web.Response:
    """``GET /api/tags``: the models of every connected worker, in Ollama's shape."""
    models = []
    for info in request.app[POOL].models():
        models.append(
            {
                "name": info.id,
                "model": info.id,
                "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created)),
                "size": 0,
                "digest": hashlib.sha256(info.id.encode()).hexdigest(),
                "details": {},
            }
        )
    return json_response({"models": models})
