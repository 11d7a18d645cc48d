"""The built-in demo backend: a deterministic echo LLM, so the pool runs with nothing installed.

It is registered in the ``llamapool.backends`` entry-point group like any third-party plugin.
Its runtime is a small aiohttp app (:class:`EchoResponder`) that the backend starts in-process
on a loopback port, so requests take exactly the path they take to a real runtime.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from typing import Any, ClassVar

import aiohttp
import attrs
import orjson
from aiohttp import web

from llamapool.backends import _echo
from llamapool.plugin_api import (
    OLLAMA_PATHS,
    OPENAI_PATHS,
    Backend,
    BackendError,
    BackendSettings,
    fetch_json,
)

DEMO_MODELS = ("demo",)


@attrs.frozen
class EchoOptions:
    """How the echo runtime behaves; tests and benchmarks tune it."""

    models: tuple[str, ...] = DEMO_MODELS
    #: Seconds between streamed tokens (0: as fast as possible).
    chunk_delay: float = 0.0


class EchoResponder:
    """Request handlers speaking the OpenAI and Ollama HTTP APIs with echo answers."""

    def __init__(self, options: EchoOptions | None = None) -> None:
        self.options = options or EchoOptions()
        self._ids = itertools.count(1)

    # OpenAI ---------------------------------------------------------------------------------

    async def v1_models(self, request: web.Request) -> web.Response:
        return _json(_echo.openai_models(list(self.options.models)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request, openai=True)
        answer = _echo.echo(_echo.chat_prompt(body), limit=_int(body.get("max_tokens")))
        return await self._openai_answer(request, body, model, answer, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request, openai=True)
        prompt = " ".join(_echo.inputs(body.get("prompt")))
        answer = _echo.echo(prompt, limit=_int(body.get("max_tokens")))
        return await self._openai_answer(request, body, model, answer, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        body, model = await self._body(request, openai=True)
        return _json(_echo.openai_embeddings(model, _echo.inputs(body.get("input"))))

    async def _openai_answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        answer: _echo.Echo,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-demo-{next(self._ids)}"
        if not body.get("stream"):
            make = _echo.openai_chat if chat else _echo.openai_completion
            return _json(make(model, answer, rid=rid))
        options = body.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        events = _echo.openai_stream(model, answer, rid=rid, chat=chat, include_usage=usage)
        lines = (b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
        return await self._stream(request, "text/event-stream", [*lines, b"data: [DONE]\n\n"])

    # Ollama ---------------------------------------------------------------------------------

    async def api_tags(self, request: web.Request) -> web.Response:
        return _json(_echo.ollama_tags(list(self.options.models)))

    async def api_generate(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request, openai=False)
        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        return await self._ollama_answer(request, body, model, str(prompt), chat=False)

    async def api_chat(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request, openai=False)
        return await self._ollama_answer(request, body, model, _echo.chat_prompt(body), chat=True)

    async def api_embed(self, request: web.Request) -> web.Response:
        body, model = await self._body(request, openai=False)
        return _json(_echo.ollama_embed(model, _echo.inputs(body.get("input"))))

    async def _ollama_answer(
        self, request: web.Request, body: dict[str, Any], model: str, prompt: str, *, chat: bool
    ) -> web.StreamResponse:
        options = body.get("options")
        limit = _int(options.get("num_predict")) if isinstance(options, dict) else None
        answer = _echo.echo(prompt, limit=limit)
        if body.get("stream", True) is False:  # Ollama streams unless told not to
            return _json(_echo.ollama_final(model, answer, chat=chat, text=answer.text))
        lines = (
            orjson.dumps(line) + b"\n" for line in _echo.ollama_stream(model, answer, chat=chat)
        )
        return await self._stream(request, "application/x-ndjson", lines)

    # plumbing -------------------------------------------------------------------------------

    async def _body(self, request: web.Request, *, openai: bool) -> tuple[dict[str, Any], str]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise _error(400, "request body is not valid JSON", openai=openai) from None
        if not isinstance(body, dict):
            raise _error(400, "request body must be a JSON object", openai=openai)
        model = body.get("model")
        if model not in self.options.models:
            raise _error(404, f"model {model!r} not found", openai=openai)
        return body, str(model)

    async def _stream(
        self, request: web.Request, content_type: str, chunks: Iterable[bytes]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for i, chunk in enumerate(chunks):
            if i and self.options.chunk_delay:
                await asyncio.sleep(self.options.chunk_delay)
            await response.write(chunk)
        await response.write_eof()
        return response

    def add_routes(self, app: web.Application) -> None:
        """Serve every route at its usual path (what the demo runtime and a fake Ollama do)."""
        app.add_routes(
            [
                web.get("/v1/models", self.v1_models),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.post("/v1/embeddings", self.embeddings),
                web.get("/api/tags", self.api_tags),
                web.post("/api/generate", self.api_generate),
                web.post("/api/chat", self.api_chat),
                web.post("/api/embed", self.api_embed),
            ]
        )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str, *, openai: bool) -> web.HTTPException:
    """An error in the shape the runtime being imitated uses."""
    body: Any
    if openai:
        body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    else:
        body = {"error": message}
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound}[status]
    return cls(text=orjson.dumps(body).decode(), content_type="application/json")


def create_echo_app(options: EchoOptions | None = None) -> web.Application:
    """The demo runtime as an aiohttp application."""
    app = web.Application()
    EchoResponder(options).add_routes(app)
    return app


class DemoBackend(Backend):
    """Serves every OpenAI and Ollama path from an in-process echo runtime."""

    paths: ClassVar[frozenset[str]] = OPENAI_PATHS | OLLAMA_PATHS
    default_url: ClassVar[str] = ""

    def __init__(self, settings: BackendSettings, *, options: EchoOptions | None = None) -> None:
        super().__init__(settings)
        self._options = options or EchoOptions()
        self._runner: web.AppRunner | None = None
        self._url = ""

    @property
    def base_url(self) -> str:
        if not self._url:
            raise BackendError("the demo backend has not been started")
        return self._url

    async def start(self) -> None:
        self._runner = web.AppRunner(create_echo_app(self._options), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._url = ""

    async def list_models(self, http: aiohttp.ClientSession) -> list[str]:
        data = await fetch_json(http, self.base_url + "/api/tags")
        return [m["name"] for m in data["models"]]
