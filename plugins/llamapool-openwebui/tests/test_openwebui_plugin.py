"""The Open WebUI backend plugin against a real fake Open WebUI on a loopback port."""

# House style puts the expected value first (assert expected == actual).

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import OLLAMA_PATHS, OPENAI_PATHS, BackendError, BackendSettings
from llamapool.testing import create_broken_app, create_fake_openwebui_app, fake_log
from llamapool.worker.loader import available, load_backend
from llamapool_openwebui import OpenWebUIBackend

KEY = "sk-webui"
MODEL = "llama3:8b"
CHAT = [{"role": "user", "content": "hello webui"}]
#: Open WebUI's route for each public path, as its main.py and Ollama router declare them.
ROUTES = {
    "/v1/chat/completions": "/api/chat/completions",
    "/v1/embeddings": "/api/embeddings",
    "/v1/completions": "/ollama/v1/completions",
    "/api/generate": "/ollama/api/generate",
    "/api/chat": "/ollama/api/chat",
    "/api/embed": "/ollama/api/embed",
    "/api/embeddings": "/ollama/api/embeddings",
    "/api/show": "/ollama/api/show",
}
#: A valid request body for every path the backend serves.
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": CHAT},
    "/v1/completions": {"model": MODEL, "prompt": "hello webui"},
    "/v1/embeddings": {"model": MODEL, "input": "hello webui"},
    "/api/generate": {"model": MODEL, "prompt": "hello webui", "stream": False},
    "/api/chat": {"model": MODEL, "messages": CHAT, "stream": False},
    "/api/embed": {"model": MODEL, "input": "hello webui"},
}


def url_of(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}"


def backend_for(url: str, api_key: str = KEY) -> OpenWebUIBackend:
    return OpenWebUIBackend(BackendSettings(url=url, api_key=api_key))


async def test_list_models_returns_the_model_ids(aiohttp_server: AiohttpServer) -> None:
    """list_models answers the ids in GET /api/models, sent with the bearer key."""
    server = await aiohttp_server(create_fake_openwebui_app(models=[MODEL, "gpt-4o-mini"]))

    async with aiohttp.ClientSession() as http:
        models = await backend_for(url_of(server)).list_models(http)

    sent = fake_log(server.app).requests
    assert [MODEL, "gpt-4o-mini"] == models
    assert [("/api/models", f"Bearer {KEY}")] == [
        (r.path, r.headers["Authorization"]) for r in sent
    ]


async def test_list_models_without_a_key_says_one_is_needed(aiohttp_server: AiohttpServer) -> None:
    """Without a key, list_models explains that Open WebUI needs one, and sends nothing."""
    server = await aiohttp_server(create_fake_openwebui_app())

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match="Open WebUI needs an API key"):
            await backend_for(url_of(server), api_key="").list_models(http)

    assert [] == fake_log(server.app).requests


async def test_list_models_raises_when_open_webui_is_down(unused_tcp_port: int) -> None:
    """Connection refused becomes a BackendError naming the URL."""
    url = f"http://127.0.0.1:{unused_tcp_port}"

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match=f"GET {url}/api/models failed"):
            await backend_for(url).list_models(http)


async def test_list_models_raises_on_401(aiohttp_server: AiohttpServer) -> None:
    """A wrong key becomes a BackendError naming the status."""
    server = await aiohttp_server(create_fake_openwebui_app())

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match="answered HTTP 401"):
            await backend_for(url_of(server), api_key="sk-wrong").list_models(http)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (500, b"internal error", "text/plain", "answered HTTP 500"),
        (200, b"<html>the Open WebUI app</html>", "text/html", "did not answer JSON"),
        (200, b'{"models": []}', "application/json", "did not answer an Open WebUI model list"),
    ],
)
async def test_list_models_raises_on_a_bad_answer(
    aiohttp_server: AiohttpServer, status: int, body: bytes, content_type: str, message: str
) -> None:
    """A failing, non-JSON or wrongly shaped answer becomes a BackendError saying which."""
    app = create_broken_app(status=status, body=body, content_type=content_type)
    server = await aiohttp_server(app)

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match=message):
            await backend_for(url_of(server)).list_models(http)


def test_serves_every_public_path() -> None:
    """Open WebUI serves OpenAI chat, completions and embeddings and every Ollama-native
    path, some through its Ollama proxy."""
    core = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    assert core | OLLAMA_PATHS == OpenWebUIBackend.paths
    assert core < OPENAI_PATHS


@pytest.mark.parametrize(("path", "route"), sorted(ROUTES.items()))
def test_upstream_url_maps_to_open_webui_routes(path: str, route: str) -> None:
    """Each public path maps to Open WebUI's own route for it."""
    assert f"http://webui:3000{route}" == backend_for("http://webui:3000/").upstream_url(path)


def test_upstream_url_refuses_a_path_it_does_not_serve() -> None:
    """A path outside the backend's paths is a BackendError, not a guessed URL."""
    with pytest.raises(BackendError, match="does not serve /v1/models"):
        backend_for("").upstream_url("/v1/models")


def test_default_url_is_the_local_open_webui() -> None:
    """Without a URL the backend talks to Open WebUI's usual local port."""
    assert "http://127.0.0.1:3000/api/chat/completions" == backend_for("").upstream_url(
        "/v1/chat/completions"
    )


def test_auth_headers_carry_only_the_api_key() -> None:
    """auth_headers is the bearer Open WebUI key, or nothing without one."""
    assert {"Authorization": f"Bearer {KEY}"} == dict(backend_for("").auth_headers())
    assert {} == dict(backend_for("", api_key="").auth_headers())


def test_found_through_its_entry_point() -> None:
    """The loader finds the backend as openwebui, from the llamapool-openwebui distribution."""
    assert OpenWebUIBackend == load_backend("openwebui")
    assert "llamapool-openwebui" == available()["openwebui"].dist.name


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_request_reaches_open_webui_unchanged(
    aiohttp_server: AiohttpServer, path: str
) -> None:
    """A request to upstream_url with auth_headers gets Open WebUI's answer, body and key intact."""
    server = await aiohttp_server(create_fake_openwebui_app())
    backend = backend_for(url_of(server))
    body = orjson.dumps(BODIES[path])

    async with (
        aiohttp.ClientSession() as http,
        http.post(backend.upstream_url(path), data=body, headers=backend.auth_headers()) as resp,
    ):
        answer = await resp.json()

    sent = fake_log(server.app).requests[0]
    assert (200, ROUTES[path], body) == (resp.status, sent.path, sent.body)
    assert f"Bearer {KEY}" == sent.headers["Authorization"]
    assert MODEL == answer["model"]


async def test_chat_answer_is_the_echo(aiohttp_server: AiohttpServer) -> None:
    """The fake Open WebUI answers an OpenAI chat with the deterministic echo of the prompt."""
    server = await aiohttp_server(create_fake_openwebui_app())
    backend = backend_for(url_of(server))
    url = backend.upstream_url("/v1/chat/completions")

    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=BODIES["/v1/chat/completions"], headers=backend.auth_headers()) as resp,
    ):
        answer = await resp.json()

    assert "echo: hello webui" == answer["choices"][0]["message"]["content"]


async def test_ollama_paths_are_native_only_for_ollama_models(
    aiohttp_server: AiohttpServer,
) -> None:
    """After a listing, Ollama's paths are native for models of the Ollama connection only, so
    the worker translates the others'; OpenAI paths serve every model."""
    server = await aiohttp_server(
        create_fake_openwebui_app(models=[MODEL], openai_models=["gpt-4o-mini"])
    )
    backend = backend_for(url_of(server))

    async with aiohttp.ClientSession() as http:
        models = await backend.list_models(http)

    native = backend.native_models("/api/chat")
    assert [MODEL, "gpt-4o-mini"] == models
    assert native is not None
    assert (True, False) == (MODEL in native, "gpt-4o-mini" in native)
    assert backend.native_models("/v1/chat/completions") is None
