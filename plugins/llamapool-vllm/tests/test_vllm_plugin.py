"""The vLLM backend plugin against a real fake OpenAI-compatible server on a loopback port."""

# House style puts the expected value first (assert expected == actual).

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from llamapool.plugin_api import ANTHROPIC_PATHS, OPENAI_PATHS, BackendError, BackendSettings
from llamapool.testing import create_broken_app, create_fake_vllm_app, fake_log
from llamapool.worker.loader import available, load_backend
from llamapool_vllm import VllmBackend

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
#: A valid request body for every path the backend serves.
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi pool"}]},
    "/v1/completions": {"model": MODEL, "prompt": "hi pool"},
    "/v1/embeddings": {"model": MODEL, "input": "hi pool"},
}


def url_of(server: TestServer) -> str:
    return f"http://{server.host}:{server.port}"


def backend_for(url: str, api_key: str = "") -> VllmBackend:
    return VllmBackend(BackendSettings(url=url, api_key=api_key))


async def test_list_models_returns_the_model_ids(aiohttp_server: AiohttpServer) -> None:
    """list_models answers the ids in GET /v1/models."""
    server = await aiohttp_server(create_fake_vllm_app(models=[MODEL, "Qwen/Qwen2.5-7B"]))

    async with aiohttp.ClientSession() as http:
        models = await backend_for(url_of(server)).list_models(http)

    assert [MODEL, "Qwen/Qwen2.5-7B"] == models
    assert ["/v1/models"] == fake_log(server.app).paths


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


async def test_list_models_sends_the_api_key(aiohttp_server: AiohttpServer) -> None:
    """With an API key, list_models authenticates to a server started with --api-key."""
    server = await aiohttp_server(create_fake_vllm_app(api_key="vllm-key"))

    async with aiohttp.ClientSession() as http:
        models = await backend_for(url_of(server), "vllm-key").list_models(http)

    assert [MODEL] == models
    assert "Bearer vllm-key" == fake_log(server.app).requests[0].headers["Authorization"]


async def test_list_models_raises_when_the_server_is_down(unused_tcp_port: int) -> None:
    """Connection refused becomes a BackendError naming the URL."""
    url = f"http://127.0.0.1:{unused_tcp_port}"

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match=f"GET {url}/v1/models failed"):
            await backend_for(url).list_models(http)


async def test_list_models_raises_on_401(aiohttp_server: AiohttpServer) -> None:
    """A missing key becomes a BackendError naming the status."""
    server = await aiohttp_server(create_fake_vllm_app(api_key="vllm-key"))

    async with aiohttp.ClientSession() as http:
        with pytest.raises(BackendError, match="answered HTTP 401"):
            await backend_for(url_of(server)).list_models(http)


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (500, b"internal error", "text/plain", "answered HTTP 500"),
        (200, b"<html>a web page</html>", "text/html", "did not answer JSON"),
        (200, b'{"models": []}', "application/json", "did not answer an OpenAI model list"),
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


def test_auth_headers_carry_only_the_api_key() -> None:
    """auth_headers is the bearer API key, or nothing without one."""
    assert {"Authorization": "Bearer vllm-key"} == dict(backend_for("", "vllm-key").auth_headers())
    assert {} == dict(backend_for("").auth_headers())


def test_found_through_its_entry_point() -> None:
    """The loader finds the backend as vllm, from the llamapool-vllm distribution."""
    assert VllmBackend == load_backend("vllm")
    assert "llamapool-vllm" == available()["vllm"].dist.name


@pytest.mark.parametrize("path", sorted(BODIES))
async def test_request_reaches_the_server_unchanged(
    aiohttp_server: AiohttpServer, path: str
) -> None:
    """A request to upstream_url with auth_headers gets the server's answer, body and key intact."""
    server = await aiohttp_server(create_fake_vllm_app(api_key="vllm-key"))
    backend = backend_for(url_of(server) + "/v1", "vllm-key")
    body = orjson.dumps(BODIES[path])

    async with (
        aiohttp.ClientSession() as http,
        http.post(backend.upstream_url(path), data=body, headers=backend.auth_headers()) as resp,
    ):
        answer = await resp.json()

    sent = fake_log(server.app).requests[0]
    assert (200, path, body) == (resp.status, sent.path, sent.body)
    assert "Bearer vllm-key" == sent.headers["Authorization"]
    assert MODEL == answer["model"]


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
