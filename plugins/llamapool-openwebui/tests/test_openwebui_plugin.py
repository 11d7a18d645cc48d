"""The Open WebUI backend plugin against a real fake Open WebUI on a loopback port: the contract
every plugin keeps (``llamapool.testing.contract``), then what only Open WebUI does."""

# House style puts the expected value first (assert expected == actual).

from __future__ import annotations

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import OLLAMA_PATHS, OPENAI_PATHS, BackendError, BackendSettings
from llamapool.testing import create_fake_openwebui_app, fake_log, url_of
from llamapool.testing.contract import BackendContract
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


class TestOpenWebUIBackend(BackendContract):
    backend = OpenWebUIBackend
    entry_point, distribution = "openwebui", "llamapool-openwebui"
    fake = staticmethod(create_fake_openwebui_app)
    models_path, model_list = "/api/models", "an Open WebUI model list"
    model, bodies, routes, key = MODEL, BODIES, ROUTES, KEY


def backend_for(url: str, api_key: str = KEY) -> OpenWebUIBackend:
    return OpenWebUIBackend(BackendSettings(url=url, api_key=api_key))


async def test_list_models_without_a_key_says_one_is_needed(aiohttp_server: AiohttpServer) -> None:
    """Without a key, list_models explains that Open WebUI needs one, and sends nothing."""
    server = await aiohttp_server(create_fake_openwebui_app())

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match="Open WebUI needs an API key"):
            await backend_for(url_of(server), api_key="").list_models(http)

    assert [] == fake_log(server.app).requests


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
