"""The OpenAI API, the parts the pool answers itself: the model list and one model.

Completions, embeddings and the rest are relayed (see :mod:`llamapool.server.routes`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamapool.server.appkeys import POOL
from llamapool.server.http_errors import Flavor, error_response, json_response
from llamapool.server.pool import ModelInfo, fallback_names


def _model(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": ",".join(w.name for w in info.workers),
    }


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: every model some connected worker serves, once each."""
    models = request.app[POOL].models()
    return json_response({"object": "list", "data": [_model(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``; the id may hold ``:`` and ``/``, and aliases resolve."""
    wanted = request.match_info["id"]
    by_id = {m.id: m for m in request.app[POOL].models()}
    for name in fallback_names(wanted):
        if name in by_id:
            return json_response(_model(by_id[name]))
    return error_response(
        Flavor.OPENAI, 404, f"model {wanted!r} is not served by any worker", code="model_not_found"
    )
