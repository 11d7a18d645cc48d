"""Ollama's native API, the parts the pool answers itself.

Generation and embeddings are relayed (see :mod:`llamapool.server.routes`); the model list,
the version, the running models (merged from what the workers' backends report), model
details for backends that are not Ollama, the probe at ``/`` and a clear refusal of model
management are the pool's to answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from llamapool.plugin_api import LOADED_MODELS_PATH
from llamapool.server.appkeys import POOL
from llamapool.server.http_errors import Flavor, error_response, json_response
from llamapool.server.keys import visible
from llamapool.server.pool import ModelInfo, WorkerHandle, fallback_names
from llamapool.server.relay import MODELS_IN_FLIGHT, AskFailed, ask_worker

log = structlog.get_logger("llamapool.server")

#: The Ollama version the pool says it is. Clients read it to check the server is Ollama and,
#: some, that it is recent enough for what they use (``/api/embed``, tool calls, the
#: ``capabilities`` of ``/api/show``); the pool relays those, so it names a release that has
#: them. It is fixed rather than taken from the workers: Go workers do not report it.
OLLAMA_VERSION = "0.6.4"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _digest(model: str) -> str:
    return hashlib.sha256(model.encode()).hexdigest()


def _details() -> dict[str, Any]:
    """Ollama's ``details``: what the pool cannot know stays empty, never invented."""
    return {
        "parent_model": "",
        "format": "",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


async def tags(request: web.Request) -> web.Response:
    """``GET /api/tags``: the models of every connected worker, in Ollama's shape, once each."""
    models = []
    for info in request.app[POOL].models():
        if not visible(request, info.id):
            continue
        models.append(
            {
                "name": info.id,
                "model": info.id,
                "modified_at": _iso(info.created),
                "size": 0,
                "digest": _digest(info.id),
                "details": {},
            }
        )
    return json_response({"models": models})


async def root(request: web.Request) -> web.Response:
    """``GET /`` and ``HEAD /``: Ollama's probe answer; a browser is sent to the dashboard."""
    if "text/html" in request.headers.get("Accept", ""):
        raise web.HTTPFound("/dashboard/")
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(request: web.Request) -> web.Response:
    """``GET /api/version`` (no key, as on Ollama): the Ollama version clients may rely on."""
    return json_response({"version": OLLAMA_VERSION})


#: How long ``/api/ps`` waits for the workers it asks: one slower than this is left out.
PS_TIMEOUT = 2.0
#: Workers ``/api/ps`` asks at once.
PS_CONCURRENCY = 32
#: Workers ``/api/ps`` asks in all (the first by name): its answer stays quick in a large pool.
PS_MAX_WORKERS = 256
#: The largest ``/api/ps`` answer read from one worker.
PS_MAX_BYTES = 1024 * 1024


async def ps(request: web.Request) -> web.Response:
    """``GET /api/ps``: the models loaded anywhere in the pool, in Ollama's shape, once each.

    Every worker whose backend serves ``/api/ps`` (Ollama, and Go workers, which proxy to
    Ollama) is asked for what it holds in memory, in parallel, and its entries are kept as the
    backend wrote them (size, VRAM, expiry, details). A worker that is full, fails, or does not
    answer within :data:`PS_TIMEOUT` is left out. Models with requests in flight on any worker
    (vLLM, llama.cpp, a worker left out) are added with what the pool knows of them.
    """
    app = request.app
    asked = sorted(
        (w for w in app[POOL] if w.routable and (w.paths is None or LOADED_MODELS_PATH in w.paths)),
        key=lambda w: (w.name, w.id),
    )[:PS_MAX_WORKERS]
    deadline = asyncio.get_running_loop().time() + PS_TIMEOUT
    gate = asyncio.Semaphore(PS_CONCURRENCY)
    answers = await asyncio.gather(*(_loaded(app, w, gate, deadline) for w in asked))
    models: dict[str, dict[str, Any]] = {}
    for entries in answers:
        for name, entry in entries:
            if visible(request, name):
                models.setdefault(name, entry)
    for model, count in app[MODELS_IN_FLIGHT].items():
        if count > 0 and model not in models and visible(request, model):
            models[model] = _in_flight(model)
    return json_response({"models": [models[name] for name in sorted(models)]})


async def _loaded(
    app: web.Application, worker: WorkerHandle, gate: asyncio.Semaphore, deadline: float
) -> list[tuple[str, dict[str, Any]]]:
    """The entries of one worker's ``/api/ps``, by model name; none when it cannot say."""
    async with gate:
        try:
            body = await ask_worker(
                app, worker, LOADED_MODELS_PATH, deadline=deadline, limit=PS_MAX_BYTES
            )
            return _entries(body)
        except AskFailed as exc:
            log.debug("ps_worker_skipped", worker_id=worker.id, reason=str(exc))
            return []


def _entries(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The models of an Ollama ``/api/ps`` answer, each with its name (``name`` or ``model``)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AskFailed("the answer is not JSON") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise AskFailed("the answer is not an Ollama model list")
    entries = []
    for entry in models:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if isinstance(name, str) and name:
            entries.append((name, {**entry, "name": name, "model": entry.get("model") or name}))
    return entries


def _in_flight(model: str) -> dict[str, Any]:
    """An ``/api/ps`` entry for a model being served by a backend that does not list its own."""
    return {
        "name": model,
        "model": model,
        "size": 0,
        "digest": _digest(model),
        "details": _details(),
        "expires_at": _iso(time.time() + 300),
        "size_vram": 0,
    }


#: What a backend's paths say a model can do, in ``/api/show``'s ``capabilities``.
_CAPABILITIES = (
    ("completion", ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")),
    ("embedding", ("/v1/embeddings", "/api/embed", "/api/embeddings")),
)


def _capabilities(workers: tuple[WorkerHandle, ...]) -> list[str]:
    paths: set[str] = set()
    for worker in workers:
        if worker.paths is None:
            return ["completion"]
        paths |= worker.paths
    return [name for name, needs in _CAPABILITIES if paths.intersection(needs)]


async def show_from_pool(request: web.Request, model: str) -> web.Response:
    """``POST /api/show`` for a model no Ollama worker serves: what the pool knows of it.

    The shape is Ollama's, as its clients read it (``model_info`` must be present); the
    capabilities follow from the API paths its workers' backends serve. The context length
    is not known to the pool, so it is not made up.
    """
    by_id: dict[str, ModelInfo] = {m.id: m for m in request.app[POOL].models()}
    info = next((by_id[n] for n in fallback_names(model) if n in by_id), None)
    if info is None:
        return error_response(Flavor.OLLAMA, 404, f"model '{model}' not found")
    backends = sorted({w.backend for w in info.workers if w.backend})
    return json_response(
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": _details(),
            "model_info": {"general.basename": info.id, "llamapool.backends": backends},
            "capabilities": _capabilities(info.workers),
            "modified_at": _iso(info.created),
        }
    )


async def not_managed(request: web.Request) -> web.Response:
    """``/api/pull``, ``push``, ``create``, ``copy``, ``delete``: the pool does not manage
    models; each worker's runtime does."""
    action = request.path.rsplit("/", 1)[-1]
    return error_response(
        Flavor.OLLAMA,
        403,
        f"llamapool does not manage models ({action} is not available through the pool): "
        "manage them on the worker machines' own runtimes",
    )


#: Ollama's model management endpoints, with their methods.
MANAGEMENT = (
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
)
