"""The vLLM backend plugin against a real fake OpenAI-compatible server on a loopback port: the
contract every plugin keeps (``llamapool.testing.contract``), then what only vLLM does."""

# House style puts the expected value first (assert expected == actual).

from __future__ import annotations

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import ANTHROPIC_PATHS, OPENAI_PATHS, BackendSettings
from llamapool.testing import create_fake_vllm_app, fake_log, url_of
from llamapool.testing.contract import BackendContract
from llamapool_vllm import VllmBackend

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
#: A valid request body for every path the backend serves.
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi pool"}]},
    "/v1/completions": {"model": MODEL, "prompt": "hi pool"},
    "/v1/embeddings": {"model": MODEL, "input": "hi pool"},
}


class TestVllmBackend(BackendContract):
    backend = VllmBackend
    entry_point, distribution = "vllm", "llamapool-vllm"
    fake = staticmethod(create_fake_vllm_app)  # api_key: vLLM's --api-key
    models_path, model_list = "/v1/models", "an OpenAI model list"
    model, bodies = MODEL, BODIES


def backend_for(url: str, api_key: str = "") -> VllmBackend:
    return VllmBackend(BackendSettings(url=url, api_key=api_key))


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_list_models_accepts_the_openai_base_url(
    aiohttp_server: AiohttpServer, suffix: str
) -> None:
    """A base URL given with or without /v1 lists from /v1/models, never /v1/v1/models."""
    server = await aiohttp_server(create_fake_vllm_app())

    async with aiohttp.ClientSession() as http:
        models = await backend_for(url_of(server) + suffix).list_models(http)

    assert [MODEL] == models
    assert ["/v1/models"] == fake_log(server.app).paths


def test_serves_the_openai_and_anthropic_paths() -> None:
    """An OpenAI-compatible server has no Ollama-native API: every OpenAI and Anthropic path
    is served, no Ollama one."""
    assert OPENAI_PATHS | ANTHROPIC_PATHS == VllmBackend.paths


@pytest.mark.parametrize("path", sorted(OPENAI_PATHS | ANTHROPIC_PATHS))
@pytest.mark.parametrize("url", ["http://gpu-box:8000", "http://gpu-box:8000/v1/"])
def test_upstream_url_keeps_the_path(url: str, path: str) -> None:
    """Each public path maps to the same path on the server, with or without /v1 in the URL."""
    assert f"http://gpu-box:8000{path}" == backend_for(url).upstream_url(path)


def test_default_url_is_the_local_vllm() -> None:
    """Without a URL the backend talks to vLLM's standard local port."""
    assert "http://127.0.0.1:8000/v1/completions" == backend_for("").upstream_url("/v1/completions")


async def test_chat_answer_is_the_echo(aiohttp_server: AiohttpServer) -> None:
    """The fake server answers a chat completion with the deterministic echo of the prompt."""
    server = await aiohttp_server(create_fake_vllm_app())
    backend = backend_for(url_of(server))
    url = backend.upstream_url("/v1/chat/completions")

    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=BODIES["/v1/chat/completions"]) as resp,
    ):
        answer = await resp.json()

    assert "echo: hi pool" == answer["choices"][0]["message"]["content"]


async def test_ollama_native_paths_are_absent(aiohttp_server: AiohttpServer) -> None:
    """The server answers 404 on Ollama's native API, which is why the backend never offers it."""
    server = await aiohttp_server(create_fake_vllm_app())

    async with aiohttp.ClientSession() as http, http.get(url_of(server) + "/api/tags") as resp:
        status = resp.status

    assert 404 == status
