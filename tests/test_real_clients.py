"""The official client SDKs against a real pool: ``serve`` and ``work`` processes, one worker on
a fake Ollama, one on a fake vLLM, one on the demo backend.

Each SDK is used as its users use it, with nothing but a base URL and the API key: the
``openai`` SDK (chat, Responses with a follow-up, embeddings, an audio transcription, streams),
the ``anthropic`` SDK (which sends the key as ``x-api-key``), and the ``ollama`` client (chat,
generate, embed, show, ps, version) against the Ollama worker and, translated by its worker,
the vLLM one.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import ollama
import openai
import pytest

from llamapool.testing import create_fake_ollama_app, create_fake_vllm_app, serve_app
from llamapool.testing.fakes import loaded_model

from .cli_helpers import API_KEY, running_server, running_worker

OLLAMA_MODEL = "llama3:8b"
VLLM_MODEL = "qwen2.5-7b-instruct"
#: Seconds between the fake vLLM's streamed tokens: a long answer stays in flight a while.
VLLM_TOKEN_DELAY = 0.02


@pytest.fixture
async def pool_url() -> AsyncIterator[str]:
    """A pool of CLI processes: a server and three workers (Ollama, vLLM, demo)."""
    async with (
        serve_app(create_fake_ollama_app(models=[OLLAMA_MODEL])) as ollama_url,
        serve_app(
            create_fake_vllm_app(models=[VLLM_MODEL], chunk_delay=VLLM_TOKEN_DELAY)
        ) as vllm_url,
        running_server() as (_, url),
        running_worker(url, "--backend", "ollama", "--backend-url", ollama_url),
        running_worker(url, "--backend", "vllm", "--backend-url", vllm_url),
        running_worker(url, "--backend", "demo"),
    ):
        yield url


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


async def test_openai_sdk_chat_responses_embeddings_and_audio(pool_url: str) -> None:
    """The openai SDK's chat (whole and streamed), Responses (with a follow-up naming the
    previous response), embeddings and an audio transcription all work through the pool."""
    messages: Any = [{"role": "user", "content": "hello pool"}]
    async with openai_client(pool_url) as client:
        chat = await client.chat.completions.create(model=VLLM_MODEL, messages=messages)
        stream = await client.chat.completions.create(
            model=OLLAMA_MODEL, messages=messages, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        first = await client.responses.create(model="demo", input="first turn")
        follow_up = await client.responses.create(
            model="demo", input="second turn", previous_response_id=first.id
        )
        embeddings = await client.embeddings.create(model=VLLM_MODEL, input=["a", "b"])
        transcript = await client.audio.transcriptions.create(
            model="demo", file=("hello.wav", io.BytesIO(b"RIFF" + b"\0" * 60), "audio/wav")
        )

    assert ("echo: hello pool", "echo: hello pool") == (chat.choices[0].message.content, streamed)
    assert ("echo: first turn", "echo: second turn") == (first.output_text, follow_up.output_text)
    assert 2 == len(embeddings.data)
    assert "hello.wav" in transcript.text


async def test_anthropic_sdk_messages_whole_and_streamed(pool_url: str) -> None:
    """The anthropic SDK, which sends its key as x-api-key, gets messages whole and streamed
    from a vLLM worker, and its errors in Anthropic's shape."""
    client = anthropic.AsyncAnthropic(base_url=pool_url, api_key=API_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hello claude"}]
    whole = await client.messages.create(model=VLLM_MODEL, max_tokens=50, messages=messages)
    async with client.messages.stream(model=VLLM_MODEL, max_tokens=50, messages=messages) as stream:
        streamed = "".join([text async for text in stream.text_stream])
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=5, messages=messages)
    await client.close()

    assert ["echo: hello claude"] == [b.text for b in whole.content if b.type == "text"]
    assert "echo: hello claude" == streamed
    assert "error" == missing.value.body["type"]  # type: ignore[index]


async def test_ollama_client_against_an_ollama_worker(pool_url: str) -> None:
    """The ollama client's chat, generate, embed, show, ps and version work through the pool
    as against Ollama itself."""
    async with ollama.AsyncClient(
        host=pool_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as client:
        chat = await client.chat(model=OLLAMA_MODEL, messages=[{"role": "user", "content": "hi"}])
        parts = [
            part["message"]["content"]
            async for part in await client.chat(
                model=OLLAMA_MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        ]
        generated = await client.generate(model=OLLAMA_MODEL, prompt="say this")
        embedded = await client.embed(model=OLLAMA_MODEL, input=["one", "two"])
        shown = await client.show(OLLAMA_MODEL)
        running = await client.ps()
        version = await client._request_raw("GET", "/api/version")  # the client has no helper

    assert ("echo: hi", "echo: hi") == (chat["message"]["content"], "".join(parts))
    assert "echo: say this" == generated["response"]
    assert 2 == len(embedded["embeddings"])
    assert shown.modelinfo is not None
    assert [OLLAMA_MODEL] == [m.model for m in running.models]
    assert 200 == version.status_code


def ollama_client(url: str) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


async def test_ollama_client_against_a_vllm_worker(pool_url: str) -> None:
    """The ollama client's chat (whole and streamed), generate, embed and show work for a model
    whose backend speaks only OpenAI's API: its worker translates."""
    hi: Any = [{"role": "user", "content": "hi"}]
    async with ollama_client(pool_url) as client:
        chat = await client.chat(model=VLLM_MODEL, messages=hi)
        streamed = await client.chat(model=VLLM_MODEL, messages=hi, stream=True)
        parts = [part["message"]["content"] async for part in streamed]
        generated = await client.generate(model=VLLM_MODEL, prompt="say this")
        embedded = await client.embed(model=VLLM_MODEL, input=["one", "two"])
        shown = await client.show(VLLM_MODEL)

    assert ("echo: hi", "echo: hi") == (chat["message"]["content"], "".join(parts))
    assert (True, True) == (chat["done"], len(parts) > 1)
    assert "echo: say this" == generated["response"]
    assert 2 == len(embedded["embeddings"])
    assert "completion" in (shown.capabilities or [])


async def test_ollama_ps_lists_loaded_and_in_flight_models(pool_url: str) -> None:
    """ps through the pool lists what the Ollama backend holds, as it reports it, and the vLLM
    model while a request for it is in flight."""
    prompt = " ".join(f"w{i}" for i in range(200))  # streamed for 200 token delays
    first_part = asyncio.Event()

    async def generate(client: ollama.AsyncClient) -> None:
        async for _ in await client.generate(model=VLLM_MODEL, prompt=prompt, stream=True):
            first_part.set()

    async with ollama_client(pool_url) as client:
        generating = asyncio.create_task(generate(client))
        await asyncio.wait_for(first_part.wait(), 30)
        running = await client.ps()
        still_generating = not generating.done()
        generating.cancel()
        await asyncio.gather(generating, return_exceptions=True)

    assert still_generating
    assert [OLLAMA_MODEL, VLLM_MODEL] == [m.model for m in running.models]
    loaded = loaded_model(OLLAMA_MODEL)
    assert (loaded["size_vram"], loaded["digest"], "llama") == (
        running.models[0].size_vram,
        running.models[0].digest,
        running.models[0].details.family if running.models[0].details else None,
    )
