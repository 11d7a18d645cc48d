"""Small, real fake LLM runtimes: aiohttp applications that speak a runtime's HTTP API.

Tests, benchmarks and plugin authors run these on a loopback port instead of installing Ollama,
vLLM or Open WebUI. Each fake answers with the demo backend's deterministic echo (the handlers
of :class:`~llamapool.backends.demo.EchoResponder`), serves the runtime's routes at the runtime's
own paths, and records every request it receives in a :class:`FakeLog`, so a test can check what
reached the runtime: which path, which headers (never the client's key), which body, and over
how many TCP connections.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from llamapool.backends.demo import EchoOptions, EchoResponder
from llamapool.plugin_api import ANTHROPIC_PATHS, OLLAMA_PATHS, OPENAI_PATHS

if TYPE_CHECKING:
    from aiohttp.test_utils import TestServer

#: What Ollama serves: its native API and the OpenAI and Anthropic paths it implements.
OLLAMA_SERVES = OLLAMA_PATHS | {
    "/api/tags",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
}
#: What vLLM serves (of what the echo runtime can answer): every OpenAI and Anthropic path.
VLLM_SERVES = OPENAI_PATHS | ANTHROPIC_PATHS | {"/v1/models"}

__all__ = [
    "FakeLog",
    "RecordedRequest",
    "Replay",
    "create_broken_app",
    "create_fake_ollama_app",
    "create_fake_openwebui_app",
    "create_fake_vllm_app",
    "create_replay_app",
    "fake_log",
    "loaded_model",
    "serve_app",
    "tool_call_chat",
]


@attrs.frozen
class RecordedRequest:
    """One request as the fake runtime received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return orjson.loads(self.body)


@attrs.define
class FakeLog:
    """What a fake runtime has received, in arrival order.

    ``peers`` holds the distinct client ``(host, port)`` pairs seen: many requests over few peer
    ports prove the client reuses keep-alive connections.
    """

    requests: list[RecordedRequest] = attrs.Factory(list)
    peers: set[tuple[str, int]] = attrs.Factory(set)

    @property
    def paths(self) -> list[str]:
        """The path of every request received, in order."""
        return [r.path for r in self.requests]


FAKE_LOG = web.AppKey("llamapool_fake_log", FakeLog)


def fake_log(app: web.Application) -> FakeLog:
    """The log of a fake made by this module (``server.app`` in an ``aiohttp_server`` test)."""
    return app[FAKE_LOG]


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Read the body here: aiohttp caches it, so the handler reads the same bytes again.
    body = await request.read()
    headers = {str(k): v for k, v in request.headers.items()}
    log = request.app[FAKE_LOG]
    log.requests.append(RecordedRequest(request.method, request.path, headers, body))
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer:
        log.peers.add((str(peer[0]), int(peer[1])))
    return await handler(request)


def _require_key(api_key: str, unauthorized: dict[str, Any]) -> Middleware:
    """Answer 401 with the runtime's own error body unless the request carries the key."""
    expected = f"Bearer {api_key}"

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            body = orjson.dumps(unauthorized)
            return web.Response(status=401, body=body, content_type="application/json")
        return await handler(request)

    return require_key


def _app(api_key: str, unauthorized: dict[str, Any]) -> web.Application:
    """An empty fake: records everything (even refused requests), then checks the key if set."""
    middlewares: list[Middleware] = [_record]
    if api_key:
        middlewares.append(_require_key(api_key, unauthorized))
    app = web.Application(middlewares=middlewares)
    app[FAKE_LOG] = FakeLog()
    return app


def _responder(models: Sequence[str], chunk_delay: float) -> EchoResponder:
    ids = (models,) if isinstance(models, str) else tuple(models)
    return EchoResponder(EchoOptions(models=ids, chunk_delay=chunk_delay))


def create_fake_ollama_app(
    *,
    models: Sequence[str] = ("llama3:8b",),
    chunk_delay: float = 0.0,
    api_key: str = "",
    loaded: Sequence[str] | None = None,
) -> web.Application:
    """Ollama: its native ``/api/*`` and its OpenAI- and Anthropic-compatible ``/v1/*`` at
    their usual paths (no rerank, audio or images: those answer 404, as on Ollama).

    ``GET /api/ps`` lists ``loaded`` (default: every model) as loaded in memory, with the
    fields Ollama reports (see :func:`loaded_model`). Ollama has no API key of its own;
    ``api_key`` imitates one behind an authenticating proxy.
    """
    app = _app(api_key, {"error": "unauthorized"})
    echo = _responder(models, chunk_delay)
    echo.add_routes(app, OLLAMA_SERVES)
    in_memory = echo.options.models if loaded is None else tuple(loaded)

    async def api_ps(request: web.Request) -> web.Response:
        body = orjson.dumps({"models": [loaded_model(m) for m in in_memory]})
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/api/ps", api_ps)
    return app


def loaded_model(model: str) -> dict[str, Any]:
    """The entry the fake Ollama's ``/api/ps`` gives ``model``: an 8B Q4_0 model held whole in
    VRAM until a fixed time, as Ollama reports one."""
    size = 4_920_753_328
    return {
        "name": model,
        "model": model,
        "size": size,
        "digest": hashlib.sha256(model.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_0",
        },
        "expires_at": "2030-01-01T00:05:00Z",
        "size_vram": size,
        "context_length": 4096,
    }


def create_fake_vllm_app(
    *,
    models: Sequence[str] = ("meta-llama/Llama-3.1-8B-Instruct",),
    chunk_delay: float = 0.0,
    api_key: str = "",
) -> web.Application:
    """vLLM, or any OpenAI-compatible server (llama.cpp's, LM Studio): the OpenAI API and
    Anthropic's ``/v1/messages``, rerank and score included.

    Every ``/api/*`` path answers 404, as it does on vLLM. ``api_key`` mirrors ``--api-key``.
    A chat request that offers tools is answered with a call of the first one, as vLLM with a
    tool parser does (see :func:`tool_call_chat`).
    """
    app = _app(api_key, {"error": "Unauthorized"})
    echo = _responder(models, chunk_delay)
    echo.add_routes(app, VLLM_SERVES - {"/v1/chat/completions"})
    app.router.add_post("/v1/chat/completions", _with_tool_calls(echo.chat_completions))
    return app


def tool_call_chat(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed answer that calls the first tool a chat request offers, with
    arguments ``{"text": <the last user message>}`` split over three deltas; the last chunk
    carries usage. A non-streamed answer holds the same call whole."""
    function = body["tools"][0]["function"]["name"]
    messages = [m for m in body.get("messages", []) if m.get("role") == "user"]
    content = messages[-1].get("content", "") if messages else ""
    text = content if isinstance(content, str) else ""
    arguments = orjson.dumps({"text": text}).decode()
    pieces = [arguments[:5], arguments[5:9], arguments[9:]]
    base = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 0,
            "model": body.get("model")}  # fmt: skip
    first = {"index": 0, "id": "call_fake_0", "type": "function",
             "function": {"name": function, "arguments": pieces[0]}}  # fmt: skip
    deltas = [first] + [{"index": 0, "function": {"arguments": p}} for p in pieces[1:]]
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [d]},
                              "finish_reason": None}]}
        for d in deltas
    ]  # fmt: skip
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    usage = {"prompt_tokens": len(text.split()), "completion_tokens": 3, "total_tokens": 0}
    usage["total_tokens"] = usage["prompt_tokens"] + 3
    chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def _with_tool_calls(chat: Handler) -> Handler:
    async def chat_completions(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not (isinstance(body, dict) and body.get("tools")):
            return await chat(request)
        chunks = tool_call_chat(body)
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for chunk in chunks:
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        call = {"id": "call_fake_0", "type": "function", "function": {
            "name": body["tools"][0]["function"]["name"],
            "arguments": "".join(
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                for c in chunks[:3]
            ),
        }}  # fmt: skip
        answer = {
            "id": "chatcmpl-tool", "object": "chat.completion", "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [call]}}],
            "usage": chunks[-1]["usage"],
        }  # fmt: skip
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    return chat_completions


def create_fake_openwebui_app(
    *,
    models: Sequence[str] = ("llama3:8b",),
    chunk_delay: float = 0.0,
    api_key: str = "sk-webui",
    openai_models: Sequence[str] = (),
) -> web.Application:
    """Open WebUI with its Ollama connection: the routes a worker can use, key on every one.

    The routes follow Open WebUI's ``backend/open_webui/main.py`` and ``routers/ollama.py``:
    ``/api/models``, ``/api/chat/completions`` and the OpenAI-compatible ``/api/embeddings``
    (each also under ``/api/v1/``), and the Ollama proxy under ``/ollama`` (native ``/api/*``
    and OpenAI ``/v1/*``). There is no top-level text-completions route. Open WebUI checks the
    bearer key on all of them; an empty ``api_key`` turns the check off.

    ``models`` come from the Ollama connection (``owned_by: ollama``); ``openai_models`` from
    an OpenAI connection, served by Open WebUI's own routes but not by its Ollama proxy.
    """
    ollama = _responder(models, chunk_delay)
    ids = list(ollama.options.models)
    echo = _responder([*ids, *openai_models], chunk_delay) if openai_models else ollama
    owners = {**dict.fromkeys(ids, "ollama"), **dict.fromkeys(openai_models, "openai")}

    async def api_models(request: web.Request) -> web.Response:
        data = [
            {"id": m, "name": m, "object": "model", "created": 0, "owned_by": owner}
            for m, owner in owners.items()
        ]
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    app = _app(api_key, {"detail": "Not authenticated"})
    routes = []
    for prefix in ("/api", "/api/v1"):
        routes += [
            web.get(f"{prefix}/models", api_models),
            web.post(f"{prefix}/chat/completions", echo.chat_completions),
            web.post(f"{prefix}/embeddings", echo.embeddings),
        ]
    routes += [
        web.get("/ollama/api/tags", ollama.api_tags),
        web.post("/ollama/api/generate", ollama.api_generate),
        web.post("/ollama/api/chat", ollama.api_chat),
        web.post("/ollama/api/embed", ollama.api_embed),
        web.post("/ollama/api/embeddings", ollama.api_embeddings),
        web.post("/ollama/api/show", ollama.api_show),
        web.get("/ollama/v1/models", ollama.v1_models),
        web.post("/ollama/v1/chat/completions", ollama.chat_completions),
        web.post("/ollama/v1/completions", ollama.completions),
    ]
    app.add_routes(routes)
    return app


def create_broken_app(
    *, status: int = 500, body: bytes = b"internal error", content_type: str = "text/plain"
) -> web.Application:
    """A runtime that answers every request with the same status and body.

    For testing how a backend plugin reports a runtime that fails (500), answers a web page
    instead of JSON (200, ``text/html``), or answers JSON of the wrong shape.
    """

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    app = _app("", {})
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@attrs.frozen
class Replay:
    """A recorded answer: its status, content type, and body as the chunks the runtime wrote."""

    chunks: Sequence[bytes]
    content_type: str = "text/event-stream"
    status: int = 200

    @property
    def body(self) -> bytes:
        """The whole body, as a client must receive it."""
        return b"".join(self.chunks)


def create_replay_app(
    replies: Mapping[str, Replay], *, models: Sequence[str] = ("replayed-model",)
) -> web.Application:
    """An OpenAI-compatible runtime (like vLLM) that answers each ``POST`` path in ``replies``
    with its recorded bytes, writing each chunk on its own.

    For fidelity tests: whatever shape a real runtime streams (tool-call argument deltas,
    reasoning fields, Responses API or Anthropic events), a test records it once and checks
    that the client gets exactly those bytes. ``GET /v1/models`` lists ``models``.
    """

    async def v1_models(request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "replay"} for m in models]
        body = orjson.dumps({"object": "list", "data": data})
        return web.Response(body=body, content_type="application/json")

    def answer(reply: Replay) -> Handler:
        async def replay(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(
                status=reply.status, headers={"Content-Type": reply.content_type}
            )
            await response.prepare(request)
            for chunk in reply.chunks:
                await response.write(chunk)
            await response.write_eof()
            return response

        return replay

    app = _app("", {})
    app.router.add_get("/v1/models", v1_models)
    for path, reply in replies.items():
        app.router.add_post(path, answer(reply))
    return app


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free loopback port for the block; yield its base URL (no trailing slash).

    For benchmarks and CLI tests that run outside pytest's ``aiohttp_server`` fixture.
    """
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def url_of(server: TestServer) -> str:
    """The base URL (no trailing slash) of a fake run with pytest-aiohttp's ``aiohttp_server``."""
    return f"http://{server.host}:{server.port}"
