"""The built-in demo backend: a deterministic echo LLM, so the pool runs with nothing installed.

It is registered in the ``llamapool.backends`` entry-point group like any third-party plugin.
Its runtime is a small aiohttp app (:class:`EchoResponder`) that the backend starts in-process
on a loopback port, so requests take exactly the path they take to a real runtime.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, ClassVar

import aiohttp
import attrs
import orjson
from aiohttp import web

from llamapool.backends import _echo, _echo_apis
from llamapool.plugin_api import (
    ANTHROPIC_PATHS,
    OLLAMA_PATHS,
    OPENAI_PATHS,
    Backend,
    BackendError,
    BackendSettings,
    fetch_json,
)

DEMO_MODELS = ("demo",)
#: How many Responses API answers the echo runtime keeps for follow-ups, oldest dropped first.
STORED_RESPONSES = 1000


@attrs.frozen
class EchoOptions:
    """How the echo runtime behaves; tests and benchmarks tune it."""

    models: tuple[str, ...] = DEMO_MODELS
    #: Seconds between streamed tokens (0: as fast as possible).
    chunk_delay: float = 0.0


class EchoResponder:
    """Request handlers speaking the OpenAI, Anthropic and Ollama HTTP APIs with echo answers."""

    def __init__(self, options: EchoOptions | None = None) -> None:
        self.options = options or EchoOptions()
        self._ids = itertools.count(1)
        #: Stored Responses API answers, with their prompt, by id (``store`` is true unless
        #: the request says otherwise, as on OpenAI and vLLM).
        self._stored: OrderedDict[str, tuple[dict[str, Any], str]] = OrderedDict()

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

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request, openai=True)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self._stored:
            raise _openai_error(
                404,
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        prompt = _echo_apis.responses_prompt(body)
        answer = _capped(prompt, _int(body.get("max_output_tokens")))
        rid = _echo_apis.response_id()
        stored = _echo_apis.response(model, answer, rid=rid, previous=previous)
        if body.get("store", True) is not False:
            self._stored[rid] = (stored, prompt)
            while len(self._stored) > STORED_RESPONSES:
                self._stored.popitem(last=False)
        if not body.get("stream"):
            return _json(stored)
        events = _echo_apis.response_events(model, answer, rid=rid, previous=previous)
        return await self._stream(request, "text/event-stream", _sse(events, named=True))

    async def stored_response(self, request: web.Request) -> web.Response:
        """``GET``/``DELETE /v1/responses/{id}`` and ``GET .../input_items``."""
        rid = request.match_info["id"]
        if rid not in self._stored:
            raise _openai_error(404, f"Response with id '{rid}' not found.")
        stored, prompt = self._stored[rid]
        if request.method == "DELETE":
            del self._stored[rid]
            return _json(_echo_apis.deleted(rid))
        if request.path.endswith("/input_items"):
            return _json(_echo_apis.input_items(rid, prompt))
        return _json(stored)

    async def cancel_response(self, request: web.Request) -> web.Response:
        """``POST /v1/responses/{id}/cancel``: the echo never runs in the background."""
        rid = request.match_info["id"]
        if rid not in self._stored:
            raise _openai_error(404, f"Response with id '{rid}' not found.")
        raise _openai_error(400, "Only background responses can be cancelled.")

    async def rerank(self, request: web.Request) -> web.Response:
        body, model = await self._body(request, openai=True)
        documents = body.get("documents")
        query = body.get("query")
        return _json(
            _echo_apis.rerank(
                model,
                query if isinstance(query, str) else "",
                documents if isinstance(documents, list) else [],
                rid=f"rerank-demo-{next(self._ids)}",
            )
        )

    async def score(self, request: web.Request) -> web.Response:
        body, model = await self._body(request, openai=True)
        first = _echo.inputs(body.get("text_1"))
        texts = _echo.inputs(body.get("text_2"))
        rid = f"score-demo-{next(self._ids)}"
        return _json(_echo_apis.score(model, first[0] if first else "", texts, rid=rid))

    async def transcriptions(self, request: web.Request) -> web.Response:
        """Transcriptions and translations: the echo names the uploaded file and its size."""
        fields, filename, size = await _read_form(request)
        if fields.get("model") not in self.options.models:
            raise _error(404, f"model {fields.get('model')!r} not found", openai=True)
        return _json(_echo_apis.transcription(filename, size))

    async def speech(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, openai=True)
        text = body.get("input") if isinstance(body.get("input"), str) else ""
        return web.Response(body=b"ID3" + str(text).encode(), content_type="audio/mpeg")

    async def image_generations(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, openai=True)
        return _json(_echo_apis.images(_int(body.get("n")) or 1))

    async def image_edits(self, request: web.Request) -> web.Response:
        fields, _, _ = await _read_form(request)
        if fields.get("model") not in self.options.models:
            raise _error(404, f"model {fields.get('model')!r} not found", openai=True)
        n = fields.get("n", "1")
        return _json(_echo_apis.images(int(n) if n.isdigit() else 1))

    # Anthropic ------------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._body(request, openai=True)
        answer = _capped(_echo.chat_prompt(body), _int(body.get("max_tokens")))
        rid = f"msg_{uuid.uuid4().hex}"
        if not body.get("stream"):
            return _json(_echo_apis.message(model, answer, rid=rid))
        events = _echo_apis.message_events(model, answer, rid=rid)
        return await self._stream(request, "text/event-stream", _sse(events, named=True))

    async def count_tokens(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, openai=True)
        return _json(_echo_apis.count_tokens(_echo.chat_prompt(body)))

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

    async def api_embeddings(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, openai=False)
        prompt = body.get("prompt")
        return _json(_echo_apis.ollama_embeddings(prompt if isinstance(prompt, str) else ""))

    async def api_show(self, request: web.Request) -> web.Response:
        _, model = await self._body(request, openai=False)
        return _json(_echo_apis.ollama_show(model))

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
        # Ollama still takes the older "name" where it takes "model" (as the pool routes).
        model = body.get("model") if openai or "model" in body else body.get("name")
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

    def routes(self) -> list[web.RouteDef]:
        """Every route at its usual path (what the demo runtime and a fake Ollama serve)."""
        post = {
            "/v1/chat/completions": self.chat_completions,
            "/v1/completions": self.completions,
            "/v1/embeddings": self.embeddings,
            "/v1/responses": self.responses,
            "/v1/rerank": self.rerank,
            "/rerank": self.rerank,
            "/v1/score": self.score,
            "/v1/audio/transcriptions": self.transcriptions,
            "/v1/audio/translations": self.transcriptions,
            "/v1/audio/speech": self.speech,
            "/v1/images/generations": self.image_generations,
            "/v1/images/edits": self.image_edits,
            "/v1/messages": self.messages,
            "/v1/messages/count_tokens": self.count_tokens,
            "/api/generate": self.api_generate,
            "/api/chat": self.api_chat,
            "/api/embed": self.api_embed,
            "/api/embeddings": self.api_embeddings,
            "/api/show": self.api_show,
        }
        return [
            web.get("/v1/models", self.v1_models),
            web.get("/api/tags", self.api_tags),
            *(web.post(path, handler) for path, handler in post.items()),
            web.get("/v1/responses/{id}", self.stored_response),
            web.delete("/v1/responses/{id}", self.stored_response),
            web.get("/v1/responses/{id}/input_items", self.stored_response),
            web.post("/v1/responses/{id}/cancel", self.cancel_response),
        ]

    def add_routes(self, app: web.Application, paths: Collection[str] | None = None) -> None:
        """Serve the routes at ``paths`` (every route when ``None``; the stored responses of
        the Responses API wherever ``/v1/responses`` is served)."""

        def wanted(path: str) -> bool:
            if path.startswith("/v1/responses/"):
                path = "/v1/responses"
            return paths is None or path in paths

        app.add_routes(r for r in self.routes() if isinstance(r, web.RouteDef) and wanted(r.path))


def _sse(events: Iterable[dict[str, Any]], *, named: bool) -> Iterator[bytes]:
    """Server-sent events; ``named`` adds the ``event:`` line Anthropic and Responses use."""
    for event in events:
        head = b"event: " + str(event["type"]).encode() + b"\n" if named else b""
        yield head + b"data: " + orjson.dumps(event) + b"\n\n"


async def _read_form(request: web.Request) -> tuple[dict[str, str], str, int]:
    """A multipart form's text fields, and the name and size of its (last) file.

    Parsed from the whole body (``request.read()``, which the fakes' recorder has cached).
    """
    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    form = BytesParser(policy=HTTP).parsebytes(head + await request.read())
    if not form.is_multipart():
        raise _error(400, "the body is not a multipart form", openai=True)
    fields: dict[str, str] = {}
    filename, size = "", 0
    for part in form.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if part.get_filename() is not None:
            filename, size = str(part.get_filename()), len(data)
        elif isinstance(name, str):
            fields[name] = data.decode("utf-8", "replace")
    return fields, filename, size


def _capped(prompt: str, limit: int | None) -> _echo.Echo:
    """The echo, cut at ``limit`` tokens (a cap, as Anthropic's and Responses' limits are)."""
    answer = _echo.echo(prompt)
    if limit is not None and 0 < limit < answer.completion_tokens:
        return _echo.echo(prompt, limit=limit)
    return answer


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> web.HTTPException:
    """An error as OpenAI answers it, ``param`` and ``code`` included."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound}[status]
    return cls(text=orjson.dumps({"error": error}).decode(), content_type="application/json")


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
    """Serves every OpenAI, Anthropic and Ollama path from an in-process echo runtime."""

    paths: ClassVar[frozenset[str]] = OPENAI_PATHS | ANTHROPIC_PATHS | OLLAMA_PATHS
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
