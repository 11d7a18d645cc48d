"""The Ollama backend plugin against a real fake Ollama on a loopback port."""

# House style puts the expected value first (assert expected == actual).

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import LOADED_MODELS_PATH, OLLAMA_PATHS, BackendError, BackendSettings
from llamapool.testing import create_broken_app, create_fake_ollama_app, fake_log
from llamapool.worker.loader import available, load_backend
from llamapool_ollama import OllamaBackend

MODEL = "llama3:8b"
CHAT = [{"role": "user", "content": "hello pool"}]
#: A valid request body for every path the backend serves.
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": CHAT},
    "/v1/completions": {"model": MODEL, "prompt": "hello pool"},
    "/v1/embeddings": {"model": MODEL, "input": "hello pool"},
    "/api/generate": {"model": MODEL, "prompt": "hello pool", "stream": False},
    "/api/chat": {"model": MODEL, "messages": CHAT, "stream": False},
    "/api/embed": {"model": MODEL, "input": "hello pool"},
}


def url_of(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}"


def backend_for(url: str, api_key: str = "") -> OllamaBackend:
    return OllamaBackend(BackendSettings(url=url, api_key=api_key))


async def test_list_models_returns_the_tag_names(aiohttp_server: AiohttpServer) -> None:
    """list_models answers the names in Ollama's GET /api/tags."""
    server = await aiohttp_server(create_fake_ollama_app(models=["llama3:8b", "qwen2.5:7b"]))

    async with aiohttp.ClientSession() as http:
        models = await backend_for(url_of(server)).list_models(http)

    assert ["llama3:8b", "qwen2.5:7b"] == models
    assert ["/api/tags"] == fake_log(server.app).paths


async def test_list_models_sends_the_backend_key(aiohttp_server: AiohttpServer) -> None:
    """With a backend key, list_models authenticates to a key-protected Ollama."""
    server = await aiohttp_server(create_fake_ollama_app(api_key="proxy-key"))

    async with aiohttp.ClientSession() as http:
        models = await backend_for(url_of(server), "proxy-key").list_models(http)

    assert [MODEL] == models
    assert "Bearer proxy-key" == fake_log(server.app).requests[0].headers["Authorization"]


async def test_list_models_raises_when_ollama_is_down(unused_tcp_port: int) -> None:
    """Connection refused becomes a BackendError naming the URL."""
    url = f"http://127.0.0.1:{unused_tcp_port}"

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match=f"GET {url}/api/tags failed"):
            await backend_for(url).list_models(http)


async def test_list_models_raises_on_401(aiohttp_server: AiohttpServer) -> None:
    """A refused key becomes a BackendError naming the status."""
    server = await aiohttp_server(create_fake_ollama_app(api_key="proxy-key"))

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match="answered HTTP 401"):
            await backend_for(url_of(server), "wrong-key").list_models(http)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (500, b"internal error", "text/plain", "answered HTTP 500"),
        (200, b"<html>a web page</html>", "text/html", "did not answer JSON"),
        (200, b'{"object": "list"}', "application/json", "did not answer an Ollama model list"),
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


SERVED = OLLAMA_PATHS | {
    LOADED_MODELS_PATH,
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
}


def test_serves_the_ollama_and_its_compatible_paths() -> None:
    """Ollama serves every Ollama-native path (its loaded models too) and the OpenAI and
    Anthropic ones it implements, not audio, images or rerank."""
    assert SERVED == OllamaBackend.paths


@pytest.mark.parametrize("path", sorted(SERVED))
def test_upstream_url_keeps_the_path(path: str) -> None:
    """Each public path maps to the same path on Ollama."""
    backend = backend_for("http://gpu-box:11434/")

    assert f"http://gpu-box:11434{path}" == backend.upstream_url(path)


def test_default_url_is_the_local_ollama() -> None:
    """Without a URL the backend talks to Ollama's standard local port."""
    assert "http://127.0.0.1:11434/api/chat" == backend_for("").upstream_url("/api/chat")


def test_auth_headers_carry_only_the_backend_key() -> None:
    """auth_headers is the bearer backend key, or nothing without one."""
    assert {"Authorization": "Bearer proxy-key"} == dict(
        backend_for("", "proxy-key").auth_headers()
    )
    assert {} == dict(backend_for("").auth_headers())


def test_found_through_its_entry_point() -> None:
    """The loader finds the backend as ollama, from the llamapool-ollama distribution."""
    assert OllamaBackend == load_backend("ollama")
    assert "llamapool-ollama" == available()["ollama"].dist.name


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_request_reaches_ollama_unchanged(aiohttp_server: AiohttpServer, path: str) -> None:
    """A request to upstream_url with auth_headers gets Ollama's answer, body and key intact."""
    server = await aiohttp_server(create_fake_ollama_app(api_key="proxy-key"))
    backend = backend_for(url_of(server), "proxy-key")
    body = orjson.dumps(BODIES[path])

    async with (
        aiohttp.ClientSession() as http,
        http.post(backend.upstream_url(path), data=body, headers=backend.auth_headers()) as resp,
    ):
        answer = await resp.json()

    sent = fake_log(server.app).requests[0]
    assert (200, path, body) == (resp.status, sent.path, sent.body)
    assert "Bearer proxy-key" == sent.headers["Authorization"]
    assert MODEL == answer["model"]


async def test_chat_answer_is_the_echo(aiohttp_server: AiohttpServer) -> None:
    """The fake Ollama answers a chat with the deterministic echo of the prompt."""
    server = await aiohttp_server(create_fake_ollama_app())
    backend = backend_for(url_of(server))

    async with (
        aiohttp.ClientSession() as http,
        http.post(backend.upstream_url("/api/chat"), json=BODIES["/api/chat"]) as resp,
    ):
        answer = await resp.json()

    assert "echo: hello pool" == answer["message"]["content"]
