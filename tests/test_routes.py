"""Every model endpoint of the route table, relayed by model to a worker whose backend serves
the path: JSON and multipart bodies, byte for byte, without the client's key."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import ANTHROPIC_PATHS, OLLAMA_PATHS, OPENAI_PATHS
from llamapool.server.routes import MODEL_ROUTES, Body
from llamapool.testing import create_fake_ollama_app, create_fake_vllm_app, fake_log

from .conftest import API_KEY, PoolServer, StartWorker, url_of

MODEL = "llama3:8b"
CHAT = [{"role": "user", "content": "hello pool"}]
#: A body each JSON route's echo runtime answers with 200.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": CHAT},
    "/v1/completions": {"model": MODEL, "prompt": "hello pool"},
    "/v1/embeddings": {"model": MODEL, "input": "hello pool"},
    "/v1/responses": {"model": MODEL, "input": "hello pool"},
    "/v1/rerank": {"model": MODEL, "query": "pool", "documents": ["a pool", "a lake"]},
    "/rerank": {"model": MODEL, "query": "pool", "documents": ["a pool", "a lake"]},
    "/v1/score": {"model": MODEL, "text_1": "pool", "text_2": ["a pool", "a lake"]},
    "/v1/audio/speech": {"model": MODEL, "input": "hello pool", "voice": "alloy"},
    "/v1/images/generations": {"model": MODEL, "prompt": "a pool"},
    "/v1/messages": {"model": MODEL, "max_tokens": 16, "messages": CHAT},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": CHAT},
    "/api/generate": {"model": MODEL, "prompt": "hello pool", "stream": False},
    "/api/chat": {"model": MODEL, "messages": CHAT, "stream": False},
    "/api/embed": {"model": MODEL, "input": "hello pool"},
    "/api/embeddings": {"model": MODEL, "prompt": "hello pool"},
    "/api/show": {"model": MODEL},
}
JSON_ROUTES = [r.path for r in MODEL_ROUTES if r.body is Body.JSON]
VLLM_PATHS = sorted(p for p in JSON_ROUTES if not p.startswith("/api/"))
OLLAMA_NATIVE = sorted(p for p in JSON_ROUTES if p.startswith("/api/"))


async def start_backend(
    aiohttp_server: AiohttpServer,
    server: PoolServer,
    start_worker: StartWorker,
    plugin: str,
    make_app: Any,
    **worker: Any,
) -> TestServer:
    backend = await aiohttp_server(make_app(models=[MODEL]))
    await start_worker(server, plugin, backend_url=url_of(backend), **worker)
    return backend


async def post(
    server: PoolServer, path: str, *, headers: dict[str, str], **kwargs: Any
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.url + path, headers=headers, **kwargs) as resp,
    ):
        return resp.status, await resp.read()


def test_the_route_table_is_every_path_a_backend_can_declare() -> None:
    """The server relays exactly the OpenAI, Anthropic and Ollama paths of the plugin API."""
    assert OPENAI_PATHS | ANTHROPIC_PATHS | OLLAMA_PATHS == {r.path for r in MODEL_ROUTES}
    assert len(MODEL_ROUTES) == len({r.path for r in MODEL_ROUTES})


@pytest.mark.parametrize("path", VLLM_PATHS)
async def test_openai_and_anthropic_paths_reach_a_vllm_worker(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker, path: str
) -> None:
    """Each OpenAI and Anthropic route is relayed to a vLLM worker at the same path, body
    unchanged, without the client's key in either header."""
    backend = await start_backend(
        aiohttp_server, pool_server, start_worker, "vllm", create_fake_vllm_app
    )
    body = orjson.dumps(BODIES[path])
    headers = {**pool_server.auth, "x-api-key": API_KEY, "Content-Type": "application/json"}

    status, _ = await post(pool_server, path, headers=headers, data=body)

    sent = [r for r in fake_log(backend.app).requests if r.method == "POST"]
    assert [(path, body)] == [(r.path, r.body) for r in sent]
    assert 200 == status
    lowered = {k.lower() for k in sent[0].headers}
    assert "authorization" not in lowered
    assert "x-api-key" not in lowered


@pytest.mark.parametrize("path", OLLAMA_NATIVE)
async def test_ollama_paths_reach_an_ollama_worker(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker, path: str
) -> None:
    """Each Ollama-native route is relayed to an Ollama worker at the same path."""
    backend = await start_backend(
        aiohttp_server, pool_server, start_worker, "ollama", create_fake_ollama_app
    )

    status, _ = await post(pool_server, path, headers=pool_server.auth, json=BODIES[path])

    assert (200, [path]) == (
        status,
        [r.path for r in fake_log(backend.app).requests if r.method == "POST"],
    )


async def test_a_path_goes_only_to_a_worker_whose_backend_serves_it(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """With one model on an Ollama and a vLLM worker, rerank goes to vLLM and Ollama's model
    details to Ollama, every time."""
    ollama = await start_backend(
        aiohttp_server, pool_server, start_worker, "ollama", create_fake_ollama_app
    )
    vllm = await start_backend(
        aiohttp_server, pool_server, start_worker, "vllm", create_fake_vllm_app
    )

    for _ in range(3):
        for path in ("/v1/rerank", "/api/show"):
            status, _ = await post(pool_server, path, headers=pool_server.auth, json=BODIES[path])
            assert 200 == status

    def posts(backend: TestServer) -> set[str]:
        return {r.path for r in fake_log(backend.app).requests if r.method == "POST"}

    assert ({"/api/show"}, {"/v1/rerank"}) == (posts(ollama), posts(vllm))


async def test_a_path_the_runtime_lacks_gets_the_runtimes_own_answer(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """A vLLM that happens to lack an endpoint answers its own 404, relayed as it was."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": MODEL}]})

    bare = web.Application()
    bare.router.add_get("/v1/models", models)
    backend = await aiohttp_server(bare)
    await start_worker(pool_server, "vllm", backend_url=url_of(backend))

    status, raw = await post(
        pool_server, "/v1/score", headers=pool_server.auth, json=BODIES["/v1/score"]
    )

    assert (404, b"404: Not Found") == (status, raw)


# --- multipart ------------------------------------------------------------------------------


async def test_openai_sdk_transcription_is_routed_by_the_forms_model(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """An audio upload from the openai SDK is routed by its form's model and reaches the
    backend whole, under the boundary the client chose."""
    backend = await start_backend(
        aiohttp_server, pool_server, start_worker, "vllm", create_fake_vllm_app
    )
    audio = bytes(range(256)) * 64  # binary, with CR LF and dashes inside
    client = AsyncOpenAI(base_url=pool_server.url + "/v1", api_key=API_KEY)

    result = await client.audio.transcriptions.create(
        model=MODEL, file=("hello.wav", audio, "audio/wav")
    )
    await client.close()

    sent = fake_log(backend.app).requests[-1]
    boundary = sent.headers["Content-Type"].partition("boundary=")[2]
    assert f"echo: hello.wav ({len(audio)} bytes)" == result.text
    assert "/v1/audio/transcriptions" == sent.path
    assert sent.body.startswith(b"--" + boundary.encode())
    assert audio in sent.body


async def test_a_multipart_body_reaches_the_backend_byte_for_byte(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The exact bytes of a multipart body and its Content-Type, boundary included, are what
    the backend receives."""
    backend = await start_backend(
        aiohttp_server, pool_server, start_worker, "vllm", create_fake_vllm_app
    )
    boundary = "pool-boundary-42"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + bytes(range(256))
        + (
            f"\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="model"\r\n\r\n'
            f"{MODEL}\r\n--{boundary}--\r\n"
        ).encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}"

    status, _ = await post(
        pool_server,
        "/v1/audio/transcriptions",
        headers={**pool_server.auth, "Content-Type": content_type},
        data=body,
    )

    sent = fake_log(backend.app).requests[-1]
    assert (200, body, content_type) == (status, sent.body, sent.headers["Content-Type"])


@pytest.mark.parametrize("path", ["/v1/audio/translations", "/v1/images/edits"])
async def test_multipart_routes_relay_any_form_with_a_model(
    aiohttp_server: AiohttpServer, pool_server: PoolServer, start_worker: StartWorker, path: str
) -> None:
    """Translations and image edits are routed by the form's model field too."""
    backend = await start_backend(
        aiohttp_server, pool_server, start_worker, "vllm", create_fake_vllm_app
    )
    form = aiohttp.FormData()
    form.add_field("file", b"\x89PNG--\r\n--x", filename="a.png", content_type="image/png")
    form.add_field("model", MODEL)
    form.add_field("prompt", "make it blue")

    status, _ = await post(pool_server, path, headers=pool_server.auth, data=form)

    assert (200, [path]) == (status, [r.path for r in fake_log(backend.app).requests][-1:])


@pytest.mark.parametrize(
    ("fields", "content_type"),
    [
        ({"prompt": "no model"}, None),
        ({"model": ""}, None),
        ({"model": MODEL, "stream": "maybe"}, None),
        ({"model": MODEL}, "multipart/form-data"),  # no boundary
        ({"model": MODEL}, "application/json"),
    ],
    ids=["no-model", "empty-model", "bad-stream", "no-boundary", "not-multipart"],
)
async def test_unroutable_forms_answer_400(
    pool_server: PoolServer, fields: dict[str, str], content_type: str | None
) -> None:
    """A form without a usable model, or a body that is not the form it should be, is a 400
    in OpenAI's shape."""
    form = aiohttp.FormData()
    form.add_field("file", b"RIFF....", filename="a.wav", content_type="audio/wav")
    for name, value in fields.items():
        form.add_field(name, value)
    payload = form()
    headers = {**pool_server.auth, "Content-Type": content_type or payload.content_type}
    writer = _Collect()
    await payload.write(writer)  # type: ignore[arg-type]

    status, raw = await post(
        pool_server, "/v1/audio/transcriptions", headers=headers, data=bytes(writer.data)
    )

    assert (400, "invalid_request") == (status, orjson.loads(raw)["error"]["code"])


class _Collect:
    """A stream writer that keeps what a payload writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.data += chunk


async def test_a_multipart_body_over_the_size_limit_answers_413(
    start_server: Any, start_worker: StartWorker
) -> None:
    """An upload larger than the body limit is refused with 413, in OpenAI's shape."""
    server = await start_server(max_body_size=64 * 1024)
    form = aiohttp.FormData()
    form.add_field("model", "demo")
    form.add_field("file", b"x" * 100 * 1024, filename="a.wav", content_type="audio/wav")

    status, raw = await post(server, "/v1/audio/transcriptions", headers=server.auth, data=form)

    assert 413 == status
    assert ["error"] == list(orjson.loads(raw))


# --- the openai SDK on the newer endpoints --------------------------------------------------


async def test_openai_sdk_responses_and_embeddings_through_the_demo(
    pool_server: PoolServer, start_worker: StartWorker
) -> None:
    """The openai SDK's Responses API (plain and streamed) and embeddings work through the
    pool against the demo backend."""
    await start_worker(pool_server, "demo")
    client = AsyncOpenAI(base_url=pool_server.url + "/v1", api_key=API_KEY)

    answer = await client.responses.create(model="demo", input="hello pool")
    deltas = [
        event.delta
        async for event in await client.responses.create(
            model="demo", input="hello pool", stream=True
        )
        if event.type == "response.output_text.delta"
    ]
    vectors = await client.embeddings.create(model="demo", input=["a", "b"])
    await client.close()

    assert "echo: hello pool" == answer.output_text
    assert "echo: hello pool" == "".join(deltas)
    assert [0, 1] == [d.index for d in vectors.data]
