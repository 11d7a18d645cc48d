"""The Ollama backend plugin against a real fake Ollama on a loopback port: the contract every
plugin keeps (``llamapool.testing.contract``), then what only Ollama does."""

# House style puts the expected value first (assert expected == actual).

from __future__ import annotations

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import LOADED_MODELS_PATH, OLLAMA_PATHS, BackendSettings
from llamapool.testing import create_fake_ollama_app, url_of
from llamapool.testing.contract import BackendContract
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


class TestOllamaBackend(BackendContract):
    backend = OllamaBackend
    entry_point, distribution = "ollama", "llamapool-ollama"
    fake = staticmethod(create_fake_ollama_app)  # Ollama's key: an authenticating proxy's
    models_path, model_list = "/api/tags", "an Ollama model list"
    model, bodies = MODEL, BODIES


def backend_for(url: str) -> OllamaBackend:
    return OllamaBackend(BackendSettings(url=url))


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
