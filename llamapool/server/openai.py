"""The OpenAI API, the parts the pool answers itself (the model list and one model), and the
Responses API's stored responses, relayed to the worker that holds them.

Completions, embeddings and the rest are relayed by model (see :mod:`llamapool.server.routes`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from llamapool.server.appkeys import POOL
from llamapool.server.http_errors import Flavor, error_response, json_response
from llamapool.server.keys import visible
from llamapool.server.pool import ModelInfo, fallback_names
from llamapool.server.relay import AFFINITY, find_pin, not_found, relay


def _model(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": ",".join(w.name for w in info.workers),
    }


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: every model some connected worker serves, once each."""
    models = [m for m in request.app[POOL].models() if visible(request, m.id)]
    return json_response({"object": "list", "data": [_model(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{id}``; the id may hold ``:`` and ``/``, and aliases resolve."""
    wanted = request.match_info["id"]
    by_id = {m.id: m for m in request.app[POOL].models() if visible(request, m.id)}
    for name in fallback_names(wanted):
        if name in by_id:
            return json_response(_model(by_id[name]))
    return error_response(
        Flavor.OPENAI, 404, f"model {wanted!r} is not served by any worker", code="model_not_found"
    )


async def stored_response(request: web.Request) -> web.StreamResponse:
    """``GET`` and ``DELETE /v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``,
    ``POST /v1/responses/{id}/cancel``: relayed, query string and all, to the worker whose
    backend stored the response; a 404 in OpenAI's shape when the pool does not know the id or
    that worker has left."""
    response_id = request.match_info["id"]
    pin = await find_pin(request.app, response_id)
    if pin is None:
        return not_found(response_id, "the pool knows no worker holding it", previous=False)
    if isinstance(pin, web.Response):
        return pin
    answer = await relay(
        request,
        flavor=Flavor.OPENAI,
        body=await request.read(),
        model=pin.model,
        stream=request.query.get("stream") == "true",
        rewritable=False,
        pin=pin,
        usage=False,
        path=request.path_qs,
    )
    if request.method == "DELETE" and 200 <= answer.status < 300:
        request.app[AFFINITY].forget(response_id)
    return answer
